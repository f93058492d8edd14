// Backward of the gemm strategy: the exact VJP of the forward (problem.h), chunk by chunk of the batch.
//
// With g = dL/dz_{k+1}, gu = g * [z_{k+1} != 0], r_k = x - D y_k, v = E^* gu = conv_transpose(gu, W_E):
//     dL/dx     += step_k v
//     dL/dy_k    = gu - step_k D^* v                           (D^* = conv2d(., W_D))
//     dL/dW_E   += step_k conv_weight_grad(input=r_k, grad_out=gu)
//     dL/dW_D   -= step_k conv_weight_grad(input=v,   grad_out=y_k)
//     dL/dth_c   = -sum gu sign(z_{k+1})  (nonneg: -sum gu);  dL/dlam_k = step_k dL/dth
//     dL/dstep_k = <gu, E r_k> + <lam_k, dL/dth> = <v, r_k> + <lam_k, dL/dth>
//     FISTA: dL/dz_k += (1 + beta_k) dL/dy_k,  dL/dz_{k-1} -= beta_k dL/dy_k
// Each chunk is swept backwards on its own in chunk-sized buffers (nothing batch-sized but the outputs), as the
// direct strategy does per item: save mode replays each segment [s, s + m) from its checkpoint keeping the segment's
// iterates and residuals r_k (kept residuals, problem.h, are read instead: the replay then only applies E for the
// iterates not stored); recompute mode replays z_0..z_k for every k (O(n^2 / 2) extra iterations, memory
// independent of n). Convolutions and weight gradients are ATen calls (gemm_iteration.h), everything else fused
// passes; the weight gradients of all chunks and iterations accumulate into two weight-sized sums. A chunk works in
// its own layout (channels-last, gemm_iteration.h): dL/dz_n, x and z0 are converted in and dL/dx, dL/dz_0 out once
// per chunk, a stored iterate each time a segment reads it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gemm_iteration.h"
#include "strategies.h"

namespace dsc_kernels {
namespace conv_ista {
namespace {

// The chunk-sized buffers of the backward (in the chunk's layout), carved from one tensor so allocator statistics and
// profilers see them.
template <typename T>
struct ChunkWorkspace {
  at::Tensor storage;
  T *grad, *carry;         // dL/dz_{k+1} (ends as dL/dz_0) and FISTA's carry into dL/dz_k (FISTA only)
  T* ybuf;                 // FISTA's y_k
  T* z0;                   // the chunk's z0 (null: zeros)
  std::vector<T*> replay;  // replayed iterates (save mode: a segment's interior; recompute: the rotating ones)
  std::vector<T*> stored;  // stored iterates read back (save mode: a segment's z_s and FISTA's z_{s-1}, z_{e-1})
  T *x, *gx;               // the chunk's x (null with kept residuals: nothing recomputes r_k) and dL/dx
  T* residuals;            // r_k (save mode: a segment's m; recompute: 1)
};

template <typename T>
struct GemmBackward {
  const GemmSolver<T>& solver;
  const Problem<T>& p;
  const ConvGeometry& g;
  const int64_t m;                    // checkpoint interval; 0 = recompute mode
  const bool kept_residuals;          // the forward kept r_k (problem.h): no D y_k is recomputed
  const bool in_place_residuals;      // ... in the chunk's layout, so steps read them where they are
  const int64_t ccs, scs;             // one chunk's code and signal sizes
  // Weight-gradient sums: copies in the chunk's layout (sum_buffer), or the op's own channels-first gradients.
  at::Tensor dw_dict, dw_encoder;  // one tensor when the op's gradients are (tied, ops.cpp)
  std::vector<std::vector<double>> dth, vr;  // [thread]: (n, Cc) and (n,) partial sums

  GemmBackward(const GemmSolver<T>& solver_, int64_t m_, bool kept_residuals_, const Gradients& grads)
      : solver(solver_), p(solver_.p), g(solver_.g), m(m_), kept_residuals(kept_residuals_),
        in_place_residuals(kept_residuals_ && solver_.channels_last), ccs(solver_.chunk * g.code_item()),
        scs(solver_.chunk * g.signal_item()), dw_dict(sum_buffer(solver_, grads.weight)),
        dw_encoder(grads.encoder_weight.is_same(grads.weight) ? dw_dict : sum_buffer(solver_, grads.encoder_weight)),
        dth(at::get_num_threads(), std::vector<double>(p.it.n * g.Cc, 0.0)),
        vr(at::get_num_threads(), std::vector<double>(p.it.n, 0.0)) {}

  // Channels-last sums match the ATen weight gradients' layout (no strided add per call); where a weight is larger
  // than a chunk's code (256 -> 256 channels on 8 x 8: two such copies took the training step from 1.04x to 1.22x
  // eager's peak) the op's channels-first gradients are the sums, for a few % of speed.
  static at::Tensor sum_buffer(const GemmSolver<T>& solver, const at::Tensor& grad) {
    const bool small = grad.numel() <= solver.chunk * solver.g.code_item();
    return solver.channels_last && small ? at::zeros_like(grad, at::MemoryFormat::ChannelsLast) : grad.zero_();
  }

  ChunkWorkspace<T> workspace() const {
    const int nz = m > 0 ? int(std::max<int64_t>(m - 1, 0)) : (p.it.fista ? 3 : 2);
    const int ns = m > 0 && p.it.fista ? 3 : 1;
    const int64_t nr = in_place_residuals ? 0 : m > 0 ? m : 1;
    const bool has_z0 = p.z0.numel() > 0;
    const int ncodes = 1 + (p.it.fista ? 2 : 0) + (has_z0 ? 1 : 0) + nz + ns;
    ChunkWorkspace<T> t;
    const int nx = kept_residuals ? 0 : 1;
    t.storage = at::empty({ncodes * ccs + (nr + nx + 1) * scs}, p.x.options());
    T* w = t.storage.template data_ptr<T>();
    t.grad = w, w += ccs;
    t.carry = p.it.fista ? w : nullptr, w += p.it.fista ? ccs : 0;
    t.ybuf = p.it.fista ? w : nullptr, w += p.it.fista ? ccs : 0;
    t.z0 = has_z0 ? w : nullptr, w += has_z0 ? ccs : 0;
    for (int i = 0; i < nz; ++i) t.replay.push_back(w), w += ccs;
    for (int i = 0; i < ns; ++i) t.stored.push_back(w), w += ccs;
    t.x = nx ? w : nullptr, w += nx * scs;
    t.gx = w, w += scs;
    t.residuals = w;
    return t;
  }

  // Collects -sum gu sign(z) per channel of iteration k into dth: f(pixel, sums) applies the mask to a pixel and adds
  // its terms to sums[c]; partial sums stay in T over at most kFlush pixels before they are added in double.
  template <class F>
  void masked_pixels(int64_t items, int64_t k, F&& f) {
    constexpr int64_t kFlush = 256;
    solver.for_code_pixels(items, [&](int64_t p0, int64_t p1) {
      std::vector<T> sums(g.Cc);
      double* d = dth[at::get_thread_num()].data() + k * g.Cc;
      for (int64_t q0 = p0; q0 < p1; q0 += kFlush) {
        std::fill(sums.begin(), sums.end(), T(0));
        for (int64_t q = q0; q < std::min(p1, q0 + kFlush); ++q) f(q, sums.data());
        for (int64_t c = 0; c < g.Cc; ++c) d[c] -= double(sums[c]);
      }
    });
  }

  // Iteration k's active set applied to t.grad = dL/dz_{k+1} in place (it becomes gu), and dL/dth from its signs:
  // after this, z_{k+1} is no longer needed.
  void activate(ChunkWorkspace<T>& t, int64_t k, const T* zk1, int64_t items) {
    const int64_t cc = g.Cc;
    masked_pixels(items, k, [&](int64_t q, T* sums) {
      mask_pixel(t.grad + q * cc, zk1 + q * cc, cc, p.it.nonneg, sums);
    });
  }

  // The VJP of iteration k for a chunk: t.grad holds gu_k (activate ran) on entry and dL/dz_k (+ FISTA carry) on
  // exit, with iteration k-1's active set already applied when zk_mask (z_k) is given (activate fused into the last
  // pass). zk, zkm1: y_k's iterates (zk null: zeros); r = x - D y_k.
  void step(ChunkWorkspace<T>& t, int64_t k, const T* zk, const T* zkm1, const T* r, int64_t items,
            const T* zk_mask) {
    const T sk = p.it.step[k];
    const bool momentum = p.it.momentum(k);
    const T bk = momentum ? T(p.it.beta[k]) : T(0);
    const at::Tensor gu = solver.code(t.grad, items);
    const at::Tensor v = solver.synthesis(gu, solver.encoder_weight);
    const T* vp = v.data_ptr<T>();
    const int64_t sn = items * g.signal_item();
    at::parallel_for(0, sn, 16384, [&](int64_t i0, int64_t i1) {
      vr[at::get_thread_num()][k] += axpy_dot(t.gx + i0, vp + i0, r + i0, sk, i1 - i0);
    });
    solver.add_weight_grad(dw_encoder, solver.signal(r, items), gu, solver.encoder_weight, double(sk));
    const T* y = solver.momentum_point(k, zk, zkm1, t.ybuf, items);
    if (y) solver.add_weight_grad(dw_dict, v, solver.code(y, items), solver.weight, -double(sk));
    const at::Tensor dv = solver.analysis(v, solver.weight);
    const T* dvp = dv.data_ptr<T>();
    const int64_t cc = g.Cc;
    const bool fista = p.it.fista;
    auto chain = [&](int64_t q) {  // dL/dy_k = gu - step D^* v, split by FISTA's momentum
      T* __restrict ga = t.grad + q * cc;
      const T* __restrict d = dvp + q * cc;
      if (fista) {
        T* __restrict gb = t.carry + q * cc;
        for (int64_t i = 0; i < cc; ++i) {
          const T gy = ga[i] - sk * d[i];
          ga[i] = gb[i] + (T(1) + bk) * gy;
          gb[i] = momentum ? -bk * gy : T(0);
        }
      } else {
        for (int64_t i = 0; i < cc; ++i) ga[i] -= sk * d[i];
      }
    };
    if (zk_mask) {
      masked_pixels(items, k - 1, [&](int64_t q, T* sums) {
        chain(q);
        mask_pixel(t.grad + q * cc, zk_mask + q * cc, cc, p.it.nonneg, sums);
      });
    } else {
      solver.for_code_pixels(items, [&](int64_t p0, int64_t p1) {
        for (int64_t q = p0; q < p1; ++q) chain(q);
      });
    }
  }

  void chunk(ChunkWorkspace<T>& t, const at::Tensor& grad_z, const StoredIterates<const T>& in,
             int64_t b0, int64_t items, const T* x, T* gx, T* gz0) {
    const int64_t csz = g.code_item(), ssz = g.signal_item();
    const int64_t n = p.it.n;
    // dL/dz_n, read through grad_z's strides (an expanded scalar is never materialised).
    solver.code(t.grad, items).copy_(grad_z.narrow(0, b0, items));
    if (t.carry) std::fill(t.carry, t.carry + items * csz, T(0));
    std::fill(t.gx, t.gx + items * ssz, T(0));
    if (t.x) solver.signal_in(x, t.x, items);
    if (t.z0) solver.code_in(p.z0_item(b0), t.z0, items);
    // z_k in the chunk's layout: z0, or a stored iterate converted into buffer `slot` of t.stored.
    auto load = [&](int64_t k, int slot) -> const T* {
      if (k == 0) return t.z0;
      solver.code_in(in.at(k, b0), t.stored[slot], items);
      return t.stored[slot];
    };
    if (m > 0) {
      activate(t, n - 1, load(n, 0), items);  // later iterations' steps activate the others
      // Segments [s, e) from the last: replay from z_s (and z_{s-1}) keeping z_{s+1}..z_{e-1} and r_s..r_{e-1}.
      const int64_t nseg = (n + m - 1) / m;
      for (int64_t sg = nseg - 1; sg >= 0; --sg) {
        const int64_t s = sg * m, e = std::min(n, s + m);
        std::vector<const T*> zs(e - s + 1);  // zs[k - s + 1] = z_k for k in [s - 1, e - 1]
        std::vector<const T*> rs(e - s);      // rs[k - s] = r_k
        zs[0] = s > 0 && p.it.fista ? load(s - 1, 1) : nullptr;
        zs[1] = load(s, 0);
        for (int64_t k = s; k < e; ++k) {
          // A stored z_{k+1} (always z_e; FISTA's z_{e-1} too) needs only r_k: D y_k without E; a kept r_k needs
          // neither, and the next iterate only E r_k.
          const bool stored = in.at(k + 1, b0) != nullptr;
          T* znext = stored ? nullptr : t.replay[k - s];
          if (kept_residuals) {
            rs[k - s] = solver.kept_residual(in.residual(k, b0),
                                             in_place_residuals ? nullptr : t.residuals + (k - s) * scs, items);
            if (znext)
              solver.shrink(k, solver.momentum_point(k, zs[k - s + 1], zs[k - s], t.ybuf, items), rs[k - s], znext,
                            items);
          } else {
            solver.iterate(k, t.x, zs[k - s + 1], zs[k - s], znext, t.residuals + (k - s) * scs, t.ybuf, items);
            rs[k - s] = t.residuals + (k - s) * scs;
          }
          if (k + 1 < e) zs[k - s + 2] = stored ? load(k + 1, 2) : znext;
        }
        for (int64_t k = e - 1; k >= s; --k) {
          const T* zk = zs[k - s + 1];
          step(t, k, zk, zs[k - s], rs[k - s], items, k > 0 ? zk : nullptr);
        }
      }
    } else {
      // Recompute mode: replay z_0..z_k for every k. The active set of iteration k-1 is applied to dL/dz_k while z_k
      // is at hand, so no z_{k+1} is held across a replay.
      const int nrot = p.it.fista ? 3 : 2;
      auto replay = [&](int64_t upto) {
        return run_chain<T>(upto, p.it.fista, t.z0, t.replay.data(), nrot, [](int64_t) { return (T*)nullptr; },
                            [&](int64_t k, const T* zk, const T* zkm1, T* dst) {
                              solver.iterate(k, t.x, zk, zkm1, dst, t.residuals, t.ybuf, items);
                            });
      };
      activate(t, n - 1, in.at(n, b0) ? load(n, 0) : replay(n).first, items);
      for (int64_t k = n - 1; k >= 0; --k) {
        const auto [zk, zkm1] = replay(k);
        solver.iterate(k, t.x, zk, zkm1, nullptr, t.residuals, t.ybuf, items);  // r_k only
        step(t, k, zk, zkm1, t.residuals, items, k > 0 ? zk : nullptr);
      }
    }
    solver.signal_out(t.gx, gx, items);
    if (gz0) solver.code_out(t.grad, gz0, items);
  }
};

}  // namespace

template <typename T>
void gemm_backward(const Problem<T>& p, const at::Tensor& grad_z, const StoredIterates<const T>& in, int64_t m,
                   const Gradients& grads) {
  const ConvGeometry& g = p.g;
  const GemmSolver<T> solver(p, in.ck, Pass::backward);
  GemmBackward<T> bw(solver, m, in.ck.residuals, grads);
  ChunkWorkspace<T> t = bw.workspace();
  const T* x = p.x.template data_ptr<T>();
  T* gx = grads.x.template data_ptr<T>();
  T* gz0 = grads.z0.numel() ? grads.z0.template data_ptr<T>() : nullptr;
  const int64_t csz = g.code_item(), ssz = g.signal_item();
  solver.for_chunks([&](int64_t b0, int64_t items) {
    bw.chunk(t, grad_z, in, b0, items, x + b0 * ssz, gx + b0 * ssz, gz0 ? gz0 + b0 * csz : nullptr);
  });
  if (!bw.dw_dict.is_same(grads.weight)) grads.weight.copy_(bw.dw_dict);  // into the op's channels-first gradients
  if (!grads.encoder_weight.is_same(grads.weight) && !bw.dw_encoder.is_same(grads.encoder_weight))
    grads.encoder_weight.copy_(bw.dw_encoder);
  std::vector<double> dth(p.it.n * g.Cc, 0.0), vr(p.it.n, 0.0);
  for (size_t i = 0; i < bw.dth.size(); ++i) {
    for (size_t j = 0; j < dth.size(); ++j) dth[j] += bw.dth[i][j];
    for (size_t j = 0; j < vr.size(); ++j) vr[j] += bw.vr[i][j];
  }
  finish_threshold_and_step_grads(p.it, dth, vr, grads);
}

template void gemm_backward<float>(const Problem<float>&, const at::Tensor&, const StoredIterates<const float>&,
                                   int64_t, const Gradients&);
template void gemm_backward<double>(const Problem<double>&, const at::Tensor&, const StoredIterates<const double>&,
                                    int64_t, const Gradients&);

}  // namespace conv_ista
}  // namespace dsc_kernels
