// Which strategy runs a shape (choose_strategy), and how the gemm strategy splits the batch (gemm_chunk_items).
//
// Where the time goes (profiled on the 2-core AMD EPYC Zen 4 development machine: perf, torch.profiler, oneDNN's own
// per-primitive timings via ONEDNN_VERBOSE; wall clock alone was too noisy there):
// - Many channels: the convolutions are ~80% of both eager and gemm. oneDNN reorders channels-first tensors into its
//   blocked layout and back on every call; on channels-last tensors it does not, and a convolution ran 1.2-3x faster
//   (64 -> 64 channels on 8 x 8 maps: 0.8 ms vs 2.2 ms), so the gemm strategy works channels-last. Its backward did
//   7.5 convolution-sized operations per iteration in save mode (2 forward, 1.5 replayed, 4 VJP) to eager's 6 (eager
//   keeps the residuals we replayed): forward + backward 0.93-1.26x eager on the sweep's GEMM-bound shapes. With the
//   residuals kept (problem.h; ops/cpu_cost.py decides per shape) the replay is 0.5 (E for the iterates not saved):
//   profiled on 32 -> 64 channels on 8 x 8 with FISTA, the replay had been 9 of 51 backward convolutions per chunk;
//   keeping residuals took forward + backward 9-18% faster on the many-channel shapes (1.03-1.45x eager) for 0.1-0.24
//   of eager's memory. The chunk size matters: chunks budgeted at a quarter of eager's memory instead of 0.4 cost
//   10-25% there (oneDNN wants ~4096 columns per call).
// - The direct strategy's micro-kernels lose to oneDNN on many channels (its backward 0.2-0.3x eager there); with
//   1-3 signal channels on large maps oneDNN's transposed convolution to few channels is the slow one (12x its
//   forward convolution at 1 channel) and the direct strategy wins 1.5-5x. On CSCNet's layer (1 -> 175 channels,
//   11 x 11, stride 8) perf put a third of the backward in the synthesis tile: per column phase it re-read every code
//   row 8 times, load-bound; tiling the 8 column phases together (direct_iteration.h) took the backward from 700 to
//   500 ms and the forward from 255 to 160 ms (batch 64, 147 x 147). The weight-gradient tiles were next (~22% of
//   its training step on the Intel Xeon: code rows padded to whole vectors wasted 15 of 32 lanes on its 17-wide code,
//   and every load straddled cache lines); vectorised along code channels instead (direct_backward.cpp) they took
//   the layer's forward + backward from 2.8x to 3.8-4.0x eager and CSCNet's training step from 1.66x to 1.95x.
// - One signal channel (csc-gray, 1 -> 32, 64 x 64, 7 x 7; perf on the 2-core Intel Xeon): the one-channel synthesis
//   tile ran at about a third of the analysis tile's multiply-add rate (a broadcast and 4 loads per 4 FMAs, the loads
//   split across cache lines) and the weight-gradient tiles at about half (a 64 KiB code operand streamed from L2).
//   Blocks of 4 output rows sharing each load (simd_tiles.h), L1-sized row chunks for the weight gradients and no
//   copies of the code operands took forward 5.0x -> 5.9x and forward + backward 3.2x -> 4.1x eager (interleaved
//   against the previous commit). What is left of its training step: synthesis tile ~20%, analysis tile ~14%,
//   weight-gradient tiles ~21%, the elementwise passes over item-sized code buffers (fills, threshold epilogues,
//   the gradient update; 512 KiB per code, so L2-bound) ~20%, OpenMP waits ~4%, Python ~5%.
// - Elementwise passes written as plain loops inside at::parallel_for lambdas stayed scalar (GCC did not vectorise
//   their reductions): 4x slower than elementwise.h's hand-vectorised ones, a third of the gemm backward before.
//
// choose_strategy, per pass (the checkpoints are the same for both strategies, so a direct forward feeds a gemm
// backward), calibrated on the shape sweep (dsc_kernels/experiments/sweep.py, each strategy forced in both passes):
// - gemm when the kernel covers the whole unpadded map (a matrix product; the direct tiles waste 15 of 16 lanes on
//   a 1 x 1 code: 2-3x eager against the direct strategy's 0.02-0.15x), and when the padding reaches the kernel's
//   size (code positions whose atoms lie wholly in the padding: no work, but the direct buffers grow with it);
// - gemm for >= 32 signal channels, 1-D included (1-D 64 -> 64: forward + backward 1.3x against direct's 0.55x);
// - gemm for >= 16 signal channels when one convolution takes >= 16384 multiply-adds per code position, and in the
//   backward for >= 8 signal channels from 4096 (shapes off the sweep, timed against each other on the AMD EPYC:
//   16 -> 48 on 24 x 24 with 5 x 5 atoms, forward + backward 0.97x eager on gemm against 0.62x on direct, forward
//   1.31x against 0.91x; 1-D 16 -> 64, k 7: 1.71x against 1.01x, its forward still best direct, 2.3x against 2.1x;
//   below those sizes direct stays ahead: 16 -> 16 on 64 x 64, k 3: 1.20x against 0.82x);
// - direct for other 1-D problems (oneDNN's one-row convolutions lag: 1.2-1.5x against direct's 2.3-5.5x);
// - forward: gemm for >= 8 signal channels on code maps under 16 x 16, else direct (one signal channel on 8 x 8:
//   direct 1.9x, gemm 1.0x);
// - backward: gemm on code maps under 16 x 16, or up to 16 x 16 with >= 8 signal and >= 16 code channels (1 -> 32
//   on 8 x 8: 1.35x against 1.24x; 3 -> 96 at stride 3: 1.2x against 0.86x; 8 -> 8 on 16 x 16, batch 128: direct
//   1.32x against 0.95x with a gemm backward), else direct (3 -> 32 on 16 x 16: 1.5x against 1.1x).
// DSC_KERNELS_CPP_STRATEGY=direct|gemm forces one for both passes (benchmarks).
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
  // The direct strategy's buffers and polyphase loops grow with the padded map and the stride, work included or not:
  // with 10^6 padding on a 9 x 9 map it ran for minutes where ATen's convolutions take a second.
  if (g.PH >= g.KH || g.PW >= g.KW) return Strategy::gemm;
  if (g.Cs >= 32) return Strategy::gemm;
  const int64_t macs = g.Cs * g.Cc * g.KH * g.KW;  // one convolution's multiply-adds per code position
  if (g.Cs >= 16 && macs >= 16384) return Strategy::gemm;
  if (pass == Pass::backward && g.Cs >= 8 && macs >= 4096) return Strategy::gemm;
  if (g.H == 1) return Strategy::direct;
  const int64_t code_map = g.Hz * g.Wz;
  if (pass == Pass::forward) return g.Cs >= 8 && code_map < 256 ? Strategy::gemm : Strategy::direct;
  if (code_map < 256 || (g.Cs >= 8 && g.Cc >= 16 && code_map <= 256)) return Strategy::gemm;
  return Strategy::direct;
}

// The direct strategy's polyphase synthesis (direct_iteration.h) runs the column phases of a stride as one
// correlation over the union of their windows, where the taps outside a phase's own window weigh zero: a code that
// is inf or NaN then makes NaN (0 * inf, 0 * NaN) in signal columns its phase never reaches, and the NaN region grew
// by a column per side and iteration beyond torch.nn.functional's. Such calls, rare and never timed, take the gemm
// strategy, whose ATen convolutions spread NaN exactly as torch.nn.functional does; finite inputs pay one pass over
// them, and only when the column stride exceeds 1. A non-finite dictionary tap also reaches the direct strategy's
// zero taps, and torch.nn.functional spreads it from zero codes too (0 * NaN): those calls take gemm at every
// stride, whose first iteration then convolves the zero code instead of skipping it (gemm_iteration.h). The
// dictionaries are small: checking them costs microseconds. Two more cases are caught after the fact, in ops.cpp:
// finite inputs whose iterates overflow inside the solve meet the same zero taps (a column-strided direct forward
// whose z_n is not finite runs again on gemm), and at stride 1 a non-finite x, z0 or grad_z reached weight-gradient
// taps through the direct backward's padded code rows (a direct backward whose small gradients are not finite runs
// again on gemm).
Strategy choose_strategy(const ConvGeometry& g, Pass pass, std::initializer_list<at::Tensor> inputs,
                         std::initializer_list<at::Tensor> weights) {
  const Strategy chosen = choose_strategy(g, pass);
  if (chosen == Strategy::gemm) return chosen;
  for (const at::Tensor& t : weights)
    if (!all_finite(t)) return Strategy::gemm;
  if (g.SW == 1) return chosen;
  for (const at::Tensor& t : inputs)
    if (!all_finite(t)) return Strategy::gemm;
  return chosen;
}

// ATen's isfinite(t).all().item() costs about 15 us a call, a quarter of a small call's whole overhead, and allocates
// a tensor of t's size: contiguous tensors take plain passes instead, split over the threads when large. v - v != 0
// holds exactly for inf and NaN; OR-ing it over a range has no branch, so the compiler can vectorise the pass.
bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.is_contiguous() && t.numel() > (int64_t(1) << 16)) return at::isfinite(t).all().item<bool>();
  const at::Tensor c = t.contiguous();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "all_finite", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    finite = at::parallel_reduce(
        0, c.numel(), int64_t(1) << 16, true,
        [&](int64_t begin, int64_t end, bool ok) {
          bool non_finite = false;
          for (int64_t i = begin; i < end; ++i) non_finite |= p[i] - p[i] != scalar_t(0);
          return ok && !non_finite;
        },
        [](bool a, bool b) { return a && b; });
  });
  return finite;
}

int64_t gemm_chunk_items(const ConvGeometry& g, int64_t n_iter, bool fista, const Checkpoints& ck, Pass pass) {
  const int64_t checkpoint = ck.interval;
  const int64_t cols = std::max<int64_t>(1, g.Hz * g.Wz);
  const double c = double(g.code_item()), s = double(g.signal_item());
  // Workspace per chunk item, plus the two ATen outputs alive at once (a code and a signal). Forward: the rotating
  // codes, FISTA's y, z0, x and the residual. Backward: dL/dz, FISTA's carry and y, z0, the replay buffers, the
  // stored iterates read back, the residuals (none when the forward kept them in the chunk's layout), x (none with
  // kept residuals) and dL/dx.
  const int64_t rotating = fista ? 3 : 2;
  const int64_t replay = checkpoint > 0 ? checkpoint - 1 : rotating;
  const int64_t stored = checkpoint > 0 && fista ? 3 : 1;
  const int64_t residuals = ck.residuals && !g.kernel_covers_map() ? 0 : checkpoint > 0 ? checkpoint : 1;
  const double per_item = pass == Pass::forward
                              ? c * (rotating + (fista ? 1 : 0) + 2) + s * 3
                              : c * (3 + (fista ? 2 : 0) + replay + stored) + s * (residuals + (ck.residuals ? 2 : 3));
  // Budget. Save mode: 0.4 of what eager autograd keeps, about two codes and a residual per iteration and item
  // (measured on the sweep), so that with the checkpoints the training step stays around half of eager's and the
  // chunks reach the column count below on small maps (a quarter of eager cost 10-25% of forward + backward speed on
  // the many-channel shapes). Recompute mode (checkpoint 0): 0.2 n B max(c, s), the memory-lean mode's tenth of
  // eager. Without a backward (checkpoint -1) the column count alone decides: the fewest items that reach 4096
  // columns (or the whole batch), so a chunk holds about 4096 columns, less than one item's columns over.
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
