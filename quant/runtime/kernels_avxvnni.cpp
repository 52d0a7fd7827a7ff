// AVX-VNNI integer micro-kernels (vpdpbusd on ymm, VEX-encoded: CPUs without AVX-512), bit-exact with the reference.
#include <immintrin.h>

#include <cstring>

#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"

namespace lowbit::quant::runtime::detail {

// The AvxVnni path computes eq. 5 exactly as the Vnni512 path does (kernels_avx512.cpp, points 1-3): the same
// u8 × s8 units of 4 codes, x + 128 as the u8 operand, the weights packed once for both (pack_weights), the
// zero point and the +128 folded into the bias. Only the register width differs: a panel of 16 channels is two
// ymm halves. The drivers (tiling, threads, epilogues) are kernels_avx2.cpp's (the GEMM) and kernels_conv.cpp's
// (the convolution), so this file holds only the loops that multiply.

// Every function here carries this attribute, rather than the file being compiled with -mavxvnni, for the
// reason given at the top of kernels_avx512.cpp. No AVX-512 feature is enabled, so the compiler can emit only
// VEX encodings: the code runs on a CPU that has AVX-VNNI and no AVX-512.
#define LOWBIT_AVX_VNNI __attribute__((target("avx2,avxvnni")))

namespace {

constexpr int64_t kPanel = PackedWeights::kPanelChannels;  // 16 channels: 2 ymm of int32

LOWBIT_AVX_VNNI inline __m256i load8(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
LOWBIT_AVX_VNNI inline void store8(int32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

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

}  // namespace lowbit::quant::runtime::detail
