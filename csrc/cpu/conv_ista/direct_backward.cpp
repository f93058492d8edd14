// Backward of the direct strategy: the exact VJP of the forward (problem.h), per batch item.
//
// With g = dL/dz_{k+1}, gu = g * [z_{k+1} != 0], r_k = x - D y_k, v = E^* gu = conv_transpose(gu, W_E):
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
// (so the reverse sweep never recomputes D y_k; kept residuals, problem.h, are read instead, and the replay then only
// applies E for the iterates not stored); recompute mode replays z_0..z_k for every k (O(n^2 / 2) extra
// iterations, three item-sized codes per thread whatever n is; FISTA five). The weight gradients are a register-tiled
// micro-kernel of their own (weight_grad_tile) over the residual and v, kept in the phased layout E reads, fed code
// rows in L1-sized chunks; their code operand (gu, y_k) is read in place where its rows are whole vectors, else
// copied into a padded buffer.
// grad_z is read through its strides, so the expanded scalar of a sum() is never materialised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "direct_iteration.h"
#include "strategies.h"

namespace dsc_kernels {
namespace conv_ista {
namespace {

// One thread's slice of the backward workspace (item-sized buffers, carved from one tensor the calling thread
// allocates, so allocator statistics and profilers see it). Signals live in E's padded, column-phased layout
// (Cs x rrows x rwidth, zero outside the signal): that is what the analysis and the weight gradients read.
template <typename T>
struct ItemWorkspace {
  T *grad, *carry;          // dL/dz_{k+1} (ends as dL/dz_0) and FISTA's carry into dL/dz_k (FISTA only)
  T* code_operand;          // a copy of the weight gradient's code operand where one is needed (code_operand)
  std::vector<T*> replay;   // replayed iterates (save mode: a segment's interior; recompute: the rotating ones)
  T* adjoint;               // v = E^* gu, phased
  T* residuals;             // r_k = x - D y_k, phased (save mode: a segment's m; recompute: 1)
  T *dw_encoder, *dw_dict;  // this thread's weight-gradient sums
  T* partials;              // weight_grad's lane-wise partial sums: KH x KW x kWeightGradChannels vectors
  std::vector<double> dth, vr;  // (n, Cc) and (n,): this thread's sums of dL/dth and <v, r_k>
};

template <typename T>
struct DirectBackward {
  const DirectSolver<T>& solver;
  const Problem<T>& p;
  const ConvGeometry& g;
  const PolyphaseSynthesis<T> synth_e;  // v = E^* gu: D's polyphase synthesis with W_E
  const CorrelationPlan<T> anal_d;      // D^* v: E's analysis with W_D
  const int64_t m;                      // checkpoint interval; 0 = recompute mode
  const int64_t Ccp, Wzp;
  // Weight gradients vectorised along code channels (weight_grad_channels_tile) where rows of whole vectors would
  // waste over a quarter of the lanes and there are at least two vectors of channels; the code operand is then
  // channels-last, Hz x Wz x Ccv.
  const bool by_channels;
  const int64_t Ccv;
  const int64_t gsz, rrows, rwidth, isz, wsz;
  const int64_t grad_chunk_rows;  // code rows per weight-gradient chunk: the chunk's code operand fills 16 KiB
  std::vector<int64_t> boff;      // tap column offsets in the phased layout (make_analysis_plan's)
  std::vector<int> tap_blocks;    // widths of the tap blocks a row of KW taps is split into
  int nz;                         // replay buffers per thread
  int64_t nr;                     // residual buffers per thread
  bool own_operand;               // save mode needs a code_operand buffer (code_operand copies)

  DirectBackward(const DirectSolver<T>& solver_, int64_t m_)
      : solver(solver_), p(solver_.p), g(solver_.p.g),
        synth_e(g, p.encoder_weight.template data_ptr<T>()),
        anal_d(make_analysis_plan(g, p.weight.template data_ptr<T>())), m(m_),
        Ccp((g.Cc + kWeightGradChannels - 1) / kWeightGradChannels * kWeightGradChannels),
        Wzp((g.Wz + VecOf<T>::L - 1) / VecOf<T>::L * VecOf<T>::L),
        by_channels(g.Cc >= 2 * VecOf<T>::L && 4 * (Wzp - g.Wz) > Wzp),
        Ccv((g.Cc + VecOf<T>::L - 1) / VecOf<T>::L * VecOf<T>::L),
        gsz(by_channels ? std::max(Ccp * g.Hz * Wzp, g.Hz * g.Wz * Ccv) : Ccp * g.Hz * Wzp),
        rrows(solver_.fused.padded_rows(g.Hz)), rwidth(solver_.fused.padded_width()),
        isz(g.Cs * rrows * rwidth), wsz(g.Cc * g.Cs * g.KH * g.KW),
        grad_chunk_rows(std::max<int64_t>(
            1, 16384 / int64_t((by_channels ? g.Wz * kWeightGradChannelVecs * VecOf<T>::L
                                             : kWeightGradChannels * Wzp) * sizeof(T)))) {
    const int64_t pwid = rwidth / g.SW;
    for (int64_t b = 0; b < g.KW; ++b) boff.push_back((b % g.SW) * pwid + b / g.SW);
    const int nblk = int((g.KW + kWeightGradTapsMax - 1) / kWeightGradTapsMax);
    for (int i = 0; i < nblk; ++i) tap_blocks.push_back(int(g.KW / nblk + (i < g.KW % nblk ? 1 : 0)));
    nz = m > 0 ? int(std::max<int64_t>(m - 1, 0)) : (p.it.fista ? 3 : 2);
    nr = m > 0 ? m : 1;
    own_operand = m > 0 && (by_channels || p.it.fista || Wzp != g.Wz || Ccp != g.Cc);
  }

  int64_t partials_size() const {
    return g.KH * g.KW * std::max(kWeightGradChannels, kWeightGradChannelVecs) * VecOf<T>::L;
  }

  // Code buffers are gsz long (>= csz) so that in recompute mode the code operand can use the replay buffer the
  // step leaves free.
  int64_t per_thread() const {
    return gsz * ((p.it.fista ? 2 : 1) + nz + (own_operand ? 1 : 0)) + isz * (1 + nr) + 2 * wsz + partials_size();
  }

  ItemWorkspace<T> carve(T* w) const {
    ItemWorkspace<T> t;
    t.grad = w; w += gsz;
    t.carry = p.it.fista ? w : nullptr; w += p.it.fista ? gsz : 0;
    for (int i = 0; i < nz; ++i) t.replay.push_back(w + i * gsz);
    w += nz * gsz;
    t.code_operand = own_operand ? w : nullptr;  // recompute mode: set per step
    w += own_operand ? gsz : 0;
    t.adjoint = w; w += isz;
    t.residuals = w; w += nr * isz;
    t.dw_encoder = w; w += wsz;
    t.dw_dict = w; w += wsz;
    t.partials = w;
    t.dth.assign(p.it.n * g.Cc, 0.0);
    t.vr.assign(p.it.n, 0.0);
    return t;
  }

  // dw += scale * the weight gradient of the analysis correlation for the code operand G (code_operand's layout)
  // and the phased signal I: per block of code channels and input channel, partial sums over chunks of code rows
  // (grad_chunk_rows), kernel rows and tap blocks, then into dw. Rows of whole vectors (lane-wise partials, summed
  // across lanes at the end), or by_channels (channels-last G, a lane per code channel).
  void weight_grad(const ItemWorkspace<T>& t, const T* G, T scale, const T* I, T* dw) const {
    constexpr int L = VecOf<T>::L;
    auto out = [&](int64_t c, int64_t ci, int64_t a, int64_t b) -> T& {
      return dw[((c * g.Cs + ci) * g.KH + a) * g.KW + b];
    };
    if (by_channels) {
      constexpr int CV = kWeightGradChannelVecs;
      const int64_t nv = Ccv / L;
      for (int64_t v0 = 0; v0 < nv; v0 += CV) {
        const int cv = int(std::min<int64_t>(CV, nv - v0));
        auto tile = [&](int64_t i0, int64_t rows, const T* Ia, const int64_t* bo, int nb, T* part) {
          weight_grad_channels_block<T>(cv, nb, G + i0 * g.Wz * Ccv + v0 * L, Ccv, g.Wz * Ccv, Ia, g.SH * rwidth, bo,
                                        rows, g.Wz, part);
        };
        for_weight_grad_tiles(t, I, cv * L, tile, [&](int64_t ci, int64_t a, int64_t b0, int nb, const T* part) {
          for (int tb = 0; tb < nb; ++tb)
            for (int64_t l = 0; l < cv * L && v0 * L + l < g.Cc; ++l)
              out(v0 * L + l, ci, a, b0 + tb) += scale * part[tb * cv * L + l];
        });
      }
      return;
    }
    constexpr int COB = kWeightGradChannels;
    for (int64_t cb = 0; cb < Ccp; cb += COB) {
      auto tile = [&](int64_t i0, int64_t rows, const T* Ia, const int64_t* bo, int nb, T* part) {
        weight_grad_block<T>(nb, G + (cb * g.Hz + i0) * Wzp, g.Hz * Wzp, Wzp, Ia, g.SH * rwidth, bo, rows, Wzp / L,
                             part);
      };
      for_weight_grad_tiles(t, I, COB * L, tile, [&](int64_t ci, int64_t a, int64_t b0, int nb, const T* part) {
        for (int64_t co = 0; co < COB && cb + co < g.Cc; ++co)
          for (int tb = 0; tb < nb; ++tb) out(cb + co, ci, a, b0 + tb) += scale * lane_sum(part + (co * nb + tb) * L);
      });
    }
  }

  // For each input channel: tile(i0, rows, I at (ci, kernel row a, code row i0), boff of the block, nb, partials)
  // over chunks of code rows, kernel rows and tap blocks into zeroed partials (per_tap per tap), then
  // finish(ci, a, b0, nb, partials) per kernel row and tap block.
  template <class Tile, class Finish>
  void for_weight_grad_tiles(const ItemWorkspace<T>& t, const T* I, int64_t per_tap, Tile&& tile,
                             Finish&& finish) const {
    for (int64_t ci = 0; ci < g.Cs; ++ci) {
      std::fill(t.partials, t.partials + g.KH * g.KW * per_tap, T(0));
      for (int64_t i0 = 0; i0 < g.Hz; i0 += grad_chunk_rows)
        for (int64_t a = 0; a < g.KH; ++a) {
          int64_t b0 = 0;
          for (int nb : tap_blocks) {
            tile(i0, std::min(grad_chunk_rows, g.Hz - i0), I + (ci * rrows + a + i0 * g.SH) * rwidth,
                 boff.data() + b0, nb, t.partials + (a * g.KW + b0) * per_tap);
            b0 += nb;
          }
        }
      for (int64_t a = 0; a < g.KH; ++a) {
        int64_t b0 = 0;
        for (int nb : tap_blocks) {
          finish(ci, a, b0, nb, t.partials + (a * g.KW + b0) * per_tap);
          b0 += nb;
        }
      }
    }
  }

  // The weight gradient's code operand for src (a code-sized view, see CodeRowSource): Ccp x Hz x Wzp, zero in the
  // padding (by_channels: Hz x Wz x Ccv, always a copy), to be weighed by `scale`. src's own memory where it has that
  // layout already (rows of whole vectors, whole channel blocks, no momentum term; scale = src.scale), else a copy into
  // t.code_operand (scale 1); null where src is zero (z_0 = 0), which adds nothing.
  const T* code_operand(const ItemWorkspace<T>& t, const CodeRowSource<T>& src, T& scale) const {
    if (!src.a) return nullptr;
    if (by_channels) {  // channels-last, Hz x Wz x Ccv, zero in the padded channels
      thread_local std::vector<T> row;
      row.resize(g.Wz);
      for (int64_t c = 0; c < g.Cc; ++c)
        for (int64_t i = 0; i < g.Hz; ++i) {
          src.row((c * g.Hz + i) * g.Wz, g.Wz, row.data());
          T* __restrict dst = t.code_operand + i * g.Wz * Ccv + c;
          for (int64_t j = 0; j < g.Wz; ++j) dst[j * Ccv] = row[j];
        }
      for (int64_t q = 0; q < g.Hz * g.Wz; ++q)
        std::fill(t.code_operand + q * Ccv + g.Cc, t.code_operand + (q + 1) * Ccv, T(0));
      scale = T(1);  // src.row applied it
      return t.code_operand;
    }
    if (!src.b && Wzp == g.Wz && Ccp == g.Cc) {
      scale = src.scale;
      return src.a;
    }
    for (int64_t c = 0; c < g.Cc; ++c)
      for (int64_t i = 0; i < g.Hz; ++i) {
        T* row = t.code_operand + (c * g.Hz + i) * Wzp;
        src.row((c * g.Hz + i) * g.Wz, g.Wz, row);
        std::fill(row + g.Wz, row + Wzp, T(0));
      }
    std::fill(t.code_operand + g.Cc * g.Hz * Wzp, t.code_operand + gsz, T(0));
    scale = T(1);
    return t.code_operand;
  }

  // Iteration k's active set applied to t.grad = dL/dz_{k+1} in place (it becomes gu), and dL/dth from its signs:
  // after this, z_{k+1} is no longer needed.
  void activate(ItemWorkspace<T>& t, int64_t k, const T* zk1) const {
    const int64_t hw = g.Hz * g.Wz;
    for (int64_t c = 0; c < g.Cc; ++c) t.dth[k * g.Cc + c] -= mask_row(t.grad + c * hw, zk1 + c * hw, hw, p.it.nonneg);
  }


  // The VJP of iteration k for one item: t.grad holds dL/dz_{k+1} on entry and dL/dz_k (+ FISTA carry) on exit.
  // zk, zkm1: y_k's iterates; zk1 = z_{k+1} (the active set; null: activate(t, k, z_{k+1}) already ran);
  // r = x - D y_k (phased); gx: this item's dL/dx.
  void step(ItemWorkspace<T>& t, int64_t k, const T* zk, const T* zkm1, const T* zk1, const T* r, T* gx) const {
    const T sk = p.it.step[k];
    const bool momentum = p.it.momentum(k);
    const T bk = momentum ? T(p.it.beta[k]) : T(0);
    if (!momentum) zkm1 = nullptr;
    if (zk1) activate(t, k, zk1);
    // v = E^* gu (phased), dL/dx += step v, <v, r_k> for dL/dstep (both phased: the padding is zero in each).
    {
      BandScratch<T> bb = solver.fused.bufs(g.Hz);
      int64_t hs0, nh;
      solver.fused.sig_rows(0, g.Hz, hs0, nh);  // rows no code reaches: E^* gu = 0
      std::fill(t.adjoint, t.adjoint + isz, T(0));
      solver.fused.fill_y(bb, CodeRowSource<T>{t.grad, nullptr, T(0), T(1)}, 0, hs0, nh);
      synth_e.rows(bb.y, bb.yrows * bb.ywidth, hs0, nh, [&](int64_t s, int64_t h, const T* val, int64_t cnt) {
        T* __restrict gxs = gx + (s * g.H + h) * g.W;
        for (int64_t j = 0; j < cnt; ++j) gxs[j] += sk * val[j];
        solver.fused.store_residual_row(t.adjoint, rrows, rwidth, s, h, 0, val, nullptr);
      });
    }
    t.vr[k] += dot(t.adjoint, r, isz);
    // dW_E += step corr(r_k, gu); dW_D -= step corr(v, y_k).
    T scale;
    if (const T* G = code_operand(t, CodeRowSource<T>{t.grad, nullptr, T(0), sk}, scale))
      weight_grad(t, G, scale, r, t.dw_encoder);
    if (const T* G = code_operand(t, CodeRowSource<T>{zk, zkm1, bk, -sk}, scale))
      weight_grad(t, G, scale, t.adjoint, t.dw_dict);
    // dL/dy_k = gu - step D^* v, split into dL/dz_k (t.grad) and dL/dz_{k-1} (t.carry).
    for (int64_t i = 0; i < g.Hz; ++i)
      anal_d.row(t.adjoint + i * g.SH * rwidth, rrows * rwidth, rwidth, g.Wz,
                 [&](int64_t c, int64_t j0, const T* val, int64_t cnt) {
        const int64_t off = (c * g.Hz + i) * g.Wz + j0;
        T* __restrict ga = t.grad + off;
        if (p.it.fista) {
          T* __restrict gb = t.carry + off;
          for (int64_t j = 0; j < cnt; ++j) {
            const T gy = ga[j] - sk * val[j];
            ga[j] = gb[j] + (T(1) + bk) * gy;
            gb[j] = momentum ? -bk * gy : T(0);
          }
        } else {
          for (int64_t j = 0; j < cnt; ++j) ga[j] -= sk * val[j];
        }
      });
  }
};

}  // namespace

template <typename T>
void direct_backward(const Problem<T>& p, const at::Tensor& grad_z, const StoredIterates<const T>& in, int64_t m,
                     const Gradients& grads) {
  const ConvGeometry& g = p.g;
  const DirectSolver<T> solver(p);
  const DirectBackward<T> bw(solver, m);
  const int64_t csz = g.code_item(), ssz = g.signal_item();
  // One workspace per task: parallel_for runs min(threads, B) of them (grain 1), so a small batch on many threads
  // had allocated (and zeroed) workspaces no task used (one item at 8 threads: 7.9x the memory of 1 thread).
  const int nt = static_cast<int>(std::clamp<int64_t>(g.B, 1, at::get_num_threads()));
  const int64_t per = bw.per_thread();
  at::Tensor work = at::zeros({nt, per}, p.x.options());
  std::vector<ItemWorkspace<T>> tw;
  for (int i = 0; i < nt; ++i) tw.push_back(bw.carve(work.data_ptr<T>() + i * per));
  const T* x = p.x.template data_ptr<T>();
  T* gx = grads.x.template data_ptr<T>();
  T* gz0 = grads.z0.numel() ? grads.z0.template data_ptr<T>() : nullptr;
  std::fill(gx, gx + g.B * ssz, T(0));
  const auto gzs = grad_z.strides();
  const T* gzp = grad_z.template data_ptr<T>();

  // Items are independent until the parameter gradients, which each thread sums for its items.
  at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
    ItemWorkspace<T>& t = tw[at::get_thread_num()];
    for (int64_t b = b0; b < b1; ++b) {
      const T* xb = x + b * ssz;
      T* gxb = gx + b * ssz;
      const T* z0b = p.z0_item(b);  // null: zeros
      // dL/dz_n, read through grad_z's strides (an expanded scalar is never materialised).
      for (int64_t c = 0; c < g.Cc; ++c)
        for (int64_t i = 0; i < g.Hz; ++i)
          for (int64_t j = 0; j < g.Wz; ++j)
            t.grad[(c * g.Hz + i) * g.Wz + j] = gzp[b * gzs[0] + c * gzs[1] + i * gzs[2] + j * gzs[3]];
      if (t.carry) std::fill(t.carry, t.carry + csz, T(0));
      auto iterate_at = [&](int64_t k) -> const T* { return k == 0 ? z0b : in.at(k, b); };
      if (m > 0) {
        // Segments [s, e) from the last: replay from z_s (and z_{s-1}) keeping z_{s+1}..z_{e-1} and r_s..r_{e-1}.
        const int64_t nseg = (p.it.n + m - 1) / m;
        for (int64_t sg = nseg - 1; sg >= 0; --sg) {
          const int64_t s = sg * m, e = std::min(p.it.n, s + m);
          std::vector<const T*> zs(e - s + 2);  // zs[k - s + 1] = z_k for k in [s - 1, e]
          zs[0] = s > 0 ? iterate_at(s - 1) : nullptr;
          zs[1] = iterate_at(s);
          zs[e - s + 1] = iterate_at(e);
          for (int64_t k = s; k < e; ++k) {
            // A stored z_{k+1} (always z_e; FISTA's z_{e-1} too) needs only r_k: D y_k without E; a kept r_k needs
            // neither, and the next iterate only E r_k.
            const T* stored = iterate_at(k + 1);
            T* znext = stored ? nullptr : t.replay[k - s];
            T* r = t.residuals + (k - s) * bw.isz;
            if (const T* kept = in.residual(k, b)) {
              solver.fused.load_residual(kept, r);
              if (znext) solver.shrink(k, zs[k - s + 1], zs[k - s], r, znext);
            } else {
              solver.iterate(k, xb, zs[k - s + 1], zs[k - s], znext, r);
            }
            zs[k - s + 2] = stored ? stored : znext;
          }
          for (int64_t k = e - 1; k >= s; --k)
            bw.step(t, k, zs[k - s + 1], zs[k - s], zs[k - s + 2], t.residuals + (k - s) * bw.isz, gxb);
        }
      } else {
        // Recompute mode: replay z_0..z_k for every k (O(n^2) iterations, memory independent of n). The active
        // set of iteration k-1 is applied to dL/dz_k while z_k is at hand, so no z_{k+1} is held across a replay.
        const int nrot = p.it.fista ? 3 : 2;
        auto replay = [&](int64_t upto) {
          return run_chain<T>(upto, p.it.fista, z0b, t.replay.data(), nrot, [](int64_t) { return (T*)nullptr; },
                              [&](int64_t k, const T* zk, const T* zkm1, T* dst) {
                                solver.iterate(k, xb, zk, zkm1, dst);
                              });
        };
        const T* zn = in.at(p.it.n, b);
        bw.activate(t, p.it.n - 1, zn ? zn : replay(p.it.n).first);
        for (int64_t k = p.it.n - 1; k >= 0; --k) {
          const auto [zk, zkm1] = replay(k);
          solver.iterate(k, xb, zk, zkm1, nullptr, t.residuals);  // r_k only
          // The code operand goes into a replay buffer y_k does not read.
          t.code_operand = free_buffer(t.replay.data(), nrot, zk, p.it.fista ? zkm1 : nullptr);
          bw.step(t, k, zk, zkm1, nullptr, t.residuals, gxb);
          if (k > 0) bw.activate(t, k - 1, zk);
        }
      }
      if (gz0) std::memcpy(gz0 + b * csz, t.grad, csz * sizeof(T));
    }
  });


  T* gw = grads.weight.template data_ptr<T>();
  T* gwe = grads.encoder_weight.template data_ptr<T>();  // gw itself when tied (ops.cpp): both sums add into it
  std::fill(gw, gw + bw.wsz, T(0));
  std::fill(gwe, gwe + bw.wsz, T(0));
  for (const auto& t : tw)
    for (int64_t i = 0; i < bw.wsz; ++i) gw[i] += t.dw_dict[i], gwe[i] += t.dw_encoder[i];
  std::vector<double> dth(p.it.n * g.Cc, 0.0), vr(p.it.n, 0.0);
  for (const auto& t : tw) {
    for (size_t i = 0; i < dth.size(); ++i) dth[i] += t.dth[i];
    for (size_t i = 0; i < vr.size(); ++i) vr[i] += t.vr[i];
  }
  finish_threshold_and_step_grads(p.it, dth, vr, grads);
}

template void direct_backward<float>(const Problem<float>&, const at::Tensor&, const StoredIterates<const float>&,
                                     int64_t, const Gradients&);
template void direct_backward<double>(const Problem<double>&, const at::Tensor&, const StoredIterates<const double>&,
                                      int64_t, const Gradients&);

}  // namespace conv_ista
}  // namespace dsc_kernels
