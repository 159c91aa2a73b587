// The cache filter: hits without remote reads, persistence across reopen, invalidation on a
// changed remote, damaged metadata, the size cap, single fetch under concurrent misses,
// errors to every waiter, prefetch, and a seeded model test against the remote's bytes.
#include "backends/cache.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <exception>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "backends/cache_map.hpp"
#include "backends/memory.hpp"
#include "backends/remote_metrics.hpp"
#include "tests/unit/backends/support/counting_device.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/slow_remote.hpp"
#include "tests/unit/support/temp_dir.hpp"

using namespace imagenbd::backends;
using imagenbd::test::CountingDevice;
using imagenbd::test::error_of;
using imagenbd::test::read;
using imagenbd::test::run;
using imagenbd::test::SlowRemote;
using imagenbd::test::TempDir;

namespace {

constexpr uint32_t chunk = 64 << 10;

// A remote of `size` bytes with a position-dependent pattern (no zero bytes).
DevicePtr make_blob(uint64_t size, int seed = 1) {
  auto m = open_memory(size, "az://acct/c/disk.vhd");
  std::vector<std::byte> v(size);
  for (uint64_t i = 0; i < size; ++i)
    v[i] = std::byte(static_cast<uint8_t>((i / 4096) * 13 + i * 7 + seed) | 1);
  run(m->write(0, v, {}));
  return m;
}

std::shared_ptr<CountingDevice> remote_over(DevicePtr blob, std::string tag = "v1") {
  return std::make_shared<CountingDevice>(std::move(blob), std::move(tag));
}

CacheOptions options_for(const TempDir& dir, uint64_t max_bytes = 0) {
  CacheOptions o;
  o.path = dir.file("cache.img");
  o.chunk_size = chunk;
  o.max_bytes = max_bytes;
  return o;
}

uint64_t allocated_bytes(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

}  // namespace

TEST_CASE("cache map: the metadata codec round-trips and refuses damaged bytes") {
  CacheIdentity id{"az://a/c/b", 123456789, "\"0x8D\"", chunk};
  std::vector<uint64_t> words{0x5, 0xffffffffffffffffull, 0};
  auto bytes = encode_cache_meta(id, words);
  auto d = decode_cache_meta(bytes);
  REQUIRE(d.ok);
  CHECK(d.identity == id);
  CHECK(d.words == words);
  // Every truncation, and every single flipped byte, is refused.
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    CHECK_FALSE(decode_cache_meta(std::span(bytes).first(n)).ok);
    auto flipped = bytes;
    flipped[n] ^= std::byte{0x40};
    CHECK_FALSE(decode_cache_meta(flipped).ok);
  }
  CHECK(identity_change(id, id).empty());
  auto other = id;
  other.version_tag = "\"0x9E\"";
  CHECK(identity_change(id, other).find("version tag") != std::string::npos);
  other = id;
  other.size += 512;
  CHECK(identity_change(id, other).find("size") != std::string::npos);
  other = id;
  other.chunk_size *= 2;
  CHECK(identity_change(id, other).find("chunk size") != std::string::npos);
}

TEST_CASE("cache map: present and access bits, and loading ignores bits past the end") {
  CacheMap m(70);
  CHECK(m.word_count() == 2);
  CHECK(m.set_present(69));
  CHECK_FALSE(m.set_present(69));
  CHECK(m.present(69));
  CHECK(m.count_present() == 1);
  CHECK(m.clear_present(69));
  CHECK_FALSE(m.present(69));
  m.touch(3);
  CHECK(m.take_access(3));
  CHECK_FALSE(m.take_access(3));
  const std::vector<uint64_t> all{~0ull, ~0ull};
  m.load(all);
  CHECK(m.count_present() == 70);
}

TEST_CASE("cache: the first read fetches once, the second touches nothing remote") {
  TempDir dir("cache");
  auto blob = make_blob(16 * chunk);
  auto remote = remote_over(blob);
  auto c = open_cache(remote, options_for(dir));
  CHECK(c->name() == "cache");
  CHECK(c->size() == blob->size());
  CHECK(c->caps().cache);
  CHECK_FALSE(c->caps().writable);
  CHECK(c->caps().multi_conn == remote->caps().multi_conn);
  const uint64_t at = chunk + 100, n = 2 * chunk + 5;  // touches chunks 1, 2, 3
  const auto hits0 = cache_counters().hits.load(), misses0 = cache_counters().misses.load();
  CHECK(read(*c, at, n) == read(*blob, at, n));
  CHECK(remote->reads() == 1);  // adjacent missing chunks in one request
  CHECK(remote->bytes_read() == 3 * chunk);
  CHECK(cache_counters().misses.load() - misses0 == 3);
  CHECK(read(*c, at, n) == read(*blob, at, n));
  CHECK(read(*c, 2 * chunk, 10) == read(*blob, 2 * chunk, 10));
  CHECK(remote->reads() == 1);
  CHECK(cache_counters().hits.load() - hits0 == 4);
  // A read spanning present and missing chunks fetches only the missing one.
  CHECK(read(*c, 3 * chunk, 2 * chunk) == read(*blob, 3 * chunk, 2 * chunk));
  CHECK(remote->reads() == 2);
  CHECK(remote->bytes_read() == 4 * chunk);
}

TEST_CASE("cache: over a read-only remote, writes, trims and zeroes are refused with EPERM") {
  TempDir dir("cache");
  auto c = open_cache(remote_over(make_blob(4 * chunk)), options_for(dir));
  const std::vector<std::byte> data(512);
  CHECK(error_of([&] { run(c->write(0, data, {})); }).errc() == std::errc::operation_not_permitted);
  CHECK(error_of([&] { run(c->trim(0, 512, {})); }).errc() == std::errc::operation_not_permitted);
  CHECK(error_of([&] { run(c->zero(0, 512, {})); }).errc() == std::errc::operation_not_permitted);
}

TEST_CASE("cache: a reopened cache serves what was fetched without touching the remote") {
  TempDir dir("cache");
  auto blob = make_blob(16 * chunk);
  {
    auto c = open_cache(remote_over(blob), options_for(dir));
    (void)read(*c, 0, 4 * chunk);
    run(c->close());
  }
  auto remote = remote_over(blob);  // a new remote object, same identity
  auto c = open_cache(remote, options_for(dir));
  CHECK(read(*c, 0, 4 * chunk) == read(*blob, 0, 4 * chunk));
  CHECK(remote->reads() == 0);
  CHECK(read(*c, 4 * chunk, chunk) == read(*blob, 4 * chunk, chunk));
  CHECK(remote->reads() == 1);
}

TEST_CASE("cache: the bitmap is saved after N new chunks, before flush or close") {
  TempDir dir("cache");
  auto blob = make_blob(16 * chunk);
  auto o = options_for(dir);
  o.save_every_chunks = 2;
  auto c = open_cache(remote_over(blob), o);
  (void)read(*c, 0, 3 * chunk);
  std::ifstream in(o.path + ".meta", std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto d = decode_cache_meta(std::as_bytes(std::span(raw)));
  REQUIRE(d.ok);
  CHECK(d.words.at(0) == 0x7);
}

TEST_CASE("cache: a changed version tag, size or chunk size discards the cache") {
  TempDir dir("cache");
  auto blob = make_blob(16 * chunk);
  {
    auto c = open_cache(remote_over(blob, "v1"), options_for(dir));
    (void)read(*c, 0, 2 * chunk);
    run(c->close());
  }
  SUBCASE("version tag") {
    // The blob was rewritten: new contents, new tag.
    auto changed = make_blob(16 * chunk, 99);
    auto remote = remote_over(changed, "v2");
    auto c = open_cache(remote, options_for(dir));
    CHECK(read(*c, 0, 2 * chunk) == read(*changed, 0, 2 * chunk));
    CHECK(remote->reads() == 1);
  }
  SUBCASE("size") {
    auto bigger = make_blob(17 * chunk);
    auto remote = remote_over(bigger, "v1");
    auto c = open_cache(remote, options_for(dir));
    CHECK(c->size() == 17 * chunk);
    CHECK(read(*c, 0, 2 * chunk) == read(*bigger, 0, 2 * chunk));
    CHECK(remote->reads() == 1);
  }
  SUBCASE("chunk size") {
    auto remote = remote_over(blob, "v1");
    auto o = options_for(dir);
    o.chunk_size = 2 * chunk;
    auto c = open_cache(remote, o);
    CHECK(read(*c, 0, 2 * chunk) == read(*blob, 0, 2 * chunk));
    CHECK(remote->reads() == 1);
  }
}

TEST_CASE("cache: truncated or garbage metadata is discarded, not trusted") {
  TempDir dir("cache");
  auto blob = make_blob(16 * chunk);
  const auto o = options_for(dir);
  {
    auto c = open_cache(remote_over(blob), o);
    (void)read(*c, 0, 2 * chunk);
    run(c->close());
  }
  SUBCASE("truncated") {
    REQUIRE(::truncate((o.path + ".meta").c_str(), 20) == 0);
  }
  SUBCASE("garbage") {
    std::ofstream out(o.path + ".meta", std::ios::binary | std::ios::trunc);
    std::mt19937 rng(7);
    for (int i = 0; i < 200; ++i) out.put(static_cast<char>(rng()));
  }
  SUBCASE("data file without metadata") {
    REQUIRE(::unlink((o.path + ".meta").c_str()) == 0);
  }
  SUBCASE("metadata without its data file") {
    REQUIRE(::unlink(o.path.c_str()) == 0);
  }
  auto remote = remote_over(blob);
  auto c = open_cache(remote, o);
  CHECK(read(*c, 0, 2 * chunk) == read(*blob, 0, 2 * chunk));
  CHECK(remote->reads() == 1);
}

TEST_CASE("cache: the size cap holds and evicted chunks are fetched again correctly") {
  TempDir dir("cache");
  const uint64_t size = 64 * chunk, cap = 8 * chunk;
  auto blob = make_blob(size);
  auto remote = remote_over(blob);
  const auto o = options_for(dir, cap);
  auto c = open_cache(remote, o);
  const auto evictions0 = cache_counters().evictions.load();
  for (uint64_t at = 0; at < size; at += 2 * chunk) {
    CHECK(read(*c, at, 2 * chunk) == read(*blob, at, 2 * chunk));
    CHECK(allocated_bytes(o.path) <= cap + chunk);
  }
  CHECK(cache_counters().evictions.load() - evictions0 >= 64 - 8);
  // Everything again, backwards: the early chunks were evicted and come back intact.
  remote->reset_counts();
  for (uint64_t at = size; at > 0; at -= chunk)
    CHECK(read(*c, at - chunk, chunk) == read(*blob, at - chunk, chunk));
  CHECK(remote->reads() > 0);
  CHECK(allocated_bytes(o.path) <= cap + chunk);
  // And a restart keeps only chunks whose data is still there.
  run(c->close());
  c.reset();
  auto again = open_cache(remote_over(blob), o);
  for (uint64_t at = 0; at < size; at += chunk)
    CHECK(read(*again, at, chunk) == read(*blob, at, chunk));
}

TEST_CASE("cache: recently used chunks survive eviction (second chance)") {
  TempDir dir("cache");
  auto blob = make_blob(32 * chunk);
  auto remote = remote_over(blob);
  auto c = open_cache(remote, options_for(dir, 8 * chunk));
  for (uint64_t i = 0; i < 32; ++i) {
    (void)read(*c, i * chunk, chunk);
    (void)read(*c, 0, 100);  // chunk 0 stays hot
  }
  remote->reset_counts();
  (void)read(*c, 0, 100);
  CHECK(remote->reads() == 0);
}

TEST_CASE("cache: 20 concurrent readers of one missing chunk cause one remote read") {
  TempDir dir("cache");
  auto blob = make_blob(8 * chunk);
  auto remote = remote_over(blob);
  remote->set_delay(std::chrono::milliseconds(20));
  auto c = open_cache(remote, options_for(dir));
  boost::asio::io_context io;
  std::vector<std::vector<std::byte>> results(20, std::vector<std::byte>(1000));
  int done = 0;
  for (std::size_t i = 0; i < results.size(); ++i)
    boost::asio::co_spawn(io, c->read(3 * chunk + i * 100, results[i]), [&](std::exception_ptr e) {
      CHECK(!e);
      ++done;
    });
  io.run();
  CHECK(done == 20);
  CHECK(remote->reads() == 1);
  for (std::size_t i = 0; i < results.size(); ++i)
    CHECK(results[i] == read(*blob, 3 * chunk + i * 100, 1000));
}

TEST_CASE("cache: a failed fetch reaches every waiter and a later read retries") {
  TempDir dir("cache");
  auto blob = make_blob(8 * chunk);
  auto remote = remote_over(blob);
  remote->set_delay(std::chrono::milliseconds(20));
  remote->fail_next_reads(1);
  auto c = open_cache(remote, options_for(dir));
  boost::asio::io_context io;
  std::vector<std::vector<std::byte>> results(20, std::vector<std::byte>(512));
  int failed = 0;
  for (std::size_t i = 0; i < results.size(); ++i)
    boost::asio::co_spawn(io, c->read(5 * chunk + i * 512, results[i]), [&](std::exception_ptr e) {
      try {
        if (e) std::rethrow_exception(e);
      } catch (const Error& err) {
        if (err.errc() == std::errc::io_error) ++failed;
      }
    });
  io.run();
  CHECK(failed == 20);
  CHECK(remote->reads() == 1);
  CHECK(read(*c, 5 * chunk, 512) == read(*blob, 5 * chunk, 512));
  CHECK(remote->reads() == 2);
}

TEST_CASE("cache: prefetch fetches in the background and later reads hit") {
  TempDir dir("cache");
  auto blob = make_blob(16 * chunk);
  auto remote = remote_over(blob);
  auto c = open_cache(remote, options_for(dir));
  run(c->prefetch(chunk, 4 * chunk));  // run() returns once the background fetch is done
  CHECK(remote->reads() == 1);
  CHECK(read(*c, chunk, 4 * chunk) == read(*blob, chunk, 4 * chunk));
  CHECK(remote->reads() == 1);
  // A failing prefetch is only logged.
  remote->fail_next_reads(1);
  run(c->prefetch(10 * chunk, chunk));
  CHECK(read(*c, 10 * chunk, chunk) == read(*blob, 10 * chunk, chunk));
}

// Readahead sends a window per hint; a hint dropped while the workers are busy would leave
// its window to be fetched chunk by chunk on demand. Hints beyond the width wait instead.
TEST_CASE("cache: prefetch hints beyond the width wait for a worker, none is dropped") {
  TempDir dir("cache");
  auto blob = make_blob(32 * chunk);
  auto remote = remote_over(blob);
  remote->set_delay(std::chrono::milliseconds(1));
  auto o = options_for(dir);
  o.prefetch_width = 2;
  auto c = open_cache(remote, o);
  run([](DevicePtr c) -> asio::awaitable<void> {
    for (uint64_t i = 0; i < 10; ++i) co_await c->prefetch(3 * i * chunk, 2 * chunk);
  }(c));  // returns once every background fetch is done
  CHECK(remote->reads() == 10);
  for (uint64_t i = 0; i < 10; ++i)
    CHECK(read(*c, 3 * i * chunk, 2 * chunk) == read(*blob, 3 * i * chunk, 2 * chunk));
  CHECK(remote->reads() == 10);
}

TEST_CASE("cache: the default chunk size follows the remote's preferred block size") {
  TempDir dir("cache");
  auto blob = make_blob(64 * chunk);
  CacheOptions o;
  o.path = dir.file("a.img");
  auto small = remote_over(blob);
  auto c = open_cache(small, o);
  (void)read(*c, 0, 1);
  CHECK(small->bytes_read() == 1u << 20);  // 4 KiB preferred: 1 MiB chunks
  auto big = remote_over(blob);
  big->set_block_preferred(256 << 10);
  o.path = dir.file("b.img");
  auto d = open_cache(big, o);
  (void)read(*d, 0, 1);
  CHECK(big->bytes_read() == 256u << 10);
  o.chunk_size = 3000;
  o.path = dir.file("c.img");
  CHECK(error_of([&] { open_cache(big, o); }).errc() == std::errc::invalid_argument);
}

TEST_CASE("cache: one cache object per path, shared by opens over the same remote") {
  TempDir dir("cache");
  auto blob = make_blob(8 * chunk);
  auto a = open_cache(remote_over(blob), options_for(dir));
  auto b = open_cache(remote_over(blob), options_for(dir));
  CHECK(a == b);
  auto other = remote_over(blob, "v2");
  CHECK(error_of([&] { open_cache(other, options_for(dir)); }).errc() ==
        std::errc::device_or_resource_busy);
}

TEST_CASE("cache: seeded model test of random reads, restarts and a cap") {
  TempDir dir("cache");
  const uint64_t size = 40 * chunk + 12345;  // a partial last chunk
  auto blob = make_blob(size, 5);
  std::vector<std::byte> model(size);
  run(blob->read(0, model));
  auto o = options_for(dir, 12 * chunk);
  o.max_fetch = 3 * chunk;
  std::mt19937_64 rng(20261121);
  auto c = open_cache(remote_over(blob), o);
  for (int step = 0; step < 400; ++step) {
    if (step % 97 == 96) {  // restart
      run(c->close());
      c.reset();
      c = open_cache(remote_over(blob), o);
    }
    const uint64_t at = rng() % size;
    const uint64_t n = 1 + rng() % std::min<uint64_t>(size - at, 5 * chunk);
    const auto got = read(*c, at, n);
    const bool same = std::equal(got.begin(), got.end(), model.begin() + at);
    CHECK_MESSAGE(same, "step ", step, ": read ", at, "+", n);
  }
}

TEST_CASE("cache: readers on four threads with a small cap all see the remote's bytes") {
  TempDir dir("cache");
  const uint64_t size = 24 * chunk + 777;
  auto blob = make_blob(size, 9);
  std::vector<std::byte> model(size);
  run(blob->read(0, model));
  auto remote = remote_over(blob);
  auto o = options_for(dir, 6 * chunk);
  o.max_fetch = 2 * chunk;
  auto c = open_cache(remote, o);
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      boost::asio::io_context io;
      std::mt19937_64 rng(1000 + t);
      // Eight readers per thread, so coroutines interleave on each thread too.
      for (int r = 0; r < 8; ++r)
        boost::asio::co_spawn(
            io,
            [&, seed = rng()]() -> boost::asio::awaitable<void> {
              std::mt19937_64 local(seed);
              for (int i = 0; i < 40; ++i) {
                const uint64_t at = local() % size;
                const uint64_t n = 1 + local() % std::min<uint64_t>(size - at, 3 * chunk);
                std::vector<std::byte> got(n);
                co_await c->read(at, got);
                if (!std::equal(got.begin(), got.end(), model.begin() + at)) ++wrong;
              }
            },
            [&](std::exception_ptr e) {
              if (e) ++failed;
            });
      io.run();
    });
  for (auto& t : threads) t.join();
  CHECK(wrong == 0);
  CHECK(failed == 0);
  CHECK(allocated_bytes(o.path) <= 6 * chunk + 2 * chunk);
}

namespace {

// A writable slow remote of `size` bytes holding make_blob's pattern.
std::shared_ptr<SlowRemote> writable_remote(uint64_t size) {
  auto r = SlowRemote::make(size, true);
  auto pattern = make_blob(size);
  std::vector<std::byte> v(size);
  run(pattern->read(0, v));
  run(r->bytes().write(0, v, {}));
  return r;
}

std::vector<std::byte> pattern_bytes(std::size_t n, int seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(i * 31 + seed));
  return v;
}

}  // namespace

TEST_CASE("cache: over a writable remote, writes, zeroes and trims go through and stay coherent") {
  TempDir dir("cache");
  auto remote = writable_remote(16 * chunk);
  auto c = open_cache(remote, options_for(dir));
  CHECK(c->caps().writable);
  CHECK(c->caps().flush);
  CHECK(c->caps().fua);
  CHECK(c->caps().trim);
  CHECK(c->caps().zero);
  CHECK(c->caps().cache);
  auto& bytes = remote->bytes();
  // A whole chunk written: the local copy is updated, read back without the remote.
  auto whole = pattern_bytes(chunk, 1);
  run(c->write(2 * chunk, whole, {.fua = true}));
  CHECK(remote->writes() == 1);
  CHECK(read(bytes, 2 * chunk, chunk) == whole);
  CHECK(read(*c, 2 * chunk, chunk) == whole);
  CHECK(remote->reads() == 0);
  // Part of an absent chunk: dropped locally, fetched (with the new bytes) when read.
  auto part = pattern_bytes(1000, 2);
  run(c->write(5 * chunk + 77, part, {}));
  CHECK(read(*c, 5 * chunk, chunk) == read(bytes, 5 * chunk, chunk));
  CHECK(read(*c, 5 * chunk + 77, 1000) == part);
  CHECK(remote->reads() == 1);
  // Part of a present chunk: patched locally, no fetch.
  auto part2 = pattern_bytes(3000, 3);
  run(c->write(5 * chunk + chunk - 1500, part2, {}));  // chunks 5 and 6
  CHECK(read(*c, 5 * chunk, 2 * chunk) == read(bytes, 5 * chunk, 2 * chunk));
  CHECK(remote->reads() == 2);  // chunk 6 only
  // Zeroes: present chunk 2 partly, chunks 3-4 whole (absent: now present as holes).
  run(c->zero(2 * chunk + 100, 2 * chunk + 50, {}));
  CHECK(read(*c, 2 * chunk, 3 * chunk) == read(bytes, 2 * chunk, 3 * chunk));
  CHECK(read(*c, 3 * chunk, 10) == std::vector<std::byte>(10));
  CHECK(remote->reads() == 3);  // chunk 4 (its last 50 bytes were not zeroed: absent)
  // A trim drops the chunks: read back whatever the remote says.
  run(c->trim(5 * chunk, 2 * chunk, {}));
  CHECK(read(*c, 5 * chunk, 2 * chunk) == read(bytes, 5 * chunk, 2 * chunk));
  CHECK(remote->reads() == 4);
  CHECK(read(*c, 0, 16 * chunk) == read(bytes, 0, 16 * chunk));
}

// The fetch reads the old bytes before the write reaches the remote; without the claim it
// would store them after the write returned and serve them from then on.
TEST_CASE("cache: a write racing a fetch of the same chunk waits for it and wins") {
  TempDir dir("cache");
  auto remote = writable_remote(8 * chunk);
  auto c = open_cache(remote, options_for(dir));
  const auto old_bytes = read(remote->bytes(), 3 * chunk, chunk);
  auto fresh = pattern_bytes(4096, 9);
  boost::asio::io_context io;
  std::vector<std::byte> first(chunk);
  bool read_done = false, write_done = false;
  remote->close_gate();
  boost::asio::co_spawn(io, c->read(3 * chunk, first), [&](std::exception_ptr e) {
    CHECK(!e);
    read_done = true;
  });
  boost::asio::co_spawn(io, c->write(3 * chunk + 4096, fresh, {}), [&](std::exception_ptr e) {
    CHECK(!e);
    write_done = true;
  });
  // Let both start: the read waits at the gate, the write waits for the read's fetch.
  while (remote->reads_at_gate() == 0) io.run_one();
  for (int i = 0; i < 20; ++i) io.poll();
  CHECK_FALSE(write_done);
  CHECK(remote->writes() == 0);
  remote->open_gate();
  io.run();
  CHECK(read_done);
  CHECK(write_done);
  CHECK(first == old_bytes);  // the read started first and was served the old bytes
  CHECK(read(*c, 3 * chunk + 4096, 4096) == fresh);
  CHECK(read(*c, 3 * chunk, chunk) == read(remote->bytes(), 3 * chunk, chunk));
}

// Each writer owns interleaved 1000-byte slices (so chunks are shared), writes its slice
// and reads it back at once: any stale chunk served after a write returned shows. A small
// cap keeps evictions running meanwhile.
TEST_CASE("cache: concurrent writers and readers on two threads never see stale bytes") {
  TempDir dir("cache");
  constexpr uint32_t small_chunk = 4096 * 4;
  const uint64_t size = 48 * small_chunk;
  auto remote = writable_remote(size);
  remote->set_delay(std::chrono::microseconds(200));
  auto o = options_for(dir, 8 * small_chunk);
  o.chunk_size = small_chunk;
  o.max_fetch = 2 * small_chunk;
  auto c = open_cache(remote, o);
  const auto evictions0 = cache_counters().evictions.load();
  constexpr int workers = 6;
  constexpr uint64_t slice = 1000;
  std::atomic<int> stale{0}, failed{0};
  boost::asio::io_context io;
  for (int k = 0; k < workers; ++k)
    boost::asio::co_spawn(
        io,
        [&, k]() -> boost::asio::awaitable<void> {
          std::mt19937_64 r(77 + k);
          for (int i = 0; i < 100; ++i) {
            uint64_t s = r() % (size / slice);
            s = s - s % workers + static_cast<uint64_t>(k);
            if ((s + 1) * slice > size) continue;
            const uint64_t at = s * slice + r() % 100;
            const uint64_t n = 1 + r() % (slice - 100);
            auto data = pattern_bytes(n, static_cast<int>(r() % 251));
            if (r() % 5 == 0) {
              co_await c->zero(at, n, {});
              std::fill(data.begin(), data.end(), std::byte{0});
            } else {
              co_await c->write(at, data, {});
            }
            std::vector<std::byte> got(n);
            co_await c->read(at, got);
            if (got != data) ++stale;
            // A read of someone else's area keeps fetches of shared chunks going.
            std::vector<std::byte> other(1 + r() % (2 * small_chunk));
            const uint64_t o2 = r() % (size - other.size());
            co_await c->read(o2, other);
          }
        },
        [&](std::exception_ptr e) {
          if (e) ++failed;
        });
  std::thread helper([&] { io.run(); });
  io.run();
  helper.join();
  CHECK(failed == 0);
  CHECK(stale == 0);
  CHECK(cache_counters().evictions.load() > evictions0);
  CHECK(read(*c, 0, size) == read(remote->bytes(), 0, size));
}

TEST_CASE("cache: after our own writes, a flush saves the remote's new version tag") {
  TempDir dir("cache");
  const auto o = options_for(dir);
  auto remote = writable_remote(8 * chunk);
  {
    auto c = open_cache(remote, o);
    (void)read(*c, 0, 8 * chunk);
    auto data = pattern_bytes(chunk + 300, 4);
    run(c->write(chunk - 100, data, {}));
    CHECK(remote->version_tag() == "g1");  // like Azure's: the new tag is learnt at flush
    run(c->close());                       // flush: the remote's, then the bitmap's save
    CHECK(remote->version_tag() == "g" + std::to_string(remote->generation()));
  }
  SUBCASE("a restart keeps the cache") {
    auto again = remote->reopen();
    auto c = open_cache(again, o);
    CHECK(read(*c, 0, 8 * chunk) == read(remote->bytes(), 0, 8 * chunk));
    CHECK(again->reads() == 0);
  }
  SUBCASE("writes after the last flush, then no flush: the next start discards the cache") {
    {
      auto c = open_cache(remote, o);
      auto data = pattern_bytes(100, 5);
      run(c->write(5, data, {}));
      c.reset();  // saves at exit with the tag the remote reported: the one before the write
    }
    auto again = remote->reopen();
    auto c = open_cache(again, o);
    CHECK(read(*c, 0, 8 * chunk) == read(remote->bytes(), 0, 8 * chunk));
    CHECK(again->reads() > 0);
  }
  SUBCASE("another writer changed the object: the next start discards the cache") {
    auto data = pattern_bytes(chunk, 6);
    run(remote->bytes().write(0, data, {}));
    remote->change_behind_our_back();
    auto again = remote->reopen();
    auto c = open_cache(again, o);
    CHECK(read(*c, 0, chunk) == data);
    CHECK(again->reads() == 1);
  }
}

TEST_CASE("cache: without a cap, a short last chunk does not make it evict") {
  TempDir dir("cache");
  const uint64_t size = 8 * chunk + 4608;  // 9 chunks, the last one short
  auto blob = make_blob(size);
  const auto evictions0 = cache_counters().evictions.load();
  {
    auto c = open_cache(remote_over(blob), options_for(dir));
    CHECK(read(*c, 0, size) == read(*blob, 0, size));
    run(c->close());
  }
  CHECK(cache_counters().evictions.load() == evictions0);
  auto remote = remote_over(blob);
  auto c = open_cache(remote, options_for(dir));
  CHECK(read(*c, 0, size) == read(*blob, 0, size));
  CHECK(remote->reads() == 0);
}

// A killed process leaves chunks it stored after its last save; the next open punches them.
TEST_CASE("cache: data of chunks the saved bitmap does not name is punched at open") {
  TempDir dir("cache");
  auto blob = make_blob(8 * chunk);
  const auto o = options_for(dir);
  {
    auto c = open_cache(remote_over(blob), o);
    (void)read(*c, 0, 2 * chunk);
    run(c->close());
  }
  {
    std::fstream f(o.path, std::ios::in | std::ios::out | std::ios::binary);
    const std::vector<char> junk(chunk, 'x');
    f.seekp(5 * chunk);
    f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  }
  REQUIRE(allocated_bytes(o.path) >= 3 * chunk);
  auto remote = remote_over(blob);
  auto c = open_cache(remote, o);
  CHECK(allocated_bytes(o.path) <= 2 * chunk + 4096);
  CHECK(read(*c, 0, 8 * chunk) == read(*blob, 0, 8 * chunk));
  CHECK(remote->reads() == 1);  // chunks 2 to 7, chunk 5 included
}

TEST_CASE("cache: extents of held chunks are answered here, the rest by the remote, once") {
  TempDir dir("cache");
  auto blob = open_memory(16 * chunk, "az://acct/c/sparse.vhd");
  std::vector<std::byte> data(8 * chunk, std::byte{0x5a});
  run(blob->write(0, data, {}));  // chunks 8..15 never written: a hole in the remote
  auto remote = remote_over(blob);
  auto c = open_cache(remote, options_for(dir));
  CHECK(read(*c, 0, 2 * chunk) == read(*blob, 0, 2 * chunk));

  // The run of held chunks, without a remote call.
  auto held = run(c->extents(100, 16 * chunk - 100));
  CHECK(held == std::vector<Extent>{{2 * chunk - 100, ExtentKind::data}});
  CHECK(remote->extents_calls() == 0);

  // The run of chunks not held (2..15) is the remote's answer, cut at the run's end; a
  // read-only remote is asked for its whole extents window (64 MiB, here all of it) once.
  auto rest = run(c->extents(2 * chunk, 14 * chunk));
  CHECK(remote->extents_calls() == 1);
  uint64_t covered = 0;
  for (const auto& e : rest) covered += e.length;
  CHECK(covered <= 14 * chunk);
  REQUIRE_FALSE(rest.empty());
  CHECK(rest.front().kind == ExtentKind::data);
  CHECK(rest.back().kind == ExtentKind::hole);

  // A run ends where a held chunk starts.
  CHECK(read(*c, 5 * chunk, 10) == read(*blob, 5 * chunk, 10));
  auto before = run(c->extents(3 * chunk, 4 * chunk));
  covered = 0;
  for (const auto& e : before) covered += e.length;
  CHECK(covered == 2 * chunk);
  CHECK(before == std::vector<Extent>{{2 * chunk, ExtentKind::data}});
  auto tail = run(c->extents(7 * chunk + 512, 9 * chunk - 512));
  CHECK(tail ==
        std::vector<Extent>{{chunk - 512, ExtentKind::data}, {8 * chunk, ExtentKind::hole}});
  CHECK(remote->extents_calls() == 1);
}

// Over a writable remote (a leased blob written through the cache) the layout changes with
// our own writes: the remote is asked every time.
TEST_CASE("cache: extents over a writable remote are asked every time") {
  TempDir dir("cache");
  auto remote = writable_remote(8 * chunk);
  auto c = open_cache(remote, options_for(dir));
  (void)run(c->extents(0, 8 * chunk));
  (void)run(c->extents(chunk, 2 * chunk));
  CHECK(remote->extents_calls() == 2);
}
