// Checkpoint writing and validated reading.
#include "nn/checkpoint.h"

#include <set>

#include "core/error.h"

namespace lowbit::nn {

const std::string& Checkpoint::meta(const std::string& key) const {
  auto it = file.metadata.find(key);
  if (it == file.metadata.end())
    fail("{}: metadata key '{}' is missing (not a lowbit checkpoint, or written by another tool)", path, key);
  return it->second;
}

std::string Checkpoint::meta_or(const std::string& key, const std::string& fallback) const {
  auto it = file.metadata.find(key);
  return it == file.metadata.end() ? fallback : it->second;
}

Tensor Checkpoint::tensor(const std::string& name) const {
  const StTensor& st = file.get(name, path);
  std::vector<float> values = st_values<float>(st, DType::F32, fmt::format("{}: tensor '{}'", path, name));
  return Tensor::from(st.shape, std::move(values));
}

void save_checkpoint(const std::string& path, const Module& model, std::map<std::string, std::string> metadata,
                     const NamedTensors& extra) {
  StFile file;
  file.metadata = std::move(metadata);
  file.metadata["format"] = kCheckpointFormat;
  file.metadata["format_version"] = std::to_string(kCheckpointVersion);
  auto add = [&](const NamedTensors& tensors) {
    for (const auto& [name, t] : tensors)
      file.tensors.emplace_back(name, make_st_tensor<float>(DType::F32, t.shape(), t.values()));
  };
  add(model.named_parameters());
  add(model.named_buffers());
  add(extra);
  save_safetensors(path, file);
}

namespace {

// The format tag and version of a container just read.
Checkpoint checked(Checkpoint checkpoint) {
  const std::string& path = checkpoint.path;
  const std::string format = checkpoint.meta_or("format", "");
  if (format != kCheckpointFormat)
    fail("{}: not a lowbit checkpoint (format '{}', expected '{}'; integer models are read with eval --int8)", path,
         format, kCheckpointFormat);
  const std::string version = checkpoint.meta("format_version");
  if (version != std::to_string(kCheckpointVersion))
    fail("{}: checkpoint format version {} is not supported (this lowbit reads version {}; upgrade lowbit)", path,
         version, kCheckpointVersion);
  return checkpoint;
}

}  // namespace

Checkpoint read_checkpoint(const std::string& path) { return checked({path, load_safetensors(path)}); }

Checkpoint parse_checkpoint(std::span<const std::byte> bytes, const std::string& path_for_errors) {
  return checked({path_for_errors, parse_safetensors(bytes, path_for_errors)});
}

void load_weights(Module& model, const Checkpoint& checkpoint) {
  std::set<std::string> wanted;
  for (const NamedTensors& group : {model.named_parameters(), model.named_buffers()})
    for (const auto& [name, t] : group) {
      wanted.insert(name);
      if (!checkpoint.has(name))
        fail("{}: tensor '{}' of model '{}' is missing (the checkpoint is of another model: it holds '{}')",
             checkpoint.path, name, model.describe(), checkpoint.meta_or("model", "?"));
      Tensor value = checkpoint.tensor(name);
      if (value.shape() != t.shape())
        fail("{}: tensor '{}' has shape {}, the model expects {} (the checkpoint is of another model)", checkpoint.path,
             name, shape_str(value.shape()), shape_str(t.shape()));
      Tensor target = t;
      target.copy_from(value);
    }
  for (const auto& [name, st] : checkpoint.file.tensors)
    if (!wanted.contains(name) && !name.starts_with("optim."))
      fail("{}: tensor '{}' does not belong to model '{}' (the checkpoint is of another model)", checkpoint.path, name,
           model.describe());
}

}  // namespace lowbit::nn
