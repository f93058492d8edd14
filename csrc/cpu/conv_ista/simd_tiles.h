// Register-tiled SIMD micro-kernels of the direct strategy: a correlation tile (the two convolutions of an iteration)
// and a weight-gradient tile (their adjoint in the weights), plus the packed-weight plan that drives the first.
//
// correlation_tile: out[r][co][j] = sum_{ci, a, b} in[ci * ics + (r + a) * irs + boff[b] + j] * w[co][ci][a][b] for
// ROWS output rows, COB output channels and NV vectors of columns. weight_grad_tile: part[co][t] += sum_{i, j}
// G[co][i][j] I[i][boff[t] + j] lane by lane, the gradient in W of the same correlation, reduced along columns
// (weight_grad_channels_tile: the same, vectorised along code channels, for narrow maps). All make only unit-stride
// loads; strided layouts are absorbed by boff (see direct_iteration.h for the column-phase layout
// that makes a stride unit-stride).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "elementwise.h"

namespace dsc_kernels {
namespace conv_ista {

// Largest tile (rows x channels x columns) any micro-kernel instantiation writes (rows * cob * nv * L <=
// kTileAccumulators * L, see CorrelationPlan).
constexpr int kMaxTile = 512;

template <typename T>
using TileFn = void (*)(const T*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, const T*, T*);

// f(integral_constant<R0>, integral_constant<R1>) for the runtime range 0 <= r0 <= r1 < ROWS.
// Always inlined, like the tile's lambdas: an outlined copy would keep the tile's accumulators in memory.
template <int ROWS, int R0 = 0, int R1 = 0, class F>
__attribute__((always_inline)) inline void with_row_range(int r0, int r1, F&& f) {
  if constexpr (R0 < ROWS) {
    if constexpr (R1 >= ROWS) {
      with_row_range<ROWS, R0 + 1, R0 + 1>(r0, r1, f);
    } else {
      if (r0 == R0 && r1 == R1)
        f(std::integral_constant<int, R0>{}, std::integral_constant<int, R1>{});
      else
        with_row_range<ROWS, R0, R1 + 1>(r0, r1, f);
    }
  }
}

// out[r][co][j] = sum_{ci, a, b} in[ci * ics + (r + a) * irs + boff[b] + j] * wp[((ci * KH + a) * KW + b) * COB + co]
// for ROWS output rows (row r reads the input rows r .. r + KH - 1), COB output channels and NV vectors of columns:
// ROWS * COB * NV accumulators stay in registers, each input vector is loaded once per tap (unit stride: boff
// absorbs a strided layout) and reused for COB channels and for every output row whose window holds its row.
// DENSE: boff[b] = b, known here, which saves a load per tap.
// Why ROWS: with one output channel (D onto a gray image) a tap costs one broadcast and NV loads for NV FMAs, and
// the loads, shifted by one column per tap, mostly straddle two cache lines: the one-row tile ran at a third of
// the FMA rate of the many-channel analysis tile (perf, csc-gray). Output rows r and r + 1 read the same input row
// with kernel rows a and a - 1, so ROWS rows share each load: with 4 rows x 4 vectors, 16 FMAs per 4 loads and 4
// broadcasts.
// Loop order: taps innermost when there are more taps than input channels (E from 1-3 signal channels: 9-121 taps),
// input channels innermost otherwise (D in polyphase form onto few channels: 175 code channels, 1-4 taps per phase
// for CSCNet's 11 x 11 kernel at stride 8, where a tap loop of one or two trips was mostly loop overhead).
// A tile of fewer than 8 accumulators would wait on the FMA latency, one dependent FMA per accumulator and step, so
// SPLIT input channels run interleaved into separate accumulators summed at the end.
template <typename T, int COB, int NV, int ROWS, bool DENSE>
void correlation_tile(const T* in, int64_t ics, int64_t irs, const int64_t* boff, int64_t CI, int64_t KH,
                      int64_t KW, const T* wp, T* out) {
  using V = typename VecOf<T>::V;
  constexpr int L = VecOf<T>::L;
  constexpr int ACC = ROWS * COB * NV;
  constexpr int SPLIT = ACC >= 8 ? 1 : (ACC >= 4 ? 2 : 4);
  V acc[SPLIT][ROWS][COB][NV];
  for (int s = 0; s < SPLIT; ++s)
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
      for (int co = 0; co < COB; ++co)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[s][r][co][v] = V{};
  const int64_t taps = KH * KW;
  // acc[s][r] += input channel ci's row u at tap column b, with kernel row u - r, for the rows r in [R0, R1] (the
  // rows whose window holds row u; compile-time, so the row loop carries no test).
  auto fma = [&](auto r0, auto r1, int s, int64_t ci, int64_t u, int64_t b) __attribute__((always_inline)) {
    V xin[NV];
    const T* p = in + ci * ics + u * irs + (DENSE ? b : boff[b]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&xin[v], p + v * L, sizeof(V));
    const T* w = wp + (ci * taps + u * KW + b) * COB;
#pragma GCC unroll 4
    for (int r = decltype(r0)::value; r <= decltype(r1)::value; ++r) {
      const T* wr = w - r * KW * COB;
#pragma GCC unroll 8
      for (int co = 0; co < COB; ++co) {
        const T wc = wr[co];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[s][r][co][v] += wc * xin[v];
      }
    }
  };
  // f(R0, R1) for input row u: the output rows that read it.
  auto on_row = [&](int64_t u, auto&& f) __attribute__((always_inline)) {
    with_row_range<ROWS>(int(std::max<int64_t>(0, u - KH + 1)), int(std::min<int64_t>(ROWS - 1, u)), f);
  };
  const int64_t U = KH + ROWS - 1;
  if (CI > taps) {
    for (int64_t u = 0; u < U; ++u)
      on_row(u, [&](auto r0, auto r1) __attribute__((always_inline)) {
        for (int64_t b = 0; b < KW; ++b) {
          int64_t ci = 0;
          for (; ci + SPLIT <= CI; ci += SPLIT)
#pragma GCC unroll 4
            for (int s = 0; s < SPLIT; ++s) fma(r0, r1, s, ci + s, u, b);
          for (; ci < CI; ++ci) fma(r0, r1, 0, ci, u, b);
        }
      });
  } else {
    auto channels = [&](int64_t ci, auto nsplit) __attribute__((always_inline)) {
      for (int64_t u = 0; u < U; ++u)
        on_row(u, [&](auto r0, auto r1) __attribute__((always_inline)) {
          for (int64_t b = 0; b < KW; ++b)
#pragma GCC unroll 4
            for (int s = 0; s < decltype(nsplit)::value; ++s) fma(r0, r1, s, ci + s, u, b);
        });
    };
    int64_t ci = 0;
    for (; ci + SPLIT <= CI; ci += SPLIT) channels(ci, std::integral_constant<int, SPLIT>{});
    for (; ci < CI; ++ci) channels(ci, std::integral_constant<int, 1>{});
  }
  for (int s = 1; s < SPLIT; ++s)
    for (int r = 0; r < ROWS; ++r)
      for (int co = 0; co < COB; ++co)
        for (int v = 0; v < NV; ++v) acc[0][r][co][v] += acc[s][r][co][v];
  for (int r = 0; r < ROWS; ++r)
    for (int co = 0; co < COB; ++co)
      for (int v = 0; v < NV; ++v) std::memcpy(out + ((r * COB + co) * NV + v) * L, &acc[0][r][co][v], sizeof(V));
}

// Accumulators a tile may hold (rows x channels x vectors) next to its input vectors and a broadcast weight, and the
// most output rows one tile computes.
constexpr int kTileAccumulators = kVecRegs == 32 ? 24 : 8;
constexpr int kMaxRowBlock = 4;
// Most products one accumulator sums before its partial sum is added to the others (row_block). One accumulator
// summing all Cc x taps products of D (32 x 49 on csc-gray) carries a rounding error that grows with their count:
// on a 37-channel polyphase synthesis the float32 z was 2-3x as far from float64 as eager PyTorch's, whose oneDNN
// and col2im paths sum in blocks. Blocks of at most this many products cost one add per output and block.
constexpr int64_t kProductsPerSum = 256;

// A correlation with packed weights and its micro-kernel; tap(co, ci, a, b) gives the kernel's values and boff[b]
// where tap column b reads, relative to an output's column (empty: b). Output rows come one at a time (row), or in
// blocks of `rows` that read consecutive input rows (row_block; see correlation_tile for why).
template <typename T>
struct CorrelationPlan {
  int64_t CO, CI, KH, KW;
  int64_t ci_block;  // input channels per partial sum (kProductsPerSum)
  int cob, tile_w, rows;
  std::vector<T> wp;  // [CO / cob][CI][KH][KW][cob], zero-padded channels
  std::vector<int64_t> boff;
  TileFn<T> fn, fn_rows;  // one row; `rows` rows

  // Channels per micro-kernel tile and vectors of columns for CO outputs channels and rows of wout columns.
  static void shape(int64_t CO, int64_t wout, int& cob, int& nv) {
    constexpr int L = VecOf<T>::L;
    // Every input vector loaded feeds cob FMAs, so few channels (D with 1-3 signal channels) get a tile of exactly
    // that many rather than a single channel.
    // Many channels: cob x nv accumulators plus nv input vectors and a broadcast weight must fit the register file
    // (16 vector registers on AVX2: 6 x 2; 32 with AVX-512: 8 x 2; measured best of the shapes that fit).
    // Fewer channels than cmax split into equal blocks of at most 4 (6 channels, D onto RGB at stride 2: 3 + 3, not
    // 4 + 2 with a third of the second tile's FMAs on zero weights).
    const int cmax = kVecRegs == 32 ? 8 : 6;
    cob = CO >= cmax ? cmax : int((CO + (CO + 3) / 4 - 1) / ((CO + 3) / 4));
    const int nv_max = cob == cmax ? 2 : 4;
    const int64_t need = (wout + L - 1) / L;
    nv = need >= nv_max ? nv_max : (need >= 2 ? 2 : 1);
  }

  // Output rows per block: 4 or 2 where the accumulators fit and a window has rows to share; tiles of more than 4
  // channels already reuse each load that often.
  static int row_block_size(int cob, int nv, int64_t KH, int max_rows) {
    for (int r = kMaxRowBlock; r >= 2; r /= 2)
      if (r <= max_rows && KH >= 2 && cob <= 4 && r * cob * nv <= kTileAccumulators) return r;
    return 1;
  }

  template <int ROWS, bool DENSE>
  static TileFn<T> pick(int cob, int nv) {
    switch (cob) {
      case 8: return pick_nv<8, ROWS, DENSE>(nv);
      case 6: return pick_nv<6, ROWS, DENSE>(nv);
      case 4: return pick_nv<4, ROWS, DENSE>(nv);
      case 3: return pick_nv<3, ROWS, DENSE>(nv);
      case 2: return pick_nv<2, ROWS, DENSE>(nv);
      default: return pick_nv<1, ROWS, DENSE>(nv);
    }
  }

  template <int COB, int ROWS, bool DENSE>
  static TileFn<T> pick_nv(int nv) {
    if constexpr (ROWS > 1 && COB > 4) {
      return nullptr;  // row_block_size never asks for these
    } else {
      switch (nv) {
        case 1: return &correlation_tile<T, COB, 1, ROWS, DENSE>;
        case 2: return &correlation_tile<T, COB, 2, ROWS, DENSE>;
        case 3: return &correlation_tile<T, COB, 3, ROWS, DENSE>;
        default: return &correlation_tile<T, COB, 4, ROWS, DENSE>;
      }
    }
  }

  template <bool DENSE>
  static TileFn<T> pick_rows(int rows, int cob, int nv) {
    switch (rows) {
      case 4: return pick<4, DENSE>(cob, nv);
      case 2: return pick<2, DENSE>(cob, nv);
      default: return pick<1, DENSE>(cob, nv);
    }
  }

  // wout rounded up to whole tiles.
  static int64_t padded_width(int64_t CO, int64_t wout) {
    int cob, nv;
    shape(CO, wout, cob, nv);
    const int64_t tw = nv * VecOf<T>::L;
    return (wout + tw - 1) / tw * tw;
  }

  // max_rows: the most output rows row_block will be asked for at once (1: row only).
  template <class Tap>
  CorrelationPlan(int64_t CO_, int64_t CI_, int64_t KH_, int64_t KW_, int64_t wout, std::vector<int64_t> boff_,
                  Tap&& tap, int max_rows = 1)
      : CO(CO_), CI(CI_), KH(KH_), KW(KW_),
        ci_block(std::max<int64_t>(1, kProductsPerSum / std::max<int64_t>(1, KH_ * KW_))), boff(std::move(boff_)) {
    int nv;
    shape(CO, wout, cob, nv);
    tile_w = nv * VecOf<T>::L;
    rows = row_block_size(cob, nv, KH, max_rows);
    bool dense = true;
    if (boff.empty())
      for (int64_t b = 0; b < KW; ++b) boff.push_back(b);
    for (int64_t b = 0; b < KW; ++b) dense = dense && boff[b] == b;
    fn = dense ? pick<1, true>(cob, nv) : pick<1, false>(cob, nv);
    fn_rows = dense ? pick_rows<true>(rows, cob, nv) : pick_rows<false>(rows, cob, nv);
    const int64_t nblk = (CO + cob - 1) / cob;
    wp.assign(nblk * CI * KH * KW * cob, T(0));
    for (int64_t co = 0; co < CO; ++co)
      for (int64_t ci = 0; ci < CI; ++ci)
        for (int64_t a = 0; a < KH; ++a)
          for (int64_t b = 0; b < KW; ++b)
            wp[((((co / cob) * CI + ci) * KH + a) * KW + b) * cob + co % cob] = tap(co, ci, a, b);
  }

  // Columns a buffer row must hold so that every tile of `wout` outputs reads inside it (boff the identity).
  int64_t in_width(int64_t wout) const { return padded_width(CO, wout) - 1 + KW; }

  // nrows (<= rows) output rows, row r reading input rows r .. r + KH - 1: `in` points at (channel 0, first window
  // row, column 0) of a buffer with channel stride ics and row stride irs; epi(r, co, j0, values, count) receives
  // each tile's valid outputs. Input channels run in blocks of ci_block, each summed by the tile from zero and then
  // added to the others.
  template <class Epi>
  void row_block(const T* in, int64_t ics, int64_t irs, int64_t wout, int nrows, Epi&& epi) const {
    alignas(64) T tile[kMaxTile];
    alignas(64) T part[kMaxTile];
    const bool block = nrows == rows;
    const TileFn<T> tile_fn = block ? fn_rows : fn;
    const int64_t tile_size = (block ? nrows : 1) * cob * tile_w;
    for (int64_t cb = 0; cb < CO; cb += cob) {
      const T* w = wp.data() + cb * CI * KH * KW;
      const int64_t nco = std::min<int64_t>(cob, CO - cb);
      for (int64_t j0 = 0; j0 < wout; j0 += tile_w) {
        const int64_t nj = std::min<int64_t>(tile_w, wout - j0);
        for (int r = 0; r < nrows; r += block ? nrows : 1) {
          for (int64_t c0 = 0; c0 < CI; c0 += ci_block) {
            tile_fn(in + r * irs + j0 + c0 * ics, ics, irs, boff.data(), std::min(CI - c0, ci_block), KH, KW,
                    w + c0 * KH * KW * cob, c0 == 0 ? tile : part);
            if (c0 > 0) add_to(tile, part, tile_size);
          }
          for (int rr = 0; rr < (block ? nrows : 1); ++rr)
            for (int64_t co = 0; co < nco; ++co) epi(r + rr, cb + co, j0, tile + (rr * cob + co) * tile_w, nj);
        }
      }
    }
  }

  // One output row (row_block of one row); epi(co, j0, values, count).
  template <class Epi>
  void row(const T* in, int64_t ics, int64_t irs, int64_t wout, Epi&& epi) const {
    row_block(in, ics, irs, wout, 1,
              [&](int, int64_t co, int64_t j0, const T* v, int64_t cnt) { epi(co, j0, v, cnt); });
  }
};

// Weight-gradient micro-kernel: part[co * NB + t] += sum_{i < rows} sum_{j < nvec L} G[co * gcs + i * grs + j] *
// I[i * irs + boff[t] + j], lane by lane (part holds COB x NB vectors of partial sums; their lanes are added by
// lane_sum once every row chunk is in), for COB code channels (G rows) and NB taps of one (input channel, kernel
// row): the adjoint in W of the analysis correlation, over the padded, column-phased signal I (boff as in
// make_analysis_plan). Vectorised along the reduction (j): COB x NB accumulators stay in registers, every G vector
// feeds NB FMAs and every I vector COB. The caller feeds G in chunks of rows that stay in L1 across the kernel rows
// and tap blocks that reread them: a whole item's G (4 code channels of a 64 x 64 map, 64 KiB) came from L2 at the
// rate the FMAs consumed it (perf, csc-gray).
template <typename T, int COB, int NB>
void weight_grad_tile(const T* G, int64_t gcs, int64_t grs, const T* I, int64_t irs, const int64_t* boff,
                      int64_t rows, int64_t nvec, T* part) {
  using V = typename VecOf<T>::V;
  constexpr int L = VecOf<T>::L;
  V acc[COB][NB];
  for (int co = 0; co < COB; ++co)
    for (int t = 0; t < NB; ++t) std::memcpy(&acc[co][t], part + (co * NB + t) * L, sizeof(V));
  for (int64_t i = 0; i < rows; ++i) {
    const T* gr = G + i * grs;
    const T* ir = I + i * irs;
    for (int64_t v = 0; v < nvec; ++v) {
      V gv[COB];
#pragma GCC unroll 8
      for (int co = 0; co < COB; ++co) std::memcpy(&gv[co], gr + co * gcs + v * L, sizeof(V));
#pragma GCC unroll 8
      for (int t = 0; t < NB; ++t) {
        V iv;
        std::memcpy(&iv, ir + boff[t] + v * L, sizeof(V));
#pragma GCC unroll 8
        for (int co = 0; co < COB; ++co) acc[co][t] += gv[co] * iv;
      }
    }
  }
  for (int co = 0; co < COB; ++co)
    for (int t = 0; t < NB; ++t) std::memcpy(part + (co * NB + t) * L, &acc[co][t], sizeof(V));
}

// The sum of one vector's lanes (a weight_grad_tile partial).
template <typename T>
T lane_sum(const T* v) {
  T sum = 0;
  for (int l = 0; l < VecOf<T>::L; ++l) sum += v[l];
  return sum;
}

// The same weight gradient vectorised along code channels, for narrow code maps where rows of whole vectors would be
// mostly padding (CSCNet's 17-wide code: 17 of 32 lanes): part[t * CV + v] += sum_{i < rows} sum_{j < cols}
// G[i * grs + j * gps + v L ...] * I[i * irs + boff[t] + j], with G channels-last (a pixel's channels contiguous,
// gps apart) and every lane a code channel, so nothing is summed across lanes. Every G vector feeds NB FMAs, every
// broadcast I value CV.
template <typename T, int CV, int NB>
void weight_grad_channels_tile(const T* G, int64_t gps, int64_t grs, const T* I, int64_t irs, const int64_t* boff,
                               int64_t rows, int64_t cols, T* part) {
  using V = typename VecOf<T>::V;
  constexpr int L = VecOf<T>::L;
  V acc[NB][CV];
  for (int t = 0; t < NB; ++t)
    for (int v = 0; v < CV; ++v) std::memcpy(&acc[t][v], part + (t * CV + v) * L, sizeof(V));
  for (int64_t i = 0; i < rows; ++i) {
    const T* gr = G + i * grs;
    const T* ib[NB];
    for (int t = 0; t < NB; ++t) ib[t] = I + i * irs + boff[t];
    for (int64_t j = 0; j < cols; ++j) {
      V gv[CV];
#pragma GCC unroll 4
      for (int v = 0; v < CV; ++v) std::memcpy(&gv[v], gr + j * gps + v * L, sizeof(V));
#pragma GCC unroll 8
      for (int t = 0; t < NB; ++t) {
        const T x = ib[t][j];
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) acc[t][v] += x * gv[v];
      }
    }
  }
  for (int t = 0; t < NB; ++t)
    for (int v = 0; v < CV; ++v) std::memcpy(part + (t * CV + v) * L, &acc[t][v], sizeof(V));
}

// Channel vectors per weight_grad_channels_tile: CV x NB accumulators + CV G vectors + a broadcast.
constexpr int kWeightGradChannelVecs = kVecRegs == 32 ? 4 : 2;

// Register budget as in CorrelationPlan::shape: COB x NB accumulators + COB G vectors + one I vector.
constexpr int kWeightGradChannels = kVecRegs == 32 ? 4 : 3;
constexpr int kWeightGradTapsMax = kVecRegs == 32 ? 5 : 3;

// f(std::integral_constant<int, N>{}) for 1 <= n <= max (max <= 5): a runtime tile size as a template argument.
template <int MAX, class F>
void with_count(int n, F&& f) {
  static_assert(MAX >= 1 && MAX <= 5, "with_count: 1 to 5");
  switch (n) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: if constexpr (MAX >= 2) return f(std::integral_constant<int, 2>{}); break;
    case 3: if constexpr (MAX >= 3) return f(std::integral_constant<int, 3>{}); break;
    case 4: if constexpr (MAX >= 4) return f(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (MAX >= 5) return f(std::integral_constant<int, 5>{}); break;
  }
  TORCH_CHECK(false, "with_count: ", n, " is not in 1..", MAX);
}

// weight_grad_tile for a block of nb <= kWeightGradTapsMax taps.
template <typename T>
void weight_grad_block(int nb, const T* G, int64_t gcs, int64_t grs, const T* I, int64_t irs,
                       const int64_t* boff, int64_t rows, int64_t nvec, T* part) {
  with_count<kWeightGradTapsMax>(nb, [&](auto NB) {
    weight_grad_tile<T, kWeightGradChannels, decltype(NB)::value>(G, gcs, grs, I, irs, boff, rows, nvec, part);
  });
}

// weight_grad_channels_tile for cv <= kWeightGradChannelVecs channel vectors and nb <= kWeightGradTapsMax taps.
template <typename T>
void weight_grad_channels_block(int cv, int nb, const T* G, int64_t gps, int64_t grs, const T* I, int64_t irs,
                                const int64_t* boff, int64_t rows, int64_t cols, T* part) {
  with_count<kWeightGradChannelVecs>(cv, [&](auto CV) {
    with_count<kWeightGradTapsMax>(nb, [&](auto NB) {
      weight_grad_channels_tile<T, decltype(CV)::value, decltype(NB)::value>(G, gps, grs, I, irs, boff, rows, cols,
                                                                            part);
    });
  });
}

}  // namespace conv_ista
}  // namespace dsc_kernels
