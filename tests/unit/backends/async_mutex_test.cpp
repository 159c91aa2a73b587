// AsyncMutex: mutual exclusion across coroutines and threads, FIFO hand-over.
#include "backends/async_mutex.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>

namespace asio = boost::asio;
using imagenbd::backends::AsyncMutex;

namespace {

// Holds the mutex across a yield, so another coroutine would interleave without it.
asio::awaitable<void> critical(AsyncMutex& m, std::atomic<int>& inside,
                               std::atomic<int>& max_inside, std::atomic<int>& count, int rounds) {
  for (int i = 0; i < rounds; ++i) {
    auto guard = co_await m.scoped();
    int now = ++inside;
    int seen = max_inside.load();
    while (now > seen && !max_inside.compare_exchange_weak(seen, now)) {
    }
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
    ++count;
    --inside;
  }
}

}  // namespace

TEST_CASE("one coroutine at a time, on one thread") {
  asio::io_context ctx;
  AsyncMutex m;
  std::atomic<int> inside{0}, max_inside{0}, count{0};
  for (int i = 0; i < 8; ++i)
    asio::co_spawn(ctx, critical(m, inside, max_inside, count, 50), asio::detached);
  ctx.run();
  CHECK(count == 400);
  CHECK(max_inside == 1);
}

TEST_CASE("one coroutine at a time, across io_contexts on several threads") {
  std::vector<std::unique_ptr<asio::io_context>> contexts;
  for (int i = 0; i < 4; ++i) contexts.push_back(std::make_unique<asio::io_context>(1));
  AsyncMutex m;
  std::atomic<int> inside{0}, max_inside{0}, count{0};
  for (int i = 0; i < 16; ++i) {
    asio::co_spawn(*contexts[i % 4], critical(m, inside, max_inside, count, 200), asio::detached);
  }
  std::vector<std::thread> threads;
  for (auto& c : contexts) threads.emplace_back([&c] { c->run(); });
  for (auto& t : threads) t.join();
  CHECK(count == 16 * 200);
  CHECK(max_inside == 1);
}

TEST_CASE("waiters are served in arrival order") {
  asio::io_context ctx;
  AsyncMutex m;
  std::vector<int> order;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        co_await m.lock();
        // Queue three waiters while holding the mutex, then release it.
        for (int i = 0; i < 3; ++i) {
          asio::co_spawn(
              ctx,
              [&, i]() -> asio::awaitable<void> {
                auto g = co_await m.scoped();
                order.push_back(i);
              },
              asio::detached);
        }
        for (int i = 0; i < 5; ++i) co_await asio::post(ctx, asio::use_awaitable);
        CHECK(order.empty());
        m.unlock();
      },
      asio::detached);
  ctx.run();
  CHECK(order == std::vector<int>{0, 1, 2});
}
