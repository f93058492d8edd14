// One spatial axis of a strided, zero-padded convolution, checked before any size is formed from it. Both C++
// problems (conv-ISTA's ops.cpp and every layer of ml_ista.cpp) measure their geometry here, so they refuse the same
// inputs with the same words and clamp strides the same way.
//
//     code extent = (extent + 2 padding - kernel) / stride + 1
//
// A zero stride would divide by zero and a huge padding would overflow extent + 2 padding, so the bounds are checked
// first, without forming that sum. The padded extent is limited to 2^31 - 1, functional's limit
// (_validate.MAX_EXTENT; ATen also takes strides and paddings as int).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace dsc_kernels {

constexpr int64_t kMaxPaddedExtent = (int64_t(1) << 31) - 1;

struct ConvAxis {
  int64_t stride;  // clamped: see conv_axis
  int64_t code;    // the code's extent along this axis
};

// `what` names the problem in the messages ("conv_ista_fwd_cpp", "ml_ista: layer 2").
inline ConvAxis conv_axis(const char* what, int64_t extent, int64_t kernel, int64_t stride, int64_t padding) {
  TORCH_CHECK(stride >= 1 && padding >= 0, what, ": stride must be >= 1 and padding >= 0");
  TORCH_CHECK(kernel >= 1, what, ": the kernel must have a non-zero size");
  TORCH_CHECK(extent >= 0 && extent <= kMaxPaddedExtent && padding <= (kMaxPaddedExtent - extent) / 2, what,
              ": the padded signal must be at most 2^31 - 1 in every dimension");
  const int64_t padded = extent + 2 * padding;
  TORCH_CHECK(padded >= kernel, what, ": kernel larger than the padded signal");
  // Every stride beyond the last window start gives the same single window and operator; the direct conv-ISTA
  // strategy sizes its polyphase loops by the stride, so a huge one would run (and allocate) for nothing.
  stride = std::min(stride, padded - kernel + 1);
  return {stride, (padded - kernel) / stride + 1};
}

}  // namespace dsc_kernels
