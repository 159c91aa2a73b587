// The cache filter (see cache.hpp). Concurrency without a global lock on the data path:
// - present/access bits are atomics (backends/cache_map.hpp); a hit checks its bit and
//   preads the chunk under its shard's shared lock, so eviction (the shard's exclusive lock)
//   never punches a chunk while it is being read; the pread is tried inline first
//   (RWF_NOWAIT: warm reads served from the page cache without a trip to the pool);
// - an in-flight table per shard (64 shards by chunk index) makes concurrent misses on one
//   chunk fetch it once: the first reader claims the chunk, later readers wait for it; a
//   failed fetch wakes them with the error and leaves the chunk absent;
// - eviction claims its victims in the same table, so a chunk is never refetched while its
//   hole is being punched.
// - a write (write-through, when the remote is writable) claims the chunks it touches in
//   the same table, waiting for fetches or evictions of them to end, clears their bits,
//   writes the remote, then updates the local copy of the chunks it covers whole or that
//   were present (the rest stay absent) and releases: a fetch never stores bytes older
//   than a write that has returned.
// Version tag: a write changes the remote's (an Azure ETag). Saves record the tag the
// remote reports at the time, read before the bits are snapshotted: every remote write
// that tag includes cleared its bits before it was sent, so the saved bits never name a
// chunk older than the tag. A leaf that learns its new tag only later (Azure: at flush)
// leaves an older tag saved meanwhile: the next start discards the cache, never trusts it.
// Crash safety: data is pwritten before its bit is set; a save snapshots the bits, then
// fdatasyncs the data file, then replaces PATH.meta (write, fsync, rename), so the saved
// bitmap never names a chunk whose data is not on disk; eviction saves the cleared bits
// before it punches holes. A crash loses at most the bits set since the last save.
// Offloaded work captures a plain `this`: the awaiting coroutine keeps the cache alive
// (the caller's reference, or the prefetch coroutine's own), and a captured shared_ptr
// would be dropped on the pool thread after the caller resumed, keeping a closed cache
// alive in the registry for a moment. GCC 12: offload() awaitables are named before
// co_await (temporaries in a co_await expression may be destroyed twice).
// Limits: local I/O is synchronous inside offload(); a coroutine destroyed while holding a
// claim (io_context stopped mid-fetch) leaves its waiters waiting.
#include "backends/cache.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/cache_map.hpp"
#include "backends/error.hpp"
#include "backends/log.hpp"
#include "backends/nowait_read.hpp"
#include "backends/offload.hpp"
#include "backends/remote_metrics.hpp"

namespace imagenbd::backends {

namespace {

constexpr auto relaxed = std::memory_order_relaxed;
constexpr std::size_t shard_count = 64;
constexpr std::size_t max_queued_prefetches = 64;  // hints waiting for a worker
constexpr uint64_t extents_window = 64u << 20;     // a read-only remote's extents, asked per window

std::string errno_text(int e) {
  return std::generic_category().message(e);
}

// One fetch (or eviction) of a chunk in progress; others wait on it. Waiters resume on
// their own executors with the outcome (an exception_ptr, null on success).
class Pending {
 public:
  asio::awaitable<void> wait() {
    return asio::async_initiate<const asio::use_awaitable_t<>&, void(std::exception_ptr)>(
        [this](auto handler) {
          std::unique_lock lock(mutex_);
          if (done_) {
            auto e = error_;
            lock.unlock();
            auto ex = asio::get_associated_executor(handler);
            asio::post(ex, [h = std::move(handler), e]() mutable { std::move(h)(e); });
            return;
          }
          waiters_.push_back(std::make_unique<Waiter<decltype(handler)>>(std::move(handler)));
        },
        asio::use_awaitable);
  }

  void complete(std::exception_ptr error) {
    std::unique_lock lock(mutex_);
    done_ = true;
    error_ = error;
    auto waiters = std::move(waiters_);
    lock.unlock();
    for (auto& w : waiters) w->resume(error);
  }

 private:
  struct WaiterBase {
    virtual ~WaiterBase() = default;
    virtual void resume(std::exception_ptr e) = 0;
  };
  template <typename Handler>
  struct Waiter final : WaiterBase {
    explicit Waiter(Handler h) : handler(std::move(h)) {}
    void resume(std::exception_ptr e) override {
      auto ex = asio::get_associated_executor(handler);
      asio::post(ex, [h = std::move(handler), e]() mutable { std::move(h)(e); });
    }
    Handler handler;
  };

  std::mutex mutex_;
  bool done_ = false;
  std::exception_ptr error_;
  std::vector<std::unique_ptr<WaiterBase>> waiters_;
};

struct Shard {
  std::shared_mutex mutex;  // shared: a hit's pread; exclusive: claims and evictions
  std::unordered_map<uint64_t, std::shared_ptr<Pending>> pending;
};

class Cache;

// The process-wide registry: cache path -> the live cache object.
std::mutex registry_mutex;
std::map<std::string, std::weak_ptr<Cache>>& registry() {
  static std::map<std::string, std::weak_ptr<Cache>> r;
  return r;
}

class Cache final : public BlockDevice, public std::enable_shared_from_this<Cache> {
 public:
  Cache(DevicePtr remote, const CacheOptions& o, CacheIdentity id, int fd)
      : remote_(std::move(remote)),
        options_(o),
        path_(o.path),
        meta_path_(o.path + ".meta"),
        id_(std::move(id)),
        fd_(fd),
        chunk_(id_.chunk_size),
        map_((id_.size + chunk_ - 1) / chunk_),
        shards_(shard_count),
        // Counted in whole chunks: a cap of the remote's size or more (or none) must hold
        // every chunk, the short last one included, without evicting.
        max_bytes_(o.max_bytes && o.max_bytes < id_.size ? o.max_bytes : map_.chunks() * chunk_),
        max_fetch_(std::max<uint64_t>(o.max_fetch, chunk_)),
        last_save_(std::chrono::steady_clock::now()) {
    caps_ = remote_->caps();
    // Write-through over a writable remote: its write caps are ours.
    if (!caps_.writable) {
      caps_.fua = caps_.trim = caps_.zero = caps_.fast_zero = false;
      caps_.flush = false;
    }
    caps_.cache = true;
    tag_ = id_.version_tag;
  }

  ~Cache() override {
    try {
      if (dirty_.load(relaxed)) save_blocking();
    } catch (const std::exception& e) {
      log::warn("cache: {}: could not save the bitmap at exit: {}", path_, e.what());
    }
    ::close(fd_);  // also drops the flock
  }

  // The identity with the version tag last saved (our own writes change it).
  CacheIdentity identity() const {
    std::lock_guard lock(save_mutex_);
    auto id = id_;
    id.version_tag = tag_;
    return id;
  }
  const std::string& path() const { return path_; }

  // Loads PATH.meta if it matches; otherwise discards the local file's contents.
  // file_size: the local file's size as found, before open set it; a file of another size
  // was created anew or altered, and a bitmap over it would serve zeroes as data.
  void load(uint64_t file_size) {
    std::string why;
    std::vector<std::byte> bytes;
    const int mfd = ::open(meta_path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (mfd < 0) {
      if (errno != ENOENT) why = fmt::format("cannot open {}: {}", meta_path_, errno_text(errno));
    } else {
      struct stat st {};
      if (::fstat(mfd, &st) == 0 && st.st_size < (64 << 20)) {
        bytes.resize(static_cast<std::size_t>(st.st_size));
        if (::pread(mfd, bytes.data(), bytes.size(), 0) != static_cast<ssize_t>(bytes.size()))
          why = fmt::format("cannot read {}", meta_path_);
      } else {
        why = fmt::format("{} is too big or unreadable", meta_path_);
      }
      ::close(mfd);
      if (why.empty()) {
        auto d = decode_cache_meta(bytes);
        if (!d.ok) {
          why = fmt::format("metadata {} is damaged: {}", meta_path_, d.problem);
        } else if (auto change = identity_change(d.identity, id_); !change.empty()) {
          why = change;
        } else if (d.words.size() != map_.word_count()) {
          why = fmt::format("metadata {} has {} bitmap words, expected {}", meta_path_,
                            d.words.size(), map_.word_count());
        } else if (file_size != id_.size) {
          why = fmt::format("the cache file is {} bytes, not {} (new or altered)", file_size,
                            id_.size);
        } else {
          map_.load(d.words);
          punch_absent();
        }
      }
    }
    if (!why.empty() || bytes.empty()) {
      if (!why.empty()) log::info("cache: {}: discarding the cache: {}", path_, why);
      discard();
    }
    cached_chunks_.store(map_.count_present(), relaxed);
    log::debug("cache: {}: over {}, {} of {} chunks of {} bytes present", path_, id_.describe,
               cached_chunks_.load(), map_.chunks(), chunk_);
  }

  std::string_view name() const override { return "cache"; }
  std::string describe() const override { return remote_->describe(); }
  uint64_t size() const override { return id_.size; }
  Caps caps() const override { return caps_; }
  std::string version_tag() const override { return remote_->version_tag(); }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    assert(offset + out.size() <= size());
    if (out.empty()) co_return;
    const uint64_t first = offset / chunk_;
    const uint64_t last = (offset + out.size() - 1) / chunk_;
    // Chunks the page cache holds are read on this thread; a warm read allocates nothing.
    std::vector<uint64_t> todo;
    uint64_t inline_hits = 0;
    for (uint64_t c = first; c <= last; ++c) {
      if (read_local_nowait(c, offset, out) == Local::read)
        ++inline_hits;
      else
        todo.push_back(c);
    }
    cache_counters().hits.fetch_add(inline_hits, relaxed);
    bool first_pass = true;
    while (!todo.empty()) {
      // Hits: chunks whose bit is set, read from the local file on the pool (the page
      // cache did not hold them whole).
      std::vector<uint64_t> hits;
      for (auto c : todo)
        if (map_.present(c)) hits.push_back(c);
      if (!hits.empty()) {
        auto op = offload([this, &hits, offset, out] {
          std::vector<uint64_t> done;
          for (auto c : hits)
            if (read_local(c, offset, out)) done.push_back(c);
          return done;
        });
        auto served = co_await std::move(op);
        if (first_pass) cache_counters().hits.fetch_add(served.size(), relaxed);
        std::erase_if(
            todo, [&](uint64_t c) { return std::binary_search(served.begin(), served.end(), c); });
      }
      first_pass = false;
      if (todo.empty()) break;
      // Misses: claim what nobody fetches yet, wait for the rest.
      std::vector<uint64_t> claimed;
      std::vector<std::shared_ptr<Pending>> waits;
      for (auto c : todo) {
        auto [mine, pending] = claim(c);
        if (mine)
          claimed.push_back(c);
        else if (pending)
          waits.push_back(std::move(pending));
      }
      cache_counters().misses.fetch_add(claimed.size() + waits.size(), relaxed);
      co_await fetch_claimed(claimed, offset, out);
      std::erase_if(
          todo, [&](uint64_t c) { return std::binary_search(claimed.begin(), claimed.end(), c); });
      // Then the chunks others fetched: read from the local file on the next pass (or
      // claimed again if the fetch could not be stored, or the chunk was evicted since).
      for (auto& p : waits) co_await p->wait();
    }
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    if (!caps_.writable) refuse("write", offset, in.size());
    if (in.empty()) co_return;
    co_await write_through(Change::write, offset, in.size(), in, flags);
  }
  // Trimmed bytes are whatever the remote says afterwards: the chunks are dropped.
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    if (!caps_.writable) refuse("trim", offset, length);
    if (length == 0) co_return;
    const std::span<const std::byte> none;
    co_await write_through(Change::trim, offset, length, none, flags);
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    if (!caps_.writable) refuse("zero", offset, length);
    if (length == 0) co_return;
    const std::span<const std::byte> none;
    co_await write_through(Change::zero, offset, length, none, flags);
  }

  // Flushes the remote (when writable), then saves the bitmap with the remote's version
  // tag as it reports it after the flush: what the cache holds survives a restart.
  asio::awaitable<void> flush() override {
    if (caps_.writable) co_await remote_->flush();
    auto op = offload([this] { save_blocking(); });
    co_await std::move(op);
  }

  // Chunks held here are answered as data without asking the remote (a session asks for
  // the extents of every read with structured replies; a live blob answers each with a
  // Get Page Ranges request). The remote describes the runs of chunks not held. Both
  // answers stop where the run ends: callers ask again for the rest.
  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    const uint64_t end = offset + length;
    uint64_t c = offset / chunk_;
    const bool held = map_.present(c);
    while (chunk_end(c) < end && map_.present(c + 1) == held) ++c;
    const uint64_t run = std::min(end, chunk_end(c)) - offset;
    if (held) co_return std::vector<Extent>{{run, ExtentKind::data}};
    if (!caps_.writable) co_return co_await remembered_extents(offset, run);
    auto remote = co_await remote_->extents(offset, run);
    uint64_t covered = 0;
    std::size_t n = 0;
    while (n < remote.size() && covered < run) {
      remote[n].length = std::min(remote[n].length, run - covered);
      covered += remote[n++].length;
    }
    remote.resize(n);
    co_return remote;
  }

  // The remote's extents of [offset, offset + length) (inside one extents window), asked
  // once per window of a read-only remote and remembered: the cache trusts such a remote
  // not to change while it is open (its bytes are validated once, at open), so its layout
  // may be trusted as long. A cold sequential read of a live Azure blob otherwise made a
  // Get Page Ranges request per NBD read. Answers stop at the window's end.
  asio::awaitable<std::vector<Extent>> remembered_extents(uint64_t offset, uint64_t length) {
    const uint64_t w = offset / extents_window;
    const uint64_t w_start = w * extents_window;
    const uint64_t w_end = std::min(size(), w_start + extents_window);
    std::shared_ptr<const std::vector<Extent>> layout;
    {
      std::lock_guard lock(layout_mutex_);
      if (auto it = layouts_.find(w); it != layouts_.end()) layout = it->second;
    }
    if (!layout) {
      std::vector<Extent> all;
      for (uint64_t at = w_start; at < w_end;) {
        auto more = co_await remote_->extents(at, w_end - at);
        if (more.empty()) break;
        for (const auto& e : more) {
          const uint64_t n = std::min(e.length, w_end - at);
          if (n == 0) break;
          all.push_back({n, e.kind});
          at += n;
        }
      }
      layout = std::make_shared<const std::vector<Extent>>(std::move(all));
      std::lock_guard lock(layout_mutex_);
      layouts_.emplace(w, layout);
    }
    // The part of the window's layout inside the request.
    std::vector<Extent> out;
    const uint64_t end = std::min(offset + length, w_end);
    uint64_t at = w_start;
    for (const auto& e : *layout) {
      const uint64_t e_end = at + e.length;
      const uint64_t from = std::max(at, offset);
      const uint64_t to = std::min(e_end, end);
      if (from < to) out.push_back({to - from, e.kind});
      if (e_end >= end) break;
      at = e_end;
    }
    if (out.empty()) out.push_back({end - offset, ExtentKind::data});  // the remote said less
    co_return out;
  }

  // Queues a background fetch of the missing chunks of the range and returns at once.
  // prefetch_width workers take hints in order; a hint is dropped only when max_queued
  // wait already (a readahead window dropped would be fetched chunk by chunk on demand).
  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    if (length == 0 || offset >= size()) co_return;
    bool start_worker = false;
    {
      std::lock_guard lock(prefetch_mutex_);
      if (prefetch_queue_.size() >= max_queued_prefetches) co_return;
      prefetch_queue_.emplace_back(offset, std::min(length, size() - offset));
      if (prefetch_workers_ < options_.prefetch_width) {
        ++prefetch_workers_;
        start_worker = true;
      }
    }
    if (!start_worker) co_return;
    auto ex = co_await asio::this_coro::executor;
    // The worker gets its own reference: the caller may drop the cache before it ends.
    asio::co_spawn(ex, prefetch_worker(shared_from_this()), asio::detached);
  }

  asio::awaitable<void> close() override { co_await flush(); }

  // fill_cache() (cache.hpp): the missing chunks of the range fetched now, awaited.
  asio::awaitable<void> fill(uint64_t offset, uint64_t length) {
    if (length == 0 || offset >= size()) co_return;
    co_await fetch_missing(offset, std::min(length, size() - offset));
  }

 private:
  uint64_t chunk_start(uint64_t c) const { return c * chunk_; }
  uint64_t chunk_end(uint64_t c) const { return std::min(size(), (c + 1) * chunk_); }
  Shard& shard(uint64_t c) { return shards_[c % shard_count]; }

  [[noreturn]] void refuse(const char* what, uint64_t offset, uint64_t length) {
    fail(std::errc::operation_not_permitted,
         "cache: {}: {} of {}+{} refused: the remote is read-only (put a cow overlay above it)",
         path_, what, offset, length);
  }

  enum class Change { write, zero, trim };

  // Claims chunk c for a write: waits while someone fetches or evicts it, then takes it and
  // clears its bit. Returns whether it was present (its local copy is whole and current).
  // Writes claim in ascending order and reads never wait while holding a claim, so two
  // writes cannot wait on each other.
  asio::awaitable<bool> claim_for_write(uint64_t c) {
    for (;;) {
      std::shared_ptr<Pending> busy;
      {
        auto& s = shard(c);
        std::unique_lock lock(s.mutex);  // waits for hits of c in the middle of a pread
        if (auto it = s.pending.find(c); it != s.pending.end()) {
          busy = it->second;
        } else {
          s.pending.emplace(c, std::make_shared<Pending>());
          const bool was_present = map_.clear_present(c);
          if (was_present) cached_chunks_.fetch_sub(1, relaxed);
          co_return was_present;
        }
      }
      try {
        co_await busy->wait();
      } catch (const std::exception&) {
        // A failed fetch left the chunk absent: claim it again.
      }
    }
  }

  // The write path: the remote first, then the local copy of what stays present.
  asio::awaitable<void> write_through(Change change, uint64_t offset, uint64_t length,
                                      std::span<const std::byte> in, WriteFlags flags) {
    assert(offset + length <= size());
    const uint64_t end = offset + length;
    std::vector<uint64_t> chunks;
    std::vector<bool> was_present;
    for (uint64_t c = offset / chunk_; c <= (end - 1) / chunk_; ++c) {
      was_present.push_back(co_await claim_for_write(c));
      chunks.push_back(c);
    }
    std::exception_ptr error;
    try {
      if (change == Change::write)
        co_await remote_->write(offset, in, flags);
      else if (change == Change::zero)
        co_await remote_->zero(offset, length, flags);
      else
        co_await remote_->trim(offset, length, flags);
    } catch (...) {
      error = std::current_exception();
    }
    // After a failed remote call its bytes are unknown: every claimed chunk stays absent.
    std::vector<uint64_t> keep;
    if (!error && change != Change::trim) {
      auto op = offload([&, this] {
        std::vector<uint64_t> kept;
        for (std::size_t i = 0; i < chunks.size(); ++i) {
          const uint64_t c = chunks[i];
          const uint64_t from = std::max(offset, chunk_start(c));
          const uint64_t to = std::min(end, chunk_end(c));
          const bool whole = from == chunk_start(c) && to == chunk_end(c);
          if (!was_present[i] && !whole) continue;
          try {
            if (change == Change::write)
              pwrite_all(in.data() + (from - offset), to - from, from);
            else if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 static_cast<off_t>(from), static_cast<off_t>(to - from)) != 0)
              fail_errno(errno, fmt::format("cache: {}: punching {}+{}", path_, from, to - from));
            kept.push_back(c);
          } catch (const std::exception& e) {
            log::warn("cache: {}: {} (the chunk is fetched again when read)", path_, e.what());
          }
        }
        return kept;
      });
      keep = co_await std::move(op);
    }
    uint64_t added = 0;
    for (auto c : chunks) {
      if (std::binary_search(keep.begin(), keep.end(), c) && map_.set_present(c)) {
        ++added;
        map_.touch(c);
      }
      release(c, nullptr);
    }
    cached_chunks_.fetch_add(added, relaxed);
    dirty_.store(true, relaxed);
    if (error) std::rethrow_exception(error);
    log::data("cache: {}: wrote through {}+{}", path_, offset, length);
    co_await evict_if_needed();
  }

  // Copies the part of chunk c inside [offset, offset + out.size()) from the local file,
  // under the shard's shared lock; false if the chunk is no longer present. Blocking.
  bool read_local(uint64_t c, uint64_t offset, std::span<std::byte> out) {
    const uint64_t from = std::max(offset, chunk_start(c));
    const uint64_t to = std::min(offset + out.size(), chunk_end(c));
    std::shared_lock lock(shard(c).mutex);
    if (!map_.present(c)) return false;
    map_.touch(c);
    pread_all(out.data() + (from - offset), to - from, from);
    return true;
  }

  enum class Local { read, absent, blocked };

  // Copies the part of chunk c inside [offset, offset + out.size()) from the page cache
  // without blocking (RWF_NOWAIT, like the file leaf), under the shard's shared lock if it
  // is free at once. `blocked`: the lock was busy, the page cache did not hold the part
  // whole or the kernel cannot read without blocking; read_local() on the pool then.
  Local read_local_nowait(uint64_t c, uint64_t offset, std::span<std::byte> out) {
    const uint64_t from = std::max(offset, chunk_start(c));
    const uint64_t to = std::min(offset + out.size(), chunk_end(c));
    std::shared_lock lock(shard(c).mutex, std::try_to_lock);
    if (!lock.owns_lock()) return Local::blocked;
    if (!map_.present(c)) return Local::absent;
    if (read_nowait(fd_, from, out.subspan(from - offset, to - from), nowait_reads_) != to - from)
      return Local::blocked;  // the blocking read redoes a short one whole
    map_.touch(c);
    return Local::read;
  }

  void pread_all(std::byte* p, uint64_t n, uint64_t at) {
    while (n > 0) {
      const ssize_t got = ::pread(fd_, p, n, static_cast<off_t>(at));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) fail_errno(errno, fmt::format("cache: {}: read at {}", path_, at));
      if (got == 0)
        fail(std::errc::io_error, "cache: {}: short read at {} (the cache file was truncated?)",
             path_, at);
      p += got;
      n -= static_cast<uint64_t>(got);
      at += static_cast<uint64_t>(got);
    }
  }

  void pwrite_all(const std::byte* p, uint64_t n, uint64_t at) {
    while (n > 0) {
      const ssize_t put = ::pwrite(fd_, p, n, static_cast<off_t>(at));
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) fail_errno(errno, fmt::format("cache: {}: write at {}", path_, at));
      p += put;
      n -= static_cast<uint64_t>(put);
      at += static_cast<uint64_t>(put);
    }
  }

  // {true, null}: c is ours to fetch. {false, p}: someone fetches or evicts it, wait on p.
  // {false, null}: it became present meanwhile (read it on the next pass).
  std::pair<bool, std::shared_ptr<Pending>> claim(uint64_t c) {
    auto& s = shard(c);
    std::unique_lock lock(s.mutex);
    if (auto it = s.pending.find(c); it != s.pending.end()) return {false, it->second};
    if (map_.present(c)) return {false, nullptr};
    s.pending.emplace(c, std::make_shared<Pending>());
    return {true, nullptr};
  }

  void release(uint64_t c, std::exception_ptr error) {
    std::shared_ptr<Pending> p;
    {
      auto& s = shard(c);
      std::unique_lock lock(s.mutex);
      auto it = s.pending.find(c);
      assert(it != s.pending.end());
      p = std::move(it->second);
      s.pending.erase(it);
    }
    p->complete(error);
  }

  // Fetches the claimed chunks (sorted) in runs of adjacent chunks up to max_fetch bytes,
  // copying what falls inside [offset, offset + out.size()) to out. Releases every claim,
  // with the error if a fetch fails (then rethrown).
  asio::awaitable<void> fetch_claimed(const std::vector<uint64_t>& claimed, uint64_t offset,
                                      std::span<std::byte> out) {
    std::size_t i = 0;
    try {
      while (i < claimed.size()) {
        std::size_t n = 1;
        while (i + n < claimed.size() && claimed[i + n] == claimed[i] + n &&
               (n + 1) * chunk_ <= max_fetch_)
          ++n;
        co_await fetch_run(claimed[i], n, offset, out);
        i += n;
      }
    } catch (...) {
      auto e = std::current_exception();
      for (; i < claimed.size(); ++i) release(claimed[i], e);
      std::rethrow_exception(e);
    }
  }

  // One remote read of chunks [first, first + n), stored locally, bits set, claims released.
  asio::awaitable<void> fetch_run(uint64_t first, uint64_t n, uint64_t offset,
                                  std::span<std::byte> out) {
    const uint64_t start = chunk_start(first);
    const uint64_t end = chunk_end(first + n - 1);
    const uint64_t length = end - start;
    const auto buf = std::make_unique_for_overwrite<std::byte[]>(length);
    const uint64_t piece = std::max<uint64_t>(caps_.block_max, 4096);
    for (uint64_t pos = 0; pos < length; pos += piece) {
      co_await remote_->read(start + pos, {buf.get() + pos, std::min(piece, length - pos)});
    }
    cache_counters().bytes_fetched.fetch_add(length, relaxed);
    log::data("cache: {}: fetched {}+{} ({} chunks)", path_, start, length, n);
    if (!out.empty()) {
      const uint64_t from = std::max(start, offset);
      const uint64_t to = std::min(end, offset + out.size());
      if (from < to)
        std::memcpy(out.data() + (from - offset), buf.get() + (from - start), to - from);
    }
    // Stored chunk by chunk, each released as soon as it is in the local file: a reader
    // waiting for the first chunk of a long prefetch does not wait for the whole run.
    auto store = offload([this, &buf, start, first, n] {
      uint64_t stored = 0;
      for (uint64_t c = first; c < first + n; ++c) {
        const uint64_t at = chunk_start(c);
        try {
          pwrite_all(buf.get() + (at - start), chunk_end(c) - at, at);
          if (map_.set_present(c)) {
            ++stored;
            cached_chunks_.fetch_add(1, relaxed);
          }
        } catch (const std::exception& e) {
          // This read has the bytes; the chunk stays absent (waiters fetch it again).
          log::warn("cache: {}: {}", path_, e.what());
        }
        map_.touch(c);
        release(c, nullptr);
      }
      return stored;
    });
    const uint64_t added = co_await std::move(store);
    const auto unsaved = unsaved_.fetch_add(added, relaxed) + added;
    dirty_.store(true, relaxed);
    if (unsaved >= options_.save_every_chunks || save_due()) {
      auto op = offload([this] {
        try {
          save_if_idle();
        } catch (const std::exception& e) {
          log::warn("cache: {}: could not save the bitmap: {}", path_, e.what());
        }
      });
      co_await std::move(op);
    }
    co_await evict_if_needed();
  }

  bool save_due() const {
    std::lock_guard lock(save_mutex_);
    return std::chrono::steady_clock::now() - last_save_ >=
           std::chrono::seconds(options_.save_every_seconds);
  }

  // The background half of prefetch(): claims and fetches whatever is missing and not in
  // flight. Never throws (detached).
  static asio::awaitable<void> prefetch_worker(std::shared_ptr<Cache> self) {
    while (auto hint = self->next_prefetch())
      co_await self->fetch_missing(hint->first, hint->second);
  }

  // The oldest queued hint, or none (and this worker ends).
  std::optional<std::pair<uint64_t, uint64_t>> next_prefetch() {
    std::lock_guard lock(prefetch_mutex_);
    if (prefetch_queue_.empty()) {
      --prefetch_workers_;
      return std::nullopt;
    }
    auto hint = prefetch_queue_.front();
    prefetch_queue_.pop_front();
    return hint;
  }

  asio::awaitable<void> fetch_missing(uint64_t offset, uint64_t length) {
    try {
      std::vector<uint64_t> claimed;
      for (uint64_t c = offset / chunk_; c <= (offset + length - 1) / chunk_; ++c) {
        if (map_.present(c)) continue;
        if (claim(c).first) claimed.push_back(c);
      }
      const std::span<std::byte> nowhere;
      co_await fetch_claimed(claimed, 0, nowhere);
    } catch (const std::exception& e) {
      log::debug("cache: {}: prefetch of {}+{} failed: {}", path_, offset, length, e.what());
    }
  }

  // Evicts least-recently-used chunks (clock / second chance) until the cached bytes are
  // under the cap again. One evictor at a time; others skip (the running one loops).
  // A fetch that finds another evictor running leaves the work to it, so that one checks
  // the cap again after letting go: bits set meanwhile are not left over the cap.
  asio::awaitable<void> evict_if_needed() {
    while (cached_chunks_.load(relaxed) * chunk_ > max_bytes_) {
      if (evicting_.exchange(true)) co_return;
      const bool progress = co_await evict_round();
      evicting_.store(false);
      if (!progress) co_return;  // everything left is in flight: the next fetch tries again
    }
  }

  // One evictor's work; whether it evicted anything.
  asio::awaitable<bool> evict_round() {
    bool progress = false;
    try {
      // Evict an extra eighth of the cap, so saves and punches come in batches.
      const uint64_t target = max_bytes_ - max_bytes_ / 8;
      while (cached_chunks_.load(relaxed) * chunk_ > max_bytes_) {
        std::vector<uint64_t> victims;
        const uint64_t chunks = map_.chunks();
        for (uint64_t step = 0; step < 2 * chunks; ++step) {
          if ((cached_chunks_.load(relaxed) - victims.size()) * chunk_ <= target) break;
          const uint64_t c = hand_++ % chunks;
          if (!map_.present(c) || map_.take_access(c)) continue;
          auto& s = shard(c);
          std::unique_lock lock(s.mutex);  // waits for readers of c in the middle of a pread
          if (s.pending.contains(c) || !map_.present(c)) continue;
          s.pending.emplace(c, std::make_shared<Pending>());
          map_.clear_present(c);
          victims.push_back(c);
        }
        if (victims.empty()) break;
        progress = true;
        cached_chunks_.fetch_sub(victims.size(), relaxed);
        std::exception_ptr error;
        try {
          // The cleared bits reach PATH.meta before the holes are punched.
          auto op = offload([this, &victims] {
            save_blocking();
            for (auto c : victims) punch(c);
          });
          co_await std::move(op);
        } catch (...) {
          error = std::current_exception();
        }
        cache_counters().evictions.fetch_add(victims.size(), relaxed);
        for (auto c : victims) release(c, nullptr);  // absent now: waiters fetch it again
        if (error) std::rethrow_exception(error);
      }
    } catch (const std::exception& e) {
      log::warn("cache: {}: eviction failed: {}", path_, e.what());
    }
    co_return progress;
  }

  // Punches the data of chunks the loaded bitmap does not name: a killed process leaves
  // chunks stored after its last save, which nothing would ever evict (they are not
  // counted), so the file would outgrow the cap restart after restart. Only the file's
  // data extents are visited (SEEK_DATA). Best effort: a failure is logged.
  void punch_absent() {
    const auto size = static_cast<off_t>(id_.size);
    off_t at = 0;
    while (at < size) {
      const off_t data = ::lseek(fd_, at, SEEK_DATA);
      if (data < 0) break;  // ENXIO: no data after `at`
      off_t hole = ::lseek(fd_, data, SEEK_HOLE);
      if (hole < 0) hole = size;
      for (uint64_t c = static_cast<uint64_t>(data) / chunk_;
           c < map_.chunks() && chunk_start(c) < static_cast<uint64_t>(hole); ++c) {
        if (map_.present(c)) continue;
        try {
          punch(c);
        } catch (const std::exception& e) {
          log::warn("cache: {}: {}", path_, e.what());
          return;
        }
      }
      at = hole;
    }
  }

  void punch(uint64_t c) {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(chunk_start(c)),
                    static_cast<off_t>(chunk_end(c) - chunk_start(c))) != 0)
      fail_errno(errno, fmt::format("cache: {}: punching chunk {}", path_, c));
  }

  // Saves unless another save is running (it will have the bits, or the next one will).
  void save_if_idle() {
    std::unique_lock lock(save_mutex_, std::try_to_lock);
    if (lock.owns_lock()) save_locked();
  }

  void save_blocking() {
    std::unique_lock lock(save_mutex_);
    save_locked();
  }

  // Order matters (see the head of this file): bits, then fdatasync of the data, then the
  // metadata replaced atomically.
  void save_locked() {
    unsaved_.store(0, relaxed);
    dirty_.store(false, relaxed);
    // The tag before the bits (see the head of this file).
    auto id = id_;
    id.version_tag = remote_->version_tag();
    const auto words = map_.snapshot();
    if (::fdatasync(fd_) != 0) fail_errno(errno, fmt::format("cache: {}: fdatasync", path_));
    const auto bytes = encode_cache_meta(id, words);
    const std::string tmp = meta_path_ + ".tmp";
    const int mfd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (mfd < 0) fail_errno(errno, fmt::format("cache: {}: creating {}", path_, tmp));
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t put = ::write(mfd, bytes.data() + done, bytes.size() - done);
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) {
        const int e = errno;
        ::close(mfd);
        fail_errno(e, fmt::format("cache: {}: writing {}", path_, tmp));
      }
      done += static_cast<std::size_t>(put);
    }
    if (::fsync(mfd) != 0) {
      const int e = errno;
      ::close(mfd);
      fail_errno(e, fmt::format("cache: {}: fsync {}", path_, tmp));
    }
    ::close(mfd);
    if (::rename(tmp.c_str(), meta_path_.c_str()) != 0)
      fail_errno(errno, fmt::format("cache: {}: renaming {} to {}", path_, tmp, meta_path_));
    last_save_ = std::chrono::steady_clock::now();
    if (id.version_tag != tag_) {
      log::debug("cache: {}: version tag now \"{}\" (was \"{}\")", path_, id.version_tag, tag_);
      tag_ = std::move(id.version_tag);
    }
  }

  // Empties the cache: the metadata goes first (so a crash in between leaves no bitmap
  // that names punched data), then every byte of the local file.
  void discard() {
    ::unlink(meta_path_.c_str());
    map_.load(std::vector<uint64_t>(map_.word_count(), 0));
    if (::ftruncate(fd_, 0) != 0 || ::ftruncate(fd_, static_cast<off_t>(id_.size)) != 0)
      fail_errno(errno, fmt::format("cache: {}: resetting the cache file", path_));
  }

  DevicePtr remote_;
  const CacheOptions options_;
  const std::string path_;
  const std::string meta_path_;
  const CacheIdentity id_;
  const int fd_;
  const uint64_t chunk_;
  Caps caps_;
  CacheMap map_;
  std::vector<Shard> shards_;
  const uint64_t max_bytes_;
  const uint64_t max_fetch_;
  std::atomic<uint64_t> cached_chunks_{0};
  std::atomic<uint64_t> unsaved_{0};
  std::atomic<bool> dirty_{false};
  std::atomic<bool> nowait_reads_{true};  // false once the kernel refuses RWF_NOWAIT here
  std::atomic<bool> evicting_{false};
  uint64_t hand_ = 0;  // the clock hand; only the evictor moves it
  std::mutex prefetch_mutex_;
  std::deque<std::pair<uint64_t, uint64_t>> prefetch_queue_;  // hints (offset, length)
  unsigned prefetch_workers_ = 0;                             // under prefetch_mutex_
  std::mutex layout_mutex_;
  // extents window -> the read-only remote's extents of it (remembered_extents)
  std::unordered_map<uint64_t, std::shared_ptr<const std::vector<Extent>>> layouts_;
  mutable std::mutex save_mutex_;
  std::chrono::steady_clock::time_point last_save_;  // under save_mutex_
  std::string tag_;  // the version tag last saved (id_'s at open); under save_mutex_
};

}  // namespace

uint32_t cache_chunk_size(const BlockDevice& remote, const CacheOptions& o) {
  if (o.chunk_size == 0) {
    const uint32_t preferred = remote.caps().block_preferred;
    return preferred >= (64u << 10) && std::has_single_bit(preferred) ? preferred : 1u << 20;
  }
  if (!std::has_single_bit(o.chunk_size) || o.chunk_size < 4096)
    fail(std::errc::invalid_argument,
         "cache: {}: chunk size {} is not a power of two of at least 4096 bytes", o.path,
         o.chunk_size);
  return o.chunk_size;
}

DevicePtr open_cache(DevicePtr remote, const CacheOptions& options) {
  if (options.path.empty()) fail(std::errc::invalid_argument, "cache: no cache file path given");
  CacheIdentity id{remote->describe(), remote->size(), remote->version_tag(),
                   cache_chunk_size(*remote, options)};
  std::error_code ec;
  auto canonical = std::filesystem::weakly_canonical(options.path, ec);
  const std::string key = ec ? options.path : canonical.string();

  std::lock_guard lock(registry_mutex);
  auto& reg = registry();
  if (auto it = reg.find(key); it != reg.end()) {
    if (auto existing = it->second.lock()) {
      if (existing->identity() == id) return existing;
      fail(std::errc::device_or_resource_busy,
           "cache: {}: already in use for {} ({}); give each remote object its own cache file",
           options.path, existing->identity().describe, identity_change(existing->identity(), id));
    }
  }
  const int fd = ::open(options.path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) fail_errno(errno, fmt::format("cache: {}", options.path));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int e = errno;
    ::close(fd);
    if (e == EWOULDBLOCK)
      fail(std::errc::device_or_resource_busy,
           "cache: {}: in use by another process (one cache file per server)", options.path);
    fail_errno(e, fmt::format("cache: {}: flock", options.path));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(std::errc::invalid_argument, "cache: {}: not a regular file", options.path);
  }
  auto cache = std::make_shared<Cache>(std::move(remote), options, std::move(id), fd);
  if (static_cast<uint64_t>(st.st_size) != cache->size() &&
      ::ftruncate(fd, static_cast<off_t>(cache->size())) != 0)
    fail_errno(errno, fmt::format("cache: {}: setting the size", options.path));
  cache->load(static_cast<uint64_t>(st.st_size));
  reg[key] = cache;
  return cache;
}

asio::awaitable<void> fill_cache(DevicePtr device, uint64_t offset, uint64_t length) {
  if (auto cache = std::dynamic_pointer_cast<Cache>(device))
    co_await cache->fill(offset, length);
  else
    co_await device->prefetch(offset, length);
}

}  // namespace imagenbd::backends
