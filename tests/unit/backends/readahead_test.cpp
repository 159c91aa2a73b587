// The readahead filter: over a cache with a slow counting remote, a sequential read sends
// far fewer, larger remote reads than without it; random reads do not prefetch; two
// interleaved sequential streams are both followed; prefetched ranges are aligned, never
// re-issued, grow to the maximum window and stop at the end of the disk; NBD_CMD_CACHE goes
// straight down; bad options are refused.
#include "backends/readahead.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/cache.hpp"
#include "backends/memory.hpp"
#include "backends/remote_metrics.hpp"
#include "tests/unit/backends/support/counting_device.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/recording_device.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/slow_remote.hpp"
#include "tests/unit/support/temp_dir.hpp"

using namespace imagenbd::backends;
using imagenbd::test::CountingDevice;
using imagenbd::test::error_of;
using imagenbd::test::RecordingDevice;
using imagenbd::test::run;
using imagenbd::test::TempDir;

namespace {

constexpr uint32_t chunk = 256 << 10;
constexpr uint32_t io = 64 << 10;  // a booting kernel's read size

DevicePtr make_blob(uint64_t size) {
  auto m = open_memory(size, "az://acct/c/readahead.img");
  std::vector<std::byte> v(size);
  for (uint64_t i = 0; i < size; ++i)
    v[i] = std::byte(static_cast<uint8_t>((i / 4096) * 31 + i * 3 + 1) | 1);
  run(m->write(0, v, {}));
  return m;
}

ReadaheadOptions ra_options() {
  ReadaheadOptions o;
  o.min_window = chunk;
  o.max_window = 4u << 20;
  o.align = chunk;
  return o;
}

// A slow remote under a fresh cache, optionally with readahead on top.
struct Stack {
  std::shared_ptr<CountingDevice> remote;
  DevicePtr cache;
  DevicePtr top;
};

Stack make_stack(const TempDir& dir, DevicePtr blob, bool readahead) {
  Stack s;
  s.remote = std::make_shared<CountingDevice>(std::move(blob));
  s.remote->set_delay(std::chrono::milliseconds(2));
  CacheOptions c;
  c.path = dir.file("cache.img");
  c.chunk_size = chunk;
  s.cache = open_cache(s.remote, c);
  s.top = readahead ? open_readahead(s.cache, ra_options()) : s.cache;
  return s;
}

// Reads [from, from + length) in `io` pieces, in order, checking every byte.
asio::awaitable<void> read_run(DevicePtr d, DevicePtr truth, uint64_t from, uint64_t length) {
  std::vector<std::byte> got(io), want(io);
  for (uint64_t at = from; at < from + length; at += io) {
    co_await d->read(at, got);
    co_await truth->read(at, want);
    REQUIRE(got == want);
  }
}

// The prefetch ranges a RecordingDevice saw.
std::vector<std::pair<uint64_t, uint64_t>> prefetches(const RecordingDevice& r) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const auto& line : r.calls()) {
    unsigned long long o = 0, l = 0;
    if (std::sscanf(line.c_str(), "prefetch %llu+%llu", &o, &l) == 2) out.emplace_back(o, l);
  }
  return out;
}

}  // namespace

TEST_CASE("readahead: a sequential read sends far fewer, larger remote reads") {
  constexpr uint64_t size = 16u << 20;
  auto blob = make_blob(size);
  TempDir plain_dir, ra_dir;
  int plain_reads = 0, ra_reads = 0;
  uint64_t ra_bytes = 0;
  {
    auto s = make_stack(plain_dir, blob, false);
    run(read_run(s.top, blob, 0, size));
    plain_reads = s.remote->reads();
  }
  {
    auto s = make_stack(ra_dir, blob, true);
    const auto misses_before = cache_counters().misses.load();
    run(read_run(s.top, blob, 0, size));
    ra_reads = s.remote->reads();
    ra_bytes = s.remote->bytes_read();
    const auto misses = cache_counters().misses.load() - misses_before;
    const auto st = readahead_stats(*s.top);
    MESSAGE("sequential 16 MiB in 64 KiB reads: "
            << plain_reads << " remote reads without, " << ra_reads << " with readahead ("
            << st.prefetches << " prefetches, " << misses << " chunk misses)");
    CHECK(st.prefetches >= 4);
    CHECK(st.streams_started == 1);
  }
  CHECK(plain_reads == static_cast<int>(size / chunk));
  CHECK(ra_reads * 4 <= plain_reads);  // 64 vs about 10
  CHECK(ra_bytes == size);             // larger reads, and nothing fetched twice
}

TEST_CASE("readahead: the read that triggers a prefetch does not wait for it") {
  auto remote = imagenbd::test::SlowRemote::make(8u << 20, false);
  TempDir dir;
  CacheOptions c;
  c.path = dir.file("cache.img");
  c.chunk_size = chunk;
  auto top = open_readahead(open_cache(remote, c), ra_options());
  run([](DevicePtr d, std::shared_ptr<imagenbd::test::SlowRemote> r) -> asio::awaitable<void> {
    std::vector<std::byte> buf(io);
    co_await d->read(0, buf);  // fetches chunk 0
    r->close_gate();
    // Continues the run: prefetches the next window, whose remote read stops at the gate;
    // the read itself (chunk 0, cached) returns anyway.
    co_await d->read(io, buf);
    CHECK(readahead_stats(*d).prefetches == 1);
    asio::steady_timer timer(co_await asio::this_coro::executor);
    for (int i = 0; i < 1000 && r->reads_at_gate() == 0; ++i) {
      timer.expires_after(std::chrono::milliseconds(1));
      co_await timer.async_wait(asio::use_awaitable);
    }
    CHECK(r->reads_at_gate() == 1);  // the prefetch, still waiting
    r->open_gate();
  }(top, remote));
}

TEST_CASE("readahead: random reads cause no prefetch storm") {
  constexpr uint64_t size = 64u << 20;
  auto blob = make_blob(size);
  TempDir dir;
  auto s = make_stack(dir, blob, true);
  std::mt19937_64 rng(42);
  constexpr int n = 300;
  run([](DevicePtr d, std::mt19937_64& rng) -> asio::awaitable<void> {
    std::vector<std::byte> buf(io);
    for (int i = 0; i < n; ++i) co_await d->read(rng() % (size / io) * io, buf);
  }(s.top, rng));
  const auto st = readahead_stats(*s.top);
  MESSAGE("300 random 64 KiB reads: " << st.prefetches << " prefetches, " << s.remote->reads()
                                      << " remote reads");
  // Only a read that happens to start where one of the 16 streams expects its next read
  // prefetches (16 of 1024 places: about 5 of 300), and only a first, smallest window.
  CHECK(st.prefetches <= n / 20);
  CHECK(st.prefetch_bytes <= st.prefetches * chunk);
  CHECK(st.streams_started >= n - n / 20);
  CHECK(s.remote->reads() <= n);
  CHECK(s.remote->bytes_read() <= (n + st.prefetches) * chunk);
}

TEST_CASE("readahead: two interleaved sequential streams are both followed") {
  constexpr uint64_t size = 32u << 20;
  auto blob = make_blob(size);
  TempDir dir;
  auto remote = std::make_shared<CountingDevice>(blob);
  remote->set_delay(std::chrono::milliseconds(1));
  CacheOptions c;
  c.path = dir.file("cache.img");
  c.chunk_size = chunk;
  auto recorder = std::make_shared<RecordingDevice>(open_cache(remote, c));
  auto top = open_readahead(recorder, ra_options());
  constexpr uint64_t a = 0, b = 16u << 20, length = 8u << 20;
  run([](DevicePtr d, DevicePtr truth) -> asio::awaitable<void> {
    std::vector<std::byte> got(io), want(io);
    for (uint64_t i = 0; i < length; i += io) {
      for (uint64_t base : {a, b}) {
        co_await d->read(base + i, got);
        co_await truth->read(base + i, want);
        REQUIRE(got == want);
      }
    }
  }(top, blob));
  uint64_t in_a = 0, in_b = 0;
  for (auto [o, l] : prefetches(*recorder)) {
    if (o < b)
      in_a += l;
    else
      in_b += l;
  }
  const auto st = readahead_stats(*top);
  MESSAGE("two streams of 8 MiB: " << st.prefetches << " prefetches (" << in_a << " + " << in_b
                                   << " bytes), " << remote->reads() << " remote reads");
  CHECK(st.streams_started == 2);
  CHECK(in_a >= length - 2 * chunk);
  CHECK(in_b >= length - 2 * chunk);
  CHECK(remote->reads() * 4 <= static_cast<int>(2 * length / chunk));
}

TEST_CASE("readahead: windows grow, are aligned, never overlap and stop at the end") {
  constexpr uint64_t size = (12u << 20) + 5000;  // not a multiple of the chunk
  auto blob = make_blob(size);
  auto recorder = std::make_shared<RecordingDevice>(blob);
  auto top = open_readahead(recorder, ra_options());
  run([](DevicePtr d) -> asio::awaitable<void> {
    std::vector<std::byte> buf(io);
    uint64_t at = 0;
    for (; at + io <= size; at += io) co_await d->read(at, buf);
    auto tail = std::span(buf).first(size - at);
    co_await d->read(at, tail);
  }(top));
  const auto p = prefetches(*recorder);
  REQUIRE(p.size() >= 4);
  uint64_t end = 0, largest = 0;
  for (auto [o, l] : p) {
    CHECK(o % chunk == 0);
    CHECK(o >= end);  // never re-issued
    CHECK(l > 0);
    CHECK(o + l <= size);
    if (o + l < size) CHECK(l % chunk == 0);
    end = o + l;
    largest = std::max(largest, l);
  }
  CHECK(p.front().second == chunk);  // the first prefetch of a run is min_window
  CHECK(largest >= (2u << 20));      // at least half the maximum window at a time
  CHECK(largest <= (4u << 20));
  CHECK(end == size);  // clamped to the end of the disk
}

// With several reads in flight, a read can reach the filter before the one ahead of it
// (fio at QD8 over the session's extents lookups): the run must go on, its window growing.
TEST_CASE("readahead: a run whose reads overtake each other is still one run") {
  constexpr uint64_t size = 32u << 20;
  auto recorder = std::make_shared<RecordingDevice>(open_memory(size, "mem"));
  auto top = open_readahead(recorder, ra_options());
  run([](DevicePtr d) -> asio::awaitable<void> {
    std::vector<std::byte> buf(io);
    // Pairs swapped: 1 0 3 2 5 4 ..., then 2-step overtakes: 2 1 0 5 4 3 ...
    const uint64_t half = (8u << 20) / io;
    for (uint64_t i = 0; i + 1 < half; i += 2) {
      co_await d->read((i + 1) * io, buf);
      co_await d->read(i * io, buf);
    }
    for (uint64_t i = half; i + 2 < 2 * half; i += 3) {
      co_await d->read((i + 2) * io, buf);
      co_await d->read((i + 1) * io, buf);
      co_await d->read(i * io, buf);
    }
  }(top));
  const auto st = readahead_stats(*top);
  const auto p = prefetches(*recorder);
  uint64_t largest = 0;
  for (auto [o, l] : p) largest = std::max(largest, l);
  MESSAGE("16 MiB read with overtaking: " << st.streams_started << " streams started, "
                                          << st.prefetches << " prefetches, largest " << largest);
  // Each overtaking read starts a candidate that the run then absorbs; the run's window
  // is never reset, so it reaches max_window and prefetches few, large windows.
  CHECK(largest == (4u << 20));
  CHECK(st.prefetches <= 10);
  uint64_t resets = 0;
  for (std::size_t i = 1; i < p.size(); ++i)
    if (p[i].second == chunk && p[i].first > p[0].first) ++resets;
  CHECK(resets == 0);
}

TEST_CASE("readahead: a random read starts over at the minimum window") {
  constexpr uint64_t size = 32u << 20;
  auto recorder = std::make_shared<RecordingDevice>(open_memory(size, "mem"));
  ReadaheadOptions o = ra_options();
  o.streams = 1;  // one stream: the jump replaces it
  auto top = open_readahead(recorder, o);
  run([](DevicePtr d) -> asio::awaitable<void> {
    std::vector<std::byte> buf(io);
    for (uint64_t at = 0; at < (4u << 20); at += io) co_await d->read(at, buf);
    for (uint64_t at = 20u << 20; at < (21u << 20); at += io) co_await d->read(at, buf);
  }(top));
  const auto p = prefetches(*recorder);
  auto first_after_jump =
      std::find_if(p.begin(), p.end(), [](auto r) { return r.first >= (20u << 20); });
  REQUIRE(first_after_jump != p.end());
  CHECK(first_after_jump->second == chunk);
}

TEST_CASE("readahead: NBD_CMD_CACHE goes straight down and other calls pass through") {
  auto mem = open_memory(8u << 20, "mem");
  auto recorder = std::make_shared<RecordingDevice>(mem);
  auto top = open_readahead(recorder, ra_options());
  run(top->prefetch(12345, 678));
  CHECK(prefetches(*recorder) == std::vector<std::pair<uint64_t, uint64_t>>{{12345, 678}});
  auto data = imagenbd::test::bytes("hello");
  run(top->write(4096, data, {}));
  CHECK(imagenbd::test::read(*top, 4096, 5) == data);
  CHECK(top->size() == mem->size());
  CHECK(top->describe() == "mem");
  CHECK(readahead_stats(*top).prefetches == 0);
}

TEST_CASE("readahead: bad options are refused") {
  auto mem = open_memory(1u << 20, "mem");
  ReadaheadOptions o;
  o.min_window = 0;
  CHECK(error_of([&] { open_readahead(mem, o); }).errc() == std::errc::invalid_argument);
  o = {};
  o.max_window = o.min_window - 1;
  CHECK(error_of([&] { open_readahead(mem, o); }).errc() == std::errc::invalid_argument);
  o = {};
  o.streams = 0;
  CHECK(error_of([&] { open_readahead(mem, o); }).errc() == std::errc::invalid_argument);
  o = {};
  o.align = 3000;
  CHECK(error_of([&] { open_readahead(mem, o); }).errc() == std::errc::invalid_argument);
}
