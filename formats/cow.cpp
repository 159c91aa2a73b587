// The copy-on-write overlay (formats/cow.hpp has the design and the crash-safety rules).
#include "formats/cow.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backends/async_mutex.hpp"
#include "backends/error.hpp"
#include "backends/log.hpp"

namespace imagenbd::formats {

namespace {

using backends::AsyncMutex;
using backends::Caps;
using backends::Extent;
using backends::ExtentKind;
using backends::fail;
using backends::WriteFlags;

constexpr std::size_t stripes = 256;           // block locks; block i uses i % stripes
constexpr uint64_t map_read_chunk = 4u << 20;  // map bytes per read at open
constexpr uint64_t grow_step = 8u << 20;       // the file grows by at least this much
constexpr uint32_t max_request = 32u << 20;

class Cow final : public CowDevice {
 public:
  Cow(DevicePtr lower, DevicePtr overlay, cow::Layout layout, std::vector<uint64_t> entries,
      cow::MapUse use, uint64_t file_size)
      : lower_(std::move(lower)),
        overlay_(std::move(overlay)),
        layout_(layout),
        map_(std::make_unique<std::atomic<uint64_t>[]>(layout.blocks)),
        disk_map_(std::move(entries)),
        locks_(std::make_unique<AsyncMutex[]>(stripes)),
        free_(std::move(use.free_blocks)),
        next_free_(use.data_end),
        file_size_(file_size),
        words_((layout.blocks + 63) / 64) {
    for (auto& set : changed_) set = std::make_unique<std::atomic<uint64_t>[]>(words_);
    // The changed set is not kept in the file: after a restart every block held here is
    // committed again (idempotent), so nothing written before the restart is missed.
    for (uint64_t i = 0; i < layout_.blocks; ++i) {
      map_[i].store(disk_map_[i]);
      if (disk_map_[i] != cow::entry_absent) set_bit(changed_[0], i);
    }
    caps_.writable = caps_.flush = caps_.fua = caps_.trim = caps_.zero = true;
    caps_.fast_zero = true;  // whole blocks only; partial ones refuse (ENOTSUP)
    caps_.extents = true;
    caps_.cache = lower_->caps().cache;
    caps_.multi_conn = true;
    caps_.block_min = 1;
    caps_.block_preferred = layout_.block_size;
    caps_.block_max = max_request;
    lower_max_ = std::max<uint32_t>(lower_->caps().block_max, 4096);
  }

  std::string_view name() const override { return "cow"; }
  std::string describe() const override { return overlay_->describe(); }
  uint64_t size() const override { return layout_.virtual_size; }
  Caps caps() const override { return caps_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    for (uint64_t done = 0; done < out.size();) {
      const Piece p = piece(offset + done, out.size() - done);
      auto guard = co_await lock(p.index).scoped();
      const uint64_t e = map_[p.index].load();
      const std::span<std::byte> part = out.subspan(done, p.length);
      if (cow::is_data(e))
        co_await overlay_->read(e + p.in_block, part);
      else if (e == cow::entry_zero)
        std::fill(part.begin(), part.end(), std::byte{0});
      else
        co_await read_lower(offset + done, part);
      done += p.length;
    }
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    for (uint64_t done = 0; done < in.size();) {
      const Piece p = piece(offset + done, in.size() - done);
      co_await write_piece(p, in.subspan(done, p.length));
      done += p.length;
    }
    if (flags.fua) co_await flush();
  }

  // The file first (every published block's data), then the entries that changed, then
  // the file again (the entries); blocks given up before the entries were taken become
  // reusable once those are durable. Flushes run one at a time, so an older entry never
  // overwrites a newer one on disk.
  asio::awaitable<void> flush() override {
    auto flushing = co_await flush_mutex_.scoped();
    std::vector<uint64_t> dirty;
    std::vector<uint64_t> given_up;
    {
      std::lock_guard lock(meta_);
      dirty.swap(dirty_);
      given_up.swap(pending_free_);
    }
    std::sort(dirty.begin(), dirty.end());
    dirty.erase(std::unique(dirty.begin(), dirty.end()), dirty.end());
    // Values taken now: each one's data was written before it was published, so the next
    // flush covers it. A later change is in dirty_ again and goes with the next flush.
    for (uint64_t i : dirty) disk_map_[i] = map_[i].load();
    co_await overlay_->flush();
    if (dirty.empty() && given_up.empty()) co_return;
    co_await write_map_pages(dirty);
    co_await overlay_->flush();
    if (given_up.empty()) co_return;
    if (overlay_->caps().trim)
      for (uint64_t block : given_up) co_await overlay_->trim(block, layout_.block_size, {});
    std::lock_guard lock(meta_);
    free_.insert(free_.end(), given_up.begin(), given_up.end());
  }

  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    co_await zero_range(offset, length, WriteFlags{.fua = flags.fua});
  }

  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    co_await zero_range(offset, length, flags);
  }

  // Data blocks are data, zero entries allocated zeroes; absent ranges are what the lower
  // disk says.
  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    std::vector<Extent> out;
    auto add = [&out](uint64_t n, ExtentKind kind) {
      if (!out.empty() && out.back().kind == kind)
        out.back().length += n;
      else
        out.push_back(Extent{n, kind});
    };
    for (uint64_t done = 0; done < length;) {
      const Piece p = piece(offset + done, length - done);
      const uint64_t e = map_[p.index].load();
      if (cow::is_data(e)) {
        add(p.length, ExtentKind::data);
      } else if (e == cow::entry_zero) {
        add(p.length, ExtentKind::zero);
      } else {
        for (uint64_t got = 0; got < p.length;) {
          const auto lower = co_await lower_->extents(offset + done + got, p.length - got);
          for (const Extent& x : lower) {
            const uint64_t n = std::min(x.length, p.length - got);
            if (n == 0) break;
            add(n, x.kind);
            got += n;
          }
          if (lower.empty())
            fail(std::errc::io_error, "cow: {}: lower disk returned no extents", describe());
        }
      }
      done += p.length;
    }
    co_return out;
  }

  // Every block lock at once (stripe order, the only place that holds more than one, so no
  // deadlock): no block operation is half-way while they are held.
  asio::awaitable<std::vector<AsyncMutex::Guard>> lock_all() {
    std::vector<AsyncMutex::Guard> all;
    all.reserve(stripes);
    for (std::size_t i = 0; i < stripes; ++i) all.push_back(co_await locks_[i].scoped());
    co_return all;
  }

  asio::awaitable<std::vector<uint64_t>> begin_commit() override {
    if (committing_.exchange(true))
      fail(std::errc::device_or_resource_busy,
           "cow: {}: a commit is running already (one at a time)", describe());
    {
      auto all = co_await lock_all();
      generation_.fetch_add(1);
      capturing_.store(true);
    }
    // The captured set is stable now: writers mark the other one.
    const auto& captured = changed_[(generation_.load() & 1) ^ 1];
    std::vector<uint64_t> blocks;
    for (uint64_t w = 0; w < words_; ++w) {
      for (uint64_t bits = captured[w].load(); bits != 0; bits &= bits - 1)
        blocks.push_back(w * 64 + static_cast<uint64_t>(__builtin_ctzll(bits)));
    }
    co_return blocks;
  }

  asio::awaitable<bool> read_commit(uint64_t index, std::span<std::byte> out) override {
    auto guard = co_await lock(index).scoped();
    uint64_t e = map_[index].load();
    {
      std::lock_guard lock(meta_);
      if (auto it = replaced_.find(index); it != replaced_.end()) e = it->second;
    }
    if (cow::is_data(e)) {
      co_await overlay_->read(e, out);
      co_return false;
    }
    if (e == cow::entry_zero) {
      std::fill(out.begin(), out.end(), std::byte{0});
      co_return true;
    }
    // Never captured (changed blocks are data or zero); read what the disk shows.
    co_await read_lower(index * layout_.block_size, out);
    co_return false;
  }

  asio::awaitable<void> end_commit(bool success) override {
    {
      auto all = co_await lock_all();
      capturing_.store(false);
      auto& captured = changed_[(generation_.load() & 1) ^ 1];
      auto& current = changed_[generation_.load() & 1];
      for (uint64_t w = 0; w < words_; ++w) {
        const uint64_t bits = captured[w].exchange(0);
        if (!success && bits != 0) current[w].fetch_or(bits);
      }
      // The captured data that writes replaced: given up like any replaced block, so it
      // is reused only after the flush that writes (or wrote) the new entries.
      std::lock_guard lock(meta_);
      for (const auto& [index, entry] : replaced_)
        if (cow::is_data(entry)) pending_free_.push_back(entry);
      replaced_.clear();
    }
    committing_.store(false);
  }

  uint32_t block_size() const override { return layout_.block_size; }
  uint32_t block_bytes(uint64_t index) const override { return layout_.block_bytes(index); }

  // Only what the lower disk would serve is worth fetching early. A hint past the end is
  // cut there (a piece past the end would have no length, and the walk would not end).
  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    if (!lower_->caps().cache || offset >= size()) co_return;
    length = std::min(length, size() - offset);
    uint64_t run_start = 0, run_length = 0;
    for (uint64_t done = 0; done < length;) {
      const Piece p = piece(offset + done, length - done);
      if (map_[p.index].load() == cow::entry_absent) {
        if (run_length == 0) run_start = offset + done;
        run_length += p.length;
      } else if (run_length > 0) {
        co_await lower_->prefetch(run_start, run_length);
        run_length = 0;
      }
      done += p.length;
    }
    if (run_length > 0) co_await lower_->prefetch(run_start, run_length);
  }

 private:
  // The part of a request inside one block.
  struct Piece {
    uint64_t index;
    uint32_t in_block;
    uint32_t length;
    bool whole;  // covers all of the block's bytes inside the disk
  };

  Piece piece(uint64_t offset, uint64_t remaining) const {
    const uint64_t index = offset / layout_.block_size;
    const auto in_block = static_cast<uint32_t>(offset % layout_.block_size);
    const uint32_t bytes = layout_.block_bytes(index);
    const auto length = static_cast<uint32_t>(std::min<uint64_t>(bytes - in_block, remaining));
    return Piece{index, in_block, length, in_block == 0 && length == bytes};
  }

  AsyncMutex& lock(uint64_t index) { return locks_[index % stripes]; }

  static void set_bit(const std::unique_ptr<std::atomic<uint64_t>[]>& set, uint64_t index) {
    set[index / 64].fetch_or(uint64_t{1} << (index % 64));
  }
  static bool test_bit(const std::unique_ptr<std::atomic<uint64_t>[]>& set, uint64_t index) {
    return (set[index / 64].load() >> (index % 64)) & 1;
  }

  // The rest run under the block's lock: generation_ and capturing_ change only while
  // every block lock is held, so they are stable there.
  void mark_changed(uint64_t index) { set_bit(changed_[generation_.load() & 1], index); }
  bool captured(uint64_t index) const {
    return capturing_.load() && test_bit(changed_[(generation_.load() & 1) ^ 1], index);
  }
  // A captured block still at its captured place must not be written in place.
  bool must_copy(uint64_t index) {
    if (!captured(index)) return false;
    std::lock_guard lock(meta_);
    return !replaced_.contains(index);
  }

  asio::awaitable<void> read_lower(uint64_t offset, std::span<std::byte> out) {
    for (std::size_t done = 0; done < out.size();) {
      const std::size_t n = std::min<std::size_t>(lower_max_, out.size() - done);
      co_await lower_->read(offset + done, out.subspan(done, n));
      done += n;
    }
  }

  // Under the block's lock: in place into a data block, else a new block read-modify-write.
  asio::awaitable<void> write_piece(const Piece& p, std::span<const std::byte> in) {
    auto guard = co_await lock(p.index).scoped();
    const uint64_t e = map_[p.index].load();
    const bool copy = cow::is_data(e) && must_copy(p.index);
    if (cow::is_data(e) && !copy) {
      co_await overlay_->write(e + p.in_block, in, {});
      mark_changed(p.index);
      co_return;
    }
    std::vector<std::byte> block(layout_.block_bytes(p.index));
    if (!p.whole && copy)
      co_await overlay_->read(e, block);  // a commit reads the captured data still
    else if (!p.whole && e == cow::entry_absent)
      co_await read_lower(p.index * layout_.block_size, block);
    std::memcpy(block.data() + p.in_block, in.data(), in.size());
    co_await write_new_block(p.index, block);
  }

  // Writes the whole block's bytes into free space, then publishes it. Under its lock.
  asio::awaitable<void> write_new_block(uint64_t index, std::span<const std::byte> block) {
    const uint64_t at = co_await allocate();
    co_await overlay_->write(at, block, {});
    publish(index, at);
  }

  // Sets a block's entry in memory; flush() writes it. The old data block is given up,
  // unless a running commit captured it: then it stays until end_commit().
  void publish(uint64_t index, uint64_t entry) {
    const uint64_t old = map_[index].exchange(entry);
    const bool keep = captured(index);
    mark_changed(index);
    std::lock_guard lock(meta_);
    dirty_.push_back(index);
    if (keep && replaced_.emplace(index, old).second) return;
    if (cow::is_data(old)) pending_free_.push_back(old);
  }

  // Space for one block no entry on disk points at: a reusable block, or the end of the
  // data area (growing the file).
  asio::awaitable<uint64_t> allocate() {
    {
      std::lock_guard lock(meta_);
      if (!free_.empty()) {
        const uint64_t at = free_.back();
        free_.pop_back();
        co_return at;
      }
    }
    auto guard = co_await alloc_mutex_.scoped();
    const uint64_t at = next_free_;
    next_free_ += layout_.block_size;
    if (next_free_ > file_size_) {
      // Grown ahead in steps (a sparse file costs nothing for it); a resize may run beside
      // I/O below the old size, and nobody uses the new space before it returns.
      const uint64_t to =
          std::max(next_free_, file_size_ + std::max<uint64_t>(grow_step, layout_.block_size));
      co_await overlay_->resize(to);
      file_size_ = to;
    }
    co_return at;
  }

  asio::awaitable<void> zero_range(uint64_t offset, uint64_t length, WriteFlags flags) {
    if (flags.fast) {
      // Whole blocks are one map change; a partial block would need its data written.
      const Piece first = piece(offset, length);
      const Piece last = piece(offset + length - 1, 1);
      const bool head_partial = !first.whole;
      const bool tail_partial =
          (offset + length) % layout_.block_size != 0 && offset + length != layout_.virtual_size;
      if (head_partial || (tail_partial && last.index != first.index))
        fail(std::errc::operation_not_supported,
             "cow: {}: a fast zero of {}+{} covers part of a block (blocks are {} bytes)",
             describe(), offset, length, layout_.block_size);
    }
    for (uint64_t done = 0; done < length;) {
      const Piece p = piece(offset + done, length - done);
      co_await zero_piece(p);
      done += p.length;
    }
    if (flags.fua) co_await flush();
  }

  asio::awaitable<void> zero_piece(const Piece& p) {
    auto guard = co_await lock(p.index).scoped();
    const uint64_t e = map_[p.index].load();
    if (e == cow::entry_zero) co_return;
    const bool copy = cow::is_data(e) && must_copy(p.index);
    if (p.whole) {
      publish(p.index, cow::entry_zero);
    } else if (cow::is_data(e) && !copy) {
      co_await overlay_->zero(e + p.in_block, p.length, {});
      mark_changed(p.index);
    } else {
      std::vector<std::byte> block(layout_.block_bytes(p.index));
      if (copy)
        co_await overlay_->read(e, block);
      else
        co_await read_lower(p.index * layout_.block_size, block);
      std::fill_n(block.begin() + p.in_block, p.length, std::byte{0});
      co_await write_new_block(p.index, block);
    }
  }

  // Writes the 4 KiB map pages holding the dirty entries, from disk_map_ (under the flush
  // lock: every value there has durable data).
  asio::awaitable<void> write_map_pages(const std::vector<uint64_t>& dirty) {
    constexpr uint64_t per_page = 4096 / 8;
    std::vector<std::byte> page(4096);
    uint64_t last_page = UINT64_MAX;
    for (uint64_t i : dirty) {
      const uint64_t page_index = i / per_page;
      if (page_index == last_page) continue;
      last_page = page_index;
      std::fill(page.begin(), page.end(), std::byte{0});
      const uint64_t first = page_index * per_page;
      const uint64_t end = std::min(first + per_page, layout_.blocks);
      for (uint64_t k = first; k < end; ++k)
        cow::encode_entry(disk_map_[k], std::span<std::byte, 8>(page.data() + (k - first) * 8, 8));
      co_await overlay_->write(layout_.map_offset + page_index * 4096, page, {});
    }
  }

  DevicePtr lower_;
  DevicePtr overlay_;
  cow::Layout layout_;
  Caps caps_;
  uint32_t lower_max_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> map_;  // what reads and writes use
  std::vector<uint64_t> disk_map_;                // what flush writes; under flush_mutex_
  std::unique_ptr<AsyncMutex[]> locks_;
  AsyncMutex flush_mutex_;
  AsyncMutex alloc_mutex_;              // next_free_, file_size_
  std::mutex meta_;                     // dirty_, pending_free_, free_
  std::vector<uint64_t> dirty_;         // entries published since the last flush took them
  std::vector<uint64_t> pending_free_;  // blocks given up; the map on disk may point at them
  std::vector<uint64_t> free_;          // blocks no entry on disk points at
  uint64_t next_free_;
  uint64_t file_size_;
  // Commits: changed_[generation_ & 1] collects the blocks changed in this generation;
  // while a commit runs, the other set is what it captured (nobody marks it then).
  uint64_t words_;
  std::unique_ptr<std::atomic<uint64_t>[]> changed_[2];
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> capturing_{false};  // writes must copy captured blocks
  std::atomic<bool> committing_{false};
  // Captured blocks a write has replaced since begin_commit: their captured entry (data
  // kept reserved, or zero). Under meta_.
  std::unordered_map<uint64_t, uint64_t> replaced_;
};

}  // namespace

asio::awaitable<void> create_cow(backends::BlockDevice& file, uint64_t lower_size,
                                 const CowCreateOptions& options) {
  auto header = cow::make_header(lower_size, options.block_size, options.identity);
  if (!header.ok())
    fail(header.problem().code, "cow: {}: {}", file.describe(), header.problem().message);
  if (file.size() != 0)
    fail(std::errc::file_exists,
         "cow: {}: is not empty ({} bytes): a new overlay needs an empty file", file.describe(),
         file.size());
  if (!file.caps().writable)
    fail(std::errc::read_only_file_system, "cow: {}: the overlay file is read-only",
         file.describe());
  // The map reads as zeroes (every block absent) in the grown file.
  co_await file.resize(header.value().data_offset);
  const std::vector<std::byte> bytes = cow::encode_header(header.value());
  co_await file.write(0, bytes, {});
  co_await file.flush();
  log::debug("cow: {}: created an overlay of {} bytes, blocks of {} bytes, over \"{}\"",
             file.describe(), lower_size, options.block_size, options.identity);
}

asio::awaitable<DevicePtr> open_cow(DevicePtr lower, DevicePtr file, CowOptions options) {
  const std::string name = file->describe();
  if (!file->caps().writable)
    fail(std::errc::read_only_file_system, "cow: {}: the overlay file is read-only", name);
  const uint64_t file_size = file->size();
  if (file_size < cow::header_bytes)
    fail(std::errc::invalid_argument, "cow: {}: {} bytes is too small for an overlay (header: {})",
         name, file_size, cow::header_bytes);
  std::vector<std::byte> head(cow::header_bytes);
  co_await file->read(0, head);
  const auto header = cow::decode_header(head);
  if (!header.ok()) fail(header.problem().code, "cow: {}: {}", name, header.problem().message);
  const auto layout = cow::check_header(header.value(), file_size);
  if (!layout.ok()) fail(layout.problem().code, "cow: {}: {}", name, layout.problem().message);
  if (auto p = cow::check_lower(header.value(), lower->size(), options.identity))
    fail(p->code, "cow: {}: {}", name, p->message);

  const cow::Layout& l = layout.value();
  std::vector<uint64_t> entries;
  entries.reserve(l.blocks);
  std::vector<std::byte> chunk;
  for (uint64_t done = 0; done < l.map_bytes && entries.size() < l.blocks;) {
    chunk.resize(std::min(map_read_chunk, l.map_bytes - done));
    co_await file->read(l.map_offset + done, chunk);
    const auto part = cow::decode_map(chunk, l.blocks - entries.size());
    entries.insert(entries.end(), part.begin(), part.end());
    done += chunk.size();
  }
  const auto use = cow::check_map(l, entries, file_size);
  if (!use.ok()) fail(use.problem().code, "cow: {}: {}", name, use.problem().message);
  log::debug("cow: {}: {} blocks of {} bytes, {} reusable, data up to {:#x}", name, l.blocks,
             l.block_size, use.value().free_blocks.size(), use.value().data_end);
  co_return std::make_shared<Cow>(std::move(lower), std::move(file), l, std::move(entries),
                                  use.value(), file_size);
}

}  // namespace imagenbd::formats
