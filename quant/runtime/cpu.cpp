// CPU feature detection (CPUID + XGETBV + Linux's AMX permission) and the choice of the kernel path.
#include "quant/runtime/cpu.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "quant/runtime/graph.h"

namespace lowbit::quant::runtime {

namespace {

// CPUID bits (Intel SDM vol. 2, CPUID): leaf 1 ECX; leaf 7 subleaf 0 EBX, ECX, EDX; leaf 7 subleaf 1 EAX.
constexpr uint32_t kOsxsave = 1u << 27;  // leaf 1 ECX: the OS uses XSAVE, so XGETBV may be executed
constexpr uint32_t kAvx2 = 1u << 5;      // leaf 7 EBX
constexpr uint32_t kAvx512F = 1u << 16, kAvx512Bw = 1u << 30, kAvx512Vl = 1u << 31;  // leaf 7 EBX
constexpr uint32_t kAvx512Vbmi = 1u << 1, kAvx512Vnni = 1u << 11;                    // leaf 7 ECX
constexpr uint32_t kAmxTile = 1u << 24, kAmxInt8 = 1u << 25;                         // leaf 7 EDX
constexpr uint32_t kAvxVnni = 1u << 4;                                               // leaf 7.1 EAX

// XCR0: the register states the OS saves and restores on a context switch, so user code may use them.
constexpr uint64_t kXcr0Ymm = 0x6;        // bits 1-2: xmm and the upper halves of ymm
constexpr uint64_t kXcr0Zmm = 0xE0;       // bits 5-7: opmask k0-k7, upper halves of zmm0-15, zmm16-31
constexpr uint64_t kXcr0Tiles = 0x60000;  // bits 17-18: XTILECFG and XTILEDATA

// Linux (arch/x86/include/uapi/asm/prctl.h): a process must ask for the 8 KB of tile data state once
// before its first tile instruction, or that instruction faults.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

uint64_t xgetbv0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
}

CpuFeatures detect() {
  CpuFeatures f;
  uint32_t a = 0, b = 0, c = 0, d = 0;
  if (static_cast<uint32_t>(__get_cpuid_max(0x80000000, nullptr)) >= 0x80000004u) {
    char brand[49] = {};
    for (uint32_t leaf = 0; leaf < 3; ++leaf) {
      __get_cpuid(0x80000002 + leaf, &a, &b, &c, &d);
      const uint32_t words[4] = {a, b, c, d};
      std::memcpy(brand + 16 * leaf, words, 16);
    }
    f.model = brand;
    f.model.erase(0, f.model.find_first_not_of(' '));
  }
  if (!__get_cpuid(1, &a, &b, &c, &d) || (c & kOsxsave) == 0) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm = (xcr0 & kXcr0Ymm) == kXcr0Ymm, zmm = ymm && (xcr0 & kXcr0Zmm) == kXcr0Zmm;
  const bool tiles = (xcr0 & kXcr0Tiles) == kXcr0Tiles;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const uint32_t ebx7 = b, ecx7 = c, edx7 = d;
  f.avx2 = ymm && (ebx7 & kAvx2) != 0;
  f.avx512 = zmm && (ebx7 & kAvx512F) && (ebx7 & kAvx512Bw) && (ebx7 & kAvx512Vl);
  f.avx512_vnni = f.avx512 && (ecx7 & kAvx512Vnni) != 0;
  f.avx512_vbmi = f.avx512 && (ecx7 & kAvx512Vbmi) != 0;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx_vnni = ymm && (a & kAvxVnni) != 0;
  if (tiles && (edx7 & kAmxTile) && (edx7 & kAmxInt8)) {
    f.amx_int8 = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }
  return f;
}

constexpr int kNoPath = -1;
std::atomic<int> forced_path{kNoPath};  // set_kernel_path's choice

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::string cpu_instruction_sets() {
  const CpuFeatures& f = cpu_features();
  std::string sets;
  for (const auto& [present, name] : {std::pair{f.avx2, "avx2"}, std::pair{f.avx512, "avx512(f,bw,vl)"},
                                      std::pair{f.avx512_vnni, "avx512-vnni"}, std::pair{f.avx512_vbmi, "avx512-vbmi"},
                                      std::pair{f.avx_vnni, "avx-vnni"}, std::pair{f.amx_int8, "amx-int8"}}) {
    if (!present) continue;
    if (!sets.empty()) sets += ' ';
    sets += name;
  }
  return sets.empty() ? "none of avx2, avx512, vnni, amx" : sets;
}

bool cpu_supports(KernelPath path) {
  const CpuFeatures& f = cpu_features();
  switch (path) {
    case KernelPath::Ref:
      return true;
    case KernelPath::Avx2:
      return f.avx2;
    case KernelPath::AvxVnni:
      return f.avx2 && f.avx_vnni;
    case KernelPath::Vnni512:
      return f.avx2 && f.avx512_vnni;  // the shared parts (requantization, padding) are AVX2 code
    case KernelPath::Amx:
      return f.avx2 && f.avx512_vnni && f.amx_int8;  // AMX runs the big GEMMs, VNNI the rest
  }
  return false;
}

KernelPath best_kernel_path() {
  for (const KernelPath path : {KernelPath::Amx, KernelPath::Vnni512, KernelPath::AvxVnni, KernelPath::Avx2}) {
    if (cpu_supports(path)) return path;
  }
  return KernelPath::Ref;
}

const char* kernel_path_name(KernelPath path) {
  switch (path) {
    case KernelPath::Ref:
      return "ref";
    case KernelPath::Avx2:
      return "avx2";
    case KernelPath::AvxVnni:
      return "avxvnni";
    case KernelPath::Vnni512:
      return "vnni";
    case KernelPath::Amx:
      return "amx";
  }
  return "?";
}

KernelPath parse_kernel_path(std::string_view name) {
  if (name == "auto") return best_kernel_path();
  for (const KernelPath path :
       {KernelPath::Ref, KernelPath::Avx2, KernelPath::AvxVnni, KernelPath::Vnni512, KernelPath::Amx}) {
    if (name != kernel_path_name(path)) continue;
    if (!cpu_supports(path)) {
      throw RuntimeError("kernel path '" + std::string(name) + "' needs instructions this CPU (" +
                         cpu_features().model + ") lacks; it has: " + cpu_instruction_sets() +
                         ". Choose one of the paths it supports, or 'auto'");
    }
    return path;
  }
  throw RuntimeError("unknown kernel path '" + std::string(name) + "': expected ref, avx2, avxvnni, vnni, amx or auto");
}

KernelPath kernel_path() {
  const int forced = forced_path.load(std::memory_order_relaxed);
  if (forced != kNoPath) return static_cast<KernelPath>(forced);
  static const KernelPath from_environment = [] {
    const char* name = std::getenv("LOWBIT_KERNELS");
    if (name == nullptr || *name == '\0') return best_kernel_path();
    try {
      return parse_kernel_path(name);
    } catch (const RuntimeError& e) {
      throw RuntimeError(std::string("environment variable LOWBIT_KERNELS: ") + e.what());
    }
  }();
  return from_environment;
}

void set_kernel_path(KernelPath path) {
  if (!cpu_supports(path)) (void)parse_kernel_path(kernel_path_name(path));  // throws the explanation
  forced_path.store(static_cast<int>(path), std::memory_order_relaxed);
}

}  // namespace lowbit::quant::runtime
