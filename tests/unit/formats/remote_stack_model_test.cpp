// The model test of the remote stack (issue 6): cow over cache over a slow remote, as
// `imagenbd serve --cache --overlay` builds it, driven by thousands of seeded random
// reads, writes (aligned and not, 1 byte to several blocks), zeroes, trims, prefetches,
// flushes, clean restarts and crashes, compared at every read with a plain in-memory
// reference disk. The cache has a cap of a few chunks, so evictions run all along.
//
// Restarts reopen every layer from its files: the remote (a fresh view of the same
// object), the cache (its sparse file and PATH.meta) and the overlay file. Crashes:
// the overlay file is a PowerLossFile, a memory double that keeps what was flushed and
// may lose any subset of the writes since; the cache's files are copied as a killed
// process leaves them (every pwrite there, PATH.meta as last saved) and the copies are
// opened. After a crash the overlay must read, at every byte, what it held at the last
// flush or data written there since (zeroes for zero/trim): every acknowledged write
// before the last flush survives and nothing that was never written appears.
//
// A second part runs concurrent coroutines on two threads over the same stack.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "backends/cache.hpp"
#include "backends/error.hpp"
#include "backends/remote_metrics.hpp"
#include "formats/cow.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/slow_remote.hpp"
#include "tests/unit/support/temp_dir.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::run;
using imagenbd::test::SlowRemote;
using imagenbd::test::TempDir;
namespace asio = boost::asio;

namespace {

using Bytes = std::vector<std::byte>;

constexpr uint32_t block_size = 4096;  // the overlay's
constexpr uint32_t chunk = 16384;      // the cache's
constexpr uint64_t cap = 12 * chunk;   // the cache's size cap
constexpr const char* identity = "slow://remote/disk.img";

// An overlay file in memory that a crash can take back to its last flush plus any subset
// of the writes since (a power loss persists unflushed writes in any order). Size changes
// are kept (file metadata that fdatasync orders before the data needing it).
class PowerLossFile final : public BlockDevice {
 public:
  explicit PowerLossFile(Bytes bytes = {}) : durable_(bytes), current_(std::move(bytes)) {}

  Bytes crash_image(std::mt19937_64& rng) {
    std::lock_guard lock(mutex_);
    Bytes out = durable_;
    for (const auto& w : since_flush_) {
      if (w.resize) {
        out.resize(w.offset);
      } else if (rng() % 2 == 0) {
        if (out.size() < w.offset + w.data.size()) out.resize(w.offset + w.data.size());
        std::copy(w.data.begin(), w.data.end(),
                  out.begin() + static_cast<std::ptrdiff_t>(w.offset));
      }
    }
    return out;
  }

  std::string_view name() const override { return "powerloss"; }
  std::string describe() const override { return "overlay.cow"; }
  uint64_t size() const override {
    std::lock_guard lock(mutex_);
    return current_.size();
  }
  Caps caps() const override {
    Caps c;
    c.writable = c.flush = c.trim = c.zero = true;
    return c;
  }
  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    std::lock_guard lock(mutex_);
    in_bounds(offset, out.size());
    std::memcpy(out.data(), current_.data() + offset, out.size());
    co_return;
  }
  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    put(offset, Bytes(in.begin(), in.end()));
    if (flags.fua) co_await flush();
  }
  asio::awaitable<void> flush() override {
    std::lock_guard lock(mutex_);
    durable_ = current_;
    since_flush_.clear();
    co_return;
  }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags) override {
    put(offset, Bytes(length));
    co_return;
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags) override {
    put(offset, Bytes(length));
    co_return;
  }
  asio::awaitable<std::vector<Extent>> extents(uint64_t, uint64_t length) override {
    co_return std::vector<Extent>{{length, ExtentKind::data}};
  }
  asio::awaitable<void> prefetch(uint64_t, uint64_t) override { co_return; }
  asio::awaitable<void> resize(uint64_t new_size) override {
    std::lock_guard lock(mutex_);
    current_.resize(new_size);
    durable_.resize(new_size);
    since_flush_.push_back({new_size, {}, true});
    co_return;
  }

 private:
  struct Write {
    uint64_t offset;  // resize: the new size
    Bytes data;
    bool resize = false;
  };
  // Throws (doctest's REQUIRE is not thread-safe).
  void in_bounds(uint64_t offset, uint64_t length) const {
    if (offset + length > current_.size())
      throw std::logic_error("powerloss: I/O past the end of the overlay file");
  }
  void put(uint64_t offset, Bytes data) {
    std::lock_guard lock(mutex_);
    in_bounds(offset, data.size());
    std::copy(data.begin(), data.end(), current_.begin() + static_cast<std::ptrdiff_t>(offset));
    since_flush_.push_back({offset, std::move(data)});
  }

  mutable std::mutex mutex_;
  Bytes durable_;
  Bytes current_;
  std::vector<Write> since_flush_;
};

Bytes random_bytes(std::mt19937_64& rng, std::size_t n) {
  Bytes v(n);
  for (auto& b : v) b = std::byte(rng() & 0xff);
  return v;
}

uint64_t allocated_bytes(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

// Copies a file as it is, leaving all-zero 4 KiB blocks as holes (the cache file is sparse
// and its allocation is checked against the cap).
void copy_sparse(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(in >= 0);
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  REQUIRE(out >= 0);
  struct stat st {};
  REQUIRE(::fstat(in, &st) == 0);
  REQUIRE(::ftruncate(out, st.st_size) == 0);
  std::vector<char> buf(4096);
  const std::vector<char> zeroes(4096);
  for (off_t at = 0; at < st.st_size; at += 4096) {
    const ssize_t n = ::pread(in, buf.data(), buf.size(), at);
    REQUIRE(n > 0);
    if (std::memcmp(buf.data(), zeroes.data(), static_cast<std::size_t>(n)) == 0) continue;
    REQUIRE(::pwrite(out, buf.data(), static_cast<std::size_t>(n), at) == n);
  }
  ::close(in);
  ::close(out);
}

// One change since the last flush: what a crash may or may not keep.
struct Change {
  uint64_t offset;
  Bytes data;  // empty: zeroes
  uint64_t length;
};

class Model {
 public:
  Model(uint64_t seed, uint64_t size, const TempDir& dir)
      : rng_(seed), size_(size), dir_(dir), remote_(SlowRemote::make(size, false)) {
    remote_->set_delay(std::chrono::microseconds(20));
    ref_ = random_bytes(rng_, size);
    for (int k = 0; k < 4; ++k) {  // some zero stretches in the image
      const uint64_t at = rng_() % size;
      const uint64_t n = std::min<uint64_t>(size - at, rng_() % 20000);
      std::fill_n(ref_.begin() + static_cast<std::ptrdiff_t>(at), n, std::byte{0});
    }
    run(remote_->bytes().write(0, ref_, {}));
    file_ = std::make_shared<PowerLossFile>();
    run(create_cow(*file_, size, {.block_size = block_size, .identity = identity}));
    open();
    flushed_ref_ = ref_;
  }

  void step() {
    const int dice = static_cast<int>(rng_() % 100);
    if (dice < 35) {
      do_write(false);
    } else if (dice < 38) {
      do_write(true);
    } else if (dice < 58) {
      check_read(rng_() % size_, random_length());
    } else if (dice < 66) {
      do_zero(false);
    } else if (dice < 71) {
      do_zero(true);
    } else if (dice < 75) {
      const uint64_t at = rng_() % size_;
      run(cow_->prefetch(at, std::min<uint64_t>(1 + rng_() % (4 * chunk), size_ - at)));
    } else if (dice < 82) {
      run(cow_->flush());
      flushed();
    } else if (dice < 85) {
      clean_restart();
    } else if (dice < 89) {
      crash();
    } else {
      do_write(false);
    }
    // A chunk over the cap (a fetch lands before the eviction it triggers), and a chunk for
    // the file system's own blocks (ext4's extent tree of a fragmented sparse file).
    const uint64_t allocated = allocated_bytes(cache_path_);
    INFO("cache file allocation ", allocated);
    REQUIRE(allocated <= cap + 2 * chunk);
  }

  void check_all() {
    Bytes got(size_);
    run(cow_->read(0, got));
    REQUIRE(first_difference(got, ref_) == size_);
  }

  // The concurrent part: workers own interleaved 1000-byte slices (up to five share an
  // overlay block, several a cache chunk) and check their own bytes as they go.
  void concurrent(int workers, int ops) {
    constexpr uint64_t slice = 1000;
    std::atomic<int> mismatches{0};
    std::mutex errors_mutex;
    std::vector<std::string> errors;
    asio::io_context context;
    for (int k = 0; k < workers; ++k) {
      auto worker = [&, k, wseed = rng_()]() -> asio::awaitable<void> {
        std::mt19937_64 r(wseed);
        const uint64_t slices = size_ / slice;
        for (int op = 0; op < ops; ++op) {
          uint64_t s = r() % slices;
          s -= s % static_cast<uint64_t>(workers);
          s += static_cast<uint64_t>(k);
          if (s >= slices) continue;
          const uint64_t start = s * slice;
          const uint64_t offset = start + r() % slice;
          const uint64_t length = 1 + r() % (start + slice - offset);
          const auto at = ref_.begin() + static_cast<std::ptrdiff_t>(offset);
          const int what = static_cast<int>(r() % 10);
          if (what < 4) {
            Bytes data = random_bytes(r, length);
            co_await cow_->write(offset, data, {.fua = r() % 16 == 0});
            std::copy(data.begin(), data.end(), at);
          } else if (what < 5) {
            co_await cow_->zero(offset, length, {});
            std::fill_n(at, length, std::byte{0});
          } else if (what < 6) {
            co_await cow_->trim(offset, length, {});
            std::fill_n(at, length, std::byte{0});
          } else if (what < 7) {
            co_await cow_->flush();
          } else if (what < 8) {
            co_await cow_->prefetch(offset, std::min<uint64_t>(2 * chunk, size_ - offset));
          } else {
            Bytes got(length);
            co_await cow_->read(offset, got);
            if (!std::equal(got.begin(), got.end(), at)) ++mismatches;
          }
        }
      };
      asio::co_spawn(context, worker, [&](std::exception_ptr e) {
        if (!e) return;
        std::lock_guard lock(errors_mutex);
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& x) {
          errors.emplace_back(x.what());
        }
      });
    }
    std::thread second([&] { context.run(); });
    context.run();
    second.join();
    if (!errors.empty()) FAIL("a worker failed: ", errors.front());
    CHECK(mismatches.load() == 0);
    check_all();
    run(cow_->flush());
    flushed();
  }

  int crashes = 0;
  int crashes_losing_writes = 0;
  int restarts = 0;
  int remote_reads = 0;  // before the current view of the remote
  const std::shared_ptr<SlowRemote>& remote() const { return remote_; }

 private:
  uint64_t random_length() {
    switch (rng_() % 4) {
      case 0:
        return 1 + rng_() % 16;
      case 1:
        return 1 + rng_() % block_size;
      case 2:
        return block_size * (1 + rng_() % 3);
      default:
        return 1 + rng_() % (3 * chunk);
    }
  }
  std::pair<uint64_t, uint64_t> random_range() {
    uint64_t offset = rng_() % size_;
    uint64_t length = random_length();
    if (rng_() % 2 == 0) {
      offset -= offset % block_size;
      length = (length + block_size - 1) / block_size * block_size;
    }
    return {offset, std::min(length, size_ - offset)};
  }
  static uint64_t first_difference(const Bytes& a, const Bytes& b) {
    return static_cast<uint64_t>(std::mismatch(a.begin(), a.end(), b.begin()).first - a.begin());
  }

  void check_read(uint64_t offset, uint64_t length) {
    length = std::min(length, size_ - offset);
    Bytes got(length, std::byte{0xee});
    run(cow_->read(offset, got));
    const Bytes want(ref_.begin() + static_cast<std::ptrdiff_t>(offset),
                     ref_.begin() + static_cast<std::ptrdiff_t>(offset + length));
    const uint64_t at = first_difference(got, want);
    INFO("read ", offset, "+", length, ": first difference at ", offset + at);
    REQUIRE(at == length);
  }

  void do_write(bool fua) {
    const auto [offset, length] = random_range();
    Bytes data = random_bytes(rng_, length);
    run(cow_->write(offset, data, {.fua = fua}));
    std::copy(data.begin(), data.end(), ref_.begin() + static_cast<std::ptrdiff_t>(offset));
    // Even a FUA write counts as uncertain here: the check allows more, never less.
    changes_.push_back(Change{offset, std::move(data), length});
    check_read(offset, length);
  }

  void do_zero(bool trim) {
    const auto [offset, length] = random_range();
    const WriteFlags flags{.no_hole = rng_() % 3 == 0, .fast = !trim && rng_() % 3 == 0};
    const bool partial = offset % block_size != 0 ||
                         ((offset + length) % block_size != 0 && offset + length != size_);
    try {
      if (trim)
        run(cow_->trim(offset, length, flags));
      else
        run(cow_->zero(offset, length, flags));
    } catch (const Error& e) {
      REQUIRE(flags.fast);
      REQUIRE(partial);
      REQUIRE(e.errc() == std::errc::operation_not_supported);
      return;
    }
    std::fill_n(ref_.begin() + static_cast<std::ptrdiff_t>(offset), length, std::byte{0});
    changes_.push_back(Change{offset, {}, length});
    check_read(offset, length);
  }

  void flushed() {
    flushed_ref_ = ref_;
    changes_.clear();
  }

  void open() {
    cache_path_ = dir_.file("cache" + std::to_string(generation_) + ".img");
    CacheOptions o;
    o.path = cache_path_;
    o.chunk_size = chunk;
    o.max_bytes = cap;
    o.max_fetch = 3 * chunk;
    o.save_every_chunks = 5;
    cache_ = open_cache(remote_, o);
    cow_ = run(open_cow(cache_, file_, {.identity = identity}));
  }

  // Drops every layer; the cache object must really be gone before its file is reopened.
  void close_all() {
    cow_.reset();
    std::weak_ptr<BlockDevice> gone = cache_;
    cache_.reset();
    REQUIRE(gone.expired());
  }

  void clean_restart() {
    ++restarts;
    run(cow_->flush());
    flushed();
    run(cache_->close());
    close_all();
    remote_reads += remote_->reads();
    remote_ = remote_->reopen();
    open();
    CHECK(remote_->reads() == 0);  // opening fetches nothing
    check_all();
  }

  void crash() {
    ++crashes;
    // The cache's files as a killed process leaves them, under new names.
    const std::string old_path = cache_path_;
    ++generation_;
    const std::string new_path = dir_.file("cache" + std::to_string(generation_) + ".img");
    copy_sparse(old_path, new_path);
    if (::access((old_path + ".meta").c_str(), F_OK) == 0)
      copy_sparse(old_path + ".meta", new_path + ".meta");
    auto image = std::make_shared<PowerLossFile>(file_->crash_image(rng_));
    close_all();
    file_ = image;
    remote_reads += remote_->reads();
    remote_ = remote_->reopen();
    open();
    Bytes got(size_);
    run(cow_->read(0, got));
    for (uint64_t i = 0; i < size_; ++i) {
      if (got[i] == flushed_ref_[i]) continue;
      bool allowed = false;
      for (const Change& c : changes_) {
        if (i < c.offset || i >= c.offset + c.length) continue;
        if (got[i] == (c.data.empty() ? std::byte{0} : c.data[i - c.offset])) {
          allowed = true;
          break;
        }
      }
      if (allowed) continue;
      INFO("after a crash, byte ", i, " reads ", int(got[i]), ", was ", int(flushed_ref_[i]),
           " at the last flush, ", int(ref_[i]), " before the crash");
      REQUIRE(allowed);
    }
    crashes_losing_writes += got != ref_;
    ref_ = got;
    flushed();
  }

  std::mt19937_64 rng_;
  uint64_t size_;
  const TempDir& dir_;
  std::shared_ptr<SlowRemote> remote_;
  std::shared_ptr<PowerLossFile> file_;
  std::string cache_path_;
  int generation_ = 0;  // names the cache files; a crash moves to a copy
  DevicePtr cache_;
  DevicePtr cow_;
  Bytes ref_;
  Bytes flushed_ref_;
  std::vector<Change> changes_;  // since the last flush
};

void run_model(uint64_t seed, uint64_t size, int steps) {
  INFO("seed ", seed);
  TempDir dir("remote-stack");
  const auto evictions0 = cache_counters().evictions.load();
  Model m(seed, size, dir);
  for (int i = 0; i < steps; ++i) {
    INFO("step ", i);
    m.step();
    if (i % 200 == 199) m.check_all();
  }
  m.check_all();
  m.concurrent(4, 300);
  CHECK(m.remote()->writes() == 0);  // the overlay never writes below it
  CHECK(m.crashes > 10);
  CHECK(m.restarts > 10);
  const auto evictions = cache_counters().evictions.load() - evictions0;
  CHECK(evictions > 100);
  const int reads = m.remote_reads + m.remote()->reads();
  CHECK(reads > 100);
  MESSAGE("seed ", seed, ": ", m.crashes, " crashes (", m.crashes_losing_writes,
          " lost unflushed writes), ", m.restarts, " restarts, ", evictions, " chunks evicted, ",
          reads, " remote reads");
}

}  // namespace

TEST_CASE("remote stack model: cow over cache over a slow remote, with restarts and crashes") {
  for (uint64_t seed : {1, 2}) run_model(seed, 64 * chunk + 1234, 2000);
}
