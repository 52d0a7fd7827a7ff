// The layer-kind registry and the typed reading of a node's attributes.
#include "nn/kinds.h"

#include <cmath>
#include <map>
#include <mutex>

#include "core/error.h"

namespace lowbit::nn {

// ---- Attributes

Attributes::Attributes(const nlohmann::json& node, std::string where) : node_(node), where_(std::move(where)) {
  read_ = {"name", "kind", "inputs"};
}

const nlohmann::json& Attributes::value(const std::string& key) const { return node_.at(key); }

int64_t Attributes::integer(const std::string& key) {
  if (!node_.contains(key)) fail("{}: attribute '{}' is missing", where_, key);
  return integer_or(key, 0);
}

int64_t Attributes::integer_or(const std::string& key, int64_t fallback) {
  read_.insert(key);
  if (!node_.contains(key)) return fallback;
  const nlohmann::json& v = value(key);
  if (!v.is_number_integer() || v.get<int64_t>() < 0)
    fail("{}: attribute '{}' must be a non-negative integer, not {}", where_, key, v.dump());
  return v.get<int64_t>();
}

double Attributes::number_or(const std::string& key, double fallback) {
  read_.insert(key);
  if (!node_.contains(key)) return fallback;
  const nlohmann::json& v = value(key);
  if (!v.is_number() || !std::isfinite(v.get<double>()))
    fail("{}: attribute '{}' must be a number, not {}", where_, key, v.dump());
  return v.get<double>();
}

bool Attributes::boolean_or(const std::string& key, bool fallback) {
  read_.insert(key);
  if (!node_.contains(key)) return fallback;
  const nlohmann::json& v = value(key);
  if (!v.is_boolean()) fail("{}: attribute '{}' must be true or false, not {}", where_, key, v.dump());
  return v.get<bool>();
}

int64_t Attributes::inferred(const std::string& key, int64_t inferred) {
  read_.insert(key);
  if (!node_.contains(key) || value(key) == "auto") return inferred;
  const int64_t given = integer_or(key, 0);
  if (given != inferred)
    fail("{}: attribute '{}' is {}, but the input gives {} (write \"auto\" to infer it)", where_, key, given, inferred);
  return given;
}

int64_t Attributes::features(const std::string& key, int64_t classes) {
  read_.insert(key);
  if (node_.contains(key) && value(key) == "classes") return classes;
  const int64_t n = integer(key);
  if (n < 1) fail("{}: attribute '{}' must be at least 1 (or \"classes\")", where_, key);
  return n;
}

void Attributes::finish(const std::string& known) const {
  for (const auto& [key, v] : node_.items())
    if (!read_.contains(key))
      fail("{}: unknown attribute '{}' (this kind takes: {}{})", where_, key, known.empty() ? "none" : known,
           known.empty() ? "" : "; plus name, kind, inputs");
}

// ---- the registry

namespace {
struct Registry {
  std::mutex mutex;
  std::map<std::string, LayerKind> kinds;
};

// Made on first use, with the built-in kinds; never destroyed (a kind may be looked up at exit).
Registry& registry() {
  static Registry* r = [] {
    auto* made = new Registry;
    for (LayerKind& kind : builtin_layer_kinds()) made->kinds.emplace(kind.name, std::move(kind));
    return made;
  }();
  return *r;
}
}  // namespace

void register_layer_kind(LayerKind kind) {
  if (kind.name.empty() || !kind.build) fail("register_layer_kind: a kind needs a name and a build function");
  if (kind.min_inputs < 1 || (kind.max_inputs != -1 && kind.max_inputs < kind.min_inputs))
    fail("register_layer_kind '{}': bad input counts {}..{}", kind.name, kind.min_inputs, kind.max_inputs);
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  if (r.kinds.contains(kind.name)) fail("register_layer_kind: a kind named '{}' exists already", kind.name);
  std::string name = kind.name;
  r.kinds.emplace(std::move(name), std::move(kind));
}

const LayerKind& find_layer_kind(const std::string& name, const std::string& where) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  auto it = r.kinds.find(name);
  if (it == r.kinds.end()) {
    std::string known;
    for (const auto& [k, v] : r.kinds) known += (known.empty() ? "" : ", ") + k;
    fail("{}: unknown kind '{}' (known kinds: {})", where, name, known);
  }
  return it->second;
}

std::vector<std::string> layer_kind_names() {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  std::vector<std::string> out;
  for (const auto& [k, v] : r.kinds) out.push_back(k);
  return out;
}

}  // namespace lowbit::nn
