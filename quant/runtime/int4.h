// Signed 4-bit codes packed two per byte: pack_int4 and unpack_int4, with the nibble order pinned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace lowbit::quant::runtime {

// Layout: element 2i goes to the LOW nibble of byte i, element 2i+1 to its HIGH nibble.
// Each nibble is a two's-complement code in [−8, 7]; unpacking sign-extends it.
// An odd count leaves the last high nibble 0.
//
//   codes  [a, b, c]   →   bytes [ (b << 4) | (a & 0xF),  (0 << 4) | (c & 0xF) ]
//
// A weight matrix (OUT, IN) with int4 codes is packed ROW BY ROW: every row starts on a byte
// boundary and takes int4_packed_size(IN) bytes (IN rounded up to an even number of nibbles),
// so the whole matrix takes OUT · int4_packed_size(IN) bytes. Conv2d weights (OUT, C, K, K)
// are the matrix (OUT, C·K·K).

inline constexpr int32_t kInt4Min = -8;
inline constexpr int32_t kInt4Max = 7;

constexpr size_t int4_packed_size(size_t count) { return (count + 1) / 2; }

// Exercise 07 (docs/exercises/07-int4-packing.md): the student build only declares the next two
// functions and compiles docs/exercises/student/ex07_int4_packing.cpp instead.
#ifdef LOWBIT_EXERCISES
int8_t pack_int4_pair(int8_t low, int8_t high);
int8_t unpack_int4_nibble(int8_t byte, int nibble);
#else
// One byte from two codes (low = even index, high = odd index).
constexpr int8_t pack_int4_pair(int8_t low, int8_t high) {
  return static_cast<int8_t>(
      static_cast<uint8_t>((static_cast<uint8_t>(high) << 4) | (static_cast<uint8_t>(low) & 0x0F)));
}

// Nibble 0 (low) or 1 (high) of a byte, sign-extended to int8.
constexpr int8_t unpack_int4_nibble(int8_t byte, int nibble) {
  const auto bits = static_cast<uint8_t>(static_cast<uint8_t>(byte) >> (4 * nibble));
  return static_cast<int8_t>(static_cast<int8_t>(static_cast<uint8_t>(bits << 4)) >> 4);
}
#endif  // LOWBIT_EXERCISES

// The stream functions below are inline, not constexpr, so that they also build on the student's versions.

// Element i of a packed stream.
inline int8_t unpack_int4_at(std::span<const int8_t> packed, size_t i) {
  return unpack_int4_nibble(packed[i / 2], static_cast<int>(i % 2));
}

// Code k of output row o of a weight matrix with rows of `row_length` codes: int8 codes (bits 8), or packed
// int4 rows each starting on a byte (bits 4). The reference kernels read weights through this.
inline int32_t weight_code(std::span<const int8_t> w, int bits, int64_t row_length, int64_t o, int64_t k) {
  if (bits == 8) return w[static_cast<size_t>(o * row_length + k)];
  const auto row_bytes = static_cast<int64_t>(int4_packed_size(static_cast<size_t>(row_length)));
  return unpack_int4_at(w.subspan(static_cast<size_t>(o * row_bytes), static_cast<size_t>(row_bytes)),
                        static_cast<size_t>(k));
}

// codes (COUNT) in [−8, 7] → packed (int4_packed_size(COUNT)).
inline void pack_int4(std::span<const int8_t> codes, std::span<int8_t> packed) {
  for (size_t i = 0; i < codes.size(); i += 2) {
    const int8_t high = i + 1 < codes.size() ? codes[i + 1] : int8_t{0};
    packed[i / 2] = pack_int4_pair(codes[i], high);
  }
}

// packed (int4_packed_size(COUNT)) → codes (COUNT).
inline void unpack_int4(std::span<const int8_t> packed, std::span<int8_t> codes) {
  for (size_t i = 0; i < codes.size(); ++i) codes[i] = unpack_int4_at(packed, i);
}

// The layout, pinned at compile time.
static_assert(int4_packed_size(0) == 0 && int4_packed_size(3) == 2 && int4_packed_size(4) == 2);
// Exercise 07: the student's versions are not constexpr.
#ifndef LOWBIT_EXERCISES
static_assert(pack_int4_pair(1, 2) == 0x21);  // low nibble first
static_assert(pack_int4_pair(-1, 0) == 0x0F && pack_int4_pair(0, -8) == int8_t(0x80));
static_assert(unpack_int4_nibble(int8_t(0x8F), 0) == -1 && unpack_int4_nibble(int8_t(0x8F), 1) == -8);
static_assert(unpack_int4_nibble(0x70, 1) == 7 && unpack_int4_nibble(0x07, 0) == 7);
#endif

}  // namespace lowbit::quant::runtime
