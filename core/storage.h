// Storage: the float buffer behind tensors, recycled through a process-wide pool keyed by size.
#pragma once

#include <cstdint>

namespace lowbit {

// n floats, 64-byte aligned, values uninitialised (the caller overwrites or fills them).
//
// Why a pool: a training step asks for the same buffer sizes as the step before. Fresh big
// buffers come from mmap, so every step would page-fault them in and the kernel would zero them;
// instead a freed buffer of at least kPooledMinBytes goes into a pool keyed by its exact size and
// the next request of that size takes it back. The pool holds at most kMaxPooledBytes; beyond that
// freed buffers go back to the system. Under AddressSanitizer nothing is pooled, so use-after-free
// is still caught.
class Storage {
 public:
  static constexpr int64_t kPooledMinBytes = 16 * 1024;
  static constexpr int64_t kMaxPooledBytes = int64_t{256} << 20;

  explicit Storage(int64_t n);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  float* data() { return data_; }
  const float* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
};

// What the pool holds now, and how many pooled-size requests it served or missed so far.
struct StoragePoolStats {
  int64_t pooled_bytes = 0, hits = 0, misses = 0;
};
StoragePoolStats storage_pool_stats();

}  // namespace lowbit
