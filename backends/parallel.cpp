// run_parallel: each task is co_spawned on the caller's executor, at most `width` at a
// time; a finished task starts the next one. The caller waits on one stored completion
// handler, completed when the last task finishes. A mutex keeps the counts right should
// the executor run handlers on several threads.
#include "backends/parallel.hpp"

#include <exception>
#include <memory>
#include <mutex>

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace imagenbd::backends {

namespace {

struct Waiter {
  virtual ~Waiter() = default;
  virtual void wake(std::exception_ptr error) = 0;
};

template <typename Handler>
struct WaiterFor final : Waiter {
  explicit WaiterFor(Handler h) : handler(std::move(h)) {}
  void wake(std::exception_ptr error) override {
    auto ex = asio::get_associated_executor(handler);
    asio::post(ex, [handler = std::move(handler), error]() mutable { std::move(handler)(error); });
  }
  Handler handler;
};

struct Group : std::enable_shared_from_this<Group> {
  Group(asio::any_io_executor e, std::vector<Task> t, std::size_t w)
      : ex(std::move(e)), tasks(std::move(t)), width(w), remaining(tasks.size()) {}

  // Starts tasks until `width` run or none is left.
  void fill() {
    for (;;) {
      std::size_t index = 0;
      {
        std::lock_guard lock(mutex);
        if (running >= width || next >= tasks.size()) return;
        index = next++;
        ++running;
      }
      asio::co_spawn(ex, tasks[index](),
                     [self = shared_from_this()](std::exception_ptr e) { self->finished(e); });
    }
  }

  void finished(std::exception_ptr e) {
    std::unique_ptr<Waiter> wake;
    {
      std::lock_guard lock(mutex);
      if (e && !first_error) first_error = e;
      --running;
      --remaining;
      if (remaining == 0) wake = std::move(waiter);
    }
    if (wake) {
      wake->wake(first_error);
    } else {
      fill();
    }
  }

  asio::any_io_executor ex;
  std::vector<Task> tasks;
  std::size_t width;
  std::mutex mutex;
  std::size_t next = 0;
  std::size_t running = 0;
  std::size_t remaining;
  std::exception_ptr first_error;
  std::unique_ptr<Waiter> waiter;
};

}  // namespace

asio::awaitable<void> run_parallel(std::vector<Task> tasks, std::size_t width) {
  if (tasks.empty()) co_return;
  // One task (a small read or write, the common case) runs inline: no spawn, no group.
  if (tasks.size() == 1) {
    co_await tasks.front()();
    co_return;
  }
  auto ex = co_await asio::this_coro::executor;
  auto group = std::make_shared<Group>(ex, std::move(tasks), width == 0 ? 1 : width);
  // A named initiation capturing a plain pointer: GCC 12 destroys a temporary lambda with a
  // shared_ptr capture twice when it sits in the co_await expression.
  Group* g = group.get();
  auto wait_all = [g](auto handler) {
    {
      std::lock_guard lock(g->mutex);
      g->waiter = std::make_unique<WaiterFor<decltype(handler)>>(std::move(handler));
    }
    g->fill();
  };
  co_await asio::async_initiate<const asio::use_awaitable_t<>&, void(std::exception_ptr)>(
      wait_all, asio::use_awaitable);
}

}  // namespace imagenbd::backends
