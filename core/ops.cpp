// The primitive ops: forward and backward side by side, in the order of the list in core/ops.h.
#include "core/ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/conv_direct.h"
#include "core/error.h"
#include "core/parallel.h"
#include "core/threads.h"

namespace lowbit::ops {

namespace {

// ---- threads and sgemm (see core/threads.h: OpenBLAS runs on one thread, we split the work)

// How many slices for_each_slice cuts n items into: one per thread, at most n.
int slice_count(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(num_threads(), n), 1, std::numeric_limits<int>::max()));
}

// Threads for an elementwise loop over n values: one (a plain loop) unless n is large enough to share.
int elementwise_threads(int64_t n) { return n > (1 << 16) ? num_threads() : 1; }

// Cuts [0, n) into slice_count(n) contiguous slices, in order, and runs body(first, last, slice)
// for each on its own thread.
template <typename Body>
void for_each_slice(int64_t n, Body body) {
  const int slices = slice_count(n);
  parallel_for(slices, slices, [&](int64_t s) { body(n * s / slices, n * (s + 1) / slices, static_cast<int>(s)); });
}

// C = op(A) op(B) + beta * C on the calling thread; row-major with leading dimensions lda, ldb, ldc;
// op(A) is (M, K), op(B) is (K, N).
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
           int64_t ldb, float* c, int64_t ldc, float beta) {
  prepare_blas();
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.f, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

// Below this many multiply-adds per thread, splitting an sgemm costs more than it saves.
constexpr int64_t kMinGemmMacsPerThread = int64_t{1} << 17;

// C = op(A) op(B), all row-major and contiguous. A big product is split by rows of C over the
// threads, one single-threaded sgemm per slice (each element of C is the same sum either way).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c) {
  const int64_t lda = trans_a ? m : k, ldb = trans_b ? k : n;
  const int64_t worth = std::max<int64_t>(1, m * n * k / kMinGemmMacsPerThread);
  if (std::min<int64_t>(worth, slice_count(m)) == 1 || omp_in_parallel()) {
    sgemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, n, 0.f);
    return;
  }
  for_each_slice(m, [&](int64_t first, int64_t last, int) {  // rows [first, last) of C and of op(A)
    sgemm(trans_a, trans_b, last - first, n, k, a + (trans_a ? first : first * lda), lda, b, ldb, c + first * n, n,
          0.f);
  });
}

// ---- sums over a batch of planes (conv2d's bias gradient, batch_norm's statistics)

// A sum over runs of floats (one channel's plane of one image at a time). Within a run, value j
// goes to float lane j % kLanes, so that the loop vectorises in single precision; at the end of the
// run each lane is added to a double lane, and the double lanes are added in order at the end. A
// fixed order: the same bits for any thread count. Float partial sums over one plane (a lane holds
// H*W / kLanes values) lose little; the double lanes keep the sum over the batch accurate. The terms
// are computed in float too (batch_norm's (x − mu)² and dy · xhat). Until session 8 the terms and the
// lanes were double throughout: twice as slow (batch norm was 20% of convbn's training), and the
// batch statistics differ from those in their last bits. (conv2d's bias gradient, a double sum of
// floats until session 9, was 4% of lenet5's training.)
constexpr int kLanes = 16;
struct LaneSum {
  double lane[kLanes] = {};
  // Adds f(p[j]) for j in [0, len).
  template <typename F>
  void add(const float* __restrict p, int64_t len, F f) {
    if (len < kLanes) {  // the same sums as below (a run's lane of one value is that value), without the run
      for (int l = 0; l < len; ++l) lane[l] += double{f(p[l])};
      return;
    }
    float run[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
      for (int l = 0; l < kLanes; ++l) run[l] += f(p[j + l]);
    for (int l = 0; j < len; ++j, ++l) run[l] += f(p[j]);
    for (int l = 0; l < kLanes; ++l) lane[l] += double{run[l]};
  }
  // Adds f(p[j], q[j]) for j in [0, len).
  template <typename F>
  void add2(const float* __restrict p, const float* __restrict q, int64_t len, F f) {
    if (len < kLanes) {
      for (int l = 0; l < len; ++l) lane[l] += double{f(p[l], q[l])};
      return;
    }
    float run[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
      for (int l = 0; l < kLanes; ++l) run[l] += f(p[j + l], q[j + l]);
    for (int l = 0; j < len; ++j, ++l) run[l] += f(p[j], q[j]);
    for (int l = 0; l < kLanes; ++l) lane[l] += double{run[l]};
  }
  double total() const {
    double t = 0;
    for (double v : lane) t += v;
    return t;
  }
};

// ---- broadcasting helpers

Shape broadcast_shape(const Shape& a, const Shape& b, const char* op) {
  const size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t i = 0; i < rank; ++i) {
    const int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    const int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    if (da != db && da != 1 && db != 1)
      fail("{}: shapes {} and {} cannot be broadcast together", op, shape_str(a), shape_str(b));
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Strides of `shape` seen from `out` (right-aligned; 0 along broadcast axes).
std::vector<int64_t> broadcast_strides(const Shape& shape, const Shape& out) {
  std::vector<int64_t> strides(out.size(), 0);
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    const size_t j = i + (out.size() - shape.size());
    strides[j] = shape[i] == 1 ? 0 : stride;
    stride *= shape[i];
  }
  return strides;
}

// Calls fn(out_index, a_index, b_index) for every element of `out`.
template <typename Fn>
void for_each_broadcast(const Shape& out, const Shape& a, const Shape& b, Fn fn) {
  const auto sa = broadcast_strides(a, out);
  const auto sb = broadcast_strides(b, out);
  const int64_t n = shape_numel(out);
  std::vector<int64_t> index(out.size(), 0);
  int64_t ia = 0, ib = 0;
  for (int64_t i = 0; i < n; ++i) {
    fn(i, ia, ib);
    for (size_t d = out.size(); d-- > 0;) {  // odometer increment
      ++index[d];
      ia += sa[d];
      ib += sb[d];
      if (index[d] < out[d]) break;
      ia -= sa[d] * out[d];
      ib -= sb[d] * out[d];
      index[d] = 0;
    }
  }
}

// True when `inner` is `outer` without some leading axes: (OUT) in (N, OUT), a bias over a batch.
// Then broadcasting repeats `inner` row after row, and needs no index arithmetic.
bool is_trailing(const Shape& outer, const Shape& inner) {
  return inner.size() < outer.size() && std::equal(inner.rbegin(), inner.rend(), outer.rbegin());
}

// Sums `grad` (of the broadcast shape) down to `shape`: the backward of broadcasting.
Tensor sum_to(const Tensor& grad, const Shape& shape) {
  if (grad.shape() == shape) return grad;
  Tensor out = Tensor::zeros(shape);
  const float* g = grad.data();
  float* o = out.data();
  if (is_trailing(grad.shape(), shape)) {  // the same sums in the same order as the general case
    const int64_t inner = out.numel(), rows = inner == 0 ? 0 : grad.numel() / inner;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < inner; ++j) o[j] += g[r * inner + j];
    return out;
  }
  for_each_broadcast(grad.shape(), shape, shape, [&](int64_t i, int64_t ia, int64_t) { o[ia] += g[i]; });
  return out;
}

// Elementwise binary op with broadcasting; f(a, b) computes one value.
template <typename F>
Tensor binary(const Tensor& a, const Tensor& b, const char* name, F f) {
  if (a.shape() == b.shape()) {
    Tensor out = Tensor::empty(a.shape());
    const float *pa = a.data(), *pb = b.data();
    float* po = out.data();
    const int64_t n = a.numel();
    parallel_for(n, elementwise_threads(n), [&](int64_t i) { po[i] = f(pa[i], pb[i]); });
    return out;
  }
  Tensor out = Tensor::empty(broadcast_shape(a.shape(), b.shape(), name));
  const float *pa = a.data(), *pb = b.data();
  float* po = out.data();
  if (is_trailing(a.shape(), b.shape()) || is_trailing(b.shape(), a.shape())) {  // a row repeated
    const bool b_repeats = is_trailing(a.shape(), b.shape());
    const int64_t inner = b_repeats ? b.numel() : a.numel(), rows = inner == 0 ? 0 : out.numel() / inner;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < inner; ++j) {
        const int64_t i = r * inner + j;
        po[i] = b_repeats ? f(pa[i], pb[j]) : f(pa[j], pb[i]);
      }
    return out;
  }
  for_each_broadcast(out.shape(), a.shape(), b.shape(),
                     [&](int64_t i, int64_t ia, int64_t ib) { po[i] = f(pa[ia], pb[ib]); });
  return out;
}

template <typename F>
Tensor unary(const Tensor& a, F f) {
  Tensor out = Tensor::empty(a.shape());
  const float* pa = a.data();
  float* po = out.data();
  const int64_t n = a.numel();
  parallel_for(n, elementwise_threads(n), [&](int64_t i) { po[i] = f(pa[i]); });
  return out;
}

void check_rank(const Tensor& t, int64_t rank, const char* op, const char* what) {
  if (t.dim() != rank) fail("{}: {} must have rank {}, got shape {}", op, what, rank, shape_str(t.shape()));
}

}  // namespace

// =============================================================================================
// 1. add, sub, mul, div

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary(a, b, "add", [](float x, float y) { return x + y; });
  return record(out, "add", {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(g, sa), sum_to(g, sb)};
  });
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary(a, b, "sub", [](float x, float y) { return x - y; });
  return record(out, "sub", {a, b}, [sa = a.shape(), sb = b.shape()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(g, sa), sum_to(unary(g, [](float v) { return -v; }), sb)};
  });
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary(a, b, "mul", [](float x, float y) { return x * y; });
  return record(out, "mul", {a, b}, [a = a.detach(), b = b.detach()](const Tensor& g) {
    return std::vector<Tensor>{sum_to(binary(g, b, "mul", [](float x, float y) { return x * y; }), a.shape()),
                               sum_to(binary(g, a, "mul", [](float x, float y) { return x * y; }), b.shape())};
  });
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary(a, b, "div", [](float x, float y) { return x / y; });
  return record(out, "div", {a, b}, [a = a.detach(), b = b.detach()](const Tensor& g) {
    // d(a/b)/da = 1/b;  d(a/b)/db = -a/b^2
    Tensor ga = binary(g, b, "div", [](float x, float y) { return x / y; });
    Tensor a_over_b2 = binary(a, b, "div", [](float x, float y) { return x / (y * y); });
    Tensor gb = binary(g, a_over_b2, "mul", [](float x, float y) { return -x * y; });
    return std::vector<Tensor>{sum_to(ga, a.shape()), sum_to(gb, b.shape())};
  });
}

// =============================================================================================
// 2. neg, add_scalar, mul_scalar

Tensor neg(const Tensor& a) {
  return record(unary(a, [](float x) { return -x; }), "neg", {a},
                [](const Tensor& g) { return std::vector<Tensor>{unary(g, [](float x) { return -x; })}; });
}

Tensor add_scalar(const Tensor& a, float s) {
  return record(unary(a, [s](float x) { return x + s; }), "add_scalar", {a},
                [](const Tensor& g) { return std::vector<Tensor>{g}; });
}

Tensor mul_scalar(const Tensor& a, float s) {
  return record(unary(a, [s](float x) { return x * s; }), "mul_scalar", {a},
                [s](const Tensor& g) { return std::vector<Tensor>{unary(g, [s](float x) { return x * s; })}; });
}

// =============================================================================================
// 3. matmul: C = op(A) op(B)

Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  check_rank(a, 2, "matmul", "a");
  check_rank(b, 2, "matmul", "b");
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  if (k != kb)
    fail("matmul: shapes {}{} and {}{} do not agree on the inner dimension", shape_str(a.shape()), trans_a ? "^T" : "",
         shape_str(b.shape()), trans_b ? "^T" : "");
  Tensor out = Tensor::empty({m, n});
  if (m > 0 && n > 0) {
    if (k == 0)
      std::fill(out.values().begin(), out.values().end(), 0.f);
    else
      gemm(trans_a, trans_b, m, n, k, a.data(), b.data(), out.data());
  }
  return record(out, "matmul", {a, b}, [a = a.detach(), b = b.detach(), trans_a, trans_b, m, n, k](const Tensor& g) {
    // With opA = op(A), opB = op(B):  d opA = dC opB^T,  d opB = opA^T dC; transpose back where needed.
    Tensor da = Tensor::empty(a.shape()), db = Tensor::empty(b.shape());
    if (!trans_a)
      gemm(false, !trans_b, m, k, n, g.data(), b.data(), da.data());  // dA = dC opB^T
    else
      gemm(trans_b, true, k, m, n, b.data(), g.data(), da.data());  // dA = opB dC^T
    if (!trans_b)
      gemm(!trans_a, false, k, n, m, a.data(), g.data(), db.data());  // dB = opA^T dC
    else
      gemm(true, trans_a, n, k, m, g.data(), a.data(), db.data());  // dB = dC^T opA
    return std::vector<Tensor>{da, db};
  });
}

// =============================================================================================
// 4. sum, mean

Tensor sum(const Tensor& a) {
  double total = 0;
  for (float v : a.values()) total += v;
  return record(Tensor::scalar(static_cast<float>(total)), "sum", {a},
                [shape = a.shape()](const Tensor& g) { return std::vector<Tensor>{Tensor::full(shape, g.item())}; });
}

namespace {
// Views a as (outer, len, inner) around `axis`.
struct AxisSplit {
  int64_t outer = 1, len = 1, inner = 1;
  Shape reduced;
};
AxisSplit split_axis(const Shape& shape, int64_t axis, bool keepdim, const char* op) {
  const auto rank = static_cast<int64_t>(shape.size());
  if (axis < -rank || axis >= rank) fail("{}: axis {} is out of range for shape {}", op, axis, shape_str(shape));
  if (axis < 0) axis += rank;
  AxisSplit s;
  for (int64_t i = 0; i < rank; ++i) {
    if (i < axis)
      s.outer *= shape[i];
    else if (i > axis)
      s.inner *= shape[i];
    if (i != axis)
      s.reduced.push_back(shape[i]);
    else if (keepdim)
      s.reduced.push_back(1);
  }
  s.len = shape[axis];
  return s;
}
}  // namespace

Tensor sum(const Tensor& a, int64_t axis, bool keepdim) {
  const AxisSplit s = split_axis(a.shape(), axis, keepdim, "sum");
  Tensor out = Tensor::zeros(s.reduced);
  const float* pa = a.data();
  float* po = out.data();
  for (int64_t o = 0; o < s.outer; ++o)
    for (int64_t l = 0; l < s.len; ++l)
      for (int64_t i = 0; i < s.inner; ++i) po[o * s.inner + i] += pa[(o * s.len + l) * s.inner + i];
  return record(out, "sum_axis", {a}, [s, shape = a.shape()](const Tensor& g) {
    Tensor da = Tensor::empty(shape);
    for (int64_t o = 0; o < s.outer; ++o)
      for (int64_t l = 0; l < s.len; ++l)
        for (int64_t i = 0; i < s.inner; ++i) da.data()[(o * s.len + l) * s.inner + i] = g.data()[o * s.inner + i];
    return std::vector<Tensor>{da};
  });
}

Tensor mean(const Tensor& a) { return mul_scalar(sum(a), 1.f / static_cast<float>(std::max<int64_t>(a.numel(), 1))); }

Tensor mean(const Tensor& a, int64_t axis, bool keepdim) {
  return mul_scalar(sum(a, axis, keepdim), 1.f / static_cast<float>(std::max<int64_t>(a.size(axis), 1)));
}

// =============================================================================================
// 5. relu, clamp, exp, log

Tensor relu(const Tensor& a) {
  return record(unary(a, [](float x) { return x > 0.f ? x : 0.f; }), "relu", {a}, [a = a.detach()](const Tensor& g) {
    return std::vector<Tensor>{binary(g, a, "relu", [](float gv, float x) { return x > 0.f ? gv : 0.f; })};
  });
}

// relu(add(a, b)) as one op: one pass over the data less each way, the same values and gradients bit for bit
// (ReLU's mask is taken from the output, which is > 0 exactly where a + b is). nn::run_nodes runs an Add whose
// output only a ReLU reads with it, as in a residual block.
Tensor add_relu(const Tensor& a, const Tensor& b) {
  Tensor out = binary(a, b, "add", [](float x, float y) {
    const float v = x + y;
    return v > 0.f ? v : 0.f;
  });
  return record(out, "add_relu", {a, b}, [y = out.detach(), sa = a.shape(), sb = b.shape()](const Tensor& g) {
    const Tensor masked = binary(g, y, "relu", [](float gv, float v) { return v > 0.f ? gv : 0.f; });
    return std::vector<Tensor>{sum_to(masked, sa), sum_to(masked, sb)};
  });
}

// Gradient passes where lo < a < hi, strictly: 0 exactly at lo and at hi, as PyTorch's hardtanh and
// relu6 (and relu here, at 0). Note that torch.clamp's own backward lets it pass at lo and hi.
Tensor clamp(const Tensor& a, float lo, float hi) {
  if (!(lo <= hi)) fail("clamp: lo {} must not be above hi {}", lo, hi);
  Tensor out = unary(a, [lo, hi](float x) { return std::min(std::max(x, lo), hi); });
  return record(out, "clamp", {a}, [a = a.detach(), lo, hi](const Tensor& g) {
    return std::vector<Tensor>{
        binary(g, a, "clamp", [lo, hi](float gv, float x) { return lo < x && x < hi ? gv : 0.f; })};
  });
}

Tensor exp(const Tensor& a) {
  Tensor out = unary(a, [](float x) { return std::exp(x); });
  return record(out, "exp", {a}, [y = out.detach()](const Tensor& g) {
    return std::vector<Tensor>{binary(g, y, "exp", [](float gv, float yv) { return gv * yv; })};
  });
}

Tensor log(const Tensor& a) {
  return record(unary(a, [](float x) { return std::log(x); }), "log", {a}, [a = a.detach()](const Tensor& g) {
    return std::vector<Tensor>{binary(g, a, "log", [](float gv, float x) { return gv / x; })};
  });
}

// =============================================================================================
// 6. reshape

Tensor reshape(const Tensor& a, const Shape& shape) {
  Shape resolved = shape;
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1 && infer < 0)
      infer = static_cast<int64_t>(i);
    else if (shape[i] < 0)
      fail("reshape: bad target shape {}", shape_str(shape));
    else
      known *= shape[i];
  }
  if (infer >= 0) resolved[static_cast<size_t>(infer)] = known == 0 ? 0 : a.numel() / known;
  if (shape_numel(resolved) != a.numel())
    fail("reshape: cannot view shape {} as {}", shape_str(a.shape()), shape_str(shape));
  Tensor out = a.detach();
  out.impl()->shape = resolved;
  return record(out, "reshape", {a}, [old = a.shape()](const Tensor& g) {
    Tensor dg = g.detach();
    dg.impl()->shape = old;
    return std::vector<Tensor>{dg};
  });
}

Tensor flatten(const Tensor& a) {
  if (a.dim() < 1) fail("flatten: needs at least one dimension, got a scalar");
  return reshape(a, {a.size(0), -1});
}

// =============================================================================================
// 7. transpose, concat

namespace {
Tensor transpose_values(const Tensor& a) {
  const int64_t r = a.size(0), c = a.size(1);
  Tensor out = Tensor::empty({c, r});
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) out.data()[j * r + i] = a.data()[i * c + j];
  return out;
}
}  // namespace

Tensor transpose(const Tensor& a) {
  check_rank(a, 2, "transpose", "input");
  return record(transpose_values(a), "transpose", {a},
                [](const Tensor& g) { return std::vector<Tensor>{transpose_values(g)}; });
}

// Each part is viewed as (outer, len_i, inner) around `axis`; a row of the output is the parts'
// rows one after the other: out[o] = (parts[0][o], parts[1][o], ...). Backward copies them back.
Tensor concat(const std::vector<Tensor>& parts, int64_t axis) {
  if (parts.empty()) fail("concat: needs at least one tensor");
  const Shape& first = parts[0].shape();
  const AxisSplit s = split_axis(first, axis, false, "concat");
  const auto at_axis = static_cast<size_t>(axis < 0 ? axis + static_cast<int64_t>(first.size()) : axis);
  Shape shape = first;
  shape[at_axis] = 0;
  std::vector<Shape> shapes;
  for (const Tensor& part : parts) {
    Shape rest = part.shape();
    if (rest.size() == first.size()) rest[at_axis] = first[at_axis];
    if (rest != first)
      fail("concat: part {} has shape {}, which differs from part 0's {} outside axis {}", shapes.size(),
           shape_str(part.shape()), shape_str(first), axis);
    shapes.push_back(part.shape());
    shape[at_axis] += part.shape()[at_axis];
  }
  Tensor out = Tensor::empty(shape);
  const int64_t row = shape[at_axis] * s.inner;  // of the output
  for (int64_t o = 0; o < s.outer; ++o)
    for (int64_t offset = 0; const Tensor& part : parts) {
      const int64_t part_row = part.shape()[at_axis] * s.inner;
      std::copy_n(part.data() + o * part_row, part_row, out.data() + o * row + offset);
      offset += part_row;
    }
  return record(out, "concat", parts, [s, at_axis, row, shapes](const Tensor& g) {
    std::vector<Tensor> grads;
    for (int64_t offset = 0; const Shape& part_shape : shapes) {
      const int64_t part_row = part_shape[at_axis] * s.inner;
      Tensor d = Tensor::empty(part_shape);
      for (int64_t o = 0; o < s.outer; ++o) std::copy_n(g.data() + o * row + offset, part_row, d.data() + o * part_row);
      grads.push_back(d);
      offset += part_row;
    }
    return grads;
  });
}

// =============================================================================================
// 8. conv2d: per image and group, im2col + one sgemm; depthwise by a direct loop; stride 1 without im2col
//
// The C input channels and OUT output channels are cut into `groups` equal groups; output
// channel o sees only the C / groups input channels of its group (groups = 1: an ordinary
// convolution; groups = C: depthwise). For image n and group gi, cols is (C/groups*K*K, OH*OW):
// column (oy, ox) holds the group's input patch under the kernel at that output position (0 where
// the kernel hangs over the zero padding). With w_gi, the group's (OUT/groups, C/groups*K*K) rows of w,
//   y[n]_gi = w_gi cols + b_gi  ->  (OUT/groups, OH*OW), which is y[n]_gi of (N, OUT, OH, OW) as it is.
// Backward, with dy[n]_gi (OUT/groups, OH*OW):
//   dw_gi = sum_n dy[n]_gi cols^T,   db[o] = sum_n sum_pixels dy[n][o],   dx[n]_gi = col2im(w_gi^T dy[n]_gi).
// The images are split over the threads. A thread reuses one cols buffer (small enough to stay in
// its cache) and rebuilds cols in the backward rather than keeping all of them; it sums its own
// dw and db, and those partial sums are added in thread order, so a thread count always gives the
// same bits. dx is skipped when the input needs no gradient (the first layer's).
//
// Depthwise (one input channel per group) would be a GEMM of one row per channel: there direct
// loops over a zero-padded copy of the plane compute the same sums in another order. On dsconv's
// four depthwise shapes (batch 64, one thread) forward + backward took 70-80 ms in all, against
// 95-136 ms through im2col + sgemm.
//
// Stride 1 with one group, on a CPU with AVX-512, the forward, dx and dw skip im2col where that pays
// (core/conv_direct.h): conv_direct multiplies straight from zero-padded planes, and dx of a stride-1
// convolution is one too, of dy padded by K - 1 - padding, with w transposed and turned by 180 degrees;
// conv_direct_dw reads the planes in place as the second operand of dw's GEMM. convbn's second conv at
// batch 64: forward 4.3 -> 2.9 ms, backward 9.2-10.3 -> 6.0-6.7 ms (tools/bench_ops, minima, old and new
// build alternated).

namespace {
struct ConvGeometry {
  int64_t n, c, h, w, out, k, stride, padding, groups, oh, ow;
  int64_t group_c() const { return c / groups; }      // input channels per group
  int64_t group_out() const { return out / groups; }  // output channels per group
  int64_t rows() const { return group_c() * k * k; }  // of cols, and the length of a row of w
  int64_t cols() const { return oh * ow; }            // of cols
  bool depthwise() const { return group_c() == 1 && groups > 1; }
  int64_t padded_plane() const { return (h + 2 * padding) * (w + 2 * padding); }
};

// The output columns [lo, hi) whose input column ix = ox * stride - padding + kj is inside [0, W).
std::pair<int64_t, int64_t> inside_columns(const ConvGeometry& g, int64_t kj) {
  const int64_t first = g.padding - kj, last = g.w - 1 + g.padding - kj;  // ox * stride in [first, last]
  if (last < 0) return {0, 0};
  const int64_t lo = first <= 0 ? 0 : (first + g.stride - 1) / g.stride;
  const int64_t hi = std::min(g.ow, last / g.stride + 1);
  return {std::min(lo, hi), hi};
}

// GCC turns a copy loop into a call to memmove, which costs more than the copy for runs of 7 to 28
// floats as im2col's are; this keeps the loop (vectorised) for the function it marks.
#if defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_NO_LIBRARY_COPIES __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define LOWBIT_NO_LIBRARY_COPIES
#endif

// Depthwise works on one channel of one image at a time, with its zero padding written out:
// xp is (H + 2 * padding, W + 2 * padding), so the loops need no bounds and vectorise along ox.
LOWBIT_NO_LIBRARY_COPIES void pad_plane(const ConvGeometry& g, const float* x, float* xp) {
  const int64_t wp = g.w + 2 * g.padding;
  std::fill_n(xp, (g.h + 2 * g.padding) * wp, 0.f);
  for (int64_t iy = 0; iy < g.h; ++iy) {
    const float* __restrict src = x + iy * g.w;
    float* __restrict dst = xp + (iy + g.padding) * wp + g.padding;
    for (int64_t ix = 0; ix < g.w; ++ix) dst[ix] = src[ix];
  }
}

// Row (ci, ki, kj) of cols from the group's planes xp, zero-padded when padding > 0 (width wp): OH runs
// of OW taps, `stride` apart. STRIDE is the stride when it is known at compile time (1 and 2: the
// loops then vectorise), 0 otherwise.
template <int64_t STRIDE>
LOWBIT_NO_LIBRARY_COPIES void gather_taps(const ConvGeometry& g, const float* xp, int64_t wp, float* __restrict cols) {
  const int64_t stride = STRIDE == 0 ? g.stride : STRIDE, plane = (g.h + 2 * g.padding) * wp;
  for (int64_t row = 0; row < g.rows(); ++row) {
    const int64_t ci = row / (g.k * g.k), ki = (row / g.k) % g.k, kj = row % g.k;
    const float* __restrict src = xp + ci * plane + ki * wp + kj;  // tap (ki, kj) of output (0, 0)
    float* __restrict dst = cols + row * g.cols();
    for (int64_t oy = 0; oy < g.oh; ++oy, src += stride * wp, dst += g.ow)
      for (int64_t ox = 0; ox < g.ow; ++ox) dst[ox] = src[ox * stride];
  }
}

// A 1 x 1 convolution with stride 1 and no padding: its cols are its input.
bool cols_are_input(const ConvGeometry& g) { return g.k == 1 && g.stride == 1 && g.padding == 0; }

// Floats of scratch that im2col needs: cols, then the group's padded planes.
int64_t im2col_scratch(const ConvGeometry& g) {
  return g.rows() * g.cols() + (g.padding > 0 ? g.group_c() * g.padded_plane() : 0);
}

// x is (C/groups, H, W), one group of one image; returns its cols (C/groups*K*K, OH*OW). That is x
// itself for a 1 x 1 convolution with stride 1 and no padding (no copy); otherwise cols is built in
// scratch (im2col_scratch floats): the planes are first copied into zero-padded ones, so that every
// row of cols is OH runs of OW taps with no bounds to check. (Copying run by run from the unpadded
// planes, with a fill for the taps in the padding, was 25% of resnet8's fp32 inference: runs of 7 to
// 28 floats, three library calls each, and a scalar loop for stride 2.)
const float* im2col(const ConvGeometry& g, const float* x, float* scratch) {
  if (cols_are_input(g)) return x;
  const float* xp = x;
  if (g.padding > 0) {
    float* planes = scratch + g.rows() * g.cols();
    for (int64_t ci = 0; ci < g.group_c(); ++ci) pad_plane(g, x + ci * g.h * g.w, planes + ci * g.padded_plane());
    xp = planes;
  }
  const int64_t wp = g.w + 2 * g.padding;
  if (g.stride == 1)
    gather_taps<1>(g, xp, wp, scratch);
  else if (g.stride == 2)
    gather_taps<2>(g, xp, wp, scratch);
  else
    gather_taps<0>(g, xp, wp, scratch);
  return scratch;
}

// The adjoint of im2col: dx = 0, then each entry of cols is added onto the input pixel it came
// from. cols is (C/groups*K*K, OH*OW); dx is (C/groups, H, W), one group of one image.
void col2im(const ConvGeometry& g, const float* cols, float* dx) {
  std::fill_n(dx, g.group_c() * g.h * g.w, 0.f);
  for (int64_t row = 0; row < g.rows(); ++row) {
    const int64_t ci = row / (g.k * g.k), ki = (row / g.k) % g.k, kj = row % g.k;
    const auto [lo, hi] = inside_columns(g, kj);
    const float* src = cols + row * g.cols();
    for (int64_t oy = 0; oy < g.oh; ++oy, src += g.ow) {
      const int64_t iy = oy * g.stride - g.padding + ki;
      if (iy < 0 || iy >= g.h) continue;
      float* dst = dx + (ci * g.h + iy) * g.w;
      if (g.stride == 1) {  // one run: the same additions, written so that they vectorise
        float* run = dst + kj - g.padding;
        for (int64_t ox = lo; ox < hi; ++ox) run[ox] += src[ox];
      } else {
        for (int64_t ox = lo; ox < hi; ++ox) dst[ox * g.stride + kj - g.padding] += src[ox];
      }
    }
  }
}

// xp is one padded plane, w is (K, K); y (OH, OW) += the convolution.
void depthwise_forward(const ConvGeometry& g, const float* xp, const float* w, float* __restrict y) {
  const int64_t wp = g.w + 2 * g.padding;
  for (int64_t oy = 0; oy < g.oh; ++oy, y += g.ow)
    for (int64_t ki = 0; ki < g.k; ++ki)
      for (int64_t kj = 0; kj < g.k; ++kj) {
        const float* __restrict src = xp + (oy * g.stride + ki) * wp + kj;  // src[ox * stride]: tap (ki, kj) of ox
        const float wv = w[ki * g.k + kj];
        if (g.stride == 1)  // the same sums, written so that they vectorise
          for (int64_t ox = 0; ox < g.ow; ++ox) y[ox] += wv * src[ox];
        else
          for (int64_t ox = 0; ox < g.ow; ++ox) y[ox] += wv * src[ox * g.stride];
      }
}

// xp is one padded plane, w is (K, K), dy is (OH, OW); dw (K, K) += sum over pixels of dy * tap, and,
// if dxp is not null, the padded plane dxp += the adjoint of depthwise_forward. `partial` is scratch of
// K*K*OW floats: each tap's sum is kept per ox (so that it vectorises) and added up at the end.
void depthwise_backward(const ConvGeometry& g, const float* xp, const float* w, const float* __restrict dy, float* dw,
                        float* dxp, float* __restrict partial) {
  const int64_t wp = g.w + 2 * g.padding;
  std::fill_n(partial, g.k * g.k * g.ow, 0.f);
  for (int64_t oy = 0; oy < g.oh; ++oy, dy += g.ow)
    for (int64_t ki = 0; ki < g.k; ++ki)
      for (int64_t kj = 0; kj < g.k; ++kj) {
        const int64_t at = (oy * g.stride + ki) * wp + kj;  // [at + ox * stride]: tap (ki, kj) of ox
        const float* __restrict src = xp + at;
        float* __restrict part = partial + (ki * g.k + kj) * g.ow;
        float* __restrict dst = dxp == nullptr ? nullptr : dxp + at;
        const float wv = w[ki * g.k + kj];
        if (g.stride == 1) {  // the same sums, written so that they vectorise
          for (int64_t ox = 0; ox < g.ow; ++ox) part[ox] += dy[ox] * src[ox];
          if (dxp != nullptr)
            for (int64_t ox = 0; ox < g.ow; ++ox) dst[ox] += wv * dy[ox];
        } else {
          for (int64_t ox = 0; ox < g.ow; ++ox) part[ox] += dy[ox] * src[ox * g.stride];
          if (dxp != nullptr)
            for (int64_t ox = 0; ox < g.ow; ++ox) dst[ox * g.stride] += wv * dy[ox];
        }
      }
  for (int64_t tap = 0; tap < g.k * g.k; ++tap)
    for (int64_t ox = 0; ox < g.ow; ++ox) dw[tap] += partial[tap * g.ow + ox];
}
}  // namespace

namespace {
// The checks of conv2d's arguments; returns the geometry (OH, OW set).
ConvGeometry conv_geometry(const Tensor& x, const Tensor& w, const Tensor& b, int64_t stride, int64_t padding,
                           int64_t groups) {
  check_rank(x, 4, "conv2d", "input");
  check_rank(w, 4, "conv2d", "weight");
  if (groups < 1 || x.size(1) % groups != 0 || w.size(0) % groups != 0)
    fail("conv2d: groups {} must divide the input channels of {} and the output channels of weight {}", groups,
         shape_str(x.shape()), shape_str(w.shape()));
  if (w.size(1) != x.size(1) / groups || w.size(2) != w.size(3))
    fail("conv2d: weight {} does not fit input {} with groups {} (expected (OUT, {}, K, K))", shape_str(w.shape()),
         shape_str(x.shape()), groups, x.size(1) / groups);
  if (b.defined() && (b.dim() != 1 || b.size(0) != w.size(0)))
    fail("conv2d: bias {} does not fit weight {}", shape_str(b.shape()), shape_str(w.shape()));
  if (stride < 1 || padding < 0) fail("conv2d: stride must be >= 1 and padding >= 0");
  ConvGeometry g{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), stride, padding, groups, 0, 0};
  if (g.h + 2 * padding < g.k || g.w + 2 * padding < g.k)
    fail("conv2d: kernel {} is larger than the padded input {}", g.k, shape_str(x.shape()));
  g.oh = (g.h + 2 * padding - g.k) / stride + 1;
  g.ow = (g.w + 2 * padding - g.k) / stride + 1;
  return g;
}

// conv2d's forward, y (N, OUT, OH, OW) = the convolution + b, image by image; then finish(y[n]) on each
// image's output while it is still in cache (conv2d_batch_norm normalises it there).
template <typename Finish>
void conv2d_forward(const ConvGeometry& g, const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y,
                    Finish finish) {
  const int64_t x_group = g.group_c() * g.h * g.w, y_group = g.group_out() * g.cols(),
                w_group = g.group_out() * g.rows();
  // Stride 1, K > 1, one group: straight from the padded planes where the CPU has AVX-512 (core/conv_direct.h).
  const detail::DirectConvShape direct{g.c, g.h, g.w, g.out, g.k, g.padding};
  const bool use_direct = g.groups == 1 && g.stride == 1 && g.k > 1 && detail::direct_conv_pays(direct);
  const std::vector<float> packed = use_direct ? detail::pack_direct_weights(w.data(), direct) : std::vector<float>();
  for_each_slice(g.n, [&](int64_t first, int64_t last, int) {
    Tensor scratch = Tensor::empty(  // xp, or conv_direct's, or im2col's
        {g.depthwise()       ? g.padded_plane()
         : use_direct        ? detail::direct_conv_scratch(direct)
         : cols_are_input(g) ? 0
                             : im2col_scratch(g)});
    for (int64_t n = first; n < last; ++n) {
      float* yn = y.data() + n * g.out * g.cols();
      if (use_direct) {
        detail::conv_direct(x.data() + n * g.c * g.h * g.w, packed, b.defined() ? b.data() : nullptr, yn, direct,
                            scratch.data());
        finish(yn);
        continue;
      }
      if (b.defined() || g.depthwise())  // y[n] = b (or 0), then y[n] += w cols
        for (int64_t o = 0; o < g.out; ++o) std::fill_n(yn + o * g.cols(), g.cols(), b.defined() ? b.data()[o] : 0.f);
      for (int64_t gi = 0; gi < g.groups; ++gi) {
        const float* xg = x.data() + (n * g.groups + gi) * x_group;
        if (g.depthwise()) {
          pad_plane(g, xg, scratch.data());
          for (int64_t o = 0; o < g.group_out(); ++o)
            if (detail::depthwise_direct_runs(g.stride))
              detail::depthwise_direct(scratch.data(), g.w + 2 * g.padding,
                                       w.data() + (gi * g.group_out() + o) * g.rows(), g.k, g.stride,
                                       yn + gi * y_group + o * g.cols(), g.oh, g.ow);
            else
              depthwise_forward(g, scratch.data(), w.data() + (gi * g.group_out() + o) * g.rows(),
                                yn + gi * y_group + o * g.cols());
          continue;
        }
        const float* cols = im2col(g, xg, scratch.data());
        sgemm(false, false, g.group_out(), g.cols(), g.rows(), w.data() + gi * w_group, g.rows(), cols, g.cols(),
              yn + gi * y_group, g.cols(), b.defined() ? 1.f : 0.f);
      }
      finish(yn);
    }
  });
}
}  // namespace

Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int64_t stride, int64_t padding, int64_t groups) {
  const ConvGeometry g = conv_geometry(x, w, b, stride, padding, groups);
  Tensor y = Tensor::empty({g.n, g.out, g.oh, g.ow});
  conv2d_forward(g, x, w, b, y, [](float*) {});

  return record(
      y, "conv2d", {x, w, b},
      [g, x = x.detach(), w = w.detach(), has_bias = b.defined(), need_dx = x.requires_grad()](const Tensor& dy) {
        const int64_t x_group = g.group_c() * g.h * g.w, y_group = g.group_out() * g.cols();
        const int64_t w_group = g.group_out() * g.rows();
        Tensor dx = need_dx ? Tensor::empty(x.shape()) : Tensor();
        // With stride 1, dx is itself a stride-1 convolution: of dy, padded by K − 1 − padding, with the weights
        // transposed (OUT <-> C) and turned by 180 degrees, w_t[ci][o][ki][kj] = w[o][ci][K−1−ki][K−1−kj].
        const detail::DirectConvShape dx_shape{g.out, g.oh, g.ow, g.c, g.k, g.k - 1 - g.padding};
        const bool dx_direct = need_dx && g.groups == 1 && g.stride == 1 && g.k > 1 && g.padding <= g.k - 1 &&
                               detail::direct_conv_pays(dx_shape);
        std::vector<float> w_turned;
        if (dx_direct) {
          const int64_t taps = g.k * g.k;
          std::vector<float> turned(static_cast<size_t>(w.numel()));
          for (int64_t o = 0; o < g.out; ++o)
            for (int64_t ci = 0; ci < g.c; ++ci)
              for (int64_t t = 0; t < taps; ++t)
                turned[static_cast<size_t>((ci * g.out + o) * taps + t)] =
                    w.data()[(o * g.c + ci) * taps + taps - 1 - t];
          w_turned = detail::pack_direct_weights(turned.data(), dx_shape);
        }
        // dw without im2col too (K = 3 and 5), summed per slice in dw_t (transposed) and added to dw at its end.
        const detail::DirectConvShape dw_shape{g.c, g.h, g.w, g.out, g.k, g.padding};
        const bool dw_direct = g.groups == 1 && g.stride == 1 && detail::direct_dw_pays(dw_shape);
        std::vector<Tensor> dw_part(static_cast<size_t>(slice_count(g.n)));
        std::vector<std::vector<LaneSum>> db_part(dw_part.size(), std::vector<LaneSum>(has_bias ? g.out : 0));
        for_each_slice(g.n, [&](int64_t first, int64_t last, int slice) {
          const bool no_cols = g.depthwise() || (dw_direct && (dx_direct || !need_dx));
          Tensor scratch = Tensor::empty({no_cols ? 0 : im2col_scratch(g)});  // im2col's, then dcols
          Tensor planes =
              Tensor::empty({g.depthwise() ? 2 * g.padded_plane() + g.k * g.k * g.ow  // xp, dxp, partial
                                           : std::max(dx_direct ? detail::direct_conv_scratch(dx_shape) : 0,
                                                      dw_direct ? detail::direct_dw_scratch(dw_shape) : 0)});
          Tensor dw_t = dw_direct ? Tensor::zeros({detail::direct_dw_size(dw_shape)}) : Tensor();
          Tensor& dw = dw_part[static_cast<size_t>(slice)] = Tensor::zeros(w.shape());
          std::vector<LaneSum>& db = db_part[static_cast<size_t>(slice)];
          for (int64_t n = first; n < last; ++n) {
            const float* dyn = dy.data() + n * g.out * g.cols();
            for (int64_t o = 0; o < static_cast<int64_t>(db.size()); ++o)
              db[static_cast<size_t>(o)].add(dyn + o * g.cols(), g.cols(), [](float v) { return v; });
            for (int64_t gi = 0; gi < g.groups; ++gi) {
              const float* xg = x.data() + (n * g.groups + gi) * x_group;
              float* dxg = need_dx ? dx.data() + (n * g.groups + gi) * x_group : nullptr;
              if (g.depthwise()) {
                float *xp = planes.data(), *dxp = xp + g.padded_plane(), *partial = dxp + g.padded_plane();
                pad_plane(g, xg, xp);
                std::fill_n(dxp, g.padded_plane(), 0.f);
                for (int64_t o = gi * g.group_out(); o < (gi + 1) * g.group_out(); ++o)
                  depthwise_backward(g, xp, w.data() + o * g.rows(), dyn + o * g.cols(), dw.data() + o * g.rows(),
                                     need_dx ? dxp : nullptr, partial);
                if (need_dx)  // the inside of the padded plane
                  for (int64_t iy = 0; iy < g.h; ++iy)
                    std::copy_n(dxp + (iy + g.padding) * (g.w + 2 * g.padding) + g.padding, g.w, dxg + iy * g.w);
                continue;
              }
              if (dw_direct) {
                detail::conv_direct_dw(xg, dyn, dw_t.data(), dw_shape, planes.data());
              } else {
                const float* cols = im2col(g, xg, scratch.data());  // dw_gi += dy[n]_gi cols^T
                sgemm(false, true, g.group_out(), g.rows(), g.cols(), dyn + gi * y_group, g.cols(), cols, g.cols(),
                      dw.data() + gi * w_group, g.rows(), 1.f);
              }
              if (dx_direct) {
                detail::conv_direct(dyn, w_turned, nullptr, dxg, dx_shape, planes.data());
                continue;
              }
              if (!need_dx) continue;  // dcols = w_gi^T dy[n]_gi;  dx[n]_gi = col2im(dcols)
              sgemm(true, false, g.rows(), g.cols(), g.group_out(), w.data() + gi * w_group, g.rows(),
                    dyn + gi * y_group, g.cols(), scratch.data(), g.cols(), 0.f);
              col2im(g, scratch.data(), dxg);
            }
          }
          if (dw_direct) detail::add_direct_dw(dw_t.data(), dw.data(), dw_shape);
        });
        Tensor dw = dw_part[0];
        for (size_t s = 1; s < dw_part.size(); ++s)
          for (int64_t i = 0; i < dw.numel(); ++i) dw.data()[i] += dw_part[s].data()[i];
        Tensor db;
        if (has_bias) {
          db = Tensor::empty({g.out});
          for (int64_t o = 0; o < g.out; ++o) {
            double acc = 0;
            for (const auto& part : db_part) acc += part[static_cast<size_t>(o)].total();
            db.data()[o] = static_cast<float>(acc);
          }
        }
        return std::vector<Tensor>{dx, dw, db};
      });
}

// =============================================================================================
// 9. max_pool2d, avg_pool2d, global_avg_pool2d
//
// With padding p, window (oy, ox) covers input rows oy * stride - p + ki for ki in [0, K), and
// likewise columns. Taps in the padding are skipped by the max (as if -infinity) and count as
// zeros in the average, which always divides by K*K (PyTorch's count_include_pad = True).

namespace {
struct PoolGeometry {
  int64_t n, c, h, w, k, stride, padding, oh, ow;
};
PoolGeometry pool_geometry(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding, const char* op) {
  check_rank(x, 4, op, "input");
  if (kernel < 1 || stride < 1) fail("{}: kernel and stride must be >= 1", op);
  if (padding < 0 || 2 * padding > kernel)
    fail("{}: padding {} must be in [0, kernel / 2] (kernel {}), so every window holds an input pixel", op, padding,
         kernel);
  if (x.size(2) + 2 * padding < kernel || x.size(3) + 2 * padding < kernel)
    fail("{}: kernel {} is larger than the padded input {}", op, kernel, shape_str(x.shape()));
  return {x.size(0),
          x.size(1),
          x.size(2),
          x.size(3),
          kernel,
          stride,
          padding,
          (x.size(2) + 2 * padding - kernel) / stride + 1,
          (x.size(3) + 2 * padding - kernel) / stride + 1};
}

// The taps [first, last) of the window at output position o that fall inside an input of `size` pixels.
std::pair<int64_t, int64_t> inside_taps(const PoolGeometry& g, int64_t o, int64_t size) {
  const int64_t start = o * g.stride - g.padding;
  return {std::max<int64_t>(0, -start), std::min(g.k, size - start)};
}

bool is_2x2(const PoolGeometry& g) { return g.k == 2 && g.stride == 2 && g.padding == 0; }

// Window 2 x 2, stride 2, no padding (is_2x2): the common case, the same results as max_pool_windows
// (the taps in the same order, the first maximum wins) without branches.
void max_pool_2x2(const PoolGeometry& g, const float* px, float* py, int32_t* parg) {
  parallel_for(g.n * g.c, num_threads(), [&](int64_t plane) {
    for (int64_t oy = 0; oy < g.oh; ++oy) {
      const int64_t top = 2 * oy * g.w;  // index of tap (0, 0) of window (oy, 0) within the plane
      const float* __restrict r0 = px + plane * g.h * g.w + top;
      const float* __restrict r1 = r0 + g.w;
      float* __restrict out = py + (plane * g.oh + oy) * g.ow;
      int32_t* __restrict arg = parg + (plane * g.oh + oy) * g.ow;
      for (int64_t ox = 0; ox < g.ow; ++ox) {
        float best = r0[2 * ox];
        int32_t tap = 0;  // 0..3: row tap >> 1, column tap & 1
        tap = r0[2 * ox + 1] > best ? 1 : tap, best = std::max(best, r0[2 * ox + 1]);
        tap = r1[2 * ox] > best ? 2 : tap, best = std::max(best, r1[2 * ox]);
        tap = r1[2 * ox + 1] > best ? 3 : tap, best = std::max(best, r1[2 * ox + 1]);
        out[ox] = best;
        arg[ox] = static_cast<int32_t>(top + 2 * ox) + (tap & 1) + (tap >> 1) * static_cast<int32_t>(g.w);
      }
    }
  });
}

// max_pool_2x2 when no graph is recorded (inference): the maxima only, in two passes per plane that the
// compiler vectorises for each clone's instruction set: the maxima of the row pairs, (OH, W), then of adjacent
// columns, which over a whole plane are OH·OW outputs from consecutive pairs (one row of 14 outputs would
// leave most of each vector to a scalar tail).
__attribute__((target_clones("avx512f", "avx2", "default"))) void max_pool_2x2_values(const PoolGeometry& g,
                                                                                      const float* px, float* py) {
#pragma omp parallel
  {
    std::vector<float> rows(static_cast<size_t>(g.oh * g.w));
#pragma omp for
    for (int64_t plane = 0; plane < g.n * g.c; ++plane) {
      float* __restrict v = rows.data();
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        const float* __restrict r0 = px + plane * g.h * g.w + 2 * oy * g.w;
        const float* __restrict r1 = r0 + g.w;
        for (int64_t x = 0; x < g.w; ++x) v[oy * g.w + x] = std::max(r0[x], r1[x]);
      }
      float* __restrict out = py + plane * g.oh * g.ow;
      if (g.w == 2 * g.ow) {  // even width: output j reads v[2j] and v[2j + 1]
        for (int64_t j = 0; j < g.oh * g.ow; ++j) out[j] = std::max(v[2 * j], v[2 * j + 1]);
      } else {  // odd width: each row's last column belongs to no window
        for (int64_t oy = 0; oy < g.oh; ++oy)
          for (int64_t ox = 0; ox < g.ow; ++ox)
            out[oy * g.ow + ox] = std::max(v[oy * g.w + 2 * ox], v[oy * g.w + 2 * ox + 1]);
      }
    }
  }
}

// Any window, stride and padding; parg gets each maximum's index within its plane.
void max_pool_windows(const PoolGeometry& g, const float* px, float* py, int32_t* parg) {
  parallel_for(g.n * g.c, num_threads(), [&](int64_t plane) {
    const float* src = px + plane * g.h * g.w;
    for (int64_t oy = 0; oy < g.oh; ++oy) {
      const auto [ki0, ki1] = inside_taps(g, oy, g.h);
      for (int64_t ox = 0; ox < g.ow; ++ox) {
        const auto [kj0, kj1] = inside_taps(g, ox, g.w);
        const int64_t corner = (oy * g.stride - g.padding) * g.w + ox * g.stride - g.padding;  // tap (0, 0)
        int64_t best = corner + ki0 * g.w + kj0;
        float best_value = src[best];
        for (int64_t ki = ki0; ki < ki1; ++ki)
          for (int64_t kj = kj0; kj < kj1; ++kj) {
            const int64_t i = corner + ki * g.w + kj;
            if (src[i] > best_value) best = i, best_value = src[i];  // first maximum wins ties
          }
        const int64_t o = (plane * g.oh + oy) * g.ow + ox;
        py[o] = best_value;
        parg[o] = static_cast<int32_t>(best);
      }
    }
  });
}
}  // namespace

Tensor max_pool2d(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding) {
  const PoolGeometry g = pool_geometry(x, kernel, stride, padding, "max_pool2d");
  Tensor y = Tensor::empty({g.n, g.c, g.oh, g.ow});
  if (is_2x2(g) && !(grad_enabled() && x.requires_grad())) {  // nothing to differentiate: no argmax
    max_pool_2x2_values(g, x.data(), y.data());
    return y;
  }
  auto argmax = std::make_shared<std::vector<int32_t>>(static_cast<size_t>(y.numel()));  // index within the plane
  if (is_2x2(g))
    max_pool_2x2(g, x.data(), y.data(), argmax->data());
  else
    max_pool_windows(g, x.data(), y.data(), argmax->data());
  return record(y, "max_pool2d", {x}, [g, argmax](const Tensor& dy) {
    const int64_t per_plane = g.oh * g.ow;
    const float* pdy = dy.data();
    const int32_t* parg = argmax->data();
    // Each plane is zeroed while it is in the cache (not all of dx first), then dy is added at its
    // windows' maxima.
    Tensor dx = Tensor::empty({g.n, g.c, g.h, g.w});
    float* pdx = dx.data();
    parallel_for(g.n * g.c, num_threads(), [&](int64_t plane) {
      float* dp = pdx + plane * g.h * g.w;
      std::fill_n(dp, g.h * g.w, 0.f);
      for (int64_t i = plane * per_plane; i < (plane + 1) * per_plane; ++i) dp[parg[i]] += pdy[i];
    });
    return std::vector<Tensor>{dx};
  });
}

Tensor avg_pool2d(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding) {
  const PoolGeometry g = pool_geometry(x, kernel, stride, padding, "avg_pool2d");
  const float inv = 1.f / static_cast<float>(g.k * g.k);
  Tensor y = Tensor::empty({g.n, g.c, g.oh, g.ow});
  parallel_for(g.n * g.c, num_threads(), [&](int64_t plane) {
    const float* src = x.data() + plane * g.h * g.w;
    for (int64_t oy = 0; oy < g.oh; ++oy) {
      const auto [ki0, ki1] = inside_taps(g, oy, g.h);
      for (int64_t ox = 0; ox < g.ow; ++ox) {
        const auto [kj0, kj1] = inside_taps(g, ox, g.w);
        const int64_t corner = (oy * g.stride - g.padding) * g.w + ox * g.stride - g.padding;  // tap (0, 0)
        float acc = 0.f;
        for (int64_t ki = ki0; ki < ki1; ++ki)
          for (int64_t kj = kj0; kj < kj1; ++kj) acc += src[corner + ki * g.w + kj];
        y.data()[(plane * g.oh + oy) * g.ow + ox] = acc * inv;
      }
    }
  });
  return record(y, "avg_pool2d", {x}, [g, inv](const Tensor& dy) {
    Tensor dx = Tensor::zeros({g.n, g.c, g.h, g.w});
    parallel_for(g.n * g.c, num_threads(), [&](int64_t plane) {
      float* dst = dx.data() + plane * g.h * g.w;
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        const auto [ki0, ki1] = inside_taps(g, oy, g.h);
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          const auto [kj0, kj1] = inside_taps(g, ox, g.w);
          const int64_t corner = (oy * g.stride - g.padding) * g.w + ox * g.stride - g.padding;
          const float share = dy.data()[(plane * g.oh + oy) * g.ow + ox] * inv;
          for (int64_t ki = ki0; ki < ki1; ++ki)
            for (int64_t kj = kj0; kj < kj1; ++kj) dst[corner + ki * g.w + kj] += share;
        }
      }
    });
    return std::vector<Tensor>{dx};
  });
}

// y[n][c] = mean of the plane x[n][c]; dx[n][c][i][j] = dy[n][c] / (H*W). A primitive rather than
// reshape + mean + reshape: one pass each way, which measured 6-7x faster than that composite on
// (64, 64, 7, 7) and (64, 256, 7, 7) (forward + backward, one thread).
Tensor global_avg_pool2d(const Tensor& x) {
  check_rank(x, 4, "global_avg_pool2d", "input");
  const int64_t planes = x.size(0) * x.size(1), hw = x.size(2) * x.size(3);
  if (hw == 0) fail("global_avg_pool2d: input {} has no pixels", shape_str(x.shape()));
  const float inv = 1.f / static_cast<float>(hw);
  Tensor y = Tensor::empty({x.size(0), x.size(1), 1, 1});
  for (int64_t plane = 0; plane < planes; ++plane) {
    const float* src = x.data() + plane * hw;
    float acc = 0.f;
    for (int64_t i = 0; i < hw; ++i) acc += src[i];
    y.data()[plane] = acc * inv;
  }
  return record(y, "global_avg_pool2d", {x}, [shape = x.shape(), planes, hw, inv](const Tensor& dy) {
    Tensor dx = Tensor::empty(shape);
    for (int64_t plane = 0; plane < planes; ++plane) std::fill_n(dx.data() + plane * hw, hw, dy.data()[plane] * inv);
    return std::vector<Tensor>{dx};
  });
}

// =============================================================================================
// 10. batch_norm
//
// Per channel c over the m = N*H*W values x_i:  mu = mean(x_i), var = mean((x_i - mu)^2),
// xhat_i = (x_i - mu) / sqrt(var + eps),  y_i = gamma * xhat_i + beta.
// Backward (training, through the batch statistics), with g_i = dy_i * gamma:
//   dx_i = (1 / sqrt(var + eps)) * (g_i - mean(g) - xhat_i * mean(g * xhat)).
// The sums over the batch are LaneSums (at the top of this file).
//
// batch_norm_relu is relu(batch_norm(x)) in one op: y_i = max(0, gamma * xhat_i + beta), and the backward
// above runs on g_i = dy_i where that pre-activation is > 0, else 0 (ReLU's gradient). The pre-activation is
// recomputed from x with the forward's float operations, so the mask is ReLU's own, and values and gradients
// are those of the two ops bit for bit; the ReLU's pass over the activations, each way, is saved (on convbn,
// whose batch norms are followed by ReLUs, ReLU was about 8% of a training step).

namespace {
// One channel's statistics and affine parameters.
struct ChannelNorm {
  float mean, inv_std, gamma, beta;
};

// 1 / sqrt(var + eps) of a running variance (eval mode).
float running_inv_std(float var, float eps) { return static_cast<float>(1.0 / std::sqrt(double{var} + eps)); }

// One plane of the forward, y = gamma * ((x - mean) * inv_std) + beta, then max(y, 0) if relu; in place when
// y == x. batch_norm(_relu) and conv2d_batch_norm both run it, so they give the same bits.
void normalize_plane(const float* x, float* y, int64_t hw, ChannelNorm c, bool relu) {
  if (relu)
    for (int64_t j = 0; j < hw; ++j) {
      const float v = c.gamma * ((x[j] - c.mean) * c.inv_std) + c.beta;
      y[j] = v > 0.f ? v : 0.f;
    }
  else
    for (int64_t j = 0; j < hw; ++j) y[j] = c.gamma * ((x[j] - c.mean) * c.inv_std) + c.beta;
}

// The checks of batch norm's parameters against an input of `c` channels.
void check_norm_parameters(std::initializer_list<const Tensor*> parameters, int64_t c, const Tensor& x) {
  for (const Tensor* t : parameters)
    if (t->dim() != 1 || t->size(0) != c)
      fail("batch_norm: parameter of shape {} does not fit input {} (expected ({},))", shape_str(t->shape()),
           shape_str(x.shape()), c);
}

Tensor batch_norm_maybe_relu(const Tensor& x, const Tensor& gamma, const Tensor& beta, Tensor& running_mean,
                             Tensor& running_var, bool training, float momentum, float eps, bool relu) {
  if (x.dim() != 2 && x.dim() != 4)
    fail("batch_norm: input must be (N, C) or (N, C, H, W), got {}", shape_str(x.shape()));
  const int64_t n = x.size(0), c = x.size(1), hw = x.dim() == 4 ? x.size(2) * x.size(3) : 1;
  check_norm_parameters({&gamma, &beta, &running_mean, &running_var}, c, x);
  const int64_t m = n * hw;
  if (training && m < 2)
    fail("batch_norm: training needs more than one value per channel, got input {}", shape_str(x.shape()));

  // The channels are cut into one slice per thread. A slice reads the batch front to back, image by
  // image, its channels in order (channel by channel over all images read every plane from a new
  // place, and was twice as slow). Each channel's sums still add the planes in image order.
  const auto at = [hw, c](int64_t i, int64_t ch) { return (i * c + ch) * hw; };  // plane (i, ch)
  std::vector<float> mu(static_cast<size_t>(c)), inv_std(static_cast<size_t>(c));
  Tensor y = Tensor::empty(x.shape());
  for_each_slice(c, [&](int64_t c0, int64_t c1, int) {
    if (training) {
      std::vector<LaneSum> s(static_cast<size_t>(c1 - c0)), s2(s.size());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t ch = c0; ch < c1; ++ch) s[ch - c0].add(x.data() + at(i, ch), hw, [](float v) { return v; });
      for (int64_t ch = c0; ch < c1; ++ch) mu[ch] = static_cast<float>(s[ch - c0].total() / static_cast<double>(m));
      for (int64_t i = 0; i < n; ++i)
        for (int64_t ch = c0; ch < c1; ++ch)
          s2[ch - c0].add(x.data() + at(i, ch), hw, [m_c = mu[ch]](float v) { return (v - m_c) * (v - m_c); });
      for (int64_t ch = c0; ch < c1; ++ch) {
        const double mean_c = s[ch - c0].total() / static_cast<double>(m),
                     var_c = s2[ch - c0].total() / static_cast<double>(m);
        running_mean.data()[ch] = static_cast<float>((1 - momentum) * running_mean.data()[ch] + momentum * mean_c);
        running_var.data()[ch] =
            static_cast<float>((1 - momentum) * running_var.data()[ch] +
                               momentum * var_c * static_cast<double>(m) / static_cast<double>(m - 1));
        inv_std[ch] = static_cast<float>(1.0 / std::sqrt(var_c + eps));
      }
    } else {
      for (int64_t ch = c0; ch < c1; ++ch) {
        mu[ch] = running_mean.data()[ch];
        inv_std[ch] = running_inv_std(running_var.data()[ch], eps);
      }
    }
    // xhat = (x - mu) * inv_std is not kept: the backward recomputes it from x, the same float operations.
    for (int64_t i = 0; i < n; ++i)
      for (int64_t ch = c0; ch < c1; ++ch)
        normalize_plane(x.data() + at(i, ch), y.data() + at(i, ch), hw,
                        {mu[ch], inv_std[ch], gamma.data()[ch], beta.data()[ch]}, relu);
  });

  return record(y, relu ? "batch_norm_relu" : "batch_norm", {x, gamma, beta},
                [x = x.detach(), mu, inv_std, gamma = gamma.detach(), beta = beta.detach(), training, relu, n, c, hw, m,
                 at](const Tensor& dy) {
                  Tensor dx = Tensor::empty(x.shape()), dgamma = Tensor::zeros({c}), dbeta = Tensor::zeros({c});
                  for_each_slice(c, [&](int64_t c0, int64_t c1, int) {
                    std::vector<LaneSum> sum_dy(static_cast<size_t>(c1 - c0)), sum_dy_xhat(sum_dy.size());
                    std::vector<float> masked(relu ? static_cast<size_t>(hw) : 0);  // one plane of g
                    for (int64_t i = 0; i < n; ++i)
                      for (int64_t ch = c0; ch < c1; ++ch) {
                        const float m_c = mu[ch], s_c = inv_std[ch];
                        const float* g = dy.data() + at(i, ch);
                        const float* __restrict xi = x.data() + at(i, ch);
                        if (relu) {  // g = dy where the forward's pre-activation is > 0, else 0
                          const float g_c = gamma.data()[ch], b_c = beta.data()[ch];
                          const float* __restrict dyi = g;
                          for (int64_t j = 0; j < hw; ++j) {
                            const float d = dyi[j], v = xi[j];  // loaded unconditionally: the select vectorises
                            masked[static_cast<size_t>(j)] = g_c * ((v - m_c) * s_c) + b_c > 0.f ? d : 0.f;
                          }
                          g = masked.data();
                        }
                        sum_dy[ch - c0].add(g, hw, [](float v) { return v; });
                        sum_dy_xhat[ch - c0].add2(g, xi, hw,
                                                  [m_c, s_c](float d, float v) { return d * ((v - m_c) * s_c); });
                      }
                    std::vector<float> mean_g(sum_dy.size()), mean_g_xhat(sum_dy.size());
                    for (int64_t ch = c0; ch < c1; ++ch) {
                      const double sd = sum_dy[ch - c0].total(), sdx = sum_dy_xhat[ch - c0].total();
                      dgamma.data()[ch] = static_cast<float>(sdx);
                      dbeta.data()[ch] = static_cast<float>(sd);
                      const float g_c = gamma.data()[ch];
                      mean_g[ch - c0] = training ? static_cast<float>(g_c * sd / static_cast<double>(m)) : 0.f;
                      mean_g_xhat[ch - c0] = training ? static_cast<float>(g_c * sdx / static_cast<double>(m)) : 0.f;
                    }
                    for (int64_t i = 0; i < n; ++i)
                      for (int64_t ch = c0; ch < c1; ++ch) {
                        const float m_c = mu[ch], s_c = inv_std[ch], g_c = gamma.data()[ch], b_c = beta.data()[ch];
                        const float mg = mean_g[ch - c0], mgx = mean_g_xhat[ch - c0];
                        const float* __restrict xi = x.data() + at(i, ch);
                        const float* __restrict dyi = dy.data() + at(i, ch);
                        float* __restrict dxi = dx.data() + at(i, ch);
                        if (relu)
                          for (int64_t j = 0; j < hw; ++j) {
                            const float d = dyi[j], v = xi[j];  // loaded unconditionally: the select vectorises
                            const float g = g_c * ((v - m_c) * s_c) + b_c > 0.f ? d : 0.f;
                            dxi[j] = s_c * (g_c * g - mg - ((v - m_c) * s_c) * mgx);
                          }
                        else
                          for (int64_t j = 0; j < hw; ++j)
                            dxi[j] = s_c * (g_c * dyi[j] - mg - ((xi[j] - m_c) * s_c) * mgx);
                      }
                  });
                  return std::vector<Tensor>{dx, dgamma, dbeta};
                });
}
}  // namespace

Tensor batch_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, Tensor& running_mean, Tensor& running_var,
                  bool training, float momentum, float eps) {
  return batch_norm_maybe_relu(x, gamma, beta, running_mean, running_var, training, momentum, eps, false);
}

Tensor batch_norm_relu(const Tensor& x, const Tensor& gamma, const Tensor& beta, Tensor& running_mean,
                       Tensor& running_var, bool training, float momentum, float eps) {
  return batch_norm_maybe_relu(x, gamma, beta, running_mean, running_var, training, momentum, eps, true);
}

Tensor conv2d_batch_norm(const Tensor& x, const Tensor& w, const Tensor& b, int64_t stride, int64_t padding,
                         int64_t groups, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                         const Tensor& running_var, float eps, bool relu) {
  if (grad_enabled())
    for (const Tensor* t : {&x, &w, &b, &gamma, &beta})
      if (t->defined() && t->requires_grad())
        fail("conv2d_batch_norm: computes no gradient, but an input requires one (run it under NoGradGuard)");
  const ConvGeometry g = conv_geometry(x, w, b, stride, padding, groups);
  Tensor y = Tensor::empty({g.n, g.out, g.oh, g.ow});
  check_norm_parameters({&gamma, &beta, &running_mean, &running_var}, g.out, y);
  std::vector<ChannelNorm> norms;
  for (int64_t o = 0; o < g.out; ++o)
    norms.push_back(
        {running_mean.data()[o], running_inv_std(running_var.data()[o], eps), gamma.data()[o], beta.data()[o]});
  conv2d_forward(g, x, w, b, y, [&](float* yn) {
    for (int64_t o = 0; o < g.out; ++o) normalize_plane(yn + o * g.cols(), yn + o * g.cols(), g.cols(), norms[o], relu);
  });
  return y;
}

// =============================================================================================
// 11. dropout

Tensor dropout(const Tensor& x, float p, bool training, Rng& rng) {
  if (!(p >= 0.f && p < 1.f)) fail("dropout: p must be in [0, 1), got {}", p);
  if (!training || p == 0.f) return x;
  auto mask = std::make_shared<std::vector<float>>(static_cast<size_t>(x.numel()));
  const float keep_scale = 1.f / (1.f - p);
  for (float& m : *mask) m = rng.uniform() < p ? 0.f : keep_scale;
  Tensor y = Tensor::empty(x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) y.data()[i] = x.data()[i] * (*mask)[static_cast<size_t>(i)];
  return record(y, "dropout", {x}, [mask](const Tensor& dy) {
    Tensor dx = Tensor::empty(dy.shape());
    for (int64_t i = 0; i < dy.numel(); ++i) dx.data()[i] = dy.data()[i] * (*mask)[static_cast<size_t>(i)];
    return std::vector<Tensor>{dx};
  });
}

// =============================================================================================
// 12. log_softmax: y_j = x_j - max - log(sum_k exp(x_k - max));  dx_j = dy_j - exp(y_j) * sum_k dy_k

namespace {
Tensor log_softmax_values(const Tensor& x) {
  const int64_t n = x.size(0), k = x.size(1);
  Tensor y = Tensor::empty(x.shape());
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x.data() + i * k;
    const float mx = *std::max_element(row, row + k);
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += std::exp(static_cast<double>(row[j] - mx));
    const float log_s = static_cast<float>(std::log(s));  // subtract mx first: mx + log_s would round at large mx
    for (int64_t j = 0; j < k; ++j) y.data()[i * k + j] = (row[j] - mx) - log_s;
  }
  return y;
}
}  // namespace

Tensor log_softmax(const Tensor& x) {
  check_rank(x, 2, "log_softmax", "input");
  Tensor y = log_softmax_values(x);
  return record(y, "log_softmax", {x}, [y = y.detach()](const Tensor& dy) {
    const int64_t n = y.size(0), k = y.size(1);
    Tensor dx = Tensor::empty(y.shape());
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t j = 0; j < k; ++j) s += dy.data()[i * k + j];
      for (int64_t j = 0; j < k; ++j)
        dx.data()[i * k + j] = dy.data()[i * k + j] - std::exp(y.data()[i * k + j]) * static_cast<float>(s);
    }
    return std::vector<Tensor>{dx};
  });
}

// =============================================================================================
// 13. cross_entropy: loss = -(1/N) sum_i log_softmax(x)_i[label_i];  dx = (softmax(x) - onehot) / N

Tensor cross_entropy(const Tensor& logits, std::span<const int32_t> labels) {
  check_rank(logits, 2, "cross_entropy", "logits");
  const int64_t n = logits.size(0), k = logits.size(1);
  if (static_cast<int64_t>(labels.size()) != n)
    fail("cross_entropy: {} labels for logits of shape {}", labels.size(), shape_str(logits.shape()));
  for (int32_t label : labels)
    if (label < 0 || label >= k) fail("cross_entropy: label {} is out of range [0, {})", label, k);
  Tensor logp = log_softmax_values(logits);
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total -= logp.data()[i * k + labels[static_cast<size_t>(i)]];
  Tensor loss = Tensor::scalar(static_cast<float>(total / static_cast<double>(std::max<int64_t>(n, 1))));
  return record(loss, "cross_entropy", {logits},
                [logp, labels = std::vector<int32_t>(labels.begin(), labels.end()), n, k](const Tensor& g) {
                  Tensor dx = Tensor::empty(logp.shape());
                  const float scale = g.item() / static_cast<float>(n);
                  for (int64_t i = 0; i < n; ++i)
                    for (int64_t j = 0; j < k; ++j)
                      dx.data()[i * k + j] =
                          (std::exp(logp.data()[i * k + j]) - (j == labels[static_cast<size_t>(i)] ? 1.f : 0.f)) *
                          scale;
                  return std::vector<Tensor>{dx};
                });
}

}  // namespace lowbit::ops
