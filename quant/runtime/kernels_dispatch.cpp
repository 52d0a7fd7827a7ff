// Packing and dispatch of the integer kernels: the weights re-laid out once for a path, and every fast entry point
// of kernels.h sending its call to that path's kernels. The kernels themselves are in the kernel files.
//
// How a call reaches a path (cpu.h lists the paths):
// 1. The path is chosen at run time: kernel_path() (set_kernel_path, else LOWBIT_KERNELS, else the fastest path
//    that cpu_supports), or the path the caller passes.
// 2. pack_weights and pack_conv_weights refuse Ref and any path this CPU cannot run (check_packing_path), and
//    record the path in PackedWeights::path. qgemm_packed, conv_planes and qconv2d_rows* then run that path's
//    kernels without checking again:
//      Avx2, AvxVnni  kernels_avx2.cpp (qgemm_avx2) and kernels_conv.cpp (build_planes, conv_rows), with the
//                     multiplies of kernels_avxvnni.cpp on AvxVnni
//      Vnni512        kernels_avx512.cpp (a convolution: kernels_conv.cpp's conv_rows with its micro-kernel)
//      Amx            kernels_amx.cpp for GEMMs of at least 32 rows and convolutions packed with amx_tiles,
//                     else as Vnni512
// 3. The calls without packed weights take their path as an argument or from kernel_path(): qgemm_s8/s4 pack on
//    every call (the reference on Ref); requantize_to_nchw, maxpool_requantize_nhwc and input_lookup_fast pick
//    the AVX-512 kernels on Vnni512 and Amx where they have one, else AVX2 (or the reference loops).
//
// This file runs on every CPU, so it is compiled without -mavx2 or any target attribute: it holds no SIMD code,
// only calls into the kernel files, whose functions carry their instruction sets themselves (kernels_isa.h
// declares their entry points).
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "quant/runtime/int4.h"
#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"

namespace lowbit::quant::runtime {

namespace {

constexpr int64_t kPanel = PackedWeights::kPanelChannels;  // 16 output channels

using detail::ceil_div;

// Refuses to pack for a path that has no packed kernels or that this CPU cannot run.
void check_packing_path(KernelPath path, const char* what) {
  if (path == KernelPath::Ref) {
    throw RuntimeError(std::string(what) +
                       ": the reference path has no packed kernels; pack for avx2, avxvnni, vnni or amx");
  }
  if (!cpu_supports(path)) (void)parse_kernel_path(kernel_path_name(path));  // throws, naming what the CPU has
}

}  // namespace

bool cpu_has_avx2() { return cpu_supports(KernelPath::Avx2); }

// ---- GEMM: the weights packed once, for one path --------------------------------------------------------------

PackedWeights pack_weights(std::span<const int8_t> w, int bits, int64_t in, int64_t out, KernelPath path) {
  check_packing_path(path, "pack_weights");
  PackedWeights pw;
  pw.path = path;
  pw.bits = bits;
  pw.in = in;
  pw.out = out;
  pw.codes_per_unit = path == KernelPath::Avx2 && bits == 8 ? 2 : 4;
  pw.k_units = ceil_div(in, pw.codes_per_unit);
  if (path == KernelPath::Avx2 && bits == 4) pw.k_units += pw.k_units % 2;  // the int4 kernel takes two units per step
  if (path == KernelPath::Amx) pw.k_units = ceil_div(pw.k_units, 16) * 16;  // whole B tiles of 16 units (64 k)
  if (pw.k_units == 0) pw.k_units = path == KernelPath::Amx ? 16 : 2;       // IN = 0: zero units, so y = b
  pw.panels = ceil_div(out, kPanel);
  if (path == KernelPath::Amx) pw.panels += pw.panels % 2;  // the AMX kernel computes two panels at once
  const int64_t panels = pw.panels;
  std::vector<uint32_t> units(static_cast<size_t>(panels * pw.k_units * kPanel), 0);
  pw.row_sums.assign(static_cast<size_t>(panels * kPanel), 0);
  const auto row_bytes = static_cast<int64_t>(int4_packed_size(in));
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t k = 0; k < in; ++k) {
      const int32_t code = bits == 8 ? w[o * in + k] : unpack_int4_at(w.subspan(o * row_bytes, row_bytes), k);
      pw.row_sums[o] += code;
      const int64_t ku = k / pw.codes_per_unit, i = k % pw.codes_per_unit;
      uint32_t& unit = units[((o / kPanel) * pw.k_units + ku) * kPanel + o % kPanel];
      unit |= pw.codes_per_unit == 2 ? detail::int16_half(code, static_cast<int>(i))
                                     : static_cast<uint32_t>(static_cast<uint8_t>(code)) << (8 * i);
    }
  }
  pw.units.assign(units.begin(), units.end());  // same bits, as int32
  return pw;
}

size_t qgemm_packed_workspace_size(int64_t n, const PackedWeights& w) {
  if (w.path == KernelPath::Amx) return detail::qgemm_amx_workspace_size(n, w);  // also holds the VNNI rows (N < 32)
  if (detail::uses_avx512(w.path)) return static_cast<size_t>(n * w.k_units);    // the kernels read rows [0, N) only
  return detail::qgemm_avx2_workspace_size(n, w);                                // the Avx2 and AvxVnni paths
}

void qgemm_packed(std::span<const int8_t> x, int32_t x_zero_point, const PackedWeights& w, std::span<const int32_t> b,
                  std::span<int32_t> y, int64_t n, std::span<int32_t> workspace, int threads) {
  if (detail::uses_avx512(w.path)) {                              // u8 × s8 units of 4 codes for either weight width
    if (w.path == KernelPath::Amx && n >= detail::kAmxMinRows) {  // packs x into A tiles itself
      return detail::qgemm_amx(x.data(), x_zero_point, w, b.data(), y.data(), n, workspace.data(), threads);
    }
    detail::pack_x_u8(x.data(), n, w.in, w.k_units, workspace.data(), threads);
    return detail::qgemm_vnni512(workspace.data(), x_zero_point, w, b.data(), y.data(), n, threads);
  }
  // the Avx2 and AvxVnni paths
  detail::qgemm_avx2(x.data(), x_zero_point, w, b.data(), y.data(), n, workspace.data(), threads);
}

// ---- Conv2d: the implicit GEMM on channels-last images (kernels_conv.cpp explains it) -------------------------

PackedConv pack_conv_weights(std::span<const int8_t> w, int bits, int64_t c, int64_t height, int64_t width, int64_t out,
                             int64_t k, int64_t stride, int64_t padding, KernelPath path) {
  check_packing_path(path, "pack_conv_weights");
  const bool amx = path == KernelPath::Amx;
  if (amx) path = KernelPath::Vnni512;  // the VNNI packing, with the AMX tiles below
  PackedConv pc;
  pc.channels = c;
  pc.height = height;
  pc.width = width;
  pc.kernel = k;
  pc.stride = stride;
  pc.padding = padding;
  const int64_t codes_per_unit = path == KernelPath::Avx2 && bits == 8 ? 2 : 4, segment = k * c;
  pc.segment_units = ceil_div(segment, codes_per_unit);
  if (path == KernelPath::Avx2 && bits == 4) pc.segment_units += pc.segment_units % 2;  // two units per step
  const int64_t segment_codes = pc.segment_units * codes_per_unit, row = k * segment_codes, in = c * k * k;
  // Unit t = kh·SEGMENT + u starts at kernel row kh, code u·codes_per_unit: in operands (int16 elements or
  // u8 bytes, one per code), kh rows of the padded image further plus u units.
  const int64_t pitch = (width + 2 * padding) * c;
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t u = 0; u < pc.segment_units; ++u)
      pc.unit_offsets.push_back(static_cast<int32_t>(kh * pitch + u * codes_per_unit));
  // (OUT, C, K, K) codes → (OUT, K, SEGMENT) codes in (kh, kw, c) order, zeros after each kernel row's K·C.
  std::vector<int8_t> codes(static_cast<size_t>(out * row), 0);
  const auto packed_row = static_cast<int64_t>(int4_packed_size(in));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t ci = 0; ci < c; ++ci)
      for (int64_t kh = 0; kh < k; ++kh)
        for (int64_t kw = 0; kw < k; ++kw) {
          const int64_t from = (ci * k + kh) * k + kw;
          codes[static_cast<size_t>(o * row + kh * segment_codes + kw * c + ci)] =
              bits == 8 ? w[o * in + from] : unpack_int4_at(w.subspan(o * packed_row, packed_row), from);
        }
  if (bits == 8) {
    pc.weights = pack_weights(codes, 8, row, out, path);
  } else {
    const auto row_bytes = static_cast<int64_t>(int4_packed_size(row));
    std::vector<int8_t> packed(static_cast<size_t>(out * row_bytes));
    for (int64_t o = 0; o < out; ++o)
      pack_int4(std::span<const int8_t>(codes).subspan(o * row, row),
                std::span<int8_t>(packed).subspan(o * row_bytes, row_bytes));
    pc.weights = pack_weights(packed, 4, row, out, path);
  }
  if (amx && pc.segment_units >= detail::kAmxMinSegmentUnits) {
    // B tiles: tile (p, kh, j) holds units 16·j … 16·j + 15 of kernel row kh for channels 16·p … 16·p + 15.
    pc.amx_blocks = ceil_div(pc.segment_units, 16);
    const int64_t panels = ceil_div(out, kPanel) + ceil_div(out, kPanel) % 2, tile = 16 * kPanel;
    pc.amx_tiles.assign(static_cast<size_t>(panels * k * pc.amx_blocks * tile), 0);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t kh = 0; kh < k; ++kh)
        for (int64_t u = 0; u < pc.segment_units; ++u) {
          int32_t unit = 0;
          std::memcpy(&unit, codes.data() + o * row + kh * segment_codes + 4 * u, 4);
          const int64_t at = ((o / kPanel * k + kh) * pc.amx_blocks + u / 16) * tile + u % 16 * kPanel + o % kPanel;
          pc.amx_tiles[static_cast<size_t>(at)] = unit;
        }
  }
  if (out <= 8) {  // one 8-channel panel: keep the first 8 lanes of each unit row of the 16-channel panel
    pc.panel_channels = 8;
    auto& units = pc.weights.units;
    for (int64_t ku = 0; ku < pc.weights.k_units; ++ku)
      for (int64_t j = 0; j < 8; ++j)
        units[static_cast<size_t>(ku * 8 + j)] = units[static_cast<size_t>(ku * kPanel + j)];
    units.resize(static_cast<size_t>(pc.weights.k_units * 8));
  }
  return pc;
}

namespace {

// Padded images are followed by this many bytes, which a unit reading past the last kernel row may touch.
constexpr int64_t kPlaneSlackBytes = 32;

// The x operands of a convolution: int16 codes for the AVX2 vpmaddwd kernels (8-bit weights), else x + 128 as u8.
bool int16_operands(const PackedConv& pc) { return pc.weights.path == KernelPath::Avx2 && pc.weights.bits == 8; }

}  // namespace

size_t conv_planes_size(int64_t n, const PackedConv& pc) {
  const int64_t padding = pc.padding;
  const int64_t slack =
      pc.amx_tiles.empty() ? kPlaneSlackBytes : std::max(kPlaneSlackBytes, detail::amx_conv_overrun_bytes(pc));
  return static_cast<size_t>(n * (pc.height + 2 * padding) * (pc.width + 2 * padding) * pc.channels +
                             ceil_div(slack, 2));
}

void conv_planes(std::span<const int8_t> x, int32_t x_zero_point, const PackedConv& pc, std::span<int16_t> planes,
                 int64_t n, int threads) {
  if (int16_operands(pc)) {
    detail::build_planes<int16_t>(x.data(), x_zero_point, planes.data(), n, pc.channels, pc.height, pc.width,
                                  pc.padding, false, threads);
  } else {
    detail::build_planes<uint8_t>(x.data(), x_zero_point, reinterpret_cast<uint8_t*>(planes.data()), n, pc.channels,
                                  pc.height, pc.width, pc.padding, detail::uses_avx512(pc.weights.path), threads);
  }
}

void qconv2d_rows(std::span<const int16_t> planes, int32_t x_zero_point, const PackedConv& pc,
                  std::span<const int32_t> b, std::span<int32_t> acc, int64_t first, int64_t rows) {
  if (int16_operands(pc)) {
    detail::conv_rows<int16_t>(planes.data(), pc, x_zero_point, b.data(), nullptr, acc.data(), nullptr, first, rows);
  } else if (!pc.amx_tiles.empty()) {
    detail::conv_rows_amx(reinterpret_cast<const uint8_t*>(planes.data()), pc, x_zero_point + 128, b.data(), nullptr,
                          acc.data(), nullptr, first, rows);
  } else {
    detail::conv_rows<uint8_t>(reinterpret_cast<const uint8_t*>(planes.data()), pc, x_zero_point + 128, b.data(),
                               nullptr, acc.data(), nullptr, first, rows);
  }
}

void qconv2d_rows_requantized(std::span<const int16_t> planes, int32_t x_zero_point, const PackedConv& pc,
                              std::span<const int32_t> b, const Requant& rq, std::span<int8_t> y, int64_t first,
                              int64_t rows) {
  if (int16_operands(pc)) {
    detail::conv_rows<int16_t>(planes.data(), pc, x_zero_point, b.data(), &rq, nullptr, y.data(), first, rows);
  } else if (!pc.amx_tiles.empty()) {
    detail::conv_rows_amx(reinterpret_cast<const uint8_t*>(planes.data()), pc, x_zero_point + 128, b.data(), &rq,
                          nullptr, y.data(), first, rows);
  } else {
    detail::conv_rows<uint8_t>(reinterpret_cast<const uint8_t*>(planes.data()), pc, x_zero_point + 128, b.data(), &rq,
                               nullptr, y.data(), first, rows);
  }
}

namespace {

// Pooled rows per block of qconv2d_rows_pooled: as many as kConvRowBlock conv rows hold, two conv rows each.
int64_t pooled_rows_per_block(const PackedConv& pc) {
  return detail::kConvRowBlock / (2 * pooled_size(pc.width, pc.kernel, pc.stride, pc.padding));
}

}  // namespace

bool conv_pool_fusable(const PackedConv& pc, int64_t kernel, int64_t stride, int64_t padding) {
  return kernel == 2 && stride == 2 && padding == 0 && pc.amx_tiles.empty() && pooled_rows_per_block(pc) >= 1 &&
         pooled_size(pc.height, pc.kernel, pc.stride, pc.padding) >= 2;
}

size_t conv_pool_scratch_size(const PackedConv& pc) {
  const int64_t wo = pooled_size(pc.width, pc.kernel, pc.stride, pc.padding);
  return static_cast<size_t>(pooled_rows_per_block(pc) * 2 * wo * pc.weights.out);
}

void qconv2d_rows_pooled(std::span<const int16_t> planes, int32_t x_zero_point, const PackedConv& pc,
                         std::span<const int32_t> b, const Requant& rq, std::span<int32_t> scratch, std::span<int8_t> y,
                         int64_t first, int64_t count) {
  if (int16_operands(pc)) {
    detail::conv_rows_pooled<int16_t>(planes.data(), pc, x_zero_point, b.data(), rq, scratch.data(), y.data(), first,
                                      count);
  } else {
    detail::conv_rows_pooled<uint8_t>(reinterpret_cast<const uint8_t*>(planes.data()), pc, x_zero_point + 128, b.data(),
                                      rq, scratch.data(), y.data(), first, count);
  }
}

// ---- The calls without packed weights: the path from kernel_path() or the caller ---------------------------------

namespace {

void qgemm_fast(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, int bits,
                std::span<const int32_t> b, std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads) {
  const PackedWeights pw = pack_weights(w, bits, in, out, kernel_path());
  std::vector<int32_t> workspace(qgemm_packed_workspace_size(n, pw));
  qgemm_packed(x, x_zero_point, pw, b, y, n, workspace, threads);
}

}  // namespace

void qgemm_s8(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, std::span<const int32_t> b,
              std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads) {
  if (kernel_path() == KernelPath::Ref) return qgemm_s8_ref(x, x_zero_point, w, b, y, n, in, out, threads);
  qgemm_fast(x, x_zero_point, w, 8, b, y, n, in, out, threads);
}

void qgemm_s4(std::span<const int8_t> x, int32_t x_zero_point, std::span<const int8_t> w, std::span<const int32_t> b,
              std::span<int32_t> y, int64_t n, int64_t in, int64_t out, int threads) {
  if (kernel_path() == KernelPath::Ref) return qgemm_s4_ref(x, x_zero_point, w, b, y, n, in, out, threads);
  qgemm_fast(x, x_zero_point, w, 4, b, y, n, in, out, threads);
}

void input_lookup_fast(std::span<const uint8_t> images, const std::array<int8_t, 256>& table, std::span<int8_t> y,
                       KernelPath path, int threads) {
  const bool vbmi = detail::uses_avx512(path) && cpu_features().avx512_vbmi;
  if (!vbmi) return input_lookup(images, table, y, threads);
  detail::input_lookup_vbmi(images.data(), table.data(), y.data(), static_cast<int64_t>(images.size()), threads);
}

void maxpool_requantize_nhwc(std::span<const int32_t> acc, const Requant& rq, std::span<int8_t> y, int64_t n, int64_t c,
                             int64_t height, int64_t width, int64_t k, int64_t stride, int64_t padding, int threads,
                             KernelPath path) {
  if (detail::uses_avx512(path) && k == 2 && stride == 2 && padding == 0) {
    return detail::maxpool2_requantize_avx512(acc.data(), rq, y.data(), n, c, height, width, threads);
  }
  detail::maxpool_requantize_avx2(acc.data(), rq, y.data(), n, c, height, width, k, stride, padding, threads);
}

void requantize_to_nchw(std::span<const int32_t> acc, const Requant& rq, std::span<int8_t> y, int64_t n,
                        int64_t positions, int64_t out, int threads, KernelPath path) {
  if (path == KernelPath::Ref || !cpu_has_avx2()) return requantize_to_nchw_ref(acc, rq, y, n, positions, out, threads);
  if (detail::uses_avx512(path) && positions == 1) {
    return detail::requantize_rows_avx512(acc.data(), rq, y.data(), n, out, threads);
  }
  detail::requantize_to_nchw_avx2(acc.data(), rq.multiplier.data(), rq.shift.data(), rq.zero_point, rq.act_min,
                                  rq.act_max, y.data(), n, positions, out, threads);
}

}  // namespace lowbit::quant::runtime
