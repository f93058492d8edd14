// Fused conv-ISTA / conv-FISTA on the CPU: ops dsc_kernels::conv_ista_fwd_cpp and conv_ista_bwd_cpp.
//
// Canonical 2-D tensors (docs/design.md §7.1): x (B, Cs, H, W); weight W_D and encoder_weight W_E (Cc, Cs, KH, KW);
// lam (n, Cc); step (n,); z0 (B, Cc, Hz, Wz) or empty (zeros). D z = conv_transpose2d(z, W_D) cropped/padded to
// x's size, E r = conv2d(r, W_E), both with the given stride and padding.
//
// Forward, k = 0 .. n-1 (FISTA: beta_k = (t_{k-1} - 1) / t_k, beta_0 = 0; ISTA: beta_k = 0):
//     y_k     = z_k + beta_k (z_k - z_{k-1})
//     u_k     = y_k + step_k * E(x - D y_k)
//     z_{k+1} = S_{step_k lam_k[c]}(u_k)              (S+ when nonneg)
// Each iteration is one fused pass over the code: a task (a batch item, or a band of its code rows) rebuilds, in
// thread-local buffers, y on the rows its halo needs and the residual x - D y on the signal rows its analysis
// window covers, then applies E, adds y, thresholds and writes z_{k+1}. No full-size D y, residual or u is ever
// materialised. With at least as many items as threads, a thread runs all iterations of its items in item-sized
// buffers; otherwise every iteration is one parallel pass over (item, band) with batch-sized rotating buffers.
// Saved for backward (checkpoint interval m, reference/conv_ista.py::checkpoint_indices): z_k for 0 < k < n with
// k % m == 0 (FISTA also k % m == m - 1), or nothing (m = 0, recompute mode). An absent z0 is read as zeros.
//
// Backward (g = dL/dz_{k+1}, gu = g * [z_{k+1} != 0], r_k = x - D y_k, v = E^* gu = conv_transpose(gu, W_E)):
//     dL/dx     += step_k v
//     dL/dy_k    = gu - step_k D^* v                           (D^* = conv2d(., W_D))
//     dL/dW_E   += step_k conv_weight_grad(input=r_k, grad_out=gu)
//     dL/dW_D   -= step_k conv_weight_grad(input=v,   grad_out=y_k)
//     dL/dth_c   = -sum gu sign(z_{k+1})  (nonneg: -sum gu);  dL/dlam_k = step_k dL/dth
//     dL/dstep_k = <gu, E r_k> + <lam_k, dL/dth> = <v, r_k> + <lam_k, dL/dth>    (no analysis pass needed)
//     FISTA: dL/dz_k += (1 + beta_k) dL/dy_k,  dL/dz_{k-1} -= beta_k dL/dy_k
// Batch items are independent until the parameter gradients, so each thread sweeps its items backwards one at a
// time in item-sized buffers (nothing batch-sized but the outputs) and sums its own weight, lam and step gradients
// (so a batch smaller than the thread count leaves threads idle in the backward).
// Save mode replays each segment [s, s + m) from its checkpoint, keeping the segment's iterates and residuals r_k
// (so the reverse sweep never recomputes D y_k); recompute mode replays z_0..z_k for every k (O(n^2 / 2) extra
// iterations, three item-sized codes per thread whatever n is; FISTA five). The weight gradients are a register-tiled
// micro-kernel of their own (wgrad_tile) over the residual and v, kept in the phased layout E reads.
// grad_z is read through its strides, so the expanded scalar of a sum() is never materialised.
//
// Both convolutions are "valid" correlations over zero-padded thread-local buffers, computed by one register-tiled
// micro-kernel that only makes unit-stride loads: E reads the padded residual stored as stride_w column phases
// (analysis_plan); D is split into stride_h * stride_w output phases (polyphase, see Synth), each a correlation of
// y itself with a flipped, transposed sub-kernel, so a stride wastes no multiply-adds on the zeros of an upsampled y.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace dsc_kernels {
namespace {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#else
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#endif

template <typename T>
struct VecOf {
  static constexpr int L = kVecBytes / sizeof(T);
  typedef T V __attribute__((vector_size(kVecBytes)));
};

// Largest tile (channels x columns) any micro-kernel instantiation writes (cob * nv * L, see Plan).
constexpr int kMaxTile = 512;

template <typename T>
using TileFn = void (*)(const T*, int64_t, int64_t, const int64_t*, int64_t, int64_t, int64_t, const T*, T*);

// out[co][j] = sum_{ci, a, b} in[ci * ics + a * irs + boff[b] + j] * wp[((ci * KH + a) * KW + b) * COB + co]
// for COB output channels and NV vectors of columns: COB * NV accumulators stay in registers, each input vector is
// loaded once per tap (unit stride: boff absorbs a strided layout) and reused for COB channels. DENSE: boff[b] = b,
// known here, which saves a load per tap (a fifth of the loads of the load-bound one-channel tile).
template <typename T, int COB, int NV, bool DENSE>
void corr_tile(const T* in, int64_t ics, int64_t irs, const int64_t* boff, int64_t CI, int64_t KH, int64_t KW,
               const T* wp, T* out) {
  using V = typename VecOf<T>::V;
  constexpr int L = VecOf<T>::L;
  V acc[COB][NV];
#pragma GCC unroll 8
  for (int co = 0; co < COB; ++co)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[co][v] = V{};
  for (int64_t ci = 0; ci < CI; ++ci) {
    for (int64_t a = 0; a < KH; ++a) {
      const T* row = in + ci * ics + a * irs;
      for (int64_t b = 0; b < KW; ++b, wp += COB) {
        V xin[NV];
        const T* p = row + (DENSE ? b : boff[b]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) std::memcpy(&xin[v], p + v * L, sizeof(V));
#pragma GCC unroll 8
        for (int co = 0; co < COB; ++co) {
          const T w = wp[co];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[co][v] += w * xin[v];
        }
      }
    }
  }
  for (int co = 0; co < COB; ++co)
    for (int v = 0; v < NV; ++v) std::memcpy(out + (co * NV + v) * L, &acc[co][v], sizeof(V));
}

// A correlation with packed weights and its micro-kernel; tap(co, ci, a, b) gives the kernel's values and boff[b]
// where tap column b reads, relative to an output's column (empty: b).
template <typename T>
struct Plan {
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
      case 1: return &corr_tile<T, COB, 1, DENSE>;
      case 2: return &corr_tile<T, COB, 2, DENSE>;
      case 3: return &corr_tile<T, COB, 3, DENSE>;
      default: return &corr_tile<T, COB, 4, DENSE>;
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
  Plan(int64_t CO_, int64_t CI_, int64_t KH_, int64_t KW_, int64_t wout, std::vector<int64_t> boff_, Tap&& tap)
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

struct Geo {
  int64_t B, Cs, H, W, Cc, KH, KW, SH, SW, PH, PW, Hz, Wz;
};

// E (or D^*, given W_D) = conv2d(., w): a strided correlation of the zero-padded signal, whose rows are stored as
// SW column phases of `pwid` columns (phase p holds padded columns p, p + SW, ...; see Ctx::store_r), so that every
// tap reads consecutive columns: tap b of output column j reads phase b % SW at j + b / SW.
template <typename T>
int64_t analysis_phase_width(const Geo& g) {
  return std::max(Plan<T>::padded_width(g.Cc, g.Wz) + (g.KW - 1) / g.SW, (g.W + 2 * g.PW + g.SW - 1) / g.SW);
}

template <typename T>
Plan<T> analysis_plan(const Geo& g, const T* w) {
  const int64_t pwid = analysis_phase_width<T>(g);
  std::vector<int64_t> boff;
  for (int64_t b = 0; b < g.KW; ++b) boff.push_back((b % g.SW) * pwid + b / g.SW);
  return Plan<T>(g.Cc, g.Cs, g.KH, g.KW, g.Wz, std::move(boff), [&](int64_t co, int64_t ci, int64_t a, int64_t b) {
    return w[((co * g.Cs + ci) * g.KH + a) * g.KW + b];
  });
}

// D (or E^*, given W_E) = conv_transpose2d(., w) in polyphase form. Signal row h with h + PH = q SH + ph only
// receives kernel rows a = ph + SH t from code rows q - t (t < TA_ph = ceil((KH - ph) / SH)); columns likewise. So
// each phase (ph, pw) is a unit-stride correlation of y itself with a flipped sub-kernel, producing the signal
// columns w = w_first_pw + SW m: only useful multiply-adds, whatever the stride (a phase no tap reaches, stride >
// kernel, gets an empty kernel and yields zeros).
template <typename T>
struct Synth {
  Geo g;
  int64_t TA;                 // code rows the tallest phase reads (phase 0)
  std::vector<int64_t> ta;    // [ph]: kernel rows of row phase ph
  std::vector<int64_t> wfirst, wcnt, col;  // [pw]: first signal column, column count, ybuf column of its window
  int64_t ycol0, ywidth;      // code column of ybuf column 0; ybuf row width
  std::vector<Plan<T>> plans; // [ph * SW + pw]

  Synth(const Geo& g_, const T* w) : g(g_), TA((g_.KH + g_.SH - 1) / g_.SH) {
    for (int64_t ph = 0; ph < g.SH; ++ph) ta.push_back(std::max<int64_t>(0, (g.KH - ph + g.SH - 1) / g.SH));
    std::vector<int64_t> tb, rfirst;
    for (int64_t pw = 0; pw < g.SW; ++pw) {
      tb.push_back(std::max<int64_t>(0, (g.KW - pw + g.SW - 1) / g.SW));
      const int64_t wf = ((pw - g.PW) % g.SW + g.SW) % g.SW;
      wfirst.push_back(wf);
      wcnt.push_back(wf < g.W ? (g.W - wf + g.SW - 1) / g.SW : 0);
      rfirst.push_back((wf + g.PW) / g.SW);
    }
    for (int64_t ph = 0; ph < g.SH; ++ph)
      for (int64_t pw = 0; pw < g.SW; ++pw) {
        const int64_t A = ta[ph], Bw = tb[pw];
        plans.emplace_back(g.Cs, g.Cc, A, Bw, std::max<int64_t>(1, wcnt[pw]), std::vector<int64_t>(),
                           [&](int64_t s, int64_t c, int64_t t, int64_t u) {
                             return w[((c * g.Cs + s) * g.KH + ph + g.SH * (A - 1 - t)) * g.KW + pw +
                                      g.SW * (Bw - 1 - u)];
                           });
      }
    ycol0 = rfirst[0] - tb[0] + 1;
    for (int64_t pw = 1; pw < g.SW; ++pw) ycol0 = std::min(ycol0, rfirst[pw] - tb[pw] + 1);
    ywidth = 1;
    for (int64_t pw = 0; pw < g.SW; ++pw) {
      col.push_back(rfirst[pw] - tb[pw] + 1 - ycol0);
      ywidth = std::max(ywidth, col[pw] + plans[pw].in_width(wcnt[pw]));
    }
  }

  // ybuf rows for `sig_rows` signal rows (any alignment).
  int64_t yrows(int64_t sig_rows) const { return (sig_rows + g.SH - 1) / g.SH + TA; }

  // Code row of ybuf row 0 for signal rows starting at hs0.
  int64_t yrow0(int64_t hs0) const { return (hs0 + g.PH) / g.SH - TA + 1; }

  // D y on signal rows [hs0, hs0 + nh) of a ybuf (channel stride ics) filled from code row yrow0(hs0);
  // epi(s, h, values, count) receives whole signal rows, in order.
  template <class Epi>
  void rows(const T* ybuf, int64_t ics, int64_t hs0, int64_t nh, Epi&& epi) const {
    thread_local std::vector<T> rowv;
    rowv.resize(g.Cs * g.W);
    T* out = rowv.data();
    const int64_t y0 = yrow0(hs0);
    for (int64_t h = hs0; h < hs0 + nh; ++h) {
      const int64_t ph = (h + g.PH) % g.SH;
      const T* base = ybuf + ((h + g.PH) / g.SH - ta[ph] + 1 - y0) * ywidth;
      for (int64_t pw = 0; pw < g.SW; ++pw) {
        const int64_t wf = wfirst[pw];
        plans[ph * g.SW + pw].row(base + col[pw], ics, ywidth, wcnt[pw],
                                  [&](int64_t s, int64_t j0, const T* v, int64_t cnt) {
                                    T* __restrict o = out + s * g.W + wf + j0 * g.SW;
                                    for (int64_t m = 0; m < cnt; ++m) o[m * g.SW] = v[m];
                                  });
      }
      for (int64_t s = 0; s < g.Cs; ++s) epi(s, h, static_cast<const T*>(out + s * g.W), g.W);
    }
  }
};

// out = S_th(out + step e), written so it vectorises: S_th(u) = u - clamp(u, -th, th) is exactly 0 for |u| <= th,
// and NaN passes through both forms (as in softshrink / relu).
template <typename T>
inline void shrink_row(T* __restrict out, const T* __restrict e, T step, T th, int64_t cnt, bool nonneg) {
  if (nonneg) {
    for (int64_t j = 0; j < cnt; ++j) {
      const T d = out[j] + step * e[j] - th;
      out[j] = d < T(0) ? T(0) : d;
    }
  } else {
    for (int64_t j = 0; j < cnt; ++j) {
      const T u = out[j] + step * e[j];
      const T lo = u < -th ? -th : u;
      out[j] = u - (lo > th ? th : lo);
    }
  }
}

// Rows per band for `rows` rows split over batch x bands: minimise the busiest thread's work (tasks per thread times
// rows per task including the halo each band recomputes).
int64_t band_rows(int64_t B, int64_t rows, double halo) {
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  int64_t best_r = rows;
  double best = 1e300;
  for (int64_t nb = 1; nb <= std::min<int64_t>(rows, 16); ++nb) {
    const int64_t r = (rows + nb - 1) / nb;
    const int64_t tasks = B * ((rows + r - 1) / r);
    const double cost = double((tasks + T - 1) / T) * (double(r) + halo);
    if (cost < best - 1e-9) best = cost, best_r = r;
  }
  return best_r;
}

template <class F>
void for_bands(int64_t B, int64_t rows, int64_t R, F&& f) {
  const int64_t nb = (rows + R - 1) / R;
  at::parallel_for(0, B * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t % nb) * R;
      f(t / nb, r0, std::min(rows, r0 + R));
    }
  });
}

// A code-sized (B, Cc, Hz, Wz) tensor the passes read, computed on the fly from stored ones:
// scale * (a + beta (a - b)) (FISTA's y_k; b null: scale * a), or with mask: scale * a [mask != 0] (the gradient
// restricted to the active set); a null: zeros (z0 not given; FISTA's beta_1 is 0, so z_0 never enters as b).
template <typename T>
struct CodeSrc {
  const T* a;
  const T* b;
  T beta;
  const T* mask;
  T scale;

  void row(int64_t off, int64_t cnt, T* __restrict dst) const {
    if (!a) {  // an absent z0: zeros
      std::fill(dst, dst + cnt, T(0));
      return;
    }
    const T* __restrict pa = a + off;
    if (mask) {
      const T* __restrict pm = mask + off;
      for (int64_t j = 0; j < cnt; ++j) {
        const T v = scale * pa[j];  // loaded unconditionally so the select vectorises
        dst[j] = pm[j] != T(0) ? v : T(0);
      }
    } else if (b) {
      const T* __restrict pb = b + off;
      for (int64_t j = 0; j < cnt; ++j) dst[j] = scale * (pa[j] + beta * (pa[j] - pb[j]));
    } else {
      for (int64_t j = 0; j < cnt; ++j) dst[j] = scale * pa[j];
    }
  }
};

// A band's scratch: views into per-thread storage that grows to the largest band seen and is then reused.
template <typename T>
struct BandBufs {
  // y on the code rows and columns a band's D reads (Synth::yrow0, Synth::ycol0 give the offsets), zero outside
  // the code: Cc x yrows x ywidth.
  T* y;
  int64_t yrows, ywidth;
  // The zero-padded signal (residual) rows that code rows [i0, i1) read, in analysis_plan's column-phase layout;
  // row 0 is padded row i0 * SH: Cs x rrows x rwidth.
  T* r;
  int64_t rrows, rwidth;

  BandBufs(int64_t Cc, int64_t yrows_, int64_t ywidth_, int64_t Cs, int64_t rrows_, int64_t rwidth_)
      : yrows(yrows_), ywidth(ywidth_), rrows(rrows_), rwidth(rwidth_) {
    thread_local std::vector<T> ys, rs;
    if (ys.size() < size_t(Cc * yrows * ywidth)) ys.resize(Cc * yrows * ywidth);
    if (rs.size() < size_t(Cs * rrows * rwidth)) rs.resize(Cs * rrows * rwidth);
    y = ys.data();
    r = rs.data();
  }
};

template <typename T>
struct Ctx {
  Geo g;
  Synth<T> synth;  // D (W_D)
  Plan<T> anal;    // E (W_E)
  int64_t R;      // code rows per band

  Ctx(const Geo& g_, const T* wd, const T* we)
      : g(g_),
        synth(g_, wd),
        anal(analysis_plan(g_, we)),
        R(band_rows(g_.B, g_.Hz, double(g_.KH - 1) / g_.SH)) {}

  // Buffers for a band of `code_rows` code rows (0: R) and the signal rows it reads.
  BandBufs<T> bufs(int64_t code_rows = 0) const {
    const int64_t rows = code_rows ? code_rows : R;
    return BandBufs<T>(g.Cc, synth.yrows(std::min(g.H, (rows - 1) * g.SH + g.KH)), synth.ywidth, g.Cs,
                       padded_rows(rows), padded_width());
  }

  // Rows and row width of the zero-padded, column-phased signal buffer that `rows` code rows of E read.
  int64_t padded_rows(int64_t rows) const { return (rows - 1) * g.SH + g.KH; }
  int64_t padded_width() const { return g.SW * analysis_phase_width<T>(g); }

  // ybuf for batch item n and signal rows [hs0, hs0 + nh), from the code-sized tensor `src` describes.
  void fill_y(BandBufs<T>& bb, const CodeSrc<T>& src, int64_t n, int64_t hs0, int64_t nh) const {
    const int64_t y0 = synth.yrow0(hs0);
    const int64_t rows = std::min(bb.yrows, (hs0 + nh - 1 + g.PH) / g.SH - y0 + 1);
    const int64_t c0 = synth.ycol0;
    const int64_t j_lo = std::min(g.Wz, std::max<int64_t>(0, c0));
    const int64_t j_hi = std::max(j_lo, std::min(g.Wz, c0 + bb.ywidth));
    for (int64_t c = 0; c < g.Cc; ++c) {
      for (int64_t q = 0; q < rows; ++q) {
        T* dst = bb.y + (c * bb.yrows + q) * bb.ywidth;
        const int64_t i = y0 + q;
        if (i < 0 || i >= g.Hz) {
          std::fill(dst, dst + bb.ywidth, T(0));
          continue;
        }
        std::fill(dst, dst + (j_lo - c0), T(0));
        src.row(((n * g.Cc + c) * g.Hz + i) * g.Wz + j_lo, j_hi - j_lo, dst + (j_lo - c0));
        std::fill(dst + (j_hi - c0), dst + bb.ywidth, T(0));
      }
    }
  }

  // D y for batch item n on signal rows [hs0, hs0 + nh), ybuf filled; epi(s, h, values, count) per signal row.
  template <class Epi>
  void synth_rows(const BandBufs<T>& bb, int64_t hs0, int64_t nh, Epi&& epi) const {
    synth.rows(bb.y, bb.yrows * bb.ywidth, hs0, nh, epi);
  }

  // Signal rows that code rows [i0, i1) read.
  void sig_rows(int64_t i0, int64_t i1, int64_t& hs0, int64_t& nh) const {
    hs0 = std::max<int64_t>(0, i0 * g.SH - g.PH);
    const int64_t hs1 = std::min<int64_t>(g.H, (i1 - 1) * g.SH + g.KH - g.PH);
    nh = std::max<int64_t>(0, hs1 - hs0);
  }

  // Signal row h of channel s := a - b (b null: a), in column phases, into a padded buffer (rrows x rwidth per
  // channel) whose row 0 is padded row i0 * SH (the band starting at code row i0).
  void store_r(T* rbuf, int64_t rrows, int64_t rwidth, int64_t s, int64_t h, int64_t i0, const T* __restrict a,
               const T* __restrict b) const {
    T* row = rbuf + (s * rrows + (h + g.PH - i0 * g.SH)) * rwidth;
    const int64_t pwid = rwidth / g.SW;
    for (int64_t p = 0; p < g.SW; ++p) {
      const int64_t w0 = ((p - g.PW) % g.SW + g.SW) % g.SW;
      T* __restrict d = row + p * pwid + (w0 + g.PW) / g.SW;
      const int64_t cnt = w0 < g.W ? (g.W - w0 + g.SW - 1) / g.SW : 0;
      if (g.SW == 1 && b) {
        for (int64_t m = 0; m < cnt; ++m) d[m] = a[m] - b[m];
      } else if (g.SW == 1) {
        std::memcpy(d, a, cnt * sizeof(T));
      } else if (b) {
        for (int64_t m = 0; m < cnt; ++m) d[m] = a[w0 + m * g.SW] - b[w0 + m * g.SW];
      } else {
        for (int64_t m = 0; m < cnt; ++m) d[m] = a[w0 + m * g.SW];
      }
    }
  }

  // E applied to rbuf for code rows [i0, i1) of a band; epi(c, i, j0, values, count).
  template <class Epi>
  void anal_rows(const BandBufs<T>& bb, int64_t i0, int64_t i1, Epi&& epi) const {
    for (int64_t i = i0; i < i1; ++i)
      anal.row(bb.r + (i - i0) * g.SH * bb.rwidth, bb.rrows * bb.rwidth, bb.rwidth, g.Wz,
               [&](int64_t c, int64_t j0, const T* v, int64_t cnt) { epi(c, i, j0, v, cnt); });
  }

  // One fused iteration over the batch, parallel over (item, band): z_next = S(y + step E(x - D y)),
  // y = zk + beta (zk - zkm1); th = step * lam_k per channel.
  void iterate(const T* x, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg, T* znext) const {
    for_bands(g.B, g.Hz, R, [&](int64_t n, int64_t i0, int64_t i1) {
      BandBufs<T> bb = bufs();
      run_band(bb, x, zk, zkm1, beta, step, th, nonneg, znext, n, i0, i1);
    });
  }

  // The same iteration on one batch item (pointers to its slices), serially in the calling thread, as one band.
  // With r_out (padded_rows(Hz) x padded_width() per signal channel), the residual x - D y it forms on the way is
  // kept there, zero-padded and column-phased as E reads it (the backward's r_k). znext null: the residual only.
  void iterate_item(const T* x, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg, T* znext,
                    T* r_out) const {
    BandBufs<T> bb = bufs(g.Hz);
    if (r_out) bb.r = r_out;
    run_band(bb, x, zk, zkm1, beta, step, th, nonneg, znext, 0, 0, g.Hz);
  }

  void run_band(BandBufs<T>& bb, const T* x, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg,
                T* znext, int64_t n, int64_t i0, int64_t i1) const {
    int64_t hs0, nh;
    sig_rows(i0, i1, hs0, nh);
    fill_y(bb, CodeSrc<T>{zk, zkm1, beta, nullptr, T(1)}, n, hs0, nh);
    std::fill(bb.r, bb.r + g.Cs * bb.rrows * bb.rwidth, T(0));
    synth_rows(bb, hs0, nh, [&](int64_t s, int64_t h, const T* v, int64_t) {
      store_r(bb.r, bb.rrows, bb.rwidth, s, h, i0, x + ((n * g.Cs + s) * g.H + h) * g.W, v);
    });
    if (!znext) return;
    anal_rows(bb, i0, i1, [&](int64_t c, int64_t i, int64_t j0, const T* e, int64_t cnt) {
      const int64_t off = ((n * g.Cc + c) * g.Hz + i) * g.Wz + j0;
      T* __restrict out = znext + off;
      CodeSrc<T>{zk, zkm1, beta, nullptr, T(1)}.row(off, cnt, out);
      shrink_row(out, e, step, th[c], cnt, nonneg);
    });
  }
};

std::vector<double> fista_betas(int64_t n, bool fista) {
  std::vector<double> beta(n, 0.0);
  if (!fista) return beta;
  std::vector<double> t(n + 1);
  t[0] = 1.0;
  for (int64_t k = 0; k < n; ++k) t[k + 1] = (1.0 + std::sqrt(1.0 + 4.0 * t[k] * t[k])) / 2.0;
  for (int64_t k = 1; k < n; ++k) beta[k] = (t[k - 1] - 1.0) / t[k];
  return beta;
}

Geo make_geo(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& encoder_weight, const at::Tensor& lam,
             const at::Tensor& step, const at::Tensor& z0, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "conv_ista_cpp: x and weight must be 4-D (2-D problems)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, "conv_ista_cpp: stride and padding need 2 entries");
  Geo g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3),
        stride[0], stride[1], padding[0], padding[1], 0, 0};
  TORCH_CHECK(g.SH >= 1 && g.SW >= 1 && g.PH >= 0 && g.PW >= 0, "conv_ista_cpp: bad stride/padding");
  g.Hz = (g.H + 2 * g.PH - g.KH) / g.SH + 1;
  g.Wz = (g.W + 2 * g.PW - g.KW) / g.SW + 1;
  TORCH_CHECK(g.Hz >= 1 && g.Wz >= 1, "conv_ista_cpp: kernel larger than the padded signal");
  TORCH_CHECK(weight.size(1) == g.Cs && encoder_weight.sizes() == weight.sizes(),
              "conv_ista_cpp: weight/encoder_weight must be (C_code, C_sig, kh, kw)");
  const int64_t n = step.size(0);
  TORCH_CHECK(n >= 1 && step.dim() == 1 && lam.dim() == 2 && lam.size(0) == n && lam.size(1) == g.Cc,
              "conv_ista_cpp: lam must be (n_iter, C_code) and step (n_iter,)");
  TORCH_CHECK(z0.numel() == 0 || (z0.dim() == 4 && z0.size(0) == g.B && z0.size(1) == g.Cc && z0.size(2) == g.Hz &&
                                  z0.size(3) == g.Wz),
              "conv_ista_cpp: z0 must be (B, C_code, Hz, Wz) or empty (zeros)");
  for (const auto* t : {&x, &weight, &encoder_weight, &lam, &step, &z0})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(),
                "conv_ista_cpp: all tensors must be CPU tensors of x's dtype");
  return g;
}

template <typename T>
std::vector<T> host(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

// A buffer among `bufs` that is neither a nor b (the iterates an iteration reads).
template <typename T>
T* free_buffer(T* const* bufs, int count, const T* a, const T* b) {
  for (int i = 0; i < count; ++i)
    if (bufs[i] != a && bufs[i] != b) return bufs[i];
  TORCH_CHECK(false, "conv_ista_cpp: no free replay buffer");
}

// The iterates the forward saves for the backward (reference/conv_ista.py::checkpoint_indices): slot[k] is z_k's
// index in `saved`, or -1. z_0 is the input, z_n the output.
struct Checkpoints {
  std::vector<int64_t> slot;
  int64_t count = 0;

  Checkpoints(int64_t n, int64_t m, bool fista) : slot(n + 1, -1) {
    if (m > 0)
      for (int64_t k = 1; k < n; ++k)
        if (k % m == 0 || (fista && (k + 1) % m == 0)) slot[k] = count++;
  }
};

// Where the forward keeps z_k (0 < k <= n) of batch item b: the output z (k = n), a checkpoint, or nowhere (null).
// saved is (count, B, Cc, Hz, Wz); csz is one item's code size.
template <typename T>
struct StoredIterates {
  const Checkpoints& ck;
  T* z;
  T* saved;
  int64_t B, csz;

  T* at(int64_t k, int64_t b) const {
    if (k + 1 == int64_t(ck.slot.size())) return z ? z + b * csz : nullptr;
    return ck.slot[k] >= 0 ? saved + (ck.slot[k] * B + b) * csz : nullptr;
  }
};

// Iterations [0, upto) from z_0 = z0 (null: zeros): step(k, z_k, z_{k-1}, dst) writes z_{k+1} to place(k + 1), or
// where that is null to one of the nbuf rotating `bufs` that z_k and (FISTA) z_{k-1} are not in.
// Returns {z_upto, z_{upto-1}}.
template <typename T, class Place, class Step>
std::pair<const T*, const T*> run_chain(int64_t upto, bool fista, const T* z0, T* const* bufs, int nbuf,
                                        Place&& place, Step&& step) {
  const T* cur = z0;
  const T* prev = nullptr;
  for (int64_t k = 0; k < upto; ++k) {
    T* dst = place(k + 1);
    if (!dst) dst = free_buffer(bufs, nbuf, cur, fista ? prev : nullptr);
    step(k, cur, prev, dst);
    prev = cur;
    cur = dst;
  }
  return {cur, prev};
}

// What both passes read of one problem: geometry, kernels, per-iteration constants, batch-item strides.
template <typename T>
struct Problem {
  const Ctx<T> ctx;
  const std::vector<T> lam, step;  // (n, Cc), (n,)
  const std::vector<double> beta;
  std::vector<T> th;               // (n, Cc): step_k lam_k[c]
  const int64_t n, csz, ssz;       // iterations, one item's code and signal sizes
  const bool nonneg, fista;

  Problem(const Geo& g, const at::Tensor& weight, const at::Tensor& encoder_weight, const at::Tensor& lam_t,
          const at::Tensor& step_t, bool nonneg_, bool fista_)
      : ctx(g, weight.data_ptr<T>(), encoder_weight.data_ptr<T>()),
        lam(host<T>(lam_t)),
        step(host<T>(step_t)),
        beta(fista_betas(step_t.size(0), fista_)),
        n(step_t.size(0)),
        csz(g.Cc * g.Hz * g.Wz),
        ssz(g.Cs * g.H * g.W),
        nonneg(nonneg_),
        fista(fista_) {
    th.resize(n * g.Cc);
    for (int64_t k = 0; k < n; ++k)
      for (int64_t c = 0; c < g.Cc; ++c) th[k * g.Cc + c] = step[k] * lam[k * g.Cc + c];
  }

  // One iteration k on one batch item's slices (Ctx::iterate_item), or on the whole batch in parallel.
  void iterate(int64_t k, const T* x, const T* zk, const T* zkm1, T* znext, T* r_out = nullptr) const {
    const T* prev = fista && k > 0 ? zkm1 : nullptr;
    ctx.iterate_item(x, zk, prev, T(beta[k]), step[k], th.data() + k * ctx.g.Cc, nonneg, znext, r_out);
  }
  void iterate_batch(int64_t k, const T* x, const T* zk, const T* zkm1, T* znext) const {
    ctx.iterate(x, zk, fista && k > 0 ? zkm1 : nullptr, T(beta[k]), step[k], th.data() + k * ctx.g.Cc, nonneg,
                znext);
  }
};

// Forward. With at least as many batch items as threads, each thread runs every iteration of its items in
// item-sized buffers (nothing batch-sized besides z and the checkpoints); otherwise each iteration is one parallel
// pass over (item, band) with batch-sized rotating buffers.
template <typename T>
void fwd_impl(const Problem<T>& P, const T* x, const T* z0, const StoredIterates<T>& out) {
  const Geo& g = P.ctx.g;
  const int nt = at::get_num_threads();
  const int nbuf = P.fista ? 3 : 2;
  if (g.B >= nt) {
    // Per thread: nbuf rotating item codes (an empty z0 is read as zeros, never stored).
    at::Tensor work = at::empty({nt, nbuf, P.csz}, at::CppTypeToScalarType<T>::value);
    at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
      T* w = work.data_ptr<T>() + at::get_thread_num() * nbuf * P.csz;
      T* bufs[3] = {w, w + P.csz, P.fista ? w + 2 * P.csz : nullptr};
      for (int64_t b = b0; b < b1; ++b)
        run_chain<T>(P.n, P.fista, z0 ? z0 + b * P.csz : nullptr, bufs, nbuf,
                     [&](int64_t k) { return out.at(k, b); },
                     [&](int64_t k, const T* zk, const T* zkm1, T* dst) {
                       P.iterate(k, x + b * P.ssz, zk, zkm1, dst);
                     });
    });
    return;
  }
  // The whole batch as one item of B times the size, each iteration parallel over (item, band).
  const int64_t bsz = g.B * P.csz;
  const StoredIterates<T> batch{out.ck, out.z, out.saved, 1, bsz};
  at::Tensor work = at::empty({nbuf, bsz}, at::CppTypeToScalarType<T>::value);
  T* bufs[3] = {work.data_ptr<T>(), work.data_ptr<T>() + bsz, P.fista ? work.data_ptr<T>() + 2 * bsz : nullptr};
  run_chain<T>(P.n, P.fista, z0, bufs, nbuf, [&](int64_t k) { return batch.at(k, 0); },
               [&](int64_t k, const T* zk, const T* zkm1, T* dst) { P.iterate_batch(k, x, zk, zkm1, dst); });
}

std::tuple<at::Tensor, at::Tensor> conv_ista_fwd_cpp(const at::Tensor& x_, const at::Tensor& weight_,
                                                     const at::Tensor& encoder_weight_, const at::Tensor& lam,
                                                     const at::Tensor& step, const at::Tensor& z0_,
                                                     at::IntArrayRef stride, at::IntArrayRef padding, bool nonneg,
                                                     bool fista, int64_t checkpoint) {
  TORCH_CHECK(checkpoint >= 0, "conv_ista_fwd_cpp: checkpoint must be >= 0");
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), encoder_weight = encoder_weight_.contiguous();
  const at::Tensor z0 = z0_.contiguous();
  const Geo g = make_geo(x, weight, encoder_weight, lam, step, z0, stride, padding);
  const int64_t n = step.size(0);
  const Checkpoints ck(n, checkpoint, fista);
  at::Tensor z = at::empty({g.B, g.Cc, g.Hz, g.Wz}, x.options());
  at::Tensor saved = checkpoint ? at::empty({ck.count, g.B, g.Cc, g.Hz, g.Wz}, x.options())
                                : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_ista_fwd_cpp", [&] {
    using T = scalar_t;
    const Problem<T> P(g, weight, encoder_weight, lam, step, nonneg, fista);
    const StoredIterates<T> out{ck, z.data_ptr<T>(), ck.count ? saved.data_ptr<T>() : nullptr, g.B, P.csz};
    fwd_impl<T>(P, x.data_ptr<T>(), z0.numel() ? z0.data_ptr<T>() : nullptr, out);
  });
  return {z, saved};
}

// ------------------------------------------------------------------------------------------------------ backward

// Weight-gradient micro-kernel: out[co * NB + t] = sum_{i < rows} sum_{j < nvec L} G[co * gcs + i * grs + j] *
// I[i * irs + boff[t] + j] for COB code channels (G rows) and NB taps of one (input channel, kernel row): the
// adjoint in W of the analysis correlation, over the padded, column-phased signal I (boff as in analysis_plan).
// Vectorised along the reduction (j): COB x NB accumulators stay in registers for the whole item and are summed
// across lanes once. Every G vector feeds NB FMAs and every I vector COB.
template <typename T, int COB, int NB>
void wgrad_tile(const T* G, int64_t gcs, int64_t grs, const T* I, int64_t irs, const int64_t* boff, int64_t rows,
                int64_t nvec, T* out) {
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

// Register budget as in Plan::shape: COB x NB accumulators + COB G vectors + one I vector.
constexpr int kWgCob = kVecRegs == 32 ? 4 : 3;
constexpr int kWgNbMax = kVecRegs == 32 ? 5 : 3;

template <typename T>
void wgrad_call(int nb, const T* G, int64_t gcs, int64_t grs, const T* I, int64_t irs, const int64_t* boff,
                int64_t rows, int64_t nvec, T* out) {
  switch (nb) {
    case 1: return wgrad_tile<T, kWgCob, 1>(G, gcs, grs, I, irs, boff, rows, nvec, out);
    case 2: return wgrad_tile<T, kWgCob, 2>(G, gcs, grs, I, irs, boff, rows, nvec, out);
    case 3: return wgrad_tile<T, kWgCob, 3>(G, gcs, grs, I, irs, boff, rows, nvec, out);
#if defined(__AVX512F__)
    case 4: return wgrad_tile<T, kWgCob, 4>(G, gcs, grs, I, irs, boff, rows, nvec, out);
    default: return wgrad_tile<T, kWgCob, 5>(G, gcs, grs, I, irs, boff, rows, nvec, out);
#else
    default: TORCH_CHECK(false, "wgrad_call: tap block too wide");
#endif
  }
}

// One thread's slice of the backward workspace (item-sized buffers, carved from one tensor the calling thread
// allocates, so allocator statistics and profilers see it). Signals live in E's padded, column-phased layout
// (Cs x rrows x rwidth, zero outside the signal): that is what the analysis and the weight gradients read.
template <typename T>
struct ItemWork {
  T *gA, *gB;            // dL/dz_{k+1} (ends as dL/dz_0) and FISTA's carry into dL/dz_k (FISTA only)
  T* G;                  // the weight gradient's code operand, Ccp x Hz x Wzp (zero-padded channels and columns)
  std::vector<T*> zbuf;  // replayed iterates (save mode: a segment's interior; recompute: the rotating ones)
  T* v;                  // E^* gu, phased
  T* r;                  // residuals r_k = x - D y_k, phased (save mode: a segment's m; recompute: 1)
  T *dwe, *dwd;          // this thread's weight-gradient sums
  std::vector<double> dth, vr;  // (n, Cc) and (n,): this thread's sums for grad_lam and grad_step
};

template <typename T>
struct Backward {
  const Problem<T>& P;
  const Geo& g;
  const Synth<T> synth_e;   // v = E^* gu: D's polyphase synthesis with W_E
  const Plan<T> anal_d;     // D^* v: E's analysis with W_D
  const int64_t m;          // checkpoint interval; 0 = recompute mode
  const int64_t Ccp, Wzp, gsz, rrows, rwidth, isz, wsz;
  std::vector<int64_t> boff;      // tap column offsets in the phased layout (analysis_plan's)
  std::vector<int> tap_blocks;    // widths of the tap blocks a row of KW taps is split into
  int nz;                         // replay buffers per thread
  int64_t nr;                     // residual buffers per thread

  Backward(const Problem<T>& P_, const T* wd, const T* we, int64_t m_)
      : P(P_), g(P_.ctx.g), synth_e(P_.ctx.g, we), anal_d(analysis_plan(P_.ctx.g, wd)), m(m_),
        Ccp((g.Cc + kWgCob - 1) / kWgCob * kWgCob),
        Wzp((g.Wz + VecOf<T>::L - 1) / VecOf<T>::L * VecOf<T>::L),
        gsz(Ccp * g.Hz * Wzp), rrows(P_.ctx.padded_rows(g.Hz)), rwidth(P_.ctx.padded_width()),
        isz(g.Cs * rrows * rwidth), wsz(g.Cc * g.Cs * g.KH * g.KW) {
    const int64_t pwid = rwidth / g.SW;
    for (int64_t b = 0; b < g.KW; ++b) boff.push_back((b % g.SW) * pwid + b / g.SW);
    const int nblk = int((g.KW + kWgNbMax - 1) / kWgNbMax);
    for (int i = 0; i < nblk; ++i) tap_blocks.push_back(int(g.KW / nblk + (i < g.KW % nblk ? 1 : 0)));
    nz = m > 0 ? int(std::max<int64_t>(m - 1, 0)) : (P.fista ? 3 : 2);
    nr = m > 0 ? m : 1;
  }

  // Code buffers are gsz long (>= csz) so that in recompute mode G can use the replay buffer the step leaves free.
  int64_t per_thread() const {
    return gsz * ((P.fista ? 2 : 1) + nz + (m > 0 ? 1 : 0)) + isz * (1 + nr) + 2 * wsz;
  }

  ItemWork<T> carve(T* w) const {
    ItemWork<T> t;
    t.gA = w; w += gsz;
    t.gB = P.fista ? w : nullptr; w += P.fista ? gsz : 0;
    for (int i = 0; i < nz; ++i) t.zbuf.push_back(w + i * gsz);
    w += nz * gsz;
    t.G = m > 0 ? w : nullptr; w += m > 0 ? gsz : 0;  // recompute mode: set per step
    t.v = w; w += isz;
    t.r = w; w += nr * isz;
    t.dwe = w; w += wsz;
    t.dwd = w;
    t.dth.assign(P.n * g.Cc, 0.0);
    t.vr.assign(P.n, 0.0);
    return t;
  }

  // dw += the weight gradient of the analysis correlation for code operand G (in t.G) and phased signal I.
  void wgrad(const ItemWork<T>& t, const T* I, T* dw) const {
    alignas(64) T out[kWgCob * 8];
    const int64_t nvec = Wzp / VecOf<T>::L;
    for (int64_t cb = 0; cb < Ccp; cb += kWgCob)
      for (int64_t ci = 0; ci < g.Cs; ++ci)
        for (int64_t a = 0; a < g.KH; ++a) {
          int64_t b0 = 0;
          for (int nb : tap_blocks) {
            wgrad_call<T>(nb, t.G + cb * g.Hz * Wzp, g.Hz * Wzp, Wzp, I + (ci * rrows + a) * rwidth, g.SH * rwidth,
                          boff.data() + b0, g.Hz, nvec, out);
            for (int64_t co = 0; co < kWgCob && cb + co < g.Cc; ++co)
              for (int tb = 0; tb < nb; ++tb)
                dw[(((cb + co) * g.Cs + ci) * g.KH + a) * g.KW + b0 + tb] += out[co * nb + tb];
            b0 += nb;
          }
        }
  }

  // G := src (a code-sized view, see CodeSrc) in the padded layout, zero in the padding.
  void fill_g(const ItemWork<T>& t, const CodeSrc<T>& src) const {
    for (int64_t c = 0; c < g.Cc; ++c)
      for (int64_t i = 0; i < g.Hz; ++i) {
        T* row = t.G + (c * g.Hz + i) * Wzp;
        src.row((c * g.Hz + i) * g.Wz, g.Wz, row);
        std::fill(row + g.Wz, row + Wzp, T(0));
      }
    std::fill(t.G + g.Cc * g.Hz * Wzp, t.G + gsz, T(0));
  }

  // The VJP of iteration k for one item: t.gA holds dL/dz_{k+1} on entry and dL/dz_k (+ FISTA carry) on exit.
  // zk, zkm1: y_k's iterates; zk1 = z_{k+1} (the active set); r = x - D y_k (phased); gx: this item's dL/dx.
  // Iteration k's active set applied to t.gA = dL/dz_{k+1} in place (gA becomes gu), and dL/dth from its signs:
  // after this, z_{k+1} is no longer needed.
  void activate(ItemWork<T>& t, int64_t k, const T* zk1) const {
    const int64_t hw = g.Hz * g.Wz;
    for (int64_t c = 0; c < g.Cc; ++c) {
      const T* __restrict zz = zk1 + c * hw;
      T* __restrict ga = t.gA + c * hw;
      T part = 0;
      if (P.nonneg) {
#pragma omp simd reduction(+ : part)
        for (int64_t i = 0; i < hw; ++i) {
          ga[i] = zz[i] != T(0) ? ga[i] : T(0);
          part += ga[i];
        }
      } else {
#pragma omp simd reduction(+ : part)
        for (int64_t i = 0; i < hw; ++i) {
          ga[i] = zz[i] != T(0) ? ga[i] : T(0);
          part += zz[i] > T(0) ? ga[i] : -ga[i];
        }
      }
      t.dth[k * g.Cc + c] -= part;
    }
  }

  // zk1 null: activate(t, k, z_{k+1}) already ran.
  void step(ItemWork<T>& t, int64_t k, const T* zk, const T* zkm1, const T* zk1, const T* r, T* gx) const {
    const T sk = P.step[k];
    const T bk = T(P.beta[k]);
    if (!(P.fista && k > 0)) zkm1 = nullptr;
    if (zk1) activate(t, k, zk1);
    // v = E^* gu (phased), dL/dx += step v, <v, r_k> for dL/dstep (both phased: the padding is zero in each).
    {
      BandBufs<T> bb = P.ctx.bufs(g.Hz);
      int64_t hs0, nh;
      P.ctx.sig_rows(0, g.Hz, hs0, nh);  // rows no code reaches: E^* gu = 0
      std::fill(t.v, t.v + isz, T(0));
      P.ctx.fill_y(bb, CodeSrc<T>{t.gA, nullptr, T(0), nullptr, T(1)}, 0, hs0, nh);
      synth_e.rows(bb.y, bb.yrows * bb.ywidth, hs0, nh, [&](int64_t s, int64_t h, const T* val, int64_t cnt) {
        T* __restrict gxs = gx + (s * g.H + h) * g.W;
        for (int64_t j = 0; j < cnt; ++j) gxs[j] += sk * val[j];
        P.ctx.store_r(t.v, rrows, rwidth, s, h, 0, val, nullptr);
      });
    }
    T vr = 0;
#pragma omp simd reduction(+ : vr)
    for (int64_t i = 0; i < isz; ++i) vr += t.v[i] * r[i];
    t.vr[k] += vr;
    // dW_E += step corr(r_k, gu); dW_D -= step corr(v, y_k).
    fill_g(t, CodeSrc<T>{t.gA, nullptr, T(0), nullptr, sk});
    wgrad(t, r, t.dwe);
    fill_g(t, CodeSrc<T>{zk, zkm1, bk, nullptr, -sk});
    wgrad(t, t.v, t.dwd);
    // dL/dy_k = gu - step D^* v, split into dL/dz_k (gA) and dL/dz_{k-1} (gB).
    for (int64_t i = 0; i < g.Hz; ++i)
      anal_d.row(t.v + i * g.SH * rwidth, rrows * rwidth, rwidth, g.Wz,
                 [&](int64_t c, int64_t j0, const T* val, int64_t cnt) {
        const int64_t off = (c * g.Hz + i) * g.Wz + j0;
        T* __restrict ga = t.gA + off;
        if (P.fista) {
          T* __restrict gb = t.gB + off;
          for (int64_t j = 0; j < cnt; ++j) {
            const T gy = ga[j] - sk * val[j];
            ga[j] = gb[j] + (T(1) + bk) * gy;
            gb[j] = -bk * gy;
          }
        } else {
          for (int64_t j = 0; j < cnt; ++j) ga[j] -= sk * val[j];
        }
      });
  }
};

template <typename T>
void bwd_impl(const Problem<T>& P, const at::Tensor& grad_z, const T* x, const T* wd, const T* we, const T* z0,
              const StoredIterates<const T>& in, int64_t m, T* gx, T* gw, T* gwe, T* glam, T* gstep, T* gz0) {
  const Geo& g = P.ctx.g;
  const Backward<T> W(P, wd, we, m);
  const int nt = at::get_num_threads();
  const int64_t per = W.per_thread();
  at::Tensor work = at::zeros({nt, per}, at::CppTypeToScalarType<T>::value);
  std::vector<ItemWork<T>> tw;
  for (int i = 0; i < nt; ++i) tw.push_back(W.carve(work.data_ptr<T>() + i * per));
  std::fill(gx, gx + g.B * P.ssz, T(0));
  const auto gzs = grad_z.strides();
  const T* gzp = grad_z.data_ptr<T>();

  // Items are independent until the parameter gradients, which each thread sums for its items.
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    ItemWork<T>& t = tw[at::get_thread_num()];
    for (int64_t b = b0; b < b1; ++b) {
      const T* xb = x + b * P.ssz;
      T* gxb = gx + b * P.ssz;
      const T* z0b = z0 ? z0 + b * P.csz : nullptr;  // null: zeros
      // dL/dz_n, read through grad_z's strides (an expanded scalar is never materialised).
      for (int64_t c = 0; c < g.Cc; ++c)
        for (int64_t i = 0; i < g.Hz; ++i)
          for (int64_t j = 0; j < g.Wz; ++j)
            t.gA[(c * g.Hz + i) * g.Wz + j] = gzp[b * gzs[0] + c * gzs[1] + i * gzs[2] + j * gzs[3]];
      if (t.gB) std::fill(t.gB, t.gB + P.csz, T(0));
      auto iterate_at = [&](int64_t k) -> const T* { return k == 0 ? z0b : in.at(k, b); };
      if (m > 0) {
        // Segments [s, e) from the last: replay from z_s (and z_{s-1}) keeping z_{s+1}..z_{e-1} and r_s..r_{e-1}.
        const int64_t nseg = (P.n + m - 1) / m;
        for (int64_t sg = nseg - 1; sg >= 0; --sg) {
          const int64_t s = sg * m, e = std::min(P.n, s + m);
          std::vector<const T*> zs(e - s + 2);  // zs[k - s + 1] = z_k for k in [s - 1, e]
          zs[0] = s > 0 ? iterate_at(s - 1) : nullptr;
          zs[1] = iterate_at(s);
          zs[e - s + 1] = iterate_at(e);
          for (int64_t k = s; k < e; ++k) {
            // A stored z_{k+1} (always z_e; FISTA's z_{e-1} too) needs only r_k: D y_k without E.
            const T* stored = iterate_at(k + 1);
            T* znext = stored ? nullptr : t.zbuf[k - s];
            P.iterate(k, xb, zs[k - s + 1], zs[k - s], znext, t.r + (k - s) * W.isz);
            zs[k - s + 2] = stored ? stored : znext;
          }
          for (int64_t k = e - 1; k >= s; --k)
            W.step(t, k, zs[k - s + 1], zs[k - s], zs[k - s + 2], t.r + (k - s) * W.isz, gxb);
        }
      } else {
        // Recompute mode: replay z_0..z_k for every k (O(n^2) iterations, memory independent of n). The active
        // set of iteration k-1 is applied to dL/dz_k while z_k is at hand, so no z_{k+1} is held across a replay.
        const int nrot = P.fista ? 3 : 2;
        auto replay = [&](int64_t upto) {
          return run_chain<T>(upto, P.fista, z0b, t.zbuf.data(), nrot, [](int64_t) { return (T*)nullptr; },
                              [&](int64_t k, const T* zk, const T* zkm1, T* dst) { P.iterate(k, xb, zk, zkm1, dst); });
        };
        const T* zn = in.at(P.n, b);
        W.activate(t, P.n - 1, zn ? zn : replay(P.n).first);
        for (int64_t k = P.n - 1; k >= 0; --k) {
          const auto [zk, zkm1] = replay(k);
          P.iterate(k, xb, zk, zkm1, nullptr, t.r);  // r_k only
          t.G = free_buffer(t.zbuf.data(), nrot, zk, P.fista ? zkm1 : nullptr);  // a replay buffer y_k does not read
          W.step(t, k, zk, zkm1, nullptr, t.r, gxb);
          if (k > 0) W.activate(t, k - 1, zk);
        }
      }
      if (gz0) std::memcpy(gz0 + b * P.csz, t.gA, P.csz * sizeof(T));
    }
  });

  std::fill(gw, gw + W.wsz, T(0));
  std::fill(gwe, gwe + W.wsz, T(0));
  for (const auto& t : tw)
    for (int64_t i = 0; i < W.wsz; ++i) gw[i] += t.dwd[i], gwe[i] += t.dwe[i];
  for (int64_t k = 0; k < P.n; ++k) {
    double lam_dth = 0, vr = 0;
    for (int64_t c = 0; c < g.Cc; ++c) {
      double d = 0;
      for (const auto& t : tw) d += t.dth[k * g.Cc + c];
      glam[k * g.Cc + c] = T(P.step[k] * d);
      lam_dth += double(P.lam[k * g.Cc + c]) * d;
    }
    for (const auto& t : tw) vr += t.vr[k];
    gstep[k] = T(vr + lam_dth);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_ista_bwd_cpp(
    const at::Tensor& grad_z, const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& encoder_weight_,
    const at::Tensor& lam, const at::Tensor& step, const at::Tensor& z0_, const at::Tensor& z_,
    const at::Tensor& saved_, at::IntArrayRef stride, at::IntArrayRef padding, bool nonneg, bool fista,
    int64_t checkpoint) {
  TORCH_CHECK(checkpoint >= 0, "conv_ista_bwd_cpp: checkpoint must be >= 0");
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), encoder_weight = encoder_weight_.contiguous();
  const at::Tensor z0 = z0_.contiguous(), z = z_.contiguous(), saved = saved_.contiguous();
  const Geo g = make_geo(x, weight, encoder_weight, lam, step, z0, stride, padding);
  const int64_t n = step.size(0);
  TORCH_CHECK(grad_z.dim() == 4 && grad_z.size(0) == g.B && grad_z.size(1) == g.Cc && grad_z.size(2) == g.Hz &&
                  grad_z.size(3) == g.Wz && grad_z.scalar_type() == x.scalar_type(),
              "conv_ista_bwd_cpp: grad_z must be (B, C_code, Hz, Wz) of x's dtype");
  TORCH_CHECK(z.numel() == 0 || z.sizes() == grad_z.sizes(), "conv_ista_bwd_cpp: z must be empty or z_n");
  TORCH_CHECK(checkpoint == 0 || z.numel() > 0, "conv_ista_bwd_cpp: save mode needs z");
  const Checkpoints ck(n, checkpoint, fista);
  TORCH_CHECK(checkpoint == 0 || saved.numel() == ck.count * g.B * g.Cc * g.Hz * g.Wz,
              "conv_ista_bwd_cpp: saved must hold the checkpoints of conv_ista_fwd_cpp with this checkpoint");
  at::Tensor gx = at::empty_like(x), gw = at::empty_like(weight), gwe = at::empty_like(encoder_weight);
  at::Tensor glam = at::empty_like(lam).contiguous(), gstep = at::empty_like(step).contiguous();
  at::Tensor gz0 = at::empty_like(z0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_ista_bwd_cpp", [&] {
    using T = scalar_t;
    const Problem<T> P(g, weight, encoder_weight, lam, step, nonneg, fista);
    const StoredIterates<const T> in{ck, z.numel() ? z.data_ptr<T>() : nullptr,
                                     ck.count ? saved.data_ptr<T>() : nullptr, g.B, P.csz};
    bwd_impl<T>(P, grad_z, x.data_ptr<T>(), weight.data_ptr<T>(), encoder_weight.data_ptr<T>(),
                z0.numel() ? z0.data_ptr<T>() : nullptr, in, checkpoint, gx.data_ptr<T>(), gw.data_ptr<T>(),
                gwe.data_ptr<T>(), glam.data_ptr<T>(), gstep.data_ptr<T>(),
                z0.numel() ? gz0.data_ptr<T>() : nullptr);
  });
  return {gx, gw, gwe, glam, gstep, gz0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsc_kernels, m) {
  m.def(
      "conv_ista_fwd_cpp(Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, "
      "int[] stride, int[] padding, bool nonneg, bool fista, int checkpoint) -> (Tensor, Tensor)");
  m.def(
      "conv_ista_bwd_cpp(Tensor grad_z, Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, "
      "Tensor z0, Tensor z, Tensor saved, int[] stride, int[] padding, bool nonneg, bool fista, int checkpoint) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsc_kernels, CPU, m) {
  m.impl("conv_ista_fwd_cpp", &conv_ista_fwd_cpp);
  m.impl("conv_ista_bwd_cpp", &conv_ista_bwd_cpp);
}

}  // namespace dsc_kernels
