// AVX2 integer kernels (vpmaddwd for int8 weights, vpmaddubsw for int4), bit-exact with the reference.
// The GEMM (its driver also runs the AVX-VNNI micro-kernels), requantization, pooling, the depthwise Conv2d and
// the Add; the convolution's implicit GEMM is kernels_conv.cpp, and the AVX2 helpers both use avx2_helpers.h.
// kernels_dispatch.cpp packs the weights and calls these through their entry points in kernels_isa.h.
#include <immintrin.h>

#include <climits>
#include <cstring>

#include "quant/runtime/avx2_helpers.h"
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

using detail::ceil_div, detail::min_i64, detail::load8, detail::store8, detail::Requant8, detail::requant8_constants,
    detail::requant8, detail::store_sums8, detail::store_codes8;  // avx2_helpers.h

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

// The depthwise conv requantized in one pass (qconv2d_depthwise_requantized on the Avx2 path, and for K > 7 on the
// others): per output position, 16 channels at a time, each sum in a register.
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

// 128 channels per pass with 8 accumulators of 16 int16 sums each, flushed to the int32 sums every 256
// positions: |Σ| <= 256 · 128 = 2^15 fits int16 (the one sum of 2^15, all −128, is −2^15).
__attribute__((target("avx2"))) void channel_sums_avx2(const int8_t* x, int64_t positions, int64_t c, int32_t* sums) {
  constexpr int64_t kBlock = 128, kFlush = 256;
  std::fill(sums, sums + c, 0);
  int64_t c0 = 0;
  for (int64_t vectors; (vectors = std::min<int64_t>(kBlock, c - c0) / 16) > 0; c0 += 16 * vectors) {
    // channels [c0, c0 + 16·vectors): up to 8 whole vectors of 16
    for (int64_t p0 = 0; p0 < positions; p0 += kFlush) {
      __m256i acc[kBlock / 16];
      for (auto& a : acc) a = _mm256_setzero_si256();
      const int64_t p1 = std::min(positions, p0 + kFlush);
      for (int64_t p = p0; p < p1; ++p) {
        const int8_t* row = x + p * c + c0;
#pragma GCC unroll 8
        for (int64_t v = 0; v < kBlock / 16; ++v)
          if (v < vectors)
            acc[v] = _mm256_add_epi16(
                acc[v], _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * v))));
      }
      for (int64_t v = 0; v < vectors; ++v) {
        int32_t* out = sums + c0 + 16 * v;
        const __m256i low = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[v]));
        const __m256i high = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[v], 1));
        store8(out, _mm256_add_epi32(load8(out), low));
        store8(out + 8, _mm256_add_epi32(load8(out + 8), high));
      }
    }
  }
  for (int64_t p = 0; p < positions; ++p)  // the last c % 16 channels
    for (int64_t ch = c0; ch < c; ++ch) sums[ch] += x[p * c + ch];
}

}  // namespace detail

}  // namespace lowbit::quant::runtime
