// The direct strategy's fused iteration: one pass over the code per iteration, with both convolutions computed by
// the register-tiled correlation micro-kernel (simd_tiles.h) on thread-local buffers.
//
//     z_{k+1} = S_{step_k lam_k}(y_k + step_k E(x - D y_k)),   y_k = z_k + beta_k (z_k - z_{k-1})
//
// A task (a batch item, or a band of its code rows) rebuilds, in thread-local buffers, y on the code rows its halo
// needs and the residual x - D y on the signal rows its analysis window covers, then applies E, adds y, thresholds
// and writes z_{k+1}. No full-size D y, residual or u is ever materialised.
//
// Layouts. E reads the zero-padded residual stored as SW column phases (phase p holds padded columns p, p + SW, ...),
// so every tap reads consecutive columns whatever the stride. D is split into SH * SW output phases (polyphase), each
// a unit-stride correlation of y itself with a flipped, transposed sub-kernel, so a stride wastes no multiply-adds
// on the zeros of an upsampled y.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "problem.h"
#include "simd_tiles.h"

namespace dsc_kernels {
namespace conv_ista {

// E (or D^*, given W_D) = conv2d(., w): a strided correlation of the zero-padded signal, whose rows are stored as
// SW column phases of `pwid` columns (phase p holds padded columns p, p + SW, ...; see
// FusedIteration::store_residual_row), so that every tap reads consecutive columns: tap b of output column j reads
// phase b % SW at j + b / SW.
template <typename T>
int64_t analysis_phase_width(const ConvGeometry& g) {
  return std::max(CorrelationPlan<T>::padded_width(g.Cc, g.Wz) + (g.KW - 1) / g.SW,
                  (g.W + 2 * g.PW + g.SW - 1) / g.SW);
}

template <typename T>
CorrelationPlan<T> make_analysis_plan(const ConvGeometry& g, const T* w) {
  const int64_t pwid = analysis_phase_width<T>(g);
  std::vector<int64_t> boff;
  for (int64_t b = 0; b < g.KW; ++b) boff.push_back((b % g.SW) * pwid + b / g.SW);
  return CorrelationPlan<T>(g.Cc, g.Cs, g.KH, g.KW, g.Wz, std::move(boff),
                            [&](int64_t co, int64_t ci, int64_t a, int64_t b) {
                              return w[((co * g.Cs + ci) * g.KH + a) * g.KW + b];
                            });
}

// D (or E^*, given W_E) = conv_transpose2d(., w) in polyphase form. Signal row h with h + PH = q SH + ph only
// receives kernel rows a = ph + SH t from code rows q - t (t < TA_ph = ceil((KH - ph) / SH)); columns likewise. So
// each phase (ph, pw) is a unit-stride correlation of y itself with a flipped sub-kernel, producing the signal
// columns w = w_first_pw + SW m: only useful multiply-adds, whatever the stride (a phase no tap reaches, stride >
// kernel, gets an empty kernel and yields zeros).
// The SW column phases of one row phase read the same code rows, at window starts at most ceil(KW / SW) apart, so
// they run as one correlation with Cs x SW output channels (channel pw Cs + s) over the union of their windows (taps
// outside a phase's own window weigh zero): each code vector loaded feeds SW Cs FMAs instead of Cs. With one signal
// channel and stride 8 (CSCNet) the per-phase tiles (1 channel x 2 vectors) re-read every code row 8 times and were
// bound by those loads, a third of the backward.
template <typename T>
struct PolyphaseSynthesis {
  ConvGeometry g;
  int64_t TA;                              // code rows the tallest phase reads (phase 0)
  std::vector<int64_t> ta;                 // [ph]: kernel rows of row phase ph
  std::vector<int64_t> wfirst, wcnt;       // [pw]: first signal column, column count
  int64_t wmax;                            // the widest column phase
  int64_t ycol0, ywidth;                   // code column of ybuf column 0; ybuf row width
  std::vector<CorrelationPlan<T>> plans;   // [ph]: all column phases of row phase ph

  PolyphaseSynthesis(const ConvGeometry& g_, const T* w) : g(g_), TA((g_.KH + g_.SH - 1) / g_.SH) {
    for (int64_t ph = 0; ph < g.SH; ++ph) ta.push_back(std::max<int64_t>(0, (g.KH - ph + g.SH - 1) / g.SH));
    std::vector<int64_t> tb, start;  // [pw]: kernel columns, first code column of the window (relative)
    wmax = 1;
    for (int64_t pw = 0; pw < g.SW; ++pw) {
      tb.push_back(std::max<int64_t>(0, (g.KW - pw + g.SW - 1) / g.SW));
      const int64_t wf = ((pw - g.PW) % g.SW + g.SW) % g.SW;
      wfirst.push_back(wf);
      wcnt.push_back(wf < g.W ? (g.W - wf + g.SW - 1) / g.SW : 0);
      wmax = std::max(wmax, wcnt[pw]);
      start.push_back((wf + g.PW) / g.SW - tb[pw] + 1);
    }
    ycol0 = *std::min_element(start.begin(), start.end());
    int64_t union_taps = 1;
    for (int64_t pw = 0; pw < g.SW; ++pw) union_taps = std::max(union_taps, start[pw] - ycol0 + tb[pw]);
    const int64_t CO = g.Cs * g.SW;
    for (int64_t ph = 0; ph < g.SH; ++ph) {
      const int64_t A = ta[ph];
      plans.emplace_back(CO, g.Cc, A, union_taps, wmax, std::vector<int64_t>(),
                         [&](int64_t co, int64_t c, int64_t t, int64_t u) {
                           const int64_t pw = co / g.Cs, s = co % g.Cs, Bw = tb[pw];
                           const int64_t uu = u - (start[pw] - ycol0);  // the tap in phase pw's own window
                           if (uu < 0 || uu >= Bw) return T(0);
                           return w[((c * g.Cs + s) * g.KH + ph + g.SH * (A - 1 - t)) * g.KW + pw +
                                    g.SW * (Bw - 1 - uu)];
                         }, kMaxRowBlock);
    }
    ywidth = std::max<int64_t>(1, plans[0].in_width(wmax));
  }

  // ybuf rows for `sig_rows` signal rows (any alignment).
  int64_t yrows(int64_t sig_rows) const { return (sig_rows + g.SH - 1) / g.SH + TA; }

  // Code row of ybuf row 0 for signal rows starting at hs0.
  int64_t yrow0(int64_t hs0) const { return (hs0 + g.PH) / g.SH - TA + 1; }

  // D y on signal rows [hs0, hs0 + nh) of a ybuf (channel stride ics) filled from code row yrow0(hs0);
  // epi(s, h, values, count) receives whole signal rows, row phase by row phase (rows h and h + SH of one phase
  // read code rows one apart, so the plan computes them in blocks that share their loads).
  template <class Epi>
  void rows(const T* ybuf, int64_t ics, int64_t hs0, int64_t nh, Epi&& epi) const {
    thread_local std::vector<T> rowv;
    rowv.resize(kMaxRowBlock * g.Cs * g.W);
    const int64_t y0 = yrow0(hs0);
    for (int64_t ph = 0; ph < g.SH; ++ph) {
      const CorrelationPlan<T>& plan = plans[ph];
      const int64_t h_first = hs0 + ((ph - g.PH - hs0) % g.SH + g.SH) % g.SH;  // (h + PH) % SH == ph
      for (int64_t h0 = h_first; h0 < hs0 + nh; h0 += plan.rows * g.SH) {
        const int nr = int(std::min<int64_t>(plan.rows, (hs0 + nh - h0 + g.SH - 1) / g.SH));
        const T* base = ybuf + ((h0 + g.PH) / g.SH - ta[ph] + 1 - y0) * ywidth;
        plan.row_block(base, ics, ywidth, wmax, nr, [&](int r, int64_t co, int64_t j0, const T* v, int64_t cnt) {
          const int64_t pw = co / g.Cs, s = co % g.Cs;
          const int64_t n = std::min(cnt, wcnt[pw] - j0);
          T* __restrict o = rowv.data() + (r * g.Cs + s) * g.W + wfirst[pw] + j0 * g.SW;
          for (int64_t m = 0; m < n; ++m) o[m * g.SW] = v[m];
        });
        for (int r = 0; r < nr; ++r)
          for (int64_t s = 0; s < g.Cs; ++s)
            epi(s, h0 + r * g.SH, static_cast<const T*>(rowv.data() + (r * g.Cs + s) * g.W), g.W);
      }
    }
  }
};

// Rows per band for `rows` rows split over batch x bands: minimise the busiest thread's work (tasks per thread times
// rows per task including the halo each band recomputes).
inline int64_t band_rows(int64_t B, int64_t rows, double halo) {
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

// A band's scratch: views into per-thread storage that grows to the largest band seen and is then reused.
template <typename T>
struct BandScratch {
  // y on the code rows and columns a band's D reads (PolyphaseSynthesis::yrow0 and ::ycol0 give the offsets), zero
  // outside the code: Cc x yrows x ywidth.
  T* y;
  int64_t yrows, ywidth;
  // The zero-padded signal (residual) rows that code rows [i0, i1) read, in make_analysis_plan's column-phase layout;
  // row 0 is padded row i0 * SH: Cs x rrows x rwidth.
  T* r;
  int64_t rrows, rwidth;

  BandScratch(int64_t Cc, int64_t yrows_, int64_t ywidth_, int64_t Cs, int64_t rrows_, int64_t rwidth_)
      : yrows(yrows_), ywidth(ywidth_), rrows(rrows_), rwidth(rwidth_) {
    thread_local std::vector<T> ys, rs;
    if (ys.size() < size_t(Cc * yrows * ywidth)) ys.resize(Cc * yrows * ywidth);
    if (rs.size() < size_t(Cs * rrows * rwidth)) rs.resize(Cs * rrows * rwidth);
    y = ys.data();
    r = rs.data();
  }
};

// One iteration of the direct strategy, on a band, an item or the whole batch.
template <typename T>
struct FusedIteration {
  ConvGeometry g;
  PolyphaseSynthesis<T> synthesis;  // D (W_D)
  CorrelationPlan<T> analysis;      // E (W_E)
  int64_t R;                        // code rows per band

  FusedIteration(const ConvGeometry& g_, const T* wd, const T* we)
      : g(g_),
        synthesis(g_, wd),
        analysis(make_analysis_plan(g_, we)),
        R(band_rows(g_.B, g_.Hz, double(g_.KH - 1) / g_.SH)) {}

  // Buffers for a band of `code_rows` code rows (0: R) and the signal rows it reads.
  BandScratch<T> bufs(int64_t code_rows = 0) const {
    const int64_t rows = code_rows ? code_rows : R;
    return BandScratch<T>(g.Cc, synthesis.yrows(std::min(g.H, (rows - 1) * g.SH + g.KH)), synthesis.ywidth, g.Cs,
                          padded_rows(rows), padded_width());
  }

  // Rows and row width of the zero-padded, column-phased signal buffer that `rows` code rows of E read.
  int64_t padded_rows(int64_t rows) const { return (rows - 1) * g.SH + g.KH; }
  int64_t padded_width() const { return g.SW * analysis_phase_width<T>(g); }

  // ybuf for batch item n and signal rows [hs0, hs0 + nh), from the code-sized tensor `src` describes.
  void fill_y(BandScratch<T>& bb, const CodeRowSource<T>& src, int64_t n, int64_t hs0, int64_t nh) const {
    const int64_t y0 = synthesis.yrow0(hs0);
    const int64_t rows = std::min(bb.yrows, (hs0 + nh - 1 + g.PH) / g.SH - y0 + 1);
    const int64_t c0 = synthesis.ycol0;
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
  void synthesis_rows(const BandScratch<T>& bb, int64_t hs0, int64_t nh, Epi&& epi) const {
    synthesis.rows(bb.y, bb.yrows * bb.ywidth, hs0, nh, epi);
  }

  // Signal rows that code rows [i0, i1) read.
  void sig_rows(int64_t i0, int64_t i1, int64_t& hs0, int64_t& nh) const {
    hs0 = std::max<int64_t>(0, i0 * g.SH - g.PH);
    const int64_t hs1 = std::min<int64_t>(g.H, (i1 - 1) * g.SH + g.KH - g.PH);
    nh = std::max<int64_t>(0, hs1 - hs0);
  }

  // Signal row h of channel s := a - b (b null: a), in column phases, into a padded buffer (rrows x rwidth per
  // channel) whose row 0 is padded row i0 * SH (the band starting at code row i0).
  void store_residual_row(T* rbuf, int64_t rrows, int64_t rwidth, int64_t s, int64_t h, int64_t i0,
                          const T* __restrict a, const T* __restrict b) const {
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
  void analysis_rows(const BandScratch<T>& bb, int64_t i0, int64_t i1, Epi&& epi) const {
    for (int64_t i = i0; i < i1; ++i)
      analysis.row(bb.r + (i - i0) * g.SH * bb.rwidth, bb.rrows * bb.rwidth, bb.rwidth, g.Wz,
                   [&](int64_t c, int64_t j0, const T* v, int64_t cnt) { epi(c, i, j0, v, cnt); });
  }

  // One fused iteration over the batch, parallel over (item, band): z_next = S(y + step E(x - D y)),
  // y = zk + beta (zk - zkm1); th = step * lam_k per channel. keep (null: none): the batch's residual, kept
  // channels-last (B, H, W, Cs) as problem.h stores it.
  void iterate(const T* x, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg, T* znext,
               T* keep) const {
    for_bands(g.B, g.Hz, R, [&](int64_t n, int64_t i0, int64_t i1) {
      BandScratch<T> bb = bufs();
      run_band(bb, x, zk, zkm1, beta, step, th, nonneg, znext, n, i0, i1, keep);
    });
  }

  // The same iteration on one batch item (pointers to its slices), serially in the calling thread, as one band.
  // With r_out (padded_rows(Hz) x padded_width() per signal channel), the residual x - D y it forms on the way is
  // kept there, zero-padded and column-phased as E reads it (the backward's r_k). znext null: the residual only.
  void iterate_item(const T* x, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg, T* znext,
                    T* r_out, T* keep) const {
    BandScratch<T> bb = bufs(g.Hz);
    if (r_out) bb.r = r_out;
    run_band(bb, x, zk, zkm1, beta, step, th, nonneg, znext, 0, 0, g.Hz, keep);
  }

  void run_band(BandScratch<T>& bb, const T* x, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg,
                T* znext, int64_t n, int64_t i0, int64_t i1, T* keep) const {
    int64_t hs0, nh;
    sig_rows(i0, i1, hs0, nh);
    fill_y(bb, CodeRowSource<T>{zk, zkm1, beta, T(1)}, n, hs0, nh);
    std::fill(bb.r, bb.r + g.Cs * bb.rrows * bb.rwidth, T(0));
    synthesis_rows(bb, hs0, nh, [&](int64_t s, int64_t h, const T* v, int64_t) {
      store_residual_row(bb.r, bb.rrows, bb.rwidth, s, h, i0, x + ((n * g.Cs + s) * g.H + h) * g.W, v);
    });
    if (keep) keep_rows(bb, x, n, i0, i1, keep);
    if (znext) shrink_band(bb, zk, zkm1, beta, step, th, nonneg, znext, n, i0, i1);
  }

  // The signal rows band [i0, i1) owns, which the bands of an item tile: [i0 SH - PH, i1 SH - PH), the first band
  // from row 0 and the last to row H.
  void owned_rows(int64_t i0, int64_t i1, int64_t& h0, int64_t& h1) const {
    h0 = i0 == 0 ? 0 : std::clamp<int64_t>(i0 * g.SH - g.PH, 0, g.H);
    h1 = i1 == g.Hz ? g.H : std::clamp<int64_t>(i1 * g.SH - g.PH, 0, g.H);
  }

  // f(first column, count, offset) for each column phase of a phased row (store_residual_row's layout): signal
  // columns w0, w0 + SW, ... sit at offset, offset + 1, ... of the phased row.
  template <class F>
  void for_phases(int64_t rwidth, F&& f) const {
    const int64_t pwid = rwidth / g.SW;
    for (int64_t p = 0; p < g.SW; ++p) {
      const int64_t w0 = ((p - g.PW) % g.SW + g.SW) % g.SW;
      if (w0 < g.W) f(w0, (g.W - w0 + g.SW - 1) / g.SW, p * pwid + (w0 + g.PW) / g.SW);
    }
  }

  // Item n's residual on the rows band [i0, i1) owns, channels-last into keep (B, H, W, Cs): the phased band buffer
  // where a code reads the row, x elsewhere (no code reaches the row, so D y is zero there).
  void keep_rows(const BandScratch<T>& bb, const T* x, int64_t n, int64_t i0, int64_t i1, T* keep) const {
    int64_t hs0, nh, h0, h1;
    sig_rows(i0, i1, hs0, nh);
    owned_rows(i0, i1, h0, h1);
    const int64_t cs = g.Cs, sw = g.SW;
    for (int64_t h = h0; h < h1; ++h) {
      T* out = keep + (n * g.H + h) * g.W * cs;
      for (int64_t s = 0; s < cs; ++s) {
        if (h < hs0 || h >= hs0 + nh) {
          const T* __restrict src = x + ((n * cs + s) * g.H + h) * g.W;
          for (int64_t w = 0; w < g.W; ++w) out[w * cs + s] = src[w];
          continue;
        }
        const T* row = bb.r + (s * bb.rrows + (h + g.PH - i0 * g.SH)) * bb.rwidth;
        for_phases(bb.rwidth, [&](int64_t w0, int64_t cnt, int64_t off) {
          T* __restrict d = out + w0 * cs + s;
          const T* __restrict src = row + off;
          for (int64_t m = 0; m < cnt; ++m) d[m * sw * cs] = src[m];
        });
      }
    }
  }

  // The inverse for a whole item: r (padded_rows(Hz) x padded_width() per channel, zero outside the signal) from a
  // kept residual (H, W, Cs), as iterate_item's r_out would hold it.
  void load_residual(const T* keep, T* r) const {
    const int64_t rrows = padded_rows(g.Hz), rwidth = padded_width(), cs = g.Cs, sw = g.SW;
    std::fill(r, r + cs * rrows * rwidth, T(0));
    int64_t hs0, nh;
    sig_rows(0, g.Hz, hs0, nh);
    for (int64_t h = hs0; h < hs0 + nh; ++h)
      for (int64_t s = 0; s < cs; ++s) {
        T* row = r + (s * rrows + h + g.PH) * rwidth;
        const T* in = keep + h * g.W * cs + s;
        for_phases(rwidth, [&](int64_t w0, int64_t cnt, int64_t off) {
          T* __restrict d = row + off;
          const T* __restrict src = in + w0 * cs;
          for (int64_t m = 0; m < cnt; ++m) d[m] = src[m * sw * cs];
        });
      }
  }

  // z_next = S(y + step E r) on code rows [i0, i1) of item n, with the band's residual r already in bb.r.
  void shrink_band(const BandScratch<T>& bb, const T* zk, const T* zkm1, T beta, T step, const T* th, bool nonneg,
                   T* znext, int64_t n, int64_t i0, int64_t i1) const {
    analysis_rows(bb, i0, i1, [&](int64_t c, int64_t i, int64_t j0, const T* e, int64_t cnt) {
      const int64_t off = ((n * g.Cc + c) * g.Hz + i) * g.Wz + j0;
      T* __restrict out = znext + off;
      CodeRowSource<T>{zk, zkm1, beta, T(1)}.row(off, cnt, out);
      threshold_row(out, out, e, step, th[c], cnt, nonneg);
    });
  }
};

// A problem's fused iteration with its per-iteration constants: iteration k on one item or on the whole batch.
template <typename T>
struct DirectSolver {
  const Problem<T>& p;
  const FusedIteration<T> fused;

  explicit DirectSolver(const Problem<T>& p_)
      : p(p_), fused(p_.g, p_.weight.template data_ptr<T>(), p_.encoder_weight.template data_ptr<T>()) {}

  // Iteration k on one batch item's slices, in the calling thread (FusedIteration::iterate_item).
  void iterate(int64_t k, const T* x, const T* zk, const T* zkm1, T* znext, T* r_out = nullptr,
               T* keep = nullptr) const {
    fused.iterate_item(x, zk, p.it.momentum(k) ? zkm1 : nullptr, T(p.it.beta[k]), p.it.step[k], p.it.thresholds(k),
                       p.it.nonneg, znext, r_out, keep);
  }
  // Iteration k on the whole batch, parallel over (item, band).
  void iterate_batch(int64_t k, const T* x, const T* zk, const T* zkm1, T* znext, T* keep) const {
    fused.iterate(x, zk, p.it.momentum(k) ? zkm1 : nullptr, T(p.it.beta[k]), p.it.step[k], p.it.thresholds(k),
                  p.it.nonneg, znext, keep);
  }
  // z_{k+1} of one item from its residual r_k, phased as iterate's r_out holds it (E only: D y_k is not recomputed).
  void shrink(int64_t k, const T* zk, const T* zkm1, const T* r, T* znext) const {
    BandScratch<T> bb = fused.bufs(p.g.Hz);
    bb.r = const_cast<T*>(r);
    fused.shrink_band(bb, zk, p.it.momentum(k) ? zkm1 : nullptr, T(p.it.beta[k]), p.it.step[k], p.it.thresholds(k),
                      p.it.nonneg, znext, 0, 0, p.g.Hz);
  }
};

}  // namespace conv_ista
}  // namespace dsc_kernels
