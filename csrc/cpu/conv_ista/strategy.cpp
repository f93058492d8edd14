// Which strategy runs a shape, and the gemm strategy's chunk size. (Cost model: see choose_strategy.)
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

int64_t gemm_chunk_items(const ConvGeometry& g, int64_t n_iter, bool fista) {
  (void)n_iter;
  (void)fista;
  const int64_t cols = std::max<int64_t>(1, g.Hz * g.Wz);
  const int64_t want = (4096 + cols - 1) / cols;
  const int64_t cap = std::max<int64_t>(1, g.B / 4);
  const int64_t items = std::max<int64_t>(1, std::min({g.B, want, cap}));
  const int64_t chunks = (g.B + items - 1) / items;
  return (g.B + chunks - 1) / chunks;
}

}  // namespace conv_ista
}  // namespace dsc_kernels
