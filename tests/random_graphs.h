// Seeded random model descriptions for the graph tests (test_graph_quant, test_export_c): one generator.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "random_codes.h"

namespace lowbit::test {

// A random classifier description: a stem, 1-3 blocks (residual, depthwise-separable, grouped, concat, pool)
// and a head (global pooling or flatten), for a random input size and number of classes.
inline std::string random_description(Rng& rng, int index) {
  const int64_t channels = random_in(rng, 1, 3), height = random_in(rng, 6, 11), width = random_in(rng, 6, 11);
  int64_t h = height, w = width, c = 2 * random_in(rng, 2, 4);
  std::vector<std::string> nodes;
  std::string last = "input";
  int count = 0;
  const auto add = [&](const std::string& kind, const std::string& attributes, const std::vector<std::string>& inputs) {
    const std::string name = fmt::format("n{}", count++);
    std::string in;
    for (const std::string& i : inputs) in += (in.empty() ? "\"" : ", \"") + i + "\"";
    nodes.push_back(fmt::format(R"({{"name": "{}", "kind": "{}"{}, "inputs": [{}]}})", name, kind,
                                attributes.empty() ? "" : ", " + attributes, in));
    return name;
  };
  const auto activation = [&](const std::string& x) {
    const int a = random_in(rng, 0, 2);
    return a == 0 ? x : add(a == 1 ? "ReLU" : "ReLU6", "", {x});
  };
  const auto conv = [&](const std::string& x, int64_t out, int64_t k, int64_t stride, int64_t groups, bool bn) {
    const int64_t pad = k / 2;
    std::string y = add("Conv2d",
                        fmt::format(R"("out_channels": {}, "kernel": {}, "stride": {}, "padding": {}, )"
                                    R"("groups": {}, "bias": {})",
                                    out, k, stride, pad, groups, bn ? "false" : "true"),
                        {x});
    if (bn) y = add("BatchNorm2d", "", {y});
    h = (h + 2 * pad - k) / stride + 1;
    w = (w + 2 * pad - k) / stride + 1;
    c = out;
    return y;
  };
  last = activation(conv(last, c, 3, 1, 1, random_in(rng, 0, 1) == 1));
  const int blocks = random_in(rng, 1, 3);
  for (int b = 0; b < blocks; ++b) {
    switch (random_in(rng, 0, 4)) {
      case 0: {  // residual: two convs and the identity, Add, maybe ReLU
        const std::string x = last;
        std::string y = add("ReLU", "", {conv(x, c, 3, 1, 1, true)});
        y = conv(y, c, 3, 1, 1, random_in(rng, 0, 1) == 1);
        last = activation(add("Add", "", {y, x}));
        break;
      }
      case 1: {  // depthwise-separable, maybe strided
        const int64_t stride = std::min(h, w) >= 5 ? random_in(rng, 1, 2) : 1;
        std::string y = add("ReLU6", "", {conv(last, c, 3, stride, c, true)});
        last = activation(conv(y, 2 * random_in(rng, 2, 5), 1, 1, 1, random_in(rng, 0, 1) == 1));
        break;
      }
      case 2:  // grouped: two groups (or depthwise with a channel multiplier of 2 when c is odd)
        last = activation(c % 2 == 0 ? conv(last, 2 * random_in(rng, 1, 4), 3, 1, 2, random_in(rng, 0, 1) == 1)
                                     : conv(last, 2 * c, 3, 1, c, random_in(rng, 0, 1) == 1));
        break;
      case 3: {  // two branches joined along the channels
        const std::string x = last;
        const int64_t h0 = h, w0 = w;
        const std::string p = activation(conv(x, random_in(rng, 1, 5), 1, 1, 1, false));
        const int64_t cp = c;
        h = h0, w = w0;
        const std::string q = conv(x, random_in(rng, 1, 5), 3, 1, 1, random_in(rng, 0, 1) == 1);
        last = activation(add("Concat", "", {p, q}));
        c += cp;
        break;
      }
      default:  // a pool
        if (std::min(h, w) >= 4) {
          last = add(random_in(rng, 0, 1) == 0 ? "MaxPool2d" : "AvgPool2d", R"("kernel": 2)", {last});
          h /= 2, w /= 2;
        }
        break;
    }
  }
  if (random_in(rng, 0, 1) == 0) {
    last = add("Flatten", "", {add("GlobalAvgPool2d", "", {last})});
  } else {
    last = add("ReLU", "", {add("Linear", R"("out_features": 12)", {add("Flatten", "", {last})})});
    if (random_in(rng, 0, 1) == 0) last = add("Dropout", R"("p": 0.1)", {last});
  }
  add("Linear", R"("out_features": "classes")", {last});
  std::string list;
  for (const std::string& n : nodes) list += (list.empty() ? "" : ",\n  ") + n;
  return fmt::format(R"({{"format": "lowbit-model", "version": 1, "name": "random{}",
  "input": {{"channels": {}, "height": {}, "width": {}}}, "classes": {}, "nodes": [
  {}]}})",
                     index, channels, height, width, random_in(rng, 2, 7), list);
}

}  // namespace lowbit::test
