// The cpp backend's conv-ISTA ops, dsc_kernels::conv_ista_fwd_cpp and dsc_kernels::conv_ista_bwd_cpp (schemas in
// docs/design.md §7.1): input checks, empty problems, and the hand-over to the strategy strategy.cpp picks for the
// shape.
//
// Forward: z_{k+1} = S_{step_k lam_k}(y_k + step_k E(x - D y_k)), y_k = z_k + beta_k (z_k - z_{k-1}), k < n; returns
// (z_n, saved) with saved the checkpoints of interval m = `checkpoint` (problem.h; with kKeepResiduals the residuals
// too), or empty for m = 0 (recompute mode) and m = -1 (no backward will follow: the strategies size their workspace
// for speed alone).
// Backward: the six gradients (x, weight, encoder_weight, lam, step, z0) from those checkpoints.
//
// Empty problems never reach a strategy: an empty batch or no code channels gives an empty z and zero gradients; an
// empty signal (no signal channels, a zero-size map) has E(x - D y) = 0, so z_{k+1} = S(y_k), run here with the
// elementwise pieces of problem.h (as `reference` computes it).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../conv_axis.h"
#include "problem.h"
#include "strategies.h"

namespace dsc_kernels {
namespace conv_ista {

ConvGeometry check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& encoder_weight, const at::Tensor& lam, const at::Tensor& step,
                          const at::Tensor& z0, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, op, ": x and weight must be 4-D (2-D problems)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, op, ": stride and padding need 2 entries");
  const ConvAxis rows = conv_axis(op, x.size(2), weight.size(2), stride[0], padding[0]);
  const ConvAxis cols = conv_axis(op, x.size(3), weight.size(3), stride[1], padding[1]);
  const ConvGeometry g{x.size(0),  x.size(1),   x.size(2),  x.size(3),  weight.size(0), weight.size(2), weight.size(3),
                       rows.stride, cols.stride, padding[0], padding[1], rows.code,      cols.code};
  TORCH_CHECK(weight.size(1) == g.Cs && (tied(encoder_weight) || encoder_weight.sizes() == weight.sizes()), op,
              ": weight/encoder_weight must be (C_code, C_sig, kh, kw) (encoder_weight (0,): tied)");
  TORCH_CHECK(step.dim() == 1 && step.size(0) >= 1, op, ": step must be (n_iter,) with n_iter >= 1");
  const int64_t n = step.size(0);
  TORCH_CHECK(lam.dim() == 2 && lam.size(0) == n && lam.size(1) == g.Cc, op, ": lam must be (n_iter, C_code)");
  TORCH_CHECK(z0.numel() == 0 || (z0.dim() == 4 && z0.size(0) == g.B && z0.size(1) == g.Cc && z0.size(2) == g.Hz &&
                                  z0.size(3) == g.Wz),
              op, ": z0 must be (B, C_code, Hz, Wz) or empty (zeros)");
  for (const auto* t : {&x, &weight, &encoder_weight, &lam, &step, &z0})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(), op,
                ": all tensors must be CPU tensors of x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": float32 or float64 only");
  return g;
}

namespace {

// lam and step of an op call (not of conv_ista_strategy_cpp, which has none): a NaN or inf would give all-NaN or
// all-zero codes that the reference computes otherwise (functional rejects them too, _validate.finite).
void check_finite_constants(const char* op, const at::Tensor& lam, const at::Tensor& step) {
  TORCH_CHECK(at::isfinite(lam).all().item<bool>() && at::isfinite(step).all().item<bool>(), op,
              ": lam and step must be finite");
}

}  // namespace

std::vector<double> fista_betas(int64_t n, bool fista) {
  std::vector<double> beta(n, 0.0);
  if (!fista) return beta;
  std::vector<double> t(n + 1);
  t[0] = 1.0;
  for (int64_t k = 0; k < n; ++k) t[k + 1] = (1.0 + std::sqrt(1.0 + 4.0 * t[k] * t[k])) / 2.0;
  for (int64_t k = 1; k < n; ++k) beta[k] = (t[k - 1] - 1.0) / t[k];
  return beta;
}

namespace {

// The forward of a problem whose signal is empty: z_{k+1} = S(y_k), whole batch at once (no convolution to tile).
template <typename T>
void shrink_only_forward(const Problem<T>& p, const StoredIterates<T>& out) {
  const int64_t bsz = p.g.B * p.g.code_item(), hw = p.g.Hz * p.g.Wz;
  const StoredIterates<T> batch{out.ck, out.z, out.saved, 1, bsz};
  at::Tensor work = at::empty({3, bsz}, p.x.options());
  T* bufs[3] = {work.data_ptr<T>(), work.data_ptr<T>() + bsz, work.data_ptr<T>() + 2 * bsz};
  run_chain<T>(p.it.n, p.it.fista, p.z0_item(0), bufs, 3, [&](int64_t k) { return batch.at(k, 0); },
               [&](int64_t k, const T* zk, const T* zkm1, T* dst) {
                 const CodeRowSource<T> y{zk, p.it.momentum(k) ? zkm1 : nullptr, T(p.it.beta[k]), T(1)};
                 for (int64_t bc = 0; bc < p.g.B * p.g.Cc; ++bc) {
                   y.row(bc * hw, hw, dst + bc * hw);
                   threshold_row<T>(dst + bc * hw, dst + bc * hw, nullptr, T(0), p.it.thresholds(k)[bc % p.g.Cc], hw,
                                   p.it.nonneg);
                 }
               });
}

// Its backward: only the thresholds, the steps (through lam) and z0 get gradients; the iterates are replayed in full
// (a problem without a signal has nothing to save memory on).
template <typename T>
void shrink_only_backward(const Problem<T>& p, const at::Tensor& grad_z, const Gradients& grads) {
  const ConvGeometry& g = p.g;
  const int64_t bsz = g.B * g.code_item(), hw = g.Hz * g.Wz, n = p.it.n;
  at::Tensor iterates = at::empty({n + 1, bsz}, p.x.options());
  T* zs = iterates.data_ptr<T>();
  if (p.z0.numel())
    std::copy(p.z0.template data_ptr<T>(), p.z0.template data_ptr<T>() + bsz, zs);
  else
    std::fill(zs, zs + bsz, T(0));
  for (int64_t k = 0; k < n; ++k) {
    const CodeRowSource<T> y{zs + k * bsz, p.it.momentum(k) ? zs + (k - 1) * bsz : nullptr, T(p.it.beta[k]), T(1)};
    T* dst = zs + (k + 1) * bsz;
    for (int64_t bc = 0; bc < g.B * g.Cc; ++bc) {
      y.row(bc * hw, hw, dst + bc * hw);
      threshold_row<T>(dst + bc * hw, dst + bc * hw, nullptr, T(0), p.it.thresholds(k)[bc % g.Cc], hw, p.it.nonneg);
    }
  }
  at::Tensor grad = grad_z.contiguous().clone(), carry = at::zeros_like(grad);
  T* ga = grad.data_ptr<T>();
  T* gb = carry.data_ptr<T>();
  std::vector<double> dth(n * g.Cc, 0.0), vr(n, 0.0);
  for (int64_t k = n - 1; k >= 0; --k) {
    const T* z1 = zs + (k + 1) * bsz;
    const bool momentum = p.it.momentum(k);
    const double bk = momentum ? p.it.beta[k] : 0.0;
    for (int64_t i = 0; i < bsz; ++i) {
      const T gu = z1[i] != T(0) ? ga[i] : T(0);
      dth[k * g.Cc + (i / hw) % g.Cc] -= p.it.nonneg || z1[i] > T(0) ? gu : (z1[i] < T(0) ? -gu : T(0));
      ga[i] = gb[i] + T(1 + bk) * gu;  // dL/dy_k = gu: no D^* v term without a signal
      gb[i] = momentum ? T(-bk) * gu : T(0);
    }
  }
  grads.x.zero_();
  grads.weight.zero_();
  grads.encoder_weight.zero_();
  finish_threshold_and_step_grads(p.it, dth, vr, grads);
  if (grads.z0.numel()) grads.z0.copy_(grad.view_as(grads.z0));
}

// The iterates and residuals in `saved` (laid out as Checkpoints::saved_numel counts them) and z_n.
template <typename T>
StoredIterates<T> stored(const Checkpoints& ck, const ConvGeometry& g, T* z, const at::Tensor& saved) {
  T* base = saved.numel() ? static_cast<T*>(saved.data_ptr()) : nullptr;
  T* residuals = ck.residuals && base ? base + ck.count * g.B * g.code_item() : nullptr;
  return StoredIterates<T>{ck, z, ck.count ? base : nullptr, g.B, g.code_item(), residuals, g.signal_item()};
}

template <typename T>
Problem<T> make_problem(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& encoder_weight, const at::Tensor& lam, const at::Tensor& step,
                        const at::Tensor& z0, bool nonneg, bool fista) {
  const at::Tensor w = weight.contiguous();  // tied: one tensor for both, so the strategies can tell (is_same)
  return Problem<T>{g, x.contiguous(), w, tied(encoder_weight) ? w : encoder_weight.contiguous(), z0.contiguous(),
                    IterationConstants<T>(lam, step, nonneg, fista)};
}

std::tuple<at::Tensor, at::Tensor> conv_ista_fwd_cpp(const at::Tensor& x, const at::Tensor& weight,
                                                     const at::Tensor& encoder_weight, const at::Tensor& lam,
                                                     const at::Tensor& step, const at::Tensor& z0,
                                                     at::IntArrayRef stride, at::IntArrayRef padding, bool nonneg,
                                                     bool fista, int64_t checkpoint) {
  const char* op = "conv_ista_fwd_cpp";
  TORCH_CHECK(checkpoint >= -1, op, ": checkpoint must be >= -1");
  const ConvGeometry g = check_inputs(op, x, weight, encoder_weight, lam, step, z0, stride, padding);
  check_finite_constants(op, lam, step);
  const Checkpoints ck(step.size(0), checkpoint, fista);
  const int64_t n = step.size(0);
  at::Tensor z = at::empty({g.B, g.Cc, g.Hz, g.Wz}, x.options());
  at::Tensor saved = checkpoint <= 0 ? at::empty({0}, x.options())
                     : ck.residuals ? at::empty({ck.saved_numel(n, g.B, g.code_item(), g.signal_item())}, x.options())
                                    : at::empty({ck.count, g.B, g.Cc, g.Hz, g.Wz}, x.options());
  if (g.empty_code()) {
    // No code: D y_k = 0, so every kept residual r_k is x itself (channels-last per item, as the strategies keep it).
    if (ck.residuals && g.B * g.signal_item() > 0)
      saved.narrow(0, ck.count * g.B * g.code_item(), n * g.B * g.signal_item())
          .view({n, g.B, g.H, g.W, g.Cs})
          .copy_(x.permute({0, 2, 3, 1}).unsqueeze(0).expand({n, g.B, g.H, g.W, g.Cs}));
    return {z, saved};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_ista_cpp", [&] {
    using T = scalar_t;
    const Problem<T> p = make_problem<T>(g, x, weight, encoder_weight, lam, step, z0, nonneg, fista);
    const StoredIterates<T> out = stored<T>(ck, g, z.data_ptr<T>(), saved);
    if (g.empty_signal())
      shrink_only_forward<T>(p, out);
    else if (choose_strategy(g, Pass::forward, {x, z0}, {weight, encoder_weight}) == Strategy::gemm)
      gemm_forward<T>(p, out);
    else {
      direct_forward<T>(p, out);
      // Finite inputs whose iterates overflow inside the solve meet the column phases' zero taps (0 * inf: NaN where
      // torch has inf or a finite value; strategy.cpp). A non-finite iterate stays non-finite to the last, so z_n
      // tells, for one pass over the code.
      if (g.SW > 1 && !all_finite(z)) gemm_forward<T>(p, out);
    }
  });
  return {z, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_ista_bwd_cpp(
    const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& encoder_weight,
    const at::Tensor& lam, const at::Tensor& step, const at::Tensor& z0, const at::Tensor& z_,
    const at::Tensor& saved_, at::IntArrayRef stride, at::IntArrayRef padding, bool nonneg, bool fista,
    int64_t checkpoint) {
  const char* op = "conv_ista_bwd_cpp";
  TORCH_CHECK(checkpoint >= 0, op, ": checkpoint must be >= 0");
  const ConvGeometry g = check_inputs(op, x, weight, encoder_weight, lam, step, z0, stride, padding);
  check_finite_constants(op, lam, step);
  TORCH_CHECK(grad_z.dim() == 4 && grad_z.size(0) == g.B && grad_z.size(1) == g.Cc && grad_z.size(2) == g.Hz &&
                  grad_z.size(3) == g.Wz && grad_z.scalar_type() == x.scalar_type() && grad_z.device().is_cpu(),
              op, ": grad_z must be (B, C_code, Hz, Wz) of x's dtype");
  const at::Tensor z = z_.contiguous(), saved = saved_.contiguous();
  TORCH_CHECK(z.numel() == 0 || z.sizes() == grad_z.sizes(), op, ": z must be empty or z_n");
  TORCH_CHECK(z.numel() == 0 || (z.scalar_type() == x.scalar_type() && z.device().is_cpu()), op,
              ": z must be a CPU tensor of x's dtype");
  // saved is read as raw memory of x's dtype: another dtype of the same numel would be read out of bounds
  TORCH_CHECK(checkpoint == 0 || (saved.scalar_type() == x.scalar_type() && saved.device().is_cpu()), op,
              ": saved must be a CPU tensor of x's dtype");
  TORCH_CHECK(checkpoint == 0 || z.numel() > 0 || g.empty_code(), op, ": save mode needs z");
  const Checkpoints ck(step.size(0), checkpoint, fista);
  TORCH_CHECK(checkpoint == 0 || saved.numel() == ck.saved_numel(step.size(0), g.B, g.code_item(), g.signal_item()),
              op, ": saved must hold the checkpoints of conv_ista_fwd_cpp with this checkpoint");
  // Tied: the strategies add both uses' weight gradients into one tensor (grads.encoder_weight is grads.weight), and
  // the op returns an empty encoder gradient, so no second weight-sized gradient exists (nor autograd's sum of two).
  const at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  const at::Tensor grad_encoder = at::empty_like(encoder_weight, at::MemoryFormat::Contiguous);
  const Gradients grads{at::empty_like(x, at::MemoryFormat::Contiguous),
                        grad_weight,
                        tied(encoder_weight) ? grad_weight : grad_encoder,
                        at::empty_like(lam, at::MemoryFormat::Contiguous),
                        at::empty_like(step, at::MemoryFormat::Contiguous),
                        at::empty_like(z0, at::MemoryFormat::Contiguous)};
  if (g.empty_code()) {
    for (const at::Tensor* t : {&grads.x, &grads.weight, &grads.encoder_weight, &grads.lam, &grads.step, &grads.z0})
      const_cast<at::Tensor*>(t)->zero_();
    return {grads.x, grads.weight, grad_encoder.zero_(), grads.lam, grads.step, grads.z0};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_ista_cpp", [&] {
    using T = scalar_t;
    const Problem<T> p = make_problem<T>(g, x, weight, encoder_weight, lam, step, z0, nonneg, fista);
    const StoredIterates<const T> in = stored<const T>(ck, g, z.numel() ? z.data_ptr<T>() : nullptr, saved);
    if (g.empty_signal())
      shrink_only_backward<T>(p, grad_z, grads);
    else if (choose_strategy(g, Pass::backward, {x, z0, grad_z, z}, {weight, encoder_weight}) == Strategy::gemm)
      gemm_backward<T>(p, grad_z, in, ck.interval, grads);
    else {
      direct_backward<T>(p, grad_z, in, ck.interval, grads);
      // Two ways a direct backward can make NaN that torch.nn.functional does not, both leaving a non-finite weight,
      // lam or step gradient (dictionary-sized: microseconds to check), after which the gemm strategy, whose ATen
      // convolutions spread NaN as torch does, recomputes the gradients. At stride 1 the weight-gradient tiles run
      // code rows padded to whole vectors, whose zero lanes meet signal columns the real codes never reach at that
      // tap (a non-finite x, z0 or grad_z there; checking those up front cost a pass over grad_z, 3% of csc-gray's
      // backward). With a column stride, iterates that a recompute-mode replay lets overflow meet the column
      // phases' zero taps (save mode's z_n is checked up front).
      if (!all_finite(grads.weight) || !all_finite(grads.encoder_weight) || !all_finite(grads.lam) ||
          !all_finite(grads.step))
        gemm_backward<T>(p, grad_z, in, ck.interval, grads);
    }
  });
  return {grads.x, grads.weight, grad_encoder, grads.lam, grads.step, grads.z0};
}

// Which strategy the backward op (backward true) or the forward op above runs for this problem: 0 direct, 1 gemm,
// -1 none (an empty problem, handled before any strategy). For tests and benchmarks; it reads
// DSC_KERNELS_CPP_STRATEGY as the ops do.
int64_t conv_ista_strategy_cpp(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool backward) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "conv_ista_strategy_cpp: x and weight must be 4-D (2-D problems)");
  const at::Tensor step = at::empty({1}, x.options()), lam = at::empty({1, weight.size(0)}, x.options());
  const ConvGeometry g = check_inputs("conv_ista_strategy_cpp", x, weight, weight, lam, step,
                                      at::empty({0}, x.options()), stride, padding);
  if (g.empty_code() || g.empty_signal()) return -1;
  return choose_strategy(g, backward ? Pass::backward : Pass::forward) == Strategy::gemm ? 1 : 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsc_kernels, m) {
  m.def(
      "conv_ista_fwd_cpp(Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, Tensor z0, "
      "int[] stride, int[] padding, bool nonneg, bool fista, int checkpoint) -> (Tensor, Tensor)");
  m.def(
      "conv_ista_bwd_cpp(Tensor grad_z, Tensor x, Tensor weight, Tensor encoder_weight, Tensor lam, Tensor step, "
      "Tensor z0, Tensor z, Tensor saved, int[] stride, int[] padding, bool nonneg, bool fista, int checkpoint) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_ista_strategy_cpp(Tensor x, Tensor weight, int[] stride, int[] padding, bool backward=True) -> int");
}

TORCH_LIBRARY_IMPL(dsc_kernels, CPU, m) {
  m.impl("conv_ista_fwd_cpp", &conv_ista_fwd_cpp);
  m.impl("conv_ista_bwd_cpp", &conv_ista_bwd_cpp);
  m.impl("conv_ista_strategy_cpp", &conv_ista_strategy_cpp);
}

}  // namespace conv_ista
}  // namespace dsc_kernels
