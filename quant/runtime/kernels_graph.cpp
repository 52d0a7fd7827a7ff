// The kernels of the graph ops: grouped and depthwise Conv2d, Add, Concat, GlobalAvgPool2d and Clamp.
// Each has a reference form on (N, C, H, W) codes (the definition) and a channels-last form for the
// executor's fast path, equal to it bit for bit. The depthwise conv runs in one pass, requantized: 16 channels
// at a time on the AVX-512 paths (kernels_avx512.cpp, depthwise_block), 8 on AvxVnni (kernels_avxvnni.cpp,
// depthwise_block8), with AVX2 on the Avx2 path and for K > 7 (kernels_avx2.cpp, depthwise_requantize_avx2); the
// Add 16 codes per step with AVX-512; GlobalAvgPool2d sums its channels with AVX2 (channel_sums_avx2).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"
#include "quant/runtime/requantize.h"

namespace lowbit::quant::runtime {

// ---- Grouped Conv2d -----------------------------------------------------------------------------------

// Exercise 11 (docs/exercises/11-depthwise-conv.md): the student build compiles
// docs/exercises/student/ex11_qconv2d_grouped_ref.cpp instead of this definition.
#ifndef LOWBIT_EXERCISES
void qconv2d_grouped_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w,
                         int weight_bits, std::span<const int32_t> b, std::span<int32_t> acc, const ConvShape& s,
                         int threads) {
  const int64_t ho = pooled_size(s.height, s.kernel, s.stride, s.padding);
  const int64_t wo = pooled_size(s.width, s.kernel, s.stride, s.padding);
  const int64_t group_in = s.channels / s.groups, group_out = s.out / s.groups;
  const int64_t row_length = group_in * s.kernel * s.kernel;
  parallel_for(s.n, threads, [&](int64_t i) {
    for (int64_t p = 0; p < ho * wo; ++p) {
      const int64_t oh = p / wo, ow = p % wo;
      for (int64_t o = 0; o < s.out; ++o) {
        const int64_t first_channel = o / group_out * group_in;  // the group's input channels start here
        int32_t sum = b[o];
        for (int64_t ci = 0; ci < group_in; ++ci) {
          for (int64_t kh = 0; kh < s.kernel; ++kh) {
            for (int64_t kw = 0; kw < s.kernel; ++kw) {
              const int64_t ih = oh * s.stride - s.padding + kh, iw = ow * s.stride - s.padding + kw;
              const bool inside = ih >= 0 && ih < s.height && iw >= 0 && iw < s.width;
              const int32_t code =
                  inside ? x[((i * s.channels + first_channel + ci) * s.height + ih) * s.width + iw] : x_zero_point;
              sum += weight_code(w, weight_bits, row_length, o, (ci * s.kernel + kh) * s.kernel + kw) *
                     (code - x_zero_point);
            }
          }
        }
        acc[(i * ho * wo + p) * s.out + o] = sum;
      }
    }
  });
}
#endif  // LOWBIT_EXERCISES

GroupedConvWeights pack_grouped_conv(std::span<const int8_t> w, int weight_bits, const ConvShape& s) {
  GroupedConvWeights packed;
  const int64_t group_in = s.channels / s.groups, taps = s.kernel * s.kernel;
  const int64_t row_length = group_in * taps;
  packed.codes.resize(static_cast<size_t>(taps * group_in * s.out));
  for (int64_t o = 0; o < s.out; ++o)
    for (int64_t ci = 0; ci < group_in; ++ci)
      for (int64_t t = 0; t < taps; ++t)
        packed.codes[static_cast<size_t>((t * group_in + ci) * s.out + o)] =
            static_cast<int8_t>(weight_code(w, weight_bits, row_length, o, ci * taps + t));
  return packed;
}

void qconv2d_grouped_nhwc(std::span<const int8_t> x, int32_t x_zero_point, const GroupedConvWeights& w,
                          std::span<const int32_t> b, std::span<int32_t> acc, const ConvShape& s, int threads) {
  const int64_t ho = pooled_size(s.height, s.kernel, s.stride, s.padding);
  const int64_t wo = pooled_size(s.width, s.kernel, s.stride, s.padding);
  const int64_t group_in = s.channels / s.groups, group_out = s.out / s.groups;
  const bool depthwise = group_in == 1 && group_out == 1;
  parallel_for(s.n * ho * wo, threads, [&](int64_t row) {
    const int64_t i = row / (ho * wo), oh = row / wo % ho, ow = row % wo;
    int32_t* sum = acc.data() + row * s.out;
    std::copy(b.begin(), b.begin() + s.out, sum);
    for (int64_t kh = 0; kh < s.kernel; ++kh) {
      const int64_t ih = oh * s.stride - s.padding + kh;
      if (ih < 0 || ih >= s.height) continue;  // padding holds z_in: it adds w·(z_in − z_in) = 0
      for (int64_t kw = 0; kw < s.kernel; ++kw) {
        const int64_t iw = ow * s.stride - s.padding + kw;
        if (iw < 0 || iw >= s.width) continue;
        const int8_t* pixel = x.data() + ((i * s.height + ih) * s.width + iw) * s.channels;
        const int8_t* taps = w.codes.data() + (kh * s.kernel + kw) * group_in * s.out;
        if (depthwise) {  // one input channel per output channel: channel c reads channel c
          for (int64_t c = 0; c < s.out; ++c) sum[c] += taps[c] * (pixel[c] - x_zero_point);
        } else {
          for (int64_t ci = 0; ci < group_in; ++ci)
            for (int64_t o = 0; o < s.out; ++o)
              sum[o] += taps[ci * s.out + o] * (pixel[o / group_out * group_in + ci] - x_zero_point);
        }
      }
    }
  });
}

bool depthwise_in_one_pass(const ConvShape& s, KernelPath path) {
  return path != KernelPath::Ref && cpu_supports(path) && s.groups == s.channels && s.out == s.channels;
}

void qconv2d_depthwise_requantized(std::span<const int8_t> x, int32_t x_zero_point, const GroupedConvWeights& w,
                                   std::span<const int32_t> b, const Requant& rq, std::span<int8_t> y,
                                   const ConvShape& s, int threads, KernelPath path) {
  if (!depthwise_in_one_pass(s, path))
    throw RuntimeError(std::string("qconv2d_depthwise_requantized: not a depthwise conv on a fast path (") +
                       kernel_path_name(path) + "); use qconv2d_grouped_nhwc and requantize_to_nchw");
  const bool small = s.kernel * s.kernel <= detail::kMaxDepthwiseTaps;
  if (detail::uses_avx512(path) && small)
    detail::depthwise_requantize_avx512(x.data(), x_zero_point, w.codes.data(), b.data(), rq, y.data(), s, threads);
  else if (path == KernelPath::AvxVnni && small)
    detail::depthwise_requantize_avxvnni(x.data(), x_zero_point, w.codes.data(), b.data(), rq, y.data(), s, threads);
  else
    detail::depthwise_requantize_avx2(x.data(), x_zero_point, w.codes.data(), b.data(), rq, y.data(), s, threads);
}

// ---- Add and Concat (eq. 10) ----------------------------------------------------------------------------

void qadd(std::span<const int8_t> a, std::span<const int8_t> b, const Rescale& r, const Requant& rq,
          std::span<int8_t> y, int threads, KernelPath path) {
  const int32_t ma = r.multipliers[0], mb = r.multipliers[1];
  const int32_t za = r.zero_points[0], zb = r.zero_points[1];
  const int32_t shift = r.shift, z_out = rq.zero_point, act_min = rq.act_min, act_max = rq.act_max;
  const auto size = static_cast<int64_t>(y.size());
  if (path != KernelPath::Ref && cpu_has_avx2()) {  // the same formula, 8 (AVX-512) or 4 (AVX2) elements at a time
    const auto kernel = detail::uses_avx512(path) ? detail::add_requantize_avx512 : detail::add_requantize_avx2;
    const int64_t chunk = (size + threads - 1) / threads;
    parallel_for(threads, threads, [&](int64_t t) {
      const int64_t begin = std::min(size, t * chunk), end = std::min(size, begin + chunk);
      kernel(a.data() + begin, b.data() + begin, y.data() + begin, end - begin, r, rq);
    });
    return;
  }
  parallel_for(size, threads,
               [&](int64_t k) { y[k] = requantize_add(a[k], za, ma, b[k], zb, mb, shift, z_out, act_min, act_max); });
}

namespace {
// One input's codes rescaled to the output's (eq. 10 with one input); a copy when the rescale is the identity.
void rescale_codes(const int8_t* x, int8_t* y, int64_t count, int64_t x_stride, int64_t y_stride, int64_t width,
                   int32_t multiplier, int32_t zero_point, int shift, const Requant& rq) {
  const bool identity = zero_point == rq.zero_point && int64_t{multiplier} == int64_t{1} << shift &&
                        rq.act_min == -128 && rq.act_max == 127;
  for (int64_t k = 0; k < count; ++k) {
    const int8_t* src = x + k * x_stride;
    int8_t* dst = y + k * y_stride;
    if (identity) {
      std::memcpy(dst, src, static_cast<size_t>(width));
      continue;
    }
    for (int64_t j = 0; j < width; ++j) {
      const int64_t scaled = rounding_right_shift_half_away(int64_t{multiplier} * (src[j] - zero_point), shift);
      dst[j] = static_cast<int8_t>(std::clamp<int64_t>(rq.zero_point + scaled, rq.act_min, rq.act_max));
    }
  }
}
}  // namespace

void qconcat(std::span<const std::span<const int8_t>> inputs, std::span<const int64_t> channels, int64_t positions,
             int64_t n, const Rescale& r, const Requant& rq, std::span<int8_t> y, bool channels_last, int threads) {
  int64_t total = 0;
  for (const int64_t c : channels) total += c;
  const auto count = static_cast<int64_t>(inputs.size());
  parallel_for(n, threads, [&](int64_t i) {
    int64_t offset = 0;  // the first output channel of input k
    for (int64_t k = 0; k < count; ++k) {
      const int64_t c = channels[k];
      const int8_t* x = inputs[k].data() + i * c * positions;
      int8_t* out = y.data() + i * total * positions;
      if (channels_last) {  // (positions, c) rows into (positions, total) rows
        rescale_codes(x, out + offset, positions, c, total, c, r.multipliers[k], r.zero_points[k], r.shift, rq);
      } else {  // one block of c·positions codes
        rescale_codes(x, out + offset * positions, 1, 0, 0, c * positions, r.multipliers[k], r.zero_points[k],
                      r.shift, rq);
      }
      offset += c;
    }
  });
}

// ---- GlobalAvgPool2d and Clamp -------------------------------------------------------------------------

void global_avgpool(std::span<const int8_t> x, int32_t zero_point, std::span<int8_t> y, int64_t n, int64_t c,
                    int64_t positions, bool channels_last, int threads) {
  const auto count = static_cast<int32_t>(positions);
  // Σ_p (q − z) fits int32: validate() allows at most 2^23 positions, and 2^23 · 255 < 2^31. It is Σ_p q − P·z.
  // divide(d) is d / P rounded half away from zero: rounding_divide_half_away (the reference), or HalfAwayDivider.
  const auto average = [&](int32_t sum, const auto& divide) {
    return static_cast<int8_t>(std::clamp(zero_point + divide(sum - count * zero_point), -128, 127));
  };
  const HalfAwayDivider fast_divide(count);
  const auto reference_divide = [count](int32_t d) { return rounding_divide_half_away(d, count); };
  parallel_for(n, threads, [&](int64_t i) {
    if (channels_last) {  // the fast paths (all have AVX2): position by position, each row of C codes added at once
      std::vector<int32_t> sums(static_cast<size_t>(c));
      detail::channel_sums_avx2(x.data() + i * positions * c, positions, c, sums.data());
      for (int64_t ch = 0; ch < c; ++ch) y[i * c + ch] = average(sums[static_cast<size_t>(ch)], fast_divide);
      return;
    }
    for (int64_t ch = 0; ch < c; ++ch) {
      int32_t sum = 0;
      for (int64_t p = 0; p < positions; ++p) sum += x[(i * c + ch) * positions + p];
      y[i * c + ch] = average(sum, reference_divide);
    }
  });
}

void clamp_codes(std::span<const int8_t> x, int32_t lo, int32_t hi, std::span<int8_t> y, int threads) {
  const auto size = static_cast<int64_t>(y.size());
  parallel_for(size, threads, [&](int64_t k) { y[k] = static_cast<int8_t>(std::clamp<int32_t>(x[k], lo, hi)); });
}

}  // namespace lowbit::quant::runtime
