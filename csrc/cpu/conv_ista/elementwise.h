// The elementwise pieces of an iteration and of its VJP, shared by every strategy, vectorised by hand.
//
//     threshold_row  z = S_th(y + step e)                         (forward epilogue; S+ when nonneg)
//     mask_row       g := g [z != 0],  returns sum g sign(z)      (the active set; dL/dth collects minus the sum)
//     axpy_dot       gx += step v,     returns <v, r>             (dL/dx and the <v, r_k> term of dL/dstep)
//     dot            <a, b>
//     add_to         dst += src
//     CodeRowSource  y = z_k + beta (z_k - z_{k-1})               (FISTA's momentum point, read row by row)
// A row is one channel of one item (channels-first codes: one threshold, one sum), or for threshold_pixel and
// mask_pixel one pixel of one item (the gemm strategy's channels-last codes: a threshold and a sum per channel).
// Loops run over GCC vector types of one register (for_lanes) and a scalar tail: reductions written as plain loops
// inside the lambdas of at::parallel_for were left scalar by GCC (measured 4x slower than these).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace dsc_kernels {
namespace conv_ista {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kVecRegs = 32;
#else
constexpr int kVecBytes = 32;
constexpr int kVecRegs = 16;
#endif

template <typename T>
struct VecOf {
  static constexpr int L = kVecBytes / sizeof(T);
  typedef T V __attribute__((vector_size(kVecBytes)));
};

template <typename U, typename T>
inline U load(const T* p) {
  U u;
  std::memcpy(&u, p, sizeof(U));
  return u;
}
template <typename U, typename T>
inline void store(T* p, const U& u) {
  std::memcpy(p, &u, sizeof(U));
}
template <typename U, typename T>
inline U broadcast(T s) {
  return U{} + s;  // a scalar U stays itself, a vector U gets s in every lane
}

// body(i, U{}) for U = the vector type at i = 0, L, 2L, ... and for U = T on the tail; the sum of what it returns.
template <typename T, class Body>
inline double for_lanes(int64_t n, Body&& body) {
  using V = typename VecOf<T>::V;
  constexpr int L = VecOf<T>::L;
  V acc{};
  int64_t i = 0;
  for (; i + L <= n; i += L) acc += body(i, V{});
  double sum = 0;
  for (; i < n; ++i) sum += double(body(i, T{}));
  for (int l = 0; l < L; ++l) sum += double(acc[l]);
  return sum;
}

// S_th(u) = u - clamp(u, -th, th) (S+: max(u - th, 0)), branch-free; exactly 0 for |u| <= th, and NaN passes
// through both forms (as in softshrink / relu).
template <bool NONNEG, typename U>
inline U shrink(U u, U t) {
  if (NONNEG) return u - t < U{} ? U{} : u - t;
  const U lo = u < -t ? -t : u;
  return u - (lo > t ? t : lo);
}

// th(i, U{}): the thresholds of entries i .. i + lanes.
template <bool NONNEG, typename T, class Th>
inline void threshold_impl(T* out, const T* y, const T* e, T step, Th&& th, int64_t cnt) {
  for_lanes<T>(cnt, [&](int64_t i, auto tag) {
    using U = decltype(tag);
    U u = y ? load<U>(y + i) : U{};
    if (e) u += step * load<U>(e + i);
    store(out + i, shrink<NONNEG>(u, th(i, tag)));
    return U{};
  });
}

// out = S_th(y + step e): y null reads zeros (z_0 not given), e null drops the step term (an empty signal); y may be
// out itself.
template <typename T>
inline void threshold_row(T* out, const T* y, const T* e, T step, T th, int64_t cnt, bool nonneg) {
  auto same = [th](int64_t, auto tag) { return broadcast<decltype(tag)>(th); };
  if (nonneg)
    threshold_impl<true>(out, y, e, step, same, cnt);
  else
    threshold_impl<false>(out, y, e, step, same, cnt);
}

// threshold_row over one pixel's cnt channels, channel c thresholded at th[c].
template <typename T>
inline void threshold_pixel(T* out, const T* y, const T* e, T step, const T* th, int64_t cnt, bool nonneg) {
  auto per_channel = [th](int64_t i, auto tag) { return load<decltype(tag)>(th + i); };
  if (nonneg)
    threshold_impl<true>(out, y, e, step, per_channel, cnt);
  else
    threshold_impl<false>(out, y, e, step, per_channel, cnt);
}

// The active set of the iteration that produced z applied to its gradient g in place, g := g [z != 0]; returns
// sum g sign(z) (nonneg: sum g) over the row, which dL/dth collects with a minus sign. NaN codes follow torch's
// softshrink and relu backwards: active (their derivative is 1 at NaN), and sign(NaN) counts 0 (softshrink's
// threshold gradient skips NaN entries; relu(u - t)'s does not, hence nonneg's sum g).
template <typename T>
inline double mask_row(T* g, const T* z, int64_t cnt, bool nonneg) {
  return for_lanes<T>(cnt, [&](int64_t i, auto tag) {
    using U = decltype(tag);
    const U zz = load<U>(z + i);
    const U gg = zz != U{} ? load<U>(g + i) : U{};
    store(g + i, gg);
    return nonneg ? gg : (zz > U{} ? gg : (zz < U{} ? -gg : U{}));
  });
}

// mask_row over one pixel's cnt channels: sums[c] += g[c] sign(z[c]) (nonneg: g[c]) after the mask.
template <typename T>
inline void mask_pixel(T* g, const T* z, int64_t cnt, bool nonneg, T* sums) {
  for_lanes<T>(cnt, [&](int64_t i, auto tag) {
    using U = decltype(tag);
    const U zz = load<U>(z + i);
    const U gg = zz != U{} ? load<U>(g + i) : U{};
    store(g + i, gg);
    store(sums + i, load<U>(sums + i) + (nonneg ? gg : (zz > U{} ? gg : (zz < U{} ? -gg : U{}))));
    return U{};
  });
}

// gx += step v over cnt entries; returns <v, r>.
template <typename T>
inline double axpy_dot(T* gx, const T* v, const T* r, T step, int64_t cnt) {
  return for_lanes<T>(cnt, [&](int64_t i, auto tag) {
    using U = decltype(tag);
    const U vv = load<U>(v + i);
    store(gx + i, load<U>(gx + i) + step * vv);
    return vv * load<U>(r + i);
  });
}

// <a, b> over cnt entries.
template <typename T>
inline double dot(const T* a, const T* b, int64_t cnt) {
  return for_lanes<T>(cnt, [&](int64_t i, auto tag) {
    using U = decltype(tag);
    return load<U>(a + i) * load<U>(b + i);
  });
}

// dst += src over cnt entries.
template <typename T>
inline void add_to(T* dst, const T* src, int64_t cnt) {
  for_lanes<T>(cnt, [&](int64_t i, auto tag) {
    using U = decltype(tag);
    store(dst + i, load<U>(dst + i) + load<U>(src + i));
    return U{};
  });
}

// A code-sized tensor the passes read, computed on the fly from stored ones: scale * (a + beta (a - b)) (FISTA's
// y_k; b null: scale * a); a null: zeros (z0 not given; FISTA's beta_1 is 0, so z_0 never enters as b).
template <typename T>
struct CodeRowSource {
  const T* a;
  const T* b;
  T beta;
  T scale;

  void row(int64_t off, int64_t cnt, T* dst) const {
    if (!a) {
      std::fill(dst, dst + cnt, T(0));
      return;
    }
    for_lanes<T>(cnt, [&](int64_t i, auto tag) {
      using U = decltype(tag);
      const U pa = load<U>(a + off + i);
      store(dst + i, b ? scale * (pa + beta * (pa - load<U>(b + off + i))) : scale * pa);
      return U{};
    });
  }
};

}  // namespace conv_ista
}  // namespace dsc_kernels
