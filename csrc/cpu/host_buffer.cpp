#include "longattn/host_buffer.h"

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>

namespace longattn {
namespace {

constexpr size_t kAlign = 64;

size_t default_limit() {
  if (const char* env = std::getenv("LONGATTN_CPU_CACHE_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    if (end != env && mb >= 0) return size_t(mb) << 20;
  }
  return size_t(256) << 20;
}

struct Cached {
  void* p;
  size_t cap;
};

// Released buffers, oldest first; eviction takes the oldest.
struct Cache {
  std::mutex mu;
  std::deque<Cached> free;
  size_t bytes = 0;
  size_t limit = default_limit();

  void evict_to(size_t target) {  // mu held
    while (bytes > target && !free.empty()) {
      bytes -= free.front().cap;
      std::free(free.front().p);
      free.pop_front();
    }
  }
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: buffers may be released during exit
  return *c;
}

}  // namespace

HostBuffer::HostBuffer(size_t bytes) {
  const size_t want = (bytes + kAlign - 1) / kAlign * kAlign;
  if (want == 0) return;
  if (want >= kMinCachedBytes) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    size_t best = c.free.size();
    for (size_t i = 0; i < c.free.size(); ++i) {  // the smallest that fits, within 2x
      const size_t cap = c.free[i].cap;
      if (cap >= want && cap / 2 <= want && (best == c.free.size() || cap < c.free[best].cap)) best = i;
    }
    if (best < c.free.size()) {
      p_ = c.free[best].p;
      cap_ = c.free[best].cap;
      c.bytes -= cap_;
      c.free.erase(c.free.begin() + std::ptrdiff_t(best));
      return;
    }
  }
  p_ = std::aligned_alloc(kAlign, want);
  if (!p_) throw std::bad_alloc();
  cap_ = want;
}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    p_ = o.p_, cap_ = o.cap_;
    o.p_ = nullptr, o.cap_ = 0;
  }
  return *this;
}

void HostBuffer::reset() {
  if (!p_) return;
  void* p = p_;
  const size_t cap = cap_;
  p_ = nullptr, cap_ = 0;
  if (cap >= kMinCachedBytes) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (cap <= c.limit) {
      c.free.push_back({p, cap});
      c.bytes += cap;
      c.evict_to(c.limit);
      return;
    }
  }
  std::free(p);
}

size_t host_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.bytes;
}

size_t host_cache_limit() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.limit;
}

void set_host_cache_limit(size_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.limit = bytes;
  c.evict_to(bytes);
}

void host_cache_release() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.evict_to(0);
}

}  // namespace longattn
