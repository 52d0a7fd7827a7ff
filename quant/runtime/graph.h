// The integer inference graph: ops, their quantization parameters, output shapes and validation.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace lowbit::quant::runtime {

// Thrown by validate() and the Executor for a graph that cannot run. The message is one line:
// which op, what was expected, what was found.
struct RuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class OpKind { Input, Conv2d, Linear, MaxPool2d, AvgPool2d, Flatten, Add, Concat, GlobalAvgPool2d, Clamp };

// Requantization of one op's int32 accumulators to int8 codes (docs/quantization.md eq. 6).
struct Requant {                          // per output channel
  std::vector<int32_t> multiplier;        // m[c] in [2^30, 2^31)
  std::vector<int32_t> shift;             // n[c] in [1, 62]
  int32_t zero_point = 0;                 // z_out
  int32_t act_min = -128, act_max = 127;  // clamp (a fused ReLU tightens act_min to max(qmin, z_out))
};

// Add and Concat bring every input to the output's scale (docs/quantization.md eq. 10):
//   Add:    out = clamp(z_out + round(Σ_i m[i]·(q_i − z_i) · 2^(−n)), act_min, act_max)   one rounding
//   Concat: out = clamp(z_out + round(m[i]·(q_i − z_i) · 2^(−n)), act_min, act_max)     for input i's channels
// with m[i]·2^(−n) ≈ M[i] = s_i/s_out: the largest m[i] in [2^30, 2^31), n in [1, 62], the others in
// [0, 2^31) with the same n (rescale_from_scales).
struct Rescale {
  std::vector<int32_t> zero_points;  // z_i, one per input
  std::vector<int32_t> multipliers;  // m[i], one per input
  int32_t shift = 1;                 // n, shared
};

// One op. Activations are int8 codes laid out (N, C, H, W); a Linear's input is (N, IN, 1, 1).
struct Op {
  OpKind kind = OpKind::Input;
  std::string name;  // e.g. "features.0" (for reports and error messages)
  // The ops whose outputs this one reads, by index; each is earlier in Graph::ops (a topological order).
  // Input has none, Add two, Concat two or more, every other op one.
  std::vector<int> inputs;

  // Input: pixel p (uint8) → code input_table[p] (the normalisation is folded in by convert).
  std::array<int8_t, 256> input_table{};

  // Conv2d / Linear
  int weight_bits = 8;                          // 8 or 4
  int64_t in_channels = 0, out_channels = 0;    // Linear: in_features, out_features
  int64_t kernel = 1, stride = 1, padding = 0;  // Conv2d, MaxPool2d, AvgPool2d (square)
  int64_t groups = 1;                           // Conv2d: G independent convolutions of C/G channels each
  // w is (OUT, C/G, K, K) for Conv2d (output channels o·OUT/G … of group g read input channels g·C/G …),
  // (OUT, IN) for Linear, row-major, symmetric per output channel.
  //   8 bits: one int8 code in [−127, 127] per element.
  //   4 bits: codes in [−8, 7] packed two per byte (int4.h), ONE ROW PER OUTPUT CHANNEL: each row
  //           of IN (or C·K·K) codes starts on a byte boundary and takes (IN + 1) / 2 bytes.
  std::vector<int8_t> weight;
  std::vector<int32_t> bias;     // (OUT), scale s_in·s_w[c], zero point 0
  // z_in. Ops that keep their input's qparams (MaxPool2d, AvgPool2d, GlobalAvgPool2d, Flatten, Clamp) have
  // requant.zero_point == input_zero_point; Clamp also uses requant.act_min / act_max.
  int32_t input_zero_point = 0;
  Requant requant;  // Conv2d / Linear: per output channel; Add / Concat: zero_point and the clamp only
  Rescale rescale;  // Add / Concat
};

struct Graph {
  int64_t in_channels = 1, in_height = 28, in_width = 28;
  std::vector<Op> ops;  // ops[0] is Input; executed in order (inputs come first); the last op's output is the logits
};

// Sets every op's inputs to {i − 1} (a chain; an Input op reads nothing), for graphs built op by op.
void chain_inputs(Graph& graph);

// The ops that read each op's output: readers[i] lists them in order (the last is where its buffer dies).
std::vector<std::vector<int>> readers(const Graph& graph);

// Shape of one image's activation (C, H, W); a flat vector is (C, 1, 1).
struct Shape {
  int64_t c = 0, h = 1, w = 1;
  int64_t size() const { return c * h * w; }
  bool operator==(const Shape&) const = default;
};

const char* to_string(OpKind kind);

// Output size of a sliding window: (size + 2·padding − kernel) / stride + 1 (may be <= 0 if it does not fit).
int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding);

// The input positions [first, last) that a pooling window at output position `o` covers along one axis
// of `size` positions, clipped to the image (padding positions are not inside it).
struct WindowRange {
  int64_t first, last;
};
WindowRange window_range(int64_t o, int64_t kernel, int64_t stride, int64_t padding, int64_t size);

// The number of codes in one output row of a Conv2d / Linear weight: IN, or C/G·K·K.
int64_t weight_row_length(const Op& op);

// The output shape of op given its inputs' shapes. Throws RuntimeError if they do not fit.
Shape output_shape(const Op& op, const std::vector<Shape>& inputs, size_t op_index = 0);
// The same for an op with one input.
Shape output_shape(const Op& op, const Shape& input, size_t op_index = 0);

// The output shape of every op (index i ↔ ops[i]); throws like validate() on shapes that do not chain.
std::vector<Shape> output_shapes(const Graph& graph);

// Checks that: ops[0] is the only Input; every op reads earlier ops only, as many as its kind takes; the
// shapes fit; every parameter is in range
// (weights in [−127, 127] or packed int4 with zero padding nibbles, bias and requant sizes,
// multipliers in [2^30, 2^31), shifts in [1, 62], zero points inside [act_min, act_max] ⊆ [−128, 127]);
// each op's z_in (an Add's or Concat's z_i) equals the z_out of the op that produced that input; Add and
// Concat rescale multipliers in range (the largest in [2^30, 2^31)); and no int32 accumulator can overflow:
// |bias[c]| + Σ_k |w[c,k]|·max|x − z_in| < 2^31 over the input's code range. Throws RuntimeError.
void validate(const Graph& graph);

}  // namespace lowbit::quant::runtime
