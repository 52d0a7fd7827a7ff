// The implicit-GEMM convolution of the fast paths (Conv2d on channels-last images): the padded planes, the
// windows of each block of GEMM rows, and the AVX2 micro-kernels with their epilogues; the AVX-VNNI and AVX-512
// micro-kernels it drives live in kernels_avxvnni.cpp and kernels_avx512.cpp. kernels_dispatch.cpp calls it
// through the entry points in kernels_isa.h.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "quant/runtime/avx2_helpers.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"

namespace lowbit::quant::runtime {

namespace {

constexpr int64_t kPanel = PackedWeights::kPanelChannels;  // 16 output channels: 2 ymm of int32

using detail::ceil_div, detail::min_i64, detail::load8, detail::store8, detail::Requant8, detail::requant8_constants,
    detail::requant8, detail::store_sums8, detail::store_codes8;  // avx2_helpers.h

}  // namespace

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

// widen_row<uint8_t> 64 codes at a time, the tail masked (twice as fast as 16 at a time on 25 KB planes).
// A target attribute, not a pragma: clang (the fuzz build) ignores GCC's target pragmas.
__attribute__((target("avx2,avx512f,avx512bw"))) void flip_row_avx512(const int8_t* src, uint8_t* dst,
                                                                     int64_t count) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t j = 0;
  for (; j + 64 <= count; j += 64) _mm512_storeu_si512(dst + j, _mm512_xor_si512(_mm512_loadu_si512(src + j), flip));
  if (j < count) {
    const __mmask64 mask = detail::low_bits(count - j);
    _mm512_mask_storeu_epi8(dst + j, mask, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, src + j), flip));
  }
}

}  // namespace

namespace detail {

// One image: x is (H, W, C) codes; plane is (H + 2·padding, W + 2·padding, C) operands, the padding set to pad.
// A function of its own, its sizes in registers: inside parallel_for's lambda, which the compiler does not inline
// here (another instruction set), every store of a byte could overwrite the captured sizes, and the loops reloaded
// them per byte instead of becoming vector stores.
template <typename T>
void build_plane(const int8_t* x, T pad, T* plane, int64_t c, int64_t height, int64_t width, int64_t padding,
                 bool avx512) {
  const auto copy = [avx512](const int8_t* src, T* dst, int64_t count) {  // dst[j] = widen<T>(src[j])
    if constexpr (sizeof(T) == 1) {
      if (avx512) return flip_row_avx512(src, dst, count);
    }
    widen_row(src, dst, count);
  };
  if (padding == 0) return copy(x, plane, height * width * c);  // the rows follow one another in both
  const int64_t hp = height + 2 * padding, line = (width + 2 * padding) * c, border = padding * c;
  for (int64_t r = 0; r < hp; ++r) {
    const int64_t ih = r - padding;
    T* dst = plane + r * line;
    if (ih < 0 || ih >= height) {
      for (int64_t j = 0; j < line; ++j) dst[j] = pad;
      continue;
    }
    for (int64_t j = 0; j < border; ++j) dst[j] = dst[line - border + j] = pad;
    copy(x + ih * width * c, dst + border, width * c);
  }
}

// x is (N, H, W, C) codes; planes is (N, H + 2·padding, W + 2·padding, C) operands, the padding set to z_in.
template <typename T>
void build_planes(const int8_t* x, int32_t x_zero_point, T* planes, int64_t n, int64_t c, int64_t height, int64_t width,
                  int64_t padding, bool avx512, int threads) {
  const int64_t plane = (height + 2 * padding) * (width + 2 * padding) * c;
  parallel_for(n, threads, [&](int64_t i) {
    build_plane(x + i * height * width * c, widen<T>(x_zero_point), planes + i * plane, c, height, width, padding,
                avx512);
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
      // The pool in the micro-kernel: the four windows of each pooled output, kPooledPerCall outputs per call
      // (several pooled rows of a small layer: its requantization constants are made once per call).
      constexpr int64_t kPooledPerCall = 64;
      const int64_t pooled = wo / 2, right = stride * c, down = stride * wp * c;
      const T* window[4 * (kPooledPerCall + detail::kMaxPooledPerCall - 1)];
      // Window (i, oh, 0) of pooled row q: image i = q div (HO/2), conv row oh = 2·(q mod (HO/2)).
      const auto row_start = [&](int64_t q) {
        return planes + (q / pooled_rows * hp + q % pooled_rows * 2 * stride) * wp * c;
      };
      if (pairs <= 0) return;
      int64_t q = first, pw = 0;  // the next output: pooled row q, column pw, its first window at `at`
      const T* at = row_start(q);
      for (int64_t o0 = first * pooled; o0 < (first + pairs) * pooled; o0 += kPooledPerCall) {
        const int64_t count = min_i64(kPooledPerCall, (first + pairs) * pooled - o0);
        const T** next = window;
        for (int64_t o = 0; o < count; ++o) {  // windows (oh or oh + 1, 2·pw or 2·pw + 1)
          *next++ = at;
          *next++ = at + right;
          *next++ = at + down;
          *next++ = at + down + right;
          if (++pw < pooled) {
            at += 2 * right;
          } else {
            pw = 0;
            if (++q < first + pairs) at = row_start(q);  // (never a window past the last image)
          }
        }
        for (int64_t r = 4 * count; r < 4 * (count + detail::kMaxPooledPerCall - 1); ++r) window[r] = window[r - 4];
        detail::conv_pool_vnni512(window, count, pc, offsets_vnni.data(), rq, y + o0 * out);
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
template void build_planes(const int8_t*, int32_t, int16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int);
template void build_planes(const int8_t*, int32_t, uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int);
template void conv_rows(const int16_t*, const PackedConv&, int32_t, const int32_t*, const Requant*, int32_t*, int8_t*,
                        int64_t, int64_t);
template void conv_rows(const uint8_t*, const PackedConv&, int32_t, const int32_t*, const Requant*, int32_t*, int8_t*,
                        int64_t, int64_t);
template void conv_rows_pooled(const int16_t*, const PackedConv&, int32_t, const int32_t*, const Requant&, int32_t*,
                               int8_t*, int64_t, int64_t);
template void conv_rows_pooled(const uint8_t*, const PackedConv&, int32_t, const int32_t*, const Requant&, int32_t*,
                               int8_t*, int64_t, int64_t);

#pragma GCC pop_options

}  // namespace detail

}  // namespace lowbit::quant::runtime
