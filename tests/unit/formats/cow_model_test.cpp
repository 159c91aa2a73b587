// The model test of the copy-on-write overlay (issue 6): thousands of seeded random reads,
// writes (aligned and not, 1 byte to several blocks), trims, zeroes (fast, no_hole), FUA
// writes, flushes, clean restarts and crashes against cow over a read-only lower memory
// disk, compared at every step with a plain in-memory reference disk.
//
// Crashes: the overlay file is a CrashFile, a memory double that logs every write, resize
// and flush and can rebuild its bytes as of any point of that log: everything up to the
// last flush before the point, plus a prefix or any subset of the writes after it (a power
// loss may persist unflushed writes in any order). The overlay must open from every such
// image; bytes not touched since the last completed cow flush must read as they were then,
// and a touched byte may only read as it was then, as data written to it since, or as
// zero if a zero/trim covered it (never the lower disk's data under a zeroed block, never
// another block's data).
//
// Concurrency: several coroutines on a multi-threaded io_context write, zero and read
// overlapping blocks (each owns interleaved 1000-byte slices, so up to five share a block)
// while others flush; every call to the overlay file goes round the executor's queue, so
// a missing block lock loses updates that the reference catches.
#include "formats/cow.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "tests/unit/support/recording_device.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::RecordingDevice;
using imagenbd::test::run;
namespace asio = boost::asio;

namespace {

using Bytes = std::vector<std::byte>;

// A memory-backed overlay file that can show its bytes as a crash would have left them.
class CrashFile final : public BlockDevice {
 public:
  explicit CrashFile(Bytes bytes, bool yield = false)
      : base_(bytes), current_(std::move(bytes)), yield_(yield) {}

  // Absolute position in the log: the number of events so far.
  uint64_t position() {
    std::lock_guard lock(mutex_);
    return base_position_ + log_.size();
  }

  // The bytes a crash at `position` could leave: every event up to the last flush before
  // it, and of the writes after that flush, all (prefix) or a random subset.
  Bytes image(uint64_t position, bool subset, std::mt19937_64& rng) {
    std::lock_guard lock(mutex_);
    REQUIRE(position >= base_position_);
    const std::size_t end = std::min<std::size_t>(position - base_position_, log_.size());
    std::size_t flushed = 0;  // events before this are durable
    for (std::size_t i = 0; i < end; ++i)
      if (log_[i].kind == Kind::flush) flushed = i + 1;
    Bytes out = base_;
    for (std::size_t i = 0; i < end; ++i) {
      const Event& e = log_[i];
      // A resize is the file's metadata, which fdatasync orders before data that needs it;
      // keeping every one only makes more images openable.
      if (i >= flushed && e.kind != Kind::resize && subset && rng() % 2 == 0) continue;
      apply(out, e);
    }
    return out;
  }

  // Folds the events before `position` into the base image (the model no longer needs to
  // crash before it).
  void rebase(uint64_t position) {
    std::lock_guard lock(mutex_);
    const std::size_t n = std::min<std::size_t>(position - base_position_, log_.size());
    for (std::size_t i = 0; i < n; ++i) apply(base_, log_[i]);
    log_.erase(log_.begin(), log_.begin() + static_cast<std::ptrdiff_t>(n));
    base_position_ += n;
  }

  Bytes bytes() {
    std::lock_guard lock(mutex_);
    return current_;
  }

  std::string_view name() const override { return "crashfile"; }
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
    co_await maybe_yield();
    std::lock_guard lock(mutex_);
    in_bounds(offset, out.size());
    std::memcpy(out.data(), current_.data() + offset, out.size());
  }
  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    co_await maybe_yield();
    {
      std::lock_guard lock(mutex_);
      in_bounds(offset, in.size());
      record(Event{Kind::write, offset, in.size(), Bytes(in.begin(), in.end())});
      if (flags.fua) record(Event{Kind::flush, 0, 0, {}});
    }
    co_await maybe_yield();  // the write is in flight across this point
  }
  asio::awaitable<void> flush() override {
    co_await maybe_yield();
    std::lock_guard lock(mutex_);
    record(Event{Kind::flush, 0, 0, {}});
  }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags) override {
    co_await zero(offset, length, {});
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags) override {
    co_await maybe_yield();
    std::lock_guard lock(mutex_);
    in_bounds(offset, length);
    record(Event{Kind::write, offset, length, Bytes(length)});
  }
  asio::awaitable<std::vector<Extent>> extents(uint64_t, uint64_t length) override {
    co_return std::vector<Extent>{{length, ExtentKind::data}};
  }
  asio::awaitable<void> prefetch(uint64_t, uint64_t) override { co_return; }
  asio::awaitable<void> resize(uint64_t new_size) override {
    co_await maybe_yield();
    std::lock_guard lock(mutex_);
    record(Event{Kind::resize, 0, new_size, {}});
  }

 private:
  enum class Kind { write, flush, resize };
  struct Event {
    Kind kind;
    uint64_t offset;
    uint64_t length;  // resize: the new size
    Bytes data;
  };

  static void apply(Bytes& image, const Event& e) {
    if (e.kind == Kind::resize) image.resize(e.length);
    if (e.kind != Kind::write) return;
    if (image.size() < e.offset + e.length) image.resize(e.offset + e.length);
    std::copy(e.data.begin(), e.data.end(), image.begin() + static_cast<std::ptrdiff_t>(e.offset));
  }
  // Called from worker threads: throws (doctest's REQUIRE is not thread-safe).
  void in_bounds(uint64_t offset, uint64_t length) const {
    if (offset + length > current_.size())
      throw std::logic_error("crashfile: I/O past the end of the overlay file");
  }
  void record(Event e) {
    apply(current_, e);
    log_.push_back(std::move(e));
  }
  asio::awaitable<void> maybe_yield() {
    if (yield_) co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  }

  mutable std::mutex mutex_;
  Bytes base_;
  uint64_t base_position_ = 0;
  std::vector<Event> log_;
  Bytes current_;
  bool yield_;
};

Bytes random_bytes(std::mt19937_64& rng, std::size_t n) {
  Bytes v(n);
  for (auto& b : v) b = std::byte(rng() & 0xff);
  return v;
}

// A lower disk of random bytes with some zero stretches.
std::shared_ptr<BlockDevice> make_lower(std::mt19937_64& rng, uint64_t size, Bytes& contents) {
  contents = random_bytes(rng, size);
  for (int k = 0; k < 4; ++k) {
    const uint64_t at = rng() % size;
    const uint64_t n = std::min<uint64_t>(size - at, rng() % 20000);
    std::fill_n(contents.begin() + static_cast<std::ptrdiff_t>(at), n, std::byte{0});
  }
  auto lower = open_memory(size, "lower");
  run(lower->write(0, contents, {}));
  return lower;
}

// One change since a flush, for deciding what a crash may show.
struct Change {
  uint64_t offset;
  Bytes data;  // empty: zeroes
  uint64_t length;
};

class Model {
 public:
  Model(uint64_t seed, uint32_t block_size, uint64_t size)
      : rng_(seed), block_size_(block_size), size_(size) {
    lower_ = make_lower(rng_, size, ref_);
    lower_rec_ = std::make_shared<RecordingDevice>(lower_);
    file_ = std::make_shared<CrashFile>(Bytes{});
    run(create_cow(*file_, size, {.block_size = block_size, .identity = "lower"}));
    open();
    flushed(/*crash_before_allowed=*/false);
  }

  void step() {
    const int dice = static_cast<int>(rng_() % 100);
    if (dice < 35) {
      do_write(false);
    } else if (dice < 38) {
      do_write(true);
    } else if (dice < 52) {
      check_read(random_offset(), random_length());
    } else if (dice < 62) {
      do_zero(false);
    } else if (dice < 68) {
      do_zero(true);
    } else if (dice < 74) {
      flush_start_ = file_->position();
      run(cow_->flush());
      flushed(true);
    } else if (dice < 77) {
      check_extents();
    } else if (dice < 79) {
      clean_restart();
    } else if (dice < 83) {
      crash();
    } else {
      do_write(false);
    }
  }

  void check_all() {
    Bytes got(size_);
    run(cow_->read(0, got));
    REQUIRE(first_difference(got, ref_) == size_);
  }

  void check_lower_untouched() {
    for (const std::string& call : lower_rec_->calls()) {
      INFO(call);
      REQUIRE((call.starts_with("read") || call.starts_with("extents")));
    }
  }

  int crashes = 0;
  int crash_images_with_lost_writes = 0;

 private:
  uint64_t random_offset() { return rng_() % size_; }
  // 1 byte up to several blocks; often whole aligned blocks.
  uint64_t random_length() {
    switch (rng_() % 4) {
      case 0:
        return 1 + rng_() % 16;
      case 1:
        return 1 + rng_() % block_size_;
      case 2:
        return block_size_ * (1 + rng_() % 3);
      default:
        return 1 + rng_() % (4 * block_size_);
    }
  }
  // Offset and length clipped to the disk, aligned to blocks half of the time.
  std::pair<uint64_t, uint64_t> random_range() {
    uint64_t offset = random_offset();
    uint64_t length = random_length();
    if (rng_() % 2 == 0) {
      offset -= offset % block_size_;
      length = (length + block_size_ - 1) / block_size_ * block_size_;
    }
    length = std::min(length, size_ - offset);
    return {offset, length};
  }

  static uint64_t first_difference(const Bytes& a, const Bytes& b) {
    const auto [x, y] = std::mismatch(a.begin(), a.end(), b.begin());
    return static_cast<uint64_t>(x - a.begin());
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
    flush_start_ = file_->position();
    run(cow_->write(offset, data, {.fua = fua}));
    std::copy(data.begin(), data.end(), ref_.begin() + static_cast<std::ptrdiff_t>(offset));
    note(Change{offset, std::move(data), length});
    if (fua) flushed(true);
  }

  void do_zero(bool trim) {
    const auto [offset, length] = random_range();
    const WriteFlags flags{
        .fua = rng_() % 8 == 0, .no_hole = rng_() % 3 == 0, .fast = !trim && rng_() % 3 == 0};
    const bool partial = offset % block_size_ != 0 ||
                         ((offset + length) % block_size_ != 0 && offset + length != size_);
    flush_start_ = file_->position();
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
    REQUIRE_FALSE((flags.fast && partial));
    std::fill_n(ref_.begin() + static_cast<std::ptrdiff_t>(offset), length, std::byte{0});
    note(Change{offset, {}, length});
    if (flags.fua) flushed(true);
  }

  // Extents cover the range and zero/hole ones read as zeroes.
  void check_extents() {
    const auto [offset, length] = random_range();
    const auto ext = run(cow_->extents(offset, length));
    REQUIRE_FALSE(ext.empty());
    uint64_t at = offset;
    for (const Extent& e : ext) {
      REQUIRE(e.length > 0);
      REQUIRE(at + e.length <= offset + length);
      if (e.kind != ExtentKind::data) {
        const auto first = ref_.begin() + static_cast<std::ptrdiff_t>(at);
        INFO("extent ", at, "+", e.length, " is not data");
        REQUIRE(std::all_of(first, first + static_cast<std::ptrdiff_t>(e.length),
                            [](std::byte b) { return b == std::byte{0}; }));
      }
      at += e.length;
    }
  }

  void note(Change c) {
    since_prev_.push_back(c);
    since_last_.push_back(std::move(c));
  }

  // A cow flush (or FUA write) completed: what ref_ holds now must survive any crash from
  // here on. Crashes are still tried from the previous flush on (inside this flush).
  void flushed(bool keep_previous) {
    if (keep_previous) {
      prev_ = std::move(last_);
      since_prev_ = std::move(since_last_);
    } else {
      prev_ = Checkpoint{file_->position(), ref_};
      since_prev_.clear();
    }
    since_last_.clear();
    last_ = Checkpoint{file_->position(), ref_, std::max(flush_start_, prev_.position)};
    file_->rebase(prev_.position);
  }

  void open() { cow_ = run(open_cow(lower_rec_, file_, {.identity = "lower"})); }

  void clean_restart() {
    flush_start_ = file_->position();
    run(cow_->flush());
    flushed(true);
    cow_.reset();
    open();
    check_all();
  }

  // Reopens from what a crash could leave and checks it byte by byte; then carries on from
  // what the overlay shows.
  void crash() {
    ++crashes;
    const bool before_last = rng_() % 2 == 0 && last_.position > prev_.position;
    const uint64_t end = file_->position();
    // Most crashes before the last flush fall inside it (its data flush and map
    // writes), where ordering bugs show.
    const uint64_t from = !before_last      ? last_.position
                          : rng_() % 4 != 0 ? std::min(last_.flush_start, last_.position - 1)
                                            : prev_.position;
    const uint64_t to = before_last ? last_.position : end + 1;
    const uint64_t position = from + rng_() % (to - from);
    const bool subset = rng_() % 4 != 0;
    const Bytes base_ref = before_last ? prev_.ref : last_.ref;
    // What may or may not have reached the file by then.
    const std::vector<Change>& uncertain = before_last ? since_prev_ : since_last_;
    INFO("crash at ", position, " (", from, "..", end, "), ", subset ? "subset" : "prefix",
         ", before the last flush: ", before_last);

    auto image = std::make_shared<CrashFile>(file_->image(position, subset, rng_));
    cow_.reset();
    DevicePtr reopened = run(open_cow(lower_rec_, image, {.identity = "lower"}));
    Bytes got(size_);
    run(reopened->read(0, got));
    bool lost = false;
    for (uint64_t i = 0; i < size_; ++i) {
      if (got[i] == base_ref[i]) continue;
      bool allowed = false;
      for (const Change& c : uncertain) {
        if (i < c.offset || i >= c.offset + c.length) continue;
        const std::byte v = c.data.empty() ? std::byte{0} : c.data[i - c.offset];
        if (got[i] == v) {
          allowed = true;
          break;
        }
      }
      if (allowed) continue;
      INFO("byte ", i, " (block ", i / block_size_, ") reads ", int(got[i]), ", was ",
           int(base_ref[i]), " at the flush, lower ", int(lower_byte(i)));
      REQUIRE(allowed);
    }
    for (uint64_t i = 0; i < size_ && !lost; ++i) lost = got[i] != ref_[i];
    crash_images_with_lost_writes += lost;

    // Carry on from the crashed file.
    file_ = image;
    ref_ = got;
    cow_ = reopened;
    flushed(false);
  }

  std::byte lower_byte(uint64_t i) {
    std::byte b;
    run(lower_->read(i, std::span<std::byte>(&b, 1)));
    return b;
  }

  struct Checkpoint {
    uint64_t position = 0;  // in the overlay file's log, when the flush returned
    Bytes ref;
    uint64_t flush_start = 0;  // when the operation that flushed began
  };

  std::mt19937_64 rng_;
  uint32_t block_size_;
  uint64_t size_;
  DevicePtr lower_;
  std::shared_ptr<RecordingDevice> lower_rec_;
  std::shared_ptr<CrashFile> file_;
  DevicePtr cow_;
  Bytes ref_;
  uint64_t flush_start_ = 0;
  Checkpoint prev_, last_;          // the last two completed flushes
  std::vector<Change> since_prev_;  // changes after prev_
  std::vector<Change> since_last_;  // changes after last_
};

void run_model(uint64_t seed, uint32_t block_size, uint64_t size, int steps) {
  INFO("seed ", seed, ", block size ", block_size);
  Model m(seed, block_size, size);
  for (int i = 0; i < steps; ++i) {
    INFO("step ", i);
    m.step();
    if (i % 100 == 99) m.check_all();
  }
  m.check_all();
  m.check_lower_untouched();
  CHECK(m.crashes > 10);
  MESSAGE("seed ", seed, ": ", m.crashes, " crashes, ", m.crash_images_with_lost_writes,
          " of them lost unflushed writes");
}

}  // namespace

TEST_CASE("cow model: random operations, flushes, restarts and crashes, 4 KiB blocks") {
  for (uint64_t seed : {1, 2, 3, 4}) run_model(seed, 4096, 64 * 4096 + 777, 3000);
}

TEST_CASE("cow model: random operations, flushes, restarts and crashes, 64 KiB blocks") {
  for (uint64_t seed : {11, 12}) run_model(seed, 65536, 12 * 65536 + 4095, 2000);
}

// Workers own interleaved 1000-byte slices of the first part of the disk (blocks shared by
// up to five of them) and whole blocks of the rest; each checks its own bytes as it goes.
TEST_CASE("cow model: concurrent overlapping requests on a multi-threaded io_context") {
  constexpr uint32_t block_size = 4096;
  constexpr uint64_t sliced = 32 * block_size;
  constexpr uint64_t size = sliced + 16 * block_size;
  constexpr uint64_t slice = 1000;
  constexpr int workers = 6;
  constexpr int ops = 400;

  for (uint64_t seed : {21, 22, 23}) {
    INFO("seed ", seed);
    std::mt19937_64 rng(seed);
    Bytes ref;
    auto lower = make_lower(rng, size, ref);
    auto lower_rec = std::make_shared<RecordingDevice>(lower, /*yield=*/true);
    auto file = std::make_shared<CrashFile>(Bytes{}, /*yield=*/true);
    run(create_cow(*file, size, {.block_size = block_size, .identity = "lower"}));
    DevicePtr cow = run(open_cow(lower_rec, file, {.identity = "lower"}));

    std::atomic<int> mismatches{0};
    std::mutex errors_mutex;
    std::vector<std::string> errors;
    asio::io_context context;
    auto worker = [&](int k, uint64_t wseed) -> asio::awaitable<void> {
      std::mt19937_64 r(wseed);
      for (int op = 0; op < ops; ++op) {
        uint64_t offset = 0, length = 0;
        if (r() % 4 != 0) {  // inside one of my slices
          const uint64_t slices = sliced / slice;
          uint64_t s = r() % slices;
          s -= s % workers;
          s += static_cast<uint64_t>(k);
          if (s >= slices) s -= workers;
          const uint64_t start = s * slice;
          const uint64_t end = std::min(start + slice, sliced);
          offset = start + r() % (end - start);
          length = 1 + r() % (end - offset);
        } else {  // one of my whole blocks, or part of it
          uint64_t b = r() % 16;
          b -= b % workers;
          b += static_cast<uint64_t>(k);
          if (b >= 16) b -= workers;
          offset = sliced + b * block_size;
          length = block_size;
          if (r() % 2 == 0) {
            offset += r() % block_size;
            length = 1 + r() % (sliced + (b + 1) * block_size - offset);
          }
        }
        const int what = static_cast<int>(r() % 10);
        if (what < 5) {
          Bytes data = random_bytes(r, length);
          co_await cow->write(offset, data, {.fua = r() % 16 == 0});
          std::copy(data.begin(), data.end(), ref.begin() + static_cast<std::ptrdiff_t>(offset));
        } else if (what < 7) {
          co_await cow->zero(offset, length, {});
          std::fill_n(ref.begin() + static_cast<std::ptrdiff_t>(offset), length, std::byte{0});
        } else if (what < 8) {
          co_await cow->trim(offset, length, {});
          std::fill_n(ref.begin() + static_cast<std::ptrdiff_t>(offset), length, std::byte{0});
        } else if (what < 9) {
          co_await cow->flush();
        } else {
          Bytes got(length);
          co_await cow->read(offset, got);
          if (!std::equal(got.begin(), got.end(),
                          ref.begin() + static_cast<std::ptrdiff_t>(offset)))
            ++mismatches;
        }
      }
    };
    for (int k = 0; k < workers; ++k)
      asio::co_spawn(context, worker(k, seed * 100 + static_cast<uint64_t>(k)),
                     [&](std::exception_ptr e) {
                       if (!e) return;
                       std::lock_guard lock(errors_mutex);
                       try {
                         std::rethrow_exception(e);
                       } catch (const std::exception& x) {
                         errors.emplace_back(x.what());
                       }
                     });
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) threads.emplace_back([&] { context.run(); });
    for (auto& t : threads) t.join();

    REQUIRE(errors.empty());
    CHECK(mismatches.load() == 0);
    Bytes got(size);
    run(cow->read(0, got));
    CHECK(got == ref);
    // Everything survives a flush and a restart, and a crash right after the flush.
    run(cow->flush());
    cow.reset();
    auto again =
        run(open_cow(lower, std::make_shared<CrashFile>(file->bytes()), {.identity = "lower"}));
    Bytes after(size);
    run(again->read(0, after));
    CHECK(after == ref);
    for (const std::string& call : lower_rec->calls()) {
      INFO(call);
      CHECK((call.starts_with("read") || call.starts_with("extents")));
    }
  }
}
