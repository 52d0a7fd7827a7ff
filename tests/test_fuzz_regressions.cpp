// The fuzz targets' bodies as ordinary tests: every seed file loads, and every input kept in
// tests/fuzz/regressions/<target>/ (one per finding) goes through its target without a crash.
#include <doctest/doctest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "tests/data_fixtures.h"
#include "tests/fuzz/fuzz_targets.h"
#include "tests/fuzz/seeds.h"

namespace fs = std::filesystem;
using namespace lowbit;

namespace {

// Runs the body of fuzz target `target` on `bytes`.
fuzz::Outcome run_target(const std::string& target, const std::vector<uint8_t>& bytes) {
  if (target == "idx") return fuzz::idx_input(bytes);
  const auto as_bytes = std::as_bytes(std::span(bytes));
  return target == "checkpoint" ? fuzz::checkpoint_input(as_bytes) : fuzz::int_model_input(as_bytes);
}

const std::vector<std::string> kTargets = {"idx", "checkpoint", "int_model"};

}  // namespace

TEST_CASE("every seed file of the fuzz corpus is valid: it loads through its target") {
  data_fixtures::TempDir dir("fuzz_seeds");
  fuzz::write_seeds(dir.path);
  for (const std::string& target : kTargets) {
    int files = 0;
    for (const auto& entry : fs::directory_iterator(dir.path / target)) {
      CAPTURE(entry.path().string());
      CHECK(run_target(target, data_fixtures::read_bytes(entry.path().string())) == fuzz::Outcome::Loaded);
      ++files;
    }
    CAPTURE(target);
    CHECK(files >= 1);
  }
}

TEST_CASE("a seed with one byte flipped anywhere goes through its target without a crash") {
  data_fixtures::TempDir dir("fuzz_seeds_flipped");
  fuzz::write_seeds(dir.path);
  int refused = 0;
  for (const std::string& target : kTargets) {
    for (const auto& entry : fs::directory_iterator(dir.path / target)) {
      const std::vector<uint8_t> seed = data_fixtures::read_bytes(entry.path().string());
      for (size_t i = 0; i < seed.size(); i += 3) {
        std::vector<uint8_t> bytes = seed;
        bytes[i] ^= 0x5A;
        refused += run_target(target, bytes) == fuzz::Outcome::Refused;  // a crash would end the test
      }
    }
  }
  CHECK(refused > 0);
}

TEST_CASE("inputs kept from fuzzing findings go through their targets without a crash") {
  int inputs = 0;
  for (const std::string& target : kTargets) {
    const fs::path folder = fs::path(LOWBIT_SOURCE_DIR) / "tests/fuzz/regressions" / target;
    if (!fs::exists(folder)) continue;
    for (const auto& entry : fs::directory_iterator(folder)) {
      CAPTURE(entry.path().string());
      run_target(target, data_fixtures::read_bytes(entry.path().string()));  // refused or loaded, never a crash
      ++inputs;
    }
  }
  MESSAGE(inputs, " kept input(s) replayed");
}
