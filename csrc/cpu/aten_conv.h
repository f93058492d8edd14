// Operands for ATen's CPU convolutions, with strides oneDNN reads right.
//
// oneDNN's CPU convolution (torch 2.13) computes some strided convolutions wrongly when an operand with one channel
// carries channels-last strides (channel stride 1), which torch counts as contiguous too. The gemm strategy's
// channels-last views of a one-channel signal are exactly that, and so is a grey NHWC image permuted to
// (B, 1, H, W). Every wrong case found (12,000 random geometries, 1-32 output channels) had one code column under a
// column stride above 1 and row stride 1: conv2d of a (2, 1, 9, 8) signal with a 3 x 4 kernel at stride (1, 5) came
// out off by up to 1e37, and the input gradient of conv_transpose2d (a conv2d) likewise. The same memory with the
// plain strides is computed right (dsc_kernels/reference/conv.py's plain_strides does the same for the reference).
#pragma once

#include <ATen/ATen.h>

namespace dsc_kernels {

// t (N, C, ...) as a view with the plain contiguous strides when C is 1 (a copy only if t is not contiguous at all).
inline at::Tensor plain_strides(const at::Tensor& t) {
  return t.dim() > 2 && t.size(1) == 1 ? t.contiguous().view(t.sizes()) : t;
}

}  // namespace dsc_kernels
