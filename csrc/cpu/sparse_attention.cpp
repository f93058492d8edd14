// Sparse attention on the CPU: sparsemax and soft-threshold ("shrink") attention, forward and backward.
//
// Forward, for q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv), theta (H,):
//   s_ij = scale <q_i, k_j>, keys j > i masked out when causal (top-left alignment, like SDPA's is_causal)
//   sparsemax: tau_i solves sum_j max(s_ij - tau_i, 0) = 1;   shrink: tau_i = theta_h
//   P_ij = max(s_ij - tau_i, 0),  O_i = sum_{j in S_i} P_ij v_j,  S_i = {j : s_ij > tau_i}
//   Saved: stats (B,H,N,2) = (tau_i, |S_i|); a row with no key gets (+inf, 0) and O_i = 0.
// Backward (g = dL/dO), only support entries are non-zero:
//   dP_ij = <g_i, v_j>,  ds_ij = dP_ij - delta_i on S_i,  delta_i = mean_{S_i} dP_ij (sparsemax) or 0 (shrink)
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i P_ij g_i,  dtheta_h = -sum ds
// Scores are recomputed from q, k and the saved tau; no N x M matrix is kept. Each task computes a panel of
// 64 query rows x M keys (or 64 keys x N queries in the dk/dv pass) with one BLAS GEMM, so memory is
// O(threads * 64 * max(N, M)); everything after the GEMM touches only the support (|S_i| entries per row).
// The dk/dv pass recomputes scores with a transposed GEMM whose rounding can differ from the forward's by an ulp,
// which can move a score lying within an ulp of tau across it (P ~ 0 there), as in FlashAttention's backward.
//
// tau by Michelot's projection: starting from lo = max_j s_ij - 1 <= tau_i, the update
// lo <- (sum_{s > lo} s - 1) / |{s > lo}| increases monotonically to tau_i and is exact once the set stops
// shrinking, so no sort and no tolerance are needed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int64_t kRowBlock = 64;  // query (forward, dq) or key (dk, dv) rows per parallel task

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  return at::vec::map2_reduce_all<scalar_t>(
      [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, a, b, n);
}

// out += w * x
template <typename scalar_t>
inline void axpy(scalar_t* out, scalar_t w, const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::vec::map2<scalar_t>([w](Vec o, Vec y) { return o + Vec(w) * y; }, out, out, x, n);
}

inline int64_t visible_keys(int64_t i, int64_t m, bool causal) {
  return causal ? std::min(m, i + 1) : m;
}

// Michelot's algorithm on s[0:n] (n >= 1). Returns tau and writes |S|.
template <typename scalar_t>
scalar_t sparsemax_tau(const scalar_t* s, int64_t n, int64_t* support) {
  scalar_t mx = s[0];
  for (int64_t j = 1; j < n; ++j) mx = std::max(mx, s[j]);
  scalar_t lo = mx - scalar_t(1);
  int64_t prev = -1;
  while (true) {
    scalar_t sum = 0;
    int64_t cnt = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (s[j] > lo) {
        sum += s[j];
        ++cnt;
      }
    }
    // cnt >= 1: lo <= tau < max. Rounding can only stall the set, which also ends the loop.
    const scalar_t t = (sum - scalar_t(1)) / scalar_t(cnt);
    if (cnt == prev || !(t > lo)) {
      *support = cnt;
      return t;
    }
    prev = cnt;
    lo = t;
  }
}

// Scores of rows [r0, r1) of `a` against rows [c0, c1) of `b` of one (batch, head): a BLAS panel
// (r1 - r0, c1 - c0), scaled. a, b are (B*H, L, d) views.
inline at::Tensor score_panel(const at::Tensor& a, const at::Tensor& b, int64_t bh, int64_t r0, int64_t r1,
                              int64_t c0, int64_t c1, double scale) {
  auto s = at::mm(a[bh].narrow(0, r0, r1 - r0), b[bh].narrow(0, c0, c1 - c0).t());
  return s.mul_(scale);
}

template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                bool sparsemax, bool causal, double scale, at::Tensor& out, at::Tensor& stats) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t M = k.size(2), DV = v.size(3);
  const int64_t nqb = (N + kRowBlock - 1) / kRowBlock;
  const auto q3 = q.view({B * H, N, D}), k3 = k.view({B * H, M, D});
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* thp = theta.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* sp = stats.data_ptr<scalar_t>();
  out.zero_();
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kRowBlock, i1 = std::min(N, i0 + kRowBlock);
      const int64_t mend = causal ? std::min(M, i1) : M;
      at::Tensor panel = mend > 0 ? score_panel(q3, k3, bh, i0, i1, 0, mend, scale) : at::Tensor();
      const scalar_t* vb = vp + bh * M * DV;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t mi = visible_keys(i, M, causal);
        const scalar_t* s = mi > 0 ? panel.data_ptr<scalar_t>() + (i - i0) * mend : nullptr;
        scalar_t* oi = op + (bh * N + i) * DV;
        scalar_t tau = std::numeric_limits<scalar_t>::infinity();
        int64_t cnt = 0;
        if (mi > 0) tau = sparsemax ? sparsemax_tau(s, mi, &cnt) : thp[bh % H];
        int64_t active = 0;
        // Only the support is touched: the P v product costs |S_i| dv, not M dv.
        for (int64_t j = 0; j < mi; ++j) {
          if (s[j] > tau) {
            axpy(oi, s[j] - tau, vb + j * DV, DV);
            ++active;
          }
        }
        sp[(bh * N + i) * 2] = tau;
        sp[(bh * N + i) * 2 + 1] = static_cast<scalar_t>(sparsemax ? cnt : active);
      }
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& stats, bool sparsemax, bool causal, double scale_d, at::Tensor& dq,
                at::Tensor& dk, at::Tensor& dv, at::Tensor& dtheta_partial) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t M = k.size(2), DV = v.size(3);
  const int64_t nqb = (N + kRowBlock - 1) / kRowBlock;
  const int64_t nkb = (M + kRowBlock - 1) / kRowBlock;
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const auto q3 = q.view({B * H, N, D}), k3 = k.view({B * H, M, D});
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* sp = stats.data_ptr<scalar_t>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  scalar_t* dthp = dtheta_partial.data_ptr<scalar_t>();
  std::vector<scalar_t> delta(B * H * N, scalar_t(0));

  // Pass 1 (query panels): delta_i, dq_i and the threshold gradient, one partial sum per task.
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> dp(std::max<int64_t>(M, 1));
    std::vector<int64_t> idx(std::max<int64_t>(M, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kRowBlock, i1 = std::min(N, i0 + kRowBlock);
      const int64_t mend = causal ? std::min(M, i1) : M;
      dthp[task] = 0;
      if (mend == 0) continue;
      const at::Tensor panel = score_panel(q3, k3, bh, i0, i1, 0, mend, scale_d);
      const scalar_t* kb = kp + bh * M * D;
      const scalar_t* vb = vp + bh * M * DV;
      scalar_t th_sum = 0;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = bh * N + i;
        const scalar_t* s = panel.data_ptr<scalar_t>() + (i - i0) * mend;
        const scalar_t* gi = gp + r * DV;
        const scalar_t tau = sp[r * 2];
        const int64_t mi = visible_keys(i, M, causal);
        int64_t n_act = 0;
        scalar_t dp_sum = 0;
        for (int64_t j = 0; j < mi; ++j) {
          if (s[j] > tau) {
            idx[n_act] = j;
            dp[n_act] = dot(gi, vb + j * DV, DV);
            dp_sum += dp[n_act];
            ++n_act;
          }
        }
        const scalar_t dl = (sparsemax && n_act > 0) ? dp_sum / scalar_t(n_act) : scalar_t(0);
        delta[r] = dl;
        for (int64_t a = 0; a < n_act; ++a) {
          const scalar_t ds = dp[a] - dl;
          th_sum -= ds;
          axpy(dqp + r * D, scale * ds, kb + idx[a] * D, D);
        }
      }
      dthp[task] = th_sum;
    }
  });

  // Pass 2 (key panels): dk_j and dv_j, each owned by one task so no atomics are needed.
  at::parallel_for(0, B * H * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nkb, j0 = (task % nkb) * kRowBlock, j1 = std::min(M, j0 + kRowBlock);
      // Top-left causal: only queries i >= j see key j.
      const int64_t i_start = causal ? j0 : 0;
      if (i_start >= N) continue;
      const at::Tensor panel = score_panel(k3, q3, bh, j0, j1, i_start, N, scale_d);
      const int64_t width = N - i_start;
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* s = panel.data_ptr<scalar_t>() + (j - j0) * width;
        const scalar_t* vj = vp + (bh * M + j) * DV;
        for (int64_t i = causal ? j : i_start; i < N; ++i) {
          const int64_t r = bh * N + i;
          const scalar_t sij = s[i - i_start];
          if (sij > sp[r * 2]) {
            axpy(dvp + (bh * M + j) * DV, sij - sp[r * 2], gp + r * DV, DV);
            const scalar_t ds = dot(gp + r * DV, vj, DV) - delta[r];
            axpy(dkp + (bh * M + j) * D, scale * ds, qp + r * D, D);
          }
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                  const std::string& mode) {
  TORCH_CHECK(mode == "sparsemax" || mode == "shrink", "sparse_attention: mode must be 'sparsemax' or 'shrink'");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "sparse_attention: q, k, v must be (B, H, L, d)");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "sparse_attention: k must be (B, H, M, d) matching q");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "sparse_attention: v must be (B, H, M, dv) matching k");
  TORCH_CHECK(theta.dim() == 1 && theta.size(0) == q.size(1), "sparse_attention: threshold must be (H,)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "sparse_attention (cpp): float32 or float64 only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "sparse_attention: q, k, v must share a dtype");
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpp(const at::Tensor& q_, const at::Tensor& k_,
                                                            const at::Tensor& v_, const at::Tensor& theta_,
                                                            c10::string_view mode_, bool causal, double scale) {
  const std::string mode(mode_);
  check_inputs(q_, k_, v_, theta_, mode);
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto theta = theta_.to(q.scalar_type()).contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto stats = at::empty({q.size(0), q.size(1), q.size(2), 2}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_fwd_cpp", [&] {
    fwd_kernel<scalar_t>(q, k, v, theta, mode == "sparsemax", causal, scale, out, stats);
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpp(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& theta, const at::Tensor& stats_, c10::string_view mode_, bool causal, double scale) {
  const std::string mode(mode_);
  check_inputs(q_, k_, v_, theta, mode);
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto g = grad_out.to(q.scalar_type()).contiguous();
  auto stats = stats_.to(q.scalar_type()).contiguous();
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const int64_t nqb = (N + kRowBlock - 1) / kRowBlock;
  auto partial = at::zeros({B, H, nqb}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_bwd_cpp", [&] {
    bwd_kernel<scalar_t>(g, q, k, v, stats, mode == "sparsemax", causal, scale, dq, dk, dv, partial);
  });
  auto dtheta = mode == "sparsemax" ? at::zeros_like(theta) : partial.sum({0, 2}).to(theta.scalar_type());
  return {dq, dk, dv, dtheta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsc_kernels, m) {
  m.def(
      "sparse_attention_fwd_cpp(Tensor q, Tensor k, Tensor v, Tensor threshold, str mode, bool causal, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "sparse_attention_bwd_cpp(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor stats, "
      "str mode, bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsc_kernels, CPU, m) {
  m.impl("sparse_attention_fwd_cpp", &sparse_attention_fwd_cpp);
  m.impl("sparse_attention_bwd_cpp", &sparse_attention_bwd_cpp);
}
