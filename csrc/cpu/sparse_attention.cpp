// Sparse attention on the CPU: sparsemax and soft-threshold ("shrink") attention, forward and backward.
//
// Forward, for q (B,H,N,d), k (B,H,M,d), v (B,H,M,dv), theta (H,), an optional additive bias (B,H,N,M):
//   s_ij = scale <q_i, k_j> + bias_ij; key j is hidden from query i when j > i (causal, top-left like SDPA's
//   is_causal) or bias_ij = -inf, and then s_ij = -inf.
//   Rows are handled relative to a reference point c_i, z_ij = s_ij - c_i (z = 0 where s_ij = c_i = +inf):
//   sparsemax: c_i = max_j s_ij and t_i = tau_i - c_i solves sum_j max(z_ij - t_i, 0) = 1, so huge or tied
//     scores keep their precision; a row with +inf scores has (c, t) = (+inf, -1/#{+inf}) (its mass is shared
//     among them), a row with no visible key (+inf, +inf);
//   shrink: (c_i, t_i) = (0, theta_h).
//   P_ij = z_ij - t_i on S_i = {j : z_ij > t_i},  O_i = sum_{j in S_i} P_ij v_j.
//   A row is NaN (O_i = NaN, stats (NaN, NaN), no gradient) when q_i, or the k_j or v_j of a key it sees, holds
//   NaN or +-inf, or one of its scores is NaN. It never reads a key it does not see.
//   Saved: stats (B,H,N,2) = (c_i, t_i).
// Backward (g = dL/dO), only support entries are non-zero:
//   dP_ij = <g_i, v_j>,  ds_ij = dP_ij - delta_i on S_i,  delta_i = mean_{S_i} dP_ij (sparsemax) or 0 (shrink),
//   ds_i = 0 on +inf rows (P does not move there),
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i P_ij g_i,  dtheta_h = -sum ds
// Scores are recomputed from q, k and the saved stats; no N x M matrix is kept. Each task computes a panel of
// 64 query rows x M keys with one BLAS GEMM, so memory is O(threads * 64 * M) (plus O(threads * M * (d + dv)) of
// dk/dv partial sums in a backward with fewer heads than threads); everything after the GEMM touches only the
// support (|S_i| entries per row). The backward recomputes exactly the forward's panels, so its P is the forward's
// bit for bit. (A dk/dv pass over key panels, with a transposed GEMM, had rounded each score differently by up to an
// ulp of the row's largest score, which moved every support entry of P by as much: 10% of dv in float32 at scores
// ~1e6.)
// q, k, v, grad_out are read through their strides (rows must have a unit last stride, else they are copied).
//
// t by Michelot's projection: starting from lo = -1 <= t_i, the update lo <- (sum_{z > lo} z - 1) / |{z > lo}|
// increases monotonically to t_i and is exact once the set stops shrinking, so no sort and no tolerance are
// needed. Its sums are accumulated in double with Neumaier compensation (a 4,096-key near-flat fp32 row keeps
// ~1e-6 relative accuracy instead of ~1e-3).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int64_t kRowBlock = 64;  // query (forward, dq) or key (dk, dv) rows per parallel task

template <typename scalar_t>
constexpr scalar_t kInf = std::numeric_limits<scalar_t>::infinity();

// dot and axpy take n = 0 (an empty value or head dim), whose row pointers may be null: at::vec would pass them
// to memcpy, which must not see a null pointer even for zero bytes.
template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if (n == 0) return scalar_t(0);
  return at::vec::map2_reduce_all<scalar_t>(
      [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, a, b, n);
}

// out += w * x
template <typename scalar_t>
inline void axpy(scalar_t* out, scalar_t w, const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if (n == 0) return;
  at::vec::map2<scalar_t>([w](Vec o, Vec y) { return o + Vec(w) * y; }, out, out, x, n);
}

// Whether x[0:n] is all finite: x - x is 0 for finite x and NaN for NaN or +-inf, so the vectorised sum of x - x
// is NaN exactly when some entry is not finite.
template <typename scalar_t>
inline bool all_finite(const scalar_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  if (n == 0) return true;
  return !std::isnan(at::vec::map_reduce_all<scalar_t>([](Vec a) { return a - a; },
                                                       [](Vec a, Vec b) { return a + b; }, x, n));
}

// The rows of one (batch, head) of a strided (B, H, L, width) tensor (unit last stride).
template <typename scalar_t>
struct HeadRows {
  const scalar_t* base;
  int64_t sn;
  const scalar_t* operator[](int64_t i) const { return base + i * sn; }
};

// A (B, H, L, width) tensor read row by row through its strides.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t sb, sh, sn, heads;
  explicit Rows(const at::Tensor& t)
      : data(t.data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)), heads(t.size(1)) {}
  HeadRows<scalar_t> head(int64_t bh) const { return {data + (bh / heads) * sb + (bh % heads) * sh, sn}; }
};

// The additive score bias (B, H, N, M) through its strides (zero on broadcast dimensions), or none.
template <typename scalar_t>
struct Bias {
  const scalar_t* data = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sm = 0, heads = 1;
  explicit Bias(const c10::optional<at::Tensor>& t) {
    if (t.has_value() && t->defined()) {
      data = t->data_ptr<scalar_t>();
      sb = t->stride(0), sh = t->stride(1), sn = t->stride(2), sm = t->stride(3), heads = t->size(1);
    }
  }
  bool present() const { return data != nullptr; }
  // (bias_ij for j = 0, 1, ...) = row(bh, i)[j * sm]
  const scalar_t* row(int64_t bh, int64_t i) const { return data + (bh / heads) * sb + (bh % heads) * sh + i * sn; }
};

// Bias-added score, -inf where the bias hides the key.
template <typename scalar_t>
inline scalar_t biased(scalar_t s, scalar_t bias) {
  return bias == -kInf<scalar_t> ? -kInf<scalar_t> : s + bias;
}

// z = s - c, with z = 0 where s = c = +-inf (the encoding of +inf rows).
template <typename scalar_t>
inline scalar_t relative(scalar_t s, scalar_t c) {
  return (std::isinf(c) && s == c) ? scalar_t(0) : s - c;
}

inline int64_t visible_keys(int64_t i, int64_t m, bool causal) {
  return causal ? std::min(m, i + 1) : m;
}

// Neumaier-compensated double sum.
struct CompensatedSum {
  double sum = 0, carry = 0;
  void add(double x) {
    const double t = sum + x;
    carry += std::abs(sum) >= std::abs(x) ? (sum - t) + x : (x - t) + sum;
    sum = t;
  }
  double value() const { return sum + carry; }
};

// Michelot's algorithm on the scores s[0:n] of a row with finite maximum mx: returns t = tau - mx.
template <typename scalar_t>
scalar_t sparsemax_threshold(const scalar_t* s, int64_t n, scalar_t mx) {
  scalar_t lo = scalar_t(-1);
  int64_t prev = -1;
  while (true) {
    CompensatedSum sum;
    int64_t cnt = 0;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t z = s[j] - mx;
      if (z > lo) {
        sum.add(z);
        ++cnt;
      }
    }
    // cnt >= 1 (the maximum has z = 0 > lo); rounding can only stall the set, which also ends the loop.
    const auto t = static_cast<scalar_t>((sum.value() - 1.0) / static_cast<double>(cnt));
    if (cnt == prev || !(t > lo)) return t;
    prev = cnt;
    lo = t;
  }
}

// How score panels are formed for a call whose GEMM may overflow (InputFacts): float scores in double, rounded
// (wide); double scores from q / 2^qe and k / 2^ke, qe + ke a shift (within 3 bits of the least) that keeps
// d max|q| max|k| max(scale, 1) below a quarter of the range (exact scalings), then times 2^(qe + ke) in pieces of at
// most 2^1000: intermediates only grow, so a score overflows only where it is beyond double's range, to +-inf, never
// the NaN of a GEMM's inf - inf (the reference's _wide_float64_scores, the same shift).
struct ScoreMode {
  bool wide = false;
  int qe = 0, ke = 0;
};

// Scores of rows [r0, r1) of `a` against rows [c0, c1) of `b` of one (batch, head): a BLAS panel
// (r1 - r0, c1 - c0), scaled. a, b are (B, H, L, d) tensors read through their strides.
inline at::Tensor score_panel(const at::Tensor& a, const at::Tensor& b, int64_t bh, int64_t r0, int64_t r1,
                              int64_t c0, int64_t c1, double scale, const ScoreMode& mode) {
  const int64_t heads = a.size(1);
  const auto a2 = a.select(0, bh / heads).select(0, bh % heads).narrow(0, r0, r1 - r0);
  const auto b2 = b.select(0, bh / heads).select(0, bh % heads).narrow(0, c0, c1 - c0);
  if (mode.wide) return at::mm(a2.to(at::kDouble), b2.to(at::kDouble).t()).mul_(scale).to(a.scalar_type());
  if (mode.qe + mode.ke > 0) {
    auto s = at::mm(a2.mul(std::ldexp(1.0, -mode.qe)), b2.mul(std::ldexp(1.0, -mode.ke)).t()).mul_(scale);
    for (int shift = mode.qe + mode.ke; shift > 0;) {
      const int piece = std::min(1000, shift);
      s.mul_(std::ldexp(1.0, piece));
      shift -= piece;
    }
    return s;
  }
  return at::mm(a2, b2.t()).mul_(scale);
}

// Per (batch, head, key): whether k_j or v_j holds a non-finite value (a row that sees it is NaN), and per
// (batch, head) the first such key (M if none), so that rows check keys only when one is in their range.
template <typename scalar_t>
struct BadKeys {
  std::vector<uint8_t> bad;
  std::vector<int64_t> first;
  // finite: k and v are known to be all finite (nothing to flag).
  BadKeys(const Rows<scalar_t>& k, const Rows<scalar_t>& v, int64_t BH, int64_t M, int64_t D, int64_t DV,
          bool finite)
      : bad(finite ? 0 : BH * M), first(BH, M) {
    if (finite) return;
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const auto kh = k.head(bh), vh = v.head(bh);
        for (int64_t j = M - 1; j >= 0; --j) {
          bad[bh * M + j] = !(all_finite(kh[j], D) && all_finite(vh[j], DV));
          if (bad[bh * M + j]) first[bh] = j;
        }
      }
    });
  }
  // Whether a key j < mi flagged bad is visible (its bias is not -inf) from a row with bias row bias_row.
  bool seen(int64_t bh, int64_t M, int64_t mi, const scalar_t* bias_row, int64_t bias_sm) const {
    for (int64_t j = first[bh]; j < mi; ++j) {
      if (bad[bh * M + j] && (bias_row == nullptr || bias_row[j * bias_sm] != -kInf<scalar_t>)) return true;
    }
    return false;
  }
};

// Adds the bias to one row of scores s[0:mi] in place (-inf where it hides a key).
template <typename scalar_t>
void add_bias(scalar_t* s, int64_t mi, const scalar_t* bias_row, int64_t bias_sm) {
  for (int64_t j = 0; j < mi; ++j) s[j] = biased(s[j], bias_row[j * bias_sm]);
}

// max_j s[j] (-inf for an empty row).
template <typename scalar_t>
scalar_t row_max(const scalar_t* s, int64_t n) {
  scalar_t m = -kInf<scalar_t>;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

template <typename scalar_t>
bool any_nan(const scalar_t* s, int64_t n) {
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) nan |= std::isnan(s[j]);
  return nan;
}

// What is known of the inputs before any row is looked at, so that the usual all-finite call checks no row.
struct InputFacts {
  bool finite;       // q, k, v hold no NaN or inf
  bool nan_scores;   // a score may be NaN: non-finite inputs, a NaN in the bias, or q k^T may overflow (inf - inf)
  // float scores may overflow: they are computed in double and rounded, so a score beyond float's range is +-inf
  // and never the NaN a float GEMM's inf - inf gives in some summation orders (the reference's rule, on its bound)
  ScoreMode scores;
};

// max |t| (NaN if t holds a NaN), one vectorised pass without temporaries; 0 for an empty tensor.
double max_abs(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  const auto [lo, hi] = at::aminmax(t);
  const double a = lo.item<double>(), b = hi.item<double>();
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<double>::quiet_NaN() : std::max(-a, b);
}

// max |t| over t's finite entries, given max_abs(t) (a second pass only when t holds a non-finite value).
double finite_max_abs(const at::Tensor& t, double all) {
  if (std::isfinite(all)) return all;
  return max_abs(at::where(at::isfinite(t), t, at::zeros({}, t.options())));
}

InputFacts input_facts(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& bias, double scale) {
  const double bq = max_abs(q), bk = max_abs(k), bv = max_abs(v);
  const bool finite = std::isfinite(bq) && std::isfinite(bk) && std::isfinite(bv);
  const bool is_float = q.scalar_type() == at::kFloat;
  const double largest = is_float ? std::numeric_limits<float>::max() : std::numeric_limits<double>::max();
  // The GEMM's partial sums and the scaled scores are at most d max|q| max|k| max(scale, 1) in magnitude. Rows
  // with a non-finite q or key are NaN whatever their scores, so the bound is over the finite entries (as the
  // reference, which zeroes the others before its GEMM).
  const double fq = finite_max_abs(q, bq), fk = finite_max_abs(k, bk);
  const bool overflow = fq * fk * static_cast<double>(q.size(3)) * std::max(scale, 1.0) > 0.25 * largest;
  bool nan_scores = !finite || overflow;
  if (bias.has_value() && bias->defined() && bias->numel() > 0) {
    const auto [lo, hi] = at::aminmax(*bias);
    nan_scores = nan_scores || std::isnan(lo.item<double>()) || std::isnan(hi.item<double>());
  }
  ScoreMode mode;
  mode.wide = is_float && overflow;
  if (!is_float && overflow && scale > 0 && std::isfinite(scale)) {  // an infinite scale keeps the plain GEMM
    // exponents of each factor apart: d max(scale, 1) alone may overflow (scale 1e308), and frexp of inf is unspecified
    int eq = 0, ek = 0, ed = 0, es = 0;
    std::frexp(fq, &eq);
    std::frexp(fk, &ek);
    std::frexp(static_cast<double>(q.size(3)), &ed);
    std::frexp(std::max(scale, 1.0), &es);
    const int shift = std::max(0, eq + ek + ed + es - 1020);
    mode.qe = shift / 2;
    mode.ke = shift - mode.qe;
  }
  return {finite, nan_scores, mode};
}

template <typename scalar_t>
void fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                const Bias<scalar_t>& bias, bool sparsemax, bool causal, double scale, InputFacts facts,
                at::Tensor& out, at::Tensor& stats) {
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2), DV = v.size(3);
  const int64_t BH = q.size(0) * H;
  const int64_t nqb = (N + kRowBlock - 1) / kRowBlock;
  const Rows<scalar_t> qr(q), kr(k), vr(v);
  const BadKeys<scalar_t> bad_keys(kr, vr, BH, M, D, DV, facts.finite);
  const scalar_t* thp = theta.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* sp = stats.data_ptr<scalar_t>();
  const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
  out.zero_();
  at::parallel_for(0, BH * nqb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, i0 = (task % nqb) * kRowBlock, i1 = std::min(N, i0 + kRowBlock);
      const int64_t mend = causal ? std::min(M, i1) : M;
      at::Tensor panel = mend > 0 ? score_panel(q, k, bh, i0, i1, 0, mend, scale, facts.scores) : at::Tensor();
      const auto qh = qr.head(bh), vh = vr.head(bh);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t mi = visible_keys(i, M, causal);
        scalar_t* s = mi > 0 ? panel.data_ptr<scalar_t>() + (i - i0) * mend : nullptr;
        scalar_t* oi = op + (bh * N + i) * DV;
        scalar_t* st = sp + (bh * N + i) * 2;
        const scalar_t* bias_row = bias.present() ? bias.row(bh, i) : nullptr;
        if (bias_row != nullptr) add_bias(s, mi, bias_row, bias.sm);
        bool nan_row = facts.nan_scores && any_nan(s, mi);
        if (!facts.finite) nan_row = nan_row || !all_finite(qh[i], D) || bad_keys.seen(bh, M, mi, bias_row, bias.sm);
        scalar_t c = 0, t = thp[bh % H];
        if (sparsemax && !nan_row) {
          const scalar_t mx = row_max(s, mi);
          if (mx == -kInf<scalar_t>) {  // no visible key (also mi == 0)
            c = t = kInf<scalar_t>;
          } else if (mx == kInf<scalar_t>) {
            c = kInf<scalar_t>;
            t = scalar_t(-1) / static_cast<scalar_t>(std::count(s, s + mi, kInf<scalar_t>));
          } else {
            c = mx;
            t = sparsemax_threshold(s, mi, mx);
          }
        }
        if (nan_row) {
          std::fill(oi, oi + DV, nan);
          c = t = nan;
        } else if (std::isinf(c)) {  // a +inf row or one without keys
          for (int64_t j = 0; j < mi; ++j) {
            const scalar_t z = relative(s[j], c);
            if (z > t) axpy(oi, z - t, vh[j], DV);
          }
        } else {  // only the support is touched: the P v product costs |S_i| dv, not M dv
          for (int64_t j = 0; j < mi; ++j) {
            if (s[j] - c > t) axpy(oi, s[j] - c - t, vh[j], DV);
          }
        }
        st[0] = c;
        st[1] = t;
      }
    }
  });
}

// The backward sweeps the forward's own query panels (the same score_panel calls, so every score, and with it every
// P_ij, is the forward's bit for bit). dq_i belongs to its row's task; dk_j and dv_j collect over all queries, so
// the query panels of one (batch, head) are split into `groups` contiguous ranges, each summing into its own dk/dv
// (the tensors themselves when groups == 1; else (B H, groups, M, width) partials, added up afterwards in a fixed
// order): a problem with fewer heads than threads still runs in parallel, and no two tasks write one row.
template <typename scalar_t>
void bwd_kernel(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const Bias<scalar_t>& bias, const at::Tensor& stats, bool sparsemax, bool causal, double scale_d,
                const ScoreMode& wide, int64_t groups, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                at::Tensor& dtheta_partial) {
  const int64_t N = q.size(2), D = q.size(3), M = k.size(2), DV = v.size(3);
  const int64_t BH = q.size(0) * q.size(1);
  const int64_t nqb = (N + kRowBlock - 1) / kRowBlock;
  const auto scale = static_cast<scalar_t>(scale_d);
  const Rows<scalar_t> gr(g), qr(q), kr(k), vr(v);
  const scalar_t* sp = stats.data_ptr<scalar_t>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dthp = dtheta_partial.data_ptr<scalar_t>();
  const at::Tensor dk_acc = groups == 1 ? dk : at::zeros({BH, groups, M, D}, dk.options());
  const at::Tensor dv_acc = groups == 1 ? dv : at::zeros({BH, groups, M, DV}, dv.options());
  scalar_t* dkp = dk_acc.data_ptr<scalar_t>();
  scalar_t* dvp = dv_acc.data_ptr<scalar_t>();

  at::parallel_for(0, BH * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> dp(std::max<int64_t>(M, 1)), p(std::max<int64_t>(M, 1));
    std::vector<int64_t> idx(std::max<int64_t>(M, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / groups, grp = task % groups;
      scalar_t* dkh = dkp + task * M * D;  // this group's dk, dv of head bh (task = bh * groups + grp)
      scalar_t* dvh = dvp + task * M * DV;
      const auto gh = gr.head(bh), qh = qr.head(bh), kh = kr.head(bh), vh = vr.head(bh);
      double th_sum = 0;  // about N * M terms of a head: in float32, 200x eager's error in dL/dtheta at 2048 x 2048
      for (int64_t blk = grp * nqb / groups; blk < (grp + 1) * nqb / groups; ++blk) {
        const int64_t i0 = blk * kRowBlock, i1 = std::min(N, i0 + kRowBlock);
        const int64_t mend = causal ? std::min(M, i1) : M;
        if (mend == 0) continue;
        at::Tensor panel = score_panel(q, k, bh, i0, i1, 0, mend, scale_d, wide);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = bh * N + i;
          const scalar_t c = sp[r * 2], t = sp[r * 2 + 1];
          if (std::isnan(c)) continue;  // a NaN row passes no gradient
          scalar_t* s = panel.data_ptr<scalar_t>() + (i - i0) * mend;
          const scalar_t* gi = gh[i];
          const int64_t mi = visible_keys(i, M, causal);
          if (bias.present()) add_bias(s, mi, bias.row(bh, i), bias.sm);
          if (std::isinf(c)) {  // a +inf row (or one without keys): P is constant, so ds = 0, but P v still moves v
            for (int64_t j = 0; j < mi; ++j) {
              const scalar_t z = relative(s[j], c);
              if (z > t) axpy(dvh + j * DV, z - t, gi, DV);
            }
            continue;
          }
          int64_t n_act = 0;
          double dp_sum = 0;
          for (int64_t j = 0; j < mi; ++j) {
            if (s[j] - c > t) {
              idx[n_act] = j;
              p[n_act] = s[j] - c - t;  // the forward's expression: the same P
              dp[n_act] = dot(gi, vh[j], DV);
              dp_sum += dp[n_act];
              ++n_act;
            }
          }
          const scalar_t dl = (sparsemax && n_act > 0) ? scalar_t(dp_sum / double(n_act)) : scalar_t(0);
          for (int64_t a = 0; a < n_act; ++a) {
            const int64_t j = idx[a];
            const scalar_t ds = dp[a] - dl;
            th_sum -= ds;
            axpy(dqp + r * D, scale * ds, kh[j], D);
            axpy(dkh + j * D, scale * ds, qh[i], D);
            axpy(dvh + j * DV, p[a], gi, DV);
          }
        }
      }
      dthp[task] = scalar_t(th_sum);
    }
  });
  if (groups > 1) {
    dk.copy_(dk_acc.sum(1).view(dk.sizes()));
    dv.copy_(dv_acc.sum(1).view(dv.sizes()));
  }
}

// Rows with a unit last stride as the kernels read them: the tensor itself when it already has one.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                  const c10::optional<at::Tensor>& bias, const std::string& mode, double scale) {
  TORCH_CHECK(mode == "sparsemax" || mode == "shrink", "sparse_attention: mode must be 'sparsemax' or 'shrink'");
  // a NaN scale read as no overflow and every row as empty (the reference: NaN rows)
  TORCH_CHECK(!std::isnan(scale), "sparse_attention: scale must not be NaN");
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
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 4 && bias->size(0) == q.size(0) && bias->size(1) == q.size(1) &&
                    bias->size(2) == q.size(2) && bias->size(3) == k.size(2),
                "sparse_attention: bias must be (B, H, N, M)");
    TORCH_CHECK(bias->scalar_type() == q.scalar_type(), "sparse_attention (cpp): bias must have q's dtype");
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd_cpp(const at::Tensor& q_, const at::Tensor& k_,
                                                            const at::Tensor& v_, const at::Tensor& theta_,
                                                            const c10::optional<at::Tensor>& bias,
                                                            c10::string_view mode_, bool causal, double scale) {
  const std::string mode(mode_);
  check_inputs(q_, k_, v_, theta_, bias, mode, scale);
  const auto q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  const auto theta = theta_.to(q.scalar_type()).contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  auto stats = at::empty({q.size(0), q.size(1), q.size(2), 2}, q.options());
  const InputFacts facts = input_facts(q, k, v, bias, scale);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_fwd_cpp", [&] {
    fwd_kernel<scalar_t>(q, k, v, theta, Bias<scalar_t>(bias), mode == "sparsemax", causal, scale, facts, out,
                         stats);
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_attention_bwd_cpp(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& theta, const c10::optional<at::Tensor>& bias, const at::Tensor& stats_, c10::string_view mode_,
    bool causal, double scale) {
  const std::string mode(mode_);
  check_inputs(q_, k_, v_, theta, bias, mode, scale);
  // Both are read row by row through q's and v's sizes: any other shape was read out of bounds.
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == q_.size(0) && grad_out.size(1) == q_.size(1) &&
                  grad_out.size(2) == q_.size(2) && grad_out.size(3) == v_.size(3),
              "sparse_attention_bwd_cpp: grad_out must be (B, H, N, dv) like the output");
  TORCH_CHECK(stats_.dim() == 4 && stats_.size(0) == q_.size(0) && stats_.size(1) == q_.size(1) &&
                  stats_.size(2) == q_.size(2) && stats_.size(3) == 2,
              "sparse_attention_bwd_cpp: stats must be (B, H, N, 2), the forward's");
  const auto q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  const auto g = unit_last_stride(grad_out.to(q.scalar_type()));
  const auto stats = stats_.to(q.scalar_type()).contiguous();
  auto dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options());
  auto dv = at::zeros(v.sizes(), v.options());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const int64_t nqb = (N + kRowBlock - 1) / kRowBlock;
  // Enough groups of query panels per head for every thread to have a task (see bwd_kernel).
  const int64_t heads = std::max<int64_t>(1, B * H);
  const int64_t groups = std::max<int64_t>(1, std::min(nqb, (at::get_num_threads() + heads - 1) / heads));
  auto partial = at::zeros({B, H, groups}, q.options());
  const ScoreMode wide = input_facts(q, k, v, bias, scale).scores;  // the forward's panels, bit for bit
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_bwd_cpp", [&] {
    bwd_kernel<scalar_t>(g, q, k, v, Bias<scalar_t>(bias), stats, mode == "sparsemax", causal, scale, wide, groups,
                         dq, dk, dv, partial);
  });
  auto dtheta = mode == "sparsemax" ? at::zeros_like(theta) : partial.sum(at::IntArrayRef{0, 2}).to(theta.scalar_type());
  return {dq, dk, dv, dtheta};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsc_kernels, m) {
  m.def(
      "sparse_attention_fwd_cpp(Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor? bias, str mode, "
      "bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "sparse_attention_bwd_cpp(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor threshold, Tensor? bias, "
      "Tensor stats, str mode, bool causal, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dsc_kernels, CPU, m) {
  m.impl("sparse_attention_fwd_cpp", &sparse_attention_fwd_cpp);
  m.impl("sparse_attention_bwd_cpp", &sparse_attention_bwd_cpp);
}
