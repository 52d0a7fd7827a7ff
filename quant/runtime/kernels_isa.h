// Internal to quant/runtime: the entry points of the AVX2, AVX-VNNI, AVX-512 VNNI and AMX kernel files, which the
// dispatch in kernels_dispatch.cpp (and kernels_graph.cpp) calls once the CPU has been checked (cpu.h). Not part of
// the library's interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/parallel.h"
#include "quant/runtime/kernels.h"

namespace lowbit::quant::runtime::detail {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// The calling thread's buffer of at least n T's (contents unspecified): it grows and is never freed, so a kernel
// that runs once per image and op allocates once per thread, not once per call.
template <typename T>
T* thread_buffer(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// The paths that run AVX-512 kernels (Amx runs everything but its tile GEMMs on the Vnni512 ones). The others,
// AvxVnni included, must never reach a function of kernels_avx512.cpp: their CPUs may lack AVX-512.
constexpr bool uses_avx512(KernelPath path) { return path == KernelPath::Vnni512 || path == KernelPath::Amx; }

// The Amx path runs a GEMM on tiles from this many rows on; fewer rows would leave most of an A tile empty,
// and go to the Vnni512 kernels.
constexpr int64_t kAmxMinRows = 32;
// The Vnni512 conv micro-kernel takes up to kConvPanelsVnni panels of 16 channels per call, and this many
// rows: 12 for one panel (or one of 8 channels), 6 for 2-4 panels (24 accumulators at most). Multiples of
// both divide kConvRowBlock.
constexpr int64_t kConvPanelsVnni = 4;
constexpr int64_t conv_rows_vnni(int64_t panels_per_call) { return panels_per_call == 1 ? 12 : 6; }
// GEMM rows per block of conv_rows (kernels_conv.cpp): their windows stay in L1 while every panel passes, and a
// block makes its panels' epilogue constants once. 192 against 96, alternated (µs per image, vnni): dsconv's
// stem 3.26 → 3.13, its first pointwise conv 7.81 → 7.56, resnet8's 16 → 16 conv 7.46 → 7.35, convbn's first
// conv (avxvnni) 7.30 → 6.87; 384 gained no more.
constexpr int64_t kConvRowBlock = 192;

// The unit of an Avx2 8-bit panel (PackedWeights) holds two codes as int16: code goes to half 0 (low, even k) or 1.
// pack_weights (kernels_dispatch.cpp) lays out the weights with it, pack_x (kernels_avx2.cpp) the rows of x.
inline uint32_t int16_half(int32_t code, int half) {
  return static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(code))) << (16 * half);
}

// The constant b − z_eff·Σ_k w[o][k] of output channel o, which every row of a GEMM or convolution adds to its sum
// of raw products: z_eff·Σw takes out what the input zero point (and the +128 that makes int8 codes u8 operands)
// added. The int32 arithmetic wraps, as the reference's does (point 3 at the top of kernels_avx512.cpp).
inline int32_t channel_offset(int32_t b, int32_t z_eff, int32_t row_sum) {
  return static_cast<int32_t>(static_cast<uint32_t>(b) - static_cast<uint32_t>(z_eff) * static_cast<uint32_t>(row_sum));
}

// The mask of the lowest `count` of 64 bits (0 for count <= 0): which bytes of a 64-byte row, or lanes of a vector,
// a masked load or store touches (AVX-512 and AMX paths).
inline uint64_t low_bits(int64_t count) {
  return count >= 64 ? ~uint64_t{0} : count <= 0 ? 0 : (uint64_t{1} << count) - 1;
}

// ---- kernels_conv.cpp ----

// conv_planes for the operands T: int16_t (codes, for Avx2 with 8-bit weights) or uint8_t (x + 128).
// x is (N, H, W, C) codes; planes is (N, H + 2·padding, W + 2·padding, C) operands, the padding set to z_in.
// avx512: the path has AVX-512 (uses_avx512), and u8 operands are made 64 at a time.
template <typename T>
void build_planes(const int8_t* x, int32_t x_zero_point, T* planes, int64_t n, int64_t c, int64_t height, int64_t width,
                  int64_t padding, bool avx512, int threads);

// GEMM rows [first, first + rows) of the convolution of planes (operands T, from build_planes) on the Avx2, AvxVnni
// or Vnni512 micro-kernels (pc's path; not its amx_tiles): acc (ROWS, OUT) int32 when rq is null, else y (ROWS,
// OUT) codes (eq. 6). z_eff is z_in for int16 operands, z_in + 128 for u8 ones.
template <typename T>
void conv_rows(const T* planes, const PackedConv& pc, int32_t z_eff, const int32_t* b, const Requant* rq, int32_t* acc,
               int8_t* y, int64_t first, int64_t rows);
// The 2 × 2 max pool (stride 2) of that convolution, fused: pairs [first, first + pairs) of output rows, their
// pooled codes into y (pooled row q at y + q·(WO/2)·OUT); acc is scratch of conv_pool_scratch_size(pc) int32.
template <typename T>
void conv_rows_pooled(const T* planes, const PackedConv& pc, int32_t z_eff, const int32_t* b, const Requant& rq,
                      int32_t* acc, int8_t* y, int64_t first, int64_t pairs);

// ---- kernels_avx2.cpp ----

// The GEMM of the Avx2 and AvxVnni paths (qgemm_packed): x is (N, IN) codes, w packed for Avx2 or AvxVnni, b is
// (OUT); y is (N, OUT) int32, equal to qgemm_s8_ref's / qgemm_s4_ref's. It packs x into workspace, which holds
// qgemm_avx2_workspace_size(n, w) int32.
size_t qgemm_avx2_workspace_size(int64_t n, const PackedWeights& w);
void qgemm_avx2(const int8_t* x, int32_t x_zero_point, const PackedWeights& w, const int32_t* b, int32_t* y, int64_t n,
                int32_t* workspace, int threads);

// requantize_to_nchw, 8 channels at a time: acc is (N, P, OUT) int32; y is (N, OUT, P) codes.
void requantize_to_nchw_avx2(const int32_t* acc, const int32_t* multiplier, const int32_t* shift, int32_t zero_point,
                             int32_t act_min, int32_t act_max, int8_t* y, int64_t n, int64_t positions, int64_t out,
                             int threads);

// maxpool_requantize_nhwc, 8 channels at a time: acc is (N, H, W, C) int32; y is (N, HO, WO, C) codes.
void maxpool_requantize_avx2(const int32_t* acc, const Requant& rq, int8_t* y, int64_t n, int64_t c, int64_t height,
                             int64_t width, int64_t k, int64_t stride, int64_t padding, int threads);

// qconv2d_depthwise_requantized on the Avx2 path (and for K > 7 on the others), 16 channels at a time: x (N, H, W, C)
// codes, w pack_grouped_conv's (K·K, C) codes; y (N, HO, WO, C) codes.
void depthwise_requantize_avx2(const int8_t* x, int32_t x_zero_point, const int8_t* w, const int32_t* b,
                               const Requant& rq, int8_t* y, const ConvShape& s, int threads);

// y[k] = the Add of a[k] and b[k] (eq. 10, requantize_add) for k < count, 4 at a time: qadd's inner loop.
void add_requantize_avx2(const int8_t* a, const int8_t* b, int8_t* y, int64_t count, const Rescale& r,
                         const Requant& rq);

// sums[ch] = Σ_p x[p·c + ch] for ch < c: the channel sums of one channels-last image of `positions` positions
// (global_avgpool's inner loop).
void channel_sums_avx2(const int8_t* x, int64_t positions, int64_t c, int32_t* sums);

// ---- kernels_avxvnni.cpp ----

// The GEMM micro-kernel: xp holds kGemmRowsAvxVnni rows of units (4 u8 operands x + 128), row r at xp + r·x_stride;
// wp is (K_UNITS, 16) units of 4 s8 weights; tile is (kGemmRowsAvxVnni, 16) int32 = Σ over K_UNITS units of x·w.
// kernels_avx2.cpp's run_tiles drives it as it drives the AVX2 micro-kernels.
constexpr int64_t kGemmRowsAvxVnni = 6;
void gemm_kernel_avxvnni(const int32_t* xp, int64_t x_stride, const int32_t* wp, int64_t k_units, int32_t* tile);

// One row of x against `panels` (1-4) panels at once, for a batch of one: panel q's units start at
// wp + q·panel_stride; tile is (PANELS, 16) int32 = Σ x·w.
void row_kernel_avxvnni(const int32_t* xp, const int32_t* wp, int64_t panel_stride, int64_t k_units, int64_t panels,
                        int32_t* tile);

// The conv micro-kernel, as conv_tile_vnni512 but one panel per call: PANEL 16 (two ymm halves, 6 rows) or 8
// (12 rows); tile is (MR, PANEL) int32, MR = conv_rows_avxvnni(PANEL).
constexpr int64_t conv_rows_avxvnni(int64_t panel) { return panel == 16 ? 6 : 12; }
void conv_tile_avxvnni(const uint8_t* const* x, const int32_t* offsets, int64_t k_units, const int32_t* wp,
                       int64_t panel, int32_t* tile);

// qconv2d_depthwise_requantized on the AvxVnni path for K² <= kMaxDepthwiseTaps: depthwise_requantize_avx512's
// scheme (four kernel rows per vpdpbusd, each column's operands built once) on 8 channels per ymm.
void depthwise_requantize_avxvnni(const int8_t* x, int32_t x_zero_point, const int8_t* w, const int32_t* b,
                                  const Requant& rq, int8_t* y, const ConvShape& s, int threads);

// ---- kernels_avx512.cpp ----

// x is (N, IN) codes; xp is (N, K_UNITS) units of 4 bytes x + 128 (u8, byte i = k + i); codes past IN are 0
// (their weights are 0).
void pack_x_u8(const int8_t* x, int64_t n, int64_t in, int64_t k_units, int32_t* xp, int threads);

// x is (N, IN) codes, w packed for Vnni512 or Amx, b is (OUT); y is (N, OUT) int32, equal to qgemm_s8_ref's.
// xp is (N, K_UNITS), already filled by pack_x_u8.
void qgemm_vnni512(const int32_t* xp, int32_t x_zero_point, const PackedWeights& w, const int32_t* b, int32_t* y,
                   int64_t n, int threads);

// conv_block (kernels_conv.cpp) on the Vnni512 path, and on Amx for kernel rows too short for tiles: `count` <=
// kConvRowBlock GEMM rows, row r's window at window[r] (u8 operands x + 128; the last repeated up to a whole MR
// after them), unit t of a window offsets[t] bytes further. Panels of 16 channels go through the micro-kernel up
// to kConvPanelsVnni at a time, conv_rows_vnni(PANELS) rows per call, or one of 8 channels (a layer of at most 8).
// channel_offsets is (PANELS, PANEL): b − z_eff·Σw per channel, 0 past OUT. The codes (eq. 6) go to y (COUNT, OUT),
// or with rq null the int32 accumulators to acc (COUNT, OUT).
void conv_block_vnni512(const uint8_t* const* window, int64_t count, const PackedConv& pc,
                        const int32_t* channel_offsets, const Requant* rq, int32_t* acc, int8_t* y);

// A convolution and the 2 × 2 max pool after it, the pool in the micro-kernel (conv_rows_pooled on Vnni512 with
// 16-channel panels): `pooled` outputs, output p's four windows at windows[4p .. 4p + 3] (x + 128 as u8; the last
// output's four repeated after them for kMaxPooledPerCall − 1 more outputs); every channel; the codes of output p at
// y + p·OUT. channel_offsets is (PANELS, 16): b − z_eff·Σw per channel, 0 past OUT.
constexpr int64_t kMaxPooledPerCall = 6;
void conv_pool_vnni512(const uint8_t* const* windows, int64_t pooled, const PackedConv& pc,
                       const int32_t* channel_offsets, const Requant& rq, int8_t* y);

// The epilogue of a conv tile for one panel (the AMX convolution's): rows [0, rows) of tile, int32 rows tile_stride
// apart, plus offset[j] (b − z_eff·Σw of channel first_channel + j), requantized (eq. 6) with rq's constants of
// channels [first_channel, first_channel + count), count <= 16; row r's codes go to y + r·y_stride.
void conv_tile_requantize_avx512(const int32_t* tile, int64_t rows, int64_t tile_stride, const int32_t* offset,
                                 const Requant& rq, int64_t first_channel, int64_t count, int8_t* y, int64_t y_stride);

// add_requantize_avx2 on AVX-512: 16 codes per step in 32-bit lanes for the usual shifts, else 8 in 64-bit lanes.
void add_requantize_avx512(const int8_t* a, const int8_t* b, int8_t* y, int64_t count, const Rescale& r,
                           const Requant& rq);

// A depthwise Conv2d (C = OUT = groups), requantized: x is (N, H, W, C) codes, w is (K·K, C) codes (the
// GroupedConvWeights), b is (C); y is (N, HO, WO, C) codes, equal to qconv2d_grouped_ref's accumulators
// requantized (eq. 6). 16 channels per instruction, each sum kept in a register over the K² taps. K² <=
// kMaxDepthwiseTaps.
constexpr int64_t kMaxDepthwiseTaps = 49;
void depthwise_requantize_avx512(const int8_t* x, int32_t x_zero_point, const int8_t* w, const int32_t* b,
                                 const Requant& rq, int8_t* y, const ConvShape& s, int threads);

// The shapes of that scheme, which depthwise_requantize_avxvnni shares. The kernel's rows go in G groups of four
// (four bytes per vpdpbusd lane); one set of operands (4·G input rows) serves depthwise_rows_sharing output rows, row
// m reading the input rows m·stride further down; an output row's windows read depthwise_columns input columns,
// padding included; sharing · G · K weight vectors at most.
constexpr int64_t depthwise_row_groups(int64_t kernel) { return (kernel + 3) / 4; }
constexpr int64_t depthwise_rows_sharing(int64_t kernel, int64_t stride) {
  return (4 * depthwise_row_groups(kernel) - kernel) / stride + 1;
}
inline int64_t depthwise_columns(const ConvShape& s) {
  return (pooled_size(s.width, s.kernel, s.stride, s.padding) - 1) * s.stride + s.kernel;
}
// The four input rows of group g for output row oh, image at `image`: row r's codes at input column iw are at
// base[r] + iw·step[r]; a row over the padding reads the codes z_in at `pad` at every column (a step of 0).
inline void depthwise_group_rows(const int8_t* image, const int8_t* pad, const ConvShape& s, int64_t oh, int64_t g,
                                 const int8_t* base[4], int64_t step[4]) {
  for (int64_t r = 0; r < 4; ++r) {
    const int64_t ih = oh * s.stride - s.padding + 4 * g + r;
    const bool inside = ih >= 0 && ih < s.height;
    base[r] = inside ? image + ih * s.width * s.channels : pad;
    step[r] = inside ? s.channels : 0;
  }
}
// The weight vectors of that scheme, wq[(m·G + g)·K + kw] for output row m of a set, group g and kernel column kw:
// byte r of each lane holds the weight of tap (4g + r − m·stride, kw), or 0 where that is no kernel row.
// f(at, m, taps) for each, at = (m·G + g)·K + kw and taps[r] the offset of byte r's tap in the (K·K, C) weights, or
// −1 for none.
template <typename F>
void depthwise_weight_vectors(int64_t kernel, int64_t stride, F&& f) {
  const int64_t groups = depthwise_row_groups(kernel);
  for (int64_t m = 0; m < depthwise_rows_sharing(kernel, stride); ++m)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t kw = 0; kw < kernel; ++kw) {
        int64_t taps[4];
        for (int64_t r = 0; r < 4; ++r) {
          const int64_t kh = 4 * g + r - m * stride;
          taps[r] = kh >= 0 && kh < kernel ? kh * kernel + kw : -1;
        }
        f((m * groups + g) * kernel + kw, m, taps);
      }
}
constexpr int64_t kMaxDepthwiseWeights = 40;  // K = 5 at stride 1: 4 · 2 · 5
static_assert([] {
  for (int64_t k = 1; k * k <= kMaxDepthwiseTaps; ++k)
    if (depthwise_rows_sharing(k, 1) * depthwise_row_groups(k) * k > kMaxDepthwiseWeights) return false;
  return true;
}());

// y[i] = table[images[i]] for i < size (input_lookup), with two-table byte permutes. Needs AVX-512 VBMI.
void input_lookup_vbmi(const uint8_t* images, const int8_t* table, int8_t* y, int64_t size, int threads);

// requantize_to_nchw for P = 1: acc (ROWS, OUT) int32 → y (ROWS, OUT) codes, 16 channels at a time.
void requantize_rows_avx512(const int32_t* acc, const Requant& rq, int8_t* y, int64_t rows, int64_t out, int threads);
// maxpool_requantize_nhwc for the 2×2 pool with stride 2 and no padding, 16 channels at a time.
void maxpool2_requantize_avx512(const int32_t* acc, const Requant& rq, int8_t* y, int64_t n, int64_t c, int64_t height,
                                int64_t width, int threads);

// ---- kernels_amx.cpp ----

// A convolution gets AMX tiles (PackedConv::amx_tiles) from this many units (32 codes) per kernel row on.
constexpr int64_t kAmxMinSegmentUnits = 8;

// Bytes an AMX convolution may read past the end of its padded images (their weights are zero).
int64_t amx_conv_overrun_bytes(const PackedConv& pc);

// conv_rows on AMX tiles: GEMM rows [first, first + rows) of the convolution of planes (x + 128 as u8), pc with
// amx_tiles; acc (ROWS, OUT) int32 when rq is null, else y (ROWS, OUT) codes (eq. 6).
void conv_rows_amx(const uint8_t* planes, const PackedConv& pc, int32_t z_eff, const int32_t* b, const Requant* rq,
                   int32_t* acc, int8_t* y, int64_t first, int64_t rows);

// As qgemm_vnni512, with w packed for Amx and N >= kAmxMinRows, but from x (N, IN) codes: it packs x itself, into
// AMX A tiles in workspace, which holds qgemm_amx_workspace_size(n, w) int32.
size_t qgemm_amx_workspace_size(int64_t n, const PackedWeights& w);
void qgemm_amx(const int8_t* x, int32_t x_zero_point, const PackedWeights& w, const int32_t* b, int32_t* y, int64_t n,
               int32_t* workspace, int threads);

}  // namespace lowbit::quant::runtime::detail
