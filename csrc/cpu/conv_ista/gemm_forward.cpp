// Forward of the gemm strategy:
//
//     y_k = z_k + beta_k (z_k - z_{k-1}),   z_{k+1} = S_{step_k lam_k}(y_k + step_k E(x - D y_k)),   k = 0 .. n-1
//
// chunk by chunk of the batch (gemm_chunk_items), all n iterations of a chunk before the next, so the working set is
// one chunk's (its x and z0 in the chunk's layout, gemm_iteration.h; nbuf rotating codes, a residual, FISTA's y, and
// the two ATen outputs) and stays in cache for small maps. D and E are ATen convolutions, parallel inside (matrix
// products when the kernel covers the map); residual and threshold are the fused passes of gemm_iteration.h.
// Saves: z_n into out.z and the checkpoints (problem.h) into out.saved, each converted to channels-first as it is
// produced (a chunk's items are contiguous in both); kept residuals are formed in place (they are channels-last, the
// chunk's layout). An absent z0 is read as zeros, never stored.
#include <ATen/ATen.h>

#include "gemm_iteration.h"
#include "strategies.h"

namespace dsc_kernels {
namespace conv_ista {

template <typename T>
void gemm_forward(const Problem<T>& p, const StoredIterates<T>& out) {
  const ConvGeometry& g = p.g;
  const GemmSolver<T> solver(p, out.ck, Pass::forward);
  const int64_t csz = g.code_item(), ssz = g.signal_item(), chunk = solver.chunk;
  const int nbuf = p.it.fista ? 3 : 2;
  // nbuf rotating codes, FISTA's y, z0 and x in the chunk's layout, one residual: one chunk's worth, reused by every
  // chunk.
  const bool has_z0 = p.z0.numel() > 0;
  const int64_t ncodes = nbuf + (p.it.fista ? 1 : 0) + (has_z0 ? 1 : 0);
  at::Tensor work = at::empty({ncodes * chunk * csz + 2 * chunk * ssz}, p.x.options());
  T* w = work.data_ptr<T>();
  T* bufs[3] = {w, w + chunk * csz, p.it.fista ? w + 2 * chunk * csz : nullptr};
  w += nbuf * chunk * csz;
  T* ybuf = p.it.fista ? w : nullptr;
  w += p.it.fista ? chunk * csz : 0;
  T* z0 = has_z0 ? w : nullptr;
  w += has_z0 ? chunk * csz : 0;
  T* xc = w;
  T* rbuf = w + chunk * ssz;
  const T* x = p.x.template data_ptr<T>();
  solver.for_chunks([&](int64_t b0, int64_t items) {
    solver.signal_in(x + b0 * ssz, xc, items);
    if (z0) solver.code_in(p.z0_item(b0), z0, items);
    run_chain<T>(p.it.n, p.it.fista, z0, bufs, nbuf, [](int64_t) { return (T*)nullptr; },
                 [&](int64_t k, const T* zk, const T* zkm1, T* dst) {
                   // A kept residual is formed in place when it is in the chunk's layout.
                   T* kept = out.residual(k, b0);
                   T* r = kept && solver.channels_last ? kept : rbuf;
                   solver.iterate(k, xc, zk, zkm1, dst, r, ybuf, items);
                   if (kept) solver.keep_residual(r, kept, items);
                   if (T* stored = out.at(k + 1, b0)) solver.code_out(dst, stored, items);
                 });
  });
}

template void gemm_forward<float>(const Problem<float>&, const StoredIterates<float>&);
template void gemm_forward<double>(const Problem<double>&, const StoredIterates<double>&);

}  // namespace conv_ista
}  // namespace dsc_kernels
