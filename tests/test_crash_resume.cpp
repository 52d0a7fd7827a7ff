// Crash-safe training: a real `train` process killed (SIGKILL) at random moments, also while it writes a
// checkpoint, leaves nothing, the previous checkpoint or the new one; --resume then ends bit for bit
// where an uninterrupted run ends.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "core/rng.h"
#include "core/safetensors.h"
#include "data_fixtures.h"
#include "nn/checkpoint.h"
#include "nn/graph.h"

extern char** environ;

using namespace lowbit;
using data_fixtures::TempDir;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int64_t kEpochs = 6;
constexpr int kRandomKills = 4;       // at a random moment of the run
constexpr int kKillsDuringWrite = 3;  // as soon as the checkpoint's temporary file appears
constexpr auto kPollInterval = std::chrono::microseconds(100);
constexpr auto kRunTimeout = std::chrono::seconds(60);

// The `train` command line, pinned to one thread; --resume when a checkpoint exists.
std::vector<std::string> train_args(const std::string& data, const std::string& out, bool resume) {
  std::vector<std::string> args = {std::string(LOWBIT_BIN_DIR) + "/train",
                                   "--model",
                                   "mlp",
                                   "--epochs",
                                   std::to_string(kEpochs),
                                   "--threads",
                                   "1",
                                   "--seed",
                                   "5",
                                   "--batch-size",
                                   "32",
                                   "--data",
                                   data,
                                   "--out",
                                   out};
  if (resume) args.insert(args.end(), {"--resume", out});
  return args;
}

// A child process running `args`, its output thrown away.
struct Child {
  pid_t pid = -1;
  int status = 0;

  explicit Child(const std::vector<std::string>& args) {
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    REQUIRE(posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ) == 0);
    posix_spawn_file_actions_destroy(&actions);
  }
  bool finished() {  // true once it has exited (status is then set)
    return waitpid(pid, &status, WNOHANG) == pid;
  }
  void wait() { REQUIRE(waitpid(pid, &status, 0) == pid); }
  void kill_now() {
    ::kill(pid, SIGKILL);
    wait();
  }
};

// The temporary file a save by process `pid` writes before renaming it over `path` (core/safetensors.h).
bool writing_checkpoint(const std::string& path, pid_t pid) { return fs::exists(path + ".tmp-" + std::to_string(pid)); }

std::vector<std::byte> file_bytes(const std::string& path) {
  const auto bytes = data_fixtures::read_bytes(path);
  std::vector<std::byte> out(bytes.size());
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

// The epoch of a complete, valid mlp checkpoint (it must load into a fresh mlp); fails the test otherwise.
int64_t checked_epoch(const std::string& path) {
  const nn::Checkpoint checkpoint = nn::read_checkpoint(path);
  const auto model = nn::build_model("mlp");
  nn::load_weights(*model, checkpoint);
  return std::stoll(checkpoint.meta("epoch"));
}

void check_same_tensors(const StFile& a, const StFile& b) {
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    CAPTURE(a.tensors[i].first);
    CHECK(a.tensors[i].first == b.tensors[i].first);
    CHECK(a.tensors[i].second.shape == b.tensors[i].second.shape);
    CHECK(a.tensors[i].second.bytes == b.tensors[i].second.bytes);  // weights and optimizer state
  }
  CHECK(a.metadata.at("steps") == b.metadata.at("steps"));
  CHECK(a.metadata.at("rng_state") == b.metadata.at("rng_state"));
}

}  // namespace

TEST_CASE("train killed at random moments and during checkpoint writes resumes to the uninterrupted weights") {
  const auto test_start = Clock::now();
  TempDir dir("crash_resume");
  const std::string data = dir / "data";
  fs::create_directories(data);
  data_fixtures::write_mnist_folder(data,
                                    {.train_count = 960, .test_count = 64, .rows = 28, .cols = 28, .gzip = false});

  // The uninterrupted run, timed: the random kills fall inside this duration.
  const std::string reference = dir / "reference.safetensors";
  const auto t0 = Clock::now();
  Child straight(train_args(data, reference, false));
  straight.wait();
  REQUIRE(WIFEXITED(straight.status));
  REQUIRE(WEXITSTATUS(straight.status) == 0);
  const auto run_time = Clock::now() - t0;
  REQUIRE(checked_epoch(reference) == kEpochs);

  // The interrupted run: kill, inspect the checkpoint path, resume, kill again ...
  const std::string out = dir / "run.safetensors";
  std::vector<std::byte> previous;  // the last complete checkpoint seen at `out`
  int64_t previous_epoch = 0;
  int kills = 0, killed_during_write = 0;
  Rng rng(2024);
  for (int attempt = 0; attempt < kRandomKills + kKillsDuringWrite; ++attempt) {
    const bool during_write = attempt % 2 == 1 && killed_during_write < kKillsDuringWrite;
    Child child(train_args(data, out, fs::exists(out)));
    const auto delay = std::chrono::duration_cast<Clock::duration>(run_time * (0.6 * rng.uniform()));
    const auto start = Clock::now();
    bool exited = false, write_in_progress = false;
    while (!(exited = child.finished())) {
      const auto now = Clock::now();
      if (during_write ? writing_checkpoint(out, child.pid) && now - start >= delay / 2 : now - start >= delay) {
        write_in_progress = writing_checkpoint(out, child.pid);
        child.kill_now();
        break;
      }
      REQUIRE(now - start < kRunTimeout);
      std::this_thread::sleep_for(kPollInterval);
    }
    if (exited) {  // it finished before the kill: it must have succeeded
      REQUIRE(WIFEXITED(child.status));
      REQUIRE(WEXITSTATUS(child.status) == 0);
    }
    kills += !exited;
    killed_during_write += write_in_progress;
    CAPTURE(attempt);
    CAPTURE(write_in_progress);
    // Nothing, the previous complete checkpoint, or a newer complete one: never a torn file.
    if (!fs::exists(out)) {
      CHECK(previous.empty());
      continue;
    }
    const std::vector<std::byte> now = file_bytes(out);
    if (now != previous) {
      const int64_t epoch = checked_epoch(out);
      CHECK((epoch > previous_epoch || epoch == kEpochs));  // a run resumed at the end saves once more
      previous_epoch = epoch;
      previous = now;
    }
  }
  MESSAGE(kills, " kills, ", killed_during_write, " of them while a checkpoint was being written; epoch ",
          previous_epoch, " reached before the final resume");
  CHECK(kills >= 3);
  CHECK(killed_during_write >= 1);

  // Resume to the end, uninterrupted.
  Child last(train_args(data, out, fs::exists(out)));
  last.wait();
  REQUIRE(WIFEXITED(last.status));
  REQUIRE(WEXITSTATUS(last.status) == 0);
  REQUIRE(checked_epoch(out) == kEpochs);
  check_same_tensors(load_safetensors(reference), load_safetensors(out));

  const double seconds = std::chrono::duration<double>(Clock::now() - test_start).count();
  MESSAGE("crash/resume test took ", seconds, " s");
  CHECK(seconds < 60.0);
}
