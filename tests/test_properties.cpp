// Property tests of the integer math on seeded random cases: kernels vs the exact definition, fast vs reference
// bit for bit, results independent of the thread count, int4 packing a bijection. (Hand-picked cases and the
// scalar requantize are in test_runtime_requantize.cpp and test_runtime_kernels.cpp.)
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "core/rng.h"
#include "kernel_paths.h"
#include "quant/runtime/executor.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/requantize.h"
#include "random_codes.h"

namespace rt = lowbit::quant::runtime;

namespace {

constexpr int kGemmCases = 1500;
constexpr int kGraphCases = 120;
constexpr int kInt4Cases = 3000;
constexpr int kMaxReportedMismatches = 5;

using lowbit::test::random_codes;
using lowbit::test::random_in;

// A zero point: an edge of the int8 range half of the time, else anywhere in it.
int32_t random_zero_point(lowbit::Rng& rng) {
  static constexpr int32_t kEdges[] = {-128, -127, -1, 0, 1, 126, 127};
  return rng.below(2) == 0 ? kEdges[rng.below(std::size(kEdges))] : random_in(rng, -128, 127);
}

// (OUT, ROW) int4 codes → packed rows (int4.h), one row per output channel.
std::vector<int8_t> pack_rows_int4(const std::vector<int8_t>& codes, int64_t out, int64_t row) {
  const auto row_bytes = static_cast<int64_t>(rt::int4_packed_size(row));
  std::vector<int8_t> packed(out * row_bytes);
  for (int64_t o = 0; o < out; ++o) {
    rt::pack_int4(std::span(codes).subspan(o * row, row), std::span(packed).subspan(o * row_bytes, row_bytes));
  }
  return packed;
}

template <typename T>
int count_mismatches(std::span<const T> got, std::span<const T> want, const char* what) {
  int mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i] && ++mismatches <= kMaxReportedMismatches) {
      std::printf("%s[%zu]: got %lld want %lld\n", what, i, static_cast<long long>(got[i]),
                  static_cast<long long>(want[i]));
    }
  }
  return mismatches;
}

// docs/quantization.md eq. 6 and 7 from the exact rational acc·m / 2^n, in 128-bit integers:
// round to nearest with ties away from zero, add z_out, clamp.
int8_t requantize_exact(int32_t acc, int32_t m, int n, int32_t z, int32_t lo, int32_t hi) {
  const __int128 numerator = static_cast<__int128>(acc) * m;
  const __int128 denominator = static_cast<__int128>(1) << n;
  const __int128 magnitude = numerator < 0 ? -numerator : numerator;
  __int128 rounded = (2 * magnitude + denominator) / (2 * denominator);  // floor(|r| + 1/2)
  if (numerator < 0) rounded = -rounded;
  return static_cast<int8_t>(std::clamp<__int128>(z + rounded, lo, hi));
}

}  // namespace

// ---- requantization ------------------------------------------------------------------------------

TEST_CASE("requantize_to_nchw (fast and reference) equals the exact rounding for every shift and zero point") {
  lowbit::Rng rng(101);
  const int64_t out = rt::kShiftMax - rt::kShiftMin + 1;  // one output channel per shift 1..62
  const int64_t n = 2, positions = 9;
  int mismatches = 0;
  for (int32_t z = -128; z <= 127; ++z) {
    rt::Requant rq;
    rq.zero_point = z;
    rq.act_min = random_in(rng, -128, z);
    rq.act_max = random_in(rng, z, 127);
    if (z % 3 == 0) rq.act_min = -128, rq.act_max = 127;  // no clamp beyond int8 itself
    for (int shift = rt::kShiftMin; shift <= rt::kShiftMax; ++shift) {
      rq.shift.push_back(shift);
      rq.multiplier.push_back(shift % 5 == 0   ? rt::kMultiplierMin
                              : shift % 7 == 0 ? rt::kMultiplierMax
                                               : random_in(rng, rt::kMultiplierMin, rt::kMultiplierMax));
    }
    std::vector<int32_t> acc(n * positions * out);  // (N, P, OUT)
    for (auto& a : acc) {
      a = static_cast<int32_t>(static_cast<int64_t>(rng.next_u64()) >> (32 + random_in(rng, 0, 31)));
    }
    acc[0] = INT32_MIN, acc[1] = INT32_MAX;
    std::vector<int8_t> want(acc.size()), reference(acc.size()), fast(acc.size());
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t p = 0; p < positions; ++p) {
        for (int64_t o = 0; o < out; ++o) {
          want[(i * out + o) * positions + p] = requantize_exact(acc[(i * positions + p) * out + o], rq.multiplier[o],
                                                                 rq.shift[o], z, rq.act_min, rq.act_max);
        }
      }
    }
    rt::requantize_to_nchw_ref(acc, rq, reference, n, positions, out, 1);
    CAPTURE(z);
    mismatches += count_mismatches<int8_t>(reference, want, "reference");
    for (const rt::KernelPath path :
         {rt::KernelPath::Avx2, rt::KernelPath::AvxVnni, rt::KernelPath::Vnni512, rt::KernelPath::Amx}) {
      if (!rt::cpu_supports(path)) continue;  // (the GEMM property test reports the skipped paths)
      CAPTURE(std::string(rt::kernel_path_name(path)));
      rt::requantize_to_nchw(acc, rq, fast, n, positions, out, 1 + (z & 1), path);
      mismatches += count_mismatches<int8_t>(fast, want, "fast");
      // The same accumulators as N·P channels-last rows (P = 1): the executor's form, AVX-512 on vnni/amx.
      std::vector<int8_t> want_rows(acc.size()), rows(acc.size());
      for (size_t idx = 0; idx < acc.size(); ++idx) {
        const size_t o = idx % static_cast<size_t>(out);
        want_rows[idx] = requantize_exact(acc[idx], rq.multiplier[o], rq.shift[o], z, rq.act_min, rq.act_max);
      }
      rt::requantize_to_nchw(acc, rq, rows, n * positions, 1, out, 1 + (z & 1), path);
      mismatches += count_mismatches<int8_t>(rows, want_rows, "fast rows");
    }
  }
  CHECK(mismatches == 0);
}

// ---- GEMM ----------------------------------------------------------------------------------------

TEST_CASE("qgemm fast, packed and reference agree bit for bit on random shapes, zero points and thread counts") {
  const std::vector<rt::KernelPath> paths = lowbit::test::fast_paths_to_test();
  lowbit::Rng rng(202);
  int mismatches = 0;
  for (int trial = 0; trial < kGemmCases; ++trial) {
    // Every 4th case has enough rows for the AMX kernel (N >= 32).
    const int64_t n = trial % 4 == 0 ? random_in(rng, 1, 80) : random_in(rng, 1, 19);
    const int64_t in = random_in(rng, 0, 200), out = random_in(rng, 1, 50);
    const int bits = trial % 2 == 0 ? 8 : 4;
    const int32_t z = random_zero_point(rng);
    const int threads = trial % 10 == 0 ? 2 : 1;  // threads are the Executor test's concern
    const auto x = random_codes(rng, n * in, -128, 127);
    const auto codes = bits == 8 ? random_codes(rng, out * in, -127, 127) : random_codes(rng, out * in, -8, 7);
    const auto w = bits == 8 ? codes : pack_rows_int4(codes, out, in);
    std::vector<int32_t> b(out);
    for (auto& v : b) v = random_in(rng, -(1 << 24), 1 << 24);
    std::vector<int32_t> want(n * out), fast(n * out), packed(n * out);
    (bits == 8 ? rt::qgemm_s8_ref : rt::qgemm_s4_ref)(x, z, w, b, want, n, in, out, 1);
    (bits == 8 ? rt::qgemm_s8 : rt::qgemm_s4)(x, z, w, b, fast, n, in, out, threads);
    CAPTURE(trial);
    mismatches += count_mismatches<int32_t>(fast, want, "fast");
    for (const rt::KernelPath path : paths) {
      CAPTURE(std::string(rt::kernel_path_name(path)));
      const rt::PackedWeights pw = rt::pack_weights(w, bits, in, out, path);
      std::vector<int32_t> workspace(rt::qgemm_packed_workspace_size(n, pw));
      rt::qgemm_packed(x, z, pw, b, packed, n, workspace, threads);
      mismatches += count_mismatches<int32_t>(packed, want, "packed");
    }
  }
  CHECK(mismatches == 0);
}

// ---- whole graphs ----------------------------------------------------------------------------------

namespace {

// A random valid graph: Input → 1-2 × (Conv2d [→ MaxPool2d | AvgPool2d]) → Flatten → 1-2 × Linear, with
// random sizes, windows, zero points, clamps, multipliers and shifts. Empty ops if validate() refuses it.
rt::Graph random_graph(lowbit::Rng& rng) {
  rt::Graph g;
  g.in_channels = random_in(rng, 1, 3);
  g.in_height = random_in(rng, 3, 11);
  g.in_width = random_in(rng, 3, 11);
  rt::Op input;
  input.name = "input";
  for (auto& code : input.input_table) code = static_cast<int8_t>(random_in(rng, -128, 127));
  g.ops.push_back(input);
  int32_t z = random_zero_point(rng);
  rt::Shape shape{g.in_channels, g.in_height, g.in_width};
  const auto weighted = [&](rt::OpKind kind, int64_t in, int64_t out) {
    rt::Op op;
    op.kind = kind;
    op.name = "op" + std::to_string(g.ops.size());
    op.weight_bits = rng.below(2) == 0 ? 8 : 4;
    op.in_channels = in;
    op.out_channels = out;
    if (kind == rt::OpKind::Conv2d) {
      op.kernel = random_in(rng, 1, std::min<int64_t>(4, std::min(shape.h, shape.w)));
      op.stride = random_in(rng, 1, 2);
      op.padding = random_in(rng, 0, op.kernel - 1);
    }
    op.input_zero_point = z;
    const int64_t row = rt::weight_row_length(op);
    const auto codes = random_codes(rng, out * row, op.weight_bits == 8 ? -127 : -8, op.weight_bits == 8 ? 127 : 7);
    op.weight = op.weight_bits == 8 ? codes : pack_rows_int4(codes, out, row);
    for (int64_t c = 0; c < out; ++c) {
      op.bias.push_back(random_in(rng, -(1 << 16), 1 << 16));
      op.requant.multiplier.push_back(random_in(rng, rt::kMultiplierMin, rt::kMultiplierMax));
      // Mostly shifts that keep outputs inside the int8 range, sometimes any shift.
      op.requant.shift.push_back(rng.below(4) == 0 ? random_in(rng, rt::kShiftMin, rt::kShiftMax)
                                                   : random_in(rng, 36, 46));
    }
    op.requant.zero_point = random_zero_point(rng);
    op.requant.act_min = rng.below(2) == 0 ? op.requant.zero_point : random_in(rng, -128, op.requant.zero_point);
    op.requant.act_max = random_in(rng, op.requant.zero_point, 127);
    z = op.requant.zero_point;
    shape = rt::output_shape(op, shape);
    g.ops.push_back(op);
  };
  const int64_t conv_blocks = random_in(rng, 1, 2);
  for (int64_t i = 0; i < conv_blocks && shape.h >= 1 && shape.w >= 1; ++i) {
    weighted(rt::OpKind::Conv2d, shape.c, random_in(rng, 1, 20));
    const int pool = random_in(rng, 0, 2);  // none, max, average
    if (pool == 0 || std::min(shape.h, shape.w) < 2) continue;
    rt::Op op;
    op.kind = pool == 1 ? rt::OpKind::MaxPool2d : rt::OpKind::AvgPool2d;
    op.name = "pool" + std::to_string(g.ops.size());
    op.kernel = random_in(rng, 1, 3);
    op.stride = random_in(rng, 1, op.kernel);
    op.padding = random_in(rng, 0, op.kernel / 2);
    op.input_zero_point = z;
    if (rt::pooled_size(shape.h, op.kernel, op.stride, op.padding) < 1 ||
        rt::pooled_size(shape.w, op.kernel, op.stride, op.padding) < 1) {
      continue;
    }
    shape = rt::output_shape(op, shape);
    g.ops.push_back(op);
  }
  rt::Op flatten;
  flatten.kind = rt::OpKind::Flatten;
  flatten.name = "flatten";
  g.ops.push_back(flatten);
  shape = {shape.size(), 1, 1};
  const int64_t linears = random_in(rng, 1, 2);
  for (int64_t i = 0; i < linears; ++i) weighted(rt::OpKind::Linear, shape.c, random_in(rng, 1, 17));
  rt::chain_inputs(g);
  try {
    rt::validate(g);
  } catch (const rt::RuntimeError&) {
    g.ops.clear();
  }
  return g;
}

// The graph computed straight from the definitions: direct convolution loops, an int64 dot product per
// Linear output, the scalar requantize (docs/quantization.md eq. 5-7) — no im2col, no packing, no threads.
std::vector<int8_t> run_by_definition(const rt::Graph& g, std::span<const uint8_t> images, int64_t n) {
  std::vector<int8_t> x(images.size());
  rt::input_lookup(images, g.ops[0].input_table, x, 1);
  rt::Shape shape{g.in_channels, g.in_height, g.in_width};
  for (size_t i = 1; i < g.ops.size(); ++i) {
    const rt::Op& op = g.ops[i];
    const rt::Shape next = rt::output_shape(op, shape, i);
    std::vector<int8_t> y(static_cast<size_t>(n * next.size()));
    const int64_t positions = next.h * next.w;
    std::vector<int32_t> acc(y.size());  // (N, OUT, HO, WO)
    switch (op.kind) {
      case rt::OpKind::Conv2d:
        rt::qconv2d_ref(x, op.input_zero_point, op.weight, op.weight_bits, op.bias, acc, n, shape.c, shape.h, shape.w,
                        op.out_channels, op.kernel, op.stride, op.padding, 1);
        break;
      case rt::OpKind::Linear: {
        const int64_t in = op.in_channels;
        const auto row_bytes = static_cast<int64_t>(op.weight_bits == 8 ? in : rt::int4_packed_size(in));
        for (int64_t b = 0; b < n; ++b) {
          for (int64_t o = 0; o < op.out_channels; ++o) {
            const std::span<const int8_t> row = std::span(op.weight).subspan(o * row_bytes, row_bytes);
            int64_t sum = op.bias[o];
            for (int64_t k = 0; k < in; ++k) {
              const int64_t w = op.weight_bits == 8 ? row[k] : rt::unpack_int4_at(row, k);
              sum += w * (x[b * in + k] - op.input_zero_point);
            }
            acc[b * op.out_channels + o] = static_cast<int32_t>(sum);
          }
        }
        break;
      }
      case rt::OpKind::MaxPool2d:
        rt::maxpool2d(x, y, n, shape.c, shape.h, shape.w, op.kernel, op.stride, op.padding, 1);
        break;
      case rt::OpKind::AvgPool2d:
        rt::avgpool2d(x, op.input_zero_point, y, n, shape.c, shape.h, shape.w, op.kernel, op.stride, op.padding, 1);
        break;
      case rt::OpKind::Flatten:
        y = x;
        break;
      case rt::OpKind::Input:
        break;
      default:
        FAIL("random_graph makes chains of Conv2d, pools, Flatten and Linear only");
    }
    if (op.kind == rt::OpKind::Conv2d || op.kind == rt::OpKind::Linear) {
      const rt::Requant& rq = op.requant;
      for (size_t e = 0; e < acc.size(); ++e) {
        const size_t o = (e / static_cast<size_t>(positions)) % static_cast<size_t>(op.out_channels);
        y[e] = rt::requantize(acc[e], rq.multiplier[o], rq.shift[o], rq.zero_point, rq.act_min, rq.act_max);
      }
    }
    x = std::move(y);
    shape = next;
  }
  return x;
}

}  // namespace

TEST_CASE(
    "Executor on random graphs: the definition, the reference and every fast path, 1, 2 and 3 threads, all agree") {
  std::vector<rt::KernelPath> paths = lowbit::test::fast_paths_to_test();
  paths.insert(paths.begin(), rt::KernelPath::Ref);
  lowbit::Rng rng(303);
  int graphs = 0, refused = 0, mismatches = 0;
  while (graphs < kGraphCases) {
    const rt::Graph g = random_graph(rng);
    if (g.ops.empty()) {
      ++refused;
      continue;
    }
    ++graphs;
    const int64_t n = graphs % 8 == 0 ? random_in(rng, 32, 70) : random_in(rng, 1, 5);  // some for AMX's GEMMs
    std::vector<uint8_t> images(static_cast<size_t>(n * g.in_channels * g.in_height * g.in_width));
    for (auto& p : images) p = static_cast<uint8_t>(rng.below(256));
    const std::vector<int8_t> want = run_by_definition(g, images, n);
    CAPTURE(graphs);
    for (const rt::KernelPath path : paths) {
      for (const int threads : {1, 2, 3}) {
        if (path == rt::KernelPath::Ref && threads == 2) continue;  // time: the reference splits like 3 threads
        rt::Executor executor(g, threads, path);
        CAPTURE(std::string(rt::kernel_path_name(path)));
        const std::span<const int8_t> got = executor.run(images, n);
        CAPTURE(threads);
        mismatches += count_mismatches<int8_t>(got, want, "logits");
      }
    }
  }
  MESSAGE(graphs, " random graphs run (", refused, " drawn and refused by validate())");
  CHECK(mismatches == 0);
}

// ---- int4 packing -----------------------------------------------------------------------------------

TEST_CASE("int4: unpack ∘ pack and pack ∘ unpack are identities, odd and even lengths up to 999") {
  lowbit::Rng rng(404);
  int failures = 0;
  for (int trial = 0; trial < kInt4Cases; ++trial) {
    const auto count = static_cast<size_t>(trial < 64 ? trial : random_in(rng, 0, 999));
    const auto codes = random_codes(rng, count, rt::kInt4Min, rt::kInt4Max);
    std::vector<int8_t> packed(rt::int4_packed_size(count));
    rt::pack_int4(codes, packed);
    std::vector<int8_t> back(count);
    rt::unpack_int4(packed, back);
    failures += back != codes;
    // Any bytes whose padding nibble (odd count) is 0 are the packing of exactly one code sequence.
    auto bytes = random_codes(rng, rt::int4_packed_size(count), -128, 127);
    if (count % 2 == 1) bytes.back() = static_cast<int8_t>(bytes.back() & 0x0F);
    std::vector<int8_t> unpacked(count), repacked(bytes.size());
    rt::unpack_int4(bytes, unpacked);
    rt::pack_int4(unpacked, repacked);
    failures += repacked != bytes;
    failures +=
        std::any_of(unpacked.begin(), unpacked.end(), [](int8_t c) { return c < rt::kInt4Min || c > rt::kInt4Max; });
  }
  CHECK(failures == 0);
}
