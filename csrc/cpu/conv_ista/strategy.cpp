// Which strategy runs a shape (choose_strategy), and how the gemm strategy splits the batch (gemm_chunk_items).
//
// Where the time goes (profiled on the 2-core AMD EPYC Zen 4 development machine, 1 thread, thread CPU time and
// oneDNN's own per-primitive timings via ONEDNN_VERBOSE, since wall clock was too noisy there):
// - Many channels (32 -> 32 channels, 8 x 8 maps, batch 64, 3 x 3, 10 iterations): the convolutions are ~80% of both
//   eager and gemm. oneDNN runs the forward convolution at ~0.28 ms per 32 items, the transposed one alike and the
//   weight gradient at ~0.32 ms; eager's fused data+weight backward calls cost about as much as our separate ones.
//   So the gemm strategy wins the forward (fewer elementwise passes: 1.2-1.35x) but its backward does 7.5
//   convolution-sized operations per iteration in save mode (2 forward, 1.5 replayed, 4 VJP) to eager's 6 (eager
//   keeps the residuals we replay), which the saved elementwise work only partly pays back: forward + backward
//   0.83-1.2x eager on the sweep's GEMM-bound shapes, lower the more conv-bound (Cs K^2 Cc / (Cs + Cc) above ~170).
// - The direct strategy's micro-kernels reach ~40% of peak on many channels (a 32 -> 32 iteration: 3.7 ms vs
//   oneDNN's 1.3 ms) and its per-item weight-gradient kernel is slower still, so it loses there (0.3x forward +
//   backward); with 1-3 signal channels on large maps oneDNN's transposed convolution to few channels is the slow
//   one (12x its forward convolution at 1 channel) and the direct strategy wins 1.5-5x.
// - Elementwise passes written as plain loops inside at::parallel_for lambdas stayed scalar (GCC did not vectorise
//   their reductions): 4x slower than elementwise.h's hand-vectorised ones, a third of the gemm backward before.
//
// choose_strategy, calibrated on the shape sweep (dsc_kernels/experiments/sweep.py; forward + backward first,
// forward second):
// - gemm when the kernel covers the whole unpadded map (a matrix product; the direct tiles waste 15 of 16 lanes on
//   a 1 x 1 code: 2-2.6x eager against the direct strategy's 0.1-0.25x);
// - direct for 1-D problems (H = 1): oneDNN's one-row convolutions lag, the direct tiles stream rows (1-5x);
// - gemm for >= 32 signal channels, or >= 8 on code maps under 16 x 16;
// - direct otherwise: few signal channels, or 8-31 on larger maps.
// It depends on the geometry alone (not on grad mode or n_iter), so both passes of one call run the same strategy
// and replay exactly the iterates the forward saved. DSC_KERNELS_CPP_STRATEGY=direct|gemm forces one (benchmarks).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "gemm_iteration.h"
#include "strategies.h"

namespace dsc_kernels {
namespace conv_ista {

const char* strategy_name(Strategy s) { return s == Strategy::gemm ? "gemm" : "direct"; }

Strategy choose_strategy(const ConvGeometry& g, Pass pass) {
  if (const char* env = std::getenv("DSC_KERNELS_CPP_STRATEGY")) {
    std::string v(env);
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
    if (v == "direct") return Strategy::direct;
    if (v == "gemm") return Strategy::gemm;
    TORCH_CHECK(v.empty() || v == "auto", "DSC_KERNELS_CPP_STRATEGY must be direct, gemm or auto (or unset), got '",
                env, "'");
  }
  if (g.kernel_covers_map()) return Strategy::gemm;
  if (g.Cs >= 32) return Strategy::gemm;
  if (g.H == 1) return Strategy::direct;
  const int64_t code_map = g.Hz * g.Wz;
  if (pass == Pass::forward) return g.Cs >= 8 && code_map < 256 ? Strategy::gemm : Strategy::direct;
  if (code_map < 256 || (g.Cs >= 8 && code_map <= 256)) return Strategy::gemm;
  return Strategy::direct;
}

int64_t gemm_chunk_items(const ConvGeometry& g, int64_t n_iter, bool fista, int64_t checkpoint, Pass pass) {
  const int64_t cols = std::max<int64_t>(1, g.Hz * g.Wz);
  const double c = double(g.code_item()), s = double(g.signal_item());
  // Workspace per chunk item, plus the two ATen outputs alive at once (a code and a signal). Forward: the rotating
  // codes, FISTA's y, z0, x and the residual. Backward: dL/dz, FISTA's carry and y, z0, the replay buffers, the
  // stored iterates read back, the residuals, x and dL/dx.
  const int64_t rotating = fista ? 3 : 2;
  const int64_t replay = checkpoint > 0 ? checkpoint - 1 : rotating;
  const int64_t stored = checkpoint > 0 && fista ? 3 : 1;
  const int64_t residuals = checkpoint > 0 ? checkpoint : 1;
  const double per_item = pass == Pass::forward
                              ? c * (rotating + (fista ? 1 : 0) + 2) + s * 3
                              : c * (3 + (fista ? 2 : 0) + replay + stored) + s * (residuals + 3);
  // Budget. Save mode: 0.4 of what eager autograd keeps, about two codes and a residual per iteration and item
  // (measured on the sweep), so that with the checkpoints the training step stays around half of eager's and the
  // chunks reach the column count below on small maps (a quarter of eager cost 10-25% of forward + backward speed on
  // the many-channel shapes). Recompute mode (checkpoint 0): 0.2 n B max(c, s), the memory-lean mode's tenth of
  // eager. Without a backward (checkpoint -1) the column count alone decides: at most 4096 columns of workspace.
  const double budget = checkpoint > 0 ? 0.4 * double(n_iter) * double(g.B) * (2 * c + s)
                                       : 0.2 * double(n_iter) * double(g.B) * std::max(c, s);
  const int64_t by_memory =
      checkpoint < 0 ? g.B : std::max<int64_t>(1, int64_t(budget / std::max(1.0, per_item)));
  const int64_t by_speed = (4096 + cols - 1) / cols;  // columns for the convolutions to run at GEMM speed
  int64_t items = std::max<int64_t>(1, std::min({g.B, by_memory, by_speed}));
  const int64_t chunks = (g.B + items - 1) / items;
  return (g.B + chunks - 1) / chunks;
}

}  // namespace conv_ista
}  // namespace dsc_kernels
