#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DEPRUNE_PAUSE() _mm_pause()
#else
#define DEPRUNE_PAUSE() std::this_thread::yield()
#endif

namespace deprune {
namespace cpu {
namespace {

class Pool {
 public:
  void run(int num_tasks, int num_threads, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(call_mutex_, std::try_to_lock);
    if (!busy.owns_lock() || num_threads <= 1 || num_tasks <= 1) {
      for (int t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    int helpers = std::min(std::min(num_threads, num_tasks), 1024) - 1;
    ensure_workers(helpers);
    fn_ = &fn;
    num_tasks_ = num_tasks;
    next_task_.store(0, std::memory_order_relaxed);
    pending_.store(helpers, std::memory_order_relaxed);
    {
      // The job word carries the helper count with the generation, so a worker never reads a later call's count.
      std::lock_guard<std::mutex> lock(wake_mutex_);
      uint64_t gen = (job_.load(std::memory_order_relaxed) >> 16) + 1;
      job_.store((gen << 16) | static_cast<uint64_t>(helpers), std::memory_order_release);
    }
    wake_cv_.notify_all();
    drain();
    while (pending_.load(std::memory_order_acquire) != 0) DEPRUNE_PAUSE();
    fn_ = nullptr;
  }

 private:
  void drain() {
    for (int t = next_task_.fetch_add(1, std::memory_order_relaxed); t < num_tasks_;
         t = next_task_.fetch_add(1, std::memory_order_relaxed))
      (*fn_)(t);
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      int id = static_cast<int>(workers_.size());
      // The worker must see the job word as it was before this call publishes, or it would miss this call.
      const uint64_t start = job_.load(std::memory_order_acquire);
      workers_.emplace_back([this, id, start] { worker_loop(id, start); });
      workers_.back().detach();  // the pool lives until process exit; never joined
    }
  }

  void worker_loop(int id, uint64_t seen) {
    for (;;) {
      // Spin ~50 us before sleeping: consecutive layers of one model reuse a hot worker.
      auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (job_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < spin_until)
        for (int i = 0; i < 64; ++i) DEPRUNE_PAUSE();
      if (job_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(wake_mutex_);
        wake_cv_.wait(lock, [&] { return job_.load(std::memory_order_acquire) != seen; });
      }
      seen = job_.load(std::memory_order_acquire);
      if (id < static_cast<int>(seen & 0xffff)) {
        drain();
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex call_mutex_;
  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;
  std::atomic<uint64_t> job_{0};  // (generation << 16) | number of helpers taking part
  std::atomic<int> next_task_{0};
  std::atomic<int> pending_{0};
  int num_tasks_ = 0;
  const std::function<void(int)>* fn_ = nullptr;
  std::vector<std::thread> workers_;
};

}  // namespace

void parallel_for(int num_tasks, int num_threads, const std::function<void(int)>& fn) {
  static Pool* pool = new Pool();  // leaked on purpose: detached workers may outlive static destructors
  pool->run(num_tasks, num_threads, fn);
}

}  // namespace cpu
}  // namespace deprune
