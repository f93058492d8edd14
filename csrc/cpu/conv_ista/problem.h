// What every conv-ISTA strategy shares: the checked geometry of a problem, its per-iteration constants, and where the
// forward keeps the iterates the backward needs (the elementwise pieces of an iteration are in elementwise.h).
//
// Canonical tensors (docs/design.md §7.1): x (B, Cs, H, W); weight W_D and encoder_weight W_E (Cc, Cs, KH, KW),
// W_E an empty (0,) tensor when tied (W_E = W_D: one gradient, the sum of both uses, and an empty one for W_E);
// lam (n, Cc); step (n,); z0 (B, Cc, Hz, Wz) or empty (zeros). Hz = (H + 2 PH - KH) / SH + 1 (Wz likewise).
// Iteration k = 0 .. n-1 (FISTA: beta_k = (t_{k-1} - 1) / t_k, beta_0 = 0; ISTA: beta_k = 0):
//     y_k     = z_k + beta_k (z_k - z_{k-1})
//     z_{k+1} = S_{step_k lam_k[c]}(y_k + step_k E(x - D y_k))          (S+ when nonneg)
// with D y = conv_transpose2d(y, W_D) cropped/padded to x's size and E r = conv2d(r, W_E).
// Saved for the backward with checkpoint interval m (reference/conv_ista.py::checkpoint_indices): z_k for
// 0 < k < n with k % m == 0 (FISTA also k % m == m - 1), or nothing for m = 0 (recompute mode). A checkpoint
// m | kKeepResiduals also keeps every residual r_k = x - D y_k (k < n), channels-last per item (H, W, Cs), after the
// iterates in one flat `saved`: the backward then never recomputes D y_k.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "elementwise.h"

namespace dsc_kernels {
namespace conv_ista {

// Sizes of one problem; names follow the math: signal (B, Cs, H, W), code (B, Cc, Hz, Wz), kernel KH x KW, stride
// SH x SW, padding PH x PW.
struct ConvGeometry {
  int64_t B, Cs, H, W, Cc, KH, KW, SH, SW, PH, PW, Hz, Wz;

  int64_t code_item() const { return Cc * Hz * Wz; }
  int64_t signal_item() const { return Cs * H * W; }
  // Nothing to code (an empty batch or no code channels): the outputs are empty and every gradient is zero.
  bool empty_code() const { return B == 0 || Cc == 0; }
  // An empty signal (no signal channels, or a zero-size map inside the padding): x - D y is empty, so E(x - D y) is
  // zero and an iteration only shrinks y.
  bool empty_signal() const { return Cs == 0 || H == 0 || W == 0; }
  // The kernel covers the whole unpadded map (a 1 x 1 code): each convolution is a plain matrix product.
  bool kernel_covers_map() const { return Hz == 1 && Wz == 1 && PH == 0 && PW == 0 && KH == H && KW == W; }
};

// The two passes of an op. Each picks its strategy (and the gemm strategy its chunks) on its own: both read and
// write the same checkpoints, so a forward of one strategy and a backward of the other compose.
enum class Pass { forward, backward };

// An empty (0,) encoder_weight stands for the dictionary itself (the header's canonical tensors); an empty one of
// another shape is a mistake the shape check names.
inline bool tied(const at::Tensor& encoder_weight) { return encoder_weight.dim() == 1 && encoder_weight.numel() == 0; }

// Checks the canonical tensors and measures the problem; TORCH_CHECK names what is wrong.
ConvGeometry check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& encoder_weight, const at::Tensor& lam, const at::Tensor& step,
                          const at::Tensor& z0, at::IntArrayRef stride, at::IntArrayRef padding);

// FISTA's beta_k = (t_{k-1} - 1) / t_k (beta_0 = 0), all zero for ISTA.
std::vector<double> fista_betas(int64_t n, bool fista);

// The per-iteration constants both passes read, copied to the host once.
template <typename T>
struct IterationConstants {
  std::vector<T> lam, step;   // (n, Cc), (n,)
  std::vector<double> beta;   // (n,)
  std::vector<T> threshold;   // (n, Cc): step_k lam_k[c]
  int64_t n, Cc;
  bool nonneg, fista;

  IterationConstants(const at::Tensor& lam_t, const at::Tensor& step_t, bool nonneg_, bool fista_)
      : lam(host(lam_t)), step(host(step_t)), beta(fista_betas(step_t.size(0), fista_)), n(step_t.size(0)),
        Cc(lam_t.size(1)), nonneg(nonneg_), fista(fista_) {
    threshold.resize(n * Cc);
    for (int64_t k = 0; k < n; ++k)
      for (int64_t c = 0; c < Cc; ++c) threshold[k * Cc + c] = step[k] * lam[k * Cc + c];
  }

  const T* thresholds(int64_t k) const { return threshold.data() + k * Cc; }
  // Whether y_k reads z_{k-1}: FISTA with beta_k != 0. beta_1 is exactly 0, and y_1 is then z_1 itself, as in the
  // reference: z_1 + 0 (z_1 - z_0) would be NaN wherever z_1 or z_0 is infinite (and so would the carry -0 dL/dy_1
  // that the backward hands to z_0 wherever dL/dy_1 is).
  bool momentum(int64_t k) const { return fista && k > 0 && beta[k] != 0.0; }

 private:
  static std::vector<T> host(const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
  }
};

// The checkpoint flag of reference/conv_ista.py::KEEP_RESIDUALS.
constexpr int64_t kKeepResiduals = int64_t(1) << 20;

// The iterates the forward saves for the backward (reference/conv_ista.py::checkpoint_indices): slot[k] is z_k's
// index in `saved`, or -1. z_0 is the input, z_n the output.
struct Checkpoints {
  std::vector<int64_t> slot;
  int64_t interval;  // m <= n + 1; 0: recompute mode; -1: no backward will follow
  bool residuals;    // r_0 .. r_{n-1} kept after the iterates (kKeepResiduals)
  int64_t count = 0;

  // Every m >= n + 1 keeps no iterate and replays one segment [0, n), so m is clamped there: the backwards size
  // their replay buffers by m (an int count; a raw op's m of 2**31 + 1 wrapped negative and crashed).
  Checkpoints(int64_t n, int64_t checkpoint, bool fista)
      : slot(n + 1, -1),
        interval(checkpoint > 0 ? std::min<int64_t>(checkpoint & ~kKeepResiduals, n + 1) : checkpoint),
        residuals(checkpoint > 0 && (checkpoint & kKeepResiduals)) {
    TORCH_CHECK(!residuals || interval >= 1, "conv_ista_cpp: KEEP_RESIDUALS needs a checkpoint interval >= 1");
    if (interval > 0)
      for (int64_t k = 1; k < n; ++k)
        if (k % interval == 0 || (fista && (k + 1) % interval == 0)) slot[k] = count++;
  }
  // Elements of `saved` for a batch of B items: the iterates, then the residuals.
  int64_t saved_numel(int64_t n, int64_t B, int64_t csz, int64_t ssz) const {
    return count * B * csz + (residuals ? n * B * ssz : 0);
  }
};

// Where the forward keeps z_k (0 < k <= n) of batch item b: the output z (k = n), a checkpoint, or nowhere (null);
// and, with kept residuals, r_k (0 <= k < n). The iterates are (count, B, Cc, Hz, Wz) and the residuals
// (n, B, H, W, Cs) (csz, ssz: one item's code and signal sizes), so consecutive items of one z_k or r_k are contiguous.
template <typename T>
struct StoredIterates {
  const Checkpoints& ck;
  T* z;
  T* saved;
  int64_t B, csz;
  T* residuals = nullptr;  // null: not kept
  int64_t ssz = 0;

  T* at(int64_t k, int64_t b) const {
    if (k + 1 == int64_t(ck.slot.size())) return z ? z + b * csz : nullptr;
    return ck.slot[k] >= 0 ? saved + (ck.slot[k] * B + b) * csz : nullptr;
  }
  T* residual(int64_t k, int64_t b) const { return residuals ? residuals + (k * B + b) * ssz : nullptr; }
};

// A buffer among `bufs` that is neither a nor b (the iterates an iteration reads).
template <typename T>
T* free_buffer(T* const* bufs, int count, const T* a, const T* b) {
  for (int i = 0; i < count; ++i)
    if (bufs[i] != a && bufs[i] != b) return bufs[i];
  TORCH_CHECK(false, "conv_ista_cpp: internal error: no free replay buffer");
}

// Iterations [0, upto) from z_0 = z0 (null: zeros): step(k, z_k, z_{k-1}, dst) writes z_{k+1} to place(k + 1), or
// where that is null to one of the nbuf rotating `bufs` that z_k and (FISTA) z_{k-1} are not in.
// Returns {z_upto, z_{upto-1}}.
template <typename T, class Place, class Step>
std::pair<const T*, const T*> run_chain(int64_t upto, bool fista, const T* z0, T* const* bufs, int nbuf,
                                        Place&& place, Step&& step) {
  const T* cur = z0;
  const T* prev = nullptr;
  for (int64_t k = 0; k < upto; ++k) {
    T* dst = place(k + 1);
    if (!dst) dst = free_buffer(bufs, nbuf, cur, fista ? prev : nullptr);
    step(k, cur, prev, dst);
    prev = cur;
    cur = dst;
  }
  return {cur, prev};
}

// Everything both passes of a strategy read: the checked geometry, contiguous inputs and per-iteration constants.
template <typename T>
struct Problem {
  ConvGeometry g;
  at::Tensor x, weight, encoder_weight, z0;  // z0 empty: zeros
  IterationConstants<T> it;

  const T* z0_item(int64_t b) const { return z0.numel() ? z0.data_ptr<T>() + b * g.code_item() : nullptr; }
};

// The six gradients of the backward op, allocated by the caller with the inputs' shapes (grad_z0 empty when z0 is;
// when tied, encoder_weight is the same tensor as weight, and a strategy's two weight-gradient sums add into it).
struct Gradients {
  at::Tensor x, weight, encoder_weight, lam, step, z0;
};

// grad_lam[k, c] = step_k dL/dth[k, c] and grad_step[k] = <v_k, r_k> + sum_c lam_k[c] dL/dth[k, c], from the sums a
// backward collected: dth (n, Cc) and vr (n,).
template <typename T>
void finish_threshold_and_step_grads(const IterationConstants<T>& it, const std::vector<double>& dth,
                                     const std::vector<double>& vr, const Gradients& grads) {
  T* glam = grads.lam.data_ptr<T>();
  T* gstep = grads.step.data_ptr<T>();
  for (int64_t k = 0; k < it.n; ++k) {
    double lam_dth = 0;
    for (int64_t c = 0; c < it.Cc; ++c) {
      const double d = dth[k * it.Cc + c];
      glam[k * it.Cc + c] = T(it.step[k] * d);
      lam_dth += double(it.lam[k * it.Cc + c]) * d;
    }
    gstep[k] = T(vr[k] + lam_dth);
  }
}

// Whether every entry of a float tensor is finite (strategy.cpp): the strategies' guards against inf and NaN.
bool all_finite(const at::Tensor& t);

}  // namespace conv_ista
}  // namespace dsc_kernels
