// run_parallel: width respected, all tasks run, the first exception rethrown after all
// finished, and the edge cases (no tasks, synchronous tasks, width above the count).
#include "backends/parallel.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <stdexcept>
#include <string>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "tests/unit/support/run.hpp"

namespace asio = boost::asio;
using imagenbd::backends::run_parallel;
using imagenbd::backends::Task;
using imagenbd::test::run;

namespace {

asio::awaitable<void> sleep_ms(int ms) {
  asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::milliseconds(ms));
  co_await timer.async_wait(asio::use_awaitable);
}

}  // namespace

TEST_CASE("run_parallel runs every task and never more than width at once") {
  int running = 0, peak = 0, done = 0;
  std::vector<Task> tasks;
  for (int i = 0; i < 12; ++i) {
    tasks.push_back([&]() -> asio::awaitable<void> {
      peak = std::max(peak, ++running);
      co_await sleep_ms(5);
      --running;
      ++done;
    });
  }
  run(run_parallel(std::move(tasks), 3));
  CHECK(done == 12);
  CHECK(peak == 3);
  CHECK(running == 0);
}

TEST_CASE("run_parallel with width above the task count runs them all at once") {
  int running = 0, peak = 0;
  std::vector<Task> tasks;
  for (int i = 0; i < 4; ++i) {
    tasks.push_back([&]() -> asio::awaitable<void> {
      peak = std::max(peak, ++running);
      co_await sleep_ms(5);
      --running;
    });
  }
  run(run_parallel(std::move(tasks), 100));
  CHECK(peak == 4);
}

TEST_CASE("run_parallel with no tasks returns, and tasks that never suspend complete") {
  run(run_parallel({}, 4));
  int done = 0;
  std::vector<Task> tasks;
  for (int i = 0; i < 100; ++i) {
    tasks.push_back([&]() -> asio::awaitable<void> {
      ++done;
      co_return;
    });
  }
  run(run_parallel(std::move(tasks), 2));
  CHECK(done == 100);
  done = 0;
  std::vector<Task> one{[&]() -> asio::awaitable<void> {
    ++done;
    co_return;
  }};
  run(run_parallel(std::move(one), 0));  // width 0 is treated as 1
  CHECK(done == 1);
}

TEST_CASE("run_parallel rethrows the first exception after all tasks finished") {
  int finished = 0;
  std::vector<Task> tasks;
  tasks.push_back([&]() -> asio::awaitable<void> {
    co_await sleep_ms(1);
    ++finished;
    throw std::runtime_error("first");
  });
  tasks.push_back([&]() -> asio::awaitable<void> {
    co_await sleep_ms(20);
    ++finished;
    throw std::runtime_error("second");
  });
  for (int i = 0; i < 5; ++i) {
    tasks.push_back([&]() -> asio::awaitable<void> {
      co_await sleep_ms(10);
      ++finished;
    });
  }
  CHECK_THROWS_WITH_AS(run(run_parallel(std::move(tasks), 3)), "first", std::runtime_error);
  CHECK(finished == 7);
}
