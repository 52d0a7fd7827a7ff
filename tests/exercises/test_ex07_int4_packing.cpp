// Exercise 07 checks: two signed 4-bit codes per byte, low nibble first, sign-extended on unpacking (int4.h).
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "quant/runtime/int4.h"

using namespace lowbit::quant::runtime;

namespace {

// Bytes written as the hex a reader sees in a dump.
constexpr int8_t byte(unsigned hex) { return static_cast<int8_t>(static_cast<uint8_t>(hex)); }

}  // namespace

TEST_CASE("pack_int4_pair: the even code in the low nibble, the odd code in the high nibble") {
  CHECK(pack_int4_pair(1, 2) == byte(0x21));
  CHECK(pack_int4_pair(-1, 0) == byte(0x0F));  // −1 is 1111 in four bits
  CHECK(pack_int4_pair(0, -1) == byte(0xF0));
  CHECK(pack_int4_pair(0, -8) == byte(0x80));  // −8 is 1000
  CHECK(pack_int4_pair(7, -8) == byte(0x87));
  CHECK(pack_int4_pair(-8, 7) == byte(0x78));  // the low code's sign bits must not reach the high nibble
  CHECK(pack_int4_pair(5, -3) == byte(0xD5));  // −3 is 1101
  CHECK(pack_int4_pair(-1, -1) == byte(0xFF));
}

TEST_CASE("unpack_int4_nibble: nibble 0 is the low one, and both are sign-extended") {
  CHECK(unpack_int4_nibble(byte(0x8F), 0) == -1);
  CHECK(unpack_int4_nibble(byte(0x8F), 1) == -8);
  CHECK(unpack_int4_nibble(byte(0x70), 0) == 0);
  CHECK(unpack_int4_nibble(byte(0x70), 1) == 7);
  CHECK(unpack_int4_nibble(byte(0x07), 0) == 7);
  CHECK(unpack_int4_nibble(byte(0xD5), 0) == 5);
  CHECK(unpack_int4_nibble(byte(0xD5), 1) == -3);
  CHECK(unpack_int4_nibble(byte(0x00), 1) == 0);
}

TEST_CASE("all 256 pairs of codes in [−8, 7] survive packing and unpacking") {
  int failures = 0;
  for (int low = kInt4Min; low <= kInt4Max; ++low) {
    for (int high = kInt4Min; high <= kInt4Max; ++high) {
      const int8_t packed = pack_int4_pair(static_cast<int8_t>(low), static_cast<int8_t>(high));
      const bool ok = unpack_int4_nibble(packed, 0) == low && unpack_int4_nibble(packed, 1) == high;
      if (!ok && ++failures <= 5) FAIL_CHECK("pair (" << low << ", " << high << ") packs to " << int{packed});
    }
  }
  CHECK(failures == 0);
}

TEST_CASE("all 256 bytes survive unpacking and packing") {
  int failures = 0;
  for (int b = 0; b < 256; ++b) {
    const int8_t packed = byte(static_cast<unsigned>(b));
    const int8_t repacked = pack_int4_pair(unpack_int4_nibble(packed, 0), unpack_int4_nibble(packed, 1));
    if (repacked != packed && ++failures <= 5) FAIL_CHECK("byte " << b << " repacks to " << int{repacked});
  }
  CHECK(failures == 0);
}

TEST_CASE("streams: [a, b, c] packs to [(b << 4) | a, c], an odd count leaves the last high nibble 0") {
  const std::vector<int8_t> codes = {3, -4, 5};
  std::vector<int8_t> packed(int4_packed_size(codes.size()), byte(0xAA));
  REQUIRE(packed.size() == 2);
  pack_int4(codes, packed);
  CHECK(packed == std::vector<int8_t>{byte(0xC3), byte(0x05)});  // −4 is 1100
  std::vector<int8_t> unpacked(codes.size());
  unpack_int4(packed, unpacked);
  CHECK(unpacked == codes);
  CHECK(unpack_int4_at(packed, 1) == -4);
}
