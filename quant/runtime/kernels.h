// The integer kernels: plain reference loops (the definitions) and AVX2, AVX-VNNI, AVX-512 VNNI and AMX versions that
// match them bit for bit.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <new>
#include <span>
#include <vector>

#include "quant/runtime/cpu.h"
#include "quant/runtime/graph.h"

namespace lowbit::quant::runtime {

// Every kernel takes explicit dimensions and a thread count; the result never depends on the thread count.
// Activations are int8 codes; weights are symmetric per output channel (z = 0).

// =====================================================================================================
// GEMM to int32 accumulators (docs/quantization.md eq. 5):
//   y[n][o] = b[o] + Σ_k w[o][k]·(x[n][k] − z_in)
// No partial sum can overflow once validate() has bounded |b| + Σ|w|·max|x − z_in| below 2^31.
// =====================================================================================================

// x is (N, IN) codes, w is (OUT, IN) int8 in [−127, 127], b is (OUT); y is (N, OUT) int32.
void qgemm_s8_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w,
                  std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t in, int64_t out,
                  int threads = 1);

// x is (N, IN) codes, w is (OUT, (IN + 1) / 2) packed int4 rows (int4.h), b is (OUT); y is (N, OUT) int32.
void qgemm_s4_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w,
                  std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t in, int64_t out,
                  int threads = 1);

// Same signatures and results, on kernel_path() (re-laying w out on every call; the reference on Ref).
// The Executor instead packs once (pack_weights) and calls qgemm_packed.
void qgemm_s8(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, std::span<const int32_t> b,
              std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads = 1);
void qgemm_s4(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, std::span<const int32_t> b,
              std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads = 1);

// True if the AVX2 kernels can run on this CPU (and OS).
bool cpu_has_avx2();

// Memory aligned to 64 bytes, a cache line: an AMX tile row (64 bytes) read from it never straddles two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t count) { return static_cast<T*>(::operator new (count * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, size_t) { ::operator delete (p, std::align_val_t{64}); }
  friend bool operator==(const CacheLineAllocator&, const CacheLineAllocator&) { return true; }
};

// Weights re-laid-out once for one fast path's GEMM, in panels of kPanelChannels output channels.
// Each int32 "unit" holds the codes of one channel for a few consecutive k:
//   Avx2, 8 bits: 2 codes as int16 (low half = even k) — the operand of vpmaddwd;
//   Avx2, 4 bits, and AvxVnni / Vnni512 / Amx, 8 or 4 bits: 4 codes as int8 (int4 nibbles sign-extended;
//     byte i = k + i) — the s8 operand of vpmaddubsw, vpdpbusd and tdpbusd. A panel (K_UNITS, 16) is then also
//     a column of AMX B tiles: 16 units (64 k) × 16 channels × 4 bytes.
// units is (PANELS, K_UNITS, 16); channels past OUT and codes past IN are 0.
struct PackedWeights {
  static constexpr int64_t kPanelChannels = 16;
  KernelPath path = KernelPath::Avx2;  // the kernels it was packed for: qgemm_packed runs those
  int bits = 8;
  int64_t in = 0, out = 0;
  int64_t codes_per_unit = 2;     // 2 (Avx2, 8 bits) or 4
  int64_t k_units = 0;            // IN / codes_per_unit rounded up (to even for Avx2 4 bits, to 16 for Amx)
  int64_t panels = 0;             // OUT / 16 rounded up (to even for Amx: its C tiles come in pairs)
  std::vector<int32_t, CacheLineAllocator<int32_t>> units;  // (PANELS, K_UNITS, 16), 64-byte aligned (AMX B tiles)
  std::vector<int32_t> row_sums;  // (PANELS · 16): Σ_k w[o][k], folds the zero point out of the inner loop
};

// w is (OUT, IN) int8 (bits 8) or packed int4 rows (bits 4). path is Avx2, AvxVnni, Vnni512 or Amx, and
// cpu_supports it (else RuntimeError). AvxVnni and Vnni512 pack the same units; the path says which kernels run.
PackedWeights pack_weights(std::span<const int8_t> w, int bits, int64_t in, int64_t out, KernelPath path);

// int32 elements of workspace that qgemm_packed needs for n rows of x.
size_t qgemm_packed_workspace_size(int64_t n, const PackedWeights& w);

// x is (N, IN) codes, w is packed (OUT, IN), b is (OUT); y is (N, OUT) int32 — equal to qgemm_s8_ref/qgemm_s4_ref.
// Runs w.path's kernels (Amx: tiles for N >= 32 rows, else Vnni512). workspace holds qgemm_packed_workspace_size(n,
// w) int32 (no allocation here).
void qgemm_packed(std::span<const int8_t> x, int32_t x_zero_point, const PackedWeights& w, std::span<const int32_t> b,
                  std::span<int32_t> y, int64_t n, std::span<int32_t> workspace, int threads = 1);

// Conv2d on channels-last images as an implicit GEMM (kernels_conv.cpp explains it): the executor's fast
// path keeps activations (N, H, W, C). The weights are re-laid out once: each output channel's codes in
// (kh, kw, c) order, every kernel row's K·C codes padded with zero weights to SEGMENT whole units.
struct PackedConv {
  PackedWeights weights;  // (OUT, K · SEGMENT · codes per unit), in panels of panel_channels; its path runs
  int64_t channels = 0, height = 0, width = 0;  // the input image, (C, H, W)
  int64_t kernel = 1, stride = 1, padding = 0;
  int64_t segment_units = 0;          // units per kernel row: K·C codes rounded up (to an even count for Avx2 int4)
  int64_t panel_channels = 16;        // output channels per panel: 16, or 8 for a layer of at most 8 channels
  std::vector<int32_t> unit_offsets;  // (K · SEGMENT): where each unit of a window starts, in operands
  // Amx, when the kernel rows are long enough (kernels_amx.cpp): the weights again as AMX B tiles, (PANELS, K,
  // BLOCKS, 16 units, 16 channels) int32 units, each kernel row's SEGMENT units in BLOCKS blocks of 16 units,
  // zero-padded, PANELS even, 64-byte aligned like PackedWeights::units. Empty: the convolution runs on the VNNI
  // kernels.
  std::vector<int32_t, CacheLineAllocator<int32_t>> amx_tiles;
  int64_t amx_blocks = 0;
};

// w is (OUT, C, K, K) int8 codes (bits 8) or packed int4 rows of C·K·K codes (bits 4), for (C, H, W) inputs.
// path as for pack_weights; Amx packs for Vnni512 too, and adds amx_tiles when a kernel row has at least
// kAmxMinSegmentUnits units (shorter ones would leave most of each tile's 64 k empty).
PackedConv pack_conv_weights(std::span<const int8_t> w, int bits, int64_t c, int64_t height, int64_t width, int64_t out,
                             int64_t k, int64_t stride, int64_t padding, KernelPath path);

// x is (N, H, W, C) codes; planes is (N, H + 2·padding, W + 2·padding, C) GEMM operands — int16 codes for
// Avx2 with 8-bit weights, else x + 128 as u8 (then two per int16 element) — the padding set to z_in,
// followed by a few elements of slack that the last units may read (their weights are zero).
size_t conv_planes_size(int64_t n, const PackedConv& pc);
void conv_planes(std::span<const int8_t> x, int32_t x_zero_point, const PackedConv& pc, std::span<int16_t> planes,
                 int64_t n, int threads = 1);

// GEMM rows [first, first + rows) of the convolution, rows ordered (n, oh, ow): acc is (ROWS, OUT) int32,
// channels last, equal to qconv2d_ref's accumulators. planes from conv_planes with the same pc.
// Runs pc.weights.path's kernels; allocates only its panels' epilogue constants.
void qconv2d_rows(std::span<const int16_t> planes, int32_t x_zero_point, const PackedConv& pc,
                  std::span<const int32_t> b, std::span<int32_t> acc, int64_t first, int64_t rows);
// The same rows requantized (requantize_to_nchw_ref's codes, eq. 6) as they come out of the micro-kernel:
// y is (ROWS, OUT) codes, channels last. The executor's Conv2d.
void qconv2d_rows_requantized(std::span<const int16_t> planes, int32_t x_zero_point, const PackedConv& pc,
                              std::span<const int32_t> b, const Requant& rq, std::span<int8_t> y, int64_t first,
                              int64_t rows);
// The same convolution followed by a max pool of kernel 2, stride 2, no padding, in one pass (when
// conv_pool_fusable): pooled rows [first, first + count), rows ordered (n, ph), each of (HO/2) pooled positions,
// their codes (maxpool_requantize_nhwc's) into y ((N, HO/2, WO/2, OUT), channels last). On Vnni512 the
// micro-kernel takes the four windows of each pooled output; on the other paths the sums of two conv rows at a
// time go to scratch (conv_pool_scratch_size(pc) int32 per call) and are pooled while they are in L1.
bool conv_pool_fusable(const PackedConv& pc, int64_t kernel, int64_t stride, int64_t padding);
size_t conv_pool_scratch_size(const PackedConv& pc);
void qconv2d_rows_pooled(std::span<const int16_t> planes, int32_t x_zero_point, const PackedConv& pc,
                         std::span<const int32_t> b, const Requant& rq, std::span<int32_t> scratch, std::span<int8_t> y,
                         int64_t first, int64_t count);

// =====================================================================================================
// Conv2d. HO, WO are the output height and width: HO = (H + 2·padding − K) / stride + 1.
// =====================================================================================================

// Direct loops, the definition (docs/quantization.md eq. 5); padding positions hold z_in, the real value 0.
// x is (N, C, H, W) codes, w is (OUT, C, K, K) int8 or packed int4 rows of C·K·K codes, b is (OUT);
// y is (N, OUT, HO, WO) int32.
void qconv2d_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, int weight_bits,
                 std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t c, int64_t height, int64_t width,
                 int64_t out, int64_t k, int64_t stride, int64_t padding, int threads = 1);

// Gathers every K×K window into a row, so the convolution becomes one GEMM with w as (OUT, C·K·K).
// x is (N, C, H, W) codes; cols is (N·HO·WO, C·K·K), columns ordered (c, kh, kw) like w;
// positions in the padding get the code z_in.
void im2col(std::span<const int8_t> x, int32_t x_zero_point, std::span<int8_t> cols, int64_t n, int64_t c,
            int64_t height, int64_t width, int64_t k, int64_t stride, int64_t padding, int threads = 1);

// =====================================================================================================
// Requantization (reference and AVX2), pooling and input (one version each: plain loops, memory bound).
// =====================================================================================================

// acc is (N, P, OUT) int32 (P positions: HO·WO for a Conv2d, 1 for a Linear); y is (N, OUT, P) codes
// y[n][o][p] = requantize(acc[n][p][o], m[o], n[o], z_out, act_min, act_max) (docs/quantization.md eq. 6).
void requantize_to_nchw_ref(std::span<const int32_t> acc, const Requant& rq, std::span<int8_t> y, int64_t n,
                            int64_t positions, int64_t out, int threads = 1);
// Same signature and result; 8 channels at a time with AVX2 when the CPU has it, else the reference. On the
// Vnni512 and Amx paths, channels-last rows (P = 1) go 16 channels at a time (AVX-512, kernels_avx512.cpp).
void requantize_to_nchw(std::span<const int32_t> acc, const Requant& rq, std::span<int8_t> y, int64_t n,
                        int64_t positions, int64_t out, int threads = 1, KernelPath path = kernel_path());

// acc is (N, H, W, C) int32 accumulators of a Conv2d; y is (N, HO, WO, C) codes: the codes of
// requantize_to_nchw_ref followed by maxpool2d (channels last), computed as requantize(max(acc)) — equal,
// because requantization never decreases (kernels_avx2.cpp, maxpool_requantize_avx2). Requires cpu_has_avx2(); on the
// Vnni512 and Amx paths the 2×2 pool runs 16 channels at a time (AVX-512).
void maxpool_requantize_nhwc(std::span<const int32_t> acc, const Requant& rq, std::span<int8_t> y, int64_t n, int64_t c,
                             int64_t height, int64_t width, int64_t k, int64_t stride, int64_t padding, int threads = 1,
                             KernelPath path = kernel_path());

// x is (N, C, H, W); y is (N, C, HO, WO): the largest code of each window (padding is ignored).
void maxpool2d(std::span<const int8_t> x, std::span<int8_t> y, int64_t n, int64_t c, int64_t height, int64_t width,
               int64_t k, int64_t stride, int64_t padding, int threads = 1);

// x is (N, C, H, W); y is (N, C, HO, WO): z + round_half_away(Σ (q − z) / (K·K)) over each window
// (docs/quantization.md eq. 7); padding positions hold z (real 0) and count, like PyTorch's count_include_pad.
void avgpool2d(std::span<const int8_t> x, int32_t zero_point, std::span<int8_t> y, int64_t n, int64_t c, int64_t height,
               int64_t width, int64_t k, int64_t stride, int64_t padding, int threads = 1);

// images is (N, SIZE) uint8 pixels; y is (N, SIZE) codes: y = table[pixel].
void input_lookup(std::span<const uint8_t> images, const std::array<int8_t, 256>& table, std::span<int8_t> y,
                  int threads = 1);
// Same signature and result, 64 pixels per step (AVX-512 VBMI vpermi2b, kernels_avx512.cpp) on the Vnni512
// and Amx paths of a CPU with VBMI; else input_lookup.
void input_lookup_fast(std::span<const uint8_t> images, const std::array<int8_t, 256>& table, std::span<int8_t> y,
                       KernelPath path, int threads = 1);

// Channels-last forms, for the executor's fast path: x is (N, H, W, C) and y (N, HO, WO, C), with the codes
// of maxpool2d / avgpool2d in the other layout. input_lookup_nhwc reads (N, C, H·W) pixels and writes
// (N, H·W, C) codes.
void maxpool2d_nhwc(std::span<const int8_t> x, std::span<int8_t> y, int64_t n, int64_t c, int64_t height, int64_t width,
                    int64_t k, int64_t stride, int64_t padding, int threads = 1);
void avgpool2d_nhwc(std::span<const int8_t> x, int32_t zero_point, std::span<int8_t> y, int64_t n, int64_t c,
                    int64_t height, int64_t width, int64_t k, int64_t stride, int64_t padding, int threads = 1);
void input_lookup_nhwc(std::span<const uint8_t> images, const std::array<int8_t, 256>& table, std::span<int8_t> y,
                       int64_t n, int64_t c, int64_t positions, int threads = 1);

// =====================================================================================================
// The graph ops (kernels_graph.cpp): grouped and depthwise Conv2d, Add, Concat, GlobalAvgPool2d, Clamp.
// =====================================================================================================

// The sizes of a (grouped) convolution: N images of (C, H, W), OUT output channels, G groups.
struct ConvShape {
  int64_t n = 1, channels = 1, height = 1, width = 1, out = 1, kernel = 1, stride = 1, padding = 0, groups = 1;
};

// Grouped Conv2d (groups = C = OUT: depthwise) by direct loops, the definition (eq. 5 within each group):
//   acc[n][p][o] = b[o] + Σ_{ci < C/G, kh, kw} w[o][ci][kh][kw]·(x[n][g·C/G + ci][ih][iw] − z_in),  g = o / (OUT/G)
// x is (N, C, H, W) codes; w is (OUT, C/G, K, K) int8 or packed int4 rows of C/G·K·K codes; acc is
// (N, HO·WO, OUT) int32, the layout requantize_to_nchw reads.
void qconv2d_grouped_ref(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w,
                         int weight_bits, std::span<const int32_t> b, std::span<int32_t> acc, const ConvShape& s,
                         int threads = 1);

// The weights re-laid out once for the channels-last kernel: codes[(kh·K + kw)·C/G + ci][o], int8 (int4 unpacked),
// so that the inner loop runs over contiguous output channels.
struct GroupedConvWeights {
  std::vector<int8_t> codes;  // (K·K·C/G, OUT)
};
GroupedConvWeights pack_grouped_conv(std::span<const int8_t> w, int weight_bits, const ConvShape& s);

// The same accumulators from channels-last x (N, H, W, C), plain loops (the executor runs grouped convs that are
// not depthwise with it, and depthwise ones on the Ref path).
void qconv2d_grouped_nhwc(std::span<const int8_t> x, int32_t x_zero_point, const GroupedConvWeights& w,
                          std::span<const int32_t> b, std::span<int32_t> acc, const ConvShape& s, int threads = 1);

// A depthwise Conv2d (C = OUT = groups) straight to codes: qconv2d_grouped_nhwc's accumulators requantized
// (eq. 6), y (N, HO, WO, C), in one pass, each sum in a register over the K² taps: with AVX-512 16 channels at a
// time on the Vnni512 and Amx paths (K <= 7), with AVX2 otherwise. Only where
// depthwise_in_one_pass(s, path): every path but Ref that this CPU runs.
bool depthwise_in_one_pass(const ConvShape& s, KernelPath path);
void qconv2d_depthwise_requantized(std::span<const int8_t> x, int32_t x_zero_point, const GroupedConvWeights& w,
                                   std::span<const int32_t> b, const Requant& rq, std::span<int8_t> y,
                                   const ConvShape& s, int threads = 1, KernelPath path = kernel_path());

// Add (eq. 10): y[k] = clamp(z_out + round((m[0]·(a[k] − z_0) + m[1]·(b[k] − z_1))·2^(−n)), act_min, act_max),
// one rounding, ties away from zero. a, b and y have the same size; any layout (elementwise); y may be a. The
// Avx2 and AvxVnni paths run it 4 elements per instruction, Vnni512 and Amx 8 with AVX-512 (bit-exact: the same
// integer steps).
void qadd(std::span<const int8_t> a, std::span<const int8_t> b, const Rescale& r, const Requant& rq,
          std::span<int8_t> y, int threads = 1, KernelPath path = kernel_path());

// Concat along channels: input k, (N, channels[k], positions) codes, rescaled to the output's scale
// (eq. 10 with one input: a copy when its multiplier is 2^n and its zero point z_out), fills output channels
// [Σ_{j<k} channels[j], …). channels_last: the inputs and y are (N, positions, C) instead.
void qconcat(std::span<const std::span<const int8_t>> inputs, std::span<const int64_t> channels, int64_t positions,
             int64_t n, const Rescale& r, const Requant& rq, std::span<int8_t> y, bool channels_last, int threads = 1);

// GlobalAvgPool2d: y[n][c] = z + round_half_away(Σ_p (x[n][c][p] − z) / P), the input's qparams kept (eq. 7
// with one window over the whole image). x is (N, C, P) codes, or (N, P, C) when channels_last; y is (N, C).
void global_avgpool(std::span<const int8_t> x, int32_t zero_point, std::span<int8_t> y, int64_t n, int64_t c,
                    int64_t positions, bool channels_last, int threads = 1);

// A ReLU or ReLU6 that no op before it absorbed: y = clamp(x, lo, hi), qparams kept. Any layout.
void clamp_codes(std::span<const int8_t> x, int32_t lo, int32_t hi, std::span<int8_t> y, int threads = 1);

}  // namespace lowbit::quant::runtime
