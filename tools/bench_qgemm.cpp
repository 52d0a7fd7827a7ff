// Micro benchmark of the runtime's integer GEMMs: GOP/s (2 ops per multiply-add) of every kernel path the CPU has.
//
// Run: build/bin/bench_qgemm [threads]
// Prints the CPU and its instruction sets, the measured peak of vpdpbusd (zmm, ymm) and tdpbusd (tiny unrolled loops),
// then one line per GEMM shape (1024³ first) and conv shape with the GOP/s of each path, the graph models' convs
// requantized in µs per image, then whole graphs in images/s per path.
//
// Run: build/bin/bench_qgemm --json [--seconds S] [threads]
// Prints one JSON object for tools/bench.py --gemm: the CPU, the peaks, and the int8 (s8) GEMM shapes only, on each
// fast path, each checked bit for bit against qgemm_s8_ref, then timed for S seconds (default 0.5) of calls after
// warm-up: median and best seconds, and GOP/s of the median.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "quant/runtime/cpu.h"
#include "quant/runtime/executor.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"

namespace rt = lowbit::quant::runtime;

namespace {

struct Shape {
  const char* what;
  int64_t n, in, out;
};

uint64_t next(uint64_t& state) {  // splitmix64: inputs only need to look random
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Best wall time in seconds of `repeats` runs of f.
template <typename F>
double best_seconds(int repeats, F&& f) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// Wall seconds of each call of f: warm-up calls for at least 0.1 s (2 or more), then calls until they add up to
// `seconds` (5 or more).
template <typename F>
std::vector<double> timed_calls(double seconds, F&& f) {
  const auto now = [] { return std::chrono::steady_clock::now(); };
  for (auto start = now(); std::chrono::duration<double>(now() - start).count() < 0.1;) f();
  std::vector<double> times;
  for (double total = 0; times.size() < 5 || total < seconds; total += times.back()) {
    const auto start = now();
    f();
    times.push_back(std::chrono::duration<double>(now() - start).count());
  }
  return times;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The fast paths this CPU has, slowest first.
std::vector<rt::KernelPath> fast_paths() {
  std::vector<rt::KernelPath> paths;
  for (const auto path : {rt::KernelPath::Avx2, rt::KernelPath::AvxVnni, rt::KernelPath::Vnni512, rt::KernelPath::Amx})
    if (rt::cpu_supports(path)) paths.push_back(path);
  return paths;
}

std::string cpuinfo_model_name() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

// ---- Peak: how many int8 multiply-adds one core can issue, measured ----------------------------------------
// vpdpbusd zmm is 64 multiply-adds (16 lanes × 4); 24 independent accumulators hide its latency, so the loop
// runs at the instruction's throughput: peak = 64 × 2 ops × instructions per second.
// Written in asm so that nothing but the 24 instructions and the loop counter runs.
__attribute__((target("avx512f,avx512vnni"), noipa)) void vpdpbusd_loop(int64_t iterations) {
  for (int64_t i = 0; i < iterations; ++i) {
    __asm__ volatile(
        "vpdpbusd %%zmm30, %%zmm31, %%zmm0\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm1\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm2\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm3\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm4\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm5\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm6\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm7\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm8\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm9\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm10\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm11\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm12\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm13\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm14\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm15\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm16\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm17\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm18\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm19\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm20\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm21\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm22\n\t"
        "vpdpbusd %%zmm30, %%zmm31, %%zmm23\n\t"
        :
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
          "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23");
  }
}

// AVX-VNNI's vpdpbusd ymm (VEX) is 32 multiply-adds; 12 accumulators (of the 16 ymm registers) hide its latency.
__attribute__((target("avxvnni"), noipa)) void vpdpbusd_ymm_loop(int64_t iterations) {
  for (int64_t i = 0; i < iterations; ++i) {
    __asm__ volatile(
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm0\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm1\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm2\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm3\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm4\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm5\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm6\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm7\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm8\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm9\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm10\n\t"
        "%{vex%} vpdpbusd %%ymm14, %%ymm15, %%ymm11\n\t"
        :
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11");
  }
}

// tdpbusd is 16 × 16 × 64 = 16384 multiply-adds; four C tiles on operands already in tiles.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};
__attribute__((target("amx-tile,amx-int8"), noipa)) void tdpbusd_loop(int64_t iterations) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(config));
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t i = 0; i < iterations; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_release();
}

// The measured issue rate of each int8 dot-product instruction this CPU has, and its multiply-adds.
struct Peak {
  const char* instruction;
  double instructions_per_second;
  int macs;
  double gops() const { return instructions_per_second * macs * 2 / 1e9; }
};

std::vector<Peak> measure_peaks() {
  const rt::CpuFeatures& f = rt::cpu_features();
  std::vector<Peak> peaks;
  if (f.avx512_vnni) {
    const int64_t iterations = 2'000'000;  // about 20 ms; the best of 20 runs, as the machine may be shared
    const double s = best_seconds(20, [&] { vpdpbusd_loop(iterations); });
    peaks.push_back({"vpdpbusd zmm", 24.0 * static_cast<double>(iterations) / s, 64});
  }
  if (f.avx_vnni) {
    const int64_t iterations = 2'000'000;
    const double s = best_seconds(20, [&] { vpdpbusd_ymm_loop(iterations); });
    peaks.push_back({"vpdpbusd ymm (AVX-VNNI)", 12.0 * static_cast<double>(iterations) / s, 32});
  }
  if (f.amx_int8) {
    const int64_t iterations = 100'000;
    const double s = best_seconds(20, [&] { tdpbusd_loop(iterations); });
    peaks.push_back({"tdpbusd", 4.0 * static_cast<double>(iterations) / s, 16384});
  }
  return peaks;
}

void print_peaks(const std::vector<Peak>& peaks) {
  for (const Peak& p : peaks) {
    if (p.macs == 16384)
      std::printf("peak %s: %.1f M instructions/s x %d MACs x 2 = %.0f GOP/s per core (measured)\n", p.instruction,
                  p.instructions_per_second / 1e6, p.macs, p.gops());
    else
      std::printf("peak %s: %.2f G instructions/s x %d MACs x 2 = %.0f GOP/s per core (measured)\n", p.instruction,
                  p.instructions_per_second / 1e9, p.macs, p.gops());
  }
}

// A Conv2d / Linear with random int8 codes and multipliers that keep activations spread out.
rt::Op weighted(uint64_t& state, rt::OpKind kind, int64_t in, int64_t out, int64_t k, int64_t padding) {
  rt::Op op;
  op.kind = kind;
  op.in_channels = in;
  op.out_channels = out;
  op.kernel = k;
  op.padding = padding;
  op.input_zero_point = -128;
  const int64_t row = kind == rt::OpKind::Conv2d ? in * k * k : in;
  for (int64_t i = 0; i < out * row; ++i)
    op.weight.push_back(static_cast<int8_t>(static_cast<int>(next(state) % 31) - 15));
  for (int64_t o = 0; o < out; ++o) {
    op.bias.push_back(0);
    op.requant.multiplier.push_back(int32_t{1} << 30);
    op.requant.shift.push_back(40);
  }
  op.requant.zero_point = -128;
  op.requant.act_min = -128;  // ReLU
  return op;
}

rt::Op simple(rt::OpKind kind, int64_t k = 1, int64_t stride = 1) {
  rt::Op op;
  op.kind = kind;
  op.kernel = k;
  op.stride = stride;
  for (int p = 0; p < 256; ++p) op.input_table[p] = static_cast<int8_t>(p - 128);
  return op;
}

// GOP/s of the models' convolutions as the executor runs them: the channels-last implicit GEMM
// (qconv2d_rows, int32 accumulators out) on one thread, padded images built beforehand; s8 and s4 per path.
void bench_convs() {
  struct Conv {
    const char* what;
    int64_t n, c, hw, out, k, padding;
  };
  const std::vector<Conv> convs = {{"lenet5 conv1 batch 64 (1->6, 5x5)", 64, 1, 28, 6, 5, 2},
                                   {"lenet5 conv2 batch 64 (6->16, 5x5)", 64, 6, 14, 16, 5, 0},
                                   {"convbn conv1 batch 16 (1->32, 3x3)", 16, 1, 28, 32, 3, 1},
                                   {"convbn conv2 batch 16 (32->64, 3x3)", 16, 32, 14, 64, 3, 1},
                                   {"resnet8 b1 conv batch 16 (16->16, 3x3)", 16, 16, 28, 16, 3, 1},
                                   {"resnet8 b2 conv2 batch 16 (32->32, 3x3)", 16, 32, 14, 32, 3, 1},
                                   {"dsconv b3 pw batch 16 (128->128, 1x1)", 16, 128, 14, 128, 1, 0}};
  uint64_t state = 3;
  for (const Conv& v : convs) {
    const int64_t ho = rt::pooled_size(v.hw, v.k, 1, v.padding), rows = v.n * ho * ho, row = v.c * v.k * v.k;
    std::vector<int8_t> x(v.n * v.hw * v.hw * v.c), w8(v.out * row), codes4(v.out * row);
    for (auto& q : x) q = static_cast<int8_t>(next(state));
    for (auto& q : w8) q = static_cast<int8_t>(static_cast<int>(next(state) % 255) - 127);
    for (auto& q : codes4) q = static_cast<int8_t>(static_cast<int>(next(state) % 16) - 8);
    const auto row_bytes = static_cast<int64_t>(rt::int4_packed_size(row));
    std::vector<int8_t> w4(v.out * row_bytes);
    for (int64_t o = 0; o < v.out; ++o)
      rt::pack_int4(std::span(codes4).subspan(o * row, row), std::span(w4).subspan(o * row_bytes, row_bytes));
    std::vector<int32_t> b(v.out, 0), acc(rows * v.out);
    const double ops = 2.0 * static_cast<double>(rows) * static_cast<double>(row) * static_cast<double>(v.out);
    std::printf("%-36s %9s", v.what, "-");
    for (const rt::KernelPath path : fast_paths()) {
      for (const int bits : {8, 4}) {
        const rt::PackedConv pc =
            rt::pack_conv_weights(bits == 8 ? w8 : w4, bits, v.c, v.hw, v.hw, v.out, v.k, 1, v.padding, path);
        std::vector<int16_t> planes(rt::conv_planes_size(v.n, pc));
        rt::conv_planes(x, 3, pc, planes, v.n);
        std::printf(" %10.1f", ops / 1e9 / best_seconds(50, [&] { rt::qconv2d_rows(planes, 3, pc, b, acc, 0, rows); }));
      }
    }
    std::printf("\n");
  }
}

// Microseconds per image of the graph models' convolutions at batch 1 as the executor runs them, requantized
// (eq. 6; a folded ReLU, the usual layer): the implicit GEMM with its epilogue (qconv2d_rows_requantized), the
// convs fused with the 2 × 2 max pool after them (qconv2d_rows_pooled) and the depthwise convs
// (qconv2d_depthwise_requantized, in one pass on every path). s8 weights, one thread, best of 2000 calls; the
// padded images are built beforehand.
void bench_requantized_convs() {
  struct Conv {
    const char* what;
    int64_t c, hw, out, k, stride, padding, groups;
    bool pooled = false;
  };
  const std::vector<Conv> convs = {{"dsconv stem (1->32, 3x3, 28x28)", 1, 28, 32, 3, 1, 1, 1},
                                   {"dsconv b1 pw (32->64, 1x1, 28x28)", 32, 28, 64, 1, 1, 0, 1},
                                   {"dsconv b3 pw (128->128, 1x1, 14x14)", 128, 14, 128, 1, 1, 0, 1},
                                   {"dsconv b4 pw (128->256, 1x1, 7x7)", 128, 7, 256, 1, 1, 0, 1},
                                   {"resnet8 b1 conv (16->16, 3x3, 28x28)", 16, 28, 16, 3, 1, 1, 1},
                                   {"dsconv b1 dw (32, 3x3, 28x28)", 32, 28, 32, 3, 1, 1, 32},
                                   {"dsconv b2 dw (64, 3x3 s2, 28x28)", 64, 28, 64, 3, 2, 1, 64},
                                   {"dsconv b3 dw (128, 3x3, 14x14)", 128, 14, 128, 3, 1, 1, 128},
                                   {"convbn c1+pool (1->32, 3x3, 28x28)", 1, 28, 32, 3, 1, 1, 1, true},
                                   {"convbn c2+pool (32->64, 3x3, 14x14)", 32, 14, 64, 3, 1, 1, 1, true}};
  std::printf("%-36s %9s", "us per image, requantized (batch 1)", "");
  for (const rt::KernelPath path : fast_paths()) std::printf(" %10s", rt::kernel_path_name(path));
  std::printf("\n");
  uint64_t state = 5;
  for (const Conv& v : convs) {
    const int64_t ho = rt::pooled_size(v.hw, v.k, v.stride, v.padding), rows = ho * ho;
    std::vector<int8_t> x(v.hw * v.hw * v.c), w(v.out * v.c / v.groups * v.k * v.k), y(rows * v.out);
    for (auto& q : x) q = static_cast<int8_t>(next(state));
    for (auto& q : w) q = static_cast<int8_t>(static_cast<int>(next(state) % 255) - 127);
    std::vector<int32_t> b(v.out);
    for (auto& q : b) q = static_cast<int32_t>(next(state) % 2001) - 1000;
    rt::Requant rq;
    rq.zero_point = rq.act_min = -128;
    rq.act_max = 127;
    for (int64_t o = 0; o < v.out; ++o) {
      rq.multiplier.push_back(static_cast<int32_t>((int64_t{1} << 30) + static_cast<int64_t>(next(state) % (1 << 29))));
      rq.shift.push_back(39);
    }
    std::printf("%-36s %9s", v.what, "");
    for (const rt::KernelPath path : fast_paths()) {
      double seconds = 0;
      if (v.groups > 1) {
        const rt::ConvShape s{1, v.c, v.hw, v.hw, v.out, v.k, v.stride, v.padding, v.groups};
        const rt::GroupedConvWeights gw = rt::pack_grouped_conv(w, 8, s);
        seconds = best_seconds(2000, [&] { rt::qconv2d_depthwise_requantized(x, 3, gw, b, rq, y, s, 1, path); });
      } else {
        const rt::PackedConv pc = rt::pack_conv_weights(w, 8, v.c, v.hw, v.hw, v.out, v.k, v.stride, v.padding, path);
        std::vector<int16_t> planes(rt::conv_planes_size(1, pc));
        rt::conv_planes(x, 3, pc, planes, 1);
        if (v.pooled) {  // ho / 2 pairs of conv rows, each pooled into one row of outputs
          std::vector<int32_t> scratch(rt::conv_pool_scratch_size(pc));
          seconds = best_seconds(2000, [&] { rt::qconv2d_rows_pooled(planes, 3, pc, b, rq, scratch, y, 0, ho / 2); });
        } else {
          seconds = best_seconds(2000, [&] { rt::qconv2d_rows_requantized(planes, 3, pc, b, rq, y, 0, rows); });
        }
      }
      std::printf(" %10.2f", seconds * 1e6);
    }
    std::printf("\n");
  }
}

// Images per second of whole integer graphs shaped like the canonical models (random weights).
void bench_models(int threads) {
  uint64_t state = 7;
  rt::Graph mlp, lenet5;
  mlp.ops = {simple(rt::OpKind::Input), simple(rt::OpKind::Flatten),
             weighted(state, rt::OpKind::Linear, 784, 256, 1, 0), weighted(state, rt::OpKind::Linear, 256, 128, 1, 0),
             weighted(state, rt::OpKind::Linear, 128, 10, 1, 0)};
  lenet5.ops = {simple(rt::OpKind::Input),
                weighted(state, rt::OpKind::Conv2d, 1, 6, 5, 2),
                simple(rt::OpKind::MaxPool2d, 2, 2),
                weighted(state, rt::OpKind::Conv2d, 6, 16, 5, 0),
                simple(rt::OpKind::MaxPool2d, 2, 2),
                simple(rt::OpKind::Flatten),
                weighted(state, rt::OpKind::Linear, 400, 120, 1, 0),
                weighted(state, rt::OpKind::Linear, 120, 84, 1, 0),
                weighted(state, rt::OpKind::Linear, 84, 10, 1, 0)};
  rt::Graph convbn;
  convbn.ops = {simple(rt::OpKind::Input),
                weighted(state, rt::OpKind::Conv2d, 1, 32, 3, 1),
                simple(rt::OpKind::MaxPool2d, 2, 2),
                weighted(state, rt::OpKind::Conv2d, 32, 64, 3, 1),
                simple(rt::OpKind::MaxPool2d, 2, 2),
                simple(rt::OpKind::Flatten),
                weighted(state, rt::OpKind::Linear, 3136, 128, 1, 0),
                weighted(state, rt::OpKind::Linear, 128, 10, 1, 0)};
  for (rt::Graph* g : {&mlp, &lenet5, &convbn}) rt::chain_inputs(*g);
  const int64_t batch = 256;
  std::vector<uint8_t> images(batch * 28 * 28);
  for (auto& p : images) p = static_cast<uint8_t>(next(state));
  for (const auto& [name, graph] :
       {std::pair{"mlp", &mlp}, std::pair{"lenet5", &lenet5}, std::pair{"convbn", &convbn}}) {
    std::vector<rt::KernelPath> paths = fast_paths();
    paths.insert(paths.begin(), rt::KernelPath::Ref);
    for (const rt::KernelPath path : paths) {
      const bool fast = path != rt::KernelPath::Ref;
      rt::Executor executor(*graph, threads, path);
      const double seconds = best_seconds(fast ? 20 : 2, [&] { executor.run(images, batch); });
      // Batch 1: the best of many single-image calls (the best, not the median: this is a kernel benchmark).
      const double b1 = best_seconds(fast ? 500 : 5, [&] { executor.run(std::span(images).first(28 * 28), 1); });
      std::printf("%-8s %-7s batch %lld: %10.0f images/s   batch 1: %8.1f us\n", name, rt::kernel_path_name(path),
                  static_cast<long long>(batch), static_cast<double>(batch) / seconds, b1 * 1e6);
    }
  }
}

// The GEMM shapes: 1024³, and the Linear layers of the canonical models at batch 256.
const std::vector<Shape> kShapes = {
    {"square 1024^3", 1024, 1024, 1024},
    {"mlp fc1 batch 256 (256x784)", 256, 784, 256},
    {"mlp fc2 batch 256 (128x256)", 256, 256, 128},
    {"lenet5 fc1 batch 256 (120x400)", 256, 400, 120},
    {"convbn fc1 batch 256 (128x3136)", 256, 3136, 128},
};

// Random codes for a shape: x (N, IN) full-range int8, w8 (OUT, IN) in -127..127, w4 packed int4 codes.
struct GemmData {
  std::vector<int8_t> x, w8, w4;
};

GemmData gemm_data(const Shape& s, uint64_t& state) {
  GemmData d{std::vector<int8_t>(s.n * s.in), std::vector<int8_t>(s.out * s.in), {}};
  std::vector<int8_t> codes4(s.out * s.in);
  for (auto& v : d.x) v = static_cast<int8_t>(next(state));
  for (auto& v : d.w8) v = static_cast<int8_t>(static_cast<int>(next(state) % 255) - 127);
  for (auto& v : codes4) v = static_cast<int8_t>(static_cast<int>(next(state) % 16) - 8);
  const auto row_bytes = static_cast<int64_t>(rt::int4_packed_size(s.in));
  d.w4.resize(s.out * row_bytes);
  for (int64_t o = 0; o < s.out; ++o)
    rt::pack_int4(std::span(codes4).subspan(o * s.in, s.in), std::span(d.w4).subspan(o * row_bytes, row_bytes));
  return d;
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out + "\"";
}

// --json: the peaks and the s8 GEMMs on every fast path, each checked against the reference, as one JSON object.
int print_json(int threads, double seconds) {
  const rt::CpuFeatures& f = rt::cpu_features();
  std::printf("{\"cpu\": %s, \"cpuid\": %s, \"instruction_sets\": %s, \"auto_path\": \"%s\", \"threads\": %d,\n",
              json_string(cpuinfo_model_name()).c_str(), json_string(f.model).c_str(),
              json_string(rt::cpu_instruction_sets()).c_str(), rt::kernel_path_name(rt::kernel_path()), threads);
  std::printf(" \"peaks\": [");
  const std::vector<Peak> peaks = measure_peaks();
  for (size_t i = 0; i < peaks.size(); ++i)
    std::printf("%s\n  {\"instruction\": \"%s\", \"instructions_per_second\": %.6g, \"macs\": %d, \"gops\": %.1f}",
                i ? "," : "", peaks[i].instruction, peaks[i].instructions_per_second, peaks[i].macs, peaks[i].gops());
  std::printf("],\n \"gemms\": [");
  uint64_t state = 1;
  bool first = true;
  for (const Shape& s : kShapes) {
    const GemmData d = gemm_data(s, state);
    std::vector<int32_t> b(s.out, 0), ref(s.n * s.out), y(s.n * s.out);
    rt::qgemm_s8_ref(d.x, 3, d.w8, b, ref, s.n, s.in, s.out, threads);
    const double ops = 2.0 * static_cast<double>(s.n) * static_cast<double>(s.in) * static_cast<double>(s.out);
    for (const rt::KernelPath path : fast_paths()) {
      const rt::PackedWeights pw = rt::pack_weights(d.w8, 8, s.in, s.out, path);
      std::vector<int32_t> workspace(rt::qgemm_packed_workspace_size(s.n, pw));
      std::fill(y.begin(), y.end(), 0);
      rt::qgemm_packed(d.x, 3, pw, b, y, s.n, workspace, threads);
      if (y != ref) {
        const auto at = std::mismatch(y.begin(), y.end(), ref.begin()).first - y.begin();
        std::fprintf(stderr, "bench_qgemm: %s on %s differs from qgemm_s8_ref: y[%lld] = %d, expected %d\n", s.what,
                     rt::kernel_path_name(path), static_cast<long long>(at), y[at], ref[at]);
        return 1;
      }
      const std::vector<double> t =
          timed_calls(seconds, [&] { rt::qgemm_packed(d.x, 3, pw, b, y, s.n, workspace, threads); });
      const double med = median(t), best = *std::min_element(t.begin(), t.end());
      std::printf(
          "%s\n  {\"shape\": \"%s\", \"n\": %lld, \"in\": %lld, \"out\": %lld, \"path\": \"%s\", "
          "\"exact\": true, \"calls\": %zu, \"median_s\": %.6g, \"best_s\": %.6g, \"gops\": %.2f, "
          "\"gops_best\": %.2f}",
          first ? "" : ",", s.what, static_cast<long long>(s.n), static_cast<long long>(s.in),
          static_cast<long long>(s.out), rt::kernel_path_name(path), t.size(), med, best, ops / med / 1e9,
          ops / best / 1e9);
      first = false;
    }
  }
  std::printf("]}\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  bool json = false;
  double seconds = 0.5;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0) {
      json = true;
    } else if (std::strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
      seconds = std::atof(argv[++i]);
    } else if (std::atoi(argv[i]) >= 1) {
      threads = std::atoi(argv[i]);
    } else {
      std::fprintf(stderr, "usage: bench_qgemm [--json [--seconds S]] [threads]\n");
      return 2;
    }
  }
  if (json) return print_json(threads, seconds);
  std::printf("CPU: %s (/proc/cpuinfo); CPUID: %s\n", cpuinfo_model_name().c_str(), rt::cpu_features().model.c_str());
  std::printf("instruction sets: %s; best kernel path: %s; threads %d\n", rt::cpu_instruction_sets().c_str(),
              rt::kernel_path_name(rt::best_kernel_path()), threads);
  print_peaks(measure_peaks());
  std::printf("%-36s %9s", "GOP/s: shape (N x IN -> OUT)", "ref s8");
  for (const rt::KernelPath path : fast_paths())
    std::printf(" %7s s8 %7s s4", rt::kernel_path_name(path), rt::kernel_path_name(path));
  std::printf("\n");
  uint64_t state = 1;
  for (const Shape& s : kShapes) {
    const GemmData d = gemm_data(s, state);
    std::vector<int32_t> b(s.out, 0), y(s.n * s.out);
    const double ops = 2.0 * static_cast<double>(s.n) * static_cast<double>(s.in) * static_cast<double>(s.out);
    const int repeats = std::clamp(static_cast<int>(2e9 / ops), 3, 200);
    const double ref = best_seconds(std::max(1, repeats / 20),
                                    [&] { rt::qgemm_s8_ref(d.x, 3, d.w8, b, y, s.n, s.in, s.out, threads); });
    std::printf("%-36s %9.1f", s.what, ops / 1e9 / ref);
    for (const rt::KernelPath path : fast_paths()) {
      for (const int bits : {8, 4}) {
        const rt::PackedWeights pw = rt::pack_weights(bits == 8 ? d.w8 : d.w4, bits, s.in, s.out, path);
        std::vector<int32_t> workspace(rt::qgemm_packed_workspace_size(s.n, pw));
        std::printf(" %10.1f", ops / 1e9 / best_seconds(repeats, [&] {
                                 rt::qgemm_packed(d.x, 3, pw, b, y, s.n, workspace, threads);
                               }));
      }
    }
    std::printf("\n");
  }
  bench_convs();
  bench_requantized_convs();
  bench_models(threads);
  return 0;
}
