// AVX-512 VNNI integer kernels (vpdpbusd: u8 × s8, four products into each int32 lane), bit-exact with the reference.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

// GCC 12's AVX-512 intrinsic headers pass _mm512_undefined_epi32() as the unused source of unmasked
// instructions (vpsrlq, vpsllvq, ...), which -Wmaybe-uninitialized reports once inlined (GCC bug 105593,
// fixed in GCC 13). The values are never read; the warning is silenced for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"

namespace lowbit::quant::runtime::detail {

// How the VNNI kernels compute eq. 5 exactly (docs/quantization.md, "Eq. 5 on u8 × s8 instructions"):
//
// 1. vpdpbusd(acc, a, b) adds to each int32 lane j of acc the four products a[4j + i]·b[4j + i], a read as
//    u8 and b as s8. Each product is exact (|255·(−128)| < 2^15) and the four are added to acc in 32 bits:
//    no int16 intermediate, nothing saturates (that would be vpdpbusds, which is not used).
// 2. x is int8, so it is made u8 by adding 128 (flipping bit 7): x + 128 = x − (−128), in [0, 255]. Weights
//    (int8 in [−127, 127], or int4 sign-extended to int8) are the s8 operand. Then
//      Σ_k w·(x − z_in) = Σ_k w·(x + 128) − (z_in + 128)·Σ_k w
//    and the kernels compute y = (b − (z_in + 128)·Σ_k w) + Σ_k w·(x + 128), with Σ_k w from pack_weights.
// 3. Partial sums of Σ w·(x + 128) may leave int32 (each term is up to 127·255), but every add wraps modulo
//    2^32 and the final y is exact, because validate() bounds the true y below 2^31 (kernels_avx2.cpp, point 1).
// 4. Weights are packed in panels of 16 channels, units of 4 consecutive k (PackedWeights); x rows are packed
//    per call into the same units (pack_x_u8). The micro-kernel keeps MR × NV zmm accumulators (MR rows ×
//    16·NV channels), broadcasts one x unit per row and multiplies it with NV weight vectors.

// Every function that uses AVX-512 carries this attribute, rather than the whole file being compiled with
// -mavx512*: inline functions from shared headers (std::, int4.h) are then never compiled with AVX-512
// instructions into a copy the linker could pick for code that runs on CPUs without them.
#define LOWBIT_AVX512_VNNI __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni")))
#define LOWBIT_AVX512_VBMI __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vbmi")))

namespace {

constexpr int64_t kPanel = PackedWeights::kPanelChannels;  // 16 channels: one zmm of int32
constexpr int64_t kRows = 6;                               // MR
constexpr int64_t kVectors = 4;                            // NV: 4 panels, 64 channels; 24 accumulators
constexpr int64_t kRowBlocksPerTask = 8;                   // a task is 48 rows × 64 channels ...
constexpr int64_t kTaskRows = kRows * kRowBlocksPerTask;
constexpr int64_t kTaskChannels = kVectors * kPanel;
constexpr int64_t kKBlockUnits = 128;  // ... walking K in blocks of 128 units: 64 channels × 512 k = 32 KB in L1

inline uint16_t low_lanes(int64_t count) { return static_cast<uint16_t>(count >= 16 ? 0xFFFF : (1u << count) - 1); }

// xp holds MR rows of units, row r at xp + r·x_stride; panel v's units at wp + v·panel_stride, (KB, 16) each;
// sums is (MR, ·) int32 with rows sums_stride apart: sums = Σ over KB units of x·w, added to what sums holds
// if accumulate. noipa: like the AVX2 micro-kernels, compiled on its own so the accumulators stay in registers.
template <int MR, int NV>
LOWBIT_AVX512_VNNI __attribute__((noipa)) void gemm_kernel(const int32_t* xp, int64_t x_stride, const int32_t* wp,
                                                           int64_t panel_stride, int64_t kb, int32_t* sums,
                                                           int64_t sums_stride, bool accumulate) {
  __m512i acc[MR][NV];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_si512(sums + r * sums_stride + v * kPanel) : _mm512_setzero_si512();
  for (int64_t ku = 0; ku < kb; ++ku) {
    __m512i w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(wp + v * panel_stride + ku * kPanel);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m512i x = _mm512_set1_epi32(xp[r * x_stride + ku]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], x, w[v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_si512(sums + r * sums_stride + v * kPanel, acc[r][v]);
}

using GemmKernel = void (*)(const int32_t*, int64_t, const int32_t*, int64_t, int64_t, int32_t*, int64_t, bool);
template <int MR>
constexpr GemmKernel kKernelsOfRows[kVectors] = {&gemm_kernel<MR, 1>, &gemm_kernel<MR, 2>, &gemm_kernel<MR, 3>,
                                                 &gemm_kernel<MR, 4>};
// kKernels[MR − 1][NV − 1]: the edges of the GEMM (fewer rows or panels left) get a kernel of their size.
constexpr const GemmKernel* kKernels[kRows] = {kKernelsOfRows<1>, kKernelsOfRows<2>, kKernelsOfRows<3>,
                                               kKernelsOfRows<4>, kKernelsOfRows<5>, kKernelsOfRows<6>};

// y rows [r0, r1) × panels [p0, p0 + nv) = sums + (b − z_eff·Σw), the int32 adds wrapping (point 3).
LOWBIT_AVX512_VNNI void store_task(const int32_t* sums, const PackedWeights& w, const int32_t* b, int32_t z_eff,
                                   int32_t* y, int64_t r0, int64_t r1, int64_t p0, int64_t nv) {
  for (int64_t v = 0; v < nv; ++v) {
    const int64_t o0 = (p0 + v) * kPanel, channels = min_i64(kPanel, w.out - o0);
    if (channels <= 0) break;
    const __mmask16 mask = low_lanes(channels);
    const __m512i offset = _mm512_sub_epi32(
        _mm512_maskz_loadu_epi32(mask, b + o0),
        _mm512_mullo_epi32(_mm512_set1_epi32(z_eff), _mm512_maskz_loadu_epi32(mask, w.row_sums.data() + o0)));
    for (int64_t r = r0; r < r1; ++r) {
      const __m512i s = _mm512_loadu_si512(sums + (r - r0) * kTaskChannels + v * kPanel);
      _mm512_mask_storeu_epi32(y + r * w.out + o0, mask, _mm512_add_epi32(s, offset));
    }
  }
}

// One task: rows [r0, r1) (at most kTaskRows) × panels [p0, p0 + nv) (nv <= kVectors) of y.
LOWBIT_AVX512_VNNI void gemm_task(const int32_t* xp, const PackedWeights& w, const int32_t* b, int32_t z_eff,
                                  int32_t* y, int64_t r0, int64_t r1, int64_t p0, int64_t nv) {
  alignas(64) int32_t sums[kTaskRows * kTaskChannels];
  const int64_t k_units = w.k_units;
  for (int64_t k0 = 0; k0 < k_units; k0 += kKBlockUnits) {
    const int64_t kb = min_i64(kKBlockUnits, k_units - k0);
    const int32_t* wb = w.units.data() + (p0 * k_units + k0) * kPanel;
    for (int64_t r = r0; r < r1; r += kRows) {
      const int64_t mr = min_i64(kRows, r1 - r);
      kKernels[mr - 1][nv - 1](xp + r * k_units + k0, k_units, wb, k_units * kPanel, kb,
                               sums + (r - r0) * kTaskChannels, kTaskChannels, k0 > 0);
    }
  }
  store_task(sums, w, b, z_eff, y, r0, r1, p0, nv);
}

// Row `row` of x into units (see pack_x_u8), 64 bytes at a time; bytes past IN are 0.
LOWBIT_AVX512_VNNI void pack_row_u8(const int8_t* src, int64_t in, int64_t row_bytes, int32_t* dst) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));  // x + 128 as u8 is x with bit 7 flipped
  auto* out = reinterpret_cast<uint8_t*>(dst);
  for (int64_t j = 0; j < row_bytes; j += 64) {
    const __mmask64 valid = low_bits(in - j), stored = low_bits(row_bytes - j);
    const __m512i codes = _mm512_maskz_loadu_epi8(valid, src + j);
    _mm512_mask_storeu_epi8(out + j, stored, _mm512_maskz_mov_epi8(valid, _mm512_xor_si512(codes, bias)));
  }
}

// The conv micro-kernels: x[r] points at the window of row r (u8 operands x + 128), unit t of a window starts
// offsets[t] bytes further; wp is NV consecutive (K_UNITS, 16) s8 unit panels. MR rows × NV panels of 16 channels
// (zmm; for conv_block_vnni512 conv_rows_vnni(NV) rows, 12 for one panel and 6 for more; 4 per pooled output for
// conv_pool_vnni512), and 12 rows × 8 channels (ymm). Each sum starts at its channel's init ((NV, 16) int32: the
// offset b − z_eff·Σw) and goes to tile, (NV, MR, 16): the exact accumulator (the adds wrap, point 3).
// (Taking the max of a pooled output's four windows here, before the store, made GCC 12 copy every accumulator
// once per unit in the loop above: 40% slower.)
template <int MR, int NV>
LOWBIT_AVX512_VNNI __attribute__((noipa)) void conv_kernel_panels(const uint8_t* const* x, const int32_t* offsets,
                                                                  int64_t k_units, const int32_t* wp,
                                                                  const int32_t* init, int32_t* tile) {
  static_assert(MR * NV <= 24);  // accumulators, with NV weights and a broadcast in 32 registers
  const int64_t panel_stride = k_units * 16;
  __m512i acc[MR][NV];
  const uint8_t* xr[MR];
#pragma GCC unroll 24
  for (int r = 0; r < MR; ++r) {
    xr[r] = x[r];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_si512(init + v * 16);
  }
  // Two units per iteration: the loop's own instructions (the offset, the pointers GCC keeps in xmm registers)
  // then cost half as much per vpdpbusd. Measured: the pointwise convs of dsconv 3–4% faster, resnet8's 16 → 16
  // conv 2%; a pooled conv of one input channel (3 units) 3% slower.
#pragma GCC unroll 2
  for (int64_t t = 0; t < k_units; ++t, wp += 16) {
    const int64_t at = offsets[t];
    __m512i w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(wp + v * panel_stride);
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) {
      int32_t unit;
      std::memcpy(&unit, xr[r] + at, sizeof unit);
      const __m512i xv = _mm512_set1_epi32(unit);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], xv, w[v]);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) _mm512_storeu_si512(tile + (v * MR + r) * 16, acc[r][v]);
}

LOWBIT_AVX512_VNNI __attribute__((noipa)) void conv_kernel_8(const uint8_t* const* x, const int32_t* offsets,
                                                             int64_t k_units, const int32_t* wp, const int32_t* init,
                                                             int32_t* tile) {
  constexpr int MR = conv_rows_vnni(1);
  __m256i acc[MR];
  const uint8_t* xr[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    acc[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(init));
    xr[r] = x[r];
  }
  for (int64_t t = 0; t < k_units; ++t, wp += 8) {
    const int64_t at = offsets[t];
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      int32_t unit;
      std::memcpy(&unit, xr[r] + at, sizeof unit);
      acc[r] = _mm256_dpbusd_epi32(acc[r], _mm256_set1_epi32(unit), w);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * 8), acc[r]);
}

// Pooled outputs per conv_pool_vnni512 micro-kernel call for NV panels, 4 rows each: 24 accumulators (16 for four
// panels).
constexpr int64_t pooled_per_call(int64_t panels) { return panels == 1 ? 6 : panels == 2 ? 3 : panels == 3 ? 2 : 1; }

// 64 pixels → 64 codes. vpermi2b picks, for each byte, entry (index & 127) of a 128-byte table held in two
// zmm; the two halves of the 256-entry table give two candidates, and bit 7 of the pixel chooses between them.
LOWBIT_AVX512_VBMI void lookup_block(const uint8_t* images, const __m512i table[4], int8_t* y, int64_t count) {
  const __mmask64 mask = low_bits(count);
  const __m512i pixels = _mm512_maskz_loadu_epi8(mask, images);
  const __m512i low = _mm512_permutex2var_epi8(table[0], pixels, table[1]);              // entries 0..127
  const __m512i high = _mm512_permutex2var_epi8(table[2], pixels, table[3]);             // entries 128..255
  const __m512i codes = _mm512_mask_blend_epi8(_mm512_movepi8_mask(pixels), low, high);  // bit 7 set: high
  _mm512_mask_storeu_epi8(y, mask, codes);
}

LOWBIT_AVX512_VBMI void lookup_range(const uint8_t* images, const int8_t* table_bytes, int8_t* y, int64_t begin,
                                     int64_t end) {
  __m512i table[4];
  for (int q = 0; q < 4; ++q) table[q] = _mm512_loadu_si512(table_bytes + 64 * q);
  for (int64_t i = begin; i < end; i += 64) lookup_block(images + i, table, y + i, min_i64(64, end - i));
}

// requantize() of 16 accumulators (docs/quantization.md eqs. 6-7), exactly: with the sign taken off first,
// round(|acc|·m / 2^n) = (|acc|·m + 2^(n−1)) >> n, then the sign put back, z_out added and the result clamped.
// |acc|·m < 2^62 is formed as two vpmuludq, on the even and on the odd lanes (64-bit products). Two ways on:
// - every n >= 33 (M = m·2^−n < 1/4, the usual case; `high`): write |acc|·m = H·2^32 + L with L < 2^32. The
//   half 2^(n−1) is a multiple of 2^32, so (H·2^32 + L + 2^(n−1)) >> n = (H + 2^(n−33)) >> (n − 32): only the
//   high halves H < 2^30 are needed, gathered into one vector of 16 int32 and shifted there.
// - otherwise (kernels_avx2.cpp's requant8 on 16 lanes): the rounding and shift in 64-bit lanes, the result
//   saturated to 2^16 − 1 (larger magnitudes clamp to act_min/act_max anyway) before the halves are combined.
// Three shortcuts, each exact, set from the Requant once (they are the same for every lane):
// - `nonnegative`, act_min >= z_out (a ReLU folded into the layer): a negative acc rounds to z_out or below and
//   is clamped to act_min whatever its size, which max(acc, 0) gives too (its code is z_out); no sign to carry.
// - `z_folded`, nonnegative and high with n <= 54: z_out·2^(n−32) is added before the shift instead of z_out
//   after it, an arithmetic shift: H < 2^30 and |z_out|·2^(n−32) <= 2^29, so the sum stays in int32.
// - the codes are stored with vpmovsdb, which saturates to [−128, 127]: the clamp to act_min and act_max is only
//   needed where they are narrower (`clamp_lo`, `clamp_hi`).
// Two forms are common enough to get loops of their own (a template argument, so that they test no flag per
// vector): `ReluFolded`, a layer with a folded ReLU (z_folded and not clamp_lo), and `Signed`, a layer without
// one (not nonnegative, every lane high, no clamp_lo: a conv before a residual Add, or a shortcut).
enum class Form { General, ReluFolded, Signed };

struct Requant16 {
  bool high;                      // every lane's n >= 33
  bool nonnegative, z_folded, clamp_lo, clamp_hi;
  Form form;
  __m512i m, m_odd;               // m in every lane; in the low half of each 64-bit lane for the odd lanes
  __m512i shift_high, half_high;  // high: n − 32 and 2^(n−33) per lane (+ z_out·2^(n−32) when z_folded)
  __m512i shift_even, shift_odd, half_even, half_odd;  // otherwise: n and 2^(n−1) per 64-bit lane
  __m512i z, lo, hi;                                   // z_out, act_min, act_max in every lane
};

// The constants of channels [first, first + 16) of rq, lanes past `mask` unused.
// multiplier and shift: the 16 lanes' (rq's from `first` on, or another order of them).
LOWBIT_AVX512_VNNI Requant16 requant16_constants(const Requant& rq, const int32_t* multiplier, const int32_t* shift,
                                                 __mmask16 mask) {
  const __m512i one = _mm512_set1_epi64(1), shifts = _mm512_maskz_loadu_epi32(mask, shift);
  Requant16 c;
  c.high = _mm512_mask_cmplt_epi32_mask(mask, shifts, _mm512_set1_epi32(33)) == 0;
  c.nonnegative = rq.act_min >= rq.zero_point;
  c.z_folded = c.nonnegative && c.high && _mm512_mask_cmpgt_epi32_mask(mask, shifts, _mm512_set1_epi32(54)) == 0;
  c.clamp_lo = rq.act_min > (c.nonnegative ? rq.zero_point : -128);  // q >= z_out already when nonnegative
  c.clamp_hi = rq.act_max < 127;
  c.form = c.z_folded && !c.clamp_lo                 ? Form::ReluFolded
           : !c.nonnegative && c.high && !c.clamp_lo ? Form::Signed
                                                     : Form::General;
  c.m = _mm512_maskz_loadu_epi32(mask, multiplier);
  c.m_odd = _mm512_srli_epi64(c.m, 32);
  c.shift_high = _mm512_sub_epi32(shifts, _mm512_set1_epi32(32));
  c.half_high = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_sub_epi32(shifts, _mm512_set1_epi32(33)));
  if (c.z_folded)
    c.half_high = _mm512_add_epi32(c.half_high, _mm512_sllv_epi32(_mm512_set1_epi32(rq.zero_point), c.shift_high));
  c.shift_even = _mm512_and_si512(shifts, _mm512_set1_epi64(0xFFFFFFFF));
  c.shift_odd = _mm512_srli_epi64(shifts, 32);
  c.half_even = _mm512_sllv_epi64(one, _mm512_sub_epi64(c.shift_even, one));  // lanes masked off: 0
  c.half_odd = _mm512_sllv_epi64(one, _mm512_sub_epi64(c.shift_odd, one));
  c.z = _mm512_set1_epi32(rq.zero_point);
  c.lo = _mm512_set1_epi32(rq.act_min);
  c.hi = _mm512_set1_epi32(rq.act_max);
  return c;
}

LOWBIT_AVX512_VNNI Requant16 requant16_constants(const Requant& rq, int64_t first, __mmask16 mask) {
  return requant16_constants(rq, rq.multiplier.data() + first, rq.shift.data() + first, mask);
}

// round(|a|·m / 2^n) per lane, a read as unsigned (|INT32_MIN| = 2^31); with z_out·2^(n−32) inside when z_folded.
// F: c.form, when the caller knows it (ReluFolded: c.high and c.z_folded; Signed: c.high, not c.z_folded).
// ReluFolded takes a itself as `magnitude`, read as signed (vpmuldq), and gives ⌊(a·m + 2^(n−1)) / 2^n⌋ + z_out:
// the same for a >= 0; for a < 0 at most z_out, which the clamp to act_min = z_out then makes exact (codes16).
template <Form F = Form::General>
LOWBIT_AVX512_VNNI __m512i rounded_product(__m512i magnitude, const Requant16& c) {
  const __m512i odd_lanes = _mm512_srli_epi64(magnitude, 32);
  const __m512i even = F == Form::ReluFolded ? _mm512_mul_epi32(magnitude, c.m) : _mm512_mul_epu32(magnitude, c.m);
  const __m512i odd =
      F == Form::ReluFolded ? _mm512_mul_epi32(odd_lanes, c.m_odd) : _mm512_mul_epu32(odd_lanes, c.m_odd);
  if (F != Form::General || c.high) {
    // H of each lane: the odd lanes' are in place, the even lanes' one dword up (vpshufd 1,1,3,3)
    const __m512i high = _mm512_mask_shuffle_epi32(odd, 0x5555, even, static_cast<_MM_PERM_ENUM>(0xF5));
    const __m512i sum = _mm512_add_epi32(high, c.half_high);
    if constexpr (F == Form::ReluFolded) return _mm512_srav_epi32(sum, c.shift_high);
    if constexpr (F == Form::Signed) return _mm512_srlv_epi32(sum, c.shift_high);
    return c.z_folded ? _mm512_srav_epi32(sum, c.shift_high) : _mm512_srlv_epi32(sum, c.shift_high);
  }
  const __m512i limit = _mm512_set1_epi64(0xFFFF);
  const __m512i e = _mm512_min_epu64(_mm512_srlv_epi64(_mm512_add_epi64(even, c.half_even), c.shift_even), limit);
  const __m512i o = _mm512_min_epu64(_mm512_srlv_epi64(_mm512_add_epi64(odd, c.half_odd), c.shift_odd), limit);
  return _mm512_mask_blend_epi32(0xAAAA, e, _mm512_slli_epi64(o, 32));
}

// The codes of the two common forms before the clamp to [act_min, act_max] (which pack_codes64 does on bytes):
// a folded ReLU's below act_min where a < 0 (rounded_product), the Signed form's within [−128, 127] after
// saturation, act_min being −128.
template <Form F>
LOWBIT_AVX512_VNNI __m512i codes16(__m512i a, const Requant16& c) {
  static_assert(F != Form::General);
  if constexpr (F == Form::ReluFolded) return rounded_product<F>(a, c);
  const __mmask16 negative = _mm512_cmplt_epi32_mask(a, _mm512_setzero_si512());
  const __m512i rounded = rounded_product<F>(_mm512_abs_epi32(a), c);
  return _mm512_add_epi32(_mm512_mask_sub_epi32(rounded, negative, _mm512_setzero_si512(), rounded), c.z);
}

// The 16 codes of a as int32, to be stored with store_codes16 (its saturation is part of the clamp). F: c.form.
template <Form F>
LOWBIT_AVX512_VNNI __m512i requant16(__m512i a, const Requant16& c) {
  if constexpr (F != Form::General) return _mm512_min_epi32(_mm512_max_epi32(codes16<F>(a, c), c.lo), c.hi);
  __m512i q;
  if (c.nonnegative) {
    const __m512i rounded = rounded_product(_mm512_max_epi32(a, _mm512_setzero_si512()), c);
    q = c.z_folded ? rounded : _mm512_add_epi32(rounded, c.z);
  } else {
    const __mmask16 negative = _mm512_cmplt_epi32_mask(a, _mm512_setzero_si512());
    const __m512i rounded = rounded_product(_mm512_abs_epi32(a), c);
    q = _mm512_add_epi32(_mm512_mask_sub_epi32(rounded, negative, _mm512_setzero_si512(), rounded), c.z);
  }
  if (c.clamp_lo) q = _mm512_max_epi32(q, c.lo);
  if (c.clamp_hi) q = _mm512_min_epi32(q, c.hi);
  return q;
}

LOWBIT_AVX512_VNNI __m512i requant16(__m512i a, const Requant16& c) {
  if (c.form == Form::ReluFolded) return requant16<Form::ReluFolded>(a, c);
  if (c.form == Form::Signed) return requant16<Form::Signed>(a, c);
  return requant16<Form::General>(a, c);
}

// The lanes of `mask` of q, saturated to int8 (vpmovsdb), at y.
LOWBIT_AVX512_VNNI void store_codes16(int8_t* y, __mmask16 mask, __m512i q) {
  _mm512_mask_cvtsepi32_storeu_epi8(y, mask, q);
}

// Four vectors of 16 codes as int32 → 64 bytes, saturated to int8 (saturating to int16 and then to int8 is
// saturating to int8): vpacksswb leaves, in 128-bit lane L, dword v = lanes 4L .. 4L + 3 of q[v].
LOWBIT_AVX512_VNNI __m512i pack_lanes(const __m512i q[4]) {
  return _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
}

// pack_lanes in order, q[v] in bytes 16v .. 16v + 15 (vpermd), clamped to [lo, hi] (act_min and act_max in every
// byte). Four store_codes16 and their clamps take 12 or more instructions on the two vector ports (vpmovsdb is
// two); this takes 6.
LOWBIT_AVX512_VNNI __m512i pack_codes64(const __m512i q[4], __m512i lo, __m512i hi) {
  const __m512i bytes = pack_lanes(q);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_min_epi8(_mm512_max_epi8(_mm512_permutexvar_epi32(order, bytes), lo), hi);
}

// Rows [0, rows) of a conv tile ((NV, MR, 16) sums, MR = mr) of a layer of form F requantized and stored, four
// vectors of 16 codes per pack_codes64: a row's four panels, which one store of 64 bytes takes; or 4 / NV rows of
// NV panels, each 16 bytes stored from a buffer (GCC stores them with vextracti32x4 to memory, a plain store;
// extracting into a register first takes the shuffle port). Rows left over go one vector at a time.
template <int NV, Form F>
LOWBIT_AVX512_VNNI void store_tile_packed(const int32_t* tile, int64_t mr, int64_t rows, const Requant16* constants,
                                          const __mmask16* masks, const Requant& rq, int8_t* y, int64_t y_stride) {
  constexpr int kRowsPerPack = 4 / NV;
  const __m512i lo = _mm512_set1_epi8(static_cast<char>(rq.act_min)),
                hi = _mm512_set1_epi8(static_cast<char>(rq.act_max));
  int64_t r = 0;
  for (; r + kRowsPerPack <= rows; r += kRowsPerPack) {
    __m512i q[4];
    for (int i = 0; i < kRowsPerPack; ++i)
      for (int v = 0; v < NV; ++v)
        q[i * NV + v] = codes16<F>(_mm512_load_si512(tile + (v * mr + r + i) * 16), constants[v]);
    if constexpr (NV == 4) {
      const __mmask64 mask = masks[0] | uint64_t{masks[1]} << 16 | uint64_t{masks[2]} << 32 | uint64_t{masks[3]} << 48;
      _mm512_mask_storeu_epi8(y + r * y_stride, mask, pack_codes64(q, lo, hi));
    } else {
      alignas(64) int8_t codes[64];
      _mm512_store_si512(codes, pack_codes64(q, lo, hi));
      for (int i = 0; i < kRowsPerPack; ++i)
        for (int v = 0; v < NV; ++v) {
          int8_t* at = y + (r + i) * y_stride + v * 16;
          const int8_t* piece = codes + 16 * (i * NV + v);
          if (masks[v] == 0xFFFF) {
            std::memcpy(at, piece, 16);
          } else {
            _mm_mask_storeu_epi8(at, masks[v], _mm_load_si128(reinterpret_cast<const __m128i*>(piece)));
          }
        }
    }
  }
  for (; r < rows; ++r)
    for (int v = 0; v < NV; ++v)
      store_codes16(y + r * y_stride + v * 16, masks[v],
                    requant16<F>(_mm512_load_si512(tile + (v * mr + r) * 16), constants[v]));
}

// Rows [0, rows) of (rows, 16) int32 sums, rows `stride` apart, plus offset (none when null), requantized; the
// lanes of `mask` of row r stored at y + r·y_stride.
template <Form F>
LOWBIT_AVX512_VNNI void requantize_rows16(const int32_t* sums, int64_t rows, int64_t stride, const int32_t* offset,
                                          const Requant16& c, __mmask16 mask, int8_t* y, int64_t y_stride) {
  const __m512i bias = offset ? _mm512_maskz_loadu_epi32(mask, offset) : _mm512_setzero_si512();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512i a = _mm512_add_epi32(_mm512_maskz_loadu_epi32(mask, sums + r * stride), bias);
    store_codes16(y + r * y_stride, mask, requant16<F>(a, c));
  }
}

LOWBIT_AVX512_VNNI void requantize_rows16(const int32_t* sums, int64_t rows, int64_t stride, const int32_t* offset,
                                          const Requant16& c, __mmask16 mask, int8_t* y, int64_t y_stride) {
  if (c.form == Form::ReluFolded)
    return requantize_rows16<Form::ReluFolded>(sums, rows, stride, offset, c, mask, y, y_stride);
  if (c.form == Form::Signed) return requantize_rows16<Form::Signed>(sums, rows, stride, offset, c, mask, y, y_stride);
  requantize_rows16<Form::General>(sums, rows, stride, offset, c, mask, y, y_stride);
}

// requantize_rows16 with the constants of channels [first_channel, first_channel + count) of rq, count <= 16.
LOWBIT_AVX512_VNNI void requantize_tile_rows(const int32_t* tile, int64_t rows, int64_t tile_stride,
                                             const int32_t* offset, const Requant& rq, int64_t first_channel,
                                             int64_t count, int8_t* y, int64_t y_stride) {
  const __mmask16 mask = low_lanes(count);
  requantize_rows16(tile, rows, tile_stride, offset, requant16_constants(rq, first_channel, mask), mask, y, y_stride);
}

// add_requantize_avx2 on 8 elements per instruction, for any shift and multipliers (add_requantize16 below is
// the usual case): eq. 10 as requantize_add computes it (requantize.h), in 64-bit lanes; AVX-512 has the 64-bit
// abs, min and max that AVX2 lacks. a8 and b8 hold 8 codes in their low 8 bytes; returns the 8 output codes in
// the low 8 bytes.
LOWBIT_AVX512_VNNI __m128i add_requantize8(__m128i a8, __m128i b8, __m512i za, __m512i ma, __m512i zb, __m512i mb,
                                           __m512i half, __m128i shift, __m512i z_out, __m512i lo, __m512i hi) {
  const __m512i xa = _mm512_sub_epi64(_mm512_cvtepi8_epi64(a8), za);
  const __m512i xb = _mm512_sub_epi64(_mm512_cvtepi8_epi64(b8), zb);
  // vpmuldq: the low 32 bits of each lane, signed, into 64; |q − z| <= 255 and m < 2^31, exact.
  const __m512i sum = _mm512_add_epi64(_mm512_mul_epi32(xa, ma), _mm512_mul_epi32(xb, mb));
  // rounding_right_shift_half_away: round the magnitude, then give the sign back.
  const __m512i rounded = _mm512_srl_epi64(_mm512_add_epi64(_mm512_abs_epi64(sum), half), shift);
  const __mmask8 negative = _mm512_cmplt_epi64_mask(sum, _mm512_setzero_si512());
  const __m512i out =
      _mm512_add_epi64(_mm512_mask_sub_epi64(rounded, negative, _mm512_setzero_si512(), rounded), z_out);
  return _mm512_cvtepi64_epi8(_mm512_min_epi64(_mm512_max_epi64(out, lo), hi));  // vpmovqb: codes in [−128, 127]
}

// Eq. 10 on 16 codes per step in 32-bit lanes, when n is in [17, 47] and both multipliers are below
// 2^31 − 2^15 (add_requantize_range checks; a real Add has n near 31). Split m = m_hi·2^16 + m_lo with m_lo the
// low 16 bits read as signed, so that both halves fit int16 (m_hi <= 32767). With d = (a − z_a, b − z_b) as int16
// pairs, two vpmaddwd give
//   A = m_hi,a·d_a + m_hi,b·d_b  and  B = m_lo,a·d_a + m_lo,b·d_b        (|A|, |B| < 2^24, exact),
// and the sum S = A·2^16 + B = T·2^16 + B_lo, with T = A + (B >> 16) and B_lo = B mod 2^16 in [0, 2^16): S < 0
// exactly when T < 0. Rounding half away from zero is floor((S + 2^(n−1) − [S < 0]) / 2^n), and 2^(n−1) is a
// multiple of 2^16, so
//   round(S / 2^n) = (T + 2^(n−17) − [T < 0 and B_lo = 0]) >> (n − 16)        (arithmetic shift)
// (when B_lo = 0, subtracting 1 borrows from T's part; otherwise it stays within B_lo), with |T| + 2^30 < 2^31.
struct AddSplit {
  __m512i zero_points, high, low;  // (z_a, z_b), (m_hi,a, m_hi,b) and (m_lo,a, m_lo,b) in every pair of int16
  __m512i half, shift;             // 2^(n−17) and n − 16 in every int32 lane
};

bool add_splits(const Rescale& r) {
  constexpr int64_t kLimit = (int64_t{1} << 31) - (int64_t{1} << 15);
  return r.shift >= 17 && r.shift <= 47 && r.multipliers[0] < kLimit && r.multipliers[1] < kLimit;
}

LOWBIT_AVX512_VNNI AddSplit add_split_constants(const Rescale& r) {
  const auto pair = [](int32_t first, int32_t second) {  // two int16 in one int32 lane, first in the low half
    return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(first)) |
                                static_cast<uint32_t>(static_cast<uint16_t>(second)) << 16);
  };
  const auto low = [](int32_t m) { return static_cast<int32_t>(static_cast<int16_t>(m & 0xFFFF)); };
  const auto high = [&](int32_t m) { return (m - low(m)) >> 16; };
  const int32_t ma = r.multipliers[0], mb = r.multipliers[1];
  return {_mm512_set1_epi32(pair(r.zero_points[0], r.zero_points[1])), _mm512_set1_epi32(pair(high(ma), high(mb))),
          _mm512_set1_epi32(pair(low(ma), low(mb))), _mm512_set1_epi32(int32_t{1} << (r.shift - 17)),
          _mm512_set1_epi32(r.shift - 16)};
}

// 16 pairs (a, b) of codes as int16 (a in the low half) → round(S / 2^n) + z_out in int32, not yet clamped.
LOWBIT_AVX512_VNNI __m512i add_pairs16(__m512i pairs, const AddSplit& c, __m512i z_out) {
  const __m512i d = _mm512_sub_epi16(pairs, c.zero_points);
  const __m512i high = _mm512_madd_epi16(d, c.high), low = _mm512_madd_epi16(d, c.low);
  const __m512i t = _mm512_add_epi32(high, _mm512_srai_epi32(low, 16));
  const __mmask16 negative = _mm512_cmplt_epi32_mask(t, _mm512_setzero_si512());
  const __mmask16 borrow = _mm512_mask_testn_epi32_mask(negative, low, _mm512_set1_epi32(0xFFFF));
  __m512i u = _mm512_add_epi32(t, c.half);
  u = _mm512_mask_sub_epi32(u, borrow, u, _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_srav_epi32(u, c.shift), z_out);
}

// 16 codes of a and b (in the low 16 bytes) → the 16 output codes.
LOWBIT_AVX512_VNNI __m128i add_requantize16(__m128i a16, __m128i b16, const AddSplit& c, __m512i z_out, __m512i lo,
                                            __m512i hi) {
  const __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(a16, b16), _mm_unpacklo_epi8(a16, b16));  // a0 b0 a1 ..
  const __m512i out = add_pairs16(_mm512_cvtepi8_epi16(pairs), c, z_out);
  return _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(out, lo), hi));
}

// 64 codes of a and b → the 64 output codes, each as add_requantize16 computes it. Each half of 32 is widened
// to int16 (vpmovsxbw from memory) and a's and b's interleaved (vpunpck{l,h}wd): pairs in the order of
// 128-bit lanes, which vpackssdw of the two results restores. vpacksswb of the halves then leaves, in lane L,
// codes 8L .. 8L + 7 and 32 + 8L .. 32 + 8L + 7; vpermq puts them in order. Saturating to int16 and then to int8
// is saturating to int8, and the clamp is done on bytes: fewer instructions per code than add_requantize16,
// which widens each of its 16 pairs on the shuffle port and stores with vpmovdb.
LOWBIT_AVX512_VNNI __m512i add_requantize64(const int8_t* a, const int8_t* b, const AddSplit& c, __m512i z_out,
                                            __m512i lo8, __m512i hi8) {
  __m512i words[2];
  for (int h = 0; h < 2; ++h) {
    const __m512i a16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32 * h)));
    const __m512i b16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * h)));
    words[h] = _mm512_packs_epi32(add_pairs16(_mm512_unpacklo_epi16(a16, b16), c, z_out),
                                  add_pairs16(_mm512_unpackhi_epi16(a16, b16), c, z_out));
  }
  const __m512i bytes = _mm512_packs_epi16(words[0], words[1]);
  const __m512i codes = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), bytes);
  return _mm512_min_epi8(_mm512_max_epi8(codes, lo8), hi8);
}

LOWBIT_AVX512_VNNI void add_requantize_range(const int8_t* a, const int8_t* b, int8_t* y, int64_t count,
                                             const Rescale& r, const Requant& rq) {
  const __m512i za = _mm512_set1_epi64(r.zero_points[0]), zb = _mm512_set1_epi64(r.zero_points[1]);
  const __m512i ma = _mm512_set1_epi64(r.multipliers[0]), mb = _mm512_set1_epi64(r.multipliers[1]);
  const __m512i half = _mm512_set1_epi64(int64_t{1} << (r.shift - 1)), z_out = _mm512_set1_epi64(rq.zero_point);
  const __m512i lo = _mm512_set1_epi64(rq.act_min), hi = _mm512_set1_epi64(rq.act_max);
  const __m128i shift = _mm_cvtsi32_si128(r.shift);
  const auto add8 = [&](__m128i a8, __m128i b8) LOWBIT_AVX512_VNNI {
    return add_requantize8(a8, b8, za, ma, zb, mb, half, shift, z_out, lo, hi);
  };
  // 16 codes per step with plain loads and stores: y is often a itself (the executor's Add writes over an
  // input), and a masked 16-byte store followed by a masked load of the next 8 bytes stalled every step
  // (the load waited for the store to retire), a third of resnet8's time.
  int64_t k = 0;
  if (add_splits(r)) {
    const AddSplit c = add_split_constants(r);
    const __m512i z32 = _mm512_set1_epi32(rq.zero_point), lo32 = _mm512_set1_epi32(rq.act_min);
    const __m512i hi32 = _mm512_set1_epi32(rq.act_max);
    const __m512i lo8 = _mm512_set1_epi8(static_cast<char>(rq.act_min)),
                  hi8 = _mm512_set1_epi8(static_cast<char>(rq.act_max));
    for (; k + 64 <= count; k += 64) _mm512_storeu_si512(y + k, add_requantize64(a + k, b + k, c, z32, lo8, hi8));
    for (; k + 16 <= count; k += 16) {
      const __m128i a16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k));
      const __m128i b16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + k), add_requantize16(a16, b16, c, z32, lo32, hi32));
    }
    if (k < count) {
      const __mmask16 mask = low_lanes(count - k);
      const __m128i out =
          add_requantize16(_mm_maskz_loadu_epi8(mask, a + k), _mm_maskz_loadu_epi8(mask, b + k), c, z32, lo32, hi32);
      _mm_mask_storeu_epi8(y + k, mask, out);
    }
    return;
  }
  for (; k + 16 <= count; k += 16) {
    const __m128i a16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k));
    const __m128i b16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k));
    const __m128i low = add8(a16, b16), high = add8(_mm_unpackhi_epi64(a16, a16), _mm_unpackhi_epi64(b16, b16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + k), _mm_unpacklo_epi64(low, high));
  }
  for (; k < count; k += 8) {
    const __mmask16 mask = low_lanes(count - k) & 0xFF;
    const __m128i out = add8(_mm_maskz_loadu_epi8(mask, a + k), _mm_maskz_loadu_epi8(mask, b + k));
    _mm_mask_storeu_epi8(y + k, mask, out);
  }
}

// depthwise_block's operands of one input column: 16 lanes of 4 bytes.
struct alignas(64) DepthwiseColumn {
  uint8_t bytes[64];
};

// Channels [c0, c0 + 16) of a depthwise convolution, output rows [row0, row1) (row = image · HO + oh), as
// depthwise_requantize_avx512 describes. The kernel's rows go in groups of four: lane c of one vpdpbusd
// multiplies the four bytes x + 128 of rows 4g .. 4g + 3 at one input column with the four weights of those
// taps, so one instruction adds four taps of 16 channels (rows past K meet zero weights). For each set of output
// rows that the same 4·G input rows cover (depthwise_rows_sharing: 2 for K = 3 at stride 1, their weights shifted
// by a row), `columns` (DepthwiseColumn, G = (K + 3) / 4 groups × the input columns the windows read) holds these
// operands, built once and read by the K windows of each row that overlap each column. Taps over the padding read
// z_in + 128, so
// every window has all K² terms and
//   Σ_t w_t·(x_t − z_in) = Σ_t w_t·(x_t + 128) − (z_in + 128)·Σ_t w_t,
// the second term folded into the bias once per channel block (wrapping, like the sums: point 3 above).
// Full: all 16 channels exist (c0 + 16 <= C), so the codes are loaded without a mask.
template <bool Full>
LOWBIT_AVX512_VNNI void depthwise_block(const int8_t* x, int32_t z, const int8_t* w, const int32_t* b,
                                        const Requant& rq, int8_t* y, const ConvShape& s, int64_t c0, int64_t row0,
                                        int64_t row1, DepthwiseColumn* columns) {
  constexpr int64_t kPixels = 4;  // windows per step: 4 independent sums hide vpdpbusd's latency
  const int64_t k = s.kernel, c = s.channels, stride = s.stride, padding = s.padding;
  const int64_t ho = pooled_size(s.height, k, stride, padding), wo = pooled_size(s.width, k, stride, padding);
  const int64_t groups = depthwise_row_groups(k), count = depthwise_columns(s);
  const __mmask16 mask = low_lanes(c - c0);
  const auto load16 = [&](const int8_t* p) LOWBIT_AVX512_VNNI {  // the block's 16 codes at p
    if constexpr (Full) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm_maskz_loadu_epi8(mask, p);
  };
  // Four rows of 16 bytes → lane c holds byte c of each row, row r in byte r. The rows go
  // to the four 128-bit lanes, vpermd gathers dword c / 4 of each row into lane c / 4, and vpshufb transposes
  // each lane's 4 × 4 bytes.
  const __m512i gather = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512i transpose = _mm512_broadcast_i32x4(_mm_set_epi8(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0));
  const auto interleave = [&](const __m128i rows[4]) LOWBIT_AVX512_VNNI {
    __m512i four = _mm512_castsi128_si512(rows[0]);
    four = _mm512_inserti32x4(four, rows[1], 1);
    four = _mm512_inserti32x4(four, rows[2], 2);
    four = _mm512_inserti32x4(four, rows[3], 3);
    return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(gather, four), transpose);
  };
  // One set of operands serves `sharing` output rows: row oh + m reads the input rows m·stride further down, so
  // its weights sit m·stride bytes later in each lane. wq[(m·G + g)·K + kw] holds, in byte r, the tap
  // (4g + r − m·stride, kw) (0 where that is no kernel row). Their sum by one more vpdpbusd with bytes of 1.
  const int64_t sharing = depthwise_rows_sharing(k, stride);
  __m512i wq[kMaxDepthwiseWeights];
  __m512i wsum = _mm512_setzero_si512();
  depthwise_weight_vectors(k, stride, [&](int64_t at, int64_t m, const int64_t taps[4]) LOWBIT_AVX512_VNNI {
    __m128i rows[4];
    for (int64_t r = 0; r < 4; ++r) rows[r] = taps[r] >= 0 ? load16(w + taps[r] * c + c0) : _mm_setzero_si128();
    wq[at] = interleave(rows);
    if (m == 0) wsum = _mm512_dpbusd_epi32(wsum, _mm512_set1_epi8(1), wq[at]);
  });
  const __m512i offset =
      _mm512_sub_epi32(_mm512_maskz_loadu_epi32(mask, b + c0), _mm512_mullo_epi32(_mm512_set1_epi32(z + 128), wsum));
  const Requant16 rc = requant16_constants(rq, c0, mask);
  const __m512i lo = _mm512_set1_epi8(static_cast<char>(rq.act_min)),
                hi = _mm512_set1_epi8(static_cast<char>(rq.act_max));
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // x + 128 as u8 is x with bit 7 flipped
  alignas(16) int8_t pad[16];
  std::memset(pad, z, sizeof pad);
  const __m512i padding_column = _mm512_set1_epi8(static_cast<char>(z ^ 0x80));  // every byte z_in + 128
  for (int64_t row = row0; row < row1;) {
    const int64_t i = row / ho, oh = row % ho, rows_here = std::min({sharing, ho - oh, row1 - row});
    const int8_t* image = x + i * s.height * s.width * c + c0;
    for (int64_t g = 0; g < groups; ++g) {  // the operands of input columns iw = j − padding, j < count
      DepthwiseColumn* operands = columns + g * count;
      const int8_t* base[4];
      int64_t step[4];
      depthwise_group_rows(image, pad, s, oh, g, base, step);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t iw = j - padding;
        __m512i operand = padding_column;
        if (iw >= 0 && iw < s.width) {
          __m128i rows[4];
          for (int64_t r = 0; r < 4; ++r) rows[r] = load16(base[r] + iw * step[r]);
          operand = _mm512_xor_si512(interleave(rows), flip);
        }
        _mm512_store_si512(operands[j].bytes, operand);
      }
    }
    for (int64_t m = 0; m < rows_here; ++m) {  // output row oh + m
      int8_t* yr = y + (row + m) * wo * c + c0;
      const __m512i* wm = wq + m * groups * k;
      const auto window_sums = [&]<int P, Form F>(int64_t ow, std::integral_constant<int, P>,
                                                  std::integral_constant<Form, F>) LOWBIT_AVX512_VNNI {
        __m512i acc[P];
        for (auto& a : acc) a = offset;
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t kw = 0; kw < k; ++kw) {
            const DepthwiseColumn* column = columns + g * count + ow * stride + kw;
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p)
              acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_load_si512(column[p * stride].bytes), wm[g * k + kw]);
          }
        if constexpr (P == 4 && F != Form::General && Full) {  // four pixels' codes packed, stored 16 bytes each
          __m512i q[4];
          for (int p = 0; p < 4; ++p) q[p] = codes16<F>(acc[p], rc);
          // Through a buffer, as in store_tile_packed (GCC made register extracts of _mm512_extracti32x4_epi32).
          alignas(64) int8_t codes[64];
          _mm512_store_si512(codes, pack_codes64(q, lo, hi));
          for (int p = 0; p < 4; ++p) std::memcpy(yr + (ow + p) * c, codes + 16 * p, 16);
          return;
        }
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) store_codes16(yr + (ow + p) * c, mask, requant16<F>(acc[p], rc));
      };
      const auto sums = [&]<int P>(int64_t at, std::integral_constant<int, P> pixels) LOWBIT_AVX512_VNNI {
        if (rc.form == Form::ReluFolded)
          return window_sums(at, pixels, std::integral_constant<Form, Form::ReluFolded>{});
        if (rc.form == Form::Signed) return window_sums(at, pixels, std::integral_constant<Form, Form::Signed>{});
        window_sums(at, pixels, std::integral_constant<Form, Form::General>{});
      };
      int64_t ow = 0;
      for (; ow + kPixels <= wo; ow += kPixels) sums(ow, std::integral_constant<int, kPixels>{});
      for (; ow < wo; ++ow) sums(ow, std::integral_constant<int, 1>{});
    }
    row += rows_here;
  }
}

// depthwise_block on 64 channels [c0, c0 + 64) at once (c0 + 64 <= C), the same sums in another order. The four
// rows' 64 codes at one input column are interleaved by two rounds of unpacks instead of depthwise_block's inserts
// and permutes: vpunpck{l,h}bw pairs rows 0 and 1, and rows 2 and 3, then vpunpck{l,h}wd pairs the pairs, so
// vector j holds in dword i of 128-bit lane L the four rows' bytes of channel 16L + 4j + i. The weights, the bias
// and the requantization constants are taken in that order too (`lane_order`). Packing the four vectors' codes
// (pack_lanes: pack_codes64 without its vpermd) puts channel 16L + 4j + i at byte 16L + 4j + i, so the
// 64 codes come out in order and go out in one store.
struct alignas(64) DepthwiseColumn64 {
  __m512i vectors[4];
};

LOWBIT_AVX512_VNNI void interleave64(const __m512i rows[4], __m512i out[4]) {
  const __m512i low01 = _mm512_unpacklo_epi8(rows[0], rows[1]), high01 = _mm512_unpackhi_epi8(rows[0], rows[1]);
  const __m512i low23 = _mm512_unpacklo_epi8(rows[2], rows[3]), high23 = _mm512_unpackhi_epi8(rows[2], rows[3]);
  out[0] = _mm512_unpacklo_epi16(low01, low23);
  out[1] = _mm512_unpackhi_epi16(low01, low23);
  out[2] = _mm512_unpacklo_epi16(high01, high23);
  out[3] = _mm512_unpackhi_epi16(high01, high23);
}

// Lane (j, L, i), at 16j + 4L + i, holds channel 16L + 4j + i of a block of 64.
constexpr int64_t lane_order(int64_t lane) { return (lane % 16) / 4 * 16 + lane / 16 * 4 + lane % 4; }

LOWBIT_AVX512_VNNI void depthwise_block64(const int8_t* x, int32_t z, const int8_t* w, const int32_t* b,
                                          const Requant& rq, int8_t* y, const ConvShape& s, int64_t c0, int64_t row0,
                                          int64_t row1, DepthwiseColumn64* columns) {
  constexpr int64_t kPixels = 4;
  const int64_t k = s.kernel, c = s.channels, stride = s.stride, padding = s.padding;
  const int64_t ho = pooled_size(s.height, k, stride, padding), wo = pooled_size(s.width, k, stride, padding);
  const int64_t groups = depthwise_row_groups(k), count = depthwise_columns(s);
  const int64_t sharing = depthwise_rows_sharing(k, stride);
  DepthwiseColumn64 wq[kMaxDepthwiseWeights];  // as depthwise_block's wq, four vectors each
  __m512i wsum[4] = {};
  depthwise_weight_vectors(k, stride, [&](int64_t at, int64_t m, const int64_t taps[4]) LOWBIT_AVX512_VNNI {
    __m512i rows[4];
    for (int64_t r = 0; r < 4; ++r)
      rows[r] = taps[r] >= 0 ? _mm512_loadu_si512(w + taps[r] * c + c0) : _mm512_setzero_si512();
    interleave64(rows, wq[at].vectors);
    if (m == 0)
      for (int j = 0; j < 4; ++j) wsum[j] = _mm512_dpbusd_epi32(wsum[j], _mm512_set1_epi8(1), wq[at].vectors[j]);
  });
  alignas(64) int32_t bias[64], multiplier[64], shift[64];
  for (int64_t lane = 0; lane < 64; ++lane) {
    const int64_t channel = c0 + lane_order(lane);
    bias[lane] = b[channel];
    multiplier[lane] = rq.multiplier[static_cast<size_t>(channel)];
    shift[lane] = rq.shift[static_cast<size_t>(channel)];
  }
  __m512i offset[4];
  Requant16 rc[4];
  for (int j = 0; j < 4; ++j) {
    offset[j] =
        _mm512_sub_epi32(_mm512_load_si512(bias + 16 * j), _mm512_mullo_epi32(_mm512_set1_epi32(z + 128), wsum[j]));
    rc[j] = requant16_constants(rq, multiplier + 16 * j, shift + 16 * j, 0xFFFF);
  }
  const bool same = std::all_of(rc, rc + 4, [&](const Requant16& r) { return r.form == rc[0].form; });
  const Form form = same ? rc[0].form : Form::General;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) int8_t pad[64];
  std::memset(pad, z, sizeof pad);
  const __m512i padding_column = _mm512_set1_epi8(static_cast<char>(z ^ 0x80));
  for (int64_t row = row0; row < row1;) {
    const int64_t i = row / ho, oh = row % ho, rows_here = std::min({sharing, ho - oh, row1 - row});
    const int8_t* image = x + i * s.height * s.width * c + c0;
    for (int64_t g = 0; g < groups; ++g) {
      DepthwiseColumn64* operands = columns + g * count;
      const int8_t* base[4];
      int64_t step[4];
      depthwise_group_rows(image, pad, s, oh, g, base, step);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t iw = j - padding;
        if (iw >= 0 && iw < s.width) {
          __m512i rows[4];
          for (int64_t r = 0; r < 4; ++r) rows[r] = _mm512_xor_si512(_mm512_loadu_si512(base[r] + iw * step[r]), flip);
          interleave64(rows, operands[j].vectors);
        } else {
          for (auto& v : operands[j].vectors) v = padding_column;
        }
      }
    }
    for (int64_t m = 0; m < rows_here; ++m) {  // output row oh + m
      int8_t* yr = y + (row + m) * wo * c + c0;
      const DepthwiseColumn64* wm = wq + m * groups * k;
      const auto window_sums = [&]<int P, Form F>(int64_t ow, std::integral_constant<int, P>,
                                                  std::integral_constant<Form, F>) LOWBIT_AVX512_VNNI {
        __m512i acc[P][4];
        for (auto& a : acc)
          for (int j = 0; j < 4; ++j) a[j] = offset[j];
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t kw = 0; kw < k; ++kw) {
            const DepthwiseColumn64* column = columns + g * count + ow * stride + kw;
            const DepthwiseColumn64& weights = wm[g * k + kw];
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
              for (int p = 0; p < P; ++p)
                acc[p][j] = _mm512_dpbusd_epi32(acc[p][j], column[p * stride].vectors[j], weights.vectors[j]);
          }
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
          __m512i q[4];
          for (int j = 0; j < 4; ++j) q[j] = requant16<F>(acc[p][j], rc[j]);
          _mm512_storeu_si512(yr + (ow + p) * c, pack_lanes(q));
        }
      };
      const auto sums = [&]<int P>(int64_t at, std::integral_constant<int, P> pixels) LOWBIT_AVX512_VNNI {
        if (form == Form::ReluFolded) return window_sums(at, pixels, std::integral_constant<Form, Form::ReluFolded>{});
        if (form == Form::Signed) return window_sums(at, pixels, std::integral_constant<Form, Form::Signed>{});
        window_sums(at, pixels, std::integral_constant<Form, Form::General>{});
      };
      int64_t ow = 0;
      for (; ow + kPixels <= wo; ow += kPixels) sums(ow, std::integral_constant<int, kPixels>{});
      for (; ow < wo; ++ow) sums(ow, std::integral_constant<int, 1>{});
    }
    row += rows_here;
  }
}

// Image i of maxpool2_requantize_avx512.
LOWBIT_AVX512_VNNI void maxpool2_requantize_image(const int32_t* image, const Requant& rq, int8_t* y, int64_t c,
                                                  int64_t height, int64_t width) {
  const int64_t ho = pooled_size(height, 2, 2, 0), wo = pooled_size(width, 2, 2, 0), down = width * c;
  for (int64_t o = 0; o < c; o += 16) {
    const __mmask16 mask = low_lanes(c - o);
    const Requant16 constants = requant16_constants(rq, o, mask);
    for (int64_t oh = 0; oh < ho; ++oh) {
      const int32_t* row = image + 2 * oh * down + o;
      int8_t* yo = y + oh * wo * c + o;
      for (int64_t ow = 0; ow < wo; ++ow, row += 2 * c, yo += c) {
        const __m512i best = _mm512_max_epi32(
            _mm512_max_epi32(_mm512_maskz_loadu_epi32(mask, row), _mm512_maskz_loadu_epi32(mask, row + c)),
            _mm512_max_epi32(_mm512_maskz_loadu_epi32(mask, row + down),
                             _mm512_maskz_loadu_epi32(mask, row + down + c)));
        store_codes16(yo, mask, requant16(best, constants));
      }
    }
  }
}

using ConvKernel = void (*)(const uint8_t* const*, const int32_t*, int64_t, const int32_t*, const int32_t*, int32_t*);

// The requantization constants of panels [p0, p0 + nv) and their masks (lanes that are channels).
LOWBIT_AVX512_VNNI void panel_constants(const PackedWeights& w, const Requant& rq, int64_t p0, int64_t nv,
                                        Requant16* constants, __mmask16* masks) {
  for (int64_t v = 0; v < nv; ++v) {
    masks[v] = low_lanes(w.out - (p0 + v) * 16);
    constants[v] = requant16_constants(rq, (p0 + v) * 16, masks[v]);
  }
}

// conv_block_vnni512: for each group of up to four panels, every MR-row block of the rows in turn; each tile is
// requantized (or stored) while it is in L1, with the group's constants made once.
LOWBIT_AVX512_VNNI void conv_block_rows(const uint8_t* const* window, int64_t count, const PackedConv& pc,
                                        const int32_t* channel_offsets, const Requant* rq, int32_t* acc, int8_t* y) {
  constexpr ConvKernel kernels[4] = {
      &conv_kernel_panels<conv_rows_vnni(1), 1>, &conv_kernel_panels<conv_rows_vnni(2), 2>,
      &conv_kernel_panels<conv_rows_vnni(3), 3>, &conv_kernel_panels<conv_rows_vnni(4), 4>};
  const PackedWeights& w = pc.weights;
  const int64_t panel = pc.panel_channels, group = panel == 16 ? kConvPanelsVnni : 1;
  for (int64_t p0 = 0; p0 < w.panels; p0 += group) {
    const int64_t nv = min_i64(group, w.panels - p0), mr = conv_rows_vnni(nv);
    Requant16 constants[kConvPanelsVnni];
    __mmask16 masks[kConvPanelsVnni];
    if (rq) panel_constants(w, *rq, p0, nv, constants, masks);
    const auto same = [&] {
      return std::all_of(constants, constants + nv, [&](const Requant16& c) { return c.form == constants[0].form; });
    };
    const Form form = rq && panel == 16 && nv != 3 && same() ? constants[0].form : Form::General;  // constants: rq only
    const int32_t* wp = w.units.data() + p0 * w.k_units * panel;
    const int32_t* init = channel_offsets + p0 * panel;
    for (int64_t r0 = 0; r0 < count; r0 += mr) {
      alignas(64) int32_t tile[kConvPanelsVnni * conv_rows_vnni(kConvPanelsVnni) * 16];  // (NV, MR, PANEL)
      if (panel == 8) {
        conv_kernel_8(window + r0, pc.unit_offsets.data(), w.k_units, wp, init, tile);
      } else {
        kernels[nv - 1](window + r0, pc.unit_offsets.data(), w.k_units, wp, init, tile);
      }
      const int64_t rows = min_i64(count, r0 + mr) - r0;
      if (form != Form::General) {
        int8_t* yr = y + r0 * w.out + p0 * 16;
        const auto store = [&]<Form F>(std::integral_constant<Form, F>) LOWBIT_AVX512_VNNI {
          if (nv == 1) store_tile_packed<1, F>(tile, mr, rows, constants, masks, *rq, yr, w.out);
          if (nv == 2) store_tile_packed<2, F>(tile, mr, rows, constants, masks, *rq, yr, w.out);
          if (nv == 4) store_tile_packed<4, F>(tile, mr, rows, constants, masks, *rq, yr, w.out);
        };
        if (form == Form::ReluFolded) store(std::integral_constant<Form, Form::ReluFolded>{});
        if (form == Form::Signed) store(std::integral_constant<Form, Form::Signed>{});
        continue;
      }
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t o0 = (p0 + v) * panel, channels = min_i64(panel, w.out - o0);
        const int32_t* sums = tile + v * mr * panel;
        if (!rq) {
          const __mmask16 mask = low_lanes(channels);
          for (int64_t r = 0; r < rows; ++r)
            _mm512_mask_storeu_epi32(acc + (r0 + r) * w.out + o0, mask,
                                     _mm512_maskz_loadu_epi32(mask, sums + r * panel));
          continue;
        }
        requantize_rows16(sums, rows, panel, nullptr, constants[v], masks[v], y + r0 * w.out + o0, w.out);
      }
    }
  }
}

// conv_pool_vnni512: each group of up to four panels over the outputs, pooled_per_call outputs per kernel call.
LOWBIT_AVX512_VNNI void conv_pool_rows(const uint8_t* const* windows, int64_t pooled, const PackedConv& pc,
                                       const int32_t* channel_offsets, const Requant& rq, int8_t* y) {
  constexpr ConvKernel kernels[4] = {
      &conv_kernel_panels<4 * pooled_per_call(1), 1>, &conv_kernel_panels<4 * pooled_per_call(2), 2>,
      &conv_kernel_panels<4 * pooled_per_call(3), 3>, &conv_kernel_panels<4 * pooled_per_call(4), 4>};
  const PackedWeights& w = pc.weights;
  for (int64_t p0 = 0; p0 < w.panels; p0 += kConvPanelsVnni) {  // up to 4 panels per call, as conv_block_rows
    const int64_t nv = min_i64(kConvPanelsVnni, w.panels - p0), per_call = pooled_per_call(nv);
    Requant16 constants[kConvPanelsVnni];
    __mmask16 masks[kConvPanelsVnni];
    panel_constants(w, rq, p0, nv, constants, masks);
    const int32_t* wp = w.units.data() + p0 * w.k_units * 16;
    for (int64_t o = 0; o < pooled; o += per_call) {
      alignas(64) int32_t tile[4 * detail::kMaxPooledPerCall * 16];  // (NV, 4P, 16) sums; 4P·NV <= 24
      kernels[nv - 1](windows + 4 * o, pc.unit_offsets.data(), w.k_units, wp, channel_offsets + p0 * 16, tile);
      // The largest of each output's four accumulators, requantized.
      for (int64_t p = 0; p < min_i64(per_call, pooled - o); ++p)
        for (int64_t v = 0; v < nv; ++v) {
          const int32_t* sums = tile + (v * 4 * per_call + 4 * p) * 16;  // the four windows' sums, one after another
          __m512i best = _mm512_load_si512(sums);
          for (int j = 1; j < 4; ++j) best = _mm512_max_epi32(best, _mm512_load_si512(sums + j * 16));
          store_codes16(y + (o + p) * w.out + (p0 + v) * 16, masks[v], requant16(best, constants[v]));
        }
    }
  }
}

}  // namespace

void requantize_rows_avx512(const int32_t* acc, const Requant& rq, int8_t* y, int64_t rows, int64_t out, int threads) {
  constexpr int64_t kBlockRows = 32;  // the block's accumulators stay in L1 while every channel block reads them
  parallel_for(ceil_div(rows, kBlockRows), threads, [&](int64_t blk) {
    const int64_t r0 = blk * kBlockRows, count = min_i64(rows, r0 + kBlockRows) - r0;
    for (int64_t o = 0; o < out; o += 16)  // each block of 16 channels over the block's rows
      requantize_tile_rows(acc + r0 * out + o, count, out, nullptr, rq, o, min_i64(16, out - o), y + r0 * out + o, out);
  });
}

void maxpool2_requantize_avx512(const int32_t* acc, const Requant& rq, int8_t* y, int64_t n, int64_t c, int64_t height,
                                int64_t width, int threads) {
  const int64_t pooled = pooled_size(height, 2, 2, 0) * pooled_size(width, 2, 2, 0) * c;
  parallel_for(n, threads, [&](int64_t i) {
    maxpool2_requantize_image(acc + i * height * width * c, rq, y + i * pooled, c, height, width);
  });
}

void conv_tile_requantize_avx512(const int32_t* tile, int64_t rows, int64_t tile_stride, const int32_t* offset,
                                 const Requant& rq, int64_t first_channel, int64_t count, int8_t* y, int64_t y_stride) {
  requantize_tile_rows(tile, rows, tile_stride, offset, rq, first_channel, count, y, y_stride);
}

void add_requantize_avx512(const int8_t* a, const int8_t* b, int8_t* y, int64_t count, const Rescale& r,
                           const Requant& rq) {
  add_requantize_range(a, b, y, count, r, rq);
}

void depthwise_requantize_avx512(const int8_t* x, int32_t x_zero_point, const int8_t* w, const int32_t* b,
                                 const Requant& rq, int8_t* y, const ConvShape& s, int threads) {
  const int64_t rows = s.n * pooled_size(s.height, s.kernel, s.stride, s.padding);
  parallel_for(threads, threads, [&](int64_t t) {  // contiguous rows per thread, every channel block on each
    const int64_t row0 = rows * t / threads, row1 = rows * (t + 1) / threads;
    const auto column_count = static_cast<size_t>(depthwise_row_groups(s.kernel) * depthwise_columns(s));
    int64_t c0 = 0;
    if (s.channels >= 64) {
      DepthwiseColumn64* columns64 = thread_buffer<DepthwiseColumn64>(column_count);
      for (; c0 + 64 <= s.channels; c0 += 64)
        depthwise_block64(x, x_zero_point, w, b, rq, y, s, c0, row0, row1, columns64);
    }
    DepthwiseColumn* columns = thread_buffer<DepthwiseColumn>(column_count);
    for (; c0 < s.channels; c0 += 16) {
      const auto block = c0 + 16 <= s.channels ? depthwise_block<true> : depthwise_block<false>;
      block(x, x_zero_point, w, b, rq, y, s, c0, row0, row1, columns);
    }
  });
}

void input_lookup_vbmi(const uint8_t* images, const int8_t* table, int8_t* y, int64_t size, int threads) {
  const int64_t blocks = ceil_div(size, 64);
  parallel_for(threads, threads, [&](int64_t t) {  // whole 64-pixel blocks per thread
    lookup_range(images, table, y, blocks * t / threads * 64, min_i64(size, blocks * (t + 1) / threads * 64));
  });
}

void pack_x_u8(const int8_t* x, int64_t n, int64_t in, int64_t k_units, int32_t* xp, int threads) {
  parallel_for(n, threads, [&](int64_t row) { pack_row_u8(x + row * in, in, 4 * k_units, xp + row * k_units); });
}

void qgemm_vnni512(const int32_t* xp, int32_t x_zero_point, const PackedWeights& w, const int32_t* b, int32_t* y,
                   int64_t n, int threads) {
  const int32_t z_eff = x_zero_point + 128;  // point 2
  const int64_t row_tasks = ceil_div(n, kTaskRows), channel_tasks = ceil_div(w.panels, kVectors);
  // Every y element is computed by one task, in a fixed order: the result does not depend on the threads.
  parallel_for(row_tasks * channel_tasks, threads, [&](int64_t t) {
    const int64_t rt = t / channel_tasks, ct = t % channel_tasks;
    const int64_t r0 = rt * kTaskRows, p0 = ct * kVectors;
    gemm_task(xp, w, b, z_eff, y, r0, min_i64(n, r0 + kTaskRows), p0, min_i64(kVectors, w.panels - p0));
  });
}

void conv_pool_vnni512(const uint8_t* const* windows, int64_t pooled, const PackedConv& pc,
                       const int32_t* channel_offsets, const Requant& rq, int8_t* y) {
  conv_pool_rows(windows, pooled, pc, channel_offsets, rq, y);
}

void conv_block_vnni512(const uint8_t* const* window, int64_t count, const PackedConv& pc,
                        const int32_t* channel_offsets, const Requant* rq, int32_t* acc, int8_t* y) {
  conv_block_rows(window, count, pc, channel_offsets, rq, acc, y);
}

}  // namespace lowbit::quant::runtime::detail
