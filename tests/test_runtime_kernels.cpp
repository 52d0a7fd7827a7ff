// Tests of the runtime kernels: every fast path (AVX2, AVX-512 VNNI, AMX) bit-exact with the reference, and each
// integer op against real arithmetic.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "core/rng.h"
#include "kernel_paths.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"
#include "quant/runtime/requantize.h"
#include "random_codes.h"

namespace rt = lowbit::quant::runtime;

namespace {

constexpr int kOutputLsbTolerance = 1;  // an integer op may differ from real arithmetic by one output code
constexpr int kMaxReportedMismatches = 5;

using lowbit::test::random_codes;
using lowbit::test::random_in;

// (OUT, IN) int4 codes → packed rows, one row per output channel.
std::vector<int8_t> pack_rows_int4(const std::vector<int8_t>& codes, int64_t out, int64_t in) {
  const auto row_bytes = static_cast<int64_t>(rt::int4_packed_size(in));
  std::vector<int8_t> packed(out * row_bytes);
  for (int64_t o = 0; o < out; ++o) {
    rt::pack_int4(std::span(codes).subspan(o * in, in), std::span(packed).subspan(o * row_bytes, row_bytes));
  }
  return packed;
}

// Counts differing elements, printing the first few.
template <typename T>
int count_mismatches(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  int mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i] && ++mismatches <= kMaxReportedMismatches) {
      std::printf("%s[%zu]: got %lld want %lld\n", what, i, static_cast<long long>(got[i]),
                  static_cast<long long>(want[i]));
    }
  }
  return mismatches;
}

// M = m·2^(−n) with m in [2^30, 2^31) — what convert computes on the real side.
void quantize_multiplier(double real, int32_t& m, int32_t& n) {
  int exponent = 0;
  const double mantissa = std::frexp(real, &exponent);  // real = mantissa·2^exponent, mantissa in [0.5, 1)
  auto q = static_cast<int64_t>(std::llround(mantissa * static_cast<double>(int64_t{1} << 31)));
  n = 31 - exponent;
  if (q == (int64_t{1} << 31)) {
    q /= 2;
    --n;
  }
  m = static_cast<int32_t>(q);
}

struct GemmShape {
  int64_t n, in, out;
};

}  // namespace

TEST_CASE("qgemm_s8 and qgemm_s4 are bit-exact with the reference on random shapes, every path, any thread count") {
  const std::vector<rt::KernelPath> paths = lowbit::test::fast_paths_to_test();
  // Sizes that are not multiples of 16 (a vector), 64 (an AMX tile row) or 32 (an AMX block of rows); N >= 32
  // runs the AMX kernel, smaller N its VNNI fallback.
  const std::vector<GemmShape> shapes = {{1, 1, 1},       {7, 13, 5},    {33, 65, 17},  {6, 16, 16},   {5, 3, 40},
                                         {13, 100, 31},   {64, 784, 25}, {2, 9, 130},   {49, 150, 16}, {3, 0, 5},
                                         {100, 257, 129}, {32, 64, 32},  {67, 300, 97}, {40, 0, 7},
                                         // AMX: K in several chunks of 1024 k (3136, 2100), whole 32 × 32 blocks
                                         // stored straight into y next to partial ones, tasks of 8 panel pairs.
                                         {96, 3136, 48},  {70, 2100, 290}, {64, 1024, 64}};
  lowbit::Rng rng(42);
  for (const GemmShape& s : shapes) {
    for (const int32_t z : {-128, -1, 0, 37, 127, random_in(rng, -128, 127)}) {
      for (const int bits : {8, 4}) {
        CAPTURE(s.n);
        CAPTURE(s.in);
        CAPTURE(s.out);
        CAPTURE(z);
        CAPTURE(bits);
        const auto x = random_codes(rng, s.n * s.in, -128, 127);
        const auto codes =
            bits == 8 ? random_codes(rng, s.out * s.in, -127, 127) : random_codes(rng, s.out * s.in, -8, 7);
        const auto w = bits == 8 ? codes : pack_rows_int4(codes, s.out, s.in);
        std::vector<int32_t> b(s.out);
        for (auto& v : b) v = random_in(rng, -(1 << 20), 1 << 20);
        std::vector<int32_t> want(s.n * s.out), got1(s.n * s.out), got2(s.n * s.out), packed(s.n * s.out);
        const auto ref = bits == 8 ? rt::qgemm_s8_ref : rt::qgemm_s4_ref;
        const auto fast = bits == 8 ? rt::qgemm_s8 : rt::qgemm_s4;
        ref(x, z, w, b, want, s.n, s.in, s.out, 1);
        fast(x, z, w, b, got1, s.n, s.in, s.out, 1);
        fast(x, z, w, b, got2, s.n, s.in, s.out, 2);
        CHECK(count_mismatches(got1, want, "1 thread") == 0);
        CHECK(count_mismatches(got2, want, "2 threads") == 0);
        for (const rt::KernelPath path : paths) {
          CAPTURE(std::string(rt::kernel_path_name(path)));
          const rt::PackedWeights pw = rt::pack_weights(w, bits, s.in, s.out, path);
          std::vector<int32_t> workspace(rt::qgemm_packed_workspace_size(s.n, pw));
          for (const int threads : {1, 2, 3}) {
            CAPTURE(threads);
            std::fill(packed.begin(), packed.end(), 0x5A5A5A5A);
            rt::qgemm_packed(x, z, pw, b, packed, s.n, workspace, threads);
            CHECK(count_mismatches(packed, want, "packed") == 0);
          }
        }
        // The reference itself: codes unpacked and multiplied in 64 bits.
        std::vector<int32_t> plain(s.n * s.out);
        for (int64_t i = 0; i < s.n; ++i) {
          for (int64_t o = 0; o < s.out; ++o) {
            int64_t acc = b[o];
            for (int64_t k = 0; k < s.in; ++k) acc += int64_t{codes[o * s.in + k]} * (x[i * s.in + k] - z);
            plain[i * s.out + o] = static_cast<int32_t>(acc);
          }
        }
        CHECK(count_mismatches(want, plain, "reference") == 0);
      }
    }
  }
}

TEST_CASE("u8-shifted sums that leave int32 on the way still give the exact result (wrapping adds, eq. 5 point 4)") {
  // Σ w·(x + 128) reaches 70000 · 127 · 255 ≈ 2.3·10^9 > 2^31, while the true sums Σ w·(x − z_in), with
  // |x − z_in| <= 3, stay near 10^6: the VNNI and AMX kernels must wrap, never saturate.
  const int64_t n = 33, in = 70000, out = 17;
  lowbit::Rng rng(70);
  const auto x = random_codes(rng, n * in, 121, 127);
  const auto w = random_codes(rng, out * in, 120, 127);
  const std::vector<int32_t> b(out, -5);
  std::vector<int32_t> want(n * out), got(n * out);
  rt::qgemm_s8_ref(x, 124, w, b, want, n, in, out, 1);
  for (const rt::KernelPath path : lowbit::test::fast_paths_to_test()) {
    CAPTURE(std::string(rt::kernel_path_name(path)));
    const rt::PackedWeights pw = rt::pack_weights(w, 8, in, out, path);
    std::vector<int32_t> workspace(rt::qgemm_packed_workspace_size(n, pw));
    for (const int64_t rows : {n, int64_t{1}}) {  // AMX from 32 rows on, VNNI below
      rt::qgemm_packed(x, 124, pw, b, got, rows, workspace, 2);
      CHECK(count_mismatches(std::vector<int32_t>(got.begin(), got.begin() + rows * out),
                             std::vector<int32_t>(want.begin(), want.begin() + rows * out), "wrapped") == 0);
    }
  }
}

// (N, HO·WO, OUT) GEMM rows → (N, OUT, HO·WO), the direct convolution's layout.
std::vector<int32_t> rows_to_nchw(const std::vector<int32_t>& acc, int64_t n, int64_t positions, int64_t out) {
  std::vector<int32_t> nchw(acc.size());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = 0; p < positions; ++p) {
      for (int64_t o = 0; o < out; ++o) nchw[(i * out + o) * positions + p] = acc[(i * positions + p) * out + o];
    }
  }
  return nchw;
}

TEST_CASE("im2col then GEMM, and the channels-last implicit GEMM on every path, equal the direct convolution") {
  const std::vector<rt::KernelPath> paths = lowbit::test::fast_paths_to_test();
  struct ConvShape {
    int64_t n, c, h, w, out, k, stride, padding;
  };
  const std::vector<ConvShape> shapes = {
      {2, 1, 28, 28, 6, 5, 1, 2},
      {1, 6, 14, 14, 16, 5, 1, 0},
      {3, 3, 9, 7, 5, 3, 2, 1},
      {1, 2, 5, 5, 3, 1, 1, 0},
      {2, 4, 6, 6, 17, 3, 1, 1},
      {1, 2, 20, 19, 4, 17, 1, 1},  // window rows longer than 32 bytes
      {2, 9, 7, 8, 3, 1, 3, 0},     // 1×1 windows, stride 3
      {1, 3, 11, 11, 33, 4, 2, 3},  // even K, padding wider than needed
      {2, 5, 6, 6, 7, 3, 1, 1},
      {1, 1, 8, 8, 2, 3, 1, 0},    // 7 and 2 channels: every partial 8-code store
      {1, 40, 5, 5, 23, 3, 1, 1},  // kernel rows of 120 codes, 16 + 7 channels
      {3, 32, 6, 5, 64, 3, 1, 1},
      {5, 3, 9, 9, 9, 2, 1, 0},   // convbn-like conv2; 9 channels, 25 rows a part
      {2, 5, 6, 7, 70, 3, 1, 1},  // 5 panels: a VNNI call of 4, then one of 1
      {2, 8, 6, 5, 61, 3, 1, 1},  // 4 panels, the last of 13 channels
      // AMX tiles (kernel rows of 8 units or more): stride 2, 1×1 windows, odd panel counts, and images so
      // small that the last A tile reads far past them (into the planes' slack).
      {2, 16, 9, 9, 32, 3, 2, 1},
      {2, 64, 5, 7, 40, 1, 1, 0},
      {2, 32, 7, 7, 48, 1, 2, 0},
      {3, 32, 2, 1, 5, 1, 1, 0},
      {1, 16, 3, 3, 17, 3, 1, 1},
      {1, 2, 4, 97, 3, 3, 1, 1},    // two output rows of 97 are more than a block: no fused max pool
      {2, 8, 5, 5, 96, 3, 1, 1},    // 4 + 2 panels
      {1, 3, 6, 6, 48, 3, 1, 1},    // 3 panels
      {1, 3, 4, 96, 20, 3, 1, 1}};  // the widest rows a fused max pool takes
  lowbit::Rng rng(5);
  int usual_cases = 0, constant_cases = 0;  // the usual forms' codes vary, but for a few small shapes
  for (const ConvShape& s : shapes) {
    for (const int bits : {8, 4}) {
      const int32_t z = random_in(rng, -128, 127);
      CAPTURE(bits);
      CAPTURE(z);
      const int64_t ho = rt::pooled_size(s.h, s.k, s.stride, s.padding),
                    wo = rt::pooled_size(s.w, s.k, s.stride, s.padding);
      const int64_t row = s.c * s.k * s.k, rows = s.n * ho * wo;
      const auto x = random_codes(rng, s.n * s.c * s.h * s.w, -128, 127);
      const auto codes = random_codes(rng, s.out * row, bits == 8 ? -127 : -8, bits == 8 ? 127 : 7);
      const auto w = bits == 8 ? codes : pack_rows_int4(codes, s.out, row);
      std::vector<int32_t> b(s.out);
      for (auto& v : b) v = random_in(rng, -1000, 1000);
      std::vector<int32_t> direct(s.n * s.out * ho * wo);
      rt::qconv2d_ref(x, z, w, bits, b, direct, s.n, s.c, s.h, s.w, s.out, s.k, s.stride, s.padding, 1);
      std::vector<int8_t> cols(rows * row);
      rt::im2col(x, z, cols, s.n, s.c, s.h, s.w, s.k, s.stride, s.padding, 2);
      std::vector<int32_t> acc(rows * s.out);
      (bits == 8 ? rt::qgemm_s8 : rt::qgemm_s4)(cols, z, w, b, acc, rows, row, s.out, 2);
      CHECK(count_mismatches(rows_to_nchw(acc, s.n, ho * wo, s.out), direct, "conv") == 0);
      // The executor's fast paths: channels-last images, the windows read in place (an implicit GEMM); the
      // rows split in 1, 2 or 3 ranges as threads would take them. Junk in the planes buffer beforehand
      // (its slack included) must not matter.
      std::vector<int8_t> x_nhwc(x.size());
      for (int64_t i = 0; i < s.n; ++i)
        for (int64_t c = 0; c < s.c; ++c)
          for (int64_t p = 0; p < s.h * s.w; ++p)
            x_nhwc[(i * s.h * s.w + p) * s.c + c] = x[(i * s.c + c) * s.h * s.w + p];
      // Three times: a random form of requantization, then the two usual layers' (the AVX-512 epilogue's
      // Form::ReluFolded and Form::Signed): a folded ReLU, and none, with shifts of 33-45.
      for (const int form : {0, 1, 2}) {
        CAPTURE(form);
        const bool usual = form != 0;
        rt::Requant rq;  // for the requantizing epilogue
        rq.zero_point = form == 1 ? random_in(rng, -128, -64) : random_in(rng, -128, 127);
        // No activation, a folded ReLU (act_min = z_out) or a narrower range; act_max 127 or below (a ReLU6).
        const int low = usual ? 2 - form : static_cast<int>(rng.below(3));
        rq.act_min = low == 0 ? -128 : low == 1 ? rq.zero_point : random_in(rng, rq.zero_point, 127);
        rq.act_max = rng.below(2) == 0 ? 127 : random_in(rng, usual ? 0 : rq.act_min, 127);
        // Shifts of 6-16, of 33-45 (the AVX-512 epilogue's high-half way; with a folded ReLU, z_out goes into its
        // rounding) or mixed. Larger shifts leave every code at z_out here: the requantize_to_nchw test has them.
        const int shifts = usual ? 1 : static_cast<int>(rng.below(3));
        for (int64_t o = 0; o < s.out; ++o) {
          rq.multiplier.push_back(random_in(rng, 1 << 30, std::numeric_limits<int32_t>::max()));
          rq.shift.push_back(shifts == 0 ? random_in(rng, 6, 16) : random_in(rng, shifts == 1 ? 33 : 6, 45));
        }
        CAPTURE(shifts);
        CAPTURE(low);
        std::vector<int8_t> want(rows * s.out);
        rt::requantize_to_nchw_ref(acc, rq, want, rows, 1, s.out, 1);
        // With a 2 × 2 max pool (stride 2) after it: the largest of the four codes (requantization never
        // decreases), (N, HO/2, WO/2, OUT); a last odd row or column is dropped.
        const int64_t hp = ho / 2, wp = wo / 2;
        std::vector<int8_t> want_pooled(s.n * hp * wp * s.out);
        for (int64_t i = 0; i < s.n; ++i)
          for (int64_t ph = 0; ph < hp; ++ph)
            for (int64_t pw = 0; pw < wp; ++pw)
              for (int64_t o = 0; o < s.out; ++o) {
                int8_t best = -128;
                for (int64_t dy = 0; dy < 2; ++dy)
                  for (int64_t dx = 0; dx < 2; ++dx)
                    best = std::max(best, want[((i * ho + 2 * ph + dy) * wo + 2 * pw + dx) * s.out + o]);
                want_pooled[((i * hp + ph) * wp + pw) * s.out + o] = best;
              }
        for (const rt::KernelPath path : paths) {
          CAPTURE(std::string(rt::kernel_path_name(path)));
          const rt::PackedConv pc =
              rt::pack_conv_weights(w, bits, s.c, s.h, s.w, s.out, s.k, s.stride, s.padding, path);
          // Amx runs a convolution on tiles from kernel rows of 8 units (29 codes) on.
          CHECK(pc.amx_tiles.empty() == (path != rt::KernelPath::Amx || (s.k * s.c + 3) / 4 < 8));
          std::vector<int16_t> planes(rt::conv_planes_size(s.n, pc), 0x5A5A);
          rt::conv_planes(x_nhwc, z, pc, planes, s.n, 2);
          for (const int parts : {1, 2, 3}) {
            CAPTURE(parts);
            std::vector<int32_t> fast(rows * s.out, 0x5A5A5A5A);
            for (int t = 0; t < parts; ++t) {
              const int64_t begin = rows * t / parts, end = rows * (t + 1) / parts;
              rt::qconv2d_rows(planes, z, pc, b, std::span<int32_t>(fast).subspan(begin * s.out), begin, end - begin);
            }
            CHECK(count_mismatches(rows_to_nchw(fast, s.n, ho * wo, s.out), direct, "qconv2d_rows") == 0);
          }
          // Requantized in the epilogue: the codes requantize_to_nchw_ref gives for the same accumulators.
          for (const int parts : {1, 3}) {
            CAPTURE(parts);
            // The ranges last to first, 64 guard bytes after the end: a range that stores past its own rows (a
            // masked channel block stored whole) shows as a mismatch there.
            std::vector<int8_t> codes(rows * s.out + 64, 0x5A);
            for (int t = parts - 1; t >= 0; --t) {
              const int64_t begin = rows * t / parts, end = rows * (t + 1) / parts;
              rt::qconv2d_rows_requantized(planes, z, pc, b, rq,
                                           std::span<int8_t>(codes).subspan(begin * s.out, (end - begin) * s.out),
                                           begin, end - begin);
            }
            CHECK(std::equal(want.begin(), want.end(), codes.begin()));
            CHECK(std::all_of(codes.begin() + rows * s.out, codes.end(), [](int8_t q) { return q == 0x5A; }));
            if (usual && parts == 1 && path == paths[0]) {
              ++usual_cases;
              constant_cases += std::count(want.begin(), want.end(), want[0]) == static_cast<int64_t>(want.size());
            }
          }
          // The max pool fused: pooled rows split in 1, 2 or 3 ranges, junk in the scratch and the output beforehand.
          const bool fusable = pc.amx_tiles.empty() && 2 * wo <= rt::detail::kConvRowBlock && ho >= 2;
          CHECK(rt::conv_pool_fusable(pc, 2, 2, 0) == fusable);
          CHECK(!rt::conv_pool_fusable(pc, 3, 2, 0));
          CHECK(!rt::conv_pool_fusable(pc, 2, 1, 0));
          if (!fusable) continue;
          for (const int parts : {1, 2, 3}) {
            CAPTURE(parts);
            std::vector<int8_t> pooled(want_pooled.size() + 64, 0x5A);  // guard bytes, ranges last to first, as above
            std::vector<int32_t> scratch(rt::conv_pool_scratch_size(pc), 0x5A5A5A5A);
            for (int t = parts - 1; t >= 0; --t) {
              const int64_t begin = s.n * hp * t / parts, end = s.n * hp * (t + 1) / parts;
              rt::qconv2d_rows_pooled(planes, z, pc, b, rq, scratch, pooled, begin, end - begin);
            }
            CHECK(std::equal(want_pooled.begin(), want_pooled.end(), pooled.begin()));
            CHECK(std::all_of(pooled.begin() + want_pooled.size(), pooled.end(), [](int8_t q) { return q == 0x5A; }));
          }
        }
      }
    }
  }
  CHECK(constant_cases * 5 < usual_cases);
}

TEST_CASE("kernel paths: names parse, 'auto' is the best, a path the CPU lacks or a bad name is a clear error") {
  for (const rt::KernelPath path : {rt::KernelPath::Ref, rt::KernelPath::Avx2, rt::KernelPath::AvxVnni,
                                    rt::KernelPath::Vnni512, rt::KernelPath::Amx}) {
    CAPTURE(std::string(rt::kernel_path_name(path)));
    if (rt::cpu_supports(path)) {
      CHECK(rt::parse_kernel_path(rt::kernel_path_name(path)) == path);
    } else {
      CHECK_THROWS_AS(rt::parse_kernel_path(rt::kernel_path_name(path)), rt::RuntimeError);
      CHECK_THROWS_AS(rt::set_kernel_path(path), rt::RuntimeError);
      MESSAGE("this CPU lacks the path ", std::string(rt::kernel_path_name(path)), ": refused, as it must be");
    }
  }
  CHECK(rt::parse_kernel_path("auto") == rt::best_kernel_path());
  CHECK(rt::cpu_supports(rt::KernelPath::Ref));
  CHECK_THROWS_WITH_AS(rt::parse_kernel_path("avx9"),
                       doctest::Contains("expected ref, avx2, avxvnni, vnni, amx or auto"), rt::RuntimeError);
  CHECK_THROWS_AS(rt::pack_weights(std::vector<int8_t>(4), 8, 2, 2, rt::KernelPath::Ref), rt::RuntimeError);
  // set_kernel_path steers the convenience kernels; each path gives the reference's sums.
  lowbit::Rng rng(8);
  const int64_t n = 40, in = 70, out = 33;
  const auto x = random_codes(rng, n * in, -128, 127), w = random_codes(rng, out * in, -127, 127);
  const std::vector<int32_t> b(out, 7);
  std::vector<int32_t> want(n * out), got(n * out);
  rt::qgemm_s8_ref(x, -3, w, b, want, n, in, out, 1);
  const rt::KernelPath before = rt::kernel_path();
  for (const rt::KernelPath path : {rt::KernelPath::Ref, rt::KernelPath::Avx2, rt::KernelPath::AvxVnni,
                                    rt::KernelPath::Vnni512, rt::KernelPath::Amx}) {
    if (!rt::cpu_supports(path)) continue;
    rt::set_kernel_path(path);
    CHECK(rt::kernel_path() == path);
    rt::qgemm_s8(x, -3, w, b, got, n, in, out, 2);
    CHECK(got == want);
  }
  rt::set_kernel_path(before);
}

TEST_CASE("Conv2d (conv + requantize) is within one output LSB of real arithmetic") {
  // Real-valued layer: x real = s_in·(q − z_in), w real = s_w[o]·w, bias real = s_in·s_w[o]·b.
  const int64_t n = 2, c = 3, h = 7, w = 6, out = 4, k = 3, stride = 1, padding = 1;
  const int64_t ho = rt::pooled_size(h, k, stride, padding), wo = rt::pooled_size(w, k, stride, padding);
  const double s_in = 0.02, s_out = 0.05;
  const int32_t z_in = -7, z_out = 3;
  const std::vector<double> s_w = {0.004, 0.0013, 0.009, 0.0021};
  for (const bool relu : {false, true}) {
    lowbit::Rng rng(relu ? 9 : 8);
    const auto x = random_codes(rng, n * c * h * w, -128, 127);
    const auto wq = random_codes(rng, out * c * k * k, -127, 127);
    std::vector<int32_t> b(out);
    for (auto& v : b) v = random_in(rng, -3000, 3000);
    rt::Requant rq;
    rq.zero_point = z_out;
    rq.act_min = relu ? z_out : -128;
    for (int64_t o = 0; o < out; ++o) {
      int32_t m = 0, shift = 0;
      quantize_multiplier(s_in * s_w[o] / s_out, m, shift);
      rq.multiplier.push_back(m);
      rq.shift.push_back(shift);
    }
    std::vector<int32_t> acc(n * out * ho * wo);
    rt::qconv2d_ref(x, z_in, wq, 8, b, acc, n, c, h, w, out, k, stride, padding, 1);
    std::vector<int8_t> got(acc.size());
    // acc is already (N, OUT, HO, WO): requantize each element with its channel's multiplier.
    for (int64_t i = 0; i < n * out; ++i) {
      const int64_t o = i % out;
      for (int64_t p = 0; p < ho * wo; ++p) {
        got[i * ho * wo + p] =
            rt::requantize(acc[i * ho * wo + p], rq.multiplier[o], rq.shift[o], rq.zero_point, rq.act_min, rq.act_max);
      }
    }
    int worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t oh = 0; oh < ho; ++oh) {
          for (int64_t ow = 0; ow < wo; ++ow) {
            double real = s_in * s_w[o] * b[o];
            for (int64_t ci = 0; ci < c; ++ci) {
              for (int64_t kh = 0; kh < k; ++kh) {
                for (int64_t kw = 0; kw < k; ++kw) {
                  const int64_t ih = oh - padding + kh, iw = ow - padding + kw;
                  if (ih < 0 || ih >= h || iw < 0 || iw >= w) continue;  // real 0
                  real += s_in * (x[((i * c + ci) * h + ih) * w + iw] - z_in) * s_w[o] *
                          wq[((o * c + ci) * k + kh) * k + kw];
                }
              }
            }
            if (relu) real = std::max(real, 0.0);
            const double want = std::clamp(z_out + std::round(real / s_out), -128.0, 127.0);
            const int diff = std::abs(got[((i * out + o) * ho + oh) * wo + ow] - static_cast<int>(want));
            worst = std::max(worst, diff);
          }
        }
      }
    }
    CAPTURE(relu);
    CHECK(worst <= kOutputLsbTolerance);
  }
}

TEST_CASE("Linear (GEMM + requantize_to_nchw) is within one output LSB of real arithmetic") {
  const int64_t n = 5, in = 37, out = 9;
  const double s_in = 0.031, s_out = 0.11;
  const int32_t z_in = 12, z_out = -20;
  lowbit::Rng rng(21);
  const auto x = random_codes(rng, n * in, -128, 127);
  const auto codes = random_codes(rng, out * in, -8, 7);  // int4 weights
  const auto w = pack_rows_int4(codes, out, in);
  std::vector<double> s_w(out);
  rt::Requant rq;
  rq.zero_point = z_out;
  std::vector<int32_t> b(out);
  for (int64_t o = 0; o < out; ++o) {
    s_w[o] = 0.01 + 0.003 * static_cast<double>(o);
    b[o] = random_in(rng, -500, 500);
    int32_t m = 0, shift = 0;
    quantize_multiplier(s_in * s_w[o] / s_out, m, shift);
    rq.multiplier.push_back(m);
    rq.shift.push_back(shift);
  }
  std::vector<int32_t> acc(n * out);
  rt::qgemm_s4(x, z_in, w, b, acc, n, in, out, 1);
  std::vector<int8_t> got(n * out);
  rt::requantize_to_nchw(acc, rq, got, n, 1, out, 1);
  int worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t o = 0; o < out; ++o) {
      double real = s_in * s_w[o] * b[o];
      for (int64_t k = 0; k < in; ++k) real += s_in * (x[i * in + k] - z_in) * s_w[o] * codes[o * in + k];
      const double want = std::clamp(z_out + std::round(real / s_out), -128.0, 127.0);
      worst = std::max(worst, std::abs(got[i * out + o] - static_cast<int>(want)));
    }
  }
  CHECK(worst <= kOutputLsbTolerance);
}

TEST_CASE("requantize_to_nchw transposes (N, P, OUT) accumulators into (N, OUT, P) codes") {
  rt::Requant rq;
  rq.multiplier = {int32_t{1} << 30, int32_t{1} << 30};       // M = 0.5 for both channels
  rq.shift = {31, 30};                                        // channel 1: M = 1
  const std::vector<int32_t> acc = {10, 10, 20, 20, -3, -3};  // N = 1, P = 3, OUT = 2
  std::vector<int8_t> y(6);
  rt::requantize_to_nchw_ref(acc, rq, y, 1, 3, 2, 1);
  CHECK(y == std::vector<int8_t>{5, 10, -2, 10, 20, -3});  // −1.5 → −2: ties away from zero
  for (const rt::KernelPath path : lowbit::test::fast_paths_to_test()) {
    CAPTURE(std::string(rt::kernel_path_name(path)));
    std::fill(y.begin(), y.end(), 0);
    rt::requantize_to_nchw(acc, rq, y, 1, 3, 2, 1, path);
    CHECK(y == std::vector<int8_t>{5, 10, -2, 10, 20, -3});
  }
}

TEST_CASE("requantize_to_nchw is bit-exact with the reference on random and extreme values") {
  const std::vector<rt::KernelPath> paths = lowbit::test::fast_paths_to_test();
  lowbit::Rng rng(77);
  const std::vector<int32_t> edges = {INT32_MIN, INT32_MIN + 1, -65536, -1, 0, 1, 65535, INT32_MAX - 1, INT32_MAX};
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t n = random_in(rng, 1, 3), positions = random_in(rng, 1, 7), out = random_in(rng, 1, 21);
    rt::Requant rq;
    rq.act_min = random_in(rng, -128, 127);
    rq.act_max = random_in(rng, rq.act_min, 127);
    rq.zero_point = random_in(rng, rq.act_min, rq.act_max);
    // Every third trial a folded ReLU (z_out = act_min) with every shift >= 33: the AVX-512 way that folds z_out
    // into the rounding (up to 54) and needs no sign.
    const bool relu_high = trial % 3 == 0;
    if (relu_high) rq.zero_point = rq.act_min;
    for (int64_t o = 0; o < out; ++o) {
      const int kind = random_in(rng, 0, 3);  // edges of the multiplier and shift ranges, or random
      rq.multiplier.push_back(kind == 0   ? rt::kMultiplierMin
                              : kind == 1 ? rt::kMultiplierMax
                                          : random_in(rng, rt::kMultiplierMin, rt::kMultiplierMax));
      const int lowest = relu_high ? 33 : 1;
      rq.shift.push_back(kind == 2 ? (random_in(rng, 0, 1) ? lowest : 62) : random_in(rng, lowest, 62));
    }
    std::vector<int32_t> acc(n * positions * out);
    for (auto& a : acc) {
      const bool edge = random_in(rng, 0, 2) == 0;
      a = edge ? edges[rng.below(edges.size())]
               : static_cast<int32_t>(static_cast<int64_t>(rng.next_u64()) >> (32 + random_in(rng, 0, 31)));
    }
    std::vector<int8_t> want(acc.size()), got(acc.size());
    rt::requantize_to_nchw_ref(acc, rq, want, n, positions, out, 1);
    CAPTURE(trial);
    // The same accumulators also as N·P channels-last rows (P = 1), the executor's form.
    std::vector<int8_t> want_rows(acc.size()), got_rows(acc.size());
    rt::requantize_to_nchw_ref(acc, rq, want_rows, n * positions, 1, out, 1);
    for (const rt::KernelPath path : paths) {
      CAPTURE(std::string(rt::kernel_path_name(path)));
      rt::requantize_to_nchw(acc, rq, got, n, positions, out, 1 + trial % 2, path);
      CHECK(count_mismatches(got, want, "requantize") == 0);
      rt::requantize_to_nchw(acc, rq, got_rows, n * positions, 1, out, 1 + trial % 3, path);
      CHECK(count_mismatches(got_rows, want_rows, "requantize rows") == 0);
    }
  }
}

TEST_CASE("pooling matches real arithmetic, input lookup maps pixels") {
  const int64_t n = 2, c = 3, h = 7, w = 8;
  lowbit::Rng rng(17);
  const auto x = random_codes(rng, n * c * h * w, -128, 127);
  struct Window {
    int64_t k, stride, padding;
  };
  for (const Window win : {Window{2, 2, 0}, Window{3, 2, 1}, Window{3, 1, 1}, Window{1, 1, 0}}) {
    for (const int32_t z : {-128, -9, 0, 100}) {
      const int64_t ho = rt::pooled_size(h, win.k, win.stride, win.padding);
      const int64_t wo = rt::pooled_size(w, win.k, win.stride, win.padding);
      std::vector<int8_t> maxed(n * c * ho * wo), averaged(n * c * ho * wo);
      rt::maxpool2d(x, maxed, n, c, h, w, win.k, win.stride, win.padding, 2);
      rt::avgpool2d(x, z, averaged, n, c, h, w, win.k, win.stride, win.padding, 2);
      int max_errors = 0, avg_errors = 0;
      for (int64_t plane = 0; plane < n * c; ++plane) {
        for (int64_t oh = 0; oh < ho; ++oh) {
          for (int64_t ow = 0; ow < wo; ++ow) {
            double best = -1e9, real_sum = 0;  // real values in units of the scale: q − z
            for (int64_t kh = 0; kh < win.k; ++kh) {
              for (int64_t kw = 0; kw < win.k; ++kw) {
                const int64_t ih = oh * win.stride - win.padding + kh, iw = ow * win.stride - win.padding + kw;
                if (ih < 0 || ih >= h || iw < 0 || iw >= w) continue;  // padding: real 0 in the average
                const double q = x[(plane * h + ih) * w + iw];
                best = std::max(best, q);
                real_sum += q - z;
              }
            }
            const double mean = real_sum / static_cast<double>(win.k * win.k);
            const double want_avg = std::clamp(z + std::round(mean), -128.0, 127.0);  // std::round: ties away
            const int64_t at = (plane * ho + oh) * wo + ow;
            max_errors += maxed[at] != static_cast<int8_t>(best);
            avg_errors += averaged[at] != static_cast<int8_t>(want_avg);
          }
        }
      }
      CAPTURE(win.k);
      CAPTURE(win.padding);
      CAPTURE(z);
      CHECK(max_errors == 0);
      CHECK(avg_errors == 0);
    }
  }
  std::array<int8_t, 256> table{};
  for (int p = 0; p < 256; ++p) table[p] = static_cast<int8_t>(p / 2 - 64);
  const std::vector<uint8_t> pixels = {0, 1, 2, 128, 255};
  std::vector<int8_t> codes(pixels.size());
  rt::input_lookup(pixels, table, codes, 1);
  CHECK(codes == std::vector<int8_t>{-64, -64, -63, 0, 63});
  // input_lookup_fast on every path: sizes around the 64-pixel block, a random table, 1-3 threads.
  lowbit::Rng lookup_rng(18);
  for (auto& code : table) code = static_cast<int8_t>(random_in(lookup_rng, -128, 127));
  for (const rt::KernelPath path : lowbit::test::fast_paths_to_test()) {
    for (const int64_t size : {1, 63, 64, 65, 784, 3 * 784 + 5}) {
      std::vector<uint8_t> images(size);
      for (auto& p : images) p = static_cast<uint8_t>(lookup_rng.below(256));
      std::vector<int8_t> want(size), got(size);
      rt::input_lookup(images, table, want, 1);
      for (const int threads : {1, 2, 3}) {
        CAPTURE(std::string(rt::kernel_path_name(path)));
        CAPTURE(size);
        CAPTURE(threads);
        rt::input_lookup_fast(images, table, got, path, threads);
        CHECK(got == want);
      }
    }
  }
}

TEST_CASE("channels-last pooling, input lookup and the fused max pool + requantize equal the channels-first kernels") {
  lowbit::Rng rng(31);
  const std::vector<int32_t> edges = {INT32_MIN, -65536, -1, 0, 1, 65535, INT32_MAX};
  int varied = 0;  // cases whose pooled codes are not all equal (most: the test exercises real values)
  struct Window {
    int64_t k, stride, padding;
  };
  for (const int64_t c : {1, 6, 8, 17}) {
    const int64_t n = 2, h = 7, w = 6;
    // (N, C, H, W) ↔ (N, H, W, C)
    auto to_nchw = [&](const std::vector<int8_t>& nhwc, int64_t hh, int64_t ww) {
      std::vector<int8_t> nchw(nhwc.size());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t ci = 0; ci < c; ++ci)
          for (int64_t p = 0; p < hh * ww; ++p) nchw[(i * c + ci) * hh * ww + p] = nhwc[(i * hh * ww + p) * c + ci];
      return nchw;
    };
    const auto x = random_codes(rng, n * h * w * c, -128, 127);  // channels last
    const auto x_nchw = to_nchw(x, h, w);
    for (const Window win : {Window{2, 2, 0}, Window{3, 2, 1}, Window{2, 1, 1}}) {
      CAPTURE(c);
      CAPTURE(win.k);
      CAPTURE(win.padding);
      const int64_t ho = rt::pooled_size(h, win.k, win.stride, win.padding);
      const int64_t wo = rt::pooled_size(w, win.k, win.stride, win.padding);
      std::vector<int8_t> want(n * c * ho * wo), got(want.size());
      rt::maxpool2d(x_nchw, want, n, c, h, w, win.k, win.stride, win.padding, 1);
      rt::maxpool2d_nhwc(x, got, n, c, h, w, win.k, win.stride, win.padding, 2);
      CHECK(to_nchw(got, ho, wo) == want);
      rt::avgpool2d(x_nchw, -5, want, n, c, h, w, win.k, win.stride, win.padding, 1);
      rt::avgpool2d_nhwc(x, -5, got, n, c, h, w, win.k, win.stride, win.padding, 2);
      CHECK(to_nchw(got, ho, wo) == want);
      if (!rt::cpu_has_avx2()) continue;
      // A Conv2d's accumulators, requantized then pooled, against pooled then requantized.
      rt::Requant rq;
      rq.act_min = random_in(rng, -128, 0);
      rq.act_max = random_in(rng, rq.act_min, 127);
      rq.zero_point = random_in(rng, rq.act_min, rq.act_max);
      for (int64_t o = 0; o < c; ++o) {
        rq.multiplier.push_back(random_in(rng, rt::kMultiplierMin, rt::kMultiplierMax));
        rq.shift.push_back(random_in(rng, 1, 62));
      }
      std::vector<int32_t> acc(n * h * w * c);
      for (auto& a : acc)
        a = rng.below(4) == 0 ? edges[rng.below(edges.size())]
                              : static_cast<int32_t>(static_cast<int64_t>(rng.next_u64()) >> random_in(rng, 32, 63));
      std::vector<int8_t> codes(acc.size());
      rt::requantize_to_nchw_ref(acc, rq, codes, n * h * w, 1, c, 1);  // one position per row: channels last
      std::vector<int8_t> pooled(n * ho * wo * c), fused(pooled.size(), 0x5A);
      rt::maxpool2d_nhwc(codes, pooled, n, c, h, w, win.k, win.stride, win.padding, 1);
      for (const rt::KernelPath path :
           {rt::KernelPath::Avx2, rt::KernelPath::AvxVnni, rt::KernelPath::Vnni512, rt::KernelPath::Amx}) {
        if (!rt::cpu_supports(path)) continue;  // (fast_paths_to_test reports the skipped paths elsewhere)
        CAPTURE(std::string(rt::kernel_path_name(path)));
        std::fill(fused.begin(), fused.end(), int8_t{0x5A});
        rt::maxpool_requantize_nhwc(acc, rq, fused, n, c, h, w, win.k, win.stride, win.padding, 2, path);
        CHECK(fused == pooled);
      }
      varied += std::count(pooled.begin(), pooled.end(), pooled[0]) < static_cast<int64_t>(pooled.size());
    }
  }
  if (rt::cpu_has_avx2()) CHECK(varied >= 8);  // of 12
  std::array<int8_t, 256> table{};
  for (int p = 0; p < 256; ++p) table[p] = static_cast<int8_t>(p - 128);
  const std::vector<uint8_t> pixels = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};  // (N 2, C 3, H·W 2)
  std::vector<int8_t> codes(pixels.size());
  rt::input_lookup_nhwc(pixels, table, codes, 2, 3, 2, 1);
  CHECK(codes == std::vector<int8_t>{-128, -126, -124, -127, -125, -123, -122, -120, -118, -121, -119, -117});
}
