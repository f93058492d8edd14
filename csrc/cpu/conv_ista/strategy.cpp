// Which strategy runs a shape, and how the gemm strategy splits the batch. (Cost model: see choose_strategy.)
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

Strategy choose_strategy(const ConvGeometry& g, int64_t n_iter) {
  if (const char* env = std::getenv("DSC_KERNELS_CPP_STRATEGY")) {
    std::string v(env);
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
    if (v == "direct") return Strategy::direct;
    if (v == "gemm") return Strategy::gemm;
    TORCH_CHECK(v.empty() || v == "auto", "DSC_KERNELS_CPP_STRATEGY must be direct, gemm or auto (or unset), got '",
                env, "'");
  }
  (void)n_iter;
  return g.Cs >= 8 && g.Cc >= 16 ? Strategy::gemm : Strategy::direct;
}

int64_t gemm_chunk_items(const ConvGeometry& g, int64_t n_iter, bool fista, int64_t checkpoint) {
  const int64_t cols = std::max<int64_t>(1, g.Hz * g.Wz);
  const double c = double(g.code_item()), s = double(g.signal_item());
  // Workspace per chunk item in the backward (the larger pass): dL/dz, FISTA's carry and y, the replay buffers and
  // residuals, plus the two ATen outputs alive at once (a code and a signal).
  const int64_t replay = checkpoint > 0 ? checkpoint - 1 : (fista ? 3 : 2);
  const int64_t residuals = checkpoint > 0 ? checkpoint : 1;
  const double per_item = c * (2 + (fista ? 2 : 0) + replay) + s * (residuals + 1);
  // Budget: a fraction of n B max(c, s), which is about a quarter of what eager autograd keeps (it saves about four
  // code- or signal-sized tensors per iteration), so that the training step stays under a tenth of eager's memory in
  // recompute mode and a third in save mode (with the checkpoints and the output added).
  const double budget = (checkpoint > 0 ? 0.4 : 0.2) * double(n_iter) * double(g.B) * std::max(c, s);
  const int64_t by_memory = std::max<int64_t>(1, int64_t(budget / std::max(1.0, per_item)));
  const int64_t by_speed = (4096 + cols - 1) / cols;  // columns for the convolutions to run at GEMM speed
  int64_t items = std::max<int64_t>(1, std::min({g.B, by_memory, by_speed}));
  if (const char* e = std::getenv("DSC_TMP_CHUNK")) items = std::min<int64_t>(g.B, std::atoi(e));
  const int64_t chunks = (g.B + items - 1) / items;
  return (g.B + chunks - 1) / chunks;
}

}  // namespace conv_ista
}  // namespace dsc_kernels
