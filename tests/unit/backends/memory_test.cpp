// The memory leaf: sparse pages, zero reads, trim/zero freeing pages, extents, threads.
#include "backends/memory.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using imagenbd::test::run;
using imagenbd::test::read;

namespace {

constexpr uint64_t page = 64 << 10;

std::vector<std::byte> pattern(std::size_t n, int seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(i * 7 + seed + 1) | 1);
  return v;
}

bool all_zero(const std::vector<std::byte>& v) {
  for (auto b : v)
    if (b != std::byte{0}) return false;
  return true;
}

}  // namespace

TEST_CASE("memory: a new device reads as zeroes, is one hole, and has every cap") {
  auto d = open_memory(10 * page + 123, "ram0");
  CHECK(d->name() == "memory");
  CHECK(d->describe() == "ram0");
  CHECK(d->size() == 10 * page + 123);
  const Caps c = d->caps();
  CHECK((c.writable && c.flush && c.fua && c.trim && c.zero && c.fast_zero && c.extents &&
         c.cache && c.multi_conn));
  CHECK(all_zero(read(*d, 0, 3 * page)));
  CHECK(run(d->extents(0, d->size())) == std::vector<Extent>{{d->size(), ExtentKind::hole}});
}

TEST_CASE("memory: writes round-trip at unaligned offsets across page boundaries") {
  auto d = open_memory(8 * page);
  const auto data = pattern(2 * page + 1000, 3);
  const uint64_t at = page - 17;
  run(d->write(at, data, {}));
  CHECK(read(*d, at, data.size()) == data);
  // Bytes around the write are still zero.
  CHECK(all_zero(read(*d, 0, at)));
  CHECK(all_zero(read(*d, at + data.size(), 8 * page - at - data.size())));
  // A read that starts in the middle of the written range.
  auto middle = read(*d, at + 5, 300);
  CHECK(std::equal(middle.begin(), middle.end(), data.begin() + 5));
  // Pages 0..3 are touched: one data run, then one hole.
  CHECK(run(d->extents(0, 8 * page)) ==
        std::vector<Extent>{{4 * page, ExtentKind::data}, {4 * page, ExtentKind::hole}});
}

TEST_CASE("memory: extents merge runs, alternate kinds and clip to the range") {
  auto d = open_memory(10 * page + 100);
  const auto one = pattern(10, 1);
  for (uint64_t p : {1, 2, 5, 10}) run(d->write(p * page + 3, one, {}));
  CHECK(run(d->extents(0, d->size())) == std::vector<Extent>{{page, ExtentKind::hole},
                                                             {2 * page, ExtentKind::data},
                                                             {2 * page, ExtentKind::hole},
                                                             {page, ExtentKind::data},
                                                             {4 * page, ExtentKind::hole},
                                                             {100, ExtentKind::data}});
  CHECK(run(d->extents(page + 10, 2 * page)) ==
        std::vector<Extent>{{2 * page - 10, ExtentKind::data}, {10, ExtentKind::hole}});
  CHECK(run(d->extents(3 * page + 1, 5)) == std::vector<Extent>{{5, ExtentKind::hole}});
}

TEST_CASE("memory: writing zeroes into a hole allocates nothing") {
  auto d = open_memory(4 * page);
  run(d->write(100, std::vector<std::byte>(2 * page), {}));
  CHECK(run(d->extents(0, 4 * page)) == std::vector<Extent>{{4 * page, ExtentKind::hole}});
}

TEST_CASE("memory: trim and zero free whole pages and zero partial ones") {
  for (bool use_trim : {false, true}) {
    CAPTURE(use_trim);
    auto d = open_memory(4 * page);
    const auto data = pattern(4 * page, 9);
    run(d->write(0, data, {}));
    // From the middle of page 0 to the middle of page 2: page 1 goes away.
    const uint64_t from = page / 2, length = 2 * page;
    if (use_trim) {
      run(d->trim(from, length, {}));
    } else {
      run(d->zero(from, length, {}));
    }
    auto after = read(*d, 0, 4 * page);
    CHECK(std::equal(after.begin(), after.begin() + from, data.begin()));
    CHECK(all_zero({after.begin() + from, after.begin() + from + length}));
    CHECK(std::equal(after.begin() + from + length, after.end(), data.begin() + from + length));
    CHECK(run(d->extents(0, 4 * page)) == std::vector<Extent>{{page, ExtentKind::data},
                                                              {page, ExtentKind::hole},
                                                              {2 * page, ExtentKind::data}});
  }
}

TEST_CASE("memory: a page zeroed piece by piece is freed once it is all zero") {
  auto d = open_memory(2 * page);
  run(d->write(10, pattern(100, 2), {}));
  run(d->zero(0, 50, {}));
  CHECK(run(d->extents(0, 2 * page)).front().kind == ExtentKind::data);
  run(d->zero(50, 100, {WriteFlags{.fua = true}}));
  CHECK(run(d->extents(0, 2 * page)) == std::vector<Extent>{{2 * page, ExtentKind::hole}});
  // A huge zero over a sparse device costs nothing and keeps the size.
  auto big = open_memory(uint64_t{1} << 50);
  run(big->write((uint64_t{1} << 49) + 1, pattern(10, 4), {}));
  run(big->zero(0, big->size(), {}));
  CHECK(run(big->extents(0, big->size())) == std::vector<Extent>{{big->size(), ExtentKind::hole}});
}

TEST_CASE("memory: resize grows with zeroes, shrinking forgets the tail") {
  auto d = open_memory(page);
  run(d->write(0, pattern(page, 5), {}));
  run(d->resize(3 * page + 10));
  CHECK(d->size() == 3 * page + 10);
  CHECK(read(*d, 0, page) == pattern(page, 5));
  CHECK(all_zero(read(*d, page, 2 * page + 10)));
  run(d->write(2 * page, pattern(page + 10, 6), {}));
  run(d->resize(page / 2));  // inside page 0: its tail is zeroed, pages 1-3 freed
  run(d->resize(4 * page));
  auto head = pattern(page, 5);
  std::fill(head.begin() + page / 2, head.end(), std::byte{0});
  CHECK(read(*d, 0, page) == head);
  CHECK(all_zero(read(*d, page, 3 * page)));
  CHECK(run(d->extents(page, 3 * page)) == std::vector<Extent>{{3 * page, ExtentKind::hole}});
}

TEST_CASE("memory: concurrent writers and readers on several threads") {
  auto d = open_memory(64 * page);
  boost::asio::io_context context;
  std::atomic<int> ok{0};
  for (int i = 0; i < 64; ++i) {
    boost::asio::co_spawn(
        context,
        [d, i, &ok]() -> boost::asio::awaitable<void> {
          // Each writer owns a slice straddling a page boundary; the next one's slice shares
          // the page.
          const auto data = pattern(page / 2, i);
          const uint64_t at = static_cast<uint64_t>(i) * page + page / 2 + 7;
          if (at + data.size() > d->size()) {
            ++ok;
            co_return;
          }
          for (int round = 0; round < 20; ++round) {
            co_await d->write(at, data, {});
            std::vector<std::byte> back(data.size());
            co_await d->read(at, back);
            if (back != data) co_return;
            co_await d->extents(0, d->size());
          }
          ++ok;
        },
        [](std::exception_ptr e) { CHECK(!e); });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&context] { context.run(); });
  for (auto& t : threads) t.join();
  CHECK(ok == 64);
}
