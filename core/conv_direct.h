// A stride-1 convolution without im2col: AVX-512 multiply-adds straight from zero-padded planes, for the forward
// (and dx, which is such a convolution too) and for dw; and the depthwise forward at stride 1 and 2. ops::conv2d
// (core/ops.cpp) uses them where they run and pay, and im2col + sgemm elsewhere; both compute the same sums (in another
// order, so the last bits differ), and tests/test_core_ops.cpp holds them to plain loops.
#pragma once

#include <cstdint>
#include <vector>

namespace lowbit::ops::detail {

// The sizes of one image's convolution: (C, H, W) in, OUT channels out, K x K kernel, stride 1, zero padding.
struct DirectConvShape {
  int64_t c, h, w, out, k, padding;
  int64_t padded_width() const { return w + 2 * padding; }
  int64_t padded_height() const { return h + 2 * padding; }
  int64_t oh() const { return padded_height() - k + 1; }
  int64_t ow() const { return padded_width() - k + 1; }
};

// True if this CPU (and OS) runs conv_direct (it has AVX-512F) and conv_direct is the faster way for s: with
// fewer than 16 taps per output (C·K², e.g. one input channel and 3 x 3) each accumulator gets too few
// multiply-adds to pay for writing the outputs twice (convbn's first conv, 1 -> 32 channels on 28 x 28, batch 64:
// 0.37-0.46 ms through im2col + sgemm, 0.60-0.63 ms here; lenet5's 1 -> 6 channels, 5 x 5: 0.34-0.37 ms, here
// 0.27-0.31).
bool direct_conv_pays(const DirectConvShape& s);

// Which way stride-1 convolutions run here, for train's first line and the benchmarks, e.g.
// "conv2d: direct kernels (AVX-512) where they pay".
const char* direct_conv_description();

// The weights (OUT, C, K, K) re-laid out for conv_direct, once per call of conv2d: blocks of kBlockChannels
// output channels, (C, K, K, kBlockChannels) each, the missing channels of the last block zero.
inline constexpr int64_t kBlockChannels = 4;
std::vector<float> pack_direct_weights(const float* w, const DirectConvShape& s);

// Floats of scratch that conv_direct needs.
int64_t direct_conv_scratch(const DirectConvShape& s);

// One image: x is (C, H, W), packed from pack_direct_weights, b is (OUT) or null; y is (OUT, OH, OW) =
// the convolution + b. Requires direct_conv_pays(s).
void conv_direct(const float* x, const std::vector<float>& packed, const float* b, float* y, const DirectConvShape& s,
                 float* scratch);

// dw without im2col, for K = 3 and 5 and at least 16 output channels (direct_dw_pays): conv_direct_dw adds one
// image's
//   dw[o][ci][ki][kj] = Σ_{oy, ox} dy[o][oy][ox] · x[ci][oy − padding + ki][ox − padding + kj]
// to dw_t, which holds it transposed and padded (direct_dw_size floats, zeroed by the caller); x is (C, H, W),
// dy (OUT, OH, OW). add_direct_dw then adds dw_t to dw (OUT, C, K, K).
bool direct_dw_pays(const DirectConvShape& s);
int64_t direct_dw_size(const DirectConvShape& s);
int64_t direct_dw_scratch(const DirectConvShape& s);
void conv_direct_dw(const float* x, const float* dy, float* dw_t, const DirectConvShape& s, float* scratch);
void add_direct_dw(const float* dw_t, float* dw, const DirectConvShape& s);

// The depthwise forward (one input channel per group) of one plane on AVX-512, where depthwise_direct_runs
// (stride 1 or 2): xp is the zero-padded plane, rows wp floats apart, w is (K, K), y (OH, OW) += the convolution
// (y holds the bias). ops.cpp's depthwise_forward is the same loop in plain C++, for other strides and CPUs;
// 16 outputs of a row per vector here, each sum in a register over the K² taps (one FMA each, so the last bits
// differ from the plain loop's separate multiply and add).
bool depthwise_direct_runs(int64_t stride);
void depthwise_direct(const float* xp, int64_t wp, const float* w, int64_t k, int64_t stride, float* y, int64_t oh,
                      int64_t ow);

}  // namespace lowbit::ops::detail
