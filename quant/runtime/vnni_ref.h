// vpdpbusd in plain C++: the one instruction of the VNNI and AMX kernels, and the exact int8 dot product on it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace lowbit::quant::runtime {

// AVX-512 VNNI's vpdpbusd (and AMX's tdpbusd) multiplies an UNSIGNED byte by a SIGNED byte, four at a time: in
// each 32-bit lane j it adds a[4j]·b[4j] + … + a[4j + 3]·b[4j + 3] to the int32 accumulator. The kernels of
// kernels_avx512.cpp and kernels_amx.cpp feed it int8 activations shifted to u8; docs/quantization.md derives
// why that is exact ("Eq. 5 on u8 × s8 instructions"). The two functions below do the same one lane at a time.

// Exercise 09 (docs/exercises/09-exact-vnni.md): the student build only declares the next two functions and
// compiles docs/exercises/student/ex09_vnni_dot.cpp instead.
#ifdef LOWBIT_EXERCISES
int32_t dpbusd_lane(int32_t acc, uint32_t a, uint32_t b);
int32_t dot_s8_via_dpbusd(std::span<const int8_t> x, std::span<const int8_t> w, int32_t w_sum);
#else
// One 32-bit lane of vpdpbusd: acc + Σ_{i<4} a_i·b_i, where a_i is byte i of a (bits 8i..8i+7) read as u8 and b_i
// byte i of b read as s8. Each product is exact (|255·(−128)| < 2^15); the adds wrap modulo 2^32, as the
// instruction's do (its saturating twin vpdpbusds is never used).
inline int32_t dpbusd_lane(int32_t acc, uint32_t a, uint32_t b) {
  uint32_t sum = static_cast<uint32_t>(acc);
  for (int i = 0; i < 4; ++i) {
    const int32_t a_i = static_cast<uint8_t>(a >> (8 * i));
    const int32_t b_i = static_cast<int8_t>(static_cast<uint8_t>(b >> (8 * i)));
    sum += static_cast<uint32_t>(a_i * b_i);
  }
  return static_cast<int32_t>(sum);
}

// Σ_k x[k]·w[k] for int8 x and w (the same length K), computed the way the VNNI kernels do: the u8 operand is
// x[k] + 128 (x[k] with bit 7 flipped), the s8 operand w[k], four k per dpbusd_lane (a last group of fewer than
// four is padded with w = 0), and then 128·w_sum is subtracted, w_sum = Σ_k w[k] computed once per weight row:
//   Σ_k x[k]·w[k] = Σ_k (x[k] + 128)·w[k] − 128·Σ_k w[k]
// The sum on the right may leave int32 on the way; everything wraps modulo 2^32, so the result is exact whenever
// the true Σ_k x[k]·w[k] fits in int32.
inline int32_t dot_s8_via_dpbusd(std::span<const int8_t> x, std::span<const int8_t> w, int32_t w_sum) {
  int32_t acc = 0;
  for (size_t k = 0; k < x.size(); k += 4) {
    uint32_t a = 0, b = 0;
    for (size_t i = 0; i < 4 && k + i < x.size(); ++i) {
      a |= uint32_t{static_cast<uint8_t>(static_cast<uint8_t>(x[k + i]) ^ 0x80u)} << (8 * i);  // x + 128
      b |= uint32_t{static_cast<uint8_t>(w[k + i])} << (8 * i);
    }
    acc = dpbusd_lane(acc, a, b);
  }
  return static_cast<int32_t>(static_cast<uint32_t>(acc) - 128u * static_cast<uint32_t>(w_sum));
}
#endif  // LOWBIT_EXERCISES

}  // namespace lowbit::quant::runtime
