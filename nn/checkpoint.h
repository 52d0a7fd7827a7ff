// Float and QAT checkpoints: a Module's parameters and buffers in the safetensors layout.
#pragma once

#include <cstddef>
#include <map>
#include <span>
#include <string>

#include "core/safetensors.h"
#include "nn/module.h"

namespace lowbit::nn {

inline constexpr const char* kCheckpointFormat = "lowbit-checkpoint";
inline constexpr int kCheckpointVersion = 1;

// A checkpoint as read from disk: where it came from, its metadata and tensors.
struct Checkpoint {
  std::string path;
  StFile file;
  // The metadata value for `key`; throws naming the file when it is missing.
  const std::string& meta(const std::string& key) const;
  std::string meta_or(const std::string& key, const std::string& fallback) const;
  bool has_meta(const std::string& key) const { return file.metadata.contains(key); }
  // A float tensor by name (throws when missing or not F32).
  Tensor tensor(const std::string& name) const;
  bool has(const std::string& name) const { return file.find(name) != nullptr; }
};

// Writes every parameter and buffer of `model` (PyTorch-style names) plus `extra` tensors
// (for example optimizer state, named "optim.*"), with `metadata` and the format tag/version.
// Atomic: a crash leaves either the old file or the new one.
void save_checkpoint(const std::string& path, const Module& model, std::map<std::string, std::string> metadata,
                     const NamedTensors& extra = {});

// Reads and validates the container and the format tag/version.
Checkpoint read_checkpoint(const std::string& path);

// The same from the file's bytes in memory (fuzzers call this); path_for_errors names it in messages.
Checkpoint parse_checkpoint(std::span<const std::byte> bytes, const std::string& path_for_errors);

// Copies the checkpoint's tensors into `model`: every parameter and buffer must be there with the
// same shape, and every non-"optim." tensor of the file must belong to the model.
void load_weights(Module& model, const Checkpoint& checkpoint);

}  // namespace lowbit::nn
