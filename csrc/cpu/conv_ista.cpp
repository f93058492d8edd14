// Fused conv-ISTA / conv-FISTA on the CPU: ops dsc_kernels::conv_ista_fwd_cpp and conv_ista_bwd_cpp.
//
// Canonical 2-D tensors (notes/CONTRACT.md): x (B, Cs, H, W); weight W_D and encoder_weight W_E (Cc, Cs, KH, KW);
// lam (n, Cc); step (n,); z0 (B, Cc, Hz, Wz). D z = conv_transpose2d(z, W_D) cropped/padded to x's size,
// E r = conv2d(r, W_E), both with the given stride and padding.
//
// Forward, k = 0 .. n-1 (FISTA: beta_k = (t_{k-1} - 1) / t_k, beta_0 = 0; ISTA: beta_k = 0):
//     y_k     = z_k + beta_k (z_k - z_{k-1})
//     u_k     = y_k + step_k * E(x - D y_k)
//     z_{k+1} = S_{step_k lam_k[c]}(u_k)              (S+ when nonneg)
// One parallel pass per iteration over tasks (batch item, band of code rows). A task rebuilds, in thread-local
// buffers, y on the rows its halo needs, the residual x - D y on the signal rows its analysis window covers, then
// applies E, adds y, thresholds and writes z_{k+1}. No full-size D y, residual or u is ever materialised.
// Saved for backward: z_0 .. z_{n-1} ("iterates", when save_iterates) or nothing (recompute mode).
//
// Backward (g = dL/dz_{k+1}, gu = g * [z_{k+1} != 0], r_k = x - D y_k, v = E^* gu = conv_transpose(gu, W_E)):
//     dL/dx     += step_k v
//     dL/dy_k    = gu - step_k D^* v                           (D^* = conv2d(., W_D))
//     dL/dW_E   += step_k conv_weight_grad(input=r_k, grad_out=gu)
//     dL/dW_D   -= step_k conv_weight_grad(input=v,   grad_out=y_k)
//     dL/dth_c   = -sum gu sign(z_{k+1})  (nonneg: -sum gu);  dL/dlam_k = step_k dL/dth
//     dL/dstep_k = <gu, E r_k> + <lam_k, dL/dth> = <v, r_k> + <lam_k, dL/dth>    (no analysis pass needed)
//     FISTA: dL/dz_k += (1 + beta_k) dL/dy_k,  dL/dz_{k-1} -= beta_k dL/dy_k
// The backward runs one iteration at a time with full-size temporaries r_k and v (signal-sized), the running code
// gradients and the weight gradients' two operands step_k gu and -step_k y_k (code-sized); elsewhere gu and y_k are
// recomputed from the iterates wherever they are read. D y_k, E^* gu and D^* v use the forward's micro-kernel, one
// batch item per task; the two weight gradients are then one ATen convolution backward each (oneDNN) over the batch.
// Recompute mode replays the fused forward from z0 up to z_k for every k: O(n^2 / 2) extra fused iterations, no
// checkpoints, so its memory (three or four more code-sized buffers) does not depend on n.
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
#else
constexpr int kVecBytes = 32;
#endif

template <typename T>
struct VecOf {
  static constexpr int L = kVecBytes / sizeof(T);
  typedef T V __attribute__((vector_size(kVecBytes)));
};

// Largest tile (channels x columns) any micro-kernel instantiation writes (cob * nv * L, see Plan).
constexpr int kMaxTile = 256;

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
    cob = CO >= 8 ? 8 : (CO >= 4 ? 4 : int(CO));
    const int nv_max = cob == 8 ? 2 : 4;  // <= 16 accumulators: no spills with 32 vector registers
    const int64_t need = (wout + L - 1) / L;
    nv = need >= nv_max ? nv_max : (need >= 2 ? 2 : 1);
  }

  template <bool DENSE>
  static TileFn<T> pick(int cob, int nv) {
    if (cob == 8) return nv == 1 ? &corr_tile<T, 8, 1, DENSE> : &corr_tile<T, 8, 2, DENSE>;
    if (cob == 4) return pick_nv<4, DENSE>(nv);
    if (cob == 3) return pick_nv<3, DENSE>(nv);
    if (cob == 2) return pick_nv<2, DENSE>(nv);
    return pick_nv<1, DENSE>(nv);
  }

  template <int COB, bool DENSE>
  static TileFn<T> pick_nv(int nv) {
    if (nv == 1) return &corr_tile<T, COB, 1, DENSE>;
    return nv == 2 ? &corr_tile<T, COB, 2, DENSE> : &corr_tile<T, COB, 4, DENSE>;
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
// restricted to the active set).
template <typename T>
struct CodeSrc {
  const T* a;
  const T* b;
  T beta;
  const T* mask;
  T scale;

  void row(int64_t off, int64_t cnt, T* __restrict dst) const {
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

  // Buffers for a band of code rows (forward) or of `sig_rows` signal rows (backward's full-size D passes).
  BandBufs<T> bufs(int64_t sig_rows = 0) const {
    const int64_t max_sig_rows = sig_rows ? sig_rows : std::min(g.H, (R - 1) * g.SH + g.KH);
    return BandBufs<T>(g.Cc, synth.yrows(max_sig_rows), synth.ywidth, g.Cs, (R - 1) * g.SH + g.KH,
                       g.SW * analysis_phase_width<T>(g));
  }

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

  // rbuf's signal row h of channel s (band starting at code row i0) := a - b (b null: a), in column phases.
  void store_r(BandBufs<T>& bb, int64_t s, int64_t h, int64_t i0, const T* __restrict a, const T* __restrict b) const {
    T* row = bb.r + (s * bb.rrows + (h + g.PH - i0 * g.SH)) * bb.rwidth;
    const int64_t pwid = bb.rwidth / g.SW;
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

  // One fused iteration: z_next = S(y + step E(x - D y)), y = zk + beta (zk - zkm1).
  void iterate(const T* x, const T* zk, const T* zkm1, T beta, T step, const T* lamk, bool nonneg, T* znext) const {
    std::vector<T> th(g.Cc);
    for (int64_t c = 0; c < g.Cc; ++c) th[c] = step * lamk[c];
    for_bands(g.B, g.Hz, R, [&](int64_t n, int64_t i0, int64_t i1) {
      BandBufs<T> bb = bufs();
      run_band(bb, x, zk, zkm1, beta, step, th.data(), nonneg, znext, n, i0, i1);
    });
  }

  void run_band(BandBufs<T>& bb, const T* x, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg,
                T* znext, int64_t n, int64_t i0, int64_t i1) const {
    int64_t hs0, nh;
    sig_rows(i0, i1, hs0, nh);
    fill_y(bb, CodeSrc<T>{zk, zkm1, beta, nullptr, T(1)}, n, hs0, nh);
    std::fill(bb.r, bb.r + g.Cs * bb.rrows * bb.rwidth, T(0));
    synth_rows(bb, hs0, nh, [&](int64_t s, int64_t h, const T* v, int64_t) {
      store_r(bb, s, h, i0, x + ((n * g.Cs + s) * g.H + h) * g.W, v);
    });
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
  TORCH_CHECK(z0.dim() == 4 && z0.size(0) == g.B && z0.size(1) == g.Cc && z0.size(2) == g.Hz && z0.size(3) == g.Wz,
              "conv_ista_cpp: z0 must be (B, C_code, Hz, Wz)");
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

// Runs iterations [0, m) from z0 in three rotating buffers (z0 itself is never written); returns z_m and z_{m-1}
// (z_{-1} := null), pointing into bufs or z0. `last` (optional) receives z_m instead of a buffer when m == n.
template <typename T>
void replay(const Ctx<T>& ctx, const T* x, const T* z0, const std::vector<T>& lam, const std::vector<T>& step,
            const std::vector<double>& beta, bool nonneg, bool fista, int64_t m, T* const bufs[3], T* last,
            const T** zm, const T** zm1) {
  // FISTA reads z_{k-1} and z_k while writing z_{k+1}: three buffers; ISTA needs two.
  const int nbufs = fista ? 3 : 2;
  const T* cur = z0;
  const T* prev = nullptr;
  for (int64_t k = 0; k < m; ++k) {
    T* next = (last && k == m - 1) ? last : bufs[k % nbufs];
    ctx.iterate(x, cur, fista && k > 0 ? prev : nullptr, T(beta[k]), step[k], lam.data() + k * ctx.g.Cc, nonneg,
                next);
    prev = cur;
    cur = next;
  }
  *zm = cur;
  *zm1 = prev;
}

template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& encoder_weight, const at::Tensor& lam_t,
              const at::Tensor& step_t, const at::Tensor& z0, const Geo& g, bool nonneg, bool fista,
              at::Tensor& z, at::Tensor& iterates) {
  const Ctx<T> ctx(g, weight.data_ptr<T>(), encoder_weight.data_ptr<T>());
  const auto lam = host<T>(lam_t);
  const auto step = host<T>(step_t);
  const auto beta = fista_betas(step.size(), fista);
  const int64_t n = step.size();
  const T* xp = x.data_ptr<T>();
  if (iterates.numel() > 0) {
    // z_k lives in iterates[k]; z_n goes to z.
    const int64_t sz = z0.numel();
    T* it = iterates.data_ptr<T>();
    std::memcpy(it, z0.data_ptr<T>(), sz * sizeof(T));
    for (int64_t k = 0; k < n; ++k) {
      T* next = k + 1 < n ? it + (k + 1) * sz : z.data_ptr<T>();
      ctx.iterate(xp, it + k * sz, fista && k > 0 ? it + (k - 1) * sz : nullptr, T(beta[k]), step[k],
                  lam.data() + k * g.Cc, nonneg, next);
    }
    return;
  }
  at::Tensor scratch = at::empty({fista ? 3 : 2, z0.numel()}, z0.options());
  T* s = scratch.data_ptr<T>();
  T* bufs[3] = {s, s + z0.numel(), fista ? s + 2 * z0.numel() : nullptr};
  const T *zm, *zm1;
  replay(ctx, xp, z0.data_ptr<T>(), lam, step, beta, nonneg, fista, n, bufs, z.data_ptr<T>(), &zm, &zm1);
}

std::tuple<at::Tensor, at::Tensor> conv_ista_fwd_cpp(const at::Tensor& x_, const at::Tensor& weight_,
                                                     const at::Tensor& encoder_weight_, const at::Tensor& lam,
                                                     const at::Tensor& step, const at::Tensor& z0_,
                                                     at::IntArrayRef stride, at::IntArrayRef padding, bool nonneg,
                                                     bool fista, bool save_iterates) {
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), encoder_weight = encoder_weight_.contiguous();
  const at::Tensor z0 = z0_.contiguous();
  const Geo g = make_geo(x, weight, encoder_weight, lam, step, z0, stride, padding);
  at::Tensor z = at::empty_like(z0);
  at::Tensor iterates = save_iterates ? at::empty({step.size(0), g.B, g.Cc, g.Hz, g.Wz}, z0.options())
                                      : at::empty({0}, z0.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_ista_fwd_cpp", [&] {
    fwd_impl<scalar_t>(x, weight, encoder_weight, lam, step, z0, g, nonneg, fista, z, iterates);
  });
  return {z, iterates};
}

template <typename T>
void bwd_impl(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& weight,
              const at::Tensor& encoder_weight, const at::Tensor& lam_t, const at::Tensor& step_t,
              const at::Tensor& z0, const at::Tensor& z, const at::Tensor& iterates, const Geo& g, bool nonneg,
              bool fista, at::Tensor& gx, at::Tensor& gw, at::Tensor& gwe, at::Tensor& glam, at::Tensor& gstep,
              at::Tensor& gz0) {
  const Ctx<T> ctx(g, weight.data_ptr<T>(), encoder_weight.data_ptr<T>());
  // v = E^* gu is D with W_E; D^* v is E with W_D.
  const Synth<T> synth_e(g, encoder_weight.data_ptr<T>());
  const Plan<T> anal_d = analysis_plan(g, weight.data_ptr<T>());
  const auto lam = host<T>(lam_t);
  const auto step = host<T>(step_t);
  const auto beta = fista_betas(step.size(), fista);
  const int64_t n = step.size();
  const int64_t csz = z0.numel();
  const int64_t hw = g.Hz * g.Wz;
  const bool saved = iterates.numel() > 0;
  const T* xp = x.data_ptr<T>();

  // Code-sized temporaries: gA, gB and the replay buffers; gu = gA [z_{k+1} != 0] and y_k are recomputed wherever
  // they are read, except for the weight gradients' operands below.
  gz0 = grad_z.clone();  // gA: dL/dz_{k+1}, complete when step k runs; ends as dL/dz_0
  at::Tensor gB = fista ? at::zeros_like(z0) : at::Tensor();  // the part of dL/dz_k coming from y_{k+1}
  gx.zero_();
  // Recompute mode: replay buffers (2 for ISTA, 3 for FISTA) plus the held z_{k+1}.
  const int nrep = fista ? 3 : 2;
  at::Tensor scratch = saved ? at::Tensor() : at::empty({nrep + 1, csz}, z0.options());
  T* bufs[3] = {nullptr, nullptr, nullptr};
  T* zk1_buf = nullptr;
  if (!saved) {
    T* s = scratch.data_ptr<T>();
    for (int i = 0; i < nrep; ++i) bufs[i] = s + i * csz;
    zk1_buf = s + nrep * csz;
    std::memcpy(zk1_buf, z.data_ptr<T>(), csz * sizeof(T));
  }
  const T* it = saved ? iterates.data_ptr<T>() : nullptr;
  // Per iteration, whole-batch r_k and v (signal-sized) and the weight gradients' G operands (code-sized, step_k
  // folded in) for the two weight-gradient convolutions after the item loop.
  at::Tensor r_all = at::empty_like(x), v_all = at::empty_like(x);
  at::Tensor ge_all = at::empty_like(z0), gd_all = at::empty_like(z0);
  at::Tensor gwe_acc = at::zeros_like(encoder_weight), gw_acc = at::zeros_like(weight);
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>> dth_part(nt, std::vector<double>(g.Cc));  // dL/dth per thread and channel
  std::vector<double> vr_part(nt);                                           // <v, r_k> per thread
  const int64_t sig = g.Cs * g.H * g.W;
  // Signal rows per band of the D passes: the rows the forward's code bands cover, so ybuf stays band-sized.
  const int64_t Rs = std::min(g.H, ctx.R * g.SH + g.KH - 1);
  T* gAp = gz0.data_ptr<T>();
  T* gBp = fista ? gB.data_ptr<T>() : nullptr;
  T* gxp = gx.data_ptr<T>();

  for (int64_t k = n - 1; k >= 0; --k) {
    const T sk = step[k];
    const T bk = T(beta[k]);
    const T *zk, *zkm1, *zk1;
    if (saved) {
      zk = it + k * csz;
      zkm1 = k > 0 ? it + (k - 1) * csz : nullptr;
      zk1 = k + 1 < n ? it + (k + 1) * csz : z.data_ptr<T>();
    } else {
      replay(ctx, xp, z0.data_ptr<T>(), lam, step, beta, nonneg, fista, k, bufs, static_cast<T*>(nullptr), &zk,
             &zkm1);
      zk1 = zk1_buf;
    }
    if (!(fista && k > 0)) zkm1 = nullptr;
    const CodeSrc<T> yk{zk, zkm1, bk, nullptr, T(1)};
    const CodeSrc<T> gu{gAp, nullptr, T(0), zk1, T(1)};  // read before this item's gA slice is rewritten

    // One batch item per task, start to finish: it writes only its own slices of r_k, v and the G operands, and
    // rewrites its own slice of gA after every read of it, so items are independent.
    for (auto& d : dth_part) std::fill(d.begin(), d.end(), 0.0);
    std::fill(vr_part.begin(), vr_part.end(), 0.0);
    at::parallel_for(0, g.B, 1, [&](int64_t n0, int64_t n1) {
      const int tid = at::get_thread_num();
      for (int64_t b = n0; b < n1; ++b) {
        T* __restrict rn = r_all.data_ptr<T>() + b * sig;
        T* __restrict vn = v_all.data_ptr<T>() + b * sig;
        // dL/dth (sign-weighted sum of gu), one code row of the reduction at a time in T, vectorised.
        for (int64_t c = 0; c < g.Cc; ++c) {
          const T* __restrict zz = zk1 + (b * g.Cc + c) * hw;
          const T* __restrict ga = gAp + (b * g.Cc + c) * hw;
          T part = 0;
          if (nonneg) {
#pragma omp simd reduction(+ : part)
            for (int64_t i = 0; i < hw; ++i) {
              const T v = ga[i];
              part += zz[i] != T(0) ? v : T(0);
            }
          } else {
#pragma omp simd reduction(+ : part)
            for (int64_t i = 0; i < hw; ++i) {
              const T v = ga[i];
              part += zz[i] > T(0) ? v : (zz[i] < T(0) ? -v : T(0));
            }
          }
          dth_part[tid][c] -= part;
        }

        // r_k = x - D y_k and v = D_E gu; dL/dx += step v.
        for (int64_t h0 = 0; h0 < g.H; h0 += Rs) {
          const int64_t h1 = std::min(g.H, h0 + Rs);
          // synth_e has synth's geometry (same channels, kernel and output width), so one ybuf layout serves both.
          BandBufs<T> bb = ctx.bufs(Rs);
          ctx.fill_y(bb, yk, b, h0, h1 - h0);
          ctx.synth_rows(bb, h0, h1 - h0, [&](int64_t s, int64_t h, const T* val, int64_t cnt) {
            const int64_t off = (s * g.H + h) * g.W;
            const T* __restrict xs = xp + b * sig + off;
            for (int64_t j = 0; j < cnt; ++j) rn[off + j] = xs[j] - val[j];
          });
          ctx.fill_y(bb, gu, b, h0, h1 - h0);
          synth_e.rows(bb.y, bb.yrows * bb.ywidth, h0, h1 - h0, [&](int64_t s, int64_t h, const T* val, int64_t cnt) {
            const int64_t off = (s * g.H + h) * g.W;
            T* __restrict gxs = gxp + b * sig + off;
            for (int64_t j = 0; j < cnt; ++j) vn[off + j] = val[j], gxs[j] += sk * val[j];
          });
        }
        T vr = 0;
#pragma omp simd reduction(+ : vr)
        for (int64_t i = 0; i < sig; ++i) vr += vn[i] * rn[i];
        vr_part[tid] += vr;

        // The weight gradients' G, with step_k folded in: dW_E += step r_k (x) gu, dW_D -= step v (x) y_k.
        CodeSrc<T>{gAp, nullptr, T(0), zk1, sk}.row(b * g.Cc * hw, g.Cc * hw, ge_all.data_ptr<T>() + b * g.Cc * hw);
        CodeSrc<T>{zk, zkm1, bk, nullptr, -sk}.row(b * g.Cc * hw, g.Cc * hw, gd_all.data_ptr<T>() + b * g.Cc * hw);

        // dL/dy_k = gu - step D^* v, split into dL/dz_k (gA) and dL/dz_{k-1} (gB).
        for (int64_t i0 = 0; i0 < g.Hz; i0 += ctx.R) {
          const int64_t i1 = std::min(g.Hz, i0 + ctx.R);
          BandBufs<T> bb = ctx.bufs();  // anal_d has anal's geometry, so the forward's rbuf layout serves
          std::fill(bb.r, bb.r + g.Cs * bb.rrows * bb.rwidth, T(0));
          int64_t hs0, nh;
          ctx.sig_rows(i0, i1, hs0, nh);
          for (int64_t s = 0; s < g.Cs; ++s)
            for (int64_t h = hs0; h < hs0 + nh; ++h)
              ctx.store_r(bb, s, h, i0, vn + (s * g.H + h) * g.W, nullptr);
          for (int64_t i = i0; i < i1; ++i)
            anal_d.row(bb.r + (i - i0) * g.SH * bb.rwidth, bb.rrows * bb.rwidth, bb.rwidth, g.Wz,
                       [&](int64_t c, int64_t j0, const T* val, int64_t cnt) {
                         const int64_t off = ((b * g.Cc + c) * g.Hz + i) * g.Wz + j0;
                         T* __restrict ga = gAp + off;
                         const T* __restrict m = zk1 + off;
                         if (gBp) {
                           T* __restrict gb = gBp + off;
                           for (int64_t j = 0; j < cnt; ++j) {
                             const T gv = ga[j];
                             const T gy = (m[j] != T(0) ? gv : T(0)) - sk * val[j];
                             ga[j] = gb[j] + (T(1) + bk) * gy;
                             gb[j] = -bk * gy;
                           }
                         } else {
                           for (int64_t j = 0; j < cnt; ++j) {
                             const T gv = ga[j];
                             ga[j] = (m[j] != T(0) ? gv : T(0)) - sk * val[j];
                           }
                         }
                       });
        }
      }
    });

    double lam_dth = 0, vr = 0;
    for (int64_t c = 0; c < g.Cc; ++c) {
      double d = 0;
      for (const auto& part : dth_part) d += part[c];
      glam.data_ptr<T>()[k * g.Cc + c] = T(sk * d);
      lam_dth += double(lam[k * g.Cc + c]) * d;
    }
    for (double part : vr_part) vr += part;
    gstep.data_ptr<T>()[k] = T(vr + lam_dth);

    // Whole-batch weight gradients through ATen's convolution backward (oneDNN for float32): faster than an
    // im2col + GEMM per item, which spent as long writing im2col as multiplying.
    const std::vector<int64_t> st{g.SH, g.SW}, pd{g.PH, g.PW}, dil{1, 1}, opad{0, 0};
    gwe_acc += std::get<1>(at::convolution_backward(ge_all, r_all, encoder_weight, std::nullopt, st, pd, dil, false,
                                                    opad, 1, {false, true, false}));
    gw_acc += std::get<1>(at::convolution_backward(gd_all, v_all, weight, std::nullopt, st, pd, dil, false, opad, 1,
                                                   {false, true, false}));

    if (!saved) std::memcpy(zk1_buf, zk, csz * sizeof(T));
  }
  gwe.copy_(gwe_acc);
  gw.copy_(gw_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_ista_bwd_cpp(
    const at::Tensor& grad_z, const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& encoder_weight_,
    const at::Tensor& lam, const at::Tensor& step, const at::Tensor& z0_, const at::Tensor& z_,
    const at::Tensor& iterates_, at::IntArrayRef stride, at::IntArrayRef padding, bool nonneg, bool fista) {
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous(), encoder_weight = encoder_weight_.contiguous();
  const at::Tensor z0 = z0_.contiguous(), z = z_.contiguous(), iterates = iterates_.contiguous();
  const Geo g = make_geo(x, weight, encoder_weight, lam, step, z0, stride, padding);
  TORCH_CHECK(grad_z.sizes() == z0.sizes() && z.sizes() == z0.sizes(), "conv_ista_bwd_cpp: grad_z/z shape");
  TORCH_CHECK(iterates.numel() == 0 || iterates.numel() == step.size(0) * z0.numel(),
              "conv_ista_bwd_cpp: iterates must be empty or (n_iter, *z0.shape)");
  at::Tensor gx = at::empty_like(x), gw = at::empty_like(weight), gwe = at::empty_like(encoder_weight);
  at::Tensor glam = at::empty_like(lam).contiguous(), gstep = at::empty_like(step).contiguous();
  at::Tensor gz0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_ista_bwd_cpp", [&] {
    bwd_impl<scalar_t>(grad_z.contiguous(), x, weight, encoder_weight, lam, step, z0, z, iterates, g, nonneg, fista,
                       gx, gw, gwe, glam, gstep, gz0);
  });
  return {gx, gw, gwe, glam, gstep, gz0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsc_kernels, m) {
  m.def(
      "conv_ista_fwd_cpp(Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, "
      "int[] stride, int[] padding, bool nonneg, bool fista, bool save_iterates) -> (Tensor, Tensor)");
  m.def(
      "conv_ista_bwd_cpp(Tensor grad_z, Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, "
      "Tensor z0, Tensor z, Tensor iterates, int[] stride, int[] padding, bool nonneg, bool fista) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsc_kernels, CPU, m) {
  m.impl("conv_ista_fwd_cpp", &conv_ista_fwd_cpp);
  m.impl("conv_ista_bwd_cpp", &conv_ista_bwd_cpp);
}

}  // namespace dsc_kernels
