// AVX2 integer kernels (vpmaddwd for int8 weights, vpmaddubsw for int4), bit-exact with the reference.
// The GEMM and the implicit-GEMM convolution (their drivers also run the AVX-VNNI and AVX-512 micro-kernels),
// requantization, pooling, and the inner loops of depthwise Conv2d and Add. kernels_dispatch.cpp packs the
// weights and calls these through their entry points in kernels_isa.h.
#include <immintrin.h>

#include <climits>
#include <cstring>

#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"
#include "quant/runtime/requantize.h"

namespace lowbit::quant::runtime {

// How the fast GEMM works (x is (N, IN), w is (OUT, IN); y is (N, OUT)):
//
// 1. Fold the zero point out of the inner loop (docs/quantization.md eq. 5):
//      y[n][o] = b[o] + Σ_k w·(x − z_in) = (b[o] − z_in·Σ_k w[o][k]) + Σ_k w[o][k]·x[n][k]
//    Σ_k w[o][k] is computed once by pack_weights. The kernels add in wrapping 32-bit arithmetic; the
//    result equals the reference because validate() guarantees the true value fits in int32, and
//    arithmetic modulo 2^32 is exact for any value that fits.
// 2. Re-lay w out once into panels of 16 output channels (PackedWeights), and x, per call, into rows of
//    units, so the micro-kernel reads both operands sequentially. Each int32 "unit" holds the codes of
//    one row (or channel) at a few consecutive k: two int16 for 8-bit weights, four u8 for 4-bit weights.
// 3. The micro-kernel keeps an MR × 16 tile of int32 accumulators in registers (2 ymm per row) and walks
//    a block of K: per unit it broadcasts one x unit per row and multiplies it with the two weight vectors.
//      int8 weights: vpmaddwd on int16 pairs: x·w products are at most 128·127, a pair at most 32512 —
//        no overflow. (vpmaddubsw is NOT safe for int8 weights: u8 × s8 pair sums reach 2·255·127 = 64770
//        and saturate int16.)
//      int4 weights: vpmaddubsw on (x + 128) as u8 times w as s8, then vpmaddwd with 1s to int32. Proof
//        that nothing saturates: |(x + 128)·w| <= 255·8 = 2040, a vpmaddubsw pair <= 4080, and the
//        kernel adds two such results in int16 (vpaddw) before widening: <= 8160 < 32767.
//        The +128 is folded like z_in: y = (b − (z_in + 128)·Σw) + Σ w·(x + 128).
//      AvxVnni path, either width: x + 128 as u8 quads (as for int4 weights) times units of 4 s8 weights,
//        by AVX-VNNI's vpdpbusd, which adds the four products in 32 bits: exact, nothing saturates
//        (kernels_avx512.cpp, point 1). Its micro-kernels are in kernels_avxvnni.cpp; the packing of x, tiling
//        and epilogues around them are the ones here.
// 4. Tiles of (4·MR rows × 128 channels) go to the threads; every y element is computed by exactly one
//    thread in a fixed order, so results do not depend on the thread count.

namespace {

constexpr int64_t kPanel = PackedWeights::kPanelChannels;  // 16 output channels: 2 ymm of int32
constexpr int64_t kRowsS8 = 6;                             // MR for int8 weights: 12 accumulators
constexpr int64_t kRowsS4 = 4;                             // MR for int4 weights: 8 accumulators
constexpr int64_t kRowBlocksPerTile = 4;                   // a tile is 4 row blocks ...
constexpr int64_t kPanelsPerTile = 8;                      // ... by 8 panels (128 channels)
constexpr int64_t kKBlockUnits = 256;                      // units of K per pass (even, for the int4 kernel)
constexpr int64_t kRequantPositionBlock = 32;              // positions per block in requantize_to_nchw

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// The multiply of the ymm GEMM micro-kernels that run_tiles and run_row drive, fixed by how w was packed:
//   Madd     Avx2, 8 bits: vpmaddwd on int16 pairs (micro_kernel_s8)
//   Maddubs  Avx2, 4 bits: vpmaddubsw on u8 quads x + 128 (micro_kernel_s4)
//   Dpbusd   AvxVnni, 8 or 4 bits: vpdpbusd on u8 quads x + 128 (kernels_avxvnni.cpp)
enum class YmmMultiply { Madd, Maddubs, Dpbusd };
inline YmmMultiply ymm_multiply(const PackedWeights& w) {
  if (w.path == KernelPath::AvxVnni) return YmmMultiply::Dpbusd;
  return w.bits == 8 ? YmmMultiply::Madd : YmmMultiply::Maddubs;
}
inline int64_t rows_per_block(YmmMultiply m) {
  if (m == YmmMultiply::Dpbusd) return detail::kGemmRowsAvxVnni;
  return m == YmmMultiply::Madd ? kRowsS8 : kRowsS4;
}
static_assert(detail::kGemmRowsAvxVnni <= kRowsS8);  // run_tiles' sums hold kRowsS8 rows per block

// The int8 code of unit position `byte` (0..3) as the u8 operand of vpmaddubsw: x + 128.
inline uint32_t biased_byte(int8_t code, int byte) {
  return static_cast<uint32_t>(static_cast<uint8_t>(code + 128)) << (8 * byte);
}

// ---- AVX2 region: raw pointers only (no std:: templates get instantiated with AVX2 code) ---------------
#pragma GCC push_options
#pragma GCC target("avx2")

inline __m256i load8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store8(int32_t* p, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

// x is (N, IN) codes; xp is (ROWS, K_UNITS) units, ROWS = N rounded up to MR: row r of x as int16 pairs
// (Madd) or as biased u8 quads x + 128 (Maddubs, Dpbusd). Codes past IN and rows past N are 0 (their weights
// are 0 too, or the rows are never stored).
void pack_x(const int8_t* x, int64_t n, int64_t in, YmmMultiply m, int64_t k_units, int32_t* xp, int threads) {
  const int64_t rows = ceil_div(n, rows_per_block(m)) * rows_per_block(m);
  const bool int16_pairs = m == YmmMultiply::Madd;
  const int64_t per_unit = int16_pairs ? 2 : 4;
  const int64_t full_units = in / per_unit;  // units with every code inside the row
  parallel_for(rows, threads, [&](int64_t row) {
    int32_t* dst = xp + row * k_units;
    int64_t ku = 0;
    if (row < n) {
      const int8_t* src = x + row * in;
      if (int16_pairs) {
        for (; ku + 8 <= full_units; ku += 8) {  // 16 codes → 16 int16 = 8 units
          const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * ku));
          store8(dst + ku, _mm256_cvtepi8_epi16(codes));
        }
        for (; ku < full_units; ++ku)
          dst[ku] = static_cast<int32_t>(detail::int16_half(src[2 * ku], 0) | detail::int16_half(src[2 * ku + 1], 1));
      } else {
        const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));  // x + 128 as u8 is x with bit 7 flipped
        for (; ku + 8 <= full_units; ku += 8) {                          // 32 codes = 8 units
          const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 4 * ku));
          store8(dst + ku, _mm256_xor_si256(codes, bias));
        }
        for (; ku < full_units; ++ku) {
          const int8_t* q = src + 4 * ku;
          dst[ku] = static_cast<int32_t>(biased_byte(q[0], 0) | biased_byte(q[1], 1) | biased_byte(q[2], 2) |
                                         biased_byte(q[3], 3));
        }
      }
      for (; ku < k_units; ++ku) {  // the partial unit and the padding units
        uint32_t unit = 0;
        for (int64_t i = 0; i < per_unit; ++i) {
          const int64_t k = ku * per_unit + i;
          if (k < in)
            unit |= int16_pairs ? detail::int16_half(src[k], static_cast<int>(i))
                                : biased_byte(src[k], static_cast<int>(i));
        }
        dst[ku] = static_cast<int32_t>(unit);
      }
    }
    for (; ku < k_units; ++ku) dst[ku] = 0;  // rows past N
  });
}

// xp holds 6 rows of int16-pair units, row r at xp + r·x_stride; wp is (K_UNITS, 16) int16-pair units;
// tile is (6, 16) int32: tile = Σ over K_UNITS units of x·w. The 12 accumulators live in registers
// (the loops are fully unrolled).
// noipa: compiled on its own, GCC 12 keeps every accumulator in a register; inlined into run_tiles (or
// specialised for its caller) it spills some to the stack and runs at about half the speed.
__attribute__((noipa)) void micro_kernel_s8(const int32_t* xp, int64_t x_stride, const int32_t* wp, int64_t k_units,
                                            int32_t* tile) {
  const int32_t* xr[kRowsS8];
#pragma GCC unroll 6
  for (int r = 0; r < kRowsS8; ++r) xr[r] = xp + r * x_stride;
  __m256i acc[kRowsS8][2];
#pragma GCC unroll 6
  for (int r = 0; r < kRowsS8; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t ku = 0; ku < k_units; ++ku) {
    const __m256i w0 = load8(wp), w1 = load8(wp + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kRowsS8; ++r) {
      const __m256i x = _mm256_set1_epi32(xr[r][ku]);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(x, w0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(x, w1));
    }
    wp += kPanel;
  }
#pragma GCC unroll 6
  for (int r = 0; r < kRowsS8; ++r) {
    store8(tile + r * kPanel, acc[r][0]);
    store8(tile + r * kPanel + 8, acc[r][1]);
  }
}

// xp holds 4 rows of units of 4 u8 codes (x + 128), row r at xp + r·x_stride; wp is (K_UNITS, 16) units of
// 4 s8 weights; tile is (4, 16) int32: tile = Σ over K_UNITS units of (x + 128)·w. K_UNITS is even: two
// units per step, whose vpmaddubsw pairs (<= 4080 each) are added in int16 (<= 8160) before vpmaddwd
// with 1s widens them.
__attribute__((noipa)) void micro_kernel_s4(const int32_t* xp, int64_t x_stride, const int32_t* wp, int64_t k_units,
                                            int32_t* tile) {
  const int32_t* xr[kRowsS4];
#pragma GCC unroll 4
  for (int r = 0; r < kRowsS4; ++r) xr[r] = xp + r * x_stride;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kRowsS4][2];
#pragma GCC unroll 4
  for (int r = 0; r < kRowsS4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t ku = 0; ku < k_units; ku += 2) {
    const __m256i w00 = load8(wp), w01 = load8(wp + 8), w10 = load8(wp + kPanel), w11 = load8(wp + kPanel + 8);
#pragma GCC unroll 4
    for (int r = 0; r < kRowsS4; ++r) {
      const __m256i x0 = _mm256_set1_epi32(xr[r][ku]), x1 = _mm256_set1_epi32(xr[r][ku + 1]);
      const __m256i s0 = _mm256_add_epi16(_mm256_maddubs_epi16(x0, w00), _mm256_maddubs_epi16(x1, w10));
      const __m256i s1 = _mm256_add_epi16(_mm256_maddubs_epi16(x0, w01), _mm256_maddubs_epi16(x1, w11));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(s0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(s1, ones));
    }
    wp += 2 * kPanel;
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRowsS4; ++r) {
    store8(tile + r * kPanel, acc[r][0]);
    store8(tile + r * kPanel + 8, acc[r][1]);
  }
}

// One row of x against NP panels at once (a batch of one image: the MR-row kernels would compute MR − 1
// rows of padding). xp is K_UNITS units; panel q's units start at wp + q·panel_stride; tile is (NP, 16)
// int32 = Σ x·w. The same operand forms, and so the same no-saturation proofs, as the MR-row kernels
// (Madd or Maddubs; Dpbusd has its own, row_kernel_avxvnni).
template <int NP>
__attribute__((noipa)) void row_kernel(const int32_t* xp, YmmMultiply m, const int32_t* wp, int64_t panel_stride,
                                       int64_t k_units, int32_t* tile) {
  __m256i acc[NP][2];
  for (int q = 0; q < NP; ++q) acc[q][0] = acc[q][1] = _mm256_setzero_si256();
  if (m == YmmMultiply::Madd) {
    for (int64_t ku = 0; ku < k_units; ++ku) {
      const __m256i x = _mm256_set1_epi32(xp[ku]);
      for (int q = 0; q < NP; ++q) {
        const int32_t* w = wp + q * panel_stride + ku * kPanel;
        acc[q][0] = _mm256_add_epi32(acc[q][0], _mm256_madd_epi16(x, load8(w)));
        acc[q][1] = _mm256_add_epi32(acc[q][1], _mm256_madd_epi16(x, load8(w + 8)));
      }
    }
  } else {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t ku = 0; ku < k_units; ku += 2) {
      const __m256i x0 = _mm256_set1_epi32(xp[ku]), x1 = _mm256_set1_epi32(xp[ku + 1]);
      for (int q = 0; q < NP; ++q) {
        const int32_t* w = wp + q * panel_stride + ku * kPanel;
        const __m256i s0 =
            _mm256_add_epi16(_mm256_maddubs_epi16(x0, load8(w)), _mm256_maddubs_epi16(x1, load8(w + 16)));
        const __m256i s1 =
            _mm256_add_epi16(_mm256_maddubs_epi16(x0, load8(w + 8)), _mm256_maddubs_epi16(x1, load8(w + 24)));
        acc[q][0] = _mm256_add_epi32(acc[q][0], _mm256_madd_epi16(s0, ones));
        acc[q][1] = _mm256_add_epi32(acc[q][1], _mm256_madd_epi16(s1, ones));
      }
    }
  }
  for (int q = 0; q < NP; ++q) {
    store8(tile + q * kPanel, acc[q][0]);
    store8(tile + q * kPanel + 8, acc[q][1]);
  }
}

// y (OUT) = Σ x·w + offset for one packed row xp, four panels at a time.
void run_row(const int32_t* xp, const int32_t* units, const int32_t* row_sums, YmmMultiply m, int64_t k_units,
             const int32_t* b, int32_t z_eff, int32_t* y, int64_t out) {
  const int64_t panels = ceil_div(out, kPanel), panel_stride = k_units * kPanel;
  for (int64_t p0 = 0; p0 < panels; p0 += 4) {
    alignas(32) int32_t tile[4 * kPanel];
    const int32_t* wp = units + p0 * panel_stride;
    const int64_t np = min_i64(4, panels - p0);
    if (m == YmmMultiply::Dpbusd) {
      detail::row_kernel_avxvnni(xp, wp, panel_stride, k_units, np, tile);
    } else if (np == 4) {
      row_kernel<4>(xp, m, wp, panel_stride, k_units, tile);
    } else if (np == 3) {
      row_kernel<3>(xp, m, wp, panel_stride, k_units, tile);
    } else if (np == 2) {
      row_kernel<2>(xp, m, wp, panel_stride, k_units, tile);
    } else {
      row_kernel<1>(xp, m, wp, panel_stride, k_units, tile);
    }
    for (int64_t o = p0 * kPanel; o < min_i64(out, (p0 + 4) * kPanel); ++o) {
      y[o] = static_cast<int32_t>(static_cast<uint32_t>(tile[o - p0 * kPanel]) +
                                  static_cast<uint32_t>(detail::channel_offset(b[o], z_eff, row_sums[o])));
    }
  }
}

// sums (ROWS, 16) += tile (ROWS, 16).
void add_tile(const int32_t* tile, int64_t rows, int32_t* sums) {
  for (int64_t i = 0; i < rows * kPanel; i += 8) store8(sums + i, _mm256_add_epi32(load8(sums + i), load8(tile + i)));
}

// Runs every (row block, panel) micro-kernel and writes y = Σ x·w + offset (wrapping, see above), where
// offset[o] = b[o] − z_eff·Σ_k w[o][k]. xp is (ROWS, K_UNITS) from pack_x; y is (N, OUT).
// A tile (4 row blocks × 8 panels) walks K in blocks of kKBlockUnits: the weight block of one panel
// (16 × 256 units = 16 KB) stays in L1 while the x blocks of the 4 row blocks (6 KB each) pass by it.
// (Blocking chosen by measuring 1024³ on the target CPU; see tools/bench_qgemm.cpp.)
void run_tiles(const int32_t* xp, const int32_t* units, const int32_t* row_sums, YmmMultiply m, int64_t k_units,
               const int32_t* b, int32_t z_eff, int32_t* y, int64_t n, int64_t out, int threads) {
  const int64_t mr = rows_per_block(m);
  const int64_t row_blocks = ceil_div(n, mr), panels = ceil_div(out, kPanel);
  const int64_t row_tiles = ceil_div(row_blocks, kRowBlocksPerTile), panel_tiles = ceil_div(panels, kPanelsPerTile);
  parallel_for(row_tiles * panel_tiles, threads, [&](int64_t t) {
    const int64_t rt = t / panel_tiles, pt = t % panel_tiles;
    const int64_t rb0 = rt * kRowBlocksPerTile, rb1 = min_i64(row_blocks, rb0 + kRowBlocksPerTile);
    const int64_t p0 = pt * kPanelsPerTile, p1 = min_i64(panels, p0 + kPanelsPerTile);
    alignas(32) int32_t sums[kPanelsPerTile][kRowBlocksPerTile][kRowsS8 * kPanel];  // (panel, row block) tiles
    alignas(32) int32_t tile[kRowsS8 * kPanel];                                     // kRowsS8: the largest MR
    for (int64_t k0 = 0; k0 < k_units; k0 += kKBlockUnits) {
      const int64_t kb = min_i64(kKBlockUnits, k_units - k0);
      for (int64_t p = p0; p < p1; ++p) {
        const int32_t* wb = units + (p * k_units + k0) * kPanel;
        for (int64_t rb = rb0; rb < rb1; ++rb) {
          const int32_t* xb = xp + rb * mr * k_units + k0;  // row rb·MR at unit k0
          int32_t* sum = sums[p - p0][rb - rb0];
          int32_t* target = k0 == 0 ? sum : tile;  // the first K block writes the sums, later ones add
          if (m == YmmMultiply::Madd) {
            micro_kernel_s8(xb, k_units, wb, kb, target);
          } else if (m == YmmMultiply::Maddubs) {
            micro_kernel_s4(xb, k_units, wb, kb, target);
          } else {
            detail::gemm_kernel_avxvnni(xb, k_units, wb, kb, target);
          }
          if (k0 > 0) add_tile(tile, mr, sum);
        }
      }
    }
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t channels = min_i64(kPanel, out - p * kPanel);
      alignas(32) int32_t offset[kPanel] = {};  // b[o] − z_eff·Σ_k w[o][k], wrapping
      for (int64_t j = 0; j < channels; ++j) {
        const int64_t o = p * kPanel + j;
        offset[j] = detail::channel_offset(b[o], z_eff, row_sums[o]);
      }
      const __m256i offset0 = load8(offset), offset1 = load8(offset + 8);
      for (int64_t rb = rb0; rb < rb1; ++rb) {
        const int32_t* sum = sums[p - p0][rb - rb0];
        const int64_t rows = min_i64(mr, n - rb * mr);
        for (int64_t r = 0; r < rows; ++r) {
          int32_t* yr = y + (rb * mr + r) * out + p * kPanel;
          const int32_t* sr = sum + r * kPanel;
          if (channels == kPanel) {
            store8(yr, _mm256_add_epi32(load8(sr), offset0));
            store8(yr + 8, _mm256_add_epi32(load8(sr + 8), offset1));
          } else {
            for (int64_t j = 0; j < channels; ++j) {
              yr[j] = static_cast<int32_t>(static_cast<uint32_t>(sr[j]) + static_cast<uint32_t>(offset[j]));
            }
          }
        }
      }
    }
  });
}

// The requantization constants of 8 channels: multiplier; when every lane's n >= 33 (`high`, the usual case),
// n − 32 and 2^(n−33) per lane, else n and 2^(n−1) on the even and odd 64-bit lanes (the others zero).
// alignas: this file is compiled without -mavx, and there __m256i (so a struct holding one) is only 16-byte
// aligned, while the code inside the AVX2 region moves it with 32-byte aligned loads and stores; a
// std::vector<Requant8> (depthwise_requantize_avx2) then got memory that crashed them.
struct alignas(32) Requant8 {
  bool high;
  __m256i m, shift_high, half_high, shift_even, shift_odd, half_even, half_odd;
};

inline Requant8 requant8_constants(const int32_t* multiplier, const int32_t* shift, __m256i mask) {
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
inline __m256i requant8(__m256i a, const Requant8& c, __m256i z, __m256i lo, __m256i hi) {
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
inline void store_sums8(__m256i v, int32_t* y, int64_t count) {
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
inline void store_codes8(__m256i q, int8_t* y, int64_t count) {
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

}  // namespace

namespace detail {

// acc is (N, P, OUT) int32; y is (N, OUT, P) codes — requantize_to_nchw_ref, 8 channels per step.
// P = 1 is the channels-last case, (ROWS, OUT) to (ROWS, OUT): each row's 8 codes are one 8-byte store.
void requantize_to_nchw_avx2(const int32_t* acc, const int32_t* multiplier, const int32_t* shift, int32_t zero_point,
                             int32_t act_min, int32_t act_max, int8_t* y, int64_t n, int64_t positions, int64_t out,
                             int threads) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i z = _mm256_set1_epi32(zero_point), lo = _mm256_set1_epi32(act_min), hi = _mm256_set1_epi32(act_max);
  if (positions == 1) {
    const int64_t blocks = ceil_div(n, kRequantPositionBlock);
    parallel_for(blocks, threads, [&](int64_t blk) {
      const int64_t i0 = blk * kRequantPositionBlock, i1 = min_i64(n, i0 + kRequantPositionBlock);
      for (int64_t o = 0; o < out; o += 8) {
        const int64_t count = min_i64(8, out - o);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), lane);
        const Requant8 c = requant8_constants(multiplier + o, shift + o, mask);
        for (int64_t i = i0; i < i1; ++i) {
          store_codes8(requant8(_mm256_maskload_epi32(acc + i * out + o, mask), c, z, lo, hi), y + i * out + o, count);
        }
      }
    });
    return;
  }
  parallel_for(n, threads, [&](int64_t i) {
    // Blocks of positions: the block's accumulator rows stay in L1 while every channel block reads them
    // (walking all positions per channel block would stream the whole (P, OUT) array OUT / 8 times).
    for (int64_t p0 = 0; p0 < positions; p0 += kRequantPositionBlock) {
      const int64_t p1 = min_i64(positions, p0 + kRequantPositionBlock);
      for (int64_t o = 0; o < out; o += 8) {
        const int64_t count = min_i64(8, out - o);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), lane);
        const Requant8 c = requant8_constants(multiplier + o, shift + o, mask);
        int8_t* yo = y + (i * out + o) * positions;
        for (int64_t p = p0; p < p1; ++p) {
          const __m256i q = requant8(_mm256_maskload_epi32(acc + (i * positions + p) * out + o, mask), c, z, lo, hi);
          alignas(32) int32_t codes[8];
          store8(codes, q);
          if (count == 8) {
#pragma GCC unroll 8
            for (int64_t j = 0; j < 8; ++j) yo[j * positions + p] = static_cast<int8_t>(codes[j]);
          } else {
            for (int64_t j = 0; j < count; ++j) yo[j * positions + p] = static_cast<int8_t>(codes[j]);
          }
        }
      }
    }
  });
}

// acc is (N, H, W, C) int32; y is (N, HO, WO, C) codes: the max pool of the requantized accumulators,
// computed as the requantization of the max-pooled accumulators. The two are equal, bit for bit, because
// requantize() is non-decreasing in acc (m > 0, then a rounding and a clamp, each non-decreasing), and a
// non-decreasing function commutes with max. So a Conv2d followed by a MaxPool2d requantizes 1/K² of the
// values and never stores its own codes.
void maxpool_requantize_avx2(const int32_t* acc, const Requant& rq, int8_t* y, int64_t n, int64_t c, int64_t height,
                             int64_t width, int64_t k, int64_t stride, int64_t padding, int threads) {
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i z = _mm256_set1_epi32(rq.zero_point), lo = _mm256_set1_epi32(rq.act_min);
  const __m256i hi = _mm256_set1_epi32(rq.act_max);
  parallel_for(n, threads, [&](int64_t i) {
    const int32_t* image = acc + i * height * width * c;
    for (int64_t o = 0; o < c; o += 8) {
      const int64_t count = min_i64(8, c - o);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), lane);
      const Requant8 constants = requant8_constants(rq.multiplier.data() + o, rq.shift.data() + o, mask);
      if (k == 2 && stride == 2 && padding == 0) {  // the common 2×2 pool: no clipping, 4 positions each
        const int64_t down = width * c;
        for (int64_t oh = 0; oh < ho; ++oh) {
          const int32_t* row = image + 2 * oh * down + o;
          int8_t* yo = y + (i * ho + oh) * wo * c + o;
          for (int64_t ow = 0; ow < wo; ++ow, row += 2 * c, yo += c) {
            const __m256i best = _mm256_max_epi32(
                _mm256_max_epi32(_mm256_maskload_epi32(row, mask), _mm256_maskload_epi32(row + c, mask)),
                _mm256_max_epi32(_mm256_maskload_epi32(row + down, mask), _mm256_maskload_epi32(row + down + c, mask)));
            store_codes8(requant8(best, constants, z, lo, hi), yo, count);
          }
        }
        continue;
      }
      for (int64_t oh = 0; oh < ho; ++oh) {
        const auto [ih0, ih1] = window_range(oh, k, stride, padding, height);
        for (int64_t ow = 0; ow < wo; ++ow) {
          const auto [iw0, iw1] = window_range(ow, k, stride, padding, width);
          __m256i best = _mm256_set1_epi32(INT32_MIN);
          for (int64_t ih = ih0; ih < ih1; ++ih)
            for (int64_t iw = iw0; iw < iw1; ++iw)
              best = _mm256_max_epi32(best, _mm256_maskload_epi32(image + (ih * width + iw) * c + o, mask));
          store_codes8(requant8(best, constants, z, lo, hi), y + ((i * ho + oh) * wo + ow) * c + o, count);
        }
      }
    }
  });
}

// The depthwise conv requantized in one pass (qconv2d_depthwise_requantized on the Avx2 and AvxVnni paths, and for
// K > 7 on the AVX-512 ones): per output position, 16 channels at a time, each sum in a register.
// - The taps go in pairs through vpmaddwd: the 16 codes of a tap widened to int16 (vpmovsxbw), two taps'
//   interleaved (vpunpcklwd / vpunpckhwd, which work within each 128-bit half), times their two weights, summed
//   in int32 (|x·w| <= 128·128: exact). The low interleave holds channels 0-3 and 8-11 of the block, the high one
//   4-7 and 12-15; the weights, biases and requantization constants are laid out in that order, and packing the
//   two results' codes (vpackssdw, then vpacksswb) puts the channels back in order.
// - z_in is folded into the bias, b − z_in·Σ_t w_t, and a tap in the padding reads a row of z_in codes, which
//   gives back exactly what the fold took: every sum is b + Σ_t w_t·(x_t − z_in), eq. 5, in wrapping int32 adds
//   (exact for a sum that fits, point 1 above).
// - The weight pairs, folded biases and requantization constants of every block are made once per call.
void depthwise_requantize_avx2(const int8_t* x, int32_t x_zero_point, const int8_t* w, const int32_t* b,
                               const Requant& rq, int8_t* y, const ConvShape& s, int threads) {
  constexpr int64_t kBlock = 16;
  const int64_t c = s.channels, k = s.kernel, taps = k * k, pairs = (taps + 1) / 2, blocks = ceil_div(c, kBlock);
  const int64_t ho = pooled_size(s.height, k, s.stride, s.padding), wo = pooled_size(s.width, k, s.stride, s.padding);
  // Lane l of half h (0: low, 1: high) of a block holds channel ((l / 4)·8 + h·4 + l % 4) of the block.
  const auto channel_of = [](int64_t h, int64_t l) { return l / 4 * 8 + h * 4 + l % 4; };
  // Per block and half: weight pairs (PAIRS, 16) int16, lanes 2l and 2l + 1 = taps 2p and 2p + 1 of lane l's
  // channel (0 past the last tap and channel); 8 folded biases; a Requant8.
  std::vector<int16_t> pair_weights(static_cast<size_t>(blocks * 2 * pairs * 16), 0);
  std::vector<int32_t> bias(static_cast<size_t>(blocks * 2 * 8), 0);
  std::vector<Requant8> constants;
  for (int64_t j = 0; j < blocks; ++j)
    for (int64_t h = 0; h < 2; ++h) {
      int32_t multiplier[8] = {}, shift[8] = {}, valid[8] = {};
      for (int64_t l = 0; l < 8; ++l) {
        const int64_t o = j * kBlock + channel_of(h, l);
        if (o >= c) continue;
        uint32_t folded = static_cast<uint32_t>(b[o]);
        for (int64_t t = 0; t < taps; ++t) {
          const int8_t wt = w[t * c + o];  // pack_grouped_conv's (K·K, OUT) codes
          pair_weights[static_cast<size_t>(((j * 2 + h) * pairs + t / 2) * 16 + l * 2 + t % 2)] = wt;
          folded -= static_cast<uint32_t>(x_zero_point) * static_cast<uint32_t>(static_cast<int32_t>(wt));
        }
        bias[static_cast<size_t>((j * 2 + h) * 8 + l)] = static_cast<int32_t>(folded);
        multiplier[l] = rq.multiplier[static_cast<size_t>(o)];
        shift[l] = rq.shift[static_cast<size_t>(o)];
        valid[l] = -1;
      }
      constants.push_back(requant8_constants(multiplier, shift, load8(valid)));
    }
  const std::vector<int8_t> padding_row(static_cast<size_t>(blocks * kBlock), static_cast<int8_t>(x_zero_point));
  std::vector<int64_t> tap_offsets;  // tap (kh, kw) from tap (0, 0) of a window, in bytes
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw = 0; kw < k; ++kw) tap_offsets.push_back((kh * s.width + kw) * c);
  const __m256i z = _mm256_set1_epi32(rq.zero_point), lo = _mm256_set1_epi32(rq.act_min);
  const __m256i hi = _mm256_set1_epi32(rq.act_max);
  parallel_for(s.n * ho, threads, [&](int64_t row) {  // output row (i, oh)
    const int64_t i = row / ho, oh = row % ho;
    // Each tap's pixel, or the padding row (also for the odd tap that completes the last pair).
    std::vector<const int8_t*> tap(static_cast<size_t>(2 * pairs), padding_row.data());
    const int64_t ih0 = oh * s.stride - s.padding;
    const bool rows_inside = ih0 >= 0 && ih0 + k <= s.height;
    for (int64_t ow = 0; ow < wo; ++ow) {
      const int64_t iw0 = ow * s.stride - s.padding;
      if (rows_inside && iw0 >= 0 && iw0 + k <= s.width) {                      // the whole window in the image
        const int8_t* window = x + ((i * s.height + ih0) * s.width + iw0) * c;  // its tap (0, 0)
        for (int64_t t = 0; t < taps; ++t) tap[static_cast<size_t>(t)] = window + tap_offsets[static_cast<size_t>(t)];
      } else {
        for (int64_t kh = 0; kh < k; ++kh)
          for (int64_t kw = 0; kw < k; ++kw) {
            const int64_t ih = ih0 + kh, iw = iw0 + kw;
            const bool inside = ih >= 0 && ih < s.height && iw >= 0 && iw < s.width;
            tap[static_cast<size_t>(kh * k + kw)] =
                inside ? x + ((i * s.height + ih) * s.width + iw) * c : padding_row.data();
          }
      }
      int8_t* yp = y + ((i * ho + oh) * wo + ow) * c;
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t count = min_i64(kBlock, c - kBlock * j);
        const auto load = [&](int64_t t) {  // the 16 codes of block j at tap t, as int16
          const int8_t* p = tap[static_cast<size_t>(t)] + kBlock * j;
          if (count == kBlock || p == padding_row.data() + kBlock * j)
            return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          alignas(16) int8_t codes[kBlock] = {};  // the last block of a pixel: no read past its channels
          std::memcpy(codes, p, static_cast<size_t>(count));
          return _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(codes)));
        };
        const int16_t* w0 = pair_weights.data() + j * 2 * pairs * 16;
        const int16_t* w1 = w0 + pairs * 16;
        __m256i acc0 = load8(bias.data() + j * 16), acc1 = load8(bias.data() + j * 16 + 8);
        for (int64_t p = 0; p < pairs; ++p) {
          const __m256i a = load(2 * p), bb = load(2 * p + 1);
          const auto weights = [&](const int16_t* wh) {
            return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wh + p * 16));
          };
          acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(_mm256_unpacklo_epi16(a, bb), weights(w0)));
          acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_unpackhi_epi16(a, bb), weights(w1)));
        }
        const __m256i q0 = requant8(acc0, constants[static_cast<size_t>(2 * j)], z, lo, hi);
        const __m256i q1 = requant8(acc1, constants[static_cast<size_t>(2 * j + 1)], z, lo, hi);
        const __m256i words = _mm256_packs_epi32(q0, q1);  // channels 0-7 | 8-15, as int16
        const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(words, words), 0b1000);
        const __m128i codes = _mm256_castsi256_si128(bytes);  // channels 0-15 in order
        if (count == kBlock) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(yp + kBlock * j), codes);
        } else {
          alignas(16) int8_t out[kBlock];
          _mm_store_si128(reinterpret_cast<__m128i*>(out), codes);
          std::memcpy(yp + kBlock * j, out, static_cast<size_t>(count));
        }
      }
    }
  });
}

#pragma GCC pop_options
// ---- end of the AVX2 region ----------------------------------------------------------------------------

// The GEMM of the Avx2 and AvxVnni paths. Outside the AVX2 region, like the dispatch that calls it: the functions
// it calls carry their instruction sets.
size_t qgemm_avx2_workspace_size(int64_t n, const PackedWeights& w) {
  const int64_t mr = rows_per_block(ymm_multiply(w));
  return static_cast<size_t>(ceil_div(n, mr) * mr * w.k_units);
}

void qgemm_avx2(const int8_t* x, int32_t x_zero_point, const PackedWeights& w, const int32_t* b, int32_t* y, int64_t n,
                int32_t* workspace, int threads) {
  const YmmMultiply m = ymm_multiply(w);  // the Avx2 and AvxVnni paths
  pack_x(x, n, w.in, m, w.k_units, workspace, threads);
  const int32_t z_eff = m == YmmMultiply::Madd ? x_zero_point : x_zero_point + 128;
  if (n == 1) return run_row(workspace, w.units.data(), w.row_sums.data(), m, w.k_units, b, z_eff, y, w.out);
  run_tiles(workspace, w.units.data(), w.row_sums.data(), m, w.k_units, b, z_eff, y, n, w.out, threads);
}

}  // namespace detail

// ---- Conv2d: an implicit GEMM on channels-last images ------------------------------------------------------
//
// With the images channels last, (N, H, W, C), the K×K window of an output position is K runs of K·C
// contiguous codes, one per kernel row. The weights are re-laid out once in the same order (kh, then kw and
// c), each kernel row padded with zero weights to a whole number of units, so the GEMM's K axis is
// "K kernel rows × SEGMENT units". The micro-kernel then reads every window straight out of the padded
// images with one pointer per GEMM row: no im2col rows are written, and nothing is packed per call.
// (The first version packed im2col rows into the GEMM layout; the packing took twice the time of the
// multiplications on lenet5.)
// A unit that runs past the end of a kernel row reads the next codes of the image, or the slack after the
// last image: their weights are 0, so they add nothing.

namespace {

using detail::kConvRowBlock;

// The x operand of one code as the GEMM reads it: int16 for 8-bit weights, x + 128 as u8 for 4-bit weights.
template <typename T>
T widen(int32_t code) {
  if constexpr (sizeof(T) == 2) {
    return static_cast<T>(code);
  } else {
    return static_cast<T>(code + 128);
  }
}

inline int32_t load_unit(const void* p) {  // 4 bytes at any alignment
  int32_t unit;
  std::memcpy(&unit, p, sizeof unit);
  return unit;
}

#pragma GCC push_options
#pragma GCC target("avx2")

// dst[j] = widen<T>(src[j]) for j < count, 16 at a time.
template <typename T>
void widen_row(const int8_t* src, T* dst, int64_t count) {
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    if constexpr (sizeof(T) == 2) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), _mm256_cvtepi8_epi16(codes));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                       _mm_xor_si128(codes, _mm_set1_epi8(static_cast<char>(0x80))));
    }
  }
  for (; j < count; ++j) dst[j] = widen<T>(src[j]);
}

}  // namespace

namespace detail {

// One image: x is (H, W, C) codes; plane is (H + 2·padding, W + 2·padding, C) operands, the padding set to pad.
// A function of its own, its sizes in registers: inside parallel_for's lambda, which the compiler does not inline
// here (another instruction set), every store of a byte could overwrite the captured sizes, and the loops reloaded
// them per byte instead of becoming vector stores.
template <typename T>
void build_plane(const int8_t* x, T pad, T* plane, int64_t c, int64_t height, int64_t width, int64_t padding) {
  const int64_t hp = height + 2 * padding, line = (width + 2 * padding) * c, border = padding * c;
  for (int64_t r = 0; r < hp; ++r) {
    const int64_t ih = r - padding;
    T* dst = plane + r * line;
    if (ih < 0 || ih >= height) {
      for (int64_t j = 0; j < line; ++j) dst[j] = pad;
      continue;
    }
    for (int64_t j = 0; j < border; ++j) dst[j] = dst[line - border + j] = pad;
    widen_row(x + ih * width * c, dst + border, width * c);
  }
}

// x is (N, H, W, C) codes; planes is (N, H + 2·padding, W + 2·padding, C) operands, the padding set to z_in.
template <typename T>
void build_planes(const int8_t* x, int32_t x_zero_point, T* planes, int64_t n, int64_t c, int64_t height, int64_t width,
                  int64_t padding, int threads) {
  const int64_t plane = (height + 2 * padding) * (width + 2 * padding) * c;
  parallel_for(n, threads, [&](int64_t i) {
    build_plane(x + i * height * width * c, widen<T>(x_zero_point), planes + i * plane, c, height, width, padding);
  });
}

}  // namespace detail

namespace {

// The conv micro-kernels. x[r] points at the window of GEMM row r (kernel row 0, first code); unit t of a
// window starts offsets[t] operands further (PackedConv::unit_offsets). wp is (K · SEGMENT, 8·V) units: a panel of 8·V
// output channels, V = 2 (16 channels) or V = 1 (8 channels, for layers with at most 8: a 16-channel panel would
// compute 8 lanes of padding); tile is (MR, 8·V) int32 = Σ x·w. MR·V = 12 accumulators live in registers. 8-bit weights
// (T = int16): as micro_kernel_s8, vpmaddwd on int16 pairs, which cannot overflow.
template <int MR, int V>
__attribute__((noipa)) void conv_kernel_s8(const int16_t* const* x, const int32_t* offsets, int64_t k_units,
                                           const int32_t* wp, int32_t* tile) {
  __m256i acc[MR][V];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
  const int16_t* xr[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) xr[r] = x[r];
  for (int64_t t = 0; t < k_units; ++t) {
    const int64_t at = offsets[t];
    __m256i w[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) w[v] = load8(wp + 8 * v);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m256i xv = _mm256_set1_epi32(load_unit(xr[r] + at));
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(xv, w[v]));
    }
    wp += 8 * V;
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) store8(tile + (r * V + v) * 8, acc[r][v]);
}

// 4-bit weights (T = u8, x + 128): two units per step (SEGMENT is even), as micro_kernel_s4 — the same
// proof that no int16 sum saturates. MR·V = 8 accumulators.
template <int MR, int V>
__attribute__((noipa)) void conv_kernel_s4(const uint8_t* const* x, const int32_t* offsets, int64_t k_units,
                                           const int32_t* wp, int32_t* tile) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][V];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
  const uint8_t* xr[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) xr[r] = x[r];
  for (int64_t t = 0; t < k_units; t += 2) {  // units t and t + 1 are adjacent (SEGMENT is even)
    const int64_t at = offsets[t];
    __m256i w0[V], w1[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) {
      w0[v] = load8(wp + 8 * v);
      w1[v] = load8(wp + 8 * V + 8 * v);
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m256i x0 = _mm256_set1_epi32(load_unit(xr[r] + at));
      const __m256i x1 = _mm256_set1_epi32(load_unit(xr[r] + at + 4));
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) {
        const __m256i sum = _mm256_add_epi16(_mm256_maddubs_epi16(x0, w0[v]), _mm256_maddubs_epi16(x1, w1[v]));
        acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(sum, ones));
      }
    }
    wp += 16 * V;
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) store8(tile + (r * V + v) * 8, acc[r][v]);
}

// Rows per conv micro-kernel call of conv_block (Avx2 and AvxVnni), by path, weight bits and panel width.
inline int64_t conv_rows_per_block(KernelPath path, int bits, int64_t panel) {
  if (path == KernelPath::AvxVnni) return detail::conv_rows_avxvnni(panel);
  if (bits == 8) return panel == 16 ? 6 : 12;
  return panel == 16 ? 4 : 8;
}
constexpr int64_t kConvMaxRows = 12;
static_assert(detail::conv_rows_vnni(1) <= kConvMaxRows && kConvRowBlock % detail::conv_rows_vnni(1) == 0 &&
              kConvRowBlock % detail::conv_rows_vnni(2) == 0);
static_assert(detail::conv_rows_avxvnni(8) <= kConvMaxRows && kConvRowBlock % detail::conv_rows_avxvnni(8) == 0 &&
              kConvRowBlock % detail::conv_rows_avxvnni(16) == 0);

// The epilogue constants of one panel for conv_block (Avx2, AvxVnni): offset b − z_eff·Σw per channel (wrapping), which
// of the two halves of 8 channels exist, and their requantization constants.
struct PanelEpilogue {
  alignas(32) int32_t offset[kPanel];
  int64_t channels, count0, count1;  // channels of the panel, and in each half
  Requant8 rq0, rq1;
};

PanelEpilogue panel_epilogue(const PackedWeights& w, const int32_t* b, const Requant* rq, int32_t z_eff, int64_t p,
                             int64_t panel, __m256i lane) {
  PanelEpilogue e{};
  e.channels = min_i64(panel, w.out - p * panel);
  for (int64_t j = 0; j < e.channels; ++j) {
    const int64_t o = p * panel + j;
    e.offset[j] = detail::channel_offset(b[o], z_eff, w.row_sums[o]);
  }
  e.count0 = min_i64(8, e.channels);
  e.count1 = e.channels - e.count0;
  const __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(e.count0)), lane);
  const __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(e.count1)), lane);
  if (rq) {
    e.rq0 = requant8_constants(rq->multiplier.data() + p * panel, rq->shift.data() + p * panel, mask0);
    if (e.count1 > 0)
      e.rq1 = requant8_constants(rq->multiplier.data() + p * panel + 8, rq->shift.data() + p * panel + 8, mask1);
  }
  return e;
}

// The epilogue constants of every panel of pc for bias b: computed once per call of conv_rows(_pooled).
std::vector<PanelEpilogue> panel_epilogues(const PackedConv& pc, const int32_t* b, const Requant* rq, int32_t z_eff) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  std::vector<PanelEpilogue> ep(static_cast<size_t>(ceil_div(pc.weights.out, pc.panel_channels)));
  for (size_t p = 0; p < ep.size(); ++p)
    ep[p] = panel_epilogue(pc.weights, b, rq, z_eff, static_cast<int64_t>(p), pc.panel_channels, lane);
  return ep;
}

// The channel offsets b − z_eff·Σw of every panel, one after another: (PANELS, PANEL) int32, 0 past OUT, as
// conv_block_vnni512 and conv_pool_vnni512 read them.
std::vector<int32_t> channel_offsets(const PackedConv& pc, const int32_t* b, int32_t z_eff) {
  const PackedWeights& w = pc.weights;
  std::vector<int32_t> offsets(static_cast<size_t>(ceil_div(w.out, pc.panel_channels) * pc.panel_channels), 0);
  for (int64_t o = 0; o < w.out; ++o) offsets[o] = detail::channel_offset(b[o], z_eff, w.row_sums[o]);
  return offsets;
}

// One block of `count` <= kConvRowBlock GEMM rows of the convolution on the Avx2 and AvxVnni paths (Vnni512 and Amx:
// conv_block_vnni512), row r's window at window[r] (the last one repeated up to a whole MR after them): for each
// panel, every MR-row block of the block in turn; the int32 sums + offset stored into acc (COUNT, OUT) when rq is
// null, else their codes (eq. 6) into y (COUNT, OUT), straight from the tile while it is in L1.
template <typename T>
void conv_block(const T* const* window, int64_t count, const PackedConv& pc, const PanelEpilogue* ep, const Requant* rq,
                int32_t* acc, int8_t* y) {
  const PackedWeights& w = pc.weights;
  const int32_t* offsets = pc.unit_offsets.data();
  const int64_t panel = pc.panel_channels, out = w.out, panels = ceil_div(out, panel);
  const __m256i z_out = _mm256_set1_epi32(rq ? rq->zero_point : 0);
  const __m256i lo = _mm256_set1_epi32(rq ? rq->act_min : 0), hi = _mm256_set1_epi32(rq ? rq->act_max : 0);
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t mr = conv_rows_per_block(w.path, w.bits, panel);
    const int32_t* wpanel = w.units.data() + p * w.k_units * panel;
    const PanelEpilogue& e = ep[p];
    const int64_t o0 = p * panel;
    for (int64_t r0 = 0; r0 < count; r0 += mr) {
      alignas(64) int32_t tile[kConvMaxRows * kPanel];  // (MR, panel)
      const T* const* xr = window + r0;
      if constexpr (sizeof(T) == 2) {
        if (panel == 16) {
          conv_kernel_s8<6, 2>(xr, offsets, w.k_units, wpanel, tile);
        } else {
          conv_kernel_s8<12, 1>(xr, offsets, w.k_units, wpanel, tile);
        }
      } else if (w.path == KernelPath::AvxVnni) {
        detail::conv_tile_avxvnni(xr, offsets, w.k_units, wpanel, panel, tile);
      } else if (panel == 16) {
        conv_kernel_s4<4, 2>(xr, offsets, w.k_units, wpanel, tile);
      } else {
        conv_kernel_s4<8, 1>(xr, offsets, w.k_units, wpanel, tile);
      }
      for (int64_t r = r0; r < min_i64(count, r0 + mr); ++r) {
        const int32_t* tr = tile + (r - r0) * panel;
        const __m256i a0 = _mm256_add_epi32(load8(tr), load8(e.offset));
        const __m256i a1 = e.count1 > 0 ? _mm256_add_epi32(load8(tr + 8), load8(e.offset + 8)) : _mm256_setzero_si256();
        if (rq) {
          int8_t* yr = y + r * out + o0;
          store_codes8(requant8(a0, e.rq0, z_out, lo, hi), yr, e.count0);
          if (e.count1 > 0) store_codes8(requant8(a1, e.rq1, z_out, lo, hi), yr + 8, e.count1);
        } else {
          int32_t* ar = acc + r * out + o0;
          store_sums8(a0, ar, e.count0);
          if (e.count1 > 0) store_sums8(a1, ar + 8, e.count1);
        }
      }
    }
  }
}

}  // namespace

namespace detail {

// GEMM rows [first, first + rows) of the convolution of planes (operands T), channels last: the int32
// accumulators into acc (ROWS, OUT) when rq is null, else their codes requantized (eq. 6) into y (ROWS, OUT).
// Blocks of kConvRowBlock rows (conv_block).
template <typename T>
void conv_rows(const T* planes, const PackedConv& pc, int32_t z_eff, const int32_t* b, const Requant* rq, int32_t* acc,
               int8_t* y, int64_t first, int64_t rows) {
  const int64_t c = pc.channels, k = pc.kernel, stride = pc.stride, padding = pc.padding, out = pc.weights.out;
  const int64_t height = pc.height, width = pc.width, hp = height + 2 * padding, wp = width + 2 * padding;
  const int64_t ho = pooled_size(height, k, stride, padding), wo = pooled_size(width, k, stride, padding);
  // The epilogue constants: for conv_block_vnni512 only the offsets (it makes its own requantization constants).
  const bool vnni512 = sizeof(T) == 1 && detail::uses_avx512(pc.weights.path);
  const std::vector<PanelEpilogue> ep = vnni512 ? std::vector<PanelEpilogue>{} : panel_epilogues(pc, b, rq, z_eff);
  const std::vector<int32_t> offsets_vnni = vnni512 ? channel_offsets(pc, b, z_eff) : std::vector<int32_t>{};
  int64_t i = first / (ho * wo), oh = first / wo % ho, ow = first % wo;  // stepped below: no division per row
  const auto row_start = [&] { return planes + ((i * hp + oh * stride) * wp) * c; };  // window (i, oh, 0)
  const T* next = row_start() + ow * stride * c;  // the window of row `start`, then one step of stride·C each
  for (int64_t start = 0; start < rows; start += kConvRowBlock) {
    const int64_t count = min_i64(kConvRowBlock, rows - start);
    const T* window[kConvRowBlock + kConvMaxRows];  // each row's window; the last row repeated up to a whole MR
    for (int64_t r = 0; r < count; ++r) {
      window[r] = next;
      next += stride * c;
      if (++ow == wo) {
        ow = 0;
        if (++oh == ho) {
          oh = 0;
          ++i;
        }
        if (start + r + 1 < rows) next = row_start();  // (never a window past the last image)
      }
    }
    for (int64_t r = count; r < count + kConvMaxRows; ++r) window[r] = window[count - 1];  // covers any MR
    int32_t* block_acc = rq ? nullptr : acc + start * out;
    int8_t* block_y = rq ? y + start * out : nullptr;
    if constexpr (sizeof(T) == 1) {
      if (vnni512) {
        detail::conv_block_vnni512(window, count, pc, offsets_vnni.data(), rq, block_acc, block_y);
        continue;
      }
    }
    conv_block(window, count, pc, ep.data(), rq, block_acc, block_y);
  }
}

// Pairs [first, first + pairs) of output rows (pair q: rows 2·(q mod HO/2) and the next of image q div HO/2),
// pooled (2 × 2) and requantized into y, pooled row q at y + q·(WO/2)·OUT. On Vnni512 with 16-channel panels the
// micro-kernel takes the four windows of each pooled output (conv_pool_vnni512). Elsewhere conv_block runs as many
// whole pairs per block as kConvRowBlock holds, their int32 sums into acc, and each pair is pooled from there: the
// sums never leave L1.
template <typename T>
void conv_rows_pooled(const T* planes, const PackedConv& pc, int32_t z_eff, const int32_t* b, const Requant& rq,
                      int32_t* acc, int8_t* y, int64_t first, int64_t pairs) {
  const int64_t c = pc.channels, k = pc.kernel, stride = pc.stride, padding = pc.padding, out = pc.weights.out;
  const int64_t hp = pc.height + 2 * padding, wp = pc.width + 2 * padding;
  const int64_t ho = pooled_size(pc.height, k, stride, padding), wo = pooled_size(pc.width, k, stride, padding);
  const int64_t pooled_rows = ho / 2;
  const bool vnni512 = sizeof(T) == 1 && detail::uses_avx512(pc.weights.path);
  const std::vector<PanelEpilogue> ep = vnni512 ? std::vector<PanelEpilogue>{} : panel_epilogues(pc, b, nullptr, z_eff);
  const std::vector<int32_t> offsets_vnni = vnni512 ? channel_offsets(pc, b, z_eff) : std::vector<int32_t>{};
  if constexpr (sizeof(T) == 1) {
    if (vnni512 && pc.panel_channels == 16) {
      // The pool in the micro-kernel: the four windows of each pooled output of a pooled row, in turn.
      const int64_t pooled = wo / 2;
      const T* window[kConvRowBlock + 4 * detail::kMaxPooledPerCall];  // 4·(WO/2) <= 2·WO <= kConvRowBlock
      for (int64_t q = first; q < first + pairs; ++q) {
        const int64_t i = q / pooled_rows, oh = q % pooled_rows * 2;
        const T* at = planes + (i * hp + oh * stride) * wp * c;  // window (i, oh, 0), then (i, oh, 2·pw)
        const int64_t right = stride * c, down = stride * wp * c;
        const T** next = window;
        for (int64_t pw = 0; pw < pooled; ++pw, at += 2 * right) {  // windows (oh or oh + 1, 2·pw or 2·pw + 1)
          *next++ = at;
          *next++ = at + right;
          *next++ = at + down;
          *next++ = at + down + right;
        }
        for (int64_t r = 4 * pooled; r < 4 * (pooled + detail::kMaxPooledPerCall - 1); ++r) window[r] = window[r - 4];
        detail::conv_pool_vnni512(window, pooled, pc, offsets_vnni.data(), rq, y + q * pooled * out);
      }
      return;
    }
  }
  const int64_t per_block = kConvRowBlock / (2 * wo);
  for (int64_t q0 = first; q0 < first + pairs; q0 += per_block) {
    const int64_t block_pairs = min_i64(per_block, first + pairs - q0), count = block_pairs * 2 * wo;
    const T* window[kConvRowBlock + kConvMaxRows];
    const T** next = window;
    for (int64_t q = q0; q < q0 + block_pairs; ++q) {
      const int64_t i = q / pooled_rows, oh = q % pooled_rows * 2;
      for (int64_t r = oh; r < oh + 2; ++r)
        for (int64_t ow = 0; ow < wo; ++ow) *next++ = planes + ((i * hp + r * stride) * wp + ow * stride) * c;
    }
    for (int64_t r = count; r < count + kConvMaxRows; ++r) window[r] = window[count - 1];  // covers any MR
    if constexpr (sizeof(T) == 1) {
      if (vnni512) detail::conv_block_vnni512(window, count, pc, offsets_vnni.data(), nullptr, acc, nullptr);
    }
    if (!vnni512) conv_block(window, count, pc, ep.data(), nullptr, acc, nullptr);
    // The pairs of the block are `block_pairs` images of 2 × WO: pooled, each gives one row of y.
    int8_t* yq = y + q0 * (wo / 2) * out;
    if (detail::uses_avx512(pc.weights.path)) {
      detail::maxpool2_requantize_avx512(acc, rq, yq, block_pairs, out, 2, wo, 1);
    } else {
      detail::maxpool_requantize_avx2(acc, rq, yq, block_pairs, out, 2, wo, 2, 2, 0, 1);
    }
  }
}

// The two operand types (kernels_isa.h): int16 codes, and x + 128 as u8.
template void build_planes(const int8_t*, int32_t, int16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int);
template void build_planes(const int8_t*, int32_t, uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int);
template void conv_rows(const int16_t*, const PackedConv&, int32_t, const int32_t*, const Requant*, int32_t*, int8_t*,
                        int64_t, int64_t);
template void conv_rows(const uint8_t*, const PackedConv&, int32_t, const int32_t*, const Requant*, int32_t*, int8_t*,
                        int64_t, int64_t);
template void conv_rows_pooled(const int16_t*, const PackedConv&, int32_t, const int32_t*, const Requant&, int32_t*,
                               int8_t*, int64_t, int64_t);
template void conv_rows_pooled(const uint8_t*, const PackedConv&, int32_t, const int32_t*, const Requant&, int32_t*,
                               int8_t*, int64_t, int64_t);

#pragma GCC pop_options

__attribute__((target("avx2"))) void add_requantize_avx2(const int8_t* a, const int8_t* b, int8_t* y, int64_t count,
                                                         const Rescale& r, const Requant& rq) {
  // Four elements per step, each in a 64-bit lane: eq. 10 as requantize_add computes it (requantize.h).
  const __m256i za = _mm256_set1_epi64x(r.zero_points[0]), zb = _mm256_set1_epi64x(r.zero_points[1]);
  const __m256i ma = _mm256_set1_epi64x(r.multipliers[0]), mb = _mm256_set1_epi64x(r.multipliers[1]);
  const __m256i half = _mm256_set1_epi64x(int64_t{1} << (r.shift - 1)), zero = _mm256_setzero_si256();
  const __m256i z_out = _mm256_set1_epi64x(rq.zero_point);
  const __m256i lo = _mm256_set1_epi64x(rq.act_min), hi = _mm256_set1_epi64x(rq.act_max);
  const __m128i shift = _mm_cvtsi32_si128(r.shift);
  int64_t k = 0;
  for (; k + 4 <= count; k += 4) {
    int32_t a4, b4;
    std::memcpy(&a4, a + k, 4);
    std::memcpy(&b4, b + k, 4);
    const __m256i xa = _mm256_sub_epi64(_mm256_cvtepi8_epi64(_mm_cvtsi32_si128(a4)), za);
    const __m256i xb = _mm256_sub_epi64(_mm256_cvtepi8_epi64(_mm_cvtsi32_si128(b4)), zb);
    // vpmuldq multiplies the low 32 bits of each lane, signed, into 64: |q − z| <= 255 and m < 2^31, exact.
    const __m256i sum = _mm256_add_epi64(_mm256_mul_epi32(xa, ma), _mm256_mul_epi32(xb, mb));
    // rounding_right_shift_half_away: round the magnitude (a logical shift, AVX2 has no 64-bit arithmetic
    // one), then give the sign back.
    const __m256i sign = _mm256_cmpgt_epi64(zero, sum);
    const __m256i magnitude = _mm256_sub_epi64(_mm256_xor_si256(sum, sign), sign);
    const __m256i rounded = _mm256_srl_epi64(_mm256_add_epi64(magnitude, half), shift);
    __m256i out = _mm256_add_epi64(_mm256_sub_epi64(_mm256_xor_si256(rounded, sign), sign), z_out);
    out = _mm256_blendv_epi8(out, lo, _mm256_cmpgt_epi64(lo, out));
    out = _mm256_blendv_epi8(out, hi, _mm256_cmpgt_epi64(out, hi));
    alignas(32) int64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), out);
    for (int j = 0; j < 4; ++j) y[k + j] = static_cast<int8_t>(lanes[j]);
  }
  for (; k < count; ++k)
    y[k] = requantize_add(a[k], r.zero_points[0], r.multipliers[0], b[k], r.zero_points[1], r.multipliers[1], r.shift,
                          rq.zero_point, rq.act_min, rq.act_max);
}
}  // namespace detail

}  // namespace lowbit::quant::runtime
