// Exports an integer model as standalone C99: weights as const arrays, plain integer kernels, one arena.
#include "quant/export_c.h"

#include <unistd.h>

#include <cctype>
#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "quant/runtime/int4.h"

namespace lowbit::quant {

namespace {

namespace rt = runtime;
namespace fs = std::filesystem;

constexpr size_t kMaxPrefixLength = 64;
constexpr int kValuesPerLine = 16;  // array initialisers

// ---- the kernels, as C text -----------------------------------------------------------------------------
// Each is emitted only if the model uses it (an unused static function is a warning, and warnings are errors).
// They follow quant/runtime/kernels_ref.cpp and docs/int-graph-format.md section 6 line by line.

constexpr const char* kArithmeticC =
    R"(/* x / 2^n rounded to nearest, ties away from zero (2.5 -> 3, -2.5 -> -3); n in [1, 62], |x| <= 2^62.
   Both shifted values are >= 0, so the shifts are well defined in C. */
static int64_t rounding_right_shift_half_away(int64_t x, int n) {
  const int64_t half = (int64_t)1 << (n - 1);
  return x >= 0 ? (x + half) >> n : -((-x + half) >> n);
}

/* One int32 accumulator to an output code, with a single rounding in 64 bits (eq. 6):
     out = clamp(z_out + round(acc * m / 2^n), act_min, act_max)
   |acc * m| < 2^31 * 2^31 = 2^62, so the product is exact in int64. */
static int8_t requantize(int32_t acc, int32_t multiplier, int shift, int32_t zero_point, int32_t act_min,
                         int32_t act_max) {
  int64_t out = zero_point + rounding_right_shift_half_away((int64_t)acc * multiplier, shift);
  if (out < act_min) out = act_min;
  if (out > act_max) out = act_max;
  return (int8_t)out;
}

/* Code k of output row o of a weight matrix with rows of row_length codes.
   8 bits: one int8 code per element, row-major.
   4 bits: two's-complement nibbles packed row by row, each row starting on a byte boundary and taking
   (row_length + 1) / 2 bytes; code k is in byte k / 2, in the low nibble if k is even, the high one if odd. */
static int32_t weight_code(const void *weight, int weight_bits, int32_t row_length, int32_t o, int32_t k) {
  if (weight_bits == 8) {
    return ((const int8_t *)weight)[o * row_length + k];
  } else {
    const uint8_t *row = (const uint8_t *)weight + o * ((row_length + 1) / 2);
    const int32_t nibble = k % 2 == 0 ? (row[k / 2] & 0x0F) : (row[k / 2] >> 4);
    return nibble >= 8 ? nibble - 16 : nibble; /* sign-extend: 0x8..0xF -> -8..-1 */
  }
}

/* Input: pixel p (uint8) -> code table[p]; lowbit folded the normalisation (pixel / 255 - mean) / std into the table. */
static void input_lookup(const uint8_t *image, int32_t size, const int8_t *table, int8_t *y) {
  for (int32_t i = 0; i < size; ++i) y[i] = table[image[i]];
}
)";

constexpr const char* kLinearC = R"(
/* Linear: x is (IN) codes with zero point z_in, w is (OUT, IN), b is (OUT); y is (OUT) codes (eq. 5, eq. 6):
     acc[o] = b[o] + sum_k w[o, k] * (x[k] - z_in),   y[o] = requantize(acc[o]) */
static void linear(const int8_t *x, int32_t in, int32_t z_in, const void *weight, int weight_bits, const int32_t *bias,
                   const int32_t *multiplier, const uint8_t *shift, int32_t out, int32_t z_out, int32_t act_min,
                   int32_t act_max, int8_t *y) {
  for (int32_t o = 0; o < out; ++o) {
    int32_t acc = bias[o];
    for (int32_t k = 0; k < in; ++k) acc += weight_code(weight, weight_bits, in, o, k) * (x[k] - z_in);
    y[o] = requantize(acc, multiplier[o], shift[o], z_out, act_min, act_max);
  }
}
)";

constexpr const char* kConv2dC = R"(
/* The parameters of one Conv2d: x is (C, H, W) codes with zero point z_in, w is (OUT, C, K, K), b is (OUT);
   y is (OUT, HO, WO) with HO = (H + 2 * padding - K) / stride + 1 (WO alike), requantized to z_out and
   clamped to [act_min, act_max]. */
struct conv2d_params {
  int32_t c, height, width, z_in;
  const void *weight;
  int weight_bits;
  const int32_t *bias, *multiplier;
  const uint8_t *shift;
  int32_t out, k, stride, padding, z_out, act_min, act_max;
};

/* One output code of a Conv2d, y[o, oh, ow] (eq. 5, eq. 6):
     acc = b[o] + sum_{ci, kh, kw} w[o, ci, kh, kw] * (x[ci, oh * stride - padding + kh,
                                                         ow * stride - padding + kw] - z_in)
   A position outside the input (padding) holds the code z_in and adds 0, so it is skipped. */
static int8_t conv2d_at(const int8_t *x, const struct conv2d_params *p, int32_t o, int32_t oh, int32_t ow) {
  const int32_t row_length = p->c * p->k * p->k;
  int32_t acc = p->bias[o];
  for (int32_t ci = 0; ci < p->c; ++ci) {
    for (int32_t kh = 0; kh < p->k; ++kh) {
      const int32_t ih = oh * p->stride - p->padding + kh;
      if (ih < 0 || ih >= p->height) continue;
      for (int32_t kw = 0; kw < p->k; ++kw) {
        const int32_t iw = ow * p->stride - p->padding + kw;
        if (iw < 0 || iw >= p->width) continue;
        acc += weight_code(p->weight, p->weight_bits, row_length, o, (ci * p->k + kh) * p->k + kw) *
               (x[(ci * p->height + ih) * p->width + iw] - p->z_in);
      }
    }
  }
  return requantize(acc, p->multiplier[o], p->shift[o], p->z_out, p->act_min, p->act_max);
}
)";

constexpr const char* kConv2dStoredC = R"(
/* Conv2d: every output code, stored as y (OUT, HO, WO). */
static void conv2d(const int8_t *x, const struct conv2d_params *p, int8_t *y) {
  const int32_t ho = (p->height + 2 * p->padding - p->k) / p->stride + 1;
  const int32_t wo = (p->width + 2 * p->padding - p->k) / p->stride + 1;
  for (int32_t o = 0; o < p->out; ++o) {
    for (int32_t oh = 0; oh < ho; ++oh) {
      for (int32_t ow = 0; ow < wo; ++ow) y[(o * ho + oh) * wo + ow] = conv2d_at(x, p, o, oh, ow);
    }
  }
}
)";

constexpr const char* kConv2dMaxPool2dC = R"(
/* Conv2d fused with the MaxPool2d after it (window P x P, stride P, no padding): y is (OUT, HO / P, WO / P),
   each code the largest of the P x P conv output codes in its window. Those are computed on the fly, each
   once, so the conv's (OUT, HO, WO) map is never stored; the codes are those of conv2d then max_pool2d. */
static void conv2d_max_pool2d(const int8_t *x, const struct conv2d_params *p, int32_t pool, int8_t *y) {
  const int32_t ho = (p->height + 2 * p->padding - p->k) / p->stride + 1;
  const int32_t wo = (p->width + 2 * p->padding - p->k) / p->stride + 1;
  const int32_t pooled_h = ho / pool, pooled_w = wo / pool;
  for (int32_t o = 0; o < p->out; ++o) {
    for (int32_t ph = 0; ph < pooled_h; ++ph) {
      for (int32_t pw = 0; pw < pooled_w; ++pw) {
        int8_t best = -128;
        for (int32_t dh = 0; dh < pool; ++dh) {
          for (int32_t dw = 0; dw < pool; ++dw) {
            const int8_t code = conv2d_at(x, p, o, ph * pool + dh, pw * pool + dw);
            if (code > best) best = code;
          }
        }
        y[(o * pooled_h + ph) * pooled_w + pw] = best;
      }
    }
  }
}
)";

constexpr const char* kMaxPool2dC = R"(
/* MaxPool2d: x is (C, H, W), y is (C, HO, WO): the largest code among the window positions inside the input
   (padding positions are ignored; padding <= K / 2 leaves every window at least one). */
static void max_pool2d(const int8_t *x, int32_t c, int32_t height, int32_t width, int32_t k, int32_t stride,
                       int32_t padding, int8_t *y) {
  const int32_t ho = (height + 2 * padding - k) / stride + 1, wo = (width + 2 * padding - k) / stride + 1;
  for (int32_t ci = 0; ci < c; ++ci) {
    for (int32_t oh = 0; oh < ho; ++oh) {
      for (int32_t ow = 0; ow < wo; ++ow) {
        int8_t best = -128;
        for (int32_t kh = 0; kh < k; ++kh) {
          const int32_t ih = oh * stride - padding + kh;
          if (ih < 0 || ih >= height) continue;
          for (int32_t kw = 0; kw < k; ++kw) {
            const int32_t iw = ow * stride - padding + kw;
            if (iw < 0 || iw >= width) continue;
            if (x[(ci * height + ih) * width + iw] > best) best = x[(ci * height + ih) * width + iw];
          }
        }
        y[(ci * ho + oh) * wo + ow] = best;
      }
    }
  }
}
)";

constexpr const char* kAvgPool2dC = R"(
/* AvgPool2d: x is (C, H, W) with zero point z, y is (C, HO, WO) with the same zero point:
     y = clamp(z + round(sum_window (x - z) / (K * K)), -128, 127)
   The sum runs over the positions inside the input (padding holds z and adds 0) but the divisor is always
   K * K; the division rounds half away from zero. |2 * sum| <= 2 * 64 * 64 * 255 fits an int32. */
static void avg_pool2d(const int8_t *x, int32_t c, int32_t height, int32_t width, int32_t k, int32_t stride,
                       int32_t padding, int32_t z, int8_t *y) {
  const int32_t ho = (height + 2 * padding - k) / stride + 1, wo = (width + 2 * padding - k) / stride + 1;
  const int32_t count = k * k;
  for (int32_t ci = 0; ci < c; ++ci) {
    for (int32_t oh = 0; oh < ho; ++oh) {
      for (int32_t ow = 0; ow < wo; ++ow) {
        int32_t sum = 0, twice, code;
        for (int32_t kh = 0; kh < k; ++kh) {
          const int32_t ih = oh * stride - padding + kh;
          if (ih < 0 || ih >= height) continue;
          for (int32_t kw = 0; kw < k; ++kw) {
            const int32_t iw = ow * stride - padding + kw;
            if (iw < 0 || iw >= width) continue;
            sum += x[(ci * height + ih) * width + iw] - z;
          }
        }
        twice = 2 * sum;
        code = z + (twice >= 0 ? (twice + count) / (2 * count) : -((-twice + count) / (2 * count)));
        if (code < -128) code = -128;
        if (code > 127) code = 127;
        y[(ci * ho + oh) * wo + ow] = (int8_t)code;
      }
    }
  }
}
)";

// ---- helpers ---------------------------------------------------------------------------------------------

// Text safe inside a C comment: no "*/", no trigraph "??", nothing unprintable.
std::string comment_safe(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    const auto u = static_cast<unsigned char>(ch);
    out += std::isalnum(u) || std::string_view(" _.,:()[]-+#=<>").find(ch) != std::string_view::npos ? ch : '_';
  }
  return out;
}

bool is_c_identifier(const std::string& s) {
  if (s.empty() || s.size() > kMaxPrefixLength || std::isdigit(static_cast<unsigned char>(s[0]))) return false;
  for (const char ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_') return false;
  return true;
}

std::string upper(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

std::string shape_text(const rt::Shape& s) { return fmt::format("({}, {}, {})", s.c, s.h, s.w); }

// `static const TYPE name[count] = {…};` with kValuesPerLine values a line, each printed by `format_value`.
template <typename T, typename F>
std::string c_array(const std::string& type, const std::string& name, const std::vector<T>& values, F format_value) {
  std::string s = fmt::format("static const {} {}[{}] = {{", type, name, values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    s += i % kValuesPerLine == 0 ? "\n  " : " ";
    s += format_value(values[i]);
    if (i + 1 < values.size()) s += ",";
  }
  return s + "\n};\n";
}

std::string decimal(int64_t v) { return std::to_string(v); }

// The op's weights, biases, multipliers and shifts as const arrays; returns their bytes.
int64_t emit_weighted_constants(const rt::Op& op, size_t index, const rt::Shape& in, std::string& c) {
  const std::string what =
      op.kind == rt::OpKind::Conv2d
          ? fmt::format("(OUT {}, C {}, K {}, K {})", op.out_channels, op.in_channels, op.kernel, op.kernel)
          : fmt::format("(OUT {}, IN {})", op.out_channels, op.in_channels);
  (void)in;
  const std::string name = fmt::format("op{}", index);
  c += fmt::format("\n/* op {} \"{}\": {} weights {}, {}-bit codes", index, comment_safe(op.name),
                   rt::to_string(op.kind), what, op.weight_bits);
  if (op.weight_bits == 8) {
    c += ", row-major. */\n";
    c += c_array("int8_t", name + "_weight", op.weight, [](int8_t v) { return decimal(v); });
  } else {
    const int64_t row_bytes =
        static_cast<int64_t>(rt::int4_packed_size(static_cast<size_t>(rt::weight_row_length(op))));
    c += fmt::format(",\n   packed two per byte (low nibble first), {} bytes a row. */\n", row_bytes);
    c += c_array("uint8_t", name + "_weight", op.weight,
                 [](int8_t v) { return fmt::format("0x{:02x}", static_cast<uint8_t>(v)); });
  }
  c += c_array("int32_t", name + "_bias", op.bias, [](int32_t v) { return decimal(v); });
  c += fmt::format("/* requantization: M[o] = multiplier[o] / 2^shift[o] = s_in * s_w[o] / s_out */\n");
  c += c_array("int32_t", name + "_multiplier", op.requant.multiplier, [](int32_t v) { return decimal(v); });
  c += c_array("uint8_t", name + "_shift", op.requant.shift, [](int32_t v) { return decimal(v); });
  return static_cast<int64_t>(op.weight.size() + 4 * op.bias.size() + 4 * op.requant.multiplier.size() +
                              op.requant.shift.size());
}

// A float32 scale as NUMERATOR · 2^(−SHIFT) exactly (NUMERATOR odd or SHIFT = 0).
std::pair<int64_t, int> exact_rational(float scale) {
  int e = 0;
  const double f = std::frexp(static_cast<double>(scale), &e);  // scale = f · 2^e, f in [0.5, 1)
  auto numerator = static_cast<int64_t>(std::ldexp(f, 24));     // 24 significant bits: exact
  int shift = 24 - e;
  while (numerator % 2 == 0 && numerator != 0 && shift > 0) {
    numerator /= 2;
    --shift;
  }
  return {numerator, shift};
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("{}: cannot create the file (check that the folder is writable)", path);
  out << text;
  out.flush();
  if (!out) fail("{}: cannot write the file (disk full?)", path);
}

}  // namespace

std::string c_prefix_from_model_name(const std::string& model_name) {
  std::string s;
  for (const char ch : model_name) s += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
  if (s.empty() || std::isdigit(static_cast<unsigned char>(s[0]))) s = "m" + s;
  return s.substr(0, kMaxPrefixLength);
}

CExport export_c(const IntModel& model, const std::string& prefix) {
  if (!is_c_identifier(prefix))
    fail(
        "prefix '{}' is not a C identifier of at most {} characters (use letters, digits and '_', not starting "
        "with a digit)",
        comment_safe(prefix), kMaxPrefixLength);
  const rt::Graph& graph = model.graph;
  rt::validate(graph);
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const rt::OpKind kind = graph.ops[i].kind;
    if (kind != rt::OpKind::Input && kind != rt::OpKind::Conv2d && kind != rt::OpKind::Linear &&
        kind != rt::OpKind::MaxPool2d && kind != rt::OpKind::AvgPool2d && kind != rt::OpKind::Flatten)
      fail(
          "op {} '{}': a {} cannot be exported to C yet (supported: input, conv2d, linear, max_pool2d, avg_pool2d, "
          "flatten)",
          i, graph.ops[i].name, rt::to_string(kind));
    if (i > 0 && graph.ops[i].inputs != std::vector<int>{static_cast<int>(i) - 1})
      fail("op {} '{}' does not read the op before it: graphs with branches cannot be exported to C yet (only chains)",
           i, graph.ops[i].name);
    if (kind == rt::OpKind::Conv2d && graph.ops[i].groups != 1)
      fail("op {} '{}': a grouped convolution cannot be exported to C yet", i, graph.ops[i].name);
  }
  const std::vector<rt::Shape> shapes = rt::output_shapes(graph);
  const rt::Shape input{graph.in_channels, graph.in_height, graph.in_width};
  // The generated code indexes with int32_t: every tensor must fit.
  auto check_fits = [&](int64_t count, size_t i, const char* what) {
    if (count > INT32_MAX)
      fail("op {} '{}': its {} has {} elements, too many for the 32-bit indices of the exported C", i,
           graph.ops[i].name, what, count);
  };
  check_fits(input.size(), 0, "input");
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    check_fits(shapes[i].size(), i, "output");
    if (graph.ops[i].kind == rt::OpKind::Conv2d || graph.ops[i].kind == rt::OpKind::Linear)
      check_fits(graph.ops[i].out_channels * rt::weight_row_length(graph.ops[i]), i, "weight");
  }

  CExport result;
  result.prefix = prefix;
  result.plan = rt::plan_chain_arena(graph, /*fuse_conv_max_pool=*/true);
  const rt::ArenaPlan& plan = result.plan;
  if (plan.arena_bytes > INT32_MAX) fail("the arena of {} bytes is too large for the exported C", plan.arena_bytes);
  const std::string P = upper(prefix);
  const rt::Op& last = graph.ops.back();
  const int64_t classes = shapes.back().size();

  bool uses[6] = {};
  for (const rt::Op& op : graph.ops) uses[static_cast<int>(op.kind)] = true;

  // ---- <prefix>.c
  std::string& c = result.source;
  c += fmt::format("/* {}.c: the lowbit integer model \"{}\" (mode {}), exported by `export --format c`.\n", prefix,
                   comment_safe(model.model_name), comment_safe(model.mode));
  c += R"(
   Plain C99, integer arithmetic only. It computes exactly what lowbit's integer runtime computes, bit for bit:
   the kernels below follow quant/runtime/kernels_ref.cpp and docs/int-graph-format.md section 6, and the
   equation numbers (eq. 5, eq. 6) are those of docs/quantization.md. Activations are int8 codes in (C, H, W)
   order; an op's real values are r = s * (q - z).

   Memory plan (one arena, offsets in bytes; an op reads only the previous op's output, so outputs alternate
   between the two ends of the arena and an op's input and output never overlap):
)";
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const std::string where =
        plan.offsets[i] < 0 ? fmt::format("not stored: computed inside op {}", i + 1)
                            : fmt::format("arena [{}, {}){}", plan.offsets[i], plan.offsets[i] + plan.bytes[i],
                                          graph.ops[i].kind == rt::OpKind::Flatten ? " (its input's buffer)" : "");
    c += fmt::format("     op {:>3} {:<12} {:<24} output {:<18} {}\n", i, rt::to_string(graph.ops[i].kind),
                     fmt::format("\"{}\"", comment_safe(graph.ops[i].name)), shape_text(shapes[i]), where);
  }
  c += fmt::format("   arena: {} bytes = the lower bound (the largest input + output of one op). */\n",
                   plan.arena_bytes);
  c += fmt::format("#include \"{}.h\"\n", prefix);
  c += fmt::format(R"(
/* Called after each op with the arena and the one live buffer (the op's output): a test can poison every
   other byte to prove that no op reads memory the plan does not give it. Empty unless defined. */
#ifndef {0}_AFTER_OP
#define {0}_AFTER_OP(op, arena, live_offset, live_bytes) ((void)0)
#endif
)",
                   P);

  c += "\n/* ---- constants (const: they stay in flash on a microcontroller) ---- */\n\n";
  c += fmt::format("/* op 0 \"{}\": the input table, pixel p (0..255) -> code (zero point {}) */\n",
                   comment_safe(graph.ops[0].name), model.input_zero_point);
  const std::vector<int8_t> table(graph.ops[0].input_table.begin(), graph.ops[0].input_table.end());
  c += c_array("int8_t", "input_table", table, [](int8_t v) { return decimal(v); });
  result.weight_bytes = 256;
  for (size_t i = 1; i < graph.ops.size(); ++i) {
    const rt::Op& op = graph.ops[i];
    if (op.kind == rt::OpKind::Conv2d || op.kind == rt::OpKind::Linear)
      result.weight_bytes += emit_weighted_constants(op, i, shapes[i - 1], c);
  }

  c += "\n/* ---- kernels: plain loops, one output at a time ---- */\n\n";
  c += kArithmeticC;
  bool stored_conv = false, fused_conv = false;
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    if (graph.ops[i].kind != rt::OpKind::Conv2d) continue;
    (plan.offsets[i] < 0 ? fused_conv : stored_conv) = true;
  }
  if (uses[static_cast<int>(rt::OpKind::Conv2d)]) c += kConv2dC;
  if (stored_conv) c += kConv2dStoredC;
  if (fused_conv) c += kConv2dMaxPool2dC;
  bool stored_pool_input = false;  // a MaxPool2d that reads a stored input (not fused with its Conv2d)
  for (size_t i = 1; i < graph.ops.size(); ++i)
    stored_pool_input |= graph.ops[i].kind == rt::OpKind::MaxPool2d && plan.offsets[i - 1] >= 0;
  if (stored_pool_input) c += kMaxPool2dC;
  if (uses[static_cast<int>(rt::OpKind::AvgPool2d)]) c += kAvgPool2dC;
  c += kLinearC;

  c += "\n/* ---- the model, op by op ---- */\n\n";
  // The parameters of the Conv2d ops[i] with input shape `in`, as a C99 struct with designated initialisers.
  auto conv_params = [&](size_t i, const rt::Shape& in) {
    const rt::Op& op = graph.ops[i];
    const auto& rq = op.requant;
    return fmt::format(
        "    static const struct conv2d_params p = {{.c = {}, .height = {}, .width = {}, .z_in = {},\n"
        "        .weight = op{}_weight, .weight_bits = {}, .bias = op{}_bias, .multiplier = op{}_multiplier,\n"
        "        .shift = op{}_shift, .out = {}, .k = {}, .stride = {}, .padding = {},\n"
        "        .z_out = {}, .act_min = {}, .act_max = {}}};\n",
        in.c, in.h, in.w, op.input_zero_point, i, op.weight_bits, i, i, i, op.out_channels, op.kernel, op.stride,
        op.padding, rq.zero_point, rq.act_min, rq.act_max);
  };
  c += fmt::format("int {}_run(const uint8_t *image, int8_t *logits, void *arena) {{\n", prefix);
  c += "  int8_t *const a = (int8_t *)arena;\n  int32_t best = 0;\n";
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const rt::Op& op = graph.ops[i];
    const rt::Shape in = i == 0 ? input : shapes[i - 1];
    const rt::Shape& out = shapes[i];
    const int64_t x = plan.input_offsets[i], y = plan.offsets[i];
    const std::string name = comment_safe(op.name);
    const auto& rq = op.requant;
    switch (op.kind) {
      case rt::OpKind::Input:
        c += fmt::format("\n  /* op {} \"{}\": input, image {} uint8 pixels -> codes {} */\n", i, name, shape_text(in),
                         shape_text(out));
        c += fmt::format("  input_lookup(image, {}, input_table, a + {});\n", out.size(), y);
        break;
      case rt::OpKind::Conv2d:
        c += fmt::format(
            "\n  /* op {} \"{}\": conv2d {}-bit, x {} -> y {}, K {}, stride {}, padding {}, z_in {}, z_out {}, "
            "clamp [{}, {}]{} */\n",
            i, name, op.weight_bits, shape_text(in), shape_text(out), op.kernel, op.stride, op.padding,
            op.input_zero_point, rq.zero_point, rq.act_min, rq.act_max,
            rq.act_min == rq.zero_point ? " (ReLU fused: act_min = z_out)" : "");
        if (y < 0) {
          c += fmt::format("  /* fused with the max_pool2d after it: see op {} */\n", i + 1);
          continue;  // nothing stored, nothing to check
        }
        c += fmt::format("  {{\n{}    conv2d(a + {}, &p, a + {});\n  }}\n", conv_params(i, in), x, y);
        break;
      case rt::OpKind::Linear:
        c += fmt::format(
            "\n  /* op {} \"{}\": linear {}-bit, x ({}) -> y ({}), z_in {}, z_out {}, clamp [{}, {}]{} */\n", i, name,
            op.weight_bits, in.size(), out.size(), op.input_zero_point, rq.zero_point, rq.act_min, rq.act_max,
            rq.act_min == rq.zero_point ? " (ReLU fused: act_min = z_out)" : "");
        c += fmt::format(
            "  linear(a + {}, {}, {}, op{}_weight, {}, op{}_bias, op{}_multiplier, op{}_shift, {}, {}, {}, {}, a + "
            "{});\n",
            x, in.size(), op.input_zero_point, i, op.weight_bits, i, i, i, op.out_channels, rq.zero_point, rq.act_min,
            rq.act_max, y);
        break;
      case rt::OpKind::MaxPool2d:
        c += fmt::format("\n  /* op {} \"{}\": max_pool2d, x {} -> y {}, K {}, stride {}, padding {}{}", i, name,
                         shape_text(in), shape_text(out), op.kernel, op.stride, op.padding,
                         plan.offsets[i - 1] < 0 ? ",\n" : " */\n");
        if (plan.offsets[i - 1] < 0) {  // the Conv2d before it is computed here
          c += fmt::format(
              "     together with op {}: its conv outputs are computed window by window, never stored */\n", i - 1);
          c += fmt::format("  {{\n{}    conv2d_max_pool2d(a + {}, &p, {}, a + {});\n  }}\n",
                           conv_params(i - 1, shapes[i - 2]), x, op.kernel, y);
          break;
        }
        c += fmt::format("  max_pool2d(a + {}, {}, {}, {}, {}, {}, {}, a + {});\n", x, in.c, in.h, in.w, op.kernel,
                         op.stride, op.padding, y);
        break;
      case rt::OpKind::AvgPool2d:
        c += fmt::format("\n  /* op {} \"{}\": avg_pool2d, x {} -> y {}, K {}, stride {}, padding {}, z {} */\n", i,
                         name, shape_text(in), shape_text(out), op.kernel, op.stride, op.padding, op.input_zero_point);
        c += fmt::format("  avg_pool2d(a + {}, {}, {}, {}, {}, {}, {}, {}, a + {});\n", x, in.c, in.h, in.w, op.kernel,
                         op.stride, op.padding, op.input_zero_point, y);
        break;
      case rt::OpKind::Flatten:
        c += fmt::format(
            "\n  /* op {} \"{}\": flatten, {} -> ({}): (c, h, w) goes to index (c * H + h) * W + w, which is\n"
            "     where it already is: nothing to do (the codes stay at a + {}). */\n",
            i, name, shape_text(in), out.size(), y);
        break;
      default:  // refused above
        fail("op {} '{}': a {} cannot be exported to C yet", i, name, rt::to_string(op.kind));
    }
    c += fmt::format("  {}_AFTER_OP({}, a, {}, {});\n", P, i, y, plan.bytes[i]);
  }
  c += fmt::format(
      "\n  /* the logits: copied out of the arena; the class is the first maximum (the lowest index on ties) */\n"
      "  for (int32_t i = 0; i < {}; ++i) {{\n"
      "    logits[i] = a[{} + i];\n"
      "    if (logits[i] > logits[best]) best = i;\n"
      "  }}\n"
      "  return (int)best;\n}}\n",
      classes, plan.offsets.back());

  // ---- <prefix>.h
  const auto [numerator, shift] = exact_rational(model.output_scale);
  std::string& h = result.header;
  h += fmt::format(
      "/* {}.h: the lowbit integer model \"{}\" (mode {}) as standalone C99, exported by `export --format "
      "c`. */\n",
      prefix, comment_safe(model.model_name), comment_safe(model.mode));
  h += fmt::format(R"(#ifndef {0}_H
#define {0}_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

/* The image: {0}_INPUT_CHANNELS x {0}_INPUT_HEIGHT x {0}_INPUT_WIDTH uint8 pixels in (C, H, W) order. */
#define {0}_INPUT_CHANNELS {1}
#define {0}_INPUT_HEIGHT {2}
#define {0}_INPUT_WIDTH {3}
#define {0}_INPUT_BYTES {4}

/* The logits: {0}_NUM_CLASSES int8 codes. */
#define {0}_NUM_CLASSES {5}

/* Real logit = output_scale * (code - {0}_OUTPUT_ZERO_POINT), with output_scale = {6} (a float32) exactly
   {0}_OUTPUT_SCALE_NUMERATOR / 2^{0}_OUTPUT_SCALE_SHIFT. The argmax needs no scale: codes are ordered like
   the real logits. */
#define {0}_OUTPUT_ZERO_POINT {7}
#define {0}_OUTPUT_SCALE_NUMERATOR {8}
#define {0}_OUTPUT_SCALE_SHIFT {9}

/* The working memory {0}_run needs: one arena of {0}_ARENA_BYTES bytes (any alignment), planned statically.
   {0}_ARENA_LOWER_BOUND is the largest set of bytes that must be live at once (an op's input and output);
   the plan reaches it. */
#define {0}_ARENA_BYTES {10}
#define {0}_ARENA_LOWER_BOUND {11}

/* Runs the model on one image.
     image   {0}_INPUT_BYTES uint8 pixels, (C, H, W) order (read only)
     logits  receives {0}_NUM_CLASSES int8 codes
     arena   {0}_ARENA_BYTES bytes of scratch memory, not overlapping image or logits; its contents on entry
             do not matter and are overwritten
   Returns the class: the index of the largest logit (the lowest index on ties).
   Integer arithmetic only, no allocation, no global state: safe to call from several threads with one arena
   each. */
int {12}_run(const uint8_t *image, int8_t *logits, void *arena);

#ifdef __cplusplus
}}
#endif

#endif /* {0}_H */
)",
                   P, input.c, input.h, input.w, input.size(), classes, fmt::format("{}", model.output_scale),
                   last.requant.zero_point, numerator, shift, plan.arena_bytes, plan.lower_bound, prefix);
  return result;
}

void write_c_export(const CExport& files, const std::string& out_dir) {
  std::error_code ec;
  if (!fs::is_directory(out_dir, ec))
    fail("{}: the output folder does not exist (create it first, e.g. mkdir -p {})", out_dir, out_dir);
  const std::string base = (fs::path(out_dir) / files.prefix).string();
  const std::string tag = ".tmp-" + std::to_string(::getpid());
  const std::string paths[2] = {base + ".h", base + ".c"};
  const std::string* texts[2] = {&files.header, &files.source};
  try {
    for (int i = 0; i < 2; ++i) write_text(paths[i] + tag, *texts[i]);
    for (int i = 0; i < 2; ++i) {
      fs::rename(paths[i] + tag, paths[i], ec);
      if (ec) fail("{}: cannot rename {} to it: {}", paths[i], paths[i] + tag, ec.message());
    }
  } catch (...) {
    for (const std::string& p : paths) fs::remove(p + tag, ec);
    throw;
  }
}

}  // namespace lowbit::quant
