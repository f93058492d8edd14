// The gemm strategy's building blocks: ATen convolutions for the GEMM-bound parts of an iteration, and the fused
// elementwise passes between them, on a chunk of batch items.
//
// Layout: everything a chunk works on is channels-last (items, H, W, C) unless the kernel covers the map, converted
// at the chunk's boundary from and to the op's channels-first tensors (x and the gradients once per chunk, a stored
// iterate when it is written or read). oneDNN runs channels-last convolutions without reordering in and out of its
// blocked format on every call: measured 1.2-3x faster per convolution than the same call on channels-first tensors
// on the sweep's many-channel shapes (64 -> 64 channels on 8 x 8 maps: 0.8 ms vs 2.2 ms), while a layout conversion
// costs about a tenth of one.
//
// One iteration on a chunk (x_c, z_k, z_{k-1}; every tensor chunk-sized):
//     y_k     = z_k + beta_k (z_k - z_{k-1})                    pass 1 (FISTA only; ISTA reads z_k itself)
//     D y_k   = conv_transpose2d(y_k, W_D)                      ATen (oneDNN)
//     r_k     = x_c - D y_k                                     pass 2 (in place, or into the backward's buffer)
//     E r_k   = conv2d(r_k, W_E)                                ATen (oneDNN)
//     z_{k+1} = S_{step_k lam_k}(y_k + step_k E r_k)             pass 3
// and its VJP (g = dL/dz_{k+1}):
//     gu      = g [z_{k+1} != 0],  dL/dth -= sum gu sign(z_{k+1})                  pass 4 (in place on g)
//     v       = conv_transpose2d(gu, W_E)                        ATen
//     dL/dx  += step_k v,  <v, r_k> for dL/dstep                                   pass 5
//     dL/dW_E += step_k wgrad(r_k, gu);  dL/dW_D -= step_k wgrad(v, y_k)          ATen convolution_backward (weight)
//     D^* v   = conv2d(v, W_D)                                   ATen
//     dL/dy_k = gu - step_k D^* v (FISTA: split into dL/dz_k, dL/dz_{k-1})          pass 6
// The data and weight gradients are separate ATen calls on purpose: convolution_backward asked for both at once (what
// eager autograd does) measured 2-7x slower than the two calls apart with oneDNN on this CPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../aten_conv.h"
#include "problem.h"

namespace dsc_kernels {
namespace conv_ista {

// Items per chunk of the batch: enough columns (items x Hz x Wz) for the ATen convolutions to run at GEMM speed, few
// enough that a chunk's working set stays in cache and its workspace a small part of what eager would keep
// (strategy.cpp documents the rule). Chunks run one after another, each ATen call parallel inside: oneDNN's
// weight-gradient primitive must not run inside an outer parallel region (it spins on a barrier for threads a
// nested region does not give it), so chunks are never run one per thread. Each pass sizes its own chunks (the
// backward reads the stored iterates item by item, whatever chunks wrote them).
int64_t gemm_chunk_items(const ConvGeometry& g, int64_t n_iter, bool fista, const Checkpoints& ck, Pass pass);

template <typename T>
struct GemmSolver {
  const Problem<T>& p;
  const ConvGeometry& g;
  const std::vector<int64_t> stride, padding, output_padding;
  const int64_t chunk;  // items per chunk
  // The kernel covers the whole unpadded map (code 1 x 1): every convolution is a plain matrix product over
  // (items, Cc) codes, (items, Cs KH KW) signals and (Cc, Cs KH KW) weights, and the chunk stays channels-first (no
  // convolution to speed up, and channels-last copies of the weights would cost memory where they are the largest
  // tensors).
  const bool full_map;
  const bool channels_last;  // the chunk's layout: channels-last unless full_map
  const at::Tensor weight, encoder_weight;  // W_D, W_E in the chunk's layout (one tensor when tied)
  // D 0 = 0 lets the first iteration skip its synthesis, unless a tap is inf or NaN: torch.nn.functional's
  // conv_transpose2d makes 0 * NaN = NaN over that tap's footprint, and so must we.
  const bool finite_weight;
  // A code axis of extent 1 under a stride above 1: where oneDNN misreads one-channel operands in the chunk's
  // channels-last layout (aten_conv.h), so they go to ATen with the plain strides. Only there: elsewhere the plain
  // strides make oneDNN return channels-first outputs, and copying them back cost 12-25% of forward + backward on
  // 1 -> 32 channels on 8 x 8 maps.
  const bool degenerate_stride;

  GemmSolver(const Problem<T>& p_, const Checkpoints& ck, Pass pass)
      : p(p_), g(p_.g), stride{g.SH, g.SW}, padding{g.PH, g.PW},
        output_padding{g.H + 2 * g.PH - g.KH - (g.Hz - 1) * g.SH, g.W + 2 * g.PW - g.KW - (g.Wz - 1) * g.SW},
        chunk(gemm_chunk_items(p_.g, p_.it.n, p_.it.fista, ck, pass)), full_map(g.kernel_covers_map()),
        channels_last(!full_map), weight(in_layout(p_.weight)),
        encoder_weight(p_.encoder_weight.is_same(p_.weight) ? weight : in_layout(p_.encoder_weight)),
        finite_weight(all_finite(p_.weight)),
        degenerate_stride((g.Hz == 1 && g.SH > 1) || (g.Wz == 1 && g.SW > 1)) {}

  at::Tensor in_layout(const at::Tensor& t) const {
    return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
  }
  at::TensorOptions options() const { return p.x.options(); }
  at::Tensor operand(const at::Tensor& t) const { return degenerate_stride ? plain_strides(t) : t; }
  // A chunk-sized view (items, C, h, w) in the chunk's layout over memory the caller owns.
  at::Tensor view(const T* ptr, int64_t items, int64_t c, int64_t h, int64_t w) const {
    if (!channels_last) return at::from_blob(const_cast<T*>(ptr), {items, c, h, w}, options());
    return channels_last_view(ptr, items, c, h, w);
  }
  at::Tensor channels_last_view(const T* ptr, int64_t items, int64_t c, int64_t h, int64_t w) const {
    return at::from_blob(const_cast<T*>(ptr), {items, c, h, w}, {c * h * w, 1, w * c, c}, options());
  }
  at::Tensor code(const T* ptr, int64_t items) const { return view(ptr, items, g.Cc, g.Hz, g.Wz); }
  at::Tensor signal(const T* ptr, int64_t items) const { return view(ptr, items, g.Cs, g.H, g.W); }
  // The same memory as `items` codes or signals of the op's channels-first tensors.
  at::Tensor op_code(const T* ptr, int64_t items) const {
    return at::from_blob(const_cast<T*>(ptr), {items, g.Cc, g.Hz, g.Wz}, options());
  }
  at::Tensor op_signal(const T* ptr, int64_t items) const {
    return at::from_blob(const_cast<T*>(ptr), {items, g.Cs, g.H, g.W}, options());
  }
  // Copies between the op's tensors and the chunk's layout.
  void code_in(const T* src, T* dst, int64_t items) const { code(dst, items).copy_(op_code(src, items)); }
  void code_out(const T* src, T* dst, int64_t items) const { op_code(dst, items).copy_(code(src, items)); }
  void signal_in(const T* src, T* dst, int64_t items) const { signal(dst, items).copy_(op_signal(src, items)); }
  void signal_out(const T* src, T* dst, int64_t items) const { op_signal(dst, items).copy_(signal(src, items)); }
  // t's memory as (rows, rest): t is dense in its own layout, so its rows are items (or output channels).
  static at::Tensor rows(const at::Tensor& t, int64_t n) {
    return at::from_blob(t.data_ptr(), {n, t.numel() / std::max<int64_t>(1, n)}, t.options());
  }
  at::Tensor dense(const at::Tensor& t) const {  // an ATen output in the chunk's layout
    return t.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }

  at::Tensor synthesis(const at::Tensor& y, const at::Tensor& w) const {  // D y (W_D) or E^* gu (W_E)
    if (full_map) return at::mm(rows(y, y.size(0)), rows(w, g.Cc));  // (items, Cs KH KW): the signal's memory
    return dense(at::conv_transpose2d(operand(y), operand(w), {}, stride, padding, output_padding));
  }
  at::Tensor analysis(const at::Tensor& r, const at::Tensor& w) const {  // E r (W_E) or D^* v (W_D)
    if (full_map) return at::mm(rows(r, r.size(0)), rows(w, g.Cc).t());
    return dense(at::conv2d(operand(r), operand(w), {}, stride, padding));
  }
  // acc (weight-shaped, in the chunk's layout) += alpha * the gradient in w of analysis(signal, w) against grad_out
  // `code`.
  void add_weight_grad(const at::Tensor& acc, const at::Tensor& signal, const at::Tensor& code, const at::Tensor& w,
                       double alpha) const {
    if (full_map) {
      rows(acc, g.Cc).addmm_(rows(code, code.size(0)).t(), rows(signal, signal.size(0)), 1.0, alpha);
      return;
    }
    // output_mask is (input, weight, bias).
    acc.add_(std::get<1>(at::convolution_backward(operand(code), operand(signal), operand(w), std::nullopt,
                                                  stride, padding, {1, 1}, false, {0, 0}, 1, {false, true, false})),
             alpha);
  }

  // f(first item, items) for every chunk of the batch, in order.
  template <class F>
  void for_chunks(F&& f) const {
    // Even chunks (sizes differ by one at most, none above `chunk`): 13 items in chunks of 4 ran as 4, 4, 4, 1, and
    // ATen convolves a lone small item (8 x 8 maps) on its im2col path instead of oneDNN's, about 2x slower per item.
    const int64_t chunks = (g.B + chunk - 1) / chunk;
    for (int64_t i = 0, b0 = 0; i < chunks; ++i) {
      const int64_t items = g.B / chunks + (i < g.B % chunks ? 1 : 0);
      f(b0, items);
      b0 += items;
    }
  }

  // f(first pixel, end pixel) over ranges of a chunk's code pixels (item, h, w), in parallel; a pixel's Cc channels
  // start at pixel * Cc.
  template <class F>
  void for_code_pixels(int64_t items, F&& f) const {
    at::parallel_for(0, items * g.Hz * g.Wz, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.Cc)), f);
  }

  // y_k of iteration k (zk null: zeros): z_k itself, or z_k + beta_k (z_k - z_{k-1}) in ybuf (FISTA).
  const T* momentum_point(int64_t k, const T* zk, const T* zkm1, T* ybuf, int64_t items) const {
    if (!zk || !p.it.momentum(k)) return zk;
    const CodeRowSource<T> src{zk, zkm1, T(p.it.beta[k]), T(1)};
    for_code_pixels(items, [&](int64_t p0, int64_t p1) {
      src.row(p0 * g.Cc, (p1 - p0) * g.Cc, ybuf + p0 * g.Cc);
    });
    return ybuf;
  }

  // r_k = x_c - D y (y null: zeros) written to `dst` (x_c and dst in the chunk's layout).
  void residual(const T* x, const T* y, const at::Tensor& w, int64_t items, T* dst) const {
    const int64_t n = items * g.signal_item();
    if (!y && finite_weight) {
      at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) { std::copy(x + i0, x + i1, dst + i0); });
      return;
    }
    const at::Tensor start = y ? code(y, items) : in_layout(at::zeros({items, g.Cc, g.Hz, g.Wz}, options()));
    const at::Tensor dy = synthesis(start, w);
    const T* d = dy.data_ptr<T>();
    at::parallel_for(0, n, 16384, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = x[i] - d[i];
    });
  }

  // Iteration k on a chunk of `items` items: z_{k+1} = S(y + step E r) into dst (null: the residual only) with
  // r = x - D y into rbuf; y as momentum_point gives it (ybuf: FISTA's scratch).
  void iterate(int64_t k, const T* x, const T* zk, const T* zkm1, T* dst, T* rbuf, T* ybuf, int64_t items) const {
    const T* y = momentum_point(k, zk, zkm1, ybuf, items);
    residual(x, y, weight, items, rbuf);
    if (dst) shrink(k, y, rbuf, dst, items);
  }

  // z_{k+1} = S(y + step_k E r) into dst, for y = y_k (null: zeros) and its residual r (both in the chunk's layout).
  void shrink(int64_t k, const T* y, const T* r, T* dst, int64_t items) const {
    const at::Tensor e = analysis(signal(r, items), encoder_weight);
    const T* ep = e.data_ptr<T>();
    const int64_t cc = g.Cc;
    const T sk = p.it.step[k];
    const T* th = p.it.thresholds(k);
    for_code_pixels(items, [&](int64_t p0, int64_t p1) {
      for (int64_t q = p0; q < p1; ++q)
        threshold_pixel<T>(dst + q * cc, y ? y + q * cc : nullptr, ep + q * cc, sk, th, cc, p.it.nonneg);
    });
  }

  // Kept residuals (problem.h) are channels-last per item, which is the chunk's own layout unless full_map: then they
  // are converted on the way in and out.
  at::Tensor kept(const T* ptr, int64_t items) const { return channels_last_view(ptr, items, g.Cs, g.H, g.W); }
  void keep_residual(const T* r, T* dst, int64_t items) const {
    if (r != dst) kept(dst, items).copy_(signal(r, items));
  }
  // A kept residual in the chunk's layout: the stored memory itself, or a copy in buf (full_map).
  const T* kept_residual(const T* src, T* buf, int64_t items) const {
    if (channels_last) return src;
    signal(buf, items).copy_(kept(src, items));
    return buf;
  }
};

}  // namespace conv_ista
}  // namespace dsc_kernels
