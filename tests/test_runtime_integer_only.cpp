// Proves the runtime is integer-only: no floating-point instruction in its object files, no float type in its source.
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

constexpr int kMaxReportedLines = 20;

// Mnemonics of floating-point arithmetic or conversion: SSE/AVX/AVX-512 scalar and packed (…ss, …sd, …ps, …pd,
// and the half-precision …sh, …ph), FMA, AVX-512's approximations and classifications (vrcp14ps, vrndscaleps,
// vfpclassps, vexp2ps), the bfloat16 and fp16 dot products (vdpbf16ps, AMX's tdpbf16ps and tdpfp16ps), every
// conversion touching a real type (cvt…), and the x87 unit (every mnemonic starting with f).
// Integer SIMD (vpmaddwd, vpdpbusd, vpaddd, …) starts with "p"/"vp" and never matches, nor do AMX's integer
// tile products (tdpbusd, tdpbssd) and tile moves; plain moves, masks, shuffles and logic (vmovups, vmovdqu8,
// kmovw, vxorps, vpermilps) are allowed.
const std::regex kFloatMnemonic(
    "^v?(add|sub|mul|div|sqrt|max|min|rcp|rsqrt|round|dp|hadd|hsub|addsub|cmp|comi|ucomi|getexp|getmant|scalef|range|"
    "reduce|fixupimm)(ss|sd|ps|pd|sh|ph)$"
    "|^vf(n)?m(add|sub|addsub|subadd)[0-9]*(ss|sd|ps|pd|ph|sh)$"
    "|^v(rcp|rsqrt)(14|28)(ss|sd|ps|pd)$|^vrndscale|^vfpclass|^vexp2|^v?dpbf16ps$|^tdp(bf16|fp16)ps$"
    "|cvt"
    "|^f[a-z0-9]*$");

// Prefix words objdump prints before the mnemonic ({vex}: the VEX form of an instruction that also has an EVEX
// one, as AVX-VNNI's vpdpbusd).
bool is_prefix(const std::string& word) {
  return word == "{vex}" || word == "lock" || word == "rep" || word == "repz" || word == "repnz" || word == "repe" ||
         word == "repne" || word == "notrack" || word == "bnd" || word == "data16" || word == "addr32" ||
         word == "cs" || word == "ds";
}

std::string run_command(const std::string& command) {
  std::string output;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return output;
  char buffer[4096];
  while (fgets(buffer, sizeof buffer, pipe) != nullptr) output += buffer;
  pclose(pipe);
  return output;
}

}  // namespace

TEST_CASE("the object files of lowbit_runtime contain no floating-point instruction") {
  const fs::path objects = fs::path(LOWBIT_BIN_DIR) / ".." / "quant" / "CMakeFiles" / "lowbit_runtime.dir" / "runtime";
  REQUIRE_MESSAGE(fs::is_directory(objects), "no object directory ", objects.string());
  REQUIRE_MESSAGE(!run_command("objdump --version").empty(), "objdump is needed (binutils)");
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(objects)) {
    if (entry.path().extension() == ".o") files.push_back(entry.path());
  }
  // graph, executor, cpu, kernels_ref, kernels_dispatch, kernels_avx2, kernels_avxvnni, kernels_avx512, kernels_amx
  REQUIRE(files.size() >= 8);
  int offending = 0, undecoded = 0;
  int64_t vnni = 0, amx = 0;  // the instructions the fast paths exist for: proof that their code was read
  int64_t instructions = 0;
  for (const fs::path& file : files) {
    std::istringstream listing(run_command("objdump -d --no-show-raw-insn '" + file.string() + "'"));
    std::string line;
    while (std::getline(listing, line)) {
      // Instruction lines look like "  4f:\tvpmaddwd %ymm1,%ymm2,%ymm3".
      const size_t tab = line.find(":\t");
      if (tab == std::string::npos) continue;
      std::istringstream words(line.substr(tab + 2));
      std::string mnemonic;
      while (words >> mnemonic && is_prefix(mnemonic)) {
      }
      // objdump prints "(bad)" for bytes it cannot decode: an instruction too new for this binutils would
      // otherwise pass unread.
      if (mnemonic == "(bad)" && ++undecoded <= kMaxReportedLines)
        std::printf("%s: %s\n", file.filename().c_str(), line.c_str());
      if (mnemonic.empty() || mnemonic.front() == '(') continue;
      ++instructions;
      vnni += mnemonic == "vpdpbusd";
      amx += mnemonic == "tdpbusd";
      if (std::regex_search(mnemonic, kFloatMnemonic) && ++offending <= kMaxReportedLines) {
        std::printf("%s: %s\n", file.filename().c_str(), line.c_str());
      }
    }
  }
  MESSAGE(instructions, " instructions checked in ", files.size(), " object files (", vnni, " vpdpbusd, ", amx,
          " tdpbusd)");
  CHECK(instructions > 1000);
  CHECK(vnni > 0);
  CHECK(amx > 0);
  CHECK(undecoded == 0);
  CHECK(offending == 0);
}

TEST_CASE("the AVX-VNNI kernels contain no AVX-512 instruction: they run on CPUs without AVX-512") {
  const fs::path object = fs::path(LOWBIT_BIN_DIR) / ".." / "quant" / "CMakeFiles" / "lowbit_runtime.dir" / "runtime" /
                          "kernels_avxvnni.cpp.o";
  REQUIRE_MESSAGE(fs::exists(object), "no object file ", object.string());
  // Every AVX-512 instruction (zmm, opmask, or an EVEX-only form on ymm) is EVEX-encoded, and in 64-bit mode an
  // instruction whose first byte is 0x62 is EVEX; AVX2 and AVX-VNNI are VEX-encoded (first byte 0xC4 or 0xC5).
  std::istringstream listing(run_command("objdump -d '" + object.string() + "'"));
  int evex = 0;
  int64_t vex_vnni = 0;
  std::string line;
  while (std::getline(listing, line)) {
    // "  4f:\tc4 e2 75 50 c1          \t{vex} vpdpbusd %ymm1,%ymm2,%ymm0"; a long instruction's last bytes
    // continue on a line without the mnemonic column.
    const size_t tab = line.find(":\t");
    if (tab == std::string::npos) continue;
    const size_t text = line.find('\t', tab + 2);
    if (text == std::string::npos) continue;
    vex_vnni += line.find("{vex} vpdpbusd", text) != std::string::npos;
    if (line.compare(tab + 2, 2, "62") == 0 && ++evex <= kMaxReportedLines) std::printf("EVEX: %s\n", line.c_str());
  }
  MESSAGE(vex_vnni, " VEX-encoded vpdpbusd in kernels_avxvnni");
  CHECK(vex_vnni > 0);
  CHECK(evex == 0);
}

TEST_CASE("the runtime sources never name a real-number type") {
  const fs::path sources = fs::path(LOWBIT_SOURCE_DIR) / "quant" / "runtime";
  const std::regex kRealType("\\b(float|double|long double|_Float[0-9]+|__bf16|_Float16)\\b");
  int offending = 0;
  for (const auto& entry : fs::directory_iterator(sources)) {
    std::ifstream in(entry.path());
    std::string line;
    for (int number = 1; std::getline(in, line); ++number) {
      if (std::regex_search(line, kRealType) && ++offending <= kMaxReportedLines) {
        std::printf("%s:%d: %s\n", entry.path().filename().c_str(), number, line.c_str());
      }
    }
  }
  CHECK(offending == 0);
}

TEST_CASE("the float-detecting pattern catches what it must and passes integer SIMD") {
  for (const char* bad : {"addss",        "vaddps",         "vmulsd",     "divss",       "sqrtss",    "vfmadd231ps",
                          "vfnmadd132sd", "cvtsi2ss",       "cvttss2si",  "vcvtdq2ps",   "cvtps2dq",  "maxss",
                          "vminps",       "fadd",           "fmulp",      "fld",         "fistp",     "vrcp14ps",
                          "vrsqrt14ss",   "vrndscaleps",    "vfpclassps", "vexp2ps",     "vdpbf16ps", "tdpbf16ps",
                          "tdpfp16ps",    "vcvtne2ps2bf16", "vaddph",     "vfmadd231ph", "vscalefps", "vcvtusi2ss"}) {
    CHECK_MESSAGE(std::regex_search(std::string(bad), kFloatMnemonic), bad);
  }
  for (const char* good :
       {"vpmaddwd",   "vpmaddubsw",   "vpaddd",      "paddd",    "vpmaxsd",   "pminsd",    "vpmulld",   "vmovups",
        "vxorps",     "vpbroadcastd", "imul",        "add",      "sub",       "mov",       "vpsrad",    "vpermilps",
        "sar",        "vpdpbusd",     "vpdpbusds",   "vpdpwssd", "tdpbusd",   "tdpbssd",   "tileloadd", "tilestored",
        "tilezero",   "ldtilecfg",    "tilerelease", "vmovdqu8", "vmovdqu32", "vmovdqa64", "vpmovzxbd", "vpmovdb",
        "vpternlogd", "vpmulld",      "kmovw",       "kmovq",    "vpcmpgtd",  "vpmaxsd"}) {
    CHECK_MESSAGE(!std::regex_search(std::string(good), kFloatMnemonic), good);
  }
}
