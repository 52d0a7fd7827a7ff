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
/* The parameters of one Conv2d: x is (C, H, W) codes with zero point z_in, w is (OUT, C / G, K, K), b is (OUT);
   y is (OUT, HO, WO) with HO = (H + 2 * padding - K) / stride + 1 (WO alike), requantized to z_out and
   clamped to [act_min, act_max]. G = groups: output channel o belongs to group g = o / (OUT / G) and reads
   only the C / G input channels of that group (G = 1: every channel; G = C = OUT: depthwise, one each). */
struct conv2d_params {
  int32_t c, height, width, z_in;
  const void *weight;
  int weight_bits;
  const int32_t *bias, *multiplier;
  const uint8_t *shift;
  int32_t out, k, stride, padding, groups, z_out, act_min, act_max;
};

/* One output code of a Conv2d, y[o, oh, ow] (eq. 5, eq. 6), with C' = C / G channels a group and
   first = g * C' the group's first input channel:
     acc = b[o] + sum_{ci < C', kh, kw} w[o, ci, kh, kw] * (x[first + ci, oh * stride - padding + kh,
                                                                  ow * stride - padding + kw] - z_in)
   A position outside the input (padding) holds the code z_in and adds 0, so it is skipped. */
static int8_t conv2d_at(const int8_t *x, const struct conv2d_params *p, int32_t o, int32_t oh, int32_t ow) {
  const int32_t group_c = p->c / p->groups;
  const int32_t first = o / (p->out / p->groups) * group_c;
  const int32_t row_length = group_c * p->k * p->k;
  int32_t acc = p->bias[o];
  for (int32_t ci = 0; ci < group_c; ++ci) {
    for (int32_t kh = 0; kh < p->k; ++kh) {
      const int32_t ih = oh * p->stride - p->padding + kh;
      if (ih < 0 || ih >= p->height) continue;
      for (int32_t kw = 0; kw < p->k; ++kw) {
        const int32_t iw = ow * p->stride - p->padding + kw;
        if (iw < 0 || iw >= p->width) continue;
        acc += weight_code(p->weight, p->weight_bits, row_length, o, (ci * p->k + kh) * p->k + kw) *
               (x[((first + ci) * p->height + ih) * p->width + iw] - p->z_in);
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

constexpr const char* kClampC = R"(
/* The clamp of requantize, on 64 bits. */
static int8_t clamp_to(int64_t code, int32_t act_min, int32_t act_max) {
  if (code < act_min) code = act_min;
  if (code > act_max) code = act_max;
  return (int8_t)code;
}
)";

constexpr const char* kAddC = R"(
/* The parameters of an Add (eq. 10): both inputs are brought to the output's scale by multipliers m_a, m_b
   that share one shift n (m_a / 2^n = s_a / s_out, m_b / 2^n = s_b / s_out). */
struct add_params {
  int32_t z_a, m_a, z_b, m_b;
  int shift;
  int32_t z_out, act_min, act_max;
};

/* Add: a, b and y are `size` codes of the same shape (eq. 10), with one rounding, in 64 bits:
     y[k] = clamp(z_out + round((m_a * (a[k] - z_a) + m_b * (b[k] - z_b)) / 2^n), act_min, act_max)
   Each product is below 2^31 * 255 in magnitude, so the sum is exact in int64. y[k] depends on a[k] and b[k]
   only: y may be a or b (the memory plan writes it in place over an input that dies here). */
static void add(const int8_t *a, const int8_t *b, int32_t size, const struct add_params *p, int8_t *y) {
  for (int32_t k = 0; k < size; ++k) {
    const int64_t sum = (int64_t)p->m_a * (a[k] - p->z_a) + (int64_t)p->m_b * (b[k] - p->z_b);
    y[k] = clamp_to(p->z_out + rounding_right_shift_half_away(sum, p->shift), p->act_min, p->act_max);
  }
}
)";

constexpr const char* kConcatC = R"(
/* One input of a Concat along channels (eq. 10 with one input): its `count` codes with zero point z, brought
   to the output's scale, go to the output's block of its channels ((C, H, W) order: one block per input):
     y[k] = clamp(z_out + round(m * (x[k] - z) / 2^n), act_min, act_max)
   When m = 2^n, z = z_out and [act_min, act_max] = [-128, 127], this is a copy. */
static void concat_part(const int8_t *x, int32_t count, int32_t z, int32_t m, int shift, int32_t z_out,
                        int32_t act_min, int32_t act_max, int8_t *y) {
  for (int32_t k = 0; k < count; ++k) {
    y[k] = clamp_to(z_out + rounding_right_shift_half_away((int64_t)m * (x[k] - z), shift), act_min, act_max);
  }
}
)";

constexpr const char* kGlobalAvgPool2dC = R"(
/* GlobalAvgPool2d: x is (C, H, W) with zero point z, y is (C) with the same zero point; P = H * W positions:
     y[c] = clamp(z + round(sum_{h, w} (x[c, h, w] - z) / P), -128, 127)
   The division rounds half away from zero: (2 * sum + P) / (2 * P) for sum >= 0, its mirror below 0. */
static void global_avg_pool2d(const int8_t *x, int32_t c, int32_t positions, int32_t z, int8_t *y) {
  for (int32_t ci = 0; ci < c; ++ci) {
    int32_t sum = 0;
    int64_t twice;
    for (int32_t p = 0; p < positions; ++p) sum += x[ci * positions + p] - z;
    twice = 2 * (int64_t)sum;
    y[ci] = clamp_to(z + (twice >= 0 ? (twice + positions) / (2 * (int64_t)positions)
                                     : -((-twice + positions) / (2 * (int64_t)positions))),
                     -128, 127);
  }
}
)";

constexpr const char* kClampCodesC = R"(
/* Clamp (a ReLU or ReLU6 that is not fused into the op before it): y = clamp(x, lo, hi) for `size` codes.
   y may be x (in place). */
static void clamp_codes(const int8_t *x, int32_t size, int32_t lo, int32_t hi, int8_t *y) {
  for (int32_t k = 0; k < size; ++k) y[k] = clamp_to(x[k], lo, hi);
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
          ? (op.groups == 1
                 ? fmt::format("(OUT {}, C {}, K {}, K {})", op.out_channels, op.in_channels, op.kernel, op.kernel)
                 : fmt::format("(OUT {}, C / G {}, K {}, K {}), G = {} groups{}", op.out_channels,
                               op.in_channels / op.groups, op.kernel, op.kernel, op.groups,
                               op.groups == op.in_channels && op.groups == op.out_channels ? " (depthwise)" : ""))
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
  result.plan = rt::plan_graph_arena(graph, rt::c_fusions(graph));
  const rt::ArenaPlan& plan = result.plan;
  if (plan.arena_bytes > INT32_MAX) fail("the arena of {} bytes is too large for the exported C", plan.arena_bytes);
  const std::string P = upper(prefix);
  const rt::Op& last = graph.ops.back();
  const int64_t classes = shapes.back().size();
  const auto stored = [&](int j) { return plan.storage[static_cast<size_t>(j)] != rt::Storage::NotStored; };
  const auto offset_of = [&](int j) { return plan.offsets[static_cast<size_t>(j)]; };

  std::vector<bool> uses(static_cast<size_t>(rt::OpKind::Clamp) + 1, false);
  for (const rt::Op& op : graph.ops) uses[static_cast<size_t>(op.kind)] = true;
  const auto used = [&](rt::OpKind kind) { return uses[static_cast<size_t>(kind)]; };

  // ---- <prefix>.c
  std::string& c = result.source;
  c += fmt::format("/* {}.c: the lowbit integer model \"{}\" (mode {}), exported by `export --format c`.\n", prefix,
                   comment_safe(model.model_name), comment_safe(model.mode));
  c += R"(
   Plain C99, integer arithmetic only. It computes exactly what lowbit's integer runtime computes, bit for bit:
   the kernels below follow quant/runtime/kernels_ref.cpp, quant/runtime/kernels_graph.cpp and
   docs/int-graph-format.md section 6, and the equation numbers (eq. 5, eq. 6, eq. 10) are those of
   docs/quantization.md. Activations are int8 codes in (C, H, W) order; an op's real values are r = s * (q - z).

   Memory plan (quant/runtime/memory_plan.h, plan_graph_arena): one arena, offsets in bytes. Each buffer is
   live from the op that writes it to the last op that reads it; buffers whose lives do not meet share bytes.
   "live to op J" is that last reader; "in place" writes over an input that dies at this op.
)";
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const rt::Op& op = graph.ops[i];
    std::string inputs;
    for (const int j : op.inputs) inputs += (inputs.empty() ? "" : ", ") + std::to_string(j);
    std::string where;
    switch (plan.storage[i]) {
      case rt::Storage::NotStored:
        where = fmt::format("not stored: computed inside op {}", i + 1);
        break;
      case rt::Storage::SharesInput:
        where = fmt::format("arena [{}, {}) its input's buffer", plan.offsets[i], plan.offsets[i] + plan.bytes[i]);
        break;
      case rt::Storage::InPlace:
        where = fmt::format("arena [{}, {}) in place over op {}", plan.offsets[i], plan.offsets[i] + plan.bytes[i],
                            plan.buffer_of[i]);
        break;
      case rt::Storage::Own:
        where = fmt::format("arena [{}, {}) live to op {}", plan.offsets[i], plan.offsets[i] + plan.bytes[i],
                            plan.live_until[i]);
        break;
    }
    c += fmt::format("     op {:>3} {:<15} {:<32} in {:<8} output {:<16} {}\n", i, rt::to_string(op.kind),
                     fmt::format("\"{}\"", comment_safe(op.name)), i == 0 ? "image" : inputs, shape_text(shapes[i]),
                     where);
  }
  c += fmt::format(
      "   arena: {} bytes; lower bound {} bytes (the most bytes live during one op: no plan can use less). */\n",
      plan.arena_bytes, plan.lower_bound);
  c += fmt::format("#include \"{}.h\"\n", prefix);
  c += fmt::format(R"(
/* Called after each op with the arena and the buffers that are live after it, as live_count pairs
   (offset, bytes) in `live` (an array of int32_t): a test can poison every other byte to prove that no op
   reads memory the plan does not give it. Empty unless defined (the array is then never built). */
#ifndef {0}_AFTER_OP
#define {0}_AFTER_OP(op, arena, live, live_count) ((void)0)
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
  bool stored_conv = false, fused_conv = false, stored_pool_input = false;
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const rt::Op& op = graph.ops[i];
    if (op.kind == rt::OpKind::Conv2d) (stored(static_cast<int>(i)) ? stored_conv : fused_conv) = true;
    // a MaxPool2d that reads a stored input (not fused with its Conv2d)
    if (op.kind == rt::OpKind::MaxPool2d) stored_pool_input |= stored(op.inputs[0]);
  }
  if (used(rt::OpKind::Conv2d)) c += kConv2dC;
  if (stored_conv) c += kConv2dStoredC;
  if (fused_conv) c += kConv2dMaxPool2dC;
  if (stored_pool_input) c += kMaxPool2dC;
  if (used(rt::OpKind::AvgPool2d)) c += kAvgPool2dC;
  if (used(rt::OpKind::Add) || used(rt::OpKind::Concat) || used(rt::OpKind::GlobalAvgPool2d) || used(rt::OpKind::Clamp))
    c += kClampC;
  if (used(rt::OpKind::Add)) c += kAddC;
  if (used(rt::OpKind::Concat)) c += kConcatC;
  if (used(rt::OpKind::GlobalAvgPool2d)) c += kGlobalAvgPool2dC;
  if (used(rt::OpKind::Clamp)) c += kClampCodesC;
  if (used(rt::OpKind::Linear)) c += kLinearC;

  c += "\n/* ---- the model, op by op ---- */\n\n";
  // The parameters of the Conv2d ops[i] with input shape `in`, as a C99 struct with designated initialisers.
  auto conv_params = [&](size_t i, const rt::Shape& in) {
    const rt::Op& op = graph.ops[i];
    const auto& rq = op.requant;
    return fmt::format(
        "    static const struct conv2d_params p = {{.c = {}, .height = {}, .width = {}, .z_in = {},\n"
        "        .weight = op{}_weight, .weight_bits = {}, .bias = op{}_bias, .multiplier = op{}_multiplier,\n"
        "        .shift = op{}_shift, .out = {}, .k = {}, .stride = {}, .padding = {}, .groups = {},\n"
        "        .z_out = {}, .act_min = {}, .act_max = {}}};\n",
        in.c, in.h, in.w, op.input_zero_point, i, op.weight_bits, i, i, i, op.out_channels, op.kernel, op.stride,
        op.padding, op.groups, rq.zero_point, rq.act_min, rq.act_max);
  };
  auto at = [](int64_t offset) { return fmt::format("a + {}", offset); };
  c += fmt::format("int {}_run(const uint8_t *image, int8_t *logits, void *arena) {{\n", prefix);
  c += "  int8_t *const a = (int8_t *)arena;\n  int32_t best = 0;\n";
  for (size_t i = 0; i < graph.ops.size(); ++i) {
    const rt::Op& op = graph.ops[i];
    const rt::Shape in = i == 0 ? input : shapes[static_cast<size_t>(op.inputs[0])];
    const rt::Shape& out = shapes[i];
    const int64_t x = plan.input_offsets[i], y = plan.offsets[i];
    const std::string name = comment_safe(op.name);
    const auto& rq = op.requant;
    const std::string in_place =
        plan.storage[i] == rt::Storage::InPlace ? fmt::format(" (in place over op {})", plan.buffer_of[i]) : "";
    switch (op.kind) {
      case rt::OpKind::Input:
        c += fmt::format("\n  /* op {} \"{}\": input, image {} uint8 pixels -> codes {} */\n", i, name, shape_text(in),
                         shape_text(out));
        c += fmt::format("  input_lookup(image, {}, input_table, {});\n", out.size(), at(y));
        break;
      case rt::OpKind::Conv2d: {
        const std::string grouping = op.groups == 1 ? ""
                                     : op.groups == in.c && op.groups == op.out_channels
                                         ? ", depthwise"
                                         : fmt::format(", {} groups of {} channels", op.groups, in.c / op.groups);
        c += fmt::format(
            "\n  /* op {} \"{}\": conv2d {}-bit{}, x {} -> y {}, K {}, stride {}, padding {}, z_in {}, z_out {}, "
            "clamp [{}, {}]{} */\n",
            i, name, op.weight_bits, grouping, shape_text(in), shape_text(out), op.kernel, op.stride, op.padding,
            op.input_zero_point, rq.zero_point, rq.act_min, rq.act_max,
            rq.act_min == rq.zero_point ? " (ReLU fused: act_min = z_out)" : "");
        if (y < 0) {
          c += fmt::format("  /* fused with the max_pool2d after it: see op {} */\n", i + 1);
          continue;  // nothing stored, nothing to check
        }
        c += fmt::format("  {{\n{}    conv2d({}, &p, {});\n  }}\n", conv_params(i, in), at(x), at(y));
        break;
      }
      case rt::OpKind::Linear:
        c += fmt::format(
            "\n  /* op {} \"{}\": linear {}-bit, x ({}) -> y ({}), z_in {}, z_out {}, clamp [{}, {}]{} */\n", i, name,
            op.weight_bits, in.size(), out.size(), op.input_zero_point, rq.zero_point, rq.act_min, rq.act_max,
            rq.act_min == rq.zero_point ? " (ReLU fused: act_min = z_out)" : "");
        c += fmt::format(
            "  linear({}, {}, {}, op{}_weight, {}, op{}_bias, op{}_multiplier, op{}_shift, {}, {}, {}, {}, {});\n",
            at(x), in.size(), op.input_zero_point, i, op.weight_bits, i, i, i, op.out_channels, rq.zero_point,
            rq.act_min, rq.act_max, at(y));
        break;
      case rt::OpKind::MaxPool2d: {
        const bool fused = !stored(op.inputs[0]);
        c += fmt::format("\n  /* op {} \"{}\": max_pool2d, x {} -> y {}, K {}, stride {}, padding {}{}", i, name,
                         shape_text(in), shape_text(out), op.kernel, op.stride, op.padding, fused ? ",\n" : " */\n");
        if (fused) {  // the Conv2d before it is computed here
          const auto conv = static_cast<size_t>(op.inputs[0]);
          c += fmt::format(
              "     together with op {}: its conv outputs are computed window by window, never stored */\n", conv);
          c +=
              fmt::format("  {{\n{}    conv2d_max_pool2d({}, &p, {}, {});\n  }}\n",
                          conv_params(conv, conv == 0 ? input : shapes[static_cast<size_t>(graph.ops[conv].inputs[0])]),
                          at(x), op.kernel, at(y));
          break;
        }
        c += fmt::format("  max_pool2d({}, {}, {}, {}, {}, {}, {}, {});\n", at(x), in.c, in.h, in.w, op.kernel,
                         op.stride, op.padding, at(y));
        break;
      }
      case rt::OpKind::AvgPool2d:
        c += fmt::format("\n  /* op {} \"{}\": avg_pool2d, x {} -> y {}, K {}, stride {}, padding {}, z {} */\n", i,
                         name, shape_text(in), shape_text(out), op.kernel, op.stride, op.padding, op.input_zero_point);
        c += fmt::format("  avg_pool2d({}, {}, {}, {}, {}, {}, {}, {}, {});\n", at(x), in.c, in.h, in.w, op.kernel,
                         op.stride, op.padding, op.input_zero_point, at(y));
        break;
      case rt::OpKind::GlobalAvgPool2d:
        c += fmt::format("\n  /* op {} \"{}\": global_avg_pool2d, x {} -> y ({}), z {} */\n", i, name, shape_text(in),
                         out.c, op.input_zero_point);
        c += fmt::format("  global_avg_pool2d({}, {}, {}, {}, {});\n", at(x), in.c, in.h * in.w, op.input_zero_point,
                         at(y));
        break;
      case rt::OpKind::Flatten:
        c += fmt::format(
            "\n  /* op {} \"{}\": flatten, {} -> ({}): (c, h, w) goes to index (c * H + h) * W + w, which is\n"
            "     where it already is: nothing to do (the codes stay at a + {}). */\n",
            i, name, shape_text(in), out.size(), y);
        break;
      case rt::OpKind::Clamp:
        c += fmt::format("\n  /* op {} \"{}\": clamp {} to [{}, {}]{} */\n", i, name, shape_text(out), rq.act_min,
                         rq.act_max, in_place);
        c += fmt::format("  clamp_codes({}, {}, {}, {}, {});\n", at(x), out.size(), rq.act_min, rq.act_max, at(y));
        break;
      case rt::OpKind::Add: {
        const rt::Rescale& r = op.rescale;
        c += fmt::format(
            "\n  /* op {} \"{}\": add, op {} + op {}, {} -> {}{}: m_a / 2^n = s_a / s_out, m_b / 2^n = s_b / s_out, "
            "clamp [{}, {}]{} */\n",
            i, name, op.inputs[0], op.inputs[1], shape_text(in), shape_text(out), in_place, rq.act_min, rq.act_max,
            rq.act_min == rq.zero_point ? " (ReLU fused: act_min = z_out)" : "");
        c += fmt::format(
            "  {{\n    static const struct add_params p = {{.z_a = {}, .m_a = {}, .z_b = {}, .m_b = {}, .shift = {},\n"
            "        .z_out = {}, .act_min = {}, .act_max = {}}};\n"
            "    add({}, {}, {}, &p, {});\n  }}\n",
            r.zero_points[0], r.multipliers[0], r.zero_points[1], r.multipliers[1], r.shift, rq.zero_point, rq.act_min,
            rq.act_max, at(offset_of(op.inputs[0])), at(offset_of(op.inputs[1])), out.size(), at(y));
        break;
      }
      case rt::OpKind::Concat: {
        const rt::Rescale& r = op.rescale;
        std::string parts;
        for (size_t k = 0; k < op.inputs.size(); ++k)
          parts += fmt::format("{}op {} {}", k == 0 ? "" : " + ", op.inputs[k],
                               shape_text(shapes[static_cast<size_t>(op.inputs[k])]));
        c += fmt::format(
            "\n  /* op {} \"{}\": concat along channels, {} -> {}; each input to the output's scale, "
            "m / 2^{} = s_in / s_out, z_out {}, clamp [{}, {}] */\n",
            i, name, parts, shape_text(out), r.shift, rq.zero_point, rq.act_min, rq.act_max);
        int64_t first = 0;  // the input's first code in the output
        for (size_t k = 0; k < op.inputs.size(); ++k) {
          const int64_t count = shapes[static_cast<size_t>(op.inputs[k])].size();
          c += fmt::format("  concat_part({}, {}, {}, {}, {}, {}, {}, {}, {});\n", at(offset_of(op.inputs[k])), count,
                           r.zero_points[k], r.multipliers[k], r.shift, rq.zero_point, rq.act_min, rq.act_max,
                           at(y + first));
          first += count;
        }
        break;
      }
    }
    std::string live;
    const std::vector<int> buffers = rt::live_after(plan, i);
    for (const int b : buffers)
      live += fmt::format("{}{}, {}", live.empty() ? "" : ", ", plan.offsets[static_cast<size_t>(b)],
                          plan.bytes[static_cast<size_t>(b)]);
    c += fmt::format("  {}_AFTER_OP({}, a, ((const int32_t[]){{{}}}), {});\n", P, i, live, buffers.size());
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
   {0}_ARENA_LOWER_BOUND is the most bytes that must be live at once (the inputs and output of one op, and
   what later ops still need): no plan of these buffers can use less. */
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
