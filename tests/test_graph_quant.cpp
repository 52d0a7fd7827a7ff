// Quantizing graphs: the integer graph ops of residual, depthwise, grouped and concatenating models against
// their float definitions and their reference kernels, and a property test over random architectures
// (prepare → calibrate → QAT steps → convert → save → load → run).
#include <doctest/doctest.h>
#include <fmt/format.h>

#include <climits>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/normalize.h"
#include "core/safetensors.h"
#include "core/ops.h"
#include "core/rng.h"
#include "kernel_paths.h"
#include "nn/graph.h"
#include "optim/optimizer.h"
#include "quant/convert.h"
#include "quant/int_model.h"
#include "quant/qat.h"
#include "quant/runtime/executor.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/requantize.h"
#include "random_graphs.h"

using namespace lowbit;
namespace rt = lowbit::quant::runtime;
using lowbit::test::random_description;

namespace {

int32_t random_in(Rng& rng, int32_t lo, int32_t hi) {
  return lo + static_cast<int32_t>(rng.below(static_cast<uint64_t>(hi - lo + 1)));
}

std::vector<int8_t> random_codes(Rng& rng, size_t count, int32_t lo = -128, int32_t hi = 127) {
  std::vector<int8_t> out(count);
  for (int8_t& v : out) v = static_cast<int8_t>(random_in(rng, lo, hi));
  return out;
}

// The real value of an output code at (scale, zero point) against the float result, in output LSBs.
double lsb_error(int8_t code, int32_t zero_point, double real, double scale) {
  return std::fabs((code - zero_point) - real / scale);
}

}  // namespace

// ---- Add -----------------------------------------------------------------------------------------------

TEST_CASE("QAdd: within one output LSB of the float sum over the whole scale-ratio range, zero points at both ends") {
  Rng rng(1);
  // s_a / s_out and s_b / s_out from far below 1 to above 1, in both orders.
  const std::vector<std::pair<float, float>> ratios = {
      {1.f, 1.f}, {0.5f, 0.25f}, {3.7f, 0.01f}, {0.01f, 3.7f}, {1e-4f, 0.8f}, {12.f, 9.f}, {0.3f, 0.3f}, {200.f, 1.f}};
  for (const auto& [ra, rb] : ratios) {
    for (const int32_t za : {-128, 0, 127}) {
      for (const int32_t z_out : {-128, 5, 127}) {
        CAPTURE(ra);
        CAPTURE(rb);
        CAPTURE(za);
        CAPTURE(z_out);
        const float s_out = 0.05f;
        const float sa = ra * s_out, sb = rb * s_out;
        const int32_t zb = -za / 2;
        rt::Rescale r = quant::rescale_from_scales(std::vector<float>{quant::rescale_scale(sa, s_out),
                                                                     quant::rescale_scale(sb, s_out)});
        r.zero_points = {za, zb};
        rt::Requant rq;
        rq.zero_point = z_out;
        const auto a = random_codes(rng, 257), b = random_codes(rng, 257);
        std::vector<int8_t> y(a.size());
        rt::qadd(a, b, r, rq, y);
        for (size_t k = 0; k < a.size(); ++k) {
          const double real = double{sa} * (a[k] - za) + double{sb} * (b[k] - zb);
          const double code = std::clamp(real / s_out + z_out, -128.0, 127.0);
          // At most one rounding step away from the float result (0.5 LSB rounding + the multiplier's error).
          CHECK(std::fabs(y[k] - code) <= 1.0);
        }
      }
    }
  }
  // The fixed-point multipliers: the largest normalised, the other with the same shift.
  const rt::Rescale r = quant::rescale_from_scales(std::vector<float>{0.25f, 2.f});
  CHECK(r.multipliers[1] == (int32_t{1} << 30));
  CHECK(r.multipliers[0] == (int32_t{1} << 27));
  CHECK(r.shift == 29);
  CHECK_THROWS_AS(quant::rescale_from_scales(std::vector<float>{0.f, 1.f}), Error);
  // The worked Add of docs/quantization.md (eq. 10): M = 1.25 and 0.5, a − z_a = 7, b − z_b = −3, z_out = −10.
  rt::Rescale worked = quant::rescale_from_scales(std::vector<float>{1.25f, 0.5f});
  CHECK(worked.multipliers == std::vector<int32_t>{1342177280, 536870912});
  CHECK(worked.shift == 30);
  worked.zero_points = {2, -5};
  rt::Requant out;
  out.zero_point = -10;
  std::vector<int8_t> y(1);
  rt::qadd(std::vector<int8_t>{9}, std::vector<int8_t>{-8}, worked, out, y);
  CHECK(y[0] == -3);
}

TEST_CASE("QAdd: the AVX2 and AVX-512 kernels == the reference on every path, for any multipliers, shift, zero "
          "points and clamp, in place too") {
  Rng rng(11);
  const auto paths = test::fast_paths_to_test();
  const auto draw = [&](int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo + 1))); };
  for (int trial = 0; trial < 400; ++trial) {
    rt::Rescale r;
    // Every shift eq. 10 allows. Multipliers up to 2^31 − 1 (odd trials: most sums saturate) or up to about
    // 2^(n+1) (even trials: sums land inside the int8 range and ties, x·2^(−n) = k + 1/2, are frequent); the
    // extremes are drawn often.
    r.shift = static_cast<int>(trial < 124 ? trial / 2 + 1 : draw(1, 62));
    const int64_t cap = trial % 2 == 1 ? INT32_MAX : std::min<int64_t>(INT32_MAX, int64_t{1} << std::min(r.shift + 1, 31));
    for (int i = 0; i < 2; ++i) {
      const int64_t pick = draw(0, 3);
      r.multipliers.push_back(static_cast<int32_t>(pick == 0 ? 0 : pick == 1 ? cap : draw(0, cap)));
      r.zero_points.push_back(static_cast<int32_t>(draw(-128, 127)));
      // Every fourth trial: multiples of 2^(n−2), so the sum is a multiple of 2^(n−2) and every other nonzero one
      // is an exact tie, negative ties included (the AVX-512 kernel's borrow when the low 16 bits are zero).
      if (trial % 4 == 2 && r.shift >= 2) {
        const int64_t unit = int64_t{1} << (r.shift - 2);
        r.multipliers.back() = static_cast<int32_t>(draw(0, std::min<int64_t>(7, INT32_MAX / unit)) * unit);
      }
    }
    rt::Requant rq;
    rq.zero_point = static_cast<int32_t>(draw(-128, 127));
    rq.act_min = static_cast<int32_t>(draw(-128, 0));
    rq.act_max = static_cast<int32_t>(draw(rq.act_min, 127));
    const auto size = static_cast<size_t>(draw(0, 200));  // lengths that are not multiples of 4, 8, 16 or 64
    const auto a = random_codes(rng, size), b = random_codes(rng, size);
    std::vector<int8_t> want(size);
    rt::qadd(a, b, r, rq, want, 1, rt::KernelPath::Ref);
    for (const rt::KernelPath path : paths) {
      for (const int threads : {1, 2, 3}) {
        const std::string path_name = rt::kernel_path_name(path);
        CAPTURE(path_name);
        CAPTURE(threads);
        CAPTURE(r.shift);
        std::vector<int8_t> got(size, 99);
        rt::qadd(a, b, r, rq, got, threads, path);
        CHECK(got == want);
        std::vector<int8_t> in_place = a;  // as the executor runs an Add: over its first input
        rt::qadd(in_place, b, r, rq, in_place, threads, path);
        CHECK(in_place == want);
      }
    }
  }
}

// ---- grouped / depthwise convolution ------------------------------------------------------------------

TEST_CASE("grouped and depthwise conv: channels-last kernels == reference, every stride, padding, width, thread "
          "count; the one-pass depthwise kernel == the reference requantized") {
  Rng rng(2);
  const auto paths = test::fast_paths_to_test();
  struct Case {
    int64_t channels, out, groups, kernel, stride, padding;
  };
  // Depthwise with 1 to 136 channels (the AVX-512 kernel's blocks of 64 and 16 channels, the 8-lane blocks of the
  // others, and their tails), K = 1, 2, 3, 5, 7 and 9 (too many
  // taps for the AVX-512 kernel: the AVX2 one runs it on every path). The one-pass kernel builds one set of operands
  // for 1 to 4 output rows (K = 5 at stride 1: 4; K = 1 or 5 at stride 2: 2), sets that HO = 7 and the threads' row
  // ranges cut short.
  const std::vector<Case> cases = {
      {7, 7, 7, 3, 1, 1},       {9, 9, 9, 3, 2, 1},    {13, 13, 13, 5, 1, 2}, {17, 34, 17, 3, 1, 0},
      {6, 9, 3, 3, 2, 1},       {8, 4, 2, 1, 1, 0},    {5, 10, 5, 2, 2, 0},   {33, 33, 33, 3, 1, 1},
      {4, 6, 2, 3, 1, 2},       {1, 1, 1, 3, 1, 1},    {16, 16, 16, 3, 1, 1}, {32, 32, 32, 3, 2, 1},
      {64, 64, 64, 3, 1, 0},    {20, 20, 20, 7, 1, 3}, {6, 6, 6, 2, 2, 0},    {18, 18, 18, 1, 1, 0},
      {3, 3, 3, 9, 1, 4},       {20, 20, 20, 7, 2, 3}, {8, 8, 8, 3, 3, 1},    {12, 12, 12, 7, 3, 0},
      {19, 19, 19, 1, 2, 0},    {21, 21, 21, 5, 2, 2}, {80, 80, 80, 3, 2, 1}, {136, 136, 136, 5, 1, 2},
      {128, 128, 128, 1, 1, 0}, {64, 64, 64, 7, 2, 3}};
  // 13 columns: the one-pass kernel computes 4 windows of a row at a time and the rest one by one (K = 7 at
  // stride 2 reads all 13 columns plus the padding); K = 5 and 7 take two groups of 4 kernel rows, K = 9 none.
  constexpr int64_t kH = 7, kW = 13;
  for (const Case& c : cases) {
    for (const int bits : {8, 4}) {
      CAPTURE(c.channels);
      CAPTURE(c.groups);
      CAPTURE(bits);
      const rt::ConvShape s{3, c.channels, kH, kW, c.out, c.kernel, c.stride, c.padding, c.groups};
      const int64_t row = c.channels / c.groups * c.kernel * c.kernel;
      std::vector<int8_t> codes = random_codes(rng, static_cast<size_t>(c.out * row), bits == 8 ? -127 : -8,
                                               bits == 8 ? 127 : 7);
      std::vector<int8_t> w = codes;
      if (bits == 4) {
        const auto row_bytes = static_cast<int64_t>(rt::int4_packed_size(row));
        w.assign(static_cast<size_t>(c.out * row_bytes), 0);
        for (int64_t o = 0; o < c.out; ++o)
          rt::pack_int4(std::span<const int8_t>(codes).subspan(o * row, row),
                        std::span<int8_t>(w).subspan(o * row_bytes, row_bytes));
      }
      std::vector<int32_t> bias(static_cast<size_t>(c.out));
      for (int32_t& b : bias) b = random_in(rng, -5000, 5000);
      const int32_t z = random_in(rng, -128, 127);
      const auto x = random_codes(rng, static_cast<size_t>(s.n * c.channels * kH * kW));
      const int64_t ho = rt::pooled_size(kH, c.kernel, c.stride, c.padding);
      const int64_t wo = rt::pooled_size(kW, c.kernel, c.stride, c.padding);
      std::vector<int32_t> want(static_cast<size_t>(s.n * ho * wo * c.out));
      rt::qconv2d_grouped_ref(x, z, w, bits, bias, want, s);
      // The direct definition, here once more in the plainest form (NCHW, no groups formula shared).
      const int64_t gi = c.channels / c.groups, go = c.out / c.groups;
      for (int64_t i = 0; i < s.n; ++i)
        for (int64_t o = 0; o < c.out; ++o)
          for (int64_t p = 0; p < ho * wo; ++p) {
            int64_t sum = bias[static_cast<size_t>(o)];
            for (int64_t ci = 0; ci < gi; ++ci)
              for (int64_t kh = 0; kh < c.kernel; ++kh)
                for (int64_t kw = 0; kw < c.kernel; ++kw) {
                  const int64_t ih = p / wo * c.stride - c.padding + kh, iw = p % wo * c.stride - c.padding + kw;
                  if (ih < 0 || ih >= kH || iw < 0 || iw >= kW) continue;
                  const int64_t channel = o / go * gi + ci;
                  sum += int64_t{codes[static_cast<size_t>(o * row + (ci * c.kernel + kh) * c.kernel + kw)]} *
                         (x[static_cast<size_t>(((i * c.channels + channel) * kH + ih) * kW + iw)] - z);
                }
            REQUIRE(want[static_cast<size_t>((i * ho * wo + p) * c.out + o)] == sum);
          }
      // Channels last (the plain loops of grouped convs), 1 to 3 threads.
      std::vector<int8_t> nhwc(x.size());
      for (int64_t i = 0; i < s.n; ++i)
        for (int64_t ch = 0; ch < c.channels; ++ch)
          for (int64_t q = 0; q < kH * kW; ++q)
            nhwc[static_cast<size_t>((i * kH * kW + q) * c.channels + ch)] =
                x[static_cast<size_t>((i * c.channels + ch) * kH * kW + q)];
      const rt::GroupedConvWeights packed = rt::pack_grouped_conv(w, bits, s);
      std::vector<rt::KernelPath> all = paths;
      all.push_back(rt::KernelPath::Ref);
      for (const int threads : {1, 2, 3}) {
        std::vector<int32_t> got(want.size());
        rt::qconv2d_grouped_nhwc(nhwc, z, packed, bias, got, s, threads);
        CHECK(got == want);
      }
      // Requantized in one pass: per-channel multipliers, shifts from 1 to 62 (most where codes land inside
      // the int8 range), any zero point and clamp; or, a third of the cases each, a folded ReLU (z_out = act_min)
      // and no activation (act_min = -128), with shifts of 33-44 only: the AVX-512 kernels' Form::ReluFolded and
      // Form::Signed.
      const int kind = static_cast<int>(rng.below(3));
      const bool relu = kind == 1, plain = kind == 2;
      rt::Requant rq;
      for (int64_t o = 0; o < c.out; ++o) {
        rq.multiplier.push_back(random_in(rng, int64_t{1} << 30, INT32_MAX));
        rq.shift.push_back(relu || plain               ? random_in(rng, 33, 44)
                           : random_in(rng, 0, 3) == 0 ? random_in(rng, 1, 62)
                                                       : random_in(rng, 28, 44));
      }
      rq.zero_point = random_in(rng, -128, 127);
      rq.act_min = random_in(rng, -128, 0);
      rq.act_max = random_in(rng, rq.act_min, 127);
      if (relu) rq.zero_point = rq.act_min;
      if (plain) rq.act_min = -128;
      CAPTURE(kind);
      std::vector<int8_t> want_codes(want.size());
      for (size_t e = 0; e < want.size(); ++e) {
        const auto o = static_cast<size_t>(static_cast<int64_t>(e) % c.out);
        want_codes[e] = rt::requantize(want[e], rq.multiplier[o], rq.shift[o], rq.zero_point, rq.act_min, rq.act_max);
      }
      const bool depthwise = c.groups == c.channels && c.out == c.channels;
      for (const rt::KernelPath path : all) {
        const bool one_pass = rt::depthwise_in_one_pass(s, path);
        CHECK(one_pass == (depthwise && path != rt::KernelPath::Ref));
        std::vector<int8_t> got(want.size(), 99);
        if (!one_pass) {
          CHECK_THROWS_WITH_AS(rt::qconv2d_depthwise_requantized(nhwc, z, packed, bias, rq, got, s, 1, path),
                               doctest::Contains("not a depthwise conv on a fast path"), rt::RuntimeError);
          continue;
        }
        for (const int threads : {1, 2, 3}) {
          CAPTURE(threads);
          std::fill(got.begin(), got.end(), int8_t{99});
          rt::qconv2d_depthwise_requantized(nhwc, z, packed, bias, rq, got, s, threads, path);
          CHECK(got == want_codes);
        }
      }
    }
  }
}

// ---- Concat, GlobalAvgPool2d, Clamp -------------------------------------------------------------------

TEST_CASE("Concat, GlobalAvgPool2d and Clamp: both layouts agree, within one LSB of the float result") {
  Rng rng(3);
  // Concat of 3 + 5 channels over 6 positions, the second input at another scale; a copy for the first.
  const int64_t n = 2, positions = 6;
  const std::vector<int64_t> channels = {3, 5};
  const auto a = random_codes(rng, static_cast<size_t>(n * 3 * positions));
  const auto b = random_codes(rng, static_cast<size_t>(n * 5 * positions));
  const float s_out = 0.1f, sb = 0.037f;
  rt::Rescale r = quant::rescale_from_scales(std::vector<float>{1.f, quant::rescale_scale(sb, s_out)});
  r.zero_points = {4, -20};
  rt::Requant rq;
  rq.zero_point = 4;
  std::vector<int8_t> nchw(static_cast<size_t>(n * 8 * positions)), nhwc(nchw.size());
  const std::vector<std::span<const int8_t>> parts = {a, b};
  rt::qconcat(parts, channels, positions, n, r, rq, nchw, false);
  // The same codes laid out channels last.
  const auto to_nhwc = [&](const std::vector<int8_t>& x, int64_t c) {
    std::vector<int8_t> y(x.size());
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t p = 0; p < positions; ++p)
          y[static_cast<size_t>((i * positions + p) * c + ch)] = x[static_cast<size_t>((i * c + ch) * positions + p)];
    return y;
  };
  const auto a_last = to_nhwc(a, 3), b_last = to_nhwc(b, 5);
  const std::vector<std::span<const int8_t>> parts_last = {a_last, b_last};
  rt::qconcat(parts_last, channels, positions, n, r, rq, nhwc, true);
  CHECK(to_nhwc(nchw, 8) == nhwc);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < 8; ++ch)
      for (int64_t p = 0; p < positions; ++p) {
        const int8_t got = nchw[static_cast<size_t>((i * 8 + ch) * positions + p)];
        if (ch < 3) {
          CHECK(got == a[static_cast<size_t>((i * 3 + ch) * positions + p)]);  // equal qparams: a copy
        } else {
          const int8_t q = b[static_cast<size_t>((i * 5 + ch - 3) * positions + p)];
          CHECK(lsb_error(got, 4, double{sb} * (q + 20), s_out) <= 0.5 + 1e-6);
        }
      }
  // GlobalAvgPool2d: the mean of each channel, rounded once, ties away from zero.
  const auto x = random_codes(rng, static_cast<size_t>(n * 3 * 7));
  std::vector<int8_t> pooled(static_cast<size_t>(n * 3)), pooled_last(pooled.size());
  rt::global_avgpool(x, -7, pooled, n, 3, 7, false);
  std::vector<int8_t> x_last(x.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < 3; ++ch)
      for (int64_t p = 0; p < 7; ++p) x_last[static_cast<size_t>((i * 7 + p) * 3 + ch)] = x[static_cast<size_t>((i * 3 + ch) * 7 + p)];
  rt::global_avgpool(x_last, -7, pooled_last, n, 3, 7, true);
  CHECK(pooled == pooled_last);
  for (int64_t i = 0; i < n * 3; ++i) {
    double sum = 0;
    for (int64_t p = 0; p < 7; ++p) sum += x[static_cast<size_t>(i * 7 + p)] + 7;
    CHECK(lsb_error(pooled[static_cast<size_t>(i)], -7, sum / 7, 1.0) <= 0.5 + 1e-9);
  }
  // Clamp: ReLU6 on codes of scale 0.05, zero point −100: [−100, quantize(6) = 20].
  std::vector<int8_t> clamped(x.size());
  rt::clamp_codes(x, -100, 20, clamped);
  for (size_t k = 0; k < x.size(); ++k) CHECK(clamped[k] == std::clamp<int>(x[k], -100, 20));
}

TEST_CASE("GlobalAvgPool2d channels last (AVX2 channel sums) == channels first, any width, up to 600 positions") {
  // The channels-last form runs on the fast paths only, which all have AVX2.
  if (!rt::cpu_supports(rt::KernelPath::Avx2)) {
    MESSAGE("skipped: this CPU lacks AVX2");
    return;
  }
  Rng rng(17);
  int64_t cases = 0;
  for (const int64_t c : {1, 15, 16, 17, 130, 256, 300})
    for (const int64_t positions : {1, 7, 49, 256, 257, 600})
      for (const int fill : {0, -128, 127}) {  // random codes, or every code at one end (the int16 sums' bounds)
        CAPTURE(c);
        CAPTURE(positions);
        CAPTURE(fill);
        const int64_t n = 2;
        auto x = random_codes(rng, static_cast<size_t>(n * c * positions));
        if (fill != 0) std::fill(x.begin(), x.end(), static_cast<int8_t>(fill));
        const auto z = static_cast<int32_t>(rng.below(256)) - 128;
        std::vector<int8_t> want(static_cast<size_t>(n * c)), got(want.size());
        rt::global_avgpool(x, z, want, n, c, positions, false);
        std::vector<int8_t> x_last(x.size());
        for (int64_t i = 0; i < n; ++i)
          for (int64_t ch = 0; ch < c; ++ch)
            for (int64_t p = 0; p < positions; ++p)
              x_last[static_cast<size_t>((i * positions + p) * c + ch)] =
                  x[static_cast<size_t>((i * c + ch) * positions + p)];
        rt::global_avgpool(x_last, z, got, n, c, positions, true, 2);
        CHECK(got == want);
        ++cases;
      }
  CHECK(cases == 7 * 6 * 3);
}

// ---- random architectures ------------------------------------------------------------------------------

namespace {

Tensor normalised(std::span<const uint8_t> pixels, const Shape& shape, const Normalization& norm) {
  Tensor t = Tensor::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = normalize_pixel(pixels[static_cast<size_t>(i)], norm);
  return t;
}

}  // namespace

TEST_CASE("random architectures: prepare → calibrate → QAT → convert → save → load → run agree within 1 LSB") {
  const auto paths = test::fast_paths_to_test();
  const Normalization norm{0.3f, 0.35f};
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("lowbit_graph_quant_{}", ::getpid());
  std::filesystem::create_directories(dir);
  Rng rng(2026);
  const std::vector<std::string> widths = {"w8a8", "w4a8", "w4a4", "w3a6"};
  int max_lsb = 0;
  int64_t logits = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string text = random_description(rng, index);
    const std::string bits = widths[static_cast<size_t>(index) % widths.size()];
    CAPTURE(index);
    CAPTURE(bits);
    CAPTURE(text);
    manual_seed(static_cast<uint64_t>(100 + index));
    nn::Model model(nn::parse_description(text, fmt::format("random description {}", index)));
    const Shape image = model.input_shape();
    const int64_t pixels = image[0] * image[1] * image[2], classes = model.description.classes;
    const auto batch_of = [&](int64_t n) {
      std::vector<uint8_t> p(static_cast<size_t>(n * pixels));
      for (uint8_t& v : p) v = static_cast<uint8_t>(rng.below(256));
      return p;
    };
    const Shape batch_shape = {16, image[0], image[1], image[2]};
    quant::QConfig config = quant::parse_bits(bits);
    auto qat = quant::prepare_qat(model, config);
    // Calibrate, then a few QAT steps (BatchNorm statistics, observers and weights all move).
    {
      quant::Calibrator calibrator(*qat);
      for (int b = 0; b < 2; ++b) calibrator.observe(normalised(batch_of(16), batch_shape, norm));
      calibrator.finish();
    }
    qat->train();
    qat->set_observing(true);
    optim::SGD sgd(qat->parameters(), {.lr = 0.01f, .momentum = 0.9f});
    for (int step = 0; step < 3; ++step) {
      std::vector<int32_t> labels(16);
      for (int32_t& l : labels) l = static_cast<int32_t>(rng.below(static_cast<uint64_t>(classes)));
      qat->zero_grad();
      ops::cross_entropy(qat->forward(normalised(batch_of(16), batch_shape, norm)), labels).backward();
      sgd.step();
    }
    qat->eval();
    qat->set_observing(false);
    const quant::IntModel converted = quant::convert(*qat, norm, image);
    const std::string path = (dir / fmt::format("random{}.int.safetensors", index)).string();
    quant::save_int_model(path, converted);
    const quant::IntModel loaded = quant::load_int_model(path);
    CHECK(loaded.description.nodes.size() == model.description.nodes.size());

    const int64_t n = 23;
    const auto images = batch_of(n);
    Tensor fq;
    {
      NoGradGuard no_grad;
      fq = qat->forward(normalised(images, {n, image[0], image[1], image[2]}, norm));
    }
    rt::Executor reference(loaded.graph, 1, rt::Executor::Kernels::Reference);
    const auto ref_span = reference.run(images, n);
    const std::vector<int8_t> want(ref_span.begin(), ref_span.end());
    // The converted graph (before saving) runs to the same codes: the reload is identical.
    rt::Executor before(converted.graph, 1, rt::Executor::Kernels::Reference);
    const auto before_span = before.run(images, n);
    CHECK(std::vector<int8_t>(before_span.begin(), before_span.end()) == want);
    // Fake-quant logits vs integer logits: at most 1 LSB apart on every logit.
    const int32_t z_out = loaded.graph.ops.back().requant.zero_point;
    for (int64_t k = 0; k < n * classes; ++k) {
      const int fq_code = static_cast<int>(std::lround(fq.data()[k] / loaded.output_scale)) + z_out;
      const int diff = std::abs(fq_code - want[static_cast<size_t>(k)]);
      max_lsb = std::max(max_lsb, diff);
      CHECK(diff <= 1);
    }
    logits += n * classes;
    // Every fast path, any thread count: bit for bit the reference.
    for (const rt::KernelPath kernel_path : paths) {
      for (const int threads : {1, 2, 3}) {
        CAPTURE(std::string(rt::kernel_path_name(kernel_path)));
        CAPTURE(threads);
        rt::Executor fast(loaded.graph, threads, kernel_path);
        const auto got = fast.run(images, n);
        CHECK(std::vector<int8_t>(got.begin(), got.end()) == want);
      }
    }
  }
  MESSAGE("random architectures: ", logits, " logits, largest fake-quant vs integer difference ", max_lsb, " LSB");
  std::filesystem::remove_all(dir);
}

// ---- corrupt version-4 files ---------------------------------------------------------------------------

TEST_CASE("a v4 file with graph ops: corrupt inputs, zero points and Add multipliers are refused on load") {
  // A small residual model with a Concat, calibrated and converted.
  manual_seed(5);
  nn::Model model(nn::parse_description(R"({"format": "lowbit-model", "version": 1, "name": "joins",
    "input": {"channels": 1, "height": 6, "width": 6}, "classes": 3, "nodes": [
      {"name": "stem", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1}, {"name": "r", "kind": "ReLU"},
      {"name": "c2", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1},
      {"name": "add", "kind": "Add", "inputs": ["c2", "r"]},
      {"name": "dw", "kind": "Conv2d", "out_channels": 4, "kernel": 3, "padding": 1, "groups": 4, "inputs": ["r"]},
      {"name": "cat", "kind": "Concat", "inputs": ["add", "dw"]},
      {"name": "gap", "kind": "GlobalAvgPool2d"}, {"name": "f", "kind": "Flatten"},
      {"name": "fc", "kind": "Linear", "out_features": 3}]})",
                                        "joins"));
  const Normalization norm{0.3f, 0.35f};
  auto qat = quant::prepare_qat(model, quant::parse_bits("w8a8"));
  {
    quant::Calibrator calibrator(*qat);
    Rng rng(6);
    std::vector<uint8_t> pixels(16 * 36);
    for (uint8_t& p : pixels) p = static_cast<uint8_t>(rng.below(256));
    calibrator.observe(normalised(pixels, {16, 1, 6, 6}, norm));
    calibrator.finish();
  }
  const quant::IntModel converted = quant::convert(*qat, norm, {1, 6, 6});
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("lowbit_graph_corrupt_{}", ::getpid());
  std::filesystem::create_directories(dir);
  const std::string good = (dir / "good.int.safetensors").string();
  quant::save_int_model(good, converted);
  CHECK(quant::load_int_model(good).graph.ops.size() == converted.graph.ops.size());
  // The index of the add and concat ops.
  size_t add = 0, cat = 0;
  for (size_t i = 0; i < converted.graph.ops.size(); ++i) {
    if (converted.graph.ops[i].kind == rt::OpKind::Add) add = i;
    if (converted.graph.ops[i].kind == rt::OpKind::Concat) cat = i;
  }
  REQUIRE(add > 0);
  REQUIRE(cat > 0);
  const auto refused = [&](auto&& edit) {
    StFile file = load_safetensors(good);
    nlohmann::json graph = nlohmann::json::parse(file.metadata.at("graph"));
    edit(graph, file);
    file.metadata["graph"] = graph.dump();
    const std::string path = (dir / "bad.int.safetensors").string();
    save_safetensors(path, file);
    std::string message;
    try {
      quant::load_int_model(path);
    } catch (const Error& e) {
      message = e.what();
    }
    return message;
  };
  const auto op_name = [&](size_t i) { return converted.graph.ops[i].name; };
  // A dangling input, an input that comes later (a cycle), an Add with one input.
  CHECK(refused([&](nlohmann::json& g, StFile&) { g["ops"][add]["inputs"][1] = "nowhere"; })
            .find("input 'nowhere' is not the name of an earlier op") != std::string::npos);
  CHECK(refused([&](nlohmann::json& g, StFile&) { g["ops"][add]["inputs"][0] = op_name(cat); })
            .find("is not the name of an earlier op") != std::string::npos);
  CHECK(refused([&](nlohmann::json& g, StFile&) { g["ops"][add]["inputs"] = {op_name(1)}; })
            .find("'inputs' must have 2 entries, found 1") != std::string::npos);
  // Zero points that do not chain, and of the wrong count.
  CHECK(refused([&](nlohmann::json& g, StFile&) {
          g["ops"][add]["input_zero_points"][1] = g["ops"][add]["input_zero_points"][1].get<int>() == 5 ? 6 : 5;
        }).find("input zero point") != std::string::npos);
  CHECK(refused([&](nlohmann::json& g, StFile&) { g["ops"][cat]["input_zero_points"] = {0}; })
            .find("'input_zero_points' must have 2 entries") != std::string::npos);
  // An Add whose scales give multipliers out of range: a scale of 2^31 (shift below 1) or of 0.
  CHECK(refused([&](nlohmann::json&, StFile& f) {
          for (auto& [name, t] : f.tensors)
            if (name == fmt::format("ops.{}.scale", add)) {
              const std::vector<float> huge = {2147483648.f, 1.f};
              t = make_st_tensor<float>(DType::F32, {2}, std::span<const float>(huge));
            }
        }).find(fmt::format("ops.{}.scale", add)) != std::string::npos);
  CHECK(refused([&](nlohmann::json&, StFile& f) {
          for (auto& [name, t] : f.tensors)
            if (name == fmt::format("ops.{}.scale", add)) {
              const std::vector<float> zero = {0.f, 1.f};
              t = make_st_tensor<float>(DType::F32, {2}, std::span<const float>(zero));
            }
        }).find("must be finite and > 0") != std::string::npos);
  // The scale tensor of a Concat with the wrong number of entries.
  CHECK(refused([&](nlohmann::json&, StFile& f) {
          for (auto& [name, t] : f.tensors)
            if (name == fmt::format("ops.{}.scale", cat)) {
              const std::vector<float> one = {1.f};
              t = make_st_tensor<float>(DType::F32, {1}, std::span<const float>(one));
            }
        }).find("has shape [1], expected [2]") != std::string::npos);
  // Groups that do not divide the channels.
  size_t dw = 0;
  for (size_t i = 0; i < converted.graph.ops.size(); ++i)
    if (converted.graph.ops[i].groups > 1) dw = i;
  REQUIRE(dw > 0);
  CHECK(refused([&](nlohmann::json& g, StFile&) { g["ops"][dw]["groups"] = 3; }).find("'groups' 3 must divide") !=
        std::string::npos);
  std::filesystem::remove_all(dir);
}
