// The primitive differentiable ops of lowbit: each has a forward and a backward, side by side
// in core/ops.cpp, in the order of this list. Everything else (Linear, flatten, ...) is built from them.
//
//   1. add, sub, mul, div          elementwise with numpy broadcasting (row vector, per-channel vector)
//   2. neg, add_scalar, mul_scalar
//   3. matmul                      2-D, optional transposes, OpenBLAS cblas_sgemm
//   4. sum, mean                   over everything, or along one axis
//   5. relu, clamp, exp, log       clamp(x, 0, 6) is ReLU6; add_relu is relu(add(a, b)) as one op
//   6. reshape                     (flatten is reshape to (N, -1))
//   7. transpose, concat           transpose 2-D; concat along any axis
//   8. conv2d                      NCHW, square kernel, stride, zero padding, optional bias, groups
//                                  (grouped, depthwise); im2col + sgemm per group, depthwise by direct loops,
//                                  stride 1 with AVX-512 from zero-padded planes (core/conv_direct.h)
//   9. max_pool2d, avg_pool2d,     square window, stride, zero padding (never the max; counted in the average);
//      global_avg_pool2d           the mean of each plane, (N, C, H, W) -> (N, C, 1, 1)
//  10. batch_norm(_relu)           per channel (dim 1); batch statistics in training, running ones in eval;
//      conv2d_batch_norm           conv2d + eval batch norm (+ ReLU) as one pass, for inference
//  11. dropout                     seeded; identity in eval
//  12. log_softmax                 along the last axis of a 2-D tensor
//  13. cross_entropy               fused log-softmax + negative log-likelihood, mean over the batch
//
// Shape letters, the same in every kernel comment: N batch, C channels in, OUT channels/features out, IN features in,
// H, W height and width, K kernel size.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace lowbit::ops {

// 1.
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
// 2.
Tensor neg(const Tensor& a);
Tensor add_scalar(const Tensor& a, float s);
Tensor mul_scalar(const Tensor& a, float s);
// 3. a is (M, K) (or (K, M) if trans_a), b is (K, N) (or (N, K) if trans_b); result is (M, N).
Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false);
// 4.
Tensor sum(const Tensor& a);
Tensor sum(const Tensor& a, int64_t axis, bool keepdim = false);
Tensor mean(const Tensor& a);
Tensor mean(const Tensor& a, int64_t axis, bool keepdim = false);
// 5.
Tensor relu(const Tensor& a);
// relu(add(a, b)) as one op, broadcasting as add: the same values and gradients bit for bit, one pass over the
// data less each way (nn::run_nodes runs an Add whose output only a ReLU reads with it).
Tensor add_relu(const Tensor& a, const Tensor& b);
// min(max(a, lo), hi); the gradient passes where lo < a < hi (0 at lo and hi, as PyTorch's hardtanh).
Tensor clamp(const Tensor& a, float lo, float hi);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
// 6.
Tensor reshape(const Tensor& a, const Shape& shape);  // one dim may be -1
Tensor flatten(const Tensor& a);                      // (N, ...) -> (N, rest)
// 7.
Tensor transpose(const Tensor& a);
// The parts joined along `axis`; their shapes agree everywhere else. (N, C_i, H, W) -> (N, sum C_i, H, W).
Tensor concat(const std::vector<Tensor>& parts, int64_t axis);
// 8. x is (N, C, H, W), w is (OUT, C / groups, K, K), b is (OUT) or undefined; y is (N, OUT, OH, OW)
// with OH = (H + 2 * padding - K) / stride + 1 (OW likewise). groups divides C and OUT; output channel o
// sees input channels [gi * C / groups, (gi + 1) * C / groups) of its group gi = o / (OUT / groups).
Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& b, int64_t stride = 1, int64_t padding = 0,
              int64_t groups = 1);
// 9. x is (N, C, H, W); y is (N, C, OH, OW), OH = (H + 2 * padding - K) / stride + 1 (OW likewise);
// padding <= K / 2. The average always divides by K * K (PyTorch's count_include_pad = True).
Tensor max_pool2d(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding = 0);
Tensor avg_pool2d(const Tensor& x, int64_t kernel, int64_t stride, int64_t padding = 0);
// x is (N, C, H, W); y is (N, C, 1, 1), the mean of each plane (PyTorch's AdaptiveAvgPool2d(1)).
Tensor global_avg_pool2d(const Tensor& x);
// 10. x is (N, C, H, W) or (N, C); gamma, beta, running_mean, running_var are (C).
// In training mode the running statistics are updated in place:
// running = (1 - momentum) * running + momentum * batch (unbiased variance, as PyTorch).
Tensor batch_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, Tensor& running_mean, Tensor& running_var,
                  bool training, float momentum = 0.1f, float eps = 1e-5f);
// relu(batch_norm(...)) as one op: the same values and gradients bit for bit, one pass over the data less each way
// (nn::run_nodes runs a BatchNorm2d whose output only a ReLU reads with it).
Tensor batch_norm_relu(const Tensor& x, const Tensor& gamma, const Tensor& beta, Tensor& running_mean,
                       Tensor& running_var, bool training, float momentum = 0.1f, float eps = 1e-5f);
// Inference only (it records no gradient): batch_norm(_relu)(conv2d(x, w, b, ...), ..., training = false), with
// each image's batch norm done while its conv output is in cache: the same float operations as the two ops, so
// the same bits, and one pass over the activations less (nn::run_nodes runs an eval-mode Conv2d -> BatchNorm2d
// (-> ReLU) with it when no gradient is wanted).
Tensor conv2d_batch_norm(const Tensor& x, const Tensor& w, const Tensor& b, int64_t stride, int64_t padding,
                         int64_t groups, const Tensor& gamma, const Tensor& beta, const Tensor& running_mean,
                         const Tensor& running_var, float eps, bool relu);
// 11. Zeroes each value with probability p and scales the rest by 1 / (1 - p).
Tensor dropout(const Tensor& x, float p, bool training, Rng& rng = global_rng());
// 12. x is (N, OUT).
Tensor log_softmax(const Tensor& x);
// 13. logits is (N, OUT), labels has N entries in [0, OUT); the mean loss, a scalar.
Tensor cross_entropy(const Tensor& logits, std::span<const int32_t> labels);

}  // namespace lowbit::ops

namespace lowbit {
inline Tensor operator+(const Tensor& a, const Tensor& b) { return ops::add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return ops::sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return ops::mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return ops::div(a, b); }
inline Tensor operator-(const Tensor& a) { return ops::neg(a); }
inline Tensor operator*(const Tensor& a, float s) { return ops::mul_scalar(a, s); }
inline Tensor operator+(const Tensor& a, float s) { return ops::add_scalar(a, s); }
}  // namespace lowbit
