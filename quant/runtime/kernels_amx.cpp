// AMX-INT8 GEMM (tdpbusd: u8 × s8 tile products into int32 tiles), bit-exact with qgemm_s8_ref / qgemm_s4_ref.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "quant/runtime/kernels.h"
#include "quant/runtime/kernels_isa.h"

namespace lowbit::quant::runtime::detail {

// How (the arithmetic is that of the VNNI kernels, kernels_avx512.cpp points 1-3):
//
// An AMX tile is a 2-D register of up to 16 rows × 64 bytes; there are 8 (tmm0-7). tdpbusd C, A, B computes
//   C[m][j] += Σ_u Σ_i A[m][4u + i] · B[u][4j + i]        (A as u8, B as s8, C int32; 16 × 16 × 64 products)
// adding each group of four products to C in 32 bits, like vpdpbusd. With A = 16 rows of packed x (x + 128,
// units of 4 codes: 16 units = 64 k per tile row) and B = 16 units of a weight panel (PackedWeights: a unit
// row is 16 channels × 4 s8 codes, exactly a B tile row), one tdpbusd is 16 rows × 16 channels × 64 k.
//
// The kernel holds a 32 × 32 block of C in tmm0-3 (2 row tiles × 2 panels), loads two A tiles (tmm4-5) and
// two B tiles (tmm6-7) per 64 k, and runs four tdpbusd on them. pack_weights pads Amx weights to whole
// B tiles (16 units) and an even number of panels, pack_x_tiles pads x to whole pairs of A tiles (32 rows),
// with zeros, so every block is full; only the rows and channels of y are stored. The C tiles start as
// b − (z_in + 128)·Σ_k w (the VNNI kernels' offset, point 2), so that the last tdpbusd leaves y's value.

// AVX-512 for the epilogue; AMX for the tiles. Attributes, not file-wide flags (see kernels_avx512.cpp).
#define LOWBIT_AMX __attribute__((target("avx2,avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))

namespace {

constexpr int64_t kPanel = PackedWeights::kPanelChannels;  // 16 channels = one C tile's columns
constexpr int64_t kBlock = 32;                             // a C block: 32 rows × 32 channels
constexpr int64_t kUnitsPerTile = 16;                      // 64 k per tdpbusd

// The tile configuration (palette 1), as ldtilecfg reads it: 64 bytes.
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

// GCC 12's tile intrinsics are asm statements that do not tell the compiler they read or write memory
// (tileloadd, tilestored), so these barriers keep it from moving or dropping the accesses around them.
inline void compiler_barrier() { __asm__ volatile("" ::: "memory"); }

// Every thread configures its own tiles before its first tile instruction (the tile state is per thread).
LOWBIT_AMX void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {  // all eight: 16 rows × 64 bytes (C tiles: 16 int32 per row)
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(config));
}

LOWBIT_AMX void release_tiles() { _tile_release(); }

// The 32 × 32 block of C that the 2-panel convolution computes: c (32, 32) int32 = Σ over steps s
// of A_s·[B0_s B1_s]. step(s) gives A_s, 32 rows of 64 bytes with row r at a + r·a_stride, and B0_s and B1_s,
// one B tile (16 units × 16 channels) of each panel.
struct TileStep {
  const void* a;
  const int32_t* b0;
  const int32_t* b1;
};

template <typename Step>
LOWBIT_AMX void tiles_2x2(int64_t steps, int64_t a_stride, Step step, int32_t* c) {
  compiler_barrier();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    const TileStep t = step(s);
    _tile_loadd(4, t.a, a_stride);                                               // rows 0-15, 64 k
    _tile_loadd(5, static_cast<const uint8_t*>(t.a) + 16 * a_stride, a_stride);  // rows 16-31
    _tile_loadd(6, t.b0, 4 * kPanel);                                            // 16 units of panel 0
    _tile_loadd(7, t.b1, 4 * kPanel);                                            // 16 units of panel 1
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, c, 4 * kBlock);
  _tile_stored(1, c + 16, 4 * kBlock);
  _tile_stored(2, c + 16 * kBlock, 4 * kBlock);
  _tile_stored(3, c + 16 * kBlock + 16, 4 * kBlock);
  compiler_barrier();
}

// ---- Convolutions ----
//
// An implicit GEMM, as conv_rows on the VNNI kernels (kernels_conv.cpp), with A tiles read straight from the
// padded image (channels last, x + 128 as u8). Count an image's output positions over the padded width,
// v = oh·WP + ow with ow < WP: position v's window then starts v·stride·C bytes after the image's first byte,
// so the 16 rows of an A tile are 16 consecutive positions exactly stride·C bytes apart, across output rows
// too, and tileloadd reads them with that row stride. Positions with ow >= WO are computed and dropped.
// A tile row holds 64 bytes of one kernel row of the window: block j is codes 64j … 64j + 63 of its (kw, c)
// run; the B tiles hold zero weights past the K·C codes, so whatever a row reads beyond them adds nothing.

// 32 positions from v0 (2 A tiles) × panels 2q, 2q + 1 (2 B tiles) into c (32, 32), over every kernel row and
// block.
LOWBIT_AMX void conv_block(const uint8_t* image, const PackedConv& pc, int64_t v0, int64_t q, int32_t* c) {
  const int64_t k = pc.kernel, blocks = pc.amx_blocks, row_step = pc.stride * pc.channels;
  const int64_t kernel_row = (pc.width + 2 * pc.padding) * pc.channels, tile = 16 * kPanel;
  const uint8_t* a = image + v0 * row_step;
  const int32_t* b0 = pc.amx_tiles.data() + 2 * q * k * blocks * tile;
  const int32_t* b1 = b0 + k * blocks * tile;
  tiles_2x2(
      k * blocks, row_step,
      [&](int64_t s) {  // s = kh·BLOCKS + j
        return TileStep{a + s / blocks * kernel_row + 64 * (s % blocks), b0 + s * tile, b1 + s * tile};
      },
      c);
}

// A layer of at most 16 channels has one panel: 64 positions from v0 (4 A tiles, rotating through tmm4, tmm5,
// tmm7) × panel 0 (B in tmm6) into c (64, 16), rather than half the tile work on a panel of zeros.
LOWBIT_AMX void conv_block_one_panel(const uint8_t* image, const PackedConv& pc, int64_t v0, int32_t* c) {
  const int64_t k = pc.kernel, blocks = pc.amx_blocks, row_step = pc.stride * pc.channels;
  const int64_t kernel_row = (pc.width + 2 * pc.padding) * pc.channels, tile = 16 * kPanel;
  const uint8_t* a = image + v0 * row_step;
  compiler_barrier();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t j = 0; j < blocks; ++j) {
      const uint8_t* at = a + kh * kernel_row + 64 * j;
      _tile_loadd(6, pc.amx_tiles.data() + (kh * blocks + j) * tile, 4 * kPanel);
      _tile_loadd(4, at, row_step);
      _tile_dpbusd(0, 4, 6);
      _tile_loadd(5, at + 16 * row_step, row_step);
      _tile_dpbusd(1, 5, 6);
      _tile_loadd(7, at + 32 * row_step, row_step);
      _tile_dpbusd(2, 7, 6);
      _tile_loadd(4, at + 48 * row_step, row_step);
      _tile_dpbusd(3, 4, 6);
    }
  _tile_stored(0, c, 4 * kPanel);
  _tile_stored(1, c + 16 * kPanel, 4 * kPanel);
  _tile_stored(2, c + 32 * kPanel, 4 * kPanel);
  _tile_stored(3, c + 48 * kPanel, 4 * kPanel);
  compiler_barrier();
}

// Rows [m0, m0 + count) of c (rows c_stride int32 apart), channels o0 … o0 + 15, + b − z_eff·Σw (offset): into
// acc, or requantized into y, from GEMM row r0.
LOWBIT_AMX void conv_store(const int32_t* c, int64_t c_stride, int64_t m0, int64_t count, const PackedConv& pc,
                           const int32_t* offset, int64_t o0, const Requant* rq, int32_t* acc, int8_t* y, int64_t r0) {
  const int64_t out = pc.weights.out, channels = min_i64(kPanel, out - o0);
  if (rq) {
    conv_tile_requantize_avx512(c + m0 * c_stride, count, c_stride, offset, *rq, o0, channels, y + r0 * out + o0, out);
    return;
  }
  const auto mask = static_cast<__mmask16>(channels >= 16 ? 0xFFFF : (1u << channels) - 1);
  const __m512i bias = _mm512_maskz_loadu_epi32(mask, offset);
  for (int64_t m = 0; m < count; ++m)
    _mm512_mask_storeu_epi32(acc + (r0 + m) * out + o0, mask,
                             _mm512_add_epi32(_mm512_load_si512(c + (m0 + m) * c_stride), bias));
}

}  // namespace

int64_t amx_conv_overrun_bytes(const PackedConv& pc) {
  const int64_t wp = pc.width + 2 * pc.padding, hp = pc.height + 2 * pc.padding, c = pc.channels;
  const int64_t ho = pooled_size(pc.height, pc.kernel, pc.stride, pc.padding);
  // A block starts at a position below HO·WP and spans up to 64; its last row reads 64·BLOCKS bytes of kernel
  // row K − 1.
  const int64_t end = (ho * wp + 63) * pc.stride * c + (pc.kernel - 1) * wp * c + 64 * pc.amx_blocks;
  return end > hp * wp * c ? end - hp * wp * c : 0;
}

void conv_rows_amx(const uint8_t* planes, const PackedConv& pc, int32_t z_eff, const int32_t* b, const Requant* rq,
                   int32_t* acc, int8_t* y, int64_t first, int64_t rows) {
  const int64_t hp = pc.height + 2 * pc.padding, wp = pc.width + 2 * pc.padding;
  const int64_t ho = pooled_size(pc.height, pc.kernel, pc.stride, pc.padding);
  const int64_t wo = pooled_size(pc.width, pc.kernel, pc.stride, pc.padding), per_image = ho * wo;
  const int64_t out = pc.weights.out, pairs = ceil_div(ceil_div(out, kPanel), 2), last = first + rows;
  const auto position = [&](int64_t r) { return r / wo * wp + r % wo; };  // of row r within its image
  // A block: 32 positions × 2 panels, or 64 positions × the one panel of a layer of at most 16 channels.
  const bool one_panel = out <= kPanel;
  const int64_t block = one_panel ? 2 * kBlock : kBlock, c_stride = one_panel ? kPanel : 2 * kPanel;
  alignas(64) int32_t c[kBlock * kBlock];
  alignas(64) int32_t offset[2][kPanel];
  configure_tiles();
  for (int64_t q = 0; q < pairs; ++q) {
    for (int64_t h = 0; h < 2; ++h)  // b − z_eff·Σw per channel, wrapping
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t o = (2 * q + h) * kPanel + j;
        offset[h][j] = o < out ? channel_offset(b[o], z_eff, pc.weights.row_sums[o]) : 0;
      }
    for (int64_t i = first / per_image; i * per_image < last; ++i) {
      const int64_t r_begin = std::max(first, i * per_image) - i * per_image;
      const int64_t r_end = std::min(last, (i + 1) * per_image) - i * per_image;
      const int64_t v_end = position(r_end - 1) + 1;
      const uint8_t* image = planes + i * hp * wp * pc.channels;
      for (int64_t v0 = position(r_begin); v0 < v_end; v0 += block) {
        if (one_panel) {
          conv_block_one_panel(image, pc, v0, c);
        } else {
          conv_block(image, pc, v0, q, c);
        }
        // Store the runs of positions that are outputs (ow < WO): consecutive positions, consecutive rows.
        for (int64_t m = 0; m < block && v0 + m < v_end;) {
          const int64_t v = v0 + m, ow = v % wp;
          if (ow >= wo) {
            ++m;
            continue;
          }
          const int64_t count = std::min({block - m, wo - ow, v_end - v});
          const int64_t r0 = i * per_image + v / wp * wo + ow;
          for (int64_t h = 0; h < 2 && (2 * q + h) * kPanel < out; ++h)
            conv_store(c + h * kPanel, c_stride, m, count, pc, offset[h], (2 * q + h) * kPanel, rq, acc, y, r0 - first);
          m += count;
        }
      }
    }
  }
  release_tiles();
}

// ---- The GEMM ----
//
// x is packed per call into A tiles (pack_x_tiles): row tile t (rows 16t … 16t + 15) and step s (units 16s …
// 16s + 15, 64 k) are one tile, 16 rows of 64 bytes, at xt + (t·STEPS + s)·256 int32. Every tileloadd of A,
// like those of B (a panel's steps are consecutive tiles), then reads 1 KB of consecutive memory. (Rows of x
// K_UNITS units apart put the 32 rows of a block in few L1 sets when IN is a multiple of 1024: 4 KB apart, all
// in one set, they evicted each other on every reuse.)
//
// A task is 32 rows (two row tiles) × up to kPairsPerTask panel pairs. It walks K in chunks of at most
// kChunkSteps steps: the chunk of A (32 KB at most) stays in L1 while the B tiles of the task's pairs stream
// from L2. The C tiles start as b − z_eff·Σw (the offset of their channel in every row: a tileloadd with
// stride 0), take the chunks' steps, and are stored straight into y when the block is whole (32 rows, 32
// channels); between chunks, and for the last rows and channels, they go through the task's buffer. The
// int32 sums wrap, so starting from the offset, or cutting K into chunks, gives the same bits.

namespace {

constexpr int64_t kTileInts = 256;    // one tile: 16 rows × 64 bytes
constexpr int64_t kChunkSteps = 16;   // a chunk of A: 32 rows × 1024 k = 32 KB
constexpr int64_t kPairsPerTask = 8;  // a task: 32 rows × 256 channels

// x (N, IN) codes → xt, ROWS (a multiple of 32) rows of STEPS A tiles; codes past IN and rows past N are 0.
LOWBIT_AMX void pack_x_tiles(const int8_t* x, int64_t n, int64_t rows, int64_t in, int64_t steps, int32_t* xt,
                             int threads) {
  parallel_for(rows, threads, [&](int64_t r) LOWBIT_AMX {
    const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));  // x + 128 as u8 is x with bit 7 flipped
    int32_t* row = xt + r / 16 * steps * kTileInts + r % 16 * 16;
    const int8_t* src = r < n ? x + r * in : x;  // rows past N load nothing (no pointer past x either)
    for (int64_t s = 0; s < steps; ++s) {
      const __mmask64 valid = r < n ? low_bits(in - 64 * s) : 0;
      const __m512i codes = _mm512_maskz_loadu_epi8(valid, src + 64 * s);
      _mm512_store_si512(row + s * kTileInts, _mm512_maskz_mov_epi8(valid, _mm512_xor_si512(codes, bias)));
    }
  });
}

// Where a 32 × 32 block of C starts and ends: its four C tiles are (rows 0-15, 16-31) × (panel 0, 1), tile
// 2·i + j at c + (2·i + j)·256 of the task's buffer, or at y + 16·i·OUT + 16·j, rows OUT apart.
struct BlockEnds {
  const int32_t* offset;  // first chunk: the C tiles start as offset[0 … 31] in every row; else from c
  int32_t* y;             // last chunk: stored into y (rows y_stride int32 apart); else into c
  int64_t y_stride;
};

// A 32 × 32 block of C over COUNT steps: A tiles a0 (rows 0-15) and a1 (rows 16-31), B tiles b0 and b1 (panels
// 0 and 1), each COUNT consecutive tiles.
LOWBIT_AMX void gemm_block(const int32_t* a0, const int32_t* a1, const int32_t* b0, const int32_t* b1, int64_t count,
                           const BlockEnds& ends, int32_t* c) {
  compiler_barrier();
  if (ends.offset) {
    _tile_loadd(0, ends.offset, 0);
    _tile_loadd(1, ends.offset + 16, 0);
    _tile_loadd(2, ends.offset, 0);
    _tile_loadd(3, ends.offset + 16, 0);
  } else {
    _tile_loadd(0, c, 64);
    _tile_loadd(1, c + kTileInts, 64);
    _tile_loadd(2, c + 2 * kTileInts, 64);
    _tile_loadd(3, c + 3 * kTileInts, 64);
  }
  for (int64_t s = 0; s < count; ++s) {
    const int64_t at = s * kTileInts;
    _tile_loadd(4, a0 + at, 64);
    _tile_loadd(6, b0 + at, 64);
    _tile_loadd(7, b1 + at, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_loadd(5, a1 + at, 64);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  if (ends.y) {
    const int64_t stride = 4 * ends.y_stride;
    _tile_stored(0, ends.y, stride);
    _tile_stored(1, ends.y + 16, stride);
    _tile_stored(2, ends.y + 16 * ends.y_stride, stride);
    _tile_stored(3, ends.y + 16 * ends.y_stride + 16, stride);
  } else {
    _tile_stored(0, c, 64);
    _tile_stored(1, c + kTileInts, 64);
    _tile_stored(2, c + 2 * kTileInts, 64);
    _tile_stored(3, c + 3 * kTileInts, 64);
  }
  compiler_barrier();
}

// The rows [r0, N) and channels [o0, OUT) of a block that its four C tiles in c hold, into y.
LOWBIT_AMX void store_partial_block(const int32_t* c, int32_t* y, int64_t n, int64_t out, int64_t r0, int64_t o0) {
  const int64_t rows = min_i64(32, n - r0);
  for (int64_t j = 0; j < 2; ++j) {
    const int64_t channels = min_i64(kPanel, out - o0 - j * kPanel);
    if (channels <= 0) break;
    const auto mask = static_cast<__mmask16>(channels >= 16 ? 0xFFFF : (1u << channels) - 1);
    for (int64_t r = 0; r < rows; ++r)
      _mm512_mask_storeu_epi32(y + (r0 + r) * out + o0 + j * kPanel, mask,
                               _mm512_load_si512(c + (r / 16 * 2 + j) * kTileInts + r % 16 * 16));
  }
}

// Rows [r0, r0 + 32) ∩ [0, N) × panel pairs [q0, q1) of y; offset is (PANELS · 16) b − z_eff·Σw.
LOWBIT_AMX void gemm_task(const int32_t* xt, const PackedWeights& w, const int32_t* offset, int32_t* y, int64_t n,
                          int64_t r0, int64_t q0, int64_t q1) {
  alignas(64) int32_t c[kPairsPerTask * 4 * kTileInts];
  const int64_t steps = w.k_units / kUnitsPerTile, chunks = ceil_div(steps, kChunkSteps), out = w.out;
  const int32_t* a0 = xt + r0 / 16 * steps * kTileInts;
  const int32_t* a1 = a0 + steps * kTileInts;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t s0 = steps * chunk / chunks, s1 = steps * (chunk + 1) / chunks;
    for (int64_t q = q0; q < q1; ++q) {
      const int32_t* b0 = w.units.data() + (2 * q * w.k_units * kPanel) + s0 * kTileInts;
      int32_t* cq = c + (q - q0) * 4 * kTileInts;
      const bool last = chunk == chunks - 1, whole = r0 + 32 <= n && 32 * (q + 1) <= out;
      const BlockEnds ends{chunk == 0 ? offset + 32 * q : nullptr, last && whole ? y + r0 * out + 32 * q : nullptr,
                           out};
      gemm_block(a0 + s0 * kTileInts, a1 + s0 * kTileInts, b0, b0 + w.k_units * kPanel, s1 - s0, ends, cq);
      if (last && !whole) store_partial_block(cq, y, n, out, r0, 32 * q);
    }
  }
}

}  // namespace

size_t qgemm_amx_workspace_size(int64_t n, const PackedWeights& w) {
  // A tiles, the offsets, and room to align them to 64 bytes.
  return static_cast<size_t>(ceil_div(n, kBlock) * kBlock * w.k_units + w.panels * kPanel + 16);
}

void qgemm_amx(const int8_t* x, int32_t x_zero_point, const PackedWeights& w, const int32_t* b, int32_t* y, int64_t n,
               int32_t* workspace, int threads) {
  const int32_t z_eff = x_zero_point + 128;
  const int64_t row_blocks = ceil_div(n, kBlock), pairs = w.panels / 2;
  const int64_t pair_tasks = ceil_div(pairs, kPairsPerTask);
  int32_t* xt = workspace + (-reinterpret_cast<uintptr_t>(workspace) / 4 % 16);  // 64-byte aligned
  int32_t* offset = xt + row_blocks * kBlock * w.k_units;
  for (int64_t o = 0; o < w.panels * kPanel; ++o)  // b − z_eff·Σw, wrapping; 0 past OUT
    offset[o] = o < w.out ? channel_offset(b[o], z_eff, w.row_sums[o]) : 0;
  pack_x_tiles(x, n, row_blocks * kBlock, w.in, w.k_units / kUnitsPerTile, xt, threads);
  // Every y element is computed by one task, in a fixed order: the result does not depend on the threads.
  // Each thread configures its tiles before its first task and releases them after its last.
  const int64_t tasks = row_blocks * pair_tasks;
  const int workers = static_cast<int>(min_i64(threads, tasks));
  parallel_for(workers, workers, [&](int64_t worker) {
    configure_tiles();
    for (int64_t t = tasks * worker / workers; t < tasks * (worker + 1) / workers; ++t) {
      const int64_t rb = t / pair_tasks, q0 = t % pair_tasks * kPairsPerTask;
      gemm_task(xt, w, offset, y, n, rb * kBlock, q0, min_i64(pairs, q0 + kPairsPerTask));
    }
    release_tiles();
  });
}

}  // namespace lowbit::quant::runtime::detail
