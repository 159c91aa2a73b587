// The boot-profile filter: a recorded boot-like read pattern replayed over a fresh cache
// makes the same pattern see far fewer cache misses; only reads are recorded, in first-read
// order, deduplicated; max_chunks, the window and periodic saves; foreign, changed and
// damaged profiles are replaced; the replay stops when the device is destroyed; the file
// codec round-trips and refuses damaged bytes.
#include "backends/boot_profile.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "backends/cache.hpp"
#include "backends/memory.hpp"
#include "backends/remote_metrics.hpp"
#include "tests/unit/backends/support/counting_device.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/temp_dir.hpp"

using namespace imagenbd::backends;
using imagenbd::test::CountingDevice;
using imagenbd::test::error_of;
using imagenbd::test::run;
using imagenbd::test::TempDir;

namespace {

constexpr uint32_t chunk = 256 << 10;

DevicePtr make_blob(uint64_t size, std::string label = "az://acct/c/boot.img") {
  auto m = open_memory(size, label);
  std::vector<std::byte> v(size);
  for (uint64_t i = 0; i < size; ++i)
    v[i] = std::byte(static_cast<uint8_t>((i / 4096) * 17 + i * 5 + 3) | 1);
  run(m->write(0, v, {}));
  return m;
}

struct Read {
  uint64_t offset;
  uint32_t length;
};

// A boot-like pattern, the same every time: jumps to pseudo-random places, each followed by
// a short sequential run of 4..64 KiB reads; some places are read again later.
std::vector<Read> boot_pattern(uint64_t size) {
  std::mt19937_64 rng(7);
  std::vector<Read> out;
  std::vector<uint64_t> places;
  for (int i = 0; i < 60; ++i) {
    uint64_t at = (i % 7 == 6 && !places.empty()) ? places[rng() % places.size()]
                                                  : rng() % (size / 4096) * 4096;
    places.push_back(at);
    const int run_length = 1 + static_cast<int>(rng() % 8);
    for (int k = 0; k < run_length && at < size; ++k) {
      const uint32_t length =
          static_cast<uint32_t>(std::min<uint64_t>(4096u << (rng() % 5), size - at));
      out.push_back({at, length});
      at += length;
    }
  }
  return out;
}

// The chunks of `pattern` in first-read order.
std::vector<uint64_t> first_reads(const std::vector<Read>& pattern) {
  std::vector<uint64_t> order;
  std::vector<bool> seen(1 << 16);
  for (auto r : pattern)
    for (uint64_t c = r.offset / chunk; c <= (r.offset + r.length - 1) / chunk; ++c)
      if (!seen[c]) {
        seen[c] = true;
        order.push_back(c);
      }
  return order;
}

asio::awaitable<void> replay_pattern(DevicePtr d, DevicePtr truth, std::vector<Read> pattern) {
  std::vector<std::byte> got, want;
  for (auto r : pattern) {
    got.resize(r.length);
    want.resize(r.length);
    co_await d->read(r.offset, got);
    co_await truth->read(r.offset, want);
    REQUIRE(got == want);
  }
}

BootProfileOptions options_for(const std::string& path) {
  BootProfileOptions o;
  o.path = path;
  o.chunk_size = chunk;
  return o;
}

DecodedBootProfile load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(raw.size());
  if (!raw.empty()) std::memcpy(bytes.data(), raw.data(), raw.size());
  return decode_boot_profile(bytes);
}

void store(const std::string& path, const std::vector<std::byte>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// Polls `done` (a condition another thread makes true) for up to five seconds.
template <typename Fn>
bool eventually(Fn done) {
  for (int i = 0; i < 500; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return done();
}

uint64_t ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t)
      .count();
}

}  // namespace

TEST_CASE("boot profile: a replayed profile makes the same boot see far fewer cache misses") {
  constexpr uint64_t size = 32u << 20;
  auto blob = make_blob(size);
  const auto pattern = boot_pattern(size);
  TempDir dir;
  const std::string profile = dir.file("boot.profile");
  uint64_t misses1 = 0, ms1 = 0;
  {
    auto remote = std::make_shared<CountingDevice>(blob);
    remote->set_delay(std::chrono::milliseconds(3));
    CacheOptions c;
    c.path = dir.file("cache-a.img");
    c.chunk_size = chunk;
    auto bp = open_boot_profile(open_cache(remote, c), options_for(profile));
    CHECK_FALSE(boot_profile_stats(*bp).replaying);
    const auto before = cache_counters().misses.load();
    const auto start = std::chrono::steady_clock::now();
    run(replay_pattern(bp, blob, pattern));
    ms1 = ms_since(start);
    misses1 = cache_counters().misses.load() - before;
    CHECK(boot_profile_stats(*bp).recorded == first_reads(pattern).size());
  }  // destroyed: the recording is saved
  auto saved = load(profile);
  REQUIRE(saved.ok);
  CHECK(saved.profile.chunks == first_reads(pattern));
  CHECK(saved.profile.describe == "az://acct/c/boot.img");
  CHECK(saved.profile.version_tag == "v1");
  CHECK(saved.profile.chunk_size == chunk);

  auto remote = std::make_shared<CountingDevice>(blob);
  remote->set_delay(std::chrono::milliseconds(3));
  CacheOptions c;
  c.path = dir.file("cache-b.img");
  c.chunk_size = chunk;
  asio::io_context ctx;
  auto o = options_for(profile);
  o.executor = ctx.get_executor();
  auto bp = open_boot_profile(open_cache(remote, c), o);
  const auto replay_start = std::chrono::steady_clock::now();
  ctx.run();  // the replay, to its end
  const uint64_t replay_ms = ms_since(replay_start);
  const auto st = boot_profile_stats(*bp);
  CHECK(st.replaying);
  CHECK(st.replay_done);
  CHECK(st.replay_chunks == saved.profile.chunks.size());
  CHECK(st.replayed == saved.profile.chunks.size());
  const int replay_requests = remote->reads();
  CHECK(replay_requests < static_cast<int>(saved.profile.chunks.size()));  // runs coalesced
  const auto before = cache_counters().misses.load();
  const auto start = std::chrono::steady_clock::now();
  run(replay_pattern(bp, blob, pattern));
  const uint64_t ms2 = ms_since(start);
  const auto misses2 = cache_counters().misses.load() - before;
  MESSAGE("boot pattern of " << pattern.size() << " reads: " << misses1 << " cache misses in "
                             << ms1 << " ms recording, " << misses2 << " in " << ms2
                             << " ms after a replay of " << st.replay_chunks << " chunks ("
                             << replay_requests << " remote reads, " << replay_ms << " ms)");
  CHECK(misses1 >= 20);
  CHECK(misses2 * 3 < misses1);
  CHECK(misses2 == 0);
  CHECK(remote->reads() == replay_requests);     // the boot itself needed no remote read
  CHECK(boot_profile_stats(*bp).recorded == 0);  // a replay does not record
}

TEST_CASE("boot profile: a boot racing its replay reads the right bytes") {
  constexpr uint64_t size = 16u << 20;
  auto blob = make_blob(size);
  const auto pattern = boot_pattern(size);
  TempDir dir;
  BootProfile p{"az://acct/c/boot.img", size, "v1", chunk, first_reads(pattern)};
  store(dir.file("p"), encode_boot_profile(p));
  auto remote = std::make_shared<CountingDevice>(blob);
  remote->set_delay(std::chrono::milliseconds(2));
  CacheOptions c;
  c.path = dir.file("cache.img");
  c.chunk_size = chunk;
  asio::io_context ctx;
  auto o = options_for(dir.file("p"));
  o.executor = ctx.get_executor();
  auto bp = open_boot_profile(open_cache(remote, c), o);
  std::exception_ptr error;
  asio::co_spawn(ctx, replay_pattern(bp, blob, pattern), [&](std::exception_ptr e) { error = e; });
  ctx.run();
  if (error) std::rethrow_exception(error);
  CHECK(boot_profile_stats(*bp).replay_done);
  // Every chunk fetched once, by the replay or by the boot, never twice.
  CHECK(remote->bytes_read() <= p.chunks.size() * chunk);
}

TEST_CASE("boot profile: only reads are recorded, once each, in first-read order") {
  TempDir dir;
  auto mem = make_blob(8u << 20, "mem:a");
  {
    auto bp = open_boot_profile(mem, options_for(dir.file("p")));
    run(bp->prefetch(5 * chunk, chunk));  // a guess from above: not recorded
    imagenbd::test::read(*bp, 2 * chunk + 100, 10);
    imagenbd::test::read(*bp, 7 * chunk - 10, 20);  // two chunks
    imagenbd::test::read(*bp, 2 * chunk, 4096);     // again
    imagenbd::test::read(*bp, 0, 1);
    CHECK(boot_profile_stats(*bp).recorded == 4);
    run(bp->flush());  // saves
    CHECK(boot_profile_stats(*bp).saves == 1);
  }
  auto d = load(dir.file("p"));
  REQUIRE(d.ok);
  CHECK(d.profile.chunks == std::vector<uint64_t>{2, 6, 7, 0});
  CHECK(d.profile.describe == "mem:a");
}

TEST_CASE("boot profile: an empty recording is never saved") {
  TempDir dir;
  { auto bp = open_boot_profile(make_blob(1u << 20), options_for(dir.file("p"))); }
  CHECK_FALSE(std::filesystem::exists(dir.file("p")));
}

TEST_CASE("boot profile: max_chunks and the window end the recording, saves are periodic") {
  TempDir dir;
  auto mem = make_blob(8u << 20);
  SUBCASE("max_chunks") {
    auto o = options_for(dir.file("p"));
    o.max_chunks = 3;
    auto bp = open_boot_profile(mem, o);
    for (uint64_t c : {4, 1, 1, 9, 3, 5}) imagenbd::test::read(*bp, c * chunk, 100);
    CHECK(boot_profile_stats(*bp).recorded == 3);
    // The final save runs on the blocking pool, posted by the read that ended it.
    REQUIRE(eventually([&] { return boot_profile_stats(*bp).saves == 1; }));
    auto d = load(dir.file("p"));
    REQUIRE(d.ok);
    CHECK(d.profile.chunks == std::vector<uint64_t>{4, 1, 9});
  }
  SUBCASE("window") {
    auto o = options_for(dir.file("p"));
    o.window = std::chrono::seconds(0);
    {
      auto bp = open_boot_profile(mem, o);
      imagenbd::test::read(*bp, 0, 100);
      CHECK(boot_profile_stats(*bp).recorded == 0);
    }
    CHECK_FALSE(std::filesystem::exists(dir.file("p")));
  }
  SUBCASE("periodic saves while recording") {
    auto o = options_for(dir.file("p"));
    o.save_every = std::chrono::seconds(0);
    auto bp = open_boot_profile(mem, o);
    imagenbd::test::read(*bp, 3 * chunk, 100);
    REQUIRE(eventually([&] { return load(dir.file("p")).ok; }));
    CHECK(load(dir.file("p")).profile.chunks == std::vector<uint64_t>{3});
    imagenbd::test::read(*bp, 1 * chunk, 100);
    REQUIRE(eventually([&] { return load(dir.file("p")).profile.chunks.size() == 2; }));
    CHECK(load(dir.file("p")).profile.chunks == std::vector<uint64_t>{3, 1});
  }
}

TEST_CASE("boot profile: foreign, changed and damaged profiles are replaced") {
  TempDir dir;
  const std::string path = dir.file("p");
  auto remote = std::make_shared<CountingDevice>(make_blob(8u << 20), "\"etag-2\"");
  const BootProfile good{"az://acct/c/boot.img", 8u << 20, "\"etag-2\"", chunk, {1, 2, 3}};
  auto bytes = encode_boot_profile(good);
  std::vector<std::vector<std::byte>> bad;
  auto other = good;
  other.describe = "az://acct/c/other.img";
  bad.push_back(encode_boot_profile(other));
  other = good;
  other.version_tag = "\"etag-1\"";
  bad.push_back(encode_boot_profile(other));
  other = good;
  other.size = 4u << 20;
  other.chunks = {1};
  bad.push_back(encode_boot_profile(other));
  other = good;
  other.chunk_size = chunk * 2;
  bad.push_back(encode_boot_profile(other));
  auto flipped = bytes;
  flipped[30] ^= std::byte{1};
  bad.push_back(flipped);
  bad.push_back(std::vector<std::byte>(bytes.begin(), bytes.end() - 5));
  bad.push_back(imagenbd::test::bytes("not a profile at all, just text"));
  for (std::size_t i = 0; i < bad.size(); ++i) {
    CAPTURE(i);
    store(path, bad[i]);
    {
      auto bp = open_boot_profile(remote, options_for(path));
      CHECK_FALSE(boot_profile_stats(*bp).replaying);
      imagenbd::test::read(*bp, 6 * chunk, 10);
    }
    auto d = load(path);
    REQUIRE(d.ok);
    CHECK(d.profile.describe == good.describe);
    CHECK(d.profile.version_tag == good.version_tag);
    CHECK(d.profile.chunks == std::vector<uint64_t>{6});
  }
  // The good one is replayed, and not replaced.
  store(path, bytes);
  {
    asio::io_context ctx;
    auto o = options_for(path);
    o.executor = ctx.get_executor();
    auto bp = open_boot_profile(remote, o);
    CHECK(boot_profile_stats(*bp).replaying);
    ctx.run();
    imagenbd::test::read(*bp, 6 * chunk, 10);
  }
  CHECK(load(path).profile.chunks == good.chunks);
}

TEST_CASE("boot profile: the replay stops when the device is destroyed") {
  constexpr uint64_t size = 64u << 20;
  auto blob = make_blob(size);
  TempDir dir;
  BootProfile p{"az://acct/c/boot.img", size, "v1", chunk, {}};
  for (uint64_t c = 0; c < size / chunk; c += 2) p.chunks.push_back(c);  // 128 runs of one
  store(dir.file("p"), encode_boot_profile(p));
  auto remote = std::make_shared<CountingDevice>(blob);
  remote->set_delay(std::chrono::milliseconds(20));
  CacheOptions c;
  c.path = dir.file("cache.img");
  c.chunk_size = chunk;
  asio::io_context ctx;
  auto o = options_for(dir.file("p"));
  o.executor = ctx.get_executor();
  o.replay_width = 2;
  auto bp = open_boot_profile(open_cache(remote, c), o);
  ctx.run_for(std::chrono::milliseconds(50));
  CHECK_FALSE(boot_profile_stats(*bp).replay_done);
  bp.reset();  // the export is gone: the workers stop after the fetches in flight
  ctx.run();
  MESSAGE("replay of 128 chunks destroyed after 50 ms: " << remote->reads() << " remote reads");
  CHECK(remote->reads() >= 2);
  CHECK(remote->reads() <= 10);
}

TEST_CASE("boot profile: the file codec round-trips and refuses damaged bytes") {
  BootProfile p{"az://acct/c/disk.vhd", 123456789, "\"0x8D\"", 1u << 20, {5, 0, 117, 3}};
  auto bytes = encode_boot_profile(p);
  auto d = decode_boot_profile(bytes);
  REQUIRE(d.ok);
  CHECK(d.profile.describe == p.describe);
  CHECK(d.profile.size == p.size);
  CHECK(d.profile.version_tag == p.version_tag);
  CHECK(d.profile.chunk_size == p.chunk_size);
  CHECK(d.profile.chunks == p.chunks);
  for (std::size_t n = 0; n < bytes.size(); ++n)
    CHECK_FALSE(decode_boot_profile(std::span(bytes).first(n)).ok);
  int refused = 0;
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    auto b = bytes;
    b[i] ^= std::byte{0x40};
    refused += !decode_boot_profile(b).ok;
  }
  CHECK(refused == static_cast<int>(bytes.size()));
  // A chunk past the end of the image, with a valid checksum, is refused too.
  auto past = p;
  past.chunks.push_back(118);  // 123456789 bytes are 118 chunks: 0..117
  auto pd = decode_boot_profile(encode_boot_profile(past));
  CHECK_FALSE(pd.ok);
  CHECK(pd.problem.find("past the end") != std::string::npos);
  // Huge images get 8-byte indexes.
  BootProfile big{"x", uint64_t{1} << 42, "", 512, {(uint64_t{1} << 33) - 1, 0}};
  auto bd = decode_boot_profile(encode_boot_profile(big));
  REQUIRE(bd.ok);
  CHECK(bd.profile.chunks == big.chunks);
}

TEST_CASE("boot profile: bad options are refused") {
  auto mem = open_memory(1u << 20, "mem");
  BootProfileOptions o;
  CHECK(error_of([&] { open_boot_profile(mem, o); }).errc() == std::errc::invalid_argument);
  o.path = "/tmp/x";
  o.chunk_size = 3000;
  CHECK(error_of([&] { open_boot_profile(mem, o); }).errc() == std::errc::invalid_argument);
  o.chunk_size = chunk;
  o.replay_width = 0;
  CHECK(error_of([&] { open_boot_profile(mem, o); }).errc() == std::errc::invalid_argument);
}
