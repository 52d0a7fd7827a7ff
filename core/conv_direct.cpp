// Stride-1 convolutions straight from zero-padded planes (core/conv_direct.h): the forward (conv_block, also
// dx) and dw (dw_block, further down).
//
// im2col + sgemm copies every input pixel K² times into the columns and then reads them again; for the
// small channel counts of lenet5, convbn and resnet8 that copy costs about as much as the multiply-adds
// (resnet8's fp32 inference: 25% in im2col, 42% in sgemm). Here the multiply-adds read the padded planes
// themselves. With WP = W + 2·padding the padded width, output (oy, ox) is numbered q = oy·WP + ox and its
// tap (ki, kj) of input channel ci is
//   xp[ci][q + ki·WP + kj]
// so for every tap, 16 consecutive outputs q .. q + 15 read 16 consecutive floats of the plane: one vector
// load, whatever the row boundaries. The price is the columns ox in [OW, WP) of every output row: computed
// (from the next row's pixels) and dropped, K − 1 of every WP, 2 of 30 for a 3 x 3 kernel on 28 x 28.
//
// The micro-kernel keeps 4 output channels x V vectors of 16 outputs in 4·V zmm accumulators (V <= 6:
// 24 accumulators, 6 inputs, 1 weight in the 32 registers). For each input channel and tap it loads V
// input vectors once and uses each for the 4 channels: 4·V multiply-adds for V loads and 4 broadcasts.
// Each output is one chain of fused multiply-adds over (ci, ki, kj) in that order, from 0; the bias is
// added last. (sgemm sums in its own blocked order, so the two paths differ in the last bits.)
#include "core/conv_direct.h"

#include <immintrin.h>

#include <algorithm>

namespace lowbit::ops::detail {

namespace {

#define LOWBIT_AVX512F __attribute__((target("avx512f,fma")))

constexpr int64_t kLanes = 16;      // floats per zmm
constexpr int64_t kMaxVectors = 6;  // V

// Output vectors [q, q + 16·V) of the kBlockChannels channels whose packed weights start at w, for the C
// padded planes at x (`plane` floats apart, rows `width` apart); stored at y, channel rows `y_stride` apart.
template <int V>
LOWBIT_AVX512F void conv_block(const float* x, int64_t plane, int64_t width, int64_t c, int64_t k, const float* w,
                               float* y, int64_t y_stride) {
  __m512 acc[kBlockChannels][V];
  for (auto& channel : acc)
    for (auto& a : channel) a = _mm512_setzero_ps();
  for (int64_t ci = 0; ci < c; ++ci, x += plane)
    for (int64_t ki = 0; ki < k; ++ki)
      for (int64_t kj = 0; kj < k; ++kj, w += kBlockChannels) {
        const float* src = x + ki * width + kj;
        __m512 in[V];
#pragma GCC unroll 6
        for (int v = 0; v < V; ++v) in[v] = _mm512_loadu_ps(src + kLanes * v);
#pragma GCC unroll 4
        for (int64_t o = 0; o < kBlockChannels; ++o) {
          const __m512 weight = _mm512_set1_ps(w[o]);
#pragma GCC unroll 6
          for (int v = 0; v < V; ++v) acc[o][v] = _mm512_fmadd_ps(weight, in[v], acc[o][v]);
        }
      }
  for (int64_t o = 0; o < kBlockChannels; ++o)
#pragma GCC unroll 6
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + o * y_stride + kLanes * v, acc[o][v]);
}

using Block = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, float*, int64_t);
constexpr Block kBlocks[kMaxVectors] = {&conv_block<1>, &conv_block<2>, &conv_block<3>,
                                        &conv_block<4>, &conv_block<5>, &conv_block<6>};

// dw as a GEMM whose B operand is read from the padded planes, no im2col: row j = (ci·K + ki)·K + kj of
// dw_t (C·K·K, OUTP) gets, for the 16·NV output channels [16·v0, ...),
//   Σ_{oy, ox} xp[ci][(oy + ki)·WP + ox + kj] · dy_t[oy·OW + ox][o]
// dy_t is dy transposed to (OH·OW, OUTP), so that 16 output channels are one vector. The kernel takes
// R kernel rows (ci, ki), given as pointers to their first tap, and their K taps each: NV·R·K
// accumulators (24 at most), NV vector loads and R·K broadcasts per output pixel.
template <int NV, int R, int K>
LOWBIT_AVX512F void dw_block(const float* const* rows, const float* dy_t, int64_t outp, int64_t oh, int64_t ow,
                             int64_t width, float* dw_t) {
  __m512 acc[NV][R * K];
  for (auto& vector : acc)
    for (auto& a : vector) a = _mm512_setzero_ps();
  const float* row[R];
  for (int r = 0; r < R; ++r) row[r] = rows[r];
  for (int64_t oy = 0; oy < oh; ++oy)
    for (int64_t ox = 0; ox < ow; ++ox) {
      const float* d = dy_t + (oy * ow + ox) * outp;
      __m512 dv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) dv[v] = _mm512_loadu_ps(d + kLanes * v);
      const int64_t at = oy * width + ox;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 5
        for (int kj = 0; kj < K; ++kj) {
          const __m512 xv = _mm512_set1_ps(row[r][at + kj]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[v][r * K + kj] = _mm512_fmadd_ps(dv[v], xv, acc[v][r * K + kj]);
        }
    }
  for (int j = 0; j < R * K; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* out = dw_t + j * outp + kLanes * v;
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), acc[v][j]));
    }
}

// The kernels for K = 3 and 5 (direct_dw_pays): R as many kernel rows as 24 accumulators allow (NV·R·K <= 24),
// at least one; every R is 8, 4, 2 or 1, so dw_rows_padded's multiple of 8 suits them all.
using DwBlock = void (*)(const float* const*, const float*, int64_t, int64_t, int64_t, int64_t, float*);
struct DwKernel {
  DwBlock run;
  int64_t rows;  // R
};
template <int NV, int K>
constexpr int kDwRows = std::max(1, 24 / (NV * K));
template <int K>
constexpr DwKernel kDwKernels[4] = {{&dw_block<1, kDwRows<1, K>, K>, kDwRows<1, K>},
                                    {&dw_block<2, kDwRows<2, K>, K>, kDwRows<2, K>},
                                    {&dw_block<3, kDwRows<3, K>, K>, kDwRows<3, K>},
                                    {&dw_block<4, kDwRows<4, K>, K>, kDwRows<4, K>}};
DwKernel dw_kernel(int64_t k, int64_t vectors) { return (k == 3 ? kDwKernels<3> : kDwKernels<5>)[vectors - 1]; }

int64_t wide_outputs(const DirectConvShape& s) {  // OH·WP, rounded up to whole vectors
  return (s.oh() * s.padded_width() + kLanes - 1) / kLanes * kLanes;
}
int64_t plane_size(const DirectConvShape& s) { return s.padded_height() * s.padded_width(); }
// The last vector of the last output row reads up to K − 1 + 15 floats past the last plane.
int64_t planes_size(const DirectConvShape& s) { return s.c * plane_size(s) + s.k + kLanes; }

// x (C, H, W) into C zero-padded planes and zero slack: planes_size(s) floats at xp. Row by row in vectors (a
// library copy per row of 7 to 28 floats was 3% of resnet8's fp32 inference).
LOWBIT_AVX512F void pad_planes(const float* x, const DirectConvShape& s, float* xp) {
  const int64_t width = s.padded_width(), plane = plane_size(s);
  std::fill_n(xp, planes_size(s), 0.f);
  for (int64_t ci = 0; ci < s.c; ++ci)
    for (int64_t iy = 0; iy < s.h; ++iy) {
      const float* src = x + (ci * s.h + iy) * s.w;
      float* dst = xp + ci * plane + (iy + s.padding) * width + s.padding;
      for (int64_t j = 0; j < s.w; j += kLanes) {
        const int64_t left = s.w - j;
        const auto mask = static_cast<__mmask16>(left >= kLanes ? 0xFFFF : (1u << left) - 1);
        _mm512_mask_storeu_ps(dst + j, mask, _mm512_maskz_loadu_ps(mask, src + j));
      }
    }
}

// dw_t's shape: (rows, OUTP), rows = C·K kernel rows rounded up to a multiple of 8 (every R), times K.
int64_t dw_outputs_padded(const DirectConvShape& s) { return (s.out + kLanes - 1) / kLanes * kLanes; }
int64_t dw_rows_padded(const DirectConvShape& s) { return (s.c * s.k + 7) / 8 * 8; }

// depthwise_direct's 16 outputs of row y, [ox0, ox0 + count): the taps of each output in the order of
// ops.cpp's depthwise_forward (ki, then kj), added to what y holds, one FMA per tap and 16 outputs. At stride 2
// output i reads columns 2i + kj: the 2·count − 1 floats from the window's start, and vpermt2ps keeps the even ones.
LOWBIT_AVX512F void depthwise_row_block(const float* xp, int64_t wp, const float* w, int64_t k, int64_t stride,
                                        int64_t oy, int64_t ox0, int64_t count, float* y) {
  const __mmask16 mask = static_cast<__mmask16>(count >= 16 ? 0xFFFF : (1u << count) - 1);
  const int64_t span = 2 * count - 1;  // stride 2: floats read per tap
  const __mmask16 low = static_cast<__mmask16>(span >= 16 ? 0xFFFF : (1u << span) - 1);
  const __mmask16 high = static_cast<__mmask16>(span > 16 ? (1u << (span - 16)) - 1 : 0);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  __m512 acc = _mm512_maskz_loadu_ps(mask, y + ox0);
  for (int64_t ki = 0; ki < k; ++ki) {
    const float* row = xp + (oy * stride + ki) * wp + ox0 * stride;
    for (int64_t kj = 0; kj < k; ++kj) {
      const __m512 taps = stride == 1 ? _mm512_maskz_loadu_ps(mask, row + kj)
                                      : _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(low, row + kj), even,
                                                               _mm512_maskz_loadu_ps(high, row + kj + 16));
      acc = _mm512_fmadd_ps(_mm512_set1_ps(w[ki * k + kj]), taps, acc);
    }
  }
  _mm512_mask_storeu_ps(y + ox0, mask, acc);
}

bool cpu_has_avx512f() {
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return available;
}

}  // namespace

bool direct_conv_pays(const DirectConvShape& s) { return cpu_has_avx512f() && s.c * s.k * s.k >= 16; }

const char* direct_conv_description() {
  return cpu_has_avx512f() ? "conv2d: direct kernels (AVX-512) where they pay" : "conv2d: im2col + sgemm (no AVX-512)";
}

std::vector<float> pack_direct_weights(const float* w, const DirectConvShape& s) {
  const int64_t taps = s.c * s.k * s.k, blocks = (s.out + kBlockChannels - 1) / kBlockChannels;
  std::vector<float> packed(static_cast<size_t>(blocks * taps * kBlockChannels), 0.f);
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t t = 0; t < taps; ++t)
      packed[static_cast<size_t>(((o / kBlockChannels) * taps + t) * kBlockChannels + o % kBlockChannels)] =
          w[o * taps + t];
  return packed;
}

int64_t direct_conv_scratch(const DirectConvShape& s) { return planes_size(s) + kBlockChannels * wide_outputs(s); }

void conv_direct(const float* x, const std::vector<float>& packed, const float* b, float* y, const DirectConvShape& s,
                 float* scratch) {
  const int64_t width = s.padded_width(), plane = plane_size(s), taps = s.c * s.k * s.k;
  const int64_t wide = wide_outputs(s), vectors = wide / kLanes, oh = s.oh(), ow = s.ow();
  float* xp = scratch;                   // the zero-padded planes, then slack (zeros: the dropped columns read it)
  float* yw = scratch + planes_size(s);  // (kBlockChannels, wide): the block's outputs, junk columns included
  pad_planes(x, s, xp);
  for (int64_t o0 = 0; o0 < s.out; o0 += kBlockChannels) {
    const float* w = packed.data() + o0 * taps;
    for (int64_t v = 0; v < vectors; v += kMaxVectors) {
      const int64_t count = std::min(kMaxVectors, vectors - v);
      kBlocks[count - 1](xp + v * kLanes, plane, width, s.c, s.k, w, yw + v * kLanes, wide);
    }
    for (int64_t o = o0; o < std::min(s.out, o0 + kBlockChannels); ++o) {  // drop the junk columns, add the bias
      const float bias = b != nullptr ? b[o] : 0.f;
      const float* src = yw + (o - o0) * wide;
      float* dst = y + o * oh * ow;
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) dst[oy * ow + ox] = src[oy * width + ox] + bias;
    }
  }
}

// With fewer than 16 output channels most lanes of each accumulator would be zero padding (lenet5's first conv,
// 6 channels: its backward 0.35-0.50 ms through im2col + sgemm, 0.87-1.18 ms here); with fewer than 16 taps
// per output, transposing dy costs more than the multiply-adds (convbn's first conv, one input channel: 0.39-0.59
// ms through im2col + sgemm, 1.06-1.26 here).
bool direct_dw_pays(const DirectConvShape& s) {
  return direct_conv_pays(s) && (s.k == 3 || s.k == 5) && s.out >= kLanes;
}

int64_t direct_dw_size(const DirectConvShape& s) { return dw_rows_padded(s) * s.k * dw_outputs_padded(s); }

int64_t direct_dw_scratch(const DirectConvShape& s) { return planes_size(s) + s.oh() * s.ow() * dw_outputs_padded(s); }

void conv_direct_dw(const float* x, const float* dy, float* dw_t, const DirectConvShape& s, float* scratch) {
  const int64_t outp = dw_outputs_padded(s), pixels = s.oh() * s.ow(), plane = plane_size(s);
  float* xp = scratch;
  float* dy_t = scratch + planes_size(s);  // (OH·OW, OUTP), the channels past OUT zero
  pad_planes(x, s, xp);
  // In blocks of 16 pixels, so that the 16 rows of dy_t being written stay in L1 (the plain transpose,
  // every store a new cache line, took 7 times as long as dw_block for convbn's first conv).
  for (int64_t p0 = 0; p0 < pixels; p0 += kLanes) {
    const int64_t p1 = std::min(pixels, p0 + kLanes);
    for (int64_t o = 0; o < s.out; ++o)
      for (int64_t p = p0; p < p1; ++p) dy_t[p * outp + o] = dy[o * pixels + p];
    for (int64_t p = p0; p < p1; ++p) std::fill(dy_t + p * outp + s.out, dy_t + (p + 1) * outp, 0.f);
  }
  for (int64_t v0 = 0; v0 < outp / kLanes; v0 += 4) {
    const DwKernel kernel = dw_kernel(s.k, std::min<int64_t>(4, outp / kLanes - v0));
    for (int64_t row0 = 0; row0 < dw_rows_padded(s); row0 += kernel.rows) {
      const float* rows[8];
      for (int64_t r = 0; r < kernel.rows; ++r) {  // kernel row (ci, ki); the padding rows read plane 0, unused
        const int64_t row = row0 + r;
        rows[r] = row < s.c * s.k ? xp + (row / s.k) * plane + (row % s.k) * s.padded_width() : xp;
      }
      kernel.run(rows, dy_t + v0 * kLanes, outp, s.oh(), s.ow(), s.padded_width(),
                 dw_t + row0 * s.k * outp + v0 * kLanes);
    }
  }
}

void add_direct_dw(const float* dw_t, float* dw, const DirectConvShape& s) {
  const int64_t taps = s.c * s.k * s.k, outp = dw_outputs_padded(s);
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t j = 0; j < taps; ++j) dw[o * taps + j] += dw_t[j * outp + o];
}

bool depthwise_direct_runs(int64_t stride) { return cpu_has_avx512f() && (stride == 1 || stride == 2); }

void depthwise_direct(const float* xp, int64_t wp, const float* w, int64_t k, int64_t stride, float* y, int64_t oh,
                      int64_t ow) {
  for (int64_t oy = 0; oy < oh; ++oy, y += ow)
    for (int64_t ox0 = 0; ox0 < ow; ox0 += 16)
      depthwise_row_block(xp, wp, w, k, stride, oy, ox0, std::min<int64_t>(16, ow - ox0), y);
}

}  // namespace lowbit::ops::detail
