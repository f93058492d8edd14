// The two ways the cpp backend runs conv-ISTA, and how it picks one per shape (strategy.cpp).
//
// direct (direct_forward.cpp, direct_backward.cpp): hand-written fused passes; both convolutions by the register-tiled
//   micro-kernels of simd_tiles.h on item- or band-sized thread-local buffers, nothing batch-sized but the outputs.
// gemm (gemm_forward.cpp, gemm_backward.cpp): the two convolutions and the weight gradients by ATen (oneDNN)
//   convolutions over chunks of the batch, everything else (residual, threshold, momentum, active set, step and
//   threshold gradients) fused into single passes around them.
// Both read and write the same checkpoints (problem.h), so the strategies are interchangeable between passes: the
// forward may run one and the backward the other.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

#include "problem.h"

namespace dsc_kernels {
namespace conv_ista {

enum class Strategy { direct, gemm };

const char* strategy_name(Strategy s);

// The strategy for one pass of a problem: DSC_KERNELS_CPP_STRATEGY=direct|gemm forces one for both passes; otherwise
// (unset, empty or "auto") the rule in strategy.cpp decides from the geometry and the pass.
Strategy choose_strategy(const ConvGeometry& g, Pass pass);

// choose_strategy's pick for a pass given the tensors it reads (x, z0 and, backwards, grad_z) and the dictionaries
// (weight, encoder_weight): gemm instead of direct where a column stride meets inf or NaN in the inputs, or where a
// dictionary holds one (strategy.cpp says why).
Strategy choose_strategy(const ConvGeometry& g, Pass pass, std::initializer_list<at::Tensor> inputs,
                         std::initializer_list<at::Tensor> weights);

// Forward: z_n into out.z and the checkpoints into out.saved.
template <typename T>
void direct_forward(const Problem<T>& p, const StoredIterates<T>& out);
template <typename T>
void gemm_forward(const Problem<T>& p, const StoredIterates<T>& out);

// Backward with checkpoint interval m (0: recompute mode): fills every tensor of `grads` (grads.z0 only when z0 is
// given). grad_z is read through its strides.
template <typename T>
void direct_backward(const Problem<T>& p, const at::Tensor& grad_z, const StoredIterates<const T>& in, int64_t m,
                     const Gradients& grads);
template <typename T>
void gemm_backward(const Problem<T>& p, const at::Tensor& grad_z, const StoredIterates<const T>& in, int64_t m,
                   const Gradients& grads);

}  // namespace conv_ista
}  // namespace dsc_kernels
