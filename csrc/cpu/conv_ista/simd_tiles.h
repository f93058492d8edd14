// Register-tiled SIMD micro-kernels of the direct strategy: a correlation tile (the two convolutions of an iteration)
// and a weight-gradient tile (their adjoint in the weights), plus the packed-weight plan that drives the first.
//
// correlation_tile: out[co][j] = sum_{ci, a, b} in[ci * ics + a * irs + boff[b] + j] * w[co][ci][a][b] for COB output
// channels and NV vectors of columns. weight_grad_tile: out[co][t] = sum_{i, j} G[co][i][j] I[i][boff[t] + j], the
// gradient in W of the same correlation, reduced along columns. Both make only unit-stride loads; strided layouts
// are absorbed by boff (see direct_iteration.h for the column-phase layout that makes a stride unit-stride).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "elementwise.h"

namespace dsc_kernels {
namespace conv_ista {

// Largest tile (channels x columns) any micro-kernel instantiation writes (cob * nv * L, see CorrelationPlan).
constexpr int kMaxTile = 512;

template <typename T>
using TileFn = void (*)(const T*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, const T*, T*);

// out[co][j] = sum_{ci, a, b} in[ci * ics + a * irs + boff[b] + j] * wp[((ci * KH + a) * KW + b) * COB + co]
// for COB output channels and NV vectors of columns: COB * NV accumulators stay in registers, each input vector is
// loaded once per tap (unit stride: boff absorbs a strided layout) and reused for COB channels. DENSE: boff[b] = b,
// known here, which saves a load per tap (a fifth of the loads of the load-bound one-channel tile).
// Loop order: taps innermost when there are more taps than input channels (E from 1-3 signal channels: 9-121 taps),
// input channels innermost otherwise (D in polyphase form onto few channels: 175 code channels, 1-4 taps per phase
// for CSCNet's 11 x 11 kernel at stride 8, where a tap loop of one or two trips was mostly loop overhead).
// A tile of fewer than 8 accumulators (few output channels: D onto 1-3 signal channels) would wait on the FMA
// latency, one dependent FMA per accumulator and step, so SPLIT input channels run interleaved into separate
// accumulators summed at the end.
template <typename T, int COB, int NV, bool DENSE>
void correlation_tile(const T* in, int64_t ics, int64_t irs, const int64_t* boff, int64_t CI, int64_t KH,
                      int64_t KW, const T* wp, T* out) {
  using V = typename VecOf<T>::V;
  constexpr int L = VecOf<T>::L;
  constexpr int SPLIT = COB * NV >= 8 ? 1 : (COB * NV >= 4 ? 2 : 4);
  V acc[SPLIT][COB][NV];
  for (int s = 0; s < SPLIT; ++s)
#pragma GCC unroll 8
    for (int co = 0; co < COB; ++co)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][co][v] = V{};
  const int64_t taps = KH * KW;
  // acc[s] += input channel ci's tap (a, b).
  auto fma = [&](int s, int64_t ci, int64_t a, int64_t b) {
    V xin[NV];
    const T* p = in + ci * ics + a * irs + (DENSE ? b : boff[b]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&xin[v], p + v * L, sizeof(V));
    const T* w = wp + (ci * taps + a * KW + b) * COB;
#pragma GCC unroll 8
    for (int co = 0; co < COB; ++co) {
      const T wc = w[co];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][co][v] += wc * xin[v];
    }
  };
  if (CI > taps) {
    for (int64_t a = 0; a < KH; ++a)
      for (int64_t b = 0; b < KW; ++b) {
        int64_t ci = 0;
        for (; ci + SPLIT <= CI; ci += SPLIT)
#pragma GCC unroll 4
          for (int s = 0; s < SPLIT; ++s) fma(s, ci + s, a, b);
        for (; ci < CI; ++ci) fma(0, ci, a, b);
      }
  } else {
    int64_t ci = 0;
    for (; ci + SPLIT <= CI; ci += SPLIT)
      for (int64_t a = 0; a < KH; ++a)
        for (int64_t b = 0; b < KW; ++b)
#pragma GCC unroll 4
          for (int s = 0; s < SPLIT; ++s) fma(s, ci + s, a, b);
    for (; ci < CI; ++ci)
      for (int64_t a = 0; a < KH; ++a)
        for (int64_t b = 0; b < KW; ++b) fma(0, ci, a, b);
  }
  for (int s = 1; s < SPLIT; ++s)
    for (int co = 0; co < COB; ++co)
      for (int v = 0; v < NV; ++v) acc[0][co][v] += acc[s][co][v];
  for (int co = 0; co < COB; ++co)
    for (int v = 0; v < NV; ++v) std::memcpy(out + (co * NV + v) * L, &acc[0][co][v], sizeof(V));
}

// A correlation with packed weights and its micro-kernel; tap(co, ci, a, b) gives the kernel's values and boff[b]
// where tap column b reads, relative to an output's column (empty: b).
template <typename T>
struct CorrelationPlan {
  int64_t CO, CI, KH, KW;
  int cob, tile_w;
  std::vector<T> wp;  // [CO / cob][CI][KH][KW][cob], zero-padded channels
  std::vector<int64_t> boff;
  TileFn<T> fn;

  // Channels per micro-kernel tile and vectors of columns for CO outputs channels and rows of wout columns.
  static void shape(int64_t CO, int64_t wout, int& cob, int& nv) {
    constexpr int L = VecOf<T>::L;
    // Every input vector loaded feeds cob FMAs, so few channels (D with 1-3 signal channels) get a tile of exactly
    // that many rather than a single channel.
    // Many channels: cob x nv accumulators plus nv input vectors and a broadcast weight must fit the register file
    // (16 vector registers on AVX2: 6 x 2; 32 with AVX-512: 8 x 2; measured best of the shapes that fit).
    const int cmax = kVecRegs == 32 ? 8 : 6;
    cob = CO >= cmax ? cmax : (CO >= 4 ? 4 : int(CO));
    const int nv_max = cob == cmax ? 2 : 4;
    const int64_t need = (wout + L - 1) / L;
    nv = need >= nv_max ? nv_max : (need >= 2 ? 2 : 1);
  }

  template <bool DENSE>
  static TileFn<T> pick(int cob, int nv) {
    switch (cob) {
      case 8: return pick_nv<8, DENSE>(nv);
      case 6: return pick_nv<6, DENSE>(nv);
      case 4: return pick_nv<4, DENSE>(nv);
      case 3: return pick_nv<3, DENSE>(nv);
      case 2: return pick_nv<2, DENSE>(nv);
      default: return pick_nv<1, DENSE>(nv);
    }
  }

  template <int COB, bool DENSE>
  static TileFn<T> pick_nv(int nv) {
    switch (nv) {
      case 1: return &correlation_tile<T, COB, 1, DENSE>;
      case 2: return &correlation_tile<T, COB, 2, DENSE>;
      case 3: return &correlation_tile<T, COB, 3, DENSE>;
      default: return &correlation_tile<T, COB, 4, DENSE>;
    }
  }

  // wout rounded up to whole tiles.
  static int64_t padded_width(int64_t CO, int64_t wout) {
    int cob, nv;
    shape(CO, wout, cob, nv);
    const int64_t tw = nv * VecOf<T>::L;
    return (wout + tw - 1) / tw * tw;
  }

  template <class Tap>
  CorrelationPlan(int64_t CO_, int64_t CI_, int64_t KH_, int64_t KW_, int64_t wout, std::vector<int64_t> boff_,
                  Tap&& tap)
      : CO(CO_), CI(CI_), KH(KH_), KW(KW_), boff(std::move(boff_)) {
    int nv;
    shape(CO, wout, cob, nv);
    tile_w = nv * VecOf<T>::L;
    bool dense = true;
    if (boff.empty())
      for (int64_t b = 0; b < KW; ++b) boff.push_back(b);
    for (int64_t b = 0; b < KW; ++b) dense = dense && boff[b] == b;
    fn = dense ? pick<true>(cob, nv) : pick<false>(cob, nv);
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

  // One output row: `in` points at (channel 0, first window row, column 0) of a buffer with channel stride ics and
  // row stride irs; epi(co, j0, values, count) receives each tile's valid outputs.
  template <class Epi>
  void row(const T* in, int64_t ics, int64_t irs, int64_t wout, Epi&& epi) const {
    alignas(64) T tile[kMaxTile];
    for (int64_t cb = 0; cb < CO; cb += cob) {
      const T* w = wp.data() + cb * CI * KH * KW;
      const int64_t nco = std::min<int64_t>(cob, CO - cb);
      for (int64_t j0 = 0; j0 < wout; j0 += tile_w) {
        fn(in + j0, ics, irs, boff.data(), CI, KH, KW, w, tile);
        const int64_t nj = std::min<int64_t>(tile_w, wout - j0);
        for (int64_t co = 0; co < nco; ++co) epi(cb + co, j0, tile + co * tile_w, nj);
      }
    }
  }
};

// Weight-gradient micro-kernel: out[co * NB + t] = sum_{i < rows} sum_{j < nvec L} G[co * gcs + i * grs + j] *
// I[i * irs + boff[t] + j] for COB code channels (G rows) and NB taps of one (input channel, kernel row): the
// adjoint in W of the analysis correlation, over the padded, column-phased signal I (boff as in make_analysis_plan).
// Vectorised along the reduction (j): COB x NB accumulators stay in registers for the whole item and are summed
// across lanes once. Every G vector feeds NB FMAs and every I vector COB.
template <typename T, int COB, int NB>
void weight_grad_tile(const T* G, int64_t gcs, int64_t grs, const T* I, int64_t irs, const int64_t* boff,
                      int64_t rows, int64_t nvec, T* out) {
  using V = typename VecOf<T>::V;
  constexpr int L = VecOf<T>::L;
  V acc[COB][NB];
  for (int co = 0; co < COB; ++co)
    for (int t = 0; t < NB; ++t) acc[co][t] = V{};
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
    for (int t = 0; t < NB; ++t) {
      T sum = 0;
      for (int l = 0; l < L; ++l) sum += acc[co][t][l];
      out[co * NB + t] = sum;
    }
}

// Register budget as in CorrelationPlan::shape: COB x NB accumulators + COB G vectors + one I vector.
constexpr int kWeightGradChannels = kVecRegs == 32 ? 4 : 3;
constexpr int kWeightGradTapsMax = kVecRegs == 32 ? 5 : 3;

template <typename T>
void weight_grad_block(int nb, const T* G, int64_t gcs, int64_t grs, const T* I, int64_t irs,
                       const int64_t* boff, int64_t rows, int64_t nvec, T* out) {
  switch (nb) {
    case 1: return weight_grad_tile<T, kWeightGradChannels, 1>(G, gcs, grs, I, irs, boff, rows, nvec, out);
    case 2: return weight_grad_tile<T, kWeightGradChannels, 2>(G, gcs, grs, I, irs, boff, rows, nvec, out);
    case 3: return weight_grad_tile<T, kWeightGradChannels, 3>(G, gcs, grs, I, irs, boff, rows, nvec, out);
#if defined(__AVX512F__)
    case 4: return weight_grad_tile<T, kWeightGradChannels, 4>(G, gcs, grs, I, irs, boff, rows, nvec, out);
    default: return weight_grad_tile<T, kWeightGradChannels, 5>(G, gcs, grs, I, irs, boff, rows, nvec, out);
#else
    default: TORCH_CHECK(false, "weight_grad_block: tap block too wide");
#endif
  }
}

}  // namespace conv_ista
}  // namespace dsc_kernels
