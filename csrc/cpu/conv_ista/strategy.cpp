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

int64_t gemm_chunk_items(const ConvGeometry& g, bool backward, int64_t checkpoint) {
  (void)backward;
  (void)checkpoint;
  const int64_t cols = std::max<int64_t>(1, g.Hz * g.Wz);
  int64_t items = std::max<int64_t>(1, (1024 + cols - 1) / cols);
  if (const char* e = std::getenv("DSC_TMP_CHUNK")) items = std::atoi(e);
  items = std::min(items, g.B);
  const int64_t chunks = (g.B + items - 1) / items;
  return (g.B + chunks - 1) / chunks;
}

}  // namespace conv_ista
}  // namespace dsc_kernels
