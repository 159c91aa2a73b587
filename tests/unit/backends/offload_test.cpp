// offload(): runs work on the blocking pool, resumes on the caller's executor, carries
// results and exceptions back.
#include "backends/offload.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <string>
#include <thread>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "backends/error.hpp"
#include "tests/unit/support/run.hpp"

namespace asio = boost::asio;
using imagenbd::backends::Error;
using imagenbd::backends::offload;
using imagenbd::test::run;

TEST_CASE("offload returns the value computed on a pool thread, back on the caller's thread") {
  const auto caller = std::this_thread::get_id();
  auto [worker, after, value] =
      run([]() -> asio::awaitable<std::tuple<std::thread::id, std::thread::id, std::string>> {
        std::thread::id worker;
        std::string value = co_await offload([&worker] {
          worker = std::this_thread::get_id();
          return std::string("from the pool");
        });
        co_return std::tuple{worker, std::this_thread::get_id(), value};
      }());
  CHECK(value == "from the pool");
  CHECK(worker != caller);
  CHECK(after == caller);
}

TEST_CASE("offload of void work runs it") {
  std::atomic<int> ran{0};
  run([&ran]() -> asio::awaitable<void> { co_await offload([&ran] { ++ran; }); }());
  CHECK(ran == 1);
}

TEST_CASE("offload rethrows the work's exception with its type and errc") {
  auto thrower = []() -> asio::awaitable<int> {
    co_return co_await offload([]() -> int {
      imagenbd::backends::fail(std::errc::no_space_on_device, "test: {} full", "disk");
    });
  };
  try {
    run(thrower());
    FAIL("no exception");
  } catch (const Error& e) {
    CHECK(e.errc() == std::errc::no_space_on_device);
    CHECK(std::string(e.what()) == "test: disk full");
  }
  auto void_thrower = []() -> asio::awaitable<void> {
    co_await offload([] { throw std::runtime_error("boom"); });
  };
  CHECK_THROWS_WITH_AS(run(void_thrower()), "boom", std::runtime_error);
}

TEST_CASE("many offloads in flight at once all complete, each on its own executor") {
  asio::io_context context;
  std::atomic<int> sum{0}, done{0};
  for (int i = 1; i <= 200; ++i) {
    asio::co_spawn(
        context,
        [i, &sum]() -> asio::awaitable<void> {
          sum += co_await offload([i] {
            std::this_thread::sleep_for(std::chrono::microseconds(100));
            return i;
          });
        },
        [&done](std::exception_ptr e) {
          CHECK(!e);
          ++done;
        });
  }
  context.run();
  CHECK(done == 200);
  CHECK(sum == 200 * 201 / 2);
}
