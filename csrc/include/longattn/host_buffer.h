// Scratch buffers for the CPU kernels, reused across calls.
//
// A large fresh allocation costs its first-touch page faults: measured on a 2-core VM, 0.43
// ms per MiB, ten times a warm copy of the same bytes, so a short call that packs a long K/V
// (a decoding step, a sparse mask at 10% density) spent more time faulting in its packing
// buffer than computing. Buffers of at least kMinCachedBytes are therefore kept when
// released, up to a limit of cached bytes (LONGATTN_CPU_CACHE_MB, default 256; 0 disables),
// and handed to the next request they fit (at most twice its size). Thread safe;
// longattn.empty_cache() frees what is cached.
#pragma once

#include <cstddef>
#include <cstdint>

namespace longattn {

class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t bytes);  // uninitialized, 64-byte aligned; throws std::bad_alloc
  ~HostBuffer() { reset(); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  HostBuffer(HostBuffer&& o) noexcept : p_(o.p_), cap_(o.cap_) { o.p_ = nullptr, o.cap_ = 0; }
  HostBuffer& operator=(HostBuffer&& o) noexcept;

  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  size_t capacity() const { return cap_; }
  void reset();  // back to the cache (or freed)

 private:
  void* p_ = nullptr;
  size_t cap_ = 0;
};

constexpr size_t kMinCachedBytes = size_t(1) << 20;

size_t host_cache_bytes();       // bytes held by released buffers
size_t host_cache_limit();
void set_host_cache_limit(size_t bytes);  // evicts down to the new limit
void host_cache_release();       // frees every cached buffer

}  // namespace longattn
