// The storage pool: freed big buffers wait, keyed by size, for the next request of that size.
#include "core/storage.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace lowbit {

namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kPoolEnabled = false;
#else
constexpr bool kPoolEnabled = true;
#endif
constexpr size_t kAlignment = 64;

struct Pool {
  std::mutex mutex;
  std::unordered_map<int64_t, std::vector<float*>> free_by_size;  // size in floats -> buffers
  StoragePoolStats stats;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: tensors may die during static destruction
  return *p;
}

int64_t bytes_of(int64_t n) { return n * static_cast<int64_t>(sizeof(float)); }
bool pooled_size(int64_t n) { return kPoolEnabled && bytes_of(n) >= Storage::kPooledMinBytes; }

float* allocate(int64_t n) {
  const size_t bytes = (static_cast<size_t>(bytes_of(n)) + kAlignment - 1) / kAlignment * kAlignment;
  void* p = std::aligned_alloc(kAlignment, bytes);
  if (!p) throw std::bad_alloc();
  return static_cast<float*>(p);
}

}  // namespace

Storage::Storage(int64_t n) : size_(n) {
  if (n == 0) return;
  if (pooled_size(n)) {
    Pool& p = pool();
    std::lock_guard lock(p.mutex);
    auto found = p.free_by_size.find(n);
    if (found != p.free_by_size.end() && !found->second.empty()) {
      data_ = found->second.back();
      found->second.pop_back();
      p.stats.pooled_bytes -= bytes_of(n);
      ++p.stats.hits;
      return;
    }
    ++p.stats.misses;
  }
  data_ = allocate(n);
}

Storage::~Storage() {
  if (!data_) return;
  if (pooled_size(size_)) {
    Pool& p = pool();
    std::lock_guard lock(p.mutex);
    if (p.stats.pooled_bytes + bytes_of(size_) <= kMaxPooledBytes) {
      p.free_by_size[size_].push_back(data_);
      p.stats.pooled_bytes += bytes_of(size_);
      return;
    }
  }
  std::free(data_);
}

StoragePoolStats storage_pool_stats() {
  Pool& p = pool();
  std::lock_guard lock(p.mutex);
  return p.stats;
}

}  // namespace lowbit
