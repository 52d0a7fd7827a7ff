// The forward of a stride-1 convolution straight from zero-padded planes (core/conv_direct.h).
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

int64_t wide_outputs(const DirectConvShape& s) {  // OH·WP, rounded up to whole vectors
  return (s.oh() * s.padded_width() + kLanes - 1) / kLanes * kLanes;
}
int64_t plane_size(const DirectConvShape& s) { return s.padded_height() * s.padded_width(); }
// The last vector of the last output row reads up to K − 1 + 15 floats past the last plane.
int64_t planes_size(const DirectConvShape& s) { return s.c * plane_size(s) + s.k + kLanes; }

}  // namespace

bool direct_conv_pays(const DirectConvShape& s) {
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return available && s.c * s.k * s.k >= 16;
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
  std::fill_n(xp, planes_size(s), 0.f);
  for (int64_t ci = 0; ci < s.c; ++ci)
    for (int64_t iy = 0; iy < s.h; ++iy)
      std::copy_n(x + (ci * s.h + iy) * s.w, s.w, xp + ci * plane + (iy + s.padding) * width + s.padding);
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

}  // namespace lowbit::ops::detail
