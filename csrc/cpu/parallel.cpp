#include "longattn/parallel.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace longattn {
namespace {

int default_threads() {
  if (const char* env = std::getenv("LONGATTN_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// A job is a chunk counter that the workers and the caller drain together, so uneven
// chunks balance themselves. After a job a worker polls for the next one for kSpinMicros
// (yielding the CPU to any other runnable thread) before it sleeps on a condition
// variable: waking a sleeping thread took ~70 us on a 2-core VM, as long as a whole
// decoding step, so back-to-back calls (a decoding loop) would otherwise run on the
// calling thread alone. OpenMP runtimes spin the same way (libgomp: GOMP_SPINCOUNT). 300 us
// covers the ~80 us of Python between two torch-facing calls; at 100 us a decoding loop's
// workers were asleep again by the next call (B = 1, H = 8, S = 1024: 0.34 -> 0.22 ms).
class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop(); }

  int size() const { return size_.load(std::memory_order_relaxed); }

  // Waits for a job that another thread is running (set_num_threads during a call).
  void resize(int n) {
    std::lock_guard<std::mutex> serial(run_mu_);
    stop();
    size_.store(std::max(1, n));
    quit_ = false;
    quit_flag_.store(false);
    for (int i = 1; i < size(); ++i) workers_.emplace_back([this] { loop(); });
  }

  void run(int64_t chunks, const std::function<void(int64_t)>& chunk_fn) {
    std::lock_guard<std::mutex> serial(run_mu_);  // one job at a time
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &chunk_fn;
      total_ = chunks;
      next_.store(0);
      done_.store(0);
      generation_.store(generation_.load() + 1);
    }
    cv_.notify_all();
    drain(&chunk_fn);
    std::unique_lock<std::mutex> lk(mu_);
    // Wait for every chunk and for every worker to have left this job, so that no worker
    // can touch chunk_fn after it goes out of scope.
    done_cv_.wait(lk, [&] { return done_.load() == total_ && active_ == 0; });
    job_ = nullptr;
  }

 private:
  void drain(const std::function<void(int64_t)>* job) {
    int64_t i;
    while ((i = next_.fetch_add(1)) < total_) {
      (*job)(i);
      if (done_.fetch_add(1) + 1 == total_) {
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_all();
      }
    }
  }

  static constexpr int kSpinMicros = 300;

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t)>* job;
      // Poll (without the lock) for a job newer than the last one seen, then sleep.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      while (generation_.load(std::memory_order_acquire) == seen && !quit_flag_.load(std::memory_order_relaxed) &&
             std::chrono::steady_clock::now() < until)
        sched_yield();
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_ || (generation_ != seen && job_ != nullptr); });
        if (quit_) return;
        seen = generation_;
        job = job_;
        ++active_;
      }
      drain(job);
      {
        std::lock_guard<std::mutex> lk(mu_);
        --active_;
      }
      done_cv_.notify_all();
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
      quit_flag_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::atomic<int> size_{1};  // read by parallel_for without a lock
  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t total_ = 0;
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<uint64_t> generation_{0};  // written under mu_, polled without it
  std::atomic<bool> quit_flag_{false};
  int active_ = 0;
  bool quit_ = false;
};

Pool& pool() {
  static Pool p(default_threads());
  return p;
}

}  // namespace

int num_threads() { return pool().size(); }

void set_num_threads(int n) { pool().resize(n); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = pool().size();
  if (threads == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  // A few chunks per thread so that a slow thread does not hold everyone up.
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t(threads) * 4);
  int64_t step = (n + chunks - 1) / chunks;
  chunks = (n + step - 1) / step;
  pool().run(chunks, [&](int64_t c) { fn(c * step, std::min(n, (c + 1) * step)); });
}

}  // namespace longattn
