// A mutex for coroutines: lock() suspends the caller instead of blocking its thread, and
// works across io_contexts (a layer is shared by connections on every worker thread).
// Waiters are served in FIFO order; each resumes on its own executor. Formats use it for
// metadata updates (allocating a VHD/VDI block: data, bitmap, table entry) and release it
// around I/O that does not need it, as qemu's vpc/vdi drivers do with their CoMutex.
#pragma once

#include <deque>
#include <memory>
#include <mutex>
#include <utility>

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace imagenbd::backends {

class AsyncMutex {
 public:
  // Unlocks on destruction (or earlier, with unlock()).
  class Guard {
   public:
    explicit Guard(AsyncMutex* m) : m_(m) {}
    Guard(Guard&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
    Guard& operator=(Guard&&) = delete;
    ~Guard() { unlock(); }
    void unlock() {
      if (m_) std::exchange(m_, nullptr)->unlock();
    }

   private:
    AsyncMutex* m_;
  };

  AsyncMutex() = default;
  AsyncMutex(const AsyncMutex&) = delete;
  AsyncMutex& operator=(const AsyncMutex&) = delete;

  // Suspends until the mutex is ours. The caller must call unlock() exactly once.
  boost::asio::awaitable<void> lock() {
    return boost::asio::async_initiate<const boost::asio::use_awaitable_t<>&, void()>(
        [this](auto handler) {
          std::unique_lock lock(mutex_);
          if (!locked_) {
            locked_ = true;
            lock.unlock();
            resume(std::move(handler));
            return;
          }
          waiters_.push_back(std::make_unique<Waiter<decltype(handler)>>(std::move(handler)));
        },
        boost::asio::use_awaitable);
  }

  // co_await m.scoped() -> a Guard that unlocks at the end of the scope.
  boost::asio::awaitable<Guard> scoped() {
    co_await lock();
    co_return Guard(this);
  }

  // Hands the mutex to the next waiter, or frees it.
  void unlock() {
    std::unique_lock lock(mutex_);
    if (waiters_.empty()) {
      locked_ = false;
      return;
    }
    auto next = std::move(waiters_.front());
    waiters_.pop_front();
    lock.unlock();
    next->resume();  // the mutex stays locked: ownership passes to the waiter
  }

 private:
  struct WaiterBase {
    virtual ~WaiterBase() = default;
    virtual void resume() = 0;
  };
  template <typename Handler>
  struct Waiter final : WaiterBase {
    explicit Waiter(Handler h) : handler(std::move(h)) {}
    void resume() override { AsyncMutex::resume(std::move(handler)); }
    Handler handler;
  };

  // Resume through post, never inline: unlock() may run deep inside another coroutine.
  template <typename Handler>
  static void resume(Handler handler) {
    auto ex = boost::asio::get_associated_executor(handler);
    boost::asio::post(ex, std::move(handler));
  }

  std::mutex mutex_;
  bool locked_ = false;
  std::deque<std::unique_ptr<WaiterBase>> waiters_;
};

}  // namespace imagenbd::backends
