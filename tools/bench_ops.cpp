// Micro benchmark of the float ops of training: the forward and the backward of each op alone, at the
// shapes of lenet5's and convbn's layers at the training batch (64), one thread unless told otherwise.
//
// Run: build/bin/bench_ops [--reps N] [--threads T] [name filter]
// One line per op and shape: forward and backward milliseconds per batch, the minimum over N runs
// (default 50) and the median. The backward is one Tensor::backward from the op's output, the time
// autograd adds included; the inputs' gradients are dropped between runs.
//
// What it is for: before/after comparisons of a change to core/ops.cpp. A whole training epoch
// moves by 2x with the speed phases of a virtual machine, which hides a 10% change; the minimum
// over many runs of one op does not, if the old and the new build are run alternately, several
// times. (In session 9 it showed that "wide" im2col columns, which a training epoch had seemed to
// speed up, slowed every conv shape down: see docs/benchmarks.md.)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/conv_direct.h"
#include "core/ops.h"
#include "core/tensor.h"
#include "core/threads.h"

namespace {

using namespace lowbit;

struct Case {
  std::string name;                                 // model, layer, op
  std::vector<Shape> inputs;                        // random inputs, all leaves
  std::vector<bool> grad;                           // which inputs want a gradient
  std::function<Tensor(std::vector<Tensor>&)> run;  // the op on the inputs
};

std::vector<Case> cases() {
  auto conv = [](int64_t stride, int64_t padding, bool bias) {
    return [=](std::vector<Tensor>& in) { return ops::conv2d(in[0], in[1], bias ? in[2] : Tensor(), stride, padding); };
  };
  auto batch_norm_op = [](bool with_relu) {  // training mode; running statistics that start at 0 and 1
    return [=](std::vector<Tensor>& in) {
      Tensor mean = Tensor::zeros({in[1].size(0)}), var = Tensor::ones({in[1].size(0)});
      return with_relu ? ops::batch_norm_relu(in[0], in[1], in[2], mean, var, true)
                       : ops::batch_norm(in[0], in[1], in[2], mean, var, true);
    };
  };
  const auto batch_norm = batch_norm_op(false), batch_norm_relu = batch_norm_op(true);
  auto relu = [](std::vector<Tensor>& in) { return ops::relu(in[0]); };
  auto max_pool = [](std::vector<Tensor>& in) { return ops::max_pool2d(in[0], 2, 2); };
  auto linear = [](std::vector<Tensor>& in) { return ops::add(ops::matmul(in[0], in[1], false, true), in[2]); };
  return {
      {"lenet5 conv 1x28x28 -> 6, 5x5 pad 2",
       {{64, 1, 28, 28}, {6, 1, 5, 5}, {6}},
       {false, true, true},
       conv(1, 2, true)},
      {"lenet5 relu 6x28x28", {{64, 6, 28, 28}}, {true}, relu},
      {"lenet5 maxpool 6x28x28", {{64, 6, 28, 28}}, {true}, max_pool},
      {"lenet5 conv 6x14x14 -> 16, 5x5", {{64, 6, 14, 14}, {16, 6, 5, 5}, {16}}, {true, true, true}, conv(1, 0, true)},
      {"lenet5 linear 400 -> 120", {{64, 400}, {120, 400}, {120}}, {true, true, true}, linear},
      {"convbn conv 1x28x28 -> 32, 3x3 pad 1", {{64, 1, 28, 28}, {32, 1, 3, 3}}, {false, true}, conv(1, 1, false)},
      {"convbn batchnorm 32x28x28", {{64, 32, 28, 28}, {32}, {32}}, {true, true, true}, batch_norm},
      {"convbn relu 32x28x28", {{64, 32, 28, 28}}, {true}, relu},
      {"convbn batchnorm+relu 32x28x28", {{64, 32, 28, 28}, {32}, {32}}, {true, true, true}, batch_norm_relu},
      {"convbn maxpool 32x28x28", {{64, 32, 28, 28}}, {true}, max_pool},
      {"convbn conv 32x14x14 -> 64, 3x3 pad 1", {{64, 32, 14, 14}, {64, 32, 3, 3}}, {true, true}, conv(1, 1, false)},
      {"convbn batchnorm 64x14x14", {{64, 64, 14, 14}, {64}, {64}}, {true, true, true}, batch_norm},
      {"convbn relu 64x14x14", {{64, 64, 14, 14}}, {true}, relu},
      {"convbn batchnorm+relu 64x14x14", {{64, 64, 14, 14}, {64}, {64}}, {true, true, true}, batch_norm_relu},
      {"convbn linear 3136 -> 128", {{64, 3136}, {128, 3136}, {128}}, {true, true, true}, linear},
      {"resnet8 conv 16x28x28 -> 16, 3x3 pad 1", {{64, 16, 28, 28}, {16, 16, 3, 3}}, {true, true}, conv(1, 1, false)},
      {"resnet8 conv 16x28x28 -> 32, 3x3 s2 pad 1",
       {{64, 16, 28, 28}, {32, 16, 3, 3}},
       {true, true},
       conv(2, 1, false)},
      {"resnet8 conv 16x28x28 -> 32, 1x1 s2",
       {{64, 16, 28, 28}, {32, 16, 1, 1}, {32}},
       {true, true, true},
       conv(2, 0, true)},
      {"resnet8 conv 32x14x14 -> 64, 3x3 s2 pad 1",
       {{64, 32, 14, 14}, {64, 32, 3, 3}},
       {true, true},
       conv(2, 1, false)},
      {"resnet8 conv 64x7x7 -> 64, 3x3 pad 1", {{64, 64, 7, 7}, {64, 64, 3, 3}}, {true, true}, conv(1, 1, false)},
  };
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr, "bench_ops: %s\nusage: bench_ops [--reps N (1..100000)] [--threads T (1..256)] [filter]\n", why);
  std::exit(2);
}

int parse_int(const char* flag, const char* text, int lo, int hi) {
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < lo || v > hi) usage((std::string(flag) + " out of range: " + text).c_str());
  return static_cast<int>(v);
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 50, threads = 1;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = parse_int("--reps", argv[++i], 1, 100000);
    } else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = parse_int("--threads", argv[++i], 1, 256);
    } else if (argv[i][0] == '-') {
      usage((std::string("unknown flag ") + argv[i]).c_str());
    } else {
      filter = argv[i];
    }
  }
  set_num_threads(threads);
  prepare_blas();
  std::printf("bench_ops: %d thread(s), %s, %s; ms per batch of 64, min and median of %d runs\n", threads,
              blas_description().c_str(), ops::detail::direct_conv_description(), reps);
  std::printf("%-40s %9s %9s %9s %9s\n", "op", "fwd min", "fwd med", "bwd min", "bwd med");
  using Clock = std::chrono::steady_clock;
  for (Case& c : cases()) {
    if (c.name.find(filter) == std::string::npos) continue;
    std::vector<Tensor> in;
    for (size_t i = 0; i < c.inputs.size(); ++i) in.push_back(Tensor::randn(c.inputs[i]).set_requires_grad(c.grad[i]));
    const Tensor y0 = c.run(in);
    const Tensor dy = Tensor::randn(y0.shape());
    std::vector<double> fwd, bwd;
    for (int r = 0; r < reps; ++r) {
      for (Tensor& t : in) t.zero_grad();
      const auto t0 = Clock::now();
      const Tensor y = c.run(in);
      const auto t1 = Clock::now();
      y.backward(dy);
      const auto t2 = Clock::now();
      fwd.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      bwd.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
    }
    std::printf("%-40s %9.3f %9.3f %9.3f %9.3f\n", c.name.c_str(), *std::min_element(fwd.begin(), fwd.end()),
                median(fwd), *std::min_element(bwd.begin(), bwd.end()), median(bwd));
  }
  return 0;
}
