// Multi-layer pursuit (ML-ISTA / ML-FISTA, Sulam et al. TPAMI 2019) on the CPU: ops dsc_kernels::ml_ista_fwd_cpp
// and ml_ista_bwd_cpp. The recurrence, its variants and the VJP are written out in dsc_kernels/reference/ml_ista.py
// (the executable spec: ml_ista_fwd_ref / ml_ista_bwd_ref); this file computes exactly that.
//
// Canonical 2-D tensors (ops/ml_ista.py): x (B, C_0, H, W); per layer j: weights D_j, encoder_weights E_j,
// input_encoder_weights B_j of shape (S_w, C_j, C_{j-1}, kh, kw) with S_w = 1 (shared) or S (per step), an encoder
// being empty when absent (E = D; A = E and P = D without B); thresholds t_j (S, C_j); steps c_j (S,); z0 (B, C_L,
// ..) or empty.
//
// Forward, step k = 0 .. S-1 (beta_k FISTA's momentum):
//     project:     Y_L = G_L^k + beta_k (G_L^k - G_L^{k-1}),  Y_{j-1} = P_j Y_j           (j = L..2)
//     interleaved: Y_j = G_j^k + beta_k (G_j^k - G_j^{k-1})
//     G_j^{k+1} = sigma_t( Y_j + c (A G_{j-1}^{k+1} - E D Y_j) )      G_0 = x;  A = E: c E(G_{j-1} - D Y_j)
// The projection is reused (P_j = D_j: D_j Y_j = Y_{j-1}), so a project-mode step without input encoders costs L
// syntheses and L analyses; step 0 from zero skips every synthesis. The threshold (sigma(Y + c Q - t)) and the
// momentum are single fused passes over the code; each convolution takes the fastest of ATen (oneDNN), a plain GEMM
// (layers whose code is one pixel) and a batch-wide GEMM + col2im (synthesis onto few channels): ml_ista_conv.h.
// Saved for backward: the code iterates G^1..G^{S-1} of layers c..L (checkpoint c >= 1, layers counted from 1 as
// above; the first layers left out are cheap to recompute; reference/ml_ista.py's saved_layers counts from 0:
// c-1..L-1), or of the step state only (checkpoint 0: the deepest layer in project mode, every layer in the
// interleaved iteration, whose state is every layer), or nothing (checkpoint -1: no backward follows).
//
// Backward, steps in reverse. Each step is replayed from its saved state: the projections Y_j and the
// reconstructions D_j Y_j always (L syntheses; nothing at step 0 from zero), the codes of the layers not saved too
// (from the first layer up to the last one missing).
// The active set of layer j is G_j^{k+1} != 0 (no mask is stored). Per layer, top down (g = dL/dG_j^{k+1}):
//     gu = g [G != 0];  dL/dt_j -= sum gu sign(G)  (nonneg: -= sum gu)     (one fused pass, per channel)
//     v_E = E^* gu (synthesis), v_A = A^* gu (= v_E without input encoder)
//     dL/dG_{j-1} += c v_A (dL/dx for j = 1);  dL/dW_A += c wgrad(G_{j-1}, gu);  dL/dW_E -= c wgrad(D Y_j, gu)
//     dL/dc = <v_A, G_{j-1}> - <v_E, D Y_j>
//         (A = E: dL/dW_E += c wgrad(G_{j-1} - D Y_j, gu);  dL/dc = <v_E, G_{j-1} - D Y_j>)
//     dL/dY_j += gu;  h = -c v_E: reused projection: dL/dY_{j-1} += h, else dL/dY_j += D^* h, dL/dW_D += wgrad(h, Y_j)
// then the projections bottom up (dL/dY_j += P^* dL/dY_{j-1}, dL/dW_P += wgrad(dL/dY_{j-1}, Y_j)) and the momentum
// (dL/dG^k += (1 + beta_k) dL/dY, dL/dG^{k-1} -= beta_k dL/dY; the deepest layer only in project mode).
// wgrad(a, b) is the weight gradient of the analysis a -> b (ml_ista_conv.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "conv_axis.h"
#include "ml_ista_conv.h"

namespace dsc_kernels {
namespace {

using at::Tensor;
using ml_ista::Geometry;
using TensorList = std::vector<Tensor>;

std::vector<double> fista_momentum(int64_t n) {
  std::vector<double> t{1.0}, beta{0.0};
  for (int64_t k = 0; k < n; ++k) t.push_back((1.0 + std::sqrt(1.0 + 4.0 * t.back() * t.back())) / 2.0);
  for (int64_t k = 1; k < n; ++k) beta.push_back((t[k - 1] - 1.0) / t[k]);
  return beta;
}

Tensor pick(const Tensor& stack, int64_t k) { return stack.select(0, stack.size(0) == 1 ? 0 : k); }

// S, the number of steps, from steps[0] (every layer's steps are checked against it in Net).
int64_t step_count(const TensorList& steps) {
  TORCH_CHECK(!steps.empty() && steps[0].dim() == 1 && steps[0].size(0) >= 1,
              "ml_ista: steps must hold one (S,) tensor per layer, S >= 1");
  return steps[0].size(0);
}

// The problem: tensors, geometry and the per-layer operators of step k.
struct Net {
  Tensor x;
  TensorList W, WE, WA, thr, step;
  std::vector<Geometry> geo;
  int64_t L, S;
  bool nonneg, fista, project;
  std::vector<double> beta;
  std::vector<std::vector<double>> c_values;  // steps[j][k] as doubles

  Net(const Tensor& x_, const TensorList& weights, const TensorList& enc, const TensorList& inp,
      const TensorList& thresholds, const TensorList& steps, at::IntArrayRef strides, at::IntArrayRef paddings,
      bool nonneg_, bool fista_, bool project_)
      : x(x_), W(weights), WE(enc), WA(inp), thr(thresholds), step(steps), L((int64_t)weights.size()),
        S(step_count(steps)), nonneg(nonneg_), fista(fista_), project(project_), beta(fista_momentum(S)) {
    TORCH_CHECK(x.dim() == 4, "ml_ista: x must be (B, C, H, W)");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "ml_ista (cpp): float32 or float64 only");
    TORCH_CHECK(L >= 1 && (int64_t)WE.size() == L && (int64_t)WA.size() == L && (int64_t)thr.size() == L &&
                    (int64_t)step.size() == L,
                "ml_ista: every per-layer list needs one entry per layer");
    TORCH_CHECK((int64_t)strides.size() == 2 * L && (int64_t)paddings.size() == 2 * L,
                "ml_ista: strides and paddings need two ints per layer");
    int64_t h = x.size(2), w = x.size(3), c = x.size(1);
    for (int64_t j = 0; j < L; ++j) {
      const Tensor& d = W[j];
      TORCH_CHECK(d.dim() == 5 && d.size(2) == c && (d.size(0) == 1 || d.size(0) == S),
                  "ml_ista: weights[", j, "] must be (1 or S, C_j, C_{j-1}, kh, kw) chaining the channels");
      TORCH_CHECK(d.scalar_type() == x.scalar_type(), "ml_ista: weights[", j, "] must have x's dtype");
      for (const Tensor* t : {&WE[j], &WA[j]}) {
        TORCH_CHECK(t->numel() == 0 || (t->dim() == 5 && t->sizes().slice(1).equals(d.sizes().slice(1)) &&
                                        (t->size(0) == 1 || t->size(0) == S)),
                    "ml_ista: an encoder of layer ", j, " must be empty or shaped like its dictionary");
        TORCH_CHECK(t->numel() == 0 || t->scalar_type() == x.scalar_type(), "ml_ista: an encoder of layer ", j,
                    " must have x's dtype");
      }
      TORCH_CHECK(thr[j].dim() == 2 && thr[j].size(0) == S && thr[j].size(1) == d.size(1) && step[j].dim() == 1 &&
                      step[j].size(0) == S,
                  "ml_ista: thresholds[", j, "] must be (S, C_j) and steps[", j, "] (S,)");
      TORCH_CHECK(thr[j].scalar_type() == x.scalar_type() && step[j].scalar_type() == x.scalar_type(),
                  "ml_ista: thresholds and steps must have x's dtype");
      // functional rejects them too (_validate.finite): a NaN threshold gave codes the reference does not
      TORCH_CHECK(at::isfinite(thr[j]).all().item<bool>() && at::isfinite(step[j]).all().item<bool>(),
                  "ml_ista: thresholds[", j, "] and steps[", j, "] must be finite");
      thr[j] = thr[j].contiguous();
      const Tensor cs = step[j].to(at::kDouble).contiguous();
      c_values.emplace_back(cs.data_ptr<double>(), cs.data_ptr<double>() + S);
      Geometry g;
      g.padding = {paddings[2 * j], paddings[2 * j + 1]};
      g.kh = d.size(3);
      g.kw = d.size(4);
      g.signal_h = h;
      g.signal_w = w;
      const std::string layer = "ml_ista: layer " + std::to_string(j);
      const ConvAxis rows = conv_axis(layer.c_str(), h, g.kh, strides[2 * j], paddings[2 * j]);
      const ConvAxis cols = conv_axis(layer.c_str(), w, g.kw, strides[2 * j + 1], paddings[2 * j + 1]);
      g.stride = {rows.stride, cols.stride};
      g.code_h = rows.code;
      g.code_w = cols.code;
      g.output_padding = {h + 2 * g.padding[0] - g.kh - (g.code_h - 1) * g.stride[0],
                          w + 2 * g.padding[1] - g.kw - (g.code_w - 1) * g.stride[1]};
      g.dense = g.padding[0] == 0 && g.padding[1] == 0 && h == g.kh && w == g.kw;
      geo.push_back(g);
      h = g.code_h;
      w = g.code_w;
      c = d.size(1);
    }
  }

  // z0: empty (zeros) or the deepest code (project mode only).
  void check_z0(const Tensor& z0) const {
    TORCH_CHECK(z0.numel() == 0 || (project && z0.sizes().vec() == code_shape(L - 1) &&
                                    z0.scalar_type() == x.scalar_type()),
                "ml_ista: z0 must be empty or the deepest code's shape and x's dtype (project mode only)");
  }
  // A per-layer code tensor of the backward (grad_codes[j], codes[j]): empty, or layer j's code of x's dtype.
  void check_code(const char* what, int64_t j, const Tensor& t) const {
    TORCH_CHECK(t.numel() == 0 || (t.sizes().vec() == code_shape(j) && t.scalar_type() == x.scalar_type()),
                "ml_ista_bwd_cpp: ", what, "[", j, "] must be empty or layer ", j, "'s code shape ",
                at::IntArrayRef(code_shape(j)), " and x's dtype");
  }

  bool has_input_encoder(int64_t j) const { return WA[j].numel() > 0; }
  bool reuses_projection(int64_t j) const { return project && j > 0 && !has_input_encoder(j); }
  Tensor D(int64_t j, int64_t k) const { return pick(W[j], k); }
  Tensor E(int64_t j, int64_t k) const { return WE[j].numel() ? pick(WE[j], k) : D(j, k); }
  Tensor A(int64_t j, int64_t k) const { return has_input_encoder(j) ? pick(WA[j], k) : E(j, k); }
  Tensor P(int64_t j, int64_t k) const { return has_input_encoder(j) ? pick(WA[j], k) : D(j, k); }
  double c(int64_t j, int64_t k) const { return c_values[j][k]; }
  double momentum(int64_t k) const { return fista && k > 0 ? beta[k] : 0.0; }
  std::vector<int64_t> code_shape(int64_t j) const { return {x.size(0), W[j].size(1), geo[j].code_h, geo[j].code_w}; }
  Tensor zeros_code(int64_t j) const { return at::zeros(code_shape(j), x.options()); }
};

// ------------------------------------------------------------------------------------------ fused elementwise
// out = sigma_t(Y + c Q) over (B, C, P) with t per channel (row of thresholds); an undefined Y reads as zeros.
template <typename T>
void shrink_into(T* out, const T* y, const T* q, double c, const T* t, bool nonneg, int64_t B, int64_t C, int64_t P) {
  const T cc = static_cast<T>(c);
  at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bc = lo; bc < hi; ++bc) {
      const T th = t[bc % C];
      const int64_t off = bc * P;
      for (int64_t i = 0; i < P; ++i) {
        const T u = (y ? y[off + i] : T(0)) + cc * q[off + i];
        // Written as F.relu / F.softshrink do: 0 at |u| = t, NaN in gives NaN out.
        T v;
        if (nonneg) {
          v = u - th;
          v = v > T(0) ? v : (v == v ? T(0) : v);
        } else {
          v = u > th ? u - th : (u < -th ? u + th : (u == u ? T(0) : u));
        }
        out[off + i] = v;
      }
    }
  });
}

// gu = g [code != 0] (returned) and acc[c] -= sum over (B, P) of gu sign(code) (nonneg: of gu): the threshold
// gradient. NaN codes follow torch's softshrink and relu backwards: active, and sign(NaN) counts 0 (nonneg: 1).
template <typename T>
void mask_grad(T* gu, const T* g, const T* code, double* acc, bool nonneg, int64_t B, int64_t C, int64_t P) {
  at::parallel_for(0, C, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      double sum = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t off = (b * C + c) * P;
        for (int64_t i = 0; i < P; ++i) {
          const T z = code[off + i];
          const T v = z != T(0) ? g[off + i] : T(0);
          gu[off + i] = v;
          sum += nonneg || z > T(0) ? double(v) : (z < T(0) ? -double(v) : 0.0);
        }
      }
      acc[c] -= sum;
    }
  });
}

Tensor shrink(const Net& n, int64_t j, int64_t k, const Tensor& y_in, const Tensor& q_in,
              std::optional<Tensor> dest) {
  const Tensor q = q_in.contiguous(), y = y_in.defined() ? y_in.contiguous() : y_in;
  Tensor out = dest ? *dest : at::empty_like(q);
  const int64_t B = q.size(0), C = q.size(1), P = q.size(2) * q.size(3);
  const double c = n.c(j, k);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "ml_ista_shrink", [&] {
    shrink_into<scalar_t>(out.data_ptr<scalar_t>(), y.defined() ? y.data_ptr<scalar_t>() : nullptr,
                          q.data_ptr<scalar_t>(), c, n.thr[j].data_ptr<scalar_t>() + k * C, n.nonneg, B, C, P);
  });
  return out;
}

// a + beta (a - b) in one pass (lerp from a towards b by -beta); an undefined tensor reads as zeros.
Tensor momentum(const Tensor& a, const Tensor& b, double beta) {
  if (beta == 0.0 || !a.defined()) return a;
  if (!b.defined()) return a * (1.0 + beta);
  return at::lerp(a, b, -beta);
}

// acc += alpha t, where an undefined accumulator is a zero one (which takes t over when alpha is 1: callers pass
// temporaries they do not read again).
void accumulate(Tensor& acc, const Tensor& t, double alpha = 1.0) {
  if (!acc.defined())
    acc = alpha == 1.0 ? t : t * alpha;
  else
    acc.add_(t, alpha);
}

// ---------------------------------------------------------------------------------------------------- one step
struct Step {
  TensorList starts, recon, codes;  // Y_j (undefined: zero), D_j Y_j (undefined: zero), G_j^{k+1}
};

// Replays (or runs) step k from the state G^k (only the deepest is read in project mode) and G^{k-1}. Codes are
// computed for layers with `known[j]` undefined and written into `dest[j]` when given.
Step run_step(const Net& n, int64_t k, const TensorList& state, const TensorList& prev, const TensorList& known,
              const std::vector<std::optional<Tensor>>& dest) {
  const int64_t L = n.L;
  Step s;
  s.starts.assign(L, Tensor());
  s.recon.assign(L, Tensor());
  s.codes.assign(L, Tensor());
  const double beta = n.momentum(k);
  if (n.project) {
    s.starts[L - 1] = momentum(state[L - 1], prev[L - 1], beta);
    for (int64_t j = L - 1; j > 0; --j)
      if (s.starts[j].defined()) s.starts[j - 1] = n.geo[j].synthesis(s.starts[j], n.P(j, k));
  } else {
    for (int64_t j = 0; j < L; ++j) s.starts[j] = momentum(state[j], prev[j], beta);
  }
  for (int64_t j = 0; j < L; ++j) {
    if (s.starts[j].defined())
      s.recon[j] = n.reuses_projection(j) ? s.starts[j - 1] : n.geo[j].synthesis(s.starts[j], n.D(j, k));
  }
  // Codes not given are recomputed from the bottom up to the last one missing (a prefix of the layers).
  int64_t last_missing = -1;
  for (int64_t j = 0; j < L; ++j)
    if (!known[j].defined()) last_missing = j;
  for (int64_t j = 0; j < L; ++j) {
    if (j > last_missing) {
      s.codes[j] = known[j];
      continue;
    }
    const Tensor& below = j == 0 ? n.x : s.codes[j - 1];
    const Tensor& dy = s.recon[j];
    Tensor q;
    if (n.has_input_encoder(j)) {
      q = n.geo[j].analysis(below, n.A(j, k));
      if (dy.defined()) q.sub_(n.geo[j].analysis(dy, n.E(j, k)));
    } else {
      q = n.geo[j].analysis(dy.defined() ? below - dy : below, n.E(j, k));
    }
    s.codes[j] = shrink(n, j, k, s.starts[j], q, dest[j]);
  }
  return s;
}

// The layers whose iterates G^1..G^{S-1} are saved (reference/ml_ista.py::saved_layers): c-1 .. L-1 for checkpoint
// c >= 1, the deepest for 0, none for -1; every layer in the interleaved iteration.
std::vector<int64_t> saved_layers(const Net& n, int64_t checkpoint) {
  std::vector<int64_t> keep;
  if (checkpoint < 0) return keep;
  const int64_t first = !n.project ? 0 : checkpoint == 0 ? n.L - 1 : std::min(checkpoint - 1, n.L - 1);
  for (int64_t j = first; j < n.L; ++j) keep.push_back(j);
  return keep;
}

// The state G^0: zeros (undefined) or z0 for the deepest layer.
TensorList initial_state(const Net& n, const Tensor& z0) {
  TensorList state(n.L);
  if (z0.numel()) state[n.L - 1] = z0;
  return state;
}

std::tuple<TensorList, TensorList> ml_ista_fwd_cpp(const Tensor& x, at::TensorList weights,
                                                   at::TensorList encoder_weights, at::TensorList input_encoder_weights,
                                                   at::TensorList thresholds, at::TensorList steps, const Tensor& z0,
                                                   at::IntArrayRef strides, at::IntArrayRef paddings, bool nonneg,
                                                   bool fista, bool project, int64_t checkpoint) {
  at::NoGradGuard no_grad;
  Net n(x.contiguous(), weights.vec(), encoder_weights.vec(), input_encoder_weights.vec(), thresholds.vec(),
        steps.vec(), strides, paddings, nonneg, fista, project);
  n.check_z0(z0);
  const std::vector<int64_t> keep = saved_layers(n, checkpoint);
  TensorList saved;
  std::vector<int64_t> slot(n.L, -1);
  for (int64_t j : keep) {
    std::vector<int64_t> shape = n.code_shape(j);
    shape.insert(shape.begin(), n.S - 1);
    slot[j] = (int64_t)saved.size();
    saved.push_back(at::empty(shape, x.options()));
  }
  TensorList state = initial_state(n, z0.contiguous()), prev = state;
  const TensorList none(n.L);
  for (int64_t k = 0; k < n.S; ++k) {
    std::vector<std::optional<Tensor>> dest(n.L);
    if (k < n.S - 1)
      for (int64_t j : keep) dest[j] = saved[slot[j]].select(0, k);
    Step s = run_step(n, k, state, prev, none, dest);
    prev = std::move(state);
    state = std::move(s.codes);
  }
  return {state, saved};
}

std::tuple<Tensor, TensorList, TensorList, TensorList, TensorList, TensorList, Tensor> ml_ista_bwd_cpp(
    at::TensorList grad_codes, const Tensor& x, at::TensorList weights, at::TensorList encoder_weights,
    at::TensorList input_encoder_weights, at::TensorList thresholds, at::TensorList steps, const Tensor& z0,
    at::TensorList codes, at::TensorList saved_, at::IntArrayRef strides, at::IntArrayRef paddings, bool nonneg,
    bool fista, bool project, int64_t checkpoint) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(checkpoint >= 0, "ml_ista_bwd_cpp: the forward ran without saving for a backward (checkpoint -1)");
  Net n(x.contiguous(), weights.vec(), encoder_weights.vec(), input_encoder_weights.vec(), thresholds.vec(),
        steps.vec(), strides, paddings, nonneg, fista, project);
  const int64_t L = n.L, S = n.S;
  const std::vector<int64_t> keep = saved_layers(n, checkpoint);
  TORCH_CHECK(saved_.size() == keep.size(), "ml_ista_bwd_cpp: saved does not match the checkpoint mode");
  TORCH_CHECK((int64_t)grad_codes.size() == L && (int64_t)codes.size() == L,
              "ml_ista_bwd_cpp: grad_codes and codes need one entry per layer");
  n.check_z0(z0);
  for (int64_t j = 0; j < L; ++j) {
    n.check_code("grad_codes", j, grad_codes[j]);
    n.check_code("codes", j, codes[j]);
  }
  // The saved iterates are read as codes (their memory, contiguous): each must be (S-1, code shape) of x's dtype.
  TensorList saved;
  for (size_t i = 0; i < keep.size(); ++i) {
    std::vector<int64_t> shape = n.code_shape(keep[i]);
    shape.insert(shape.begin(), S - 1);
    TORCH_CHECK(saved_[i].sizes().vec() == shape && saved_[i].scalar_type() == x.scalar_type(),
                "ml_ista_bwd_cpp: saved[", i, "] must be ", at::IntArrayRef(shape),
                " of x's dtype (the forward's, same checkpoint)");
    saved.push_back(saved_[i].contiguous());
  }

  // Gradients, accumulated in place (per-step stacks: the slot of step k).
  Tensor gx = at::zeros_like(n.x);
  TensorList gW, gWE, gWA;
  for (int64_t j = 0; j < L; ++j) {
    gW.push_back(at::zeros_like(n.W[j]));
    gWE.push_back(at::zeros_like(n.WE[j]));
    gWA.push_back(at::zeros_like(n.WA[j]));
  }
  std::vector<std::vector<double>> gT(L), gC(L, std::vector<double>(S, 0.0));
  for (int64_t j = 0; j < L; ++j) gT[j].assign(S * n.W[j].size(1), 0.0);
  auto slot = [&](Tensor& g, int64_t k) { return g.select(0, g.size(0) == 1 ? 0 : k); };
  auto grad_D = [&](int64_t j, int64_t k) { return slot(gW[j], k); };
  auto grad_E = [&](int64_t j, int64_t k) { return n.WE[j].numel() ? slot(gWE[j], k) : grad_D(j, k); };
  auto grad_A = [&](int64_t j, int64_t k) { return n.has_input_encoder(j) ? slot(gWA[j], k) : grad_E(j, k); };
  auto grad_P = [&](int64_t j, int64_t k) { return n.has_input_encoder(j) ? slot(gWA[j], k) : grad_D(j, k); };

  // dL/dG^{k+1} (undefined: zero) and FISTA's carry into dL/dG^{k-1}.
  TensorList g_state(L), carry(L);
  for (int64_t j = 0; j < L; ++j)
    if (grad_codes[j].numel()) g_state[j] = grad_codes[j].clone(at::MemoryFormat::Contiguous);
  const bool zero_start = z0.numel() == 0;  // step 0 starts from zero: its projections and D-terms vanish

  auto state_at = [&](int64_t k) {
    if (k == 0) return initial_state(n, z0.contiguous());
    TensorList state(L);
    for (size_t i = 0; i < keep.size(); ++i) state[keep[i]] = saved[i].select(0, k - 1);
    return state;
  };
  for (int64_t k = S - 1; k >= 0; --k) {
    TensorList known(L);  // the codes G^{k+1} at hand: the outputs (save mode) or the saved iterates
    if (k == S - 1) {
      for (int64_t j = 0; j < L; ++j)
        if (codes[j].numel()) known[j] = codes[j].contiguous();
    } else {
      for (size_t i = 0; i < keep.size(); ++i) known[keep[i]] = saved[i].select(0, k);
    }
    const TensorList state = state_at(k), prev = k > 0 ? state_at(k - 1) : state;
    const std::vector<std::optional<Tensor>> no_dest(L);
    Step s = run_step(n, k, state, prev, known, no_dest);
    const bool starts_zero = k == 0 && zero_start;
    TensorList& g = g_state;
    TensorList gY(L);
    for (int64_t j = L - 1; j >= 0; --j) {
      if (!g[j].defined()) continue;  // no gradient reaches this layer's code in this step
      const Geometry& geo = n.geo[j];
      const Tensor& out = s.codes[j];
      const Tensor& below = j == 0 ? n.x : s.codes[j - 1];
      const Tensor& dy = s.recon[j];
      const double c = n.c(j, k);
      Tensor gu = at::empty_like(out);
      const int64_t B = out.size(0), C = out.size(1), P = out.size(2) * out.size(3);
      Tensor gj = g[j].contiguous();
      AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ml_ista_mask_grad", [&] {
        mask_grad<scalar_t>(gu.data_ptr<scalar_t>(), gj.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            gT[j].data() + k * C, n.nonneg, B, C, P);
      });
      const Tensor vE = geo.synthesis(gu, n.E(j, k));
      Tensor vA = vE;
      if (n.has_input_encoder(j)) {
        vA = geo.synthesis(gu, n.A(j, k));
        grad_A(j, k).add_(geo.weight_grad(below, gu, n.W[j][0]), c);
        double dc = geo.synthesis_dot(vA, below);
        if (dy.defined()) {
          grad_E(j, k).sub_(geo.weight_grad(dy, gu, n.W[j][0]), c);
          dc -= geo.synthesis_dot(vE, dy);
        }
        gC[j][k] += dc;
      } else {
        const Tensor residual = dy.defined() ? below - dy : below;
        grad_E(j, k).add_(geo.weight_grad(residual, gu, n.W[j][0]), c);
        gC[j][k] += geo.synthesis_dot(vE, residual);
      }
      if (j == 0)
        gx.add_(vA, c);
      else
        accumulate(g[j - 1], vA, c);
      if (starts_zero) continue;  // dL/dY has nowhere to go and every D-side weight gradient is zero
      accumulate(gY[j], gu);
      if (n.reuses_projection(j)) {
        accumulate(gY[j - 1], vE, -c);
      } else {
        accumulate(gY[j], geo.analysis(vE, n.D(j, k)), -c);
        grad_D(j, k).add_(geo.weight_grad(vE, s.starts[j], n.W[j][0]), -c);
      }
    }
    if (starts_zero) break;  // step 0 from zero: nothing flows further back
    TensorList moving;
    if (project) {
      for (int64_t j = 1; j < L; ++j) {
        if (!gY[j - 1].defined()) continue;
        accumulate(gY[j], n.geo[j].analysis(gY[j - 1], n.P(j, k)));
        grad_P(j, k).add_(n.geo[j].weight_grad(gY[j - 1], s.starts[j], n.W[j][0]));
      }
      g_state.assign(L, Tensor());
    } else {
      g_state.assign(L, Tensor());
    }
    const double beta = n.momentum(k);
    for (int64_t j = project ? L - 1 : 0; j < L; ++j) {
      Tensor next = carry[j];
      if (gY[j].defined()) {
        accumulate(next, gY[j], 1.0 + beta);
        carry[j] = beta != 0.0 ? gY[j] * (-beta) : Tensor();
      } else {
        carry[j] = Tensor();
      }
      g_state[j] = next;
    }
  }
  // z0's shape even without entries: an empty batch's z0 (0, C_L, ...) is given, and autograd wants its shape back.
  Tensor gz0 = z0.numel() && g_state[L - 1].defined() ? g_state[L - 1] : at::zeros_like(z0);

  TensorList gT_out, gC_out;
  for (int64_t j = 0; j < L; ++j) {
    gT_out.push_back(at::tensor(gT[j], at::TensorOptions().dtype(at::kDouble)).view(n.thr[j].sizes())
                         .to(n.thr[j].scalar_type()));
    gC_out.push_back(at::tensor(gC[j], at::TensorOptions().dtype(at::kDouble)).to(n.step[j].scalar_type()));
  }
  return {gx, gW, gWE, gWA, gT_out, gC_out, gz0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsc_kernels, m) {
  m.def(
      "ml_ista_fwd_cpp(Tensor x, Tensor[] weights, Tensor[] encoder_weights, Tensor[] input_encoder_weights, "
      "Tensor[] thresholds, Tensor[] steps, Tensor z0, int[] strides, int[] paddings, bool nonneg, bool fista, "
      "bool project, int checkpoint) -> (Tensor[], Tensor[])");
  m.def(
      "ml_ista_bwd_cpp(Tensor[] grad_codes, Tensor x, Tensor[] weights, Tensor[] encoder_weights, "
      "Tensor[] input_encoder_weights, Tensor[] thresholds, Tensor[] steps, Tensor z0, Tensor[] codes, "
      "Tensor[] saved, int[] strides, int[] paddings, bool nonneg, bool fista, bool project, int checkpoint) "
      "-> (Tensor, Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor)");
}

TORCH_LIBRARY_IMPL(dsc_kernels, CPU, m) {
  m.impl("ml_ista_fwd_cpp", &ml_ista_fwd_cpp);
  m.impl("ml_ista_bwd_cpp", &ml_ista_bwd_cpp);
}

}  // namespace dsc_kernels
