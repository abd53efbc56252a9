#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "grove/error.hpp"

GROVE_BEGIN_NAMESPACE
namespace detail {

/// A fixed set of worker threads that run one parallel region at a time: run(fn) calls
/// fn(thread_index) once on every thread (the caller is thread 0) and returns when all have
/// finished. Regions share work through atomic tile counters, so which thread computes which
/// tile varies from run to run; the kernels make every result independent of that. Starting a
/// region allocates nothing. Workers sleep on a condition variable between regions (the
/// machines grove targets are often shared, so they do not spin).
class thread_pool {
 public:
  explicit thread_pool(int threads) {
    detail::require(threads >= 1, "grove: a thread pool needs at least one thread, got " + std::to_string(threads));
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  [[nodiscard]] int size() const { return static_cast<int>(workers_.size()) + 1; }

  /// Calls fn(i) for i = 0 .. size()-1, each on its own thread, and waits for all. fn must not
  /// throw (the kernels it runs do not allocate or fail).
  template <class Fn>
  void run(Fn& fn) {
    if (workers_.empty()) {
      fn(0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &fn;
      call_ = [](void* f, int i) { (*static_cast<Fn*>(f))(i); };
      pending_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void work(int index) {
    std::uint64_t seen = 0;
    for (;;) {
      void* task = nullptr;
      void (*call)(void*, int) = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        task = task_;
        call = call_;
      }
      call(task, index);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  void* task_ = nullptr;
  void (*call_)(void*, int) = nullptr;
  std::uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

}  // namespace detail
GROVE_END_NAMESPACE
