// AVX-VNNI integer micro-kernels and the depthwise Conv2d (vpdpbusd on ymm, VEX-encoded: CPUs without AVX-512),
// bit-exact with the reference.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "quant/runtime/avx2_helpers.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"

namespace lowbit::quant::runtime::detail {

// The AvxVnni path computes eq. 5 exactly as the Vnni512 path does (kernels_avx512.cpp, points 1-3): the same
// u8 × s8 units of 4 codes, x + 128 as the u8 operand, the weights packed once for both (pack_weights), the
// zero point and the +128 folded into the bias. Only the register width differs: a panel of 16 channels is two
// ymm halves. The drivers (tiling, threads, epilogues) are kernels_avx2.cpp's (the GEMM) and kernels_conv.cpp's
// (the convolution), so this file holds only the loops that multiply, and the depthwise convolution, whose
// operands are built differently (depthwise_block8).

// Every function here carries this attribute, rather than the file being compiled with -mavxvnni, for the
// reason given at the top of kernels_avx512.cpp. No AVX-512 feature is enabled, so the compiler can emit only
// VEX encodings: the code runs on a CPU that has AVX-VNNI and no AVX-512.
#define LOWBIT_AVX_VNNI __attribute__((target("avx2,avxvnni")))

namespace {

constexpr int64_t kPanel = PackedWeights::kPanelChannels;  // 16 channels: 2 ymm of int32

// 4 bytes at any alignment, broadcast to the 8 lanes: the u8 operand of one unit.
LOWBIT_AVX_VNNI inline __m256i broadcast_unit(const void* p) {
  int32_t unit;
  std::memcpy(&unit, p, sizeof unit);
  return _mm256_set1_epi32(unit);
}

// One row of x against NP panels (row_kernel_avxvnni).
template <int NP>
LOWBIT_AVX_VNNI __attribute__((noipa)) void row_kernel(const int32_t* xp, const int32_t* wp, int64_t panel_stride,
                                                       int64_t k_units, int32_t* tile) {
  __m256i acc[NP][2];
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) acc[q][0] = acc[q][1] = _mm256_setzero_si256();
  for (int64_t ku = 0; ku < k_units; ++ku) {
    const __m256i x = _mm256_set1_epi32(xp[ku]);
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      const int32_t* w = wp + q * panel_stride + ku * kPanel;
      acc[q][0] = _mm256_dpbusd_avx_epi32(acc[q][0], x, load8(w));
      acc[q][1] = _mm256_dpbusd_avx_epi32(acc[q][1], x, load8(w + 8));
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) {
    store8(tile + q * kPanel, acc[q][0]);
    store8(tile + q * kPanel + 8, acc[q][1]);
  }
}

// The conv micro-kernel (conv_tile_avxvnni) for MR rows × V ymm of 8 channels: MR·V = 12 accumulators.
// noipa, as the other micro-kernels: compiled on its own, the accumulators stay in registers.
template <int MR, int V>
LOWBIT_AVX_VNNI __attribute__((noipa)) void conv_kernel(const uint8_t* const* x, const int32_t* offsets,
                                                        int64_t k_units, const int32_t* wp, int32_t* tile) {
  static_assert(MR == conv_rows_avxvnni(8 * V));
  __m256i acc[MR][V];
  const uint8_t* xr[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    xr[r] = x[r];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
  }
  for (int64_t t = 0; t < k_units; ++t, wp += 8 * V) {
    const int64_t at = offsets[t];
    __m256i w[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) w[v] = load8(wp + 8 * v);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m256i xv = broadcast_unit(xr[r] + at);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_dpbusd_avx_epi32(acc[r][v], xv, w[v]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) store8(tile + (r * V + v) * 8, acc[r][v]);
}

}  // namespace

// 6 rows × 16 channels: 12 accumulators, 2 weight vectors and the broadcast x unit, 15 of the 16 ymm registers.
LOWBIT_AVX_VNNI __attribute__((noipa)) void gemm_kernel_avxvnni(const int32_t* xp, int64_t x_stride, const int32_t* wp,
                                                                int64_t k_units, int32_t* tile) {
  constexpr int MR = kGemmRowsAvxVnni;
  const int32_t* xr[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) xr[r] = xp + r * x_stride;
  __m256i acc[MR][2];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t ku = 0; ku < k_units; ++ku, wp += kPanel) {
    const __m256i w0 = load8(wp), w1 = load8(wp + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256i x = _mm256_set1_epi32(xr[r][ku]);
      acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], x, w0);
      acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], x, w1);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    store8(tile + r * kPanel, acc[r][0]);
    store8(tile + r * kPanel + 8, acc[r][1]);
  }
}

void row_kernel_avxvnni(const int32_t* xp, const int32_t* wp, int64_t panel_stride, int64_t k_units, int64_t panels,
                        int32_t* tile) {
  switch (panels) {
    case 1:
      return row_kernel<1>(xp, wp, panel_stride, k_units, tile);
    case 2:
      return row_kernel<2>(xp, wp, panel_stride, k_units, tile);
    case 3:
      return row_kernel<3>(xp, wp, panel_stride, k_units, tile);
    default:
      return row_kernel<4>(xp, wp, panel_stride, k_units, tile);
  }
}

void conv_tile_avxvnni(const uint8_t* const* x, const int32_t* offsets, int64_t k_units, const int32_t* wp,
                       int64_t panel, int32_t* tile) {
  if (panel == 8) return conv_kernel<conv_rows_avxvnni(8), 1>(x, offsets, k_units, wp, tile);
  conv_kernel<conv_rows_avxvnni(16), 2>(x, offsets, k_units, wp, tile);
}

// ---- The depthwise Conv2d, requantized in one pass --------------------------------------------------------------

namespace {

// depthwise_block8's operands of one input column: 8 lanes of 4 bytes.
struct alignas(32) DepthwiseColumn8 {
  uint8_t bytes[32];
};

// Four rows of 8 codes (the low 8 bytes of each) → lane c (c < 8) holds code c of each row, row r in byte r.
LOWBIT_AVX_VNNI inline __m256i interleave8(const __m128i rows[4]) {
  const __m128i pairs01 = _mm_unpacklo_epi8(rows[0], rows[1]), pairs23 = _mm_unpacklo_epi8(rows[2], rows[3]);
  return _mm256_set_m128i(_mm_unpackhi_epi16(pairs01, pairs23), _mm_unpacklo_epi16(pairs01, pairs23));
}

// Channels [c0, c0 + 8) of a depthwise convolution, output rows [row0, row1): kernels_avx512.cpp's depthwise_block
// on 8 channels per ymm. Lane c of one vpdpbusd multiplies the four bytes x + 128 of kernel rows 4g .. 4g + 3 at one
// input column with the four weights of those taps; `columns` holds these operands for every input column an output
// row reads, built once per set of depthwise_rows_sharing output rows and read by the K windows over each column. Taps
// over the padding read z_in + 128, and (z_in + 128)·Σw is folded into the bias. Each sum stays in a register and is
// requantized (requant8) at once. Full: all 8 channels exist (c0 + 8 <= C), so the codes load as one 8-byte word.
template <bool Full>
LOWBIT_AVX_VNNI void depthwise_block8(const int8_t* x, int32_t z, const int8_t* w, const int32_t* b, const Requant& rq,
                                      int8_t* y, const ConvShape& s, int64_t c0, int64_t row0, int64_t row1,
                                      DepthwiseColumn8* columns) {
  constexpr int64_t kPixels = 4;  // windows per step: 4 independent sums hide vpdpbusd's latency
  const int64_t k = s.kernel, c = s.channels, stride = s.stride, padding = s.padding;
  const int64_t ho = pooled_size(s.height, k, stride, padding), wo = pooled_size(s.width, k, stride, padding);
  const int64_t groups = depthwise_row_groups(k), count = depthwise_columns(s), channels = std::min<int64_t>(8, c - c0);
  const auto load_codes = [&](const int8_t* p) LOWBIT_AVX_VNNI {  // the block's 8 codes at p, in the low 8 bytes
    int64_t codes = 0;
    if constexpr (Full) {
      std::memcpy(&codes, p, 8);
    } else {
      std::memcpy(&codes, p, static_cast<size_t>(channels));  // no read past the last channel
    }
    return _mm_cvtsi64_si128(codes);
  };
  const int64_t sharing = depthwise_rows_sharing(k, stride);
  __m256i wq[kMaxDepthwiseWeights];  // depthwise_weight_vectors
  __m256i wsum = _mm256_setzero_si256();
  depthwise_weight_vectors(k, stride, [&](int64_t at, int64_t m, const int64_t taps[4]) LOWBIT_AVX_VNNI {
    __m128i rows[4];
    for (int64_t r = 0; r < 4; ++r) rows[r] = taps[r] >= 0 ? load_codes(w + taps[r] * c + c0) : _mm_setzero_si128();
    wq[at] = interleave8(rows);
    if (m == 0) wsum = _mm256_dpbusd_avx_epi32(wsum, _mm256_set1_epi8(1), wq[at]);
  });
  alignas(32) int32_t bias[8] = {}, lanes[8] = {};
  for (int64_t j = 0; j < channels; ++j) {
    bias[j] = b[c0 + j];
    lanes[j] = -1;
  }
  const __m256i offset = _mm256_sub_epi32(load8(bias), _mm256_mullo_epi32(_mm256_set1_epi32(z + 128), wsum));
  const Requant8 rc = requant8_constants(rq.multiplier.data() + c0, rq.shift.data() + c0, load8(lanes));
  const __m256i z_out = _mm256_set1_epi32(rq.zero_point), lo = _mm256_set1_epi32(rq.act_min);
  const __m256i hi = _mm256_set1_epi32(rq.act_max);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));  // x + 128 as u8 is x with bit 7 flipped
  alignas(16) int8_t pad[16];
  std::memset(pad, z, sizeof pad);
  const __m256i padding_column = _mm256_set1_epi8(static_cast<char>(z ^ 0x80));  // every byte z_in + 128
  for (int64_t row = row0; row < row1;) {
    const int64_t i = row / ho, oh = row % ho, rows_here = std::min({sharing, ho - oh, row1 - row});
    const int8_t* image = x + i * s.height * s.width * c + c0;
    for (int64_t g = 0; g < groups; ++g) {  // the operands of input columns iw = j − padding, j < count
      DepthwiseColumn8* operands = columns + g * count;
      const int8_t* base[4];
      int64_t step[4];
      depthwise_group_rows(image, pad, s, oh, g, base, step);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t iw = j - padding;
        __m256i operand = padding_column;
        if (iw >= 0 && iw < s.width) {
          __m128i rows[4];
          for (int64_t r = 0; r < 4; ++r) rows[r] = load_codes(base[r] + iw * step[r]);
          operand = _mm256_xor_si256(interleave8(rows), flip);
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(operands[j].bytes), operand);
      }
    }
    for (int64_t m = 0; m < rows_here; ++m) {  // output row oh + m
      int8_t* yr = y + (row + m) * wo * c + c0;
      const __m256i* wm = wq + m * groups * k;
      const auto window_sums = [&]<int P>(int64_t ow, std::integral_constant<int, P>) LOWBIT_AVX_VNNI {
        __m256i acc[P];
        for (auto& a : acc) a = offset;
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t kw = 0; kw < k; ++kw) {
            const DepthwiseColumn8* column = columns + g * count + ow * stride + kw;
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p)
              acc[p] = _mm256_dpbusd_avx_epi32(
                  acc[p], _mm256_load_si256(reinterpret_cast<const __m256i*>(column[p * stride].bytes)),
                  wm[g * k + kw]);
          }
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) store_codes8(requant8(acc[p], rc, z_out, lo, hi), yr + (ow + p) * c, channels);
      };
      int64_t ow = 0;
      for (; ow + kPixels <= wo; ow += kPixels) window_sums(ow, std::integral_constant<int, kPixels>{});
      for (; ow < wo; ++ow) window_sums(ow, std::integral_constant<int, 1>{});
    }
    row += rows_here;
  }
}

}  // namespace

void depthwise_requantize_avxvnni(const int8_t* x, int32_t x_zero_point, const int8_t* w, const int32_t* b,
                                  const Requant& rq, int8_t* y, const ConvShape& s, int threads) {
  const int64_t rows = s.n * pooled_size(s.height, s.kernel, s.stride, s.padding);
  parallel_for(threads, threads, [&](int64_t t) {  // contiguous rows per thread, every channel block on each
    const int64_t row0 = rows * t / threads, row1 = rows * (t + 1) / threads;
    DepthwiseColumn8* columns =
        thread_buffer<DepthwiseColumn8>(static_cast<size_t>(depthwise_row_groups(s.kernel) * depthwise_columns(s)));
    for (int64_t c0 = 0; c0 < s.channels; c0 += 8) {
      const auto block = c0 + 8 <= s.channels ? depthwise_block8<true> : depthwise_block8<false>;
      block(x, x_zero_point, w, b, rq, y, s, c0, row0, row1, columns);
    }
  });
}

}  // namespace lowbit::quant::runtime::detail
