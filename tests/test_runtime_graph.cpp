// Tests of the integer graph: validate() refuses bad graphs, the Executor matches a hand-written computation.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "core/rng.h"
#include "quant/runtime/executor.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/requantize.h"

namespace rt = lowbit::quant::runtime;

namespace {

constexpr int kMaxReportedMismatches = 5;

int32_t random_in(lowbit::Rng& rng, int64_t lo, int64_t hi) {
  return static_cast<int32_t>(lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo + 1))));
}

rt::Op input_op() {
  rt::Op op;
  op.kind = rt::OpKind::Input;
  op.name = "input";
  for (int p = 0; p < 256; ++p) op.input_table[p] = static_cast<int8_t>(p - 128);  // code = pixel − 128
  return op;
}

// A Conv2d or Linear with random codes (kept as unpacked codes in `codes` for the test's own reference).
rt::Op weighted_op(lowbit::Rng& rng, rt::OpKind kind, const std::string& name, int bits, int64_t in, int64_t out,
                   int64_t k, int64_t padding, int32_t z_in, int32_t z_out, bool relu, std::vector<int8_t>& codes) {
  rt::Op op;
  op.kind = kind;
  op.name = name;
  op.weight_bits = bits;
  op.in_channels = in;
  op.out_channels = out;
  op.kernel = k;
  op.padding = padding;
  op.input_zero_point = z_in;
  const int64_t row = kind == rt::OpKind::Conv2d ? in * k * k : in;
  const int lim = bits == 8 ? 127 : 7;
  codes.resize(out * row);
  for (auto& c : codes) c = static_cast<int8_t>(random_in(rng, -lim, lim));
  if (bits == 8) {
    op.weight = codes;
  } else {
    const auto row_bytes = static_cast<int64_t>(rt::int4_packed_size(row));
    op.weight.resize(out * row_bytes);
    for (int64_t o = 0; o < out; ++o) {
      rt::pack_int4(std::span(codes).subspan(o * row, row), std::span(op.weight).subspan(o * row_bytes, row_bytes));
    }
  }
  for (int64_t o = 0; o < out; ++o) {
    op.bias.push_back(random_in(rng, -2000, 2000));
    op.requant.multiplier.push_back(random_in(rng, rt::kMultiplierMin, INT32_MAX));
    op.requant.shift.push_back(random_in(rng, bits == 8 ? 14 : 9, bits == 8 ? 16 : 11));  // M ≈ 2^−14 .. 2^−9
  }
  op.requant.zero_point = z_out;
  op.requant.act_min = relu ? z_out : -128;
  return op;
}

rt::Op window_op(rt::OpKind kind, const std::string& name, int64_t k, int64_t stride, int32_t z = 0) {
  rt::Op op;
  op.kind = kind;
  op.name = name;
  op.kernel = k;
  op.stride = stride;
  op.input_zero_point = z;
  return op;
}

rt::Op flatten_op() {
  rt::Op op;
  op.kind = rt::OpKind::Flatten;
  op.name = "flatten";
  return op;
}

// The tiny graph Input(1, 8, 8) → Conv2d(1→3, K 3, pad 1) + ReLU → MaxPool2d(2) → Flatten → Linear(48→5).
struct TinyGraph {
  rt::Graph graph;
  std::vector<int8_t> conv_codes, linear_codes;
};

TinyGraph tiny_graph(int bits, uint64_t seed) {
  lowbit::Rng rng(seed);
  TinyGraph t;
  t.graph.in_channels = 1;
  t.graph.in_height = 8;
  t.graph.in_width = 8;
  t.graph.ops.push_back(input_op());
  t.graph.ops.push_back(weighted_op(rng, rt::OpKind::Conv2d, "conv", bits, 1, 3, 3, 1, -3, -100, true, t.conv_codes));
  t.graph.ops.push_back(window_op(rt::OpKind::MaxPool2d, "pool", 2, 2));
  t.graph.ops.push_back(flatten_op());
  t.graph.ops.push_back(weighted_op(rng, rt::OpKind::Linear, "fc", bits, 48, 5, 1, 0, -100, 4, false, t.linear_codes));
  rt::chain_inputs(t.graph);
  return t;
}

// The tiny graph computed directly from the equations, one image at a time.
std::vector<int8_t> tiny_reference(const TinyGraph& t, const std::vector<uint8_t>& images, int64_t batch) {
  const rt::Op& conv = t.graph.ops[1];
  const rt::Op& fc = t.graph.ops[4];
  std::vector<int8_t> logits;
  for (int64_t i = 0; i < batch; ++i) {
    int8_t x[8][8];
    for (int r = 0; r < 8; ++r) {
      for (int col = 0; col < 8; ++col) x[r][col] = t.graph.ops[0].input_table[images[i * 64 + r * 8 + col]];
    }
    int8_t conv_out[3][8][8];
    for (int o = 0; o < 3; ++o) {
      for (int r = 0; r < 8; ++r) {
        for (int col = 0; col < 8; ++col) {
          int32_t acc = conv.bias[o];
          for (int kh = 0; kh < 3; ++kh) {
            for (int kw = 0; kw < 3; ++kw) {
              const int ih = r - 1 + kh, iw = col - 1 + kw;
              const int32_t q = (ih < 0 || ih >= 8 || iw < 0 || iw >= 8) ? conv.input_zero_point : x[ih][iw];
              acc += t.conv_codes[o * 9 + kh * 3 + kw] * (q - conv.input_zero_point);
            }
          }
          const rt::Requant& rq = conv.requant;
          conv_out[o][r][col] =
              rt::requantize(acc, rq.multiplier[o], rq.shift[o], rq.zero_point, rq.act_min, rq.act_max);
        }
      }
    }
    int8_t flat[48];
    for (int o = 0; o < 3; ++o) {
      for (int r = 0; r < 4; ++r) {
        for (int col = 0; col < 4; ++col) {
          flat[(o * 4 + r) * 4 + col] =
              std::max({conv_out[o][2 * r][2 * col], conv_out[o][2 * r][2 * col + 1], conv_out[o][2 * r + 1][2 * col],
                        conv_out[o][2 * r + 1][2 * col + 1]});
        }
      }
    }
    for (int o = 0; o < 5; ++o) {
      int32_t acc = fc.bias[o];
      for (int k = 0; k < 48; ++k) acc += t.linear_codes[o * 48 + k] * (flat[k] - fc.input_zero_point);
      const rt::Requant& rq = fc.requant;
      logits.push_back(rt::requantize(acc, rq.multiplier[o], rq.shift[o], rq.zero_point, rq.act_min, rq.act_max));
    }
  }
  return logits;
}

std::vector<uint8_t> random_images(lowbit::Rng& rng, size_t count) {
  std::vector<uint8_t> images(count);
  for (auto& p : images) p = static_cast<uint8_t>(rng.below(256));
  return images;
}

int count_mismatches(std::span<const int8_t> got, std::span<const int8_t> want) {
  int mismatches = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i] && ++mismatches <= kMaxReportedMismatches) {
      std::printf("[%zu]: got %d want %d\n", i, got[i], want[i]);
    }
  }
  return mismatches + static_cast<int>(got.size() != want.size());
}

// validate() must throw a RuntimeError whose message contains every fragment.
void check_refused(const rt::Graph& graph, const std::vector<std::string>& fragments) {
  std::string message;
  try {
    rt::validate(graph);
  } catch (const rt::RuntimeError& e) {
    message = e.what();
  }
  CAPTURE(message);
  REQUIRE(!message.empty());
  for (const std::string& f : fragments) CHECK_MESSAGE(message.find(f) != std::string::npos, "missing: ", f);
}

}  // namespace

TEST_CASE("Executor on a tiny Input→Conv→MaxPool→Flatten→Linear graph matches the equations exactly") {
  for (const int bits : {8, 4}) {
    const TinyGraph t = tiny_graph(bits, 100 + bits);
    lowbit::Rng rng(1);
    for (const auto kernels : {rt::Executor::Kernels::Fastest, rt::Executor::Kernels::Reference}) {
      for (const int threads : {1, 2}) {
        for (const bool keep : {false, true}) {  // the planned arena, or every op's output kept
          CAPTURE(bits);
          CAPTURE(threads);
          CAPTURE(keep);
          CAPTURE(kernels == rt::Executor::Kernels::Fastest);
          rt::Executor executor(t.graph, threads, kernels);
          executor.keep_all_outputs(keep);
          CHECK(executor.num_classes() == 5);
          const int8_t* first_buffer = nullptr;
          for (const int64_t batch : {5, 3, 1, 5}) {
            const auto images = random_images(rng, batch * 64);
            const auto logits = executor.run(images, batch);
            const auto want = tiny_reference(t, images, batch);
            CHECK(count_mismatches(logits, want) == 0);
            if (first_buffer == nullptr) first_buffer = logits.data();
            CHECK(logits.data() == first_buffer);  // no reallocation for a batch no larger than the first
          }
          if (keep) {
            CHECK(executor.op_output(2).size() == 5 * 3 * 4 * 4);
          } else {
            CHECK_THROWS_AS(executor.op_output(2), rt::RuntimeError);
            CHECK(executor.arena_bytes_per_image() == executor.memory_plan().lower_bound);
          }
        }
      }
    }
  }
}

TEST_CASE("Executor: fast kernels equal the reference on a LeNet-5 shaped graph, any thread count") {
  for (const int bits : {8, 4}) {
    lowbit::Rng rng(200 + bits);
    rt::Graph g;
    std::vector<int8_t> unused;
    g.ops.push_back(input_op());
    g.ops.push_back(weighted_op(rng, rt::OpKind::Conv2d, "c1", bits, 1, 6, 5, 2, 0, -128, true, unused));
    g.ops.push_back(window_op(rt::OpKind::MaxPool2d, "p1", 2, 2));
    g.ops.push_back(weighted_op(rng, rt::OpKind::Conv2d, "c2", bits, 6, 16, 5, 0, -128, -128, true, unused));
    g.ops.push_back(window_op(rt::OpKind::AvgPool2d, "p2", 2, 2, -128));
    g.ops.push_back(flatten_op());
    g.ops.push_back(weighted_op(rng, rt::OpKind::Linear, "f1", bits, 400, 120, 1, 0, -128, -128, true, unused));
    g.ops.push_back(weighted_op(rng, rt::OpKind::Linear, "f2", bits, 120, 84, 1, 0, -128, -128, true, unused));
    g.ops.push_back(weighted_op(rng, rt::OpKind::Linear, "f3", bits, 84, 10, 1, 0, -128, 5, false, unused));
    rt::chain_inputs(g);
    // 9 images: one slice, each op split over the threads; 37: the batch split into one slice per thread.
    for (const int64_t batch : {9, 37}) {
      const auto images = random_images(rng, batch * 28 * 28);
      rt::Executor reference(g, 1, rt::Executor::Kernels::Reference);
      reference.keep_all_outputs();
      const auto want = reference.run(images, batch);
      for (const int threads : {1, 2, 3}) {
        rt::Executor fast(g, threads), planned(g, threads);
        fast.keep_all_outputs();
        const auto got = fast.run(images, batch);
        CAPTURE(bits);
        CAPTURE(batch);
        CAPTURE(threads);
        CHECK(count_mismatches(got, want) == 0);
        CHECK(count_mismatches(planned.run(images, batch), want) == 0);  // the planned arena: the same logits
        for (size_t i = 0; i < g.ops.size(); ++i) {
          CAPTURE(i);
          if (fast.stores_output(i)) {
            CHECK(count_mismatches(fast.op_output(i), reference.op_output(i)) == 0);
          } else {  // a Conv2d fused with its max pool: only the pool's codes exist
            CHECK(g.ops[i + 1].kind == rt::OpKind::MaxPool2d);
          }
        }
        // The logits are not constant: the test exercises real values.
        CHECK(std::count(want.begin(), want.end(), want[0]) < static_cast<int64_t>(want.size()));
      }
    }
  }
}

TEST_CASE("Executor: a batch larger than a tile runs tile by tile, with the codes of the whole batch at once") {
  // Input(1, 96, 96) → Conv2d(1→16) → AvgPool2d(2) → Conv2d(16→8) → AvgPool2d(2) → Flatten → Linear(4608→10):
  // about 190 KB of activations per image, so a tile (Executor::tile_images) holds a few images and every slice
  // of 21 images runs several tiles, the last one smaller.
  lowbit::Rng rng(300);
  rt::Graph g;
  g.in_height = g.in_width = 96;
  std::vector<int8_t> unused;
  g.ops.push_back(input_op());
  g.ops.push_back(weighted_op(rng, rt::OpKind::Conv2d, "c1", 8, 1, 16, 3, 1, -128, -128, true, unused));
  g.ops.push_back(window_op(rt::OpKind::AvgPool2d, "p1", 2, 2, -128));
  g.ops.push_back(weighted_op(rng, rt::OpKind::Conv2d, "c2", 8, 16, 8, 3, 1, -128, -128, true, unused));
  g.ops.push_back(window_op(rt::OpKind::AvgPool2d, "p2", 2, 2, -128));
  g.ops.push_back(flatten_op());
  g.ops.push_back(weighted_op(rng, rt::OpKind::Linear, "f", 8, 8 * 24 * 24, 10, 1, 0, -128, 3, false, unused));
  rt::chain_inputs(g);
  const int64_t batch = 21;
  const auto images = random_images(rng, batch * 96 * 96);
  rt::Executor reference(g, 1, rt::Executor::Kernels::Reference);
  reference.keep_all_outputs();  // every op's output of the whole batch in its own buffer: no tiles to mix up
  const std::vector<int8_t> want(reference.run(images, batch).begin(), reference.run(images, batch).end());
  CHECK(std::count(want.begin(), want.end(), want[0]) < static_cast<int64_t>(want.size()));
  for (const auto kernels : {rt::Executor::Kernels::Fastest, rt::Executor::Kernels::Reference}) {
    for (const int threads : {1, 2, 3}) {
      CAPTURE(threads);
      CAPTURE(kernels == rt::Executor::Kernels::Fastest);
      rt::Executor planned(g, threads, kernels);
      REQUIRE(planned.tile_images() * 3 <= batch / 2);  // at least three tiles per slice
      CHECK(count_mismatches(planned.run(images, batch), want) == 0);
      CHECK(count_mismatches(planned.run(std::span(images).first(7 * 96 * 96), 7),
                             std::span(want).first(7 * 10)) == 0);  // a smaller batch in the same arenas
    }
  }
}

TEST_CASE("Executor refuses images of the wrong size") {
  const TinyGraph t = tiny_graph(8, 3);
  rt::Executor executor(t.graph);
  const std::vector<uint8_t> images(63);
  CHECK_THROWS_AS(executor.run(images, 1), rt::RuntimeError);
}

TEST_CASE("validate refuses graphs that cannot run") {
  const TinyGraph t = tiny_graph(8, 7);
  CHECK_NOTHROW(rt::validate(t.graph));
  const auto modified = [&](auto&& edit) {
    rt::Graph g = t.graph;
    edit(g);
    rt::chain_inputs(g);  // an edit that inserts or removes ops keeps the chain
    return g;
  };
  // Shapes that do not chain.
  check_refused(modified([](rt::Graph& g) { g.ops[4].in_channels = 47; }), {"op 4", "'fc'", "47", "(48, 1, 1)"});
  check_refused(modified([](rt::Graph& g) { g.ops.erase(g.ops.begin() + 3); }), {"op 3", "Flatten"});
  check_refused(modified([](rt::Graph& g) { g.in_channels = 2; }), {"op 1", "'conv'", "input channels"});
  check_refused(modified([](rt::Graph& g) { g.ops[2].kernel = 9; }), {"op 2", "'pool'", "does not fit"});
  check_refused(modified([](rt::Graph& g) { g.ops.erase(g.ops.begin()); }), {"ops[0] must be an Input"});
  check_refused(modified([](rt::Graph& g) { g.ops.insert(g.ops.begin() + 1, input_op()); }), {"op 1", "only ops[0]"});
  // Parameters out of range.
  check_refused(modified([](rt::Graph& g) { g.ops[1].requant.shift[2] = 0; }),
                {"'conv'", "shift", "channel 2", "found 0"});
  check_refused(modified([](rt::Graph& g) { g.ops[1].requant.shift[0] = 63; }), {"shift", "[1, 62]", "63"});
  check_refused(modified([](rt::Graph& g) { g.ops[4].requant.multiplier[1] = (1 << 30) - 1; }),
                {"'fc'", "multiplier", "1073741823"});
  check_refused(modified([](rt::Graph& g) {
                  g.ops[4].requant.zero_point = -128;
                  g.ops[4].requant.act_min = -100;
                }),
                {"'fc'", "zero_point", "[-100, 127]", "-128"});
  check_refused(modified([](rt::Graph& g) {
                  g.ops[4].requant.act_min = 10;
                  g.ops[4].requant.act_max = 5;
                }),
                {"act_max", "[10, 127]", "found 5"});
  check_refused(modified([](rt::Graph& g) { g.ops[1].input_zero_point = 200; }), {"'conv'", "input_zero_point", "200"});
  check_refused(modified([](rt::Graph& g) { g.ops[4].input_zero_point = -99; }),
                {"'fc'", "input_zero_point must equal the z_out -100", "-99"});
  check_refused(modified([](rt::Graph& g) { g.ops[1].weight[4] = -128; }), {"'conv'", "[-127, 127]", "-128"});
  check_refused(modified([](rt::Graph& g) { g.ops[1].weight.pop_back(); }),
                {"'conv'", "expected 27 weight bytes", "26"});
  check_refused(modified([](rt::Graph& g) { g.ops[4].bias.push_back(0); }), {"'fc'", "expected 5 biases", "6"});
  check_refused(modified([](rt::Graph& g) { g.ops[4].requant.shift.pop_back(); }), {"multipliers and shifts"});
  check_refused(modified([](rt::Graph& g) { g.ops[1].weight_bits = 2; }), {"weight_bits must be 8 or 4", "2"});
  // Packed int4 rows of odd length keep their padding nibble 0.
  {
    const TinyGraph t4 = tiny_graph(4, 9);
    rt::Graph g = t4.graph;
    CHECK_NOTHROW(rt::validate(g));
    g.ops[1].weight[4] = static_cast<int8_t>(g.ops[1].weight[4] | 0x10);  // row 0 has 9 codes: byte 4's high nibble
    check_refused(g, {"'conv'", "padding (high) nibble", "output channel 0"});
  }
  // An accumulator that could overflow int32: bias near the limit, or a long row of large weights.
  check_refused(modified([](rt::Graph& g) { g.ops[4].bias[3] = INT32_MAX - 10; }),
                {"'fc'", "accumulator could overflow", "output channel 3"});
  {
    rt::Graph g;
    g.in_channels = 70000;
    g.in_height = g.in_width = 1;
    g.ops.push_back(input_op());  // codes in [−128, 127]
    rt::Op fc;
    fc.kind = rt::OpKind::Linear;
    fc.name = "wide";
    fc.in_channels = 70000;
    fc.out_channels = 1;
    fc.weight.assign(70000, 127);
    fc.bias = {0};
    fc.input_zero_point = -128;  // max|x − z_in| = 255: 127·255·70000 > 2^31
    fc.requant.multiplier = {rt::kMultiplierMin};
    fc.requant.shift = {31};
    g.ops.push_back(fc);
    rt::chain_inputs(g);
    check_refused(g, {"'wide'", "accumulator could overflow", "2266950000", "< 2^31"});
    g.ops[1].weight.assign(70000, 60);  // 60·255·70000 = 1071000000 fits
    CHECK_NOTHROW(rt::validate(g));
  }
}
