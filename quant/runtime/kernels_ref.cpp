// Reference integer kernels: plain loops that define what every fast kernel must compute, bit for bit.
#include <algorithm>
#include <cstring>

#include "core/parallel.h"
#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/requantize.h"

namespace lowbit::quant::runtime {

namespace {

// x is (N, IN), w is (OUT, IN) of `bits`, b is (OUT); y is (N, OUT). docs/quantization.md eq. 5.
void qgemm_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, int bits,
               std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads) {
  parallel_for(n, threads, [&](int64_t i) {
    for (int64_t o = 0; o < out; ++o) {
      int32_t acc = b[o];
      for (int64_t k = 0; k < in; ++k) acc += weight_code(w, bits, in, o, k) * (x[i * in + k] - x_zero_point);
      y[i * out + o] = acc;
    }
  });
}

// dst[0, k) = src[0, k). For the usual kernel sides a fixed-length copy beats a call to memmove.
template <size_t kLength>
inline void copy_fixed(const int8_t* src, int8_t* dst) {
  std::memcpy(dst, src, kLength);  // a constant length compiles to one or two moves
}
inline void copy_codes(const int8_t* src, int64_t k, int8_t* dst) {
  switch (k) {
    case 1:
      return copy_fixed<1>(src, dst);
    case 2:
      return copy_fixed<2>(src, dst);
    case 3:
      return copy_fixed<3>(src, dst);
    case 5:
      return copy_fixed<5>(src, dst);
    case 7:
      return copy_fixed<7>(src, dst);
    default:
      std::copy(src, src + k, dst);
  }
}

}  // namespace

// ---- GEMM --------------------------------------------------------------------------------------------

// Exercise 06 (docs/exercises/06-int8-gemm.md): the student build compiles
// docs/exercises/student/ex06_qgemm_s8_ref.cpp instead of this definition.
#ifndef LOWBIT_EXERCISES
void qgemm_s8_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w,
                  std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads) {
  qgemm_ref(x, x_zero_point, w, 8, b, y, n, in, out, threads);
}
#endif  // LOWBIT_EXERCISES

void qgemm_s4_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w,
                  std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads) {
  qgemm_ref(x, x_zero_point, w, 4, b, y, n, in, out, threads);
}

// ---- Conv2d ------------------------------------------------------------------------------------------

void qconv2d_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, int weight_bits,
                 std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t c, int64_t height, int64_t width,
                 int64_t out, int64_t k, int64_t stride, int64_t padding, int threads) {
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  const int64_t row_length = c * k * k;
  parallel_for(n * out, threads, [&](int64_t no) {
    const int64_t i = no / out, o = no % out;
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t ow = 0; ow < wo; ++ow) {
        int32_t acc = b[o];
        for (int64_t ci = 0; ci < c; ++ci) {
          for (int64_t kh = 0; kh < k; ++kh) {
            for (int64_t kw = 0; kw < k; ++kw) {
              const int64_t ih = oh * stride - padding + kh, iw = ow * stride - padding + kw;
              const bool inside = ih >= 0 && ih < height && iw >= 0 && iw < width;
              const int32_t code = inside ? x[((i * c + ci) * height + ih) * width + iw] : x_zero_point;
              acc += weight_code(w, weight_bits, row_length, o, (ci * k + kh) * k + kw) * (code - x_zero_point);
            }
          }
        }
        y[((i * out + o) * ho + oh) * wo + ow] = acc;
      }
    }
  });
}

void im2col(std::span<const int8_t> x, int32_t x_zero_point, std::span<int8_t> cols, int64_t n, int64_t c,
            int64_t height, int64_t width, int64_t k, int64_t stride, int64_t padding, int threads) {
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  const int64_t row_length = c * k * k;
  const auto pad_code = static_cast<int8_t>(x_zero_point);
  parallel_for(n * ho, threads, [&](int64_t nh) {
    const int64_t i = nh / ho, oh = nh % ho;
    for (int64_t ow = 0; ow < wo; ++ow) {
      int8_t* row = cols.data() + (nh * wo + ow) * row_length;
      const int64_t iw0 = ow * stride - padding;  // the window covers columns [iw0, iw0 + K)
      const bool columns_inside = iw0 >= 0 && iw0 + k <= width;
      for (int64_t ci = 0; ci < c; ++ci) {
        for (int64_t kh = 0; kh < k; ++kh, row += k) {
          const int64_t ih = oh * stride - padding + kh;
          if (ih < 0 || ih >= height) {
            std::fill(row, row + k, pad_code);
            continue;
          }
          const int8_t* line = x.data() + ((i * c + ci) * height + ih) * width;
          if (columns_inside) {
            copy_codes(line + iw0, k, row);  // the common case: K contiguous codes
          } else {
            for (int64_t kw = 0; kw < k; ++kw) {
              const int64_t iw = iw0 + kw;
              row[kw] = iw >= 0 && iw < width ? line[iw] : pad_code;
            }
          }
        }
      }
    }
  });
}

// ---- Requantization, pooling, input ------------------------------------------------------------------

void requantize_to_nchw_ref(std::span<const int32_t> acc, const Requant& rq, std::span<int8_t> y, int64_t n,
                            int64_t positions, int64_t out, int threads) {
  // Local copies: y is int8, which may alias anything, so the compiler would reload these per element.
  const int32_t* multiplier = rq.multiplier.data();
  const int32_t* shift = rq.shift.data();
  const int32_t zero_point = rq.zero_point, act_min = rq.act_min, act_max = rq.act_max;
  parallel_for(n, threads, [&](int64_t i) {
    for (int64_t p = 0; p < positions; ++p) {
      const int32_t* a = acc.data() + (i * positions + p) * out;
      int8_t* yp = y.data() + i * out * positions + p;
      for (int64_t o = 0; o < out; ++o) {
        yp[o * positions] = requantize(a[o], multiplier[o], shift[o], zero_point, act_min, act_max);
      }
    }
  });
}

void maxpool2d(std::span<const int8_t> x, std::span<int8_t> y, int64_t n, int64_t c, int64_t height, int64_t width,
               int64_t k, int64_t stride, int64_t padding, int threads) {
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  parallel_for(n * c, threads, [&](int64_t plane) {
    const int8_t* xp = x.data() + plane * height * width;
    int8_t* yp = y.data() + plane * ho * wo;
    if (k == 2 && stride == 2 && padding == 0) {  // the common 2×2 pool: no window clipping, 4 codes each
      for (int64_t oh = 0; oh < ho; ++oh) {
        const int8_t* top = xp + 2 * oh * width;
        const int8_t* bottom = top + width;
        for (int64_t ow = 0; ow < wo; ++ow) {
          yp[oh * wo + ow] =
              std::max(std::max(top[2 * ow], top[2 * ow + 1]), std::max(bottom[2 * ow], bottom[2 * ow + 1]));
        }
      }
      return;
    }
    for (int64_t oh = 0; oh < ho; ++oh) {
      const auto [ih0, ih1] = window_range(oh, k, stride, padding, height);
      for (int64_t ow = 0; ow < wo; ++ow) {
        const auto [iw0, iw1] = window_range(ow, k, stride, padding, width);
        int8_t best = -128;
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          for (int64_t iw = iw0; iw < iw1; ++iw) best = std::max(best, xp[ih * width + iw]);
        }
        yp[oh * wo + ow] = best;
      }
    }
  });
}

void avgpool2d(std::span<const int8_t> x, int32_t zero_point, std::span<int8_t> y, int64_t n, int64_t c, int64_t height,
               int64_t width, int64_t k, int64_t stride, int64_t padding, int threads) {
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  const auto count = static_cast<int32_t>(k * k);
  parallel_for(n * c, threads, [&](int64_t plane) {
    const int8_t* xp = x.data() + plane * height * width;
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t ow = 0; ow < wo; ++ow) {
        int32_t sum = 0;  // Σ (q − z); padding positions add 0
        for (int64_t ih = std::max<int64_t>(oh * stride - padding, 0); ih < std::min(oh * stride - padding + k, height);
             ++ih) {
          for (int64_t iw = std::max<int64_t>(ow * stride - padding, 0);
               iw < std::min(ow * stride - padding + k, width); ++iw) {
            sum += xp[ih * width + iw] - zero_point;
          }
        }
        const int32_t code = zero_point + rounding_divide_half_away(sum, count);
        y[(plane * ho + oh) * wo + ow] = static_cast<int8_t>(std::clamp(code, -128, 127));
      }
    }
  });
}

void input_lookup(std::span<const uint8_t> images, const std::array<int8_t, 256>& table, std::span<int8_t> y,
                  int threads) {
  const auto size = static_cast<int64_t>(images.size());
  parallel_for(size, threads, [&](int64_t i) { y[i] = table[images[i]]; });
}

// ---- The same, channels last (the executor's fast path) ------------------------------------------------
// The loops run over c innermost, where the codes are contiguous, so the compiler vectorises them.

void maxpool2d_nhwc(std::span<const int8_t> x, std::span<int8_t> y, int64_t n, int64_t c, int64_t height, int64_t width,
                    int64_t k, int64_t stride, int64_t padding, int threads) {
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  parallel_for(n, threads, [&](int64_t i) {
    const int8_t* xi = x.data() + i * height * width * c;
    if (k == 2 && stride == 2 && padding == 0) {  // the common 2×2 pool: no clipping, 4 pixels of c codes each
      for (int64_t oh = 0; oh < ho; ++oh) {
        const int8_t* top = xi + 2 * oh * width * c;
        const int8_t* bottom = top + width * c;
        int8_t* yp = y.data() + (i * ho + oh) * wo * c;
        for (int64_t ow = 0; ow < wo; ++ow, yp += c) {
          const int8_t* a = top + 2 * ow * c;
          const int8_t* b = bottom + 2 * ow * c;
          for (int64_t ci = 0; ci < c; ++ci) yp[ci] = std::max(std::max(a[ci], a[c + ci]), std::max(b[ci], b[c + ci]));
        }
      }
      return;
    }
    for (int64_t oh = 0; oh < ho; ++oh) {
      const auto [ih0, ih1] = window_range(oh, k, stride, padding, height);
      for (int64_t ow = 0; ow < wo; ++ow) {
        const auto [iw0, iw1] = window_range(ow, k, stride, padding, width);
        int8_t* yp = y.data() + ((i * ho + oh) * wo + ow) * c;
        std::fill(yp, yp + c, int8_t{-128});
        for (int64_t ih = ih0; ih < ih1; ++ih) {
          for (int64_t iw = iw0; iw < iw1; ++iw) {
            const int8_t* xp = xi + (ih * width + iw) * c;
            for (int64_t ci = 0; ci < c; ++ci) yp[ci] = std::max(yp[ci], xp[ci]);
          }
        }
      }
    }
  });
}

void avgpool2d_nhwc(std::span<const int8_t> x, int32_t zero_point, std::span<int8_t> y, int64_t n, int64_t c,
                    int64_t height, int64_t width, int64_t k, int64_t stride, int64_t padding, int threads) {
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  const auto count = static_cast<int32_t>(k * k);
  parallel_for(n, threads, [&](int64_t i) {
    for (int64_t oh = 0; oh < ho; ++oh) {
      const auto [ih0, ih1] = window_range(oh, k, stride, padding, height);
      for (int64_t ow = 0; ow < wo; ++ow) {
        const auto [iw0, iw1] = window_range(ow, k, stride, padding, width);
        int8_t* yp = y.data() + ((i * ho + oh) * wo + ow) * c;
        for (int64_t ci = 0; ci < c; ++ci) {
          int32_t sum = 0;  // Σ (q − z); padding positions add 0
          for (int64_t ih = ih0; ih < ih1; ++ih) {
            for (int64_t iw = iw0; iw < iw1; ++iw) sum += x[((i * height + ih) * width + iw) * c + ci] - zero_point;
          }
          const int32_t code = zero_point + rounding_divide_half_away(sum, count);
          yp[ci] = static_cast<int8_t>(std::clamp(code, -128, 127));
        }
      }
    }
  });
}

void input_lookup_nhwc(std::span<const uint8_t> images, const std::array<int8_t, 256>& table, std::span<int8_t> y,
                       int64_t n, int64_t c, int64_t positions, int threads) {
  parallel_for(n, threads, [&](int64_t i) {
    for (int64_t ci = 0; ci < c; ++ci) {
      const uint8_t* plane = images.data() + (i * c + ci) * positions;
      int8_t* yi = y.data() + i * positions * c + ci;
      for (int64_t p = 0; p < positions; ++p) yi[p * c] = table[plane[p]];
    }
  });
}

}  // namespace lowbit::quant::runtime
