// The three convolutions of one ML-ISTA layer (csrc/cpu/ml_ista.cpp), each by the fastest of three routes:
//
//     analysis   D^T r = conv2d(r, W, stride, padding)                          signal (B, C_s, H, W) -> code
//     synthesis  D z   = conv_transpose2d(z, W, stride, padding, output_pad)   code (B, C_c, Hz, Wz) -> signal
//     weight_grad(a, b) = dW of the analysis a -> b (conv weight gradient)     = sum_b,l b[c, l] im2col(a)[k, l]
//
// - "dense" layers, whose code is one pixel (the kernel covers the unpadded signal: the MNIST network's last layer),
//   are plain matrix products over (C_s kh kw): at::mm is 2-3x faster than oneDNN's convolution there.
// - synthesis onto few signal channels (C_s <= kGemmSynthesisChannels, e.g. a grey image) is one GEMM over the whole
//   batch, cols (C_s kh kw, B Hz Wz) = W^T z, scattered into the signal by col2im (parallel over (item, channel)):
//   ATen's conv_transpose2d runs this case as one small GEMM per item, about twice as slow (MNIST's first layer, 1
//   thread); with it the MNIST network's forward went from 1.7x to 2.4x eager's speed.
// - everything else goes to ATen (oneDNN convolution, convolution_backward for the weight gradient). A batch-wide
//   im2col + GEMM route for those (analysis, weight gradient, synthesis onto many channels) was measured too and
//   lost on MNIST's second layer (32 -> 64 channels, 6x6, stride 2): the forward fell from 2.4x to 1.1x eager's.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "aten_conv.h"

namespace dsc_kernels {
namespace ml_ista {

constexpr int64_t kGemmSynthesisChannels = 3;

// cols: (C_s kh kw, B Hz Wz) -> out (B, C_s, H, W), the adjoint of im2col (sums the overlapping taps).
template <typename T>
void col2im(const T* cols, T* out, int64_t B, int64_t Cs, int64_t H, int64_t W, int64_t Hz, int64_t Wz, int64_t kh,
            int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const int64_t L = Hz * Wz, BL = B * L;
  at::parallel_for(0, B * Cs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bc = lo; bc < hi; ++bc) {
      const int64_t b = bc / Cs, c = bc % Cs;
      T* plane = out + bc * H * W;
      std::fill(plane, plane + H * W, T(0));
      for (int64_t ki = 0; ki < kh; ++ki) {
        for (int64_t kj = 0; kj < kw; ++kj) {
          const T* row = cols + ((c * kh + ki) * kw + kj) * BL + b * L;
          for (int64_t oh = 0; oh < Hz; ++oh) {
            const int64_t ih = oh * sh - ph + ki;
            if (ih < 0 || ih >= H) continue;
            T* dst = plane + ih * W;
            const T* src = row + oh * Wz;
            for (int64_t ow = 0; ow < Wz; ++ow) {
              const int64_t iw = ow * sw - pw + kj;
              if (iw >= 0 && iw < W) dst[iw] += src[ow];
            }
          }
        }
      }
    }
  });
}

// One layer's convolution geometry between its signal (layer j-1) and its code (layer j), and its convolutions.
struct Geometry {
  std::vector<int64_t> stride, padding, output_padding;
  int64_t signal_h = 0, signal_w = 0, code_h = 0, code_w = 0, kh = 0, kw = 0;
  bool dense = false;  // the code is one pixel: every convolution is a GEMM over (C_s kh kw)

  // One-channel operands get the plain strides (aten_conv.h) only on a code axis of extent 1 under a stride above 1,
  // where oneDNN misreads their channels-last ones. Elsewhere they keep them: one-channel ATen outputs come back with
  // channels-last strides, and giving them the plain ones sent MNIST's first layer down oneDNN's channels-first path,
  // 20% slower forward.
  at::Tensor operand(const at::Tensor& t) const {
    return (code_h == 1 && stride[0] > 1) || (code_w == 1 && stride[1] > 1) ? plain_strides(t) : t;
  }

  at::Tensor analysis(const at::Tensor& r, const at::Tensor& w) const {
    if (dense) {
      // sizes spelled out: reshape cannot infer a -1 next to an empty batch
      const int64_t b = r.size(0), cc = w.size(0), k = w.size(1) * w.size(2) * w.size(3);
      return at::mm(r.reshape({b, k}), w.reshape({cc, k}).t()).view({b, cc, 1, 1});
    }
    return at::conv2d(operand(r), operand(w), {}, stride, padding);
  }

  at::Tensor synthesis(const at::Tensor& z, const at::Tensor& w) const {
    const int64_t b = z.size(0), cc = w.size(0), cs = w.size(1);
    if (dense) return at::mm(z.reshape({b, cc}), w.reshape({cc, -1})).view({b, cs, kh, kw});
    if (cs > kGemmSynthesisChannels)
      return at::conv_transpose2d(operand(z), operand(w), {}, stride, padding, output_padding);
    const int64_t L = code_h * code_w;
    const at::Tensor zt = z.reshape({b, cc, L}).permute({1, 0, 2}).reshape({cc, b * L});  // (C_c, B L)
    const at::Tensor cols = at::mm(w.reshape({cc, -1}).t(), zt).contiguous();
    at::Tensor out = at::empty({b, cs, signal_h, signal_w}, z.options());
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "ml_ista_col2im", [&] {
      col2im<scalar_t>(cols.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), b, cs, signal_h, signal_w, code_h,
                       code_w, kh, kw, stride[0], stride[1], padding[0], padding[1]);
    });
    return out;
  }

  // <v, r> over the whole signal, for v a synthesis (0 wherever no window of the analysis reads: the gaps of a stride
  // above the kernel, the tail after the last window). r may hold a NaN or inf there, a code of the layer below that
  // this layer never reads, and 0 * NaN made dL/dstep NaN where autograd's <gu, analysis(r)> never reads it. Such a
  // dot comes out NaN; only then is it taken again over the read entries (finite inputs pay nothing). The sum runs in
  // double: BLAS's float32 dot accumulates in float32, 5-10x eager's error in dL/dstep at 32 x 3 x 49 x 49.
  double synthesis_dot(const at::Tensor& v, const at::Tensor& r) const {
    const double d = dot_in_double(v, r);
    if (!std::isnan(d)) return d;
    const at::Tensor read = read_mask(r.options());
    if (!read.defined()) return d;
    return dot_in_double(v, at::where(read, r, 0));
  }

  static double dot_in_double(const at::Tensor& a, const at::Tensor& b) {
    return (a.reshape(-1) * b.reshape(-1)).sum(at::kDouble).item<double>();
  }

  // (1, 1, H, W) bool, true where some window of the analysis reads the signal entry; undefined when every one is.
  at::Tensor read_mask(const at::TensorOptions& options) const {
    auto axis = [](int64_t n, int64_t n_code, int64_t k, int64_t s, int64_t p) {
      std::vector<bool> read(n, false);
      for (int64_t j = 0; j < n_code; ++j)
        for (int64_t i = std::max<int64_t>(j * s - p, 0); i < std::min(j * s - p + k, n); ++i) read[i] = true;
      return read;
    };
    const std::vector<bool> rows = axis(signal_h, code_h, kh, stride[0], padding[0]);
    const std::vector<bool> cols = axis(signal_w, code_w, kw, stride[1], padding[1]);
    auto all = [](const std::vector<bool>& v) { return std::all_of(v.begin(), v.end(), [](bool b) { return b; }); };
    if (all(rows) && all(cols)) return {};
    at::Tensor mask = at::empty({1, 1, signal_h, signal_w}, options.dtype(at::kBool).device(at::kCPU));
    bool* m = mask.data_ptr<bool>();
    for (int64_t i = 0; i < signal_h; ++i)
      for (int64_t j = 0; j < signal_w; ++j) m[i * signal_w + j] = rows[i] && cols[j];
    return mask;
  }

  // The weight gradient of the analysis signal_side -> code_side, shaped like w.
  at::Tensor weight_grad(const at::Tensor& signal_side, const at::Tensor& code_side, const at::Tensor& w) const {
    if (dense) {
      const int64_t b = code_side.size(0), cc = w.size(0), k = w.size(1) * w.size(2) * w.size(3);
      return at::mm(code_side.reshape({b, cc}).t(), signal_side.reshape({b, k})).view(w.sizes());
    }
    return std::get<1>(at::convolution_backward(operand(code_side), operand(signal_side), operand(w),
                                                std::nullopt, stride, padding, {1, 1}, false, {0, 0}, 1,
                                                {false, true, false}));
  }
};

}  // namespace ml_ista
}  // namespace dsc_kernels
