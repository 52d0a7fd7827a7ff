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
  }
  return "unknown";
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
  return op.kind == OpKind::Conv2d ? op.in_channels * op.kernel * op.kernel : op.in_channels;
}

Shape output_shape(const Op& op, const Shape& input, size_t op_index) {
  switch (op.kind) {
    case OpKind::Input:
    case OpKind::Flatten:
      return op.kind == OpKind::Input ? input : Shape{input.size(), 1, 1};
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

std::vector<Shape> output_shapes(const Graph& graph) {
  std::vector<Shape> shapes;
  Shape shape{graph.in_channels, graph.in_height, graph.in_width};
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    shape = output_shape(graph.ops[i], shape, i);
    shapes.push_back(shape);
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
  Shape shape{graph.in_channels, graph.in_height, graph.in_width};
  CodeRange range;
  bool has_zero_point = false;  // false until a Conv2d / Linear has set the activation's z
  int32_t zero_point = 0;
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const Op& op = graph.ops[i];
    if (op.kind == OpKind::Conv2d || op.kind == OpKind::MaxPool2d || op.kind == OpKind::AvgPool2d) check_window(op, i);
    const Shape input = shape;
    shape = output_shape(op, input, i);  // shapes first: a wrong in_channels is reported as such
    const auto check_zero_point_chains = [&] {
      if (has_zero_point && op.input_zero_point != zero_point) {
        fail(op, i,
             "input_zero_point must equal the z_out " + std::to_string(zero_point) +
                 " of the op that produced its input, found " + std::to_string(op.input_zero_point));
      }
    };
    switch (op.kind) {
      case OpKind::Input:
        if (i != 0) fail(op, i, "only ops[0] may be an Input op");
        range.lo = *std::min_element(op.input_table.begin(), op.input_table.end());
        range.hi = *std::max_element(op.input_table.begin(), op.input_table.end());
        break;
      case OpKind::Conv2d:
      case OpKind::Linear:
        check_weighted(op, i, range);
        check_zero_point_chains();
        range = {op.requant.act_min, op.requant.act_max};
        has_zero_point = true;
        zero_point = op.requant.zero_point;
        break;
      case OpKind::MaxPool2d:
        break;
      case OpKind::AvgPool2d:
        check_range(op, i, "input_zero_point", op.input_zero_point, -128, 127);
        check_zero_point_chains();
        range = {std::min(range.lo, op.input_zero_point), std::max(range.hi, op.input_zero_point)};  // padding holds z
        break;
      case OpKind::Flatten:
        break;
    }
    if (shape.size() > kMaxImageSize) {
      fail(op, i, "output " + shape_string(shape) + " is larger than the runtime supports (2^30 codes per image)");
    }
  }
}

}  // namespace lowbit::quant::runtime
