// Internal to quant/runtime: the AVX2 building blocks that kernels_avx2.cpp (the GEMM, requantization, pools,
// depthwise conv) and kernels_conv.cpp (the implicit-GEMM convolution) share: loads and stores of 8 lanes, and
// requant8, the requantization of 8 accumulators (eqs. 6-7). Every function here is compiled for AVX2 (the
// attribute, not a `#pragma GCC target` region: clang, which builds the fuzz targets, ignores those) and only
// ever called from code that is.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace lowbit::quant::runtime::detail {

#define LOWBIT_AVX2 __attribute__((target("avx2")))

LOWBIT_AVX2 inline __m256i load8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
LOWBIT_AVX2 inline void store8(int32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// The requantization constants of 8 channels: multiplier; when every lane's n >= 33 (`high`, the usual case),
// n − 32 and 2^(n−33) per lane, else n and 2^(n−1) on the even and odd 64-bit lanes (the others zero).
// alignas: the files that use it are compiled without -mavx, and there __m256i (so a struct holding one) is only
// 16-byte aligned, while the code inside the AVX2 region moves it with 32-byte aligned loads and stores; a
// std::vector<Requant8> (depthwise_requantize_avx2) then got memory that crashed them.
struct alignas(32) Requant8 {
  bool high;
  __m256i m, shift_high, half_high, shift_even, shift_odd, half_even, half_odd;
};

LOWBIT_AVX2 inline Requant8 requant8_constants(const int32_t* multiplier, const int32_t* shift, __m256i mask) {
  const __m256i one = _mm256_set1_epi64x(1), shifts = _mm256_maskload_epi32(shift, mask);
  const __m256i below_33 = _mm256_and_si256(mask, _mm256_cmpgt_epi32(_mm256_set1_epi32(33), shifts));
  Requant8 c{};  // every vector 0
  c.high = _mm256_testz_si256(below_33, below_33) != 0;
  c.m = _mm256_maskload_epi32(multiplier, mask);
  if (c.high) {  // (lanes past mask: a shift of 0, a half of 0, unused)
    c.shift_high = _mm256_and_si256(mask, _mm256_sub_epi32(shifts, _mm256_set1_epi32(32)));
    c.half_high = _mm256_and_si256(
        mask, _mm256_sllv_epi32(_mm256_set1_epi32(1), _mm256_sub_epi32(shifts, _mm256_set1_epi32(33))));
    return c;
  }
  c.shift_even = _mm256_and_si256(shifts, _mm256_set1_epi64x(0xFFFFFFFF));
  c.shift_odd = _mm256_srli_epi64(shifts, 32);
  c.half_even = _mm256_sllv_epi64(one, _mm256_sub_epi64(c.shift_even, one));
  c.half_odd = _mm256_sllv_epi64(one, _mm256_sub_epi64(c.shift_odd, one));
  return c;
}

// requantize() of 8 accumulators (docs/quantization.md eqs. 6–7). Per lane, with the sign taken off first:
//   |acc|·m as an unsigned 64-bit product (vpmuludq on even and odd lanes), + 2^(n−1), >> n, then the sign put
//   back, z_out added and the result clamped: the reference's single rounding exactly. Two ways to round:
// - every n >= 33 (`high`): with |acc|·m = H·2^32 + L, L < 2^32, the half 2^(n−1) is a multiple of 2^32, so the
//   rounded value is (H + 2^(n−33)) >> (n − 32): only the high halves are needed, gathered into one vector of
//   8 int32 (H < 2^30) and shifted there (requant16's `high` in kernels_avx512.cpp, on 8 lanes);
// - otherwise in 64-bit lanes (vpsrlvq), saturated to 2^16 − 1 (larger magnitudes clamp to act_min/act_max
//   anyway since |z_out| <= 128) before the halves are combined.
LOWBIT_AVX2 inline __m256i requant8(__m256i a, const Requant8& c, __m256i z, __m256i lo, __m256i hi) {
  const __m256i sign = _mm256_srai_epi32(a, 31);
  const __m256i magnitude = _mm256_abs_epi32(a);  // |INT32_MIN| = 2^31 read as unsigned
  __m256i even = _mm256_mul_epu32(magnitude, c.m);
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(magnitude, 32), _mm256_srli_epi64(c.m, 32));
  __m256i rounded;
  if (c.high) {  // H of each lane: the odd lanes' in place, the even lanes' one dword up (vpshufd 1,1,3,3)
    const __m256i high = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0b10101010);
    rounded = _mm256_srlv_epi32(_mm256_add_epi32(high, c.half_high), c.shift_high);
  } else {
    const __m256i limit = _mm256_set1_epi64x(0xFFFF);
    even = _mm256_srlv_epi64(_mm256_add_epi64(even, c.half_even), c.shift_even);
    odd = _mm256_srlv_epi64(_mm256_add_epi64(odd, c.half_odd), c.shift_odd);
    even = _mm256_blendv_epi8(even, limit, _mm256_cmpgt_epi64(even, limit));
    odd = _mm256_blendv_epi8(odd, limit, _mm256_cmpgt_epi64(odd, limit));
    rounded = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0b10101010);
  }
  const __m256i q = _mm256_add_epi32(_mm256_sub_epi32(_mm256_xor_si256(rounded, sign), sign), z);
  return _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
}

// Stores the first count (1..8) int32 lanes of v at y: 4 + 2 + 1 lanes as count needs them (vpmaskmovd
// would do it in one instruction, but a masked store is microcoded on AMD and took 80% of a small conv).
LOWBIT_AVX2 inline void store_sums8(__m256i v, int32_t* y, int64_t count) {
  if (count == 8) {
    store8(y, v);
    return;
  }
  __m128i rest = _mm256_castsi256_si128(v);
  if (count & 4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), rest);
    rest = _mm256_extracti128_si256(v, 1);
    y += 4;
  }
  if (count & 2) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(y), rest);
    rest = _mm_srli_si128(rest, 8);
    y += 2;
  }
  if (count & 1) *y = _mm_cvtsi128_si32(rest);
}

// Stores 8 codes (int32 lanes in [−128, 127]) as count bytes at y.
LOWBIT_AVX2 inline void store_codes8(__m256i q, int8_t* y, int64_t count) {
  const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  const __m128i codes = _mm_packs_epi16(words, words);  // the 8 codes in the low 8 bytes
  if (count == 8) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(y), codes);
    return;
  }
  // 4 + 2 + 1 bytes as count needs them, straight from the register (a byte loop through memory stalls).
  __m128i rest = codes;
  if (count & 4) {
    const int32_t four = _mm_cvtsi128_si32(rest);
    std::memcpy(y, &four, 4);
    rest = _mm_srli_si128(rest, 4);
    y += 4;
  }
  if (count & 2) {
    const auto two = static_cast<int16_t>(_mm_extract_epi16(rest, 0));
    std::memcpy(y, &two, 2);
    rest = _mm_srli_si128(rest, 2);
    y += 2;
  }
  if (count & 1) *y = static_cast<int8_t>(_mm_extract_epi8(rest, 0));
}

#undef LOWBIT_AVX2

}  // namespace lowbit::quant::runtime::detail
