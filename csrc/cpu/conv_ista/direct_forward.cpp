// Forward of the direct strategy:
//
//     y_k = z_k + beta_k (z_k - z_{k-1}),   z_{k+1} = S_{step_k lam_k}(y_k + step_k E(x - D y_k)),   k = 0 .. n-1
//
// each iteration one fused pass (direct_iteration.h). With at least as many batch items as threads, a thread runs all
// iterations of its items in item-sized buffers (nothing batch-sized besides z and the checkpoints); otherwise every
// iteration is one parallel pass over (item, band of code rows) with batch-sized rotating buffers.
// Saves: z_n into out.z and the checkpoints (problem.h) into out.saved, kept residuals copied out of the band
// buffers each band forms them in (each band its own signal rows); an absent z0 is read as zeros, never stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "direct_iteration.h"
#include "strategies.h"

namespace dsc_kernels {
namespace conv_ista {

template <typename T>
void direct_forward(const Problem<T>& p, const StoredIterates<T>& out) {
  const ConvGeometry& g = p.g;
  const DirectSolver<T> solver(p);
  const T* x = p.x.template data_ptr<T>();
  const int64_t csz = g.code_item(), ssz = g.signal_item();
  const int nt = at::get_num_threads();
  const int nbuf = p.it.fista ? 3 : 2;
  if (g.B >= nt) {
    // Per thread: nbuf rotating item codes.
    at::Tensor work = at::empty({nt, nbuf, csz}, p.x.options());
    at::parallel_for(0, g.B, 1, [&](int64_t b0, int64_t b1) {
      T* w = work.data_ptr<T>() + at::get_thread_num() * nbuf * csz;
      T* bufs[3] = {w, w + csz, p.it.fista ? w + 2 * csz : nullptr};
      for (int64_t b = b0; b < b1; ++b)
        run_chain<T>(p.it.n, p.it.fista, p.z0_item(b), bufs, nbuf, [&](int64_t k) { return out.at(k, b); },
                     [&](int64_t k, const T* zk, const T* zkm1, T* dst) {
                       solver.iterate(k, x + b * ssz, zk, zkm1, dst, nullptr, out.residual(k, b));
                     });
    });
    return;
  }
  // The whole batch as one item of B times the size, each iteration parallel over (item, band).
  const int64_t bsz = g.B * csz;
  const StoredIterates<T> batch{out.ck, out.z, out.saved, 1, bsz, out.residuals, g.B * ssz};
  at::Tensor work = at::empty({nbuf, bsz}, p.x.options());
  T* w = work.data_ptr<T>();
  T* bufs[3] = {w, w + bsz, p.it.fista ? w + 2 * bsz : nullptr};
  run_chain<T>(p.it.n, p.it.fista, p.z0_item(0), bufs, nbuf, [&](int64_t k) { return batch.at(k, 0); },
               [&](int64_t k, const T* zk, const T* zkm1, T* dst) {
                 solver.iterate_batch(k, x, zk, zkm1, dst, batch.residual(k, 0));
               });
}

template void direct_forward<float>(const Problem<float>&, const StoredIterates<float>&);
template void direct_forward<double>(const Problem<double>&, const StoredIterates<double>&);

}  // namespace conv_ista
}  // namespace dsc_kernels
