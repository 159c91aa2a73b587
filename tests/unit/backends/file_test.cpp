// The file leaf against real files in $TMPDIR (or /tmp), and tmpfs in /dev/shm for a file
// system without FALLOC_FL_ZERO_RANGE.
#include "backends/file.hpp"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include "backends/error.hpp"
#include "backends/offload.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using imagenbd::test::error_of;
using imagenbd::test::read;
using imagenbd::test::run;
namespace asio = boost::asio;

namespace {

constexpr uint64_t KiB = 1024;
constexpr long tmpfs_magic = 0x01021994;

std::string temp_dir() {
  const char* dir = std::getenv("TMPDIR");
  return dir && *dir ? dir : "/tmp";
}

// A sparse temporary file of `size` bytes, removed at the end of the test.
struct TempFile {
  std::string path;
  explicit TempFile(uint64_t size, const std::string& dir = temp_dir()) {
    path = dir + "/imagenbd-file-test-XXXXXX";
    const int fd = ::mkstemp(path.data());
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, static_cast<off_t>(size)) == 0);
    ::close(fd);
  }
  ~TempFile() { ::unlink(path.c_str()); }

  void put(uint64_t offset, const std::vector<std::byte>& data) const {
    const int fd = ::open(path.c_str(), O_WRONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset)) ==
            static_cast<ssize_t>(data.size()));
    REQUIRE(::fsync(fd) == 0);
    ::close(fd);
  }
  std::vector<std::byte> get(uint64_t offset, std::size_t n) const {
    std::vector<std::byte> data(n);
    const int fd = ::open(path.c_str(), O_RDONLY);
    REQUIRE(fd >= 0);
    REQUIRE(::pread(fd, data.data(), n, static_cast<off_t>(offset)) == static_cast<ssize_t>(n));
    ::close(fd);
    return data;
  }
  uint64_t allocated() const {
    struct stat st {};
    REQUIRE(::stat(path.c_str(), &st) == 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }
};

std::vector<std::byte> pattern(std::size_t n, int seed = 0) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(i * 13 + seed) | 0x80);
  return v;
}

bool all_zero(const std::vector<std::byte>& v) {
  for (auto b : v)
    if (b != std::byte{0}) return false;
  return true;
}

// tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: the place to see fast zero refused.
bool tmpfs_without_zero_range() {
  struct statfs fs {};
  if (::statfs("/dev/shm", &fs) != 0 || fs.f_type != tmpfs_magic) return false;
  std::string path = "/dev/shm/imagenbd-probe-XXXXXX";
  const int fd = ::mkstemp(path.data());
  if (fd < 0) return false;
  ::unlink(path.c_str());
  const bool refused = ::ftruncate(fd, 65536) == 0 &&
                       ::fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096) < 0 &&
                       errno == EOPNOTSUPP;
  ::close(fd);
  return refused;
}

// Starts `op` on a fresh io_context while every blocking-pool thread waits; whether it
// completed within 5 s, that is without a trip to the pool. The pool is let go and `op`
// run to its end before returning either way (its buffers belong to the caller).
bool completes_while_pool_busy(asio::awaitable<void> op) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  for (int i = 0; i < 256; ++i) asio::post(blocking_pool(), [released] { released.wait(); });
  asio::io_context context;
  bool done = false;
  asio::co_spawn(context, std::move(op), [&](std::exception_ptr e) {
    CHECK(!e);
    done = true;
  });
  context.run_for(std::chrono::seconds(5));
  const bool inline_done = done;
  release.set_value();
  context.restart();
  context.run();
  return inline_done;
}

}  // namespace

TEST_CASE("file: caps, size and names") {
  TempFile f(3 * 1000 * 1000 + 7);
  auto d = open_file(f.path, {});
  CHECK(d->name() == "file");
  CHECK(d->describe() == f.path);
  CHECK(d->size() == 3 * 1000 * 1000 + 7);
  Caps c = d->caps();
  CHECK((c.writable && c.flush && c.fua && c.trim && c.zero && c.fast_zero && c.extents &&
         c.cache && c.multi_conn));
  CHECK(c.block_min == 1);
  CHECK(c.block_preferred == 4096);
  CHECK(c.block_max == 32u << 20);

  auto ro = open_file(f.path, {.read_only = true});
  c = ro->caps();
  CHECK(!c.writable);
  CHECK(!c.fua);
  CHECK(!c.trim);
  CHECK(!c.zero);
  CHECK(!c.fast_zero);
  CHECK((c.flush && c.extents && c.cache && c.multi_conn));
}

TEST_CASE("file: data round-trips at unaligned offsets, with and without FUA") {
  TempFile f(1024 * KiB);
  auto d = open_file(f.path, {});
  const auto a = pattern(10000, 1), b = pattern(70001, 2);
  run(d->write(4093, a, {}));
  run(d->write(300 * KiB + 1, b, {.fua = true}));
  CHECK(read(*d, 4093, a.size()) == a);
  CHECK(read(*d, 300 * KiB + 1, b.size()) == b);
  CHECK(f.get(4093, a.size()) == a);  // really in the file
  CHECK(f.get(300 * KiB + 1, b.size()) == b);
  CHECK(all_zero(read(*d, 0, 4093)));
  CHECK(all_zero(read(*d, 4093 + a.size(), 1000)));
  // A read spanning written and unwritten bytes, ending at EOF.
  auto tail = read(*d, 300 * KiB, 1024 * KiB - 300 * KiB);
  CHECK(tail[0] == std::byte{0});
  CHECK(std::equal(b.begin(), b.end(), tail.begin() + 1));
  run(d->flush());
  run(d->prefetch(0, 1024 * KiB));
}

TEST_CASE("file: a cached read completes while every pool thread is busy (no thread hop)") {
  TempFile f(256 * KiB);
  const auto data = pattern(4096, 5);
  f.put(8192, data);  // now in the page cache
  auto d = open_file(f.path, {.read_only = true});
  std::vector<std::byte> out(data.size());
  CHECK(completes_while_pool_busy(d->read(8192, out)));
  CHECK(out == data);
}

// qemu's dynamic VHD and VDI put block data 512 and 1536 bytes into a page: every guest
// write covers two pages in part. With both pages cached it must not wait for the pool.
TEST_CASE("file: a write covering cached pages in part completes while the pool is busy") {
  TempFile f(256 * KiB);
  f.put(0, pattern(256 * KiB, 3));  // every page in the page cache
  auto d = open_file(f.path, {});
  const auto data = pattern(4096, 6);
  CHECK(completes_while_pool_busy(d->write(8192 + 512, data, {})));
  std::vector<std::byte> out(data.size());
  run(d->read(8192 + 512, out));
  CHECK(out == data);
}

TEST_CASE("file: reading past the end of a file that shrank is EIO naming offset and bytes") {
  TempFile f(8192);
  f.put(0, pattern(8192));
  auto d = open_file(f.path, {});
  REQUIRE(::truncate(f.path.c_str(), 4096) == 0);
  const Error e = error_of([&] { read(*d, 0, 8192); });
  CHECK(e.errc() == std::errc::io_error);
  const std::string what = e.what();
  CHECK(what.find(f.path) != std::string::npos);
  CHECK(what.find("offset 0") != std::string::npos);
  CHECK(what.find("wanted 8192 bytes, got 4096") != std::string::npos);
}

TEST_CASE("file: extents of a file with a hole in the middle and at the end") {
  TempFile f(512 * KiB);
  f.put(0, pattern(64 * KiB));
  f.put(192 * KiB, pattern(64 * KiB));
  // [0,64K) data, [64K,192K) hole, [192K,256K) data, [256K,512K) hole to EOF.
  auto d = open_file(f.path, {});
  CHECK(run(d->extents(0, 512 * KiB)) == std::vector<Extent>{{64 * KiB, ExtentKind::data},
                                                             {128 * KiB, ExtentKind::hole},
                                                             {64 * KiB, ExtentKind::data},
                                                             {256 * KiB, ExtentKind::hole}});
  CHECK(run(d->extents(1000, 100000)) ==
        std::vector<Extent>{{64 * KiB - 1000, ExtentKind::data},
                            {100000 - (64 * KiB - 1000), ExtentKind::hole}});
  CHECK(run(d->extents(300 * KiB, 10)) == std::vector<Extent>{{10, ExtentKind::hole}});
  CHECK(run(d->extents(200 * KiB, 1)) == std::vector<Extent>{{1, ExtentKind::data}});
  CHECK(all_zero(read(*d, 64 * KiB, 128 * KiB)));
}

TEST_CASE("file: extents stop at 1024 per call and the rest comes on the next call") {
  const uint64_t unit = 4 * KiB, units = 3000;
  TempFile f(units * unit);
  {
    const int fd = ::open(f.path.c_str(), O_WRONLY);
    REQUIRE(fd >= 0);
    const auto block = pattern(unit);
    for (uint64_t i = 0; i < units; i += 2) {
      REQUIRE(::pwrite(fd, block.data(), unit, static_cast<off_t>(i * unit)) == ssize_t(unit));
    }
    ::close(fd);
  }
  auto d = open_file(f.path, {});
  uint64_t pos = 0;
  std::size_t calls = 0, total = 0;
  while (pos < d->size()) {
    const auto extents = run(d->extents(pos, d->size() - pos));
    REQUIRE(!extents.empty());
    CHECK(extents.size() <= 1024);
    for (const Extent& e : extents) {
      CHECK(e.length == unit);
      CHECK(e.kind == ((pos / unit) % 2 == 0 ? ExtentKind::data : ExtentKind::hole));
      pos += e.length;
    }
    total += extents.size();
    ++calls;
  }
  CHECK(pos == d->size());
  CHECK(total == units);
  CHECK(calls == 3);
}

TEST_CASE("file: trim punches a hole into a fully allocated file") {
  TempFile f(1024 * KiB);
  f.put(0, pattern(1024 * KiB));
  auto d = open_file(f.path, {});
  // Fully allocated: one data extent, no matter what, and callers need not ask.
  CHECK(run(d->extents(0, d->size())) == std::vector<Extent>{{d->size(), ExtentKind::data}});
  CHECK_FALSE(d->may_have_holes());
  const uint64_t before = f.allocated();
  run(d->trim(256 * KiB, 256 * KiB, {}));
  CHECK(d->may_have_holes());
  CHECK(f.allocated() == before - 256 * KiB);
  CHECK(all_zero(read(*d, 256 * KiB, 256 * KiB)));  // holes read as zero
  CHECK(run(d->extents(0, d->size())) == std::vector<Extent>{{256 * KiB, ExtentKind::data},
                                                             {256 * KiB, ExtentKind::hole},
                                                             {512 * KiB, ExtentKind::data}});
  run(d->trim(0, 4096, {.fua = true}));
  CHECK(f.allocated() == before - 256 * KiB - 4096);
}

TEST_CASE("file: zero punches a hole, or with no_hole keeps the range allocated") {
  TempFile f(1024 * KiB);
  const auto data = pattern(1024 * KiB);
  f.put(0, data);
  auto d = open_file(f.path, {});
  const uint64_t before = f.allocated();

  run(d->zero(128 * KiB, 128 * KiB, {.no_hole = true}));
  CHECK(all_zero(read(*d, 128 * KiB, 128 * KiB)));
  CHECK(f.allocated() == before);

  run(d->zero(512 * KiB, 128 * KiB, {.fua = true}));
  CHECK(all_zero(read(*d, 512 * KiB, 128 * KiB)));
  CHECK(f.allocated() == before - 128 * KiB);

  // Unaligned edges are zeroed exactly; the bytes around are untouched.
  run(d->zero(700 * KiB + 3, 5000, {.fast = true}));
  auto around = read(*d, 700 * KiB, 5010);
  CHECK(std::equal(around.begin(), around.begin() + 3, data.begin() + 700 * KiB));
  CHECK(all_zero({around.begin() + 3, around.begin() + 5003}));
  CHECK(std::equal(around.begin() + 5003, around.end(), data.begin() + 700 * KiB + 5003));
  CHECK(f.get(0, 128 * KiB) == std::vector<std::byte>(data.begin(), data.begin() + 128 * KiB));
}

TEST_CASE("file: fast zero with no_hole on tmpfs fails with ENOTSUP and touches nothing" *
          doctest::skip(!tmpfs_without_zero_range())) {
  TempFile f(256 * KiB, "/dev/shm");
  const auto data = pattern(256 * KiB, 7);
  f.put(0, data);
  auto d = open_file(f.path, {});
  for (int attempt = 0; attempt < 2; ++attempt) {  // the second one answers without a syscall
    const Error e = error_of([&] { run(d->zero(4096, 8192, {.no_hole = true, .fast = true})); });
    CHECK(e.errc() == std::errc::operation_not_supported);
    CHECK(std::string(e.what()).find(f.path) != std::string::npos);
    CHECK(read(*d, 0, data.size()) == data);
  }
  // Slow zero falls back to writing zeroes, and the range stays allocated.
  const uint64_t before = f.allocated();
  run(d->zero(4096, 8192, {.no_hole = true}));
  CHECK(all_zero(read(*d, 4096, 8192)));
  CHECK(f.allocated() == before);
  // Without no_hole, tmpfs punches: fast zero succeeds.
  run(d->zero(64 * KiB, 64 * KiB, {.fast = true}));
  CHECK(all_zero(read(*d, 64 * KiB, 64 * KiB)));
  CHECK(f.allocated() == before - 64 * KiB);
}

TEST_CASE("file: a read-only device refuses writes, trims and zeroes with EPERM") {
  TempFile f(64 * KiB);
  f.put(0, pattern(64 * KiB));
  auto d = open_file(f.path, {.read_only = true});
  CHECK(error_of([&] { run(d->write(0, pattern(10), {})); }).errc() ==
        std::errc::operation_not_permitted);
  CHECK(error_of([&] { run(d->trim(0, 4096, {})); }).errc() == std::errc::operation_not_permitted);
  CHECK(error_of([&] { run(d->zero(0, 4096, {})); }).errc() == std::errc::operation_not_permitted);
  CHECK(read(*d, 0, 64 * KiB) == pattern(64 * KiB));
  run(d->flush());
}

TEST_CASE("file: resize grows the file with zeroes and shrinks it, read-only refuses") {
  TempFile f(64 * KiB);
  f.put(0, pattern(64 * KiB));
  auto d = open_file(f.path, {});
  run(d->resize(200 * KiB));
  CHECK(d->size() == 200 * KiB);
  CHECK(read(*d, 0, 64 * KiB) == pattern(64 * KiB));
  CHECK(all_zero(read(*d, 64 * KiB, 136 * KiB)));
  // The new end is a hole, and extents() says so although the file was fully allocated.
  CHECK(run(d->extents(64 * KiB, 136 * KiB)) == std::vector<Extent>{{136 * KiB, ExtentKind::hole}});
  run(d->write(150 * KiB, pattern(100, 1), {}));
  CHECK(f.get(150 * KiB, 100) == pattern(100, 1));
  run(d->resize(32 * KiB));
  CHECK(d->size() == 32 * KiB);
  run(d->flush());
  auto again = open_file(f.path, {.read_only = true});
  CHECK(again->size() == 32 * KiB);
  CHECK(error_of([&] { run(again->resize(64 * KiB)); }).errc() ==
        std::errc::operation_not_permitted);
}

TEST_CASE("file: grow extends the file and writes its tail in one step") {
  TempFile f(64 * KiB);
  f.put(0, pattern(64 * KiB));
  auto d = open_file(f.path, {});
  const auto tail = pattern(512, 7);
  run(d->grow(200 * KiB, tail));
  CHECK(d->size() == 200 * KiB);
  CHECK(f.get(200 * KiB - 512, 512) == tail);
  CHECK(read(*d, 0, 64 * KiB) == pattern(64 * KiB));
  CHECK(all_zero(read(*d, 64 * KiB, 136 * KiB - 512)));
  auto again = open_file(f.path, {.read_only = true});
  CHECK(again->size() == 200 * KiB);
  CHECK(error_of([&] { run(again->grow(300 * KiB, tail)); }).errc() ==
        std::errc::operation_not_permitted);
}

TEST_CASE("file: open errors say what is wrong and what to do") {
  TempFile dir_holder(0);
  const std::string missing = dir_holder.path + "-missing.img";
  Error e = error_of([&] { open_file(missing, {}); });
  CHECK(e.errc() == std::errc::no_such_file_or_directory);
  CHECK(std::string(e.what()) == "file: " + missing + ": No such file or directory");

  for (bool read_only : {false, true}) {
    CAPTURE(read_only);
    e = error_of([&] { open_file(temp_dir(), {.read_only = read_only}); });
    CHECK(e.errc() == std::errc::is_a_directory);
    CHECK(std::string(e.what()) ==
          "file: " + temp_dir() + ": is a directory, not an image file or block device");
  }

  // A FIFO must be refused, not block the open.
  const std::string fifo = dir_holder.path + "-fifo";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  e = error_of([&] { open_file(fifo, {.read_only = true}); });
  ::unlink(fifo.c_str());
  CHECK(e.errc() == std::errc::invalid_argument);
  CHECK(std::string(e.what()) == "file: " + fifo + ": not a regular file or a block device");
  CHECK(error_of([&] { open_file("/dev/null", {}); }).errc() == std::errc::invalid_argument);
}

TEST_CASE("file: permission denied suggests --read-only" * doctest::skip(::geteuid() == 0)) {
  TempFile f(4096);
  REQUIRE(::chmod(f.path.c_str(), 0444) == 0);
  const Error e = error_of([&] { open_file(f.path, {}); });
  CHECK(e.errc() == std::errc::permission_denied);
  CHECK(std::string(e.what()) ==
        "file: " + f.path + ": Permission denied (use --read-only to serve it read-only)");
  CHECK(open_file(f.path, {.read_only = true})->size() == 4096);
}

TEST_CASE("file: concurrent requests from several threads") {
  TempFile f(64 * 5000);
  auto d = open_file(f.path, {});
  asio::io_context context;
  std::atomic<int> ok{0};
  for (int i = 0; i < 64; ++i) {
    asio::co_spawn(
        context,
        [d, i, &ok]() -> asio::awaitable<void> {
          const auto data = pattern(4999, i);
          const uint64_t at = static_cast<uint64_t>(i) * 5000;
          for (int round = 0; round < 10; ++round) {
            co_await d->write(at, data, {.fua = round % 3 == 0});
            std::vector<std::byte> back(data.size());
            co_await d->read(at, back);
            if (back != data) co_return;
          }
          co_await d->flush();
          ++ok;
        },
        [](std::exception_ptr e) { CHECK(!e); });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&context] { context.run(); });
  for (auto& t : threads) t.join();
  CHECK(ok == 64);
}
