// Output shapes and validation of the integer graph (checked once, so the kernels run clean).
#include "quant/runtime/graph.h"

#include <algorithm>
#include <cstdlib>
#include <span>
#include <string>

#include "quant/runtime/int4.h"
#include "quant/runtime/requantize.h"

namespace lowbit::quant::runtime {

namespace {

constexpr int64_t kMaxDim = int64_t{1} << 20;            // any channel count, height, width
constexpr int64_t kMaxKernel = int64_t{1} << 10;         // kernel side
constexpr int64_t kMaxImageSize = int64_t{1} << 30;      // codes in one image's activation
constexpr int64_t kAccumulatorLimit = int64_t{1} << 31;  // |acc| must stay below 2^31

std::string describe(const Op& op, size_t index) {
  return "runtime graph: op " + std::to_string(index) + " '" + op.name + "' (" + to_string(op.kind) + "): ";
}

[[noreturn]] void fail(const Op& op, size_t index, const std::string& what) {
  throw RuntimeError(describe(op, index) + what);
}

std::string shape_string(const Shape& s) {
  std::string text = "(";
  text += std::to_string(s.c) + ", " + std::to_string(s.h) + ", " + std::to_string(s.w) + ")";
  return text;
}

void check_range(const Op& op, size_t index, const char* what, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    fail(op, index,
         std::string(what) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], found " +
             std::to_string(value));
  }
}

void check_window(const Op& op, size_t index) {
  check_range(op, index, "kernel", op.kernel, 1, kMaxKernel);
  check_range(op, index, "stride", op.stride, 1, kMaxKernel);
  check_range(op, index, "padding", op.padding, 0, op.kind == OpKind::Conv2d ? op.kernel - 1 : op.kernel / 2);
}

// The smallest and largest code an activation can hold.
struct CodeRange {
  int32_t lo = -128, hi = 127;
};

// Conv2d / Linear: weights, bias, requantization and the accumulator bound (docs/quantization.md eq. 5).
void check_weighted(const Op& op, size_t index, const CodeRange& input_range) {
  check_range(op, index, "in_channels", op.in_channels, 1, kMaxDim);
  check_range(op, index, "out_channels", op.out_channels, 1, kMaxDim);
  check_range(op, index, "groups", op.groups, 1, op.kind == OpKind::Conv2d ? op.in_channels : 1);
  if (op.in_channels % op.groups != 0 || op.out_channels % op.groups != 0) {
    fail(op, index,
         "groups " + std::to_string(op.groups) + " must divide in_channels " + std::to_string(op.in_channels) +
             " and out_channels " + std::to_string(op.out_channels));
  }
  if (op.weight_bits != 8 && op.weight_bits != 4) {
    fail(op, index, "weight_bits must be 8 or 4, found " + std::to_string(op.weight_bits));
  }
  const int64_t out = op.out_channels;
  const int64_t row = weight_row_length(op);
  const int64_t row_bytes = op.weight_bits == 8 ? row : static_cast<int64_t>(int4_packed_size(row));
  if (static_cast<int64_t>(op.weight.size()) != out * row_bytes) {
    fail(op, index,
         "expected " + std::to_string(out * row_bytes) + " weight bytes (OUT " + std::to_string(out) + " × " +
             std::to_string(row_bytes) + (op.weight_bits == 8 ? " int8" : " packed int4") + " bytes per row), found " +
             std::to_string(op.weight.size()));
  }
  if (static_cast<int64_t>(op.bias.size()) != out) {
    fail(op, index, "expected " + std::to_string(out) + " biases (OUT), found " + std::to_string(op.bias.size()));
  }
  const Requant& rq = op.requant;
  if (static_cast<int64_t>(rq.multiplier.size()) != out || static_cast<int64_t>(rq.shift.size()) != out) {
    fail(op, index,
         "expected " + std::to_string(out) + " multipliers and shifts (OUT), found " +
             std::to_string(rq.multiplier.size()) + " and " + std::to_string(rq.shift.size()));
  }
  check_range(op, index, "input_zero_point", op.input_zero_point, -128, 127);
  check_range(op, index, "requant.act_min", rq.act_min, -128, 127);
  check_range(op, index, "requant.act_max", rq.act_max, rq.act_min, 127);
  check_range(op, index, "requant.zero_point", rq.zero_point, rq.act_min, rq.act_max);

  // Largest |x − z_in| over the input's codes; padding holds z_in and contributes 0.
  const int64_t max_dev = std::max(std::abs(int64_t{input_range.lo} - op.input_zero_point),
                                   std::abs(int64_t{input_range.hi} - op.input_zero_point));
  const std::span<const int8_t> w(op.weight);
  for (int64_t c = 0; c < out; ++c) {
    const std::string channel = " of output channel " + std::to_string(c);
    check_range(op, index, ("requant.multiplier" + channel).c_str(), rq.multiplier[c], kMultiplierMin, kMultiplierMax);
    check_range(op, index, ("requant.shift" + channel).c_str(), rq.shift[c], kShiftMin, kShiftMax);
    int64_t abs_sum = 0;
    if (op.weight_bits == 8) {
      for (int64_t k = 0; k < row; ++k) {
        const int8_t v = w[c * row + k];
        if (v == -128) fail(op, index, "int8 weight" + channel + " must be in [-127, 127], found -128");
        abs_sum += std::abs(int{v});
      }
    } else {
      const auto packed = w.subspan(c * row_bytes, row_bytes);
      for (int64_t k = 0; k < row; ++k) abs_sum += std::abs(int{unpack_int4_at(packed, k)});
      if (row % 2 == 1 && unpack_int4_nibble(packed[row_bytes - 1], 1) != 0) {
        fail(op, index,
             "the padding (high) nibble of the last byte" + channel + " must be 0 (odd row length " +
                 std::to_string(row) + ")");
      }
    }
    const int64_t worst = std::abs(int64_t{op.bias[c]}) + abs_sum * max_dev;
    if (worst >= kAccumulatorLimit) {
      fail(op, index,
           "int32 accumulator could overflow" + channel + ": |bias| + Σ|w|·max|x − z_in| = " + std::to_string(worst) +
               " must be < 2^31 (input codes [" + std::to_string(input_range.lo) + ", " +
               std::to_string(input_range.hi) + "], z_in " + std::to_string(op.input_zero_point) +
               "); use fewer weight bits or a narrower input range");
    }
  }
}

// Add / Concat: one rescale per input, the largest multiplier normalised (docs/quantization.md eq. 10).
void check_rescale(const Op& op, size_t index, const std::vector<int32_t>& producer_zero_points) {
  const Rescale& r = op.rescale;
  if (r.zero_points.size() != producer_zero_points.size() || r.multipliers.size() != producer_zero_points.size()) {
    fail(op, index,
         "expected " + std::to_string(producer_zero_points.size()) + " input zero points and multipliers (one per "
         "input), found " + std::to_string(r.zero_points.size()) + " and " + std::to_string(r.multipliers.size()));
  }
  check_range(op, index, "rescale.shift", r.shift, kShiftMin, kShiftMax);
  int32_t largest = 0;
  for (size_t k = 0; k < r.multipliers.size(); ++k) {
    const std::string input = " of input " + std::to_string(k);
    check_range(op, index, ("rescale.multiplier" + input).c_str(), r.multipliers[k], 0, kMultiplierMax);
    if (r.zero_points[k] != producer_zero_points[k]) {
      fail(op, index,
           "the zero point" + input + " must equal the z_out " + std::to_string(producer_zero_points[k]) +
               " of the op that produced it, found " + std::to_string(r.zero_points[k]));
    }
    largest = std::max(largest, r.multipliers[k]);
  }
  if (largest < kMultiplierMin) {
    fail(op, index, "the largest rescale multiplier must be in [2^30, 2^31), found " + std::to_string(largest));
  }
  check_range(op, index, "requant.act_min", op.requant.act_min, -128, 127);
  check_range(op, index, "requant.act_max", op.requant.act_max, op.requant.act_min, 127);
  check_range(op, index, "requant.zero_point", op.requant.zero_point, op.requant.act_min, op.requant.act_max);
}

}  // namespace

const char* to_string(OpKind kind) {
  switch (kind) {
    case OpKind::Input:
      return "Input";
    case OpKind::Conv2d:
      return "Conv2d";
    case OpKind::Linear:
      return "Linear";
    case OpKind::MaxPool2d:
      return "MaxPool2d";
    case OpKind::AvgPool2d:
      return "AvgPool2d";
    case OpKind::Flatten:
      return "Flatten";
    case OpKind::Add:
      return "Add";
    case OpKind::Concat:
      return "Concat";
    case OpKind::GlobalAvgPool2d:
      return "GlobalAvgPool2d";
    case OpKind::Clamp:
      return "Clamp";
  }
  return "unknown";
}

void chain_inputs(Graph& graph) {
  for (size_t i = 0; i < graph.ops.size(); ++i)
    graph.ops[i].inputs =
        graph.ops[i].kind == OpKind::Input ? std::vector<int>{} : std::vector<int>{static_cast<int>(i) - 1};
}

std::vector<std::vector<int>> readers(const Graph& graph) {
  std::vector<std::vector<int>> out(graph.ops.size());
  for (size_t i = 0; i < graph.ops.size(); ++i)
    for (const int j : graph.ops[i].inputs)
      if (j >= 0 && static_cast<size_t>(j) < out.size()) out[static_cast<size_t>(j)].push_back(static_cast<int>(i));
  return out;
}

WindowRange window_range(int64_t o, int64_t kernel, int64_t stride, int64_t padding, int64_t size) {
  const int64_t start = o * stride - padding;
  return {std::max<int64_t>(start, 0), std::min(start + kernel, size)};
}

int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  const int64_t span = size + 2 * padding - kernel;
  return span < 0 || stride < 1 ? 0 : span / stride + 1;
}

int64_t weight_row_length(const Op& op) {
  return op.kind == OpKind::Conv2d ? op.in_channels / std::max<int64_t>(op.groups, 1) * op.kernel * op.kernel
                                   : op.in_channels;
}

Shape output_shape(const Op& op, const Shape& input, size_t op_index) {
  return output_shape(op, std::vector<Shape>{input}, op_index);
}

Shape output_shape(const Op& op, const std::vector<Shape>& inputs, size_t op_index) {
  const size_t expected = op.kind == OpKind::Input ? 0 : op.kind == OpKind::Add ? 2 : 1;
  const bool count_ok = op.kind == OpKind::Concat ? inputs.size() >= 2 : inputs.size() == expected;
  if (!count_ok && op.kind != OpKind::Input) {
    fail(op, op_index,
         "takes " + std::string(op.kind == OpKind::Concat ? "at least 2" : std::to_string(expected)) + " input" +
             (expected == 1 ? "" : "s") + ", found " + std::to_string(inputs.size()));
  }
  const Shape& input = inputs.empty() ? Shape{} : inputs[0];
  switch (op.kind) {
    case OpKind::Input:
      return inputs.empty() ? Shape{} : input;
    case OpKind::Flatten:
      return Shape{input.size(), 1, 1};
    case OpKind::Clamp:
      return input;
    case OpKind::GlobalAvgPool2d:
      return Shape{input.c, 1, 1};
    case OpKind::Add:
      if (inputs[1] != input) {
        fail(op, op_index,
             "its two inputs must have the same shape, found " + shape_string(input) + " and " +
                 shape_string(inputs[1]));
      }
      return input;
    case OpKind::Concat: {
      Shape out{0, input.h, input.w};
      for (const Shape& s : inputs) {
        if (s.h != input.h || s.w != input.w) {
          fail(op, op_index,
               "its inputs must have the same height and width, found " + shape_string(input) + " and " +
                   shape_string(s));
        }
        out.c += s.c;
      }
      return out;
    }
    case OpKind::Linear:
      if (input.h != 1 || input.w != 1 || input.c != op.in_channels) {
        fail(op, op_index,
             "expected input (IN " + std::to_string(op.in_channels) + ", 1, 1), found " + shape_string(input) +
                 (input.h * input.w > 1 ? "; insert a Flatten before it" : ""));
      }
      return {op.out_channels, 1, 1};
    case OpKind::Conv2d:
    case OpKind::MaxPool2d:
    case OpKind::AvgPool2d: {
      if (op.kind == OpKind::Conv2d && input.c != op.in_channels) {
        fail(op, op_index,
             "expected " + std::to_string(op.in_channels) + " input channels, found input " + shape_string(input));
      }
      const Shape out{op.kind == OpKind::Conv2d ? op.out_channels : input.c,
                      pooled_size(input.h, op.kernel, op.stride, op.padding),
                      pooled_size(input.w, op.kernel, op.stride, op.padding)};
      if (out.h < 1 || out.w < 1) {
        fail(op, op_index,
             "kernel " + std::to_string(op.kernel) + " with padding " + std::to_string(op.padding) +
                 " does not fit input " + shape_string(input));
      }
      return out;
    }
  }
  fail(op, op_index, "unknown op kind");
}

namespace {
// Every op reads earlier ops only (so ops is a topological order and there is no cycle).
void check_inputs(const Graph& graph) {
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const Op& op = graph.ops[i];
    if (op.kind == OpKind::Input && !op.inputs.empty()) fail(op, i, "an Input op reads no other op");
    for (const int j : op.inputs) {
      if (j < 0 || static_cast<size_t>(j) >= i) {
        fail(op, i,
             "input " + std::to_string(j) + " must be an earlier op (0.." + std::to_string(static_cast<int>(i) - 1) +
                 "): the ops must be in an order where every op comes after its inputs, with no cycle");
      }
    }
  }
}
}  // namespace

std::vector<Shape> output_shapes(const Graph& graph) {
  check_inputs(graph);
  std::vector<Shape> shapes;
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    std::vector<Shape> in;
    for (const int j : graph.ops[i].inputs) in.push_back(shapes[static_cast<size_t>(j)]);
    if (graph.ops[i].kind == OpKind::Input) in = {Shape{graph.in_channels, graph.in_height, graph.in_width}};
    shapes.push_back(output_shape(graph.ops[i], in, i));
  }
  return shapes;
}

void validate(const Graph& graph) {
  for (const int64_t dim : {graph.in_channels, graph.in_height, graph.in_width}) {
    if (dim < 1 || dim > kMaxDim) {
      throw RuntimeError("runtime graph: input shape (" + std::to_string(graph.in_channels) + ", " +
                         std::to_string(graph.in_height) + ", " + std::to_string(graph.in_width) +
                         ") must have every dimension in [1, 2^20]");
    }
  }
  if (graph.ops.empty() || graph.ops[0].kind != OpKind::Input) {
    throw RuntimeError(std::string("runtime graph: ops[0] must be an Input op, found ") +
                       (graph.ops.empty() ? "no ops" : to_string(graph.ops[0].kind)));
  }
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const Op& op = graph.ops[i];
    if (op.kind == OpKind::Conv2d || op.kind == OpKind::MaxPool2d || op.kind == OpKind::AvgPool2d) check_window(op, i);
  }
  const std::vector<Shape> shapes = output_shapes(graph);  // inputs and shapes first: a wrong size is reported as such
  // Per op output: the codes it can hold and its zero point (nullopt until a weighted op has set one: the
  // Input's codes have the model's input zero point, which the graph does not store).
  std::vector<CodeRange> ranges(graph.ops.size());
  std::vector<int32_t> zero_points(graph.ops.size(), 0);
  std::vector<bool> has_zero_point(graph.ops.size(), false);
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const Op& op = graph.ops[i];
    const size_t first = op.inputs.empty() ? 0 : static_cast<size_t>(op.inputs[0]);
    const CodeRange range = ranges[first];
    const auto check_zero_point_chains = [&] {
      if (has_zero_point[first] && op.input_zero_point != zero_points[first]) {
        fail(op, i,
             "input_zero_point must equal the z_out " + std::to_string(zero_points[first]) +
                 " of the op that produced its input, found " + std::to_string(op.input_zero_point));
      }
    };
    // By default an op passes its input's codes and qparams on.
    ranges[i] = range;
    zero_points[i] = zero_points[first];
    has_zero_point[i] = has_zero_point[first];
    switch (op.kind) {
      case OpKind::Input:
        if (i != 0) fail(op, i, "only ops[0] may be an Input op");
        ranges[i].lo = *std::min_element(op.input_table.begin(), op.input_table.end());
        ranges[i].hi = *std::max_element(op.input_table.begin(), op.input_table.end());
        has_zero_point[i] = false;
        break;
      case OpKind::Conv2d:
      case OpKind::Linear:
        check_weighted(op, i, range);
        check_zero_point_chains();
        ranges[i] = {op.requant.act_min, op.requant.act_max};
        has_zero_point[i] = true;
        zero_points[i] = op.requant.zero_point;
        break;
      case OpKind::MaxPool2d:
      case OpKind::Flatten:
        break;
      case OpKind::AvgPool2d:
      case OpKind::GlobalAvgPool2d:
        check_range(op, i, "input_zero_point", op.input_zero_point, -128, 127);
        if (op.kind == OpKind::GlobalAvgPool2d) {  // Σ (q − z) over the image must fit int32: 255·H·W < 2^31
          const Shape& in = shapes[first];
          check_range(op, i, "its input's H·W", in.h * in.w, 1, int64_t{1} << 23);
        }
        check_zero_point_chains();
        ranges[i] = {std::min(range.lo, op.input_zero_point), std::max(range.hi, op.input_zero_point)};  // padding holds z
        has_zero_point[i] = true;
        zero_points[i] = op.input_zero_point;
        break;
      case OpKind::Clamp:
        check_range(op, i, "input_zero_point", op.input_zero_point, -128, 127);
        check_zero_point_chains();
        check_range(op, i, "requant.act_min", op.requant.act_min, -128, 127);
        check_range(op, i, "requant.act_max", op.requant.act_max, op.requant.act_min, 127);
        ranges[i] = {std::clamp(range.lo, op.requant.act_min, op.requant.act_max),
                     std::clamp(range.hi, op.requant.act_min, op.requant.act_max)};
        has_zero_point[i] = true;
        zero_points[i] = op.input_zero_point;
        break;
      case OpKind::Add:
      case OpKind::Concat: {
        std::vector<int32_t> producers;
        for (const int j : op.inputs) {
          // An input with no zero point yet is the Input op's codes: its z is the model's, checked by the loader.
          producers.push_back(has_zero_point[static_cast<size_t>(j)] ? zero_points[static_cast<size_t>(j)]
                                                                     : op.rescale.zero_points.size() > producers.size()
                                                                           ? op.rescale.zero_points[producers.size()]
                                                                           : 0);
        }
        check_rescale(op, i, producers);
        ranges[i] = {op.requant.act_min, op.requant.act_max};
        has_zero_point[i] = true;
        zero_points[i] = op.requant.zero_point;
        break;
      }
    }
    if (shapes[i].size() > kMaxImageSize) {
      fail(op, i, "output " + shape_string(shapes[i]) + " is larger than the runtime supports (2^30 codes per image)");
    }
  }
}

}  // namespace lowbit::quant::runtime
