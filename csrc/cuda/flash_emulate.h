// Host emulation of the warp-level primitives used by the flash attention kernels (and the
// linear attention and RoPE kernels), so the kernels themselves (their fragment indexing, masking, pipelines) can be executed and
// checked on a machine without a GPU (tests/cuda_emulation). Each CUDA thread of a CTA is
// a std::thread; CTAs run one after another. The emulated semantics follow the PTX ISA
// text quoted in flash_common.cuh:
//   * mma.m16n8k16: A, B, C fragments placed per 9.7.14.5.8, D = A B + C in float.
//   * ldmatrix .x4 (.trans): matrix m's row r address comes from lane 8m + r; without
//     .trans lane l gets (row l/4, cols 2(l%4), +1), with .trans (rows 2(l%4), +1, col l/4).
//   * cp.async (16 and 4 bytes): the copy lands when cp.async.wait_group retires its group
//     (the latest moment the PTX ISA allows), so a read before the wait sees stale data;
//     with FLASH_EMU_EAGER=1 it lands at issue time (the earliest), so overwriting a tile
//     that other warps still read shows up too.
//   * shared memory: every CTA starts with all bytes 0xff (a NaN in float16 / bfloat16 /
//     float32), as a GPU leaves it holding garbage, so a value read before it is written
//     shows up in the results (compute-sanitizer's initcheck finds the same class).
// Built with -fsanitize=thread (tests/cuda_emulation/run.sh with EMU_SAN=thread) every
// access to shared memory, and to global memory within a CTA, that two threads make
// without a barrier or warp primitive ordering them is reported (racecheck's class of
// hazard: a missing __syncthreads, a tile overwritten while other warps read it). Built
// with -fsanitize=address (EMU_SAN=address), shared memory past the launch's dynamic size
// is poisoned and every out-of-bounds read or write of it or of the test's global buffers is
// reported (memcheck's class).
// Only included with LONGATTN_FLASH_EMULATE; never part of the library build.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define LONGATTN_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define LONGATTN_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define LONGATTN_EMU_POISON(p, n) ((void)(p), (void)(n))
#define LONGATTN_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace longattn {
namespace cuda {
namespace flash {
// The dynamic shared memory of the CTA that runs (kernels declare it extern __shared__).
alignas(16) inline unsigned char smem_raw[232 * 1024];

namespace emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 tid, bid, bdim, gdim;  // threadIdx, blockIdx, blockDim, gridDim

struct Cta {
  int threads;
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<std::array<uint64_t, 8>> xch;  // per-lane exchange slots
  explicit Cta(int n) : threads(n), all(new std::barrier<>(n)), xch(n) {
    for (int w = 0; w < n / 32; ++w) warp.emplace_back(new std::barrier<>(32));
  }
};
inline Cta* g_cta = nullptr;

inline int lane() { return int(tid.x % 32); }
inline void warp_sync() { g_cta->warp[tid.x / 32]->arrive_and_wait(); }
inline std::array<uint64_t, 8>& slot(int l) { return g_cta->xch[(tid.x / 32) * 32 + l]; }

struct Copy {
  void* dst;
  const void* src;
  int bytes, size;  // bytes read of the size written (cp.async zero fills the rest)
};
inline thread_local std::deque<std::vector<Copy>> groups;  // committed, oldest first
inline thread_local std::vector<Copy> pending;              // not yet committed

inline void land(const Copy& c) {
  std::memset(c.dst, 0, size_t(c.size));
  if (c.bytes) std::memcpy(c.dst, c.src, size_t(c.bytes));
}
// A cp.async lands when its group is waited for or, with FLASH_EMU_EAGER=1, at issue time
// (the earliest moment): the latter exposes overwrites of live tiles.
inline void issue(const Copy& c) {
  static const bool eager = std::getenv("FLASH_EMU_EAGER") != nullptr;
  if (eager)
    land(c);
  else
    pending.push_back(c);
}

// Whether a test case runs: filter is empty or holds substrings of case names separated by
// '|', one of which the name contains.
inline bool selected(const std::string& name, const std::string& filter) {
  if (filter.empty()) return true;
  for (size_t at = 0; at <= filter.size();) {
    const size_t bar = std::min(filter.find('|', at), filter.size());
    if (bar > at && name.find(filter.substr(at, bar - at)) != std::string::npos) return true;
    at = bar + 1;
  }
  return false;
}

// Runs kernel(lambda) for every CTA of grid with `threads` threads and smem_bytes of dynamic
// shared memory (-1: all of smem_raw); each CTA starts with shared memory filled with 0xff.
inline void launch(Dim3 grid, int threads, const std::function<void()>& body, long smem_bytes = -1) {
  const size_t cap = sizeof(smem_raw);
  const size_t used = smem_bytes < 0 ? cap : size_t(smem_bytes);
  if (used > cap) {
    std::fprintf(stderr, "emulate: %zu bytes of dynamic shared memory requested, %zu emulated\n", used, cap);
    std::abort();
  }
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        LONGATTN_EMU_UNPOISON(smem_raw, cap);
        std::memset(smem_raw, 0xff, cap);
        // ASan poisons in 8-byte granules: round the usable size up (a kernel's smem size is a
        // multiple of 16 anyway).
        const size_t keep = (used + 7) / 8 * 8;
        if (keep < cap) LONGATTN_EMU_POISON(smem_raw + keep, cap - keep);
        Cta cta(threads);
        g_cta = &cta;
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            tid = Dim3{unsigned(t), 0, 0};
            bid = Dim3{x, y, z};
            bdim = Dim3{unsigned(threads), 1, 1};
            gdim = grid;
            groups.clear();
            pending.clear();
            body();
          });
        for (auto& t : ts) t.join();
        g_cta = nullptr;
        LONGATTN_EMU_UNPOISON(smem_raw, cap);
      }
}

}  // namespace emu


inline int min(int a, int b) { return a < b ? a : b; }

inline void __syncthreads() { emu::g_cta->all->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int m) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  emu::slot(emu::lane())[0] = bits;
  emu::warp_sync();
  const uint32_t o = uint32_t(emu::slot(emu::lane() ^ m)[0]);
  emu::warp_sync();
  float r;
  std::memcpy(&r, &o, 4);
  return r;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  // cp.async.cg with cp-size 16 needs 16-byte aligned shared and global addresses.
  if ((reinterpret_cast<uintptr_t>(dst) | (src_bytes ? reinterpret_cast<uintptr_t>(src) : 0)) & 15u) {
    std::fprintf(stderr, "emulate: misaligned cp.async %p <- %p\n", dst, src);
    std::abort();
  }
  emu::issue({dst, src, src_bytes, 16});
}
inline void cp_async4(void* dst, const void* src) {
  // cp-size 4 (.ca): 4-byte aligned shared and global addresses.
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 3u) {
    std::fprintf(stderr, "emulate: misaligned cp.async %p <- %p\n", dst, src);
    std::abort();
  }
  emu::issue({dst, src, 4, 4});
}
inline void cp_async_commit() {
  emu::groups.push_back(std::move(emu::pending));
  emu::pending.clear();
}
template <int N>
inline void cp_async_wait() {
  while (int(emu::groups.size()) > N) {
    for (const auto& c : emu::groups.front()) emu::land(c);
    emu::groups.pop_front();
  }
}

namespace emu {
inline uint16_t ld16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
template <bool Trans>
inline void ldmatrix(uint32_t (&r)[4], const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15u) {  // ldmatrix rows are 16-byte aligned
    std::fprintf(stderr, "emulate: misaligned ldmatrix row %p\n", p);
    std::abort();
  }
  slot(lane())[0] = reinterpret_cast<uint64_t>(p);
  warp_sync();
  const int l = lane(), g = l / 4, t = l % 4;
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!Trans) {
      const auto* row = reinterpret_cast<const uint16_t*>(slot(8 * m + g)[0]);
      lo = ld16(row + 2 * t);
      hi = ld16(row + 2 * t + 1);
    } else {
      lo = ld16(reinterpret_cast<const uint16_t*>(slot(8 * m + 2 * t)[0]) + g);
      hi = ld16(reinterpret_cast<const uint16_t*>(slot(8 * m + 2 * t + 1)[0]) + g);
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_sync();
}
}  // namespace emu

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix<false>(r, p); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix<true>(r, p); }

template <typename T>
inline float emu_half(uint32_t reg, int which) {
  const uint16_t bits = uint16_t(which ? reg >> 16 : reg & 0xffffu);
  T x;
  std::memcpy(&x, &bits, 2);
  return float(x);
}

template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& my = emu::slot(emu::lane());
  for (int i = 0; i < 4; ++i) my[i] = a[i];
  my[4] = b0;
  my[5] = b1;
  emu::warp_sync();
  auto A = [&](int r, int c) {  // A[r][c]
    return emu_half<T>(uint32_t(emu::slot((r % 8) * 4 + (c % 8) / 2)[(r >= 8 ? 1 : 0) + (c >= 8 ? 2 : 0)]), c % 2);
  };
  auto B = [&](int k, int n) {  // B[k][n]
    return emu_half<T>(uint32_t(emu::slot(n * 4 + (k % 8) / 2)[4 + (k >= 8 ? 1 : 0)]), k % 2);
  };
  const int g = emu::lane() / 4, t = emu::lane() % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e >= 2 ? 8 : 0), c = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, c);
    out[e] = acc;
  }
  emu::warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

}  // namespace flash
}  // namespace cuda
}  // namespace longattn

#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define threadIdx (::longattn::cuda::flash::emu::tid)
#define blockIdx (::longattn::cuda::flash::emu::bid)
#define blockDim (::longattn::cuda::flash::emu::bdim)
#define gridDim (::longattn::cuda::flash::emu::gdim)
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
