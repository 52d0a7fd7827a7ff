// Which integer kernels this CPU can run (CPUID and the operating system's consent), and which ones run.
#pragma once

#include <string>
#include <string_view>

namespace lowbit::quant::runtime {

// The instruction sets of the integer kernels, slowest first. Every path computes the same codes, bit for bit.
//   Ref      plain loops (kernels_ref.cpp), any CPU
//   Avx2     vpmaddwd / vpmaddubsw (kernels_avx2.cpp)
//   AvxVnni  AVX-VNNI vpdpbusd on ymm, the VEX form of client CPUs without AVX-512 (kernels_avxvnni.cpp) for the
//            GEMMs and convolutions; everything else on the Avx2 kernels
//   Vnni512  AVX-512 VNNI vpdpbusd: u8 × s8, four products summed into each int32 lane (kernels_avx512.cpp)
//   Amx      AMX-INT8 tdpbusd tile products for GEMMs of at least 32 rows (kernels_amx.cpp);
//            everything else (the convolutions, small GEMMs) on the Vnni512 kernels
enum class KernelPath { Ref, Avx2, AvxVnni, Vnni512, Amx };

// What CPUID reports, already reduced by what the OS has enabled (XGETBV) and, for AMX, granted (arch_prctl).
struct CpuFeatures {
  bool avx2 = false;         // AVX2, with the ymm state enabled by the OS
  bool avx512 = false;       // AVX-512 F, BW and VL, with the opmask and zmm state enabled
  bool avx512_vnni = false;  // and AVX-512 VNNI
  bool avx512_vbmi = false;  // AVX-512 VBMI (byte permutes: the 64-pixel input lookup of the Vnni512 path)
  bool avx_vnni = false;     // AVX-VNNI (the 256-bit VEX form of vpdpbusd: the AvxVnni path)
  bool amx_int8 = false;     // AMX-TILE and AMX-INT8, tile state enabled and tile data granted to this process
  std::string model;         // the CPUID brand string (the "model name" of /proc/cpuinfo)
};

// Detected once, on the first call (thread-safe).
const CpuFeatures& cpu_features();

// The instruction sets found, for reports: e.g. "avx2 avx512(f,bw,vl) avx512-vnni avx-vnni amx-int8".
std::string cpu_instruction_sets();

bool cpu_supports(KernelPath path);
KernelPath best_kernel_path();  // the fastest path cpu_supports

// "ref", "avx2", "avxvnni", "vnni", "amx".
const char* kernel_path_name(KernelPath path);

// "ref" | "avx2" | "avxvnni" | "vnni" | "amx" | "auto" (the best path). Throws RuntimeError for another name, or for a
// path this CPU lacks (the message names the instruction sets it has).
KernelPath parse_kernel_path(std::string_view name);

// The path the Executor and the convenience kernels (qgemm_s8, qgemm_s4) use: the last set_kernel_path,
// else the environment variable LOWBIT_KERNELS (read once, parsed by parse_kernel_path, so a bad value
// throws), else best_kernel_path().
KernelPath kernel_path();
// Throws RuntimeError if the CPU lacks the path. apps: --kernels NAME is set_kernel_path(parse_kernel_path(NAME)).
void set_kernel_path(KernelPath path);

}  // namespace lowbit::quant::runtime
