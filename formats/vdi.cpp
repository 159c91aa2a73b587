// The VDI format layer: maps virtual bytes through the block map to the child (cf. qemu
// block/vdi.c). The map lives in memory as atomics, so reads take no lock: an entry is
// published only after its block's data is in the child. Allocation and every other
// metadata write go through one AsyncMutex per image and re-check the map once they hold
// it (two writers may race for one unallocated block). What is on disk under the lock is
// always what is in memory, so a run of map entries can be rewritten from memory.
//
// Unallocated blocks come in two kinds: free (never written) and zero (discarded). Both
// read as zeroes in a base image. A differencing image reads free blocks from its parent
// (opened read-only, a VDI of any type, found by vdi_parent) and zero blocks as zeroes:
// a zero entry hides the parent. VDI has no sector bitmap, so the first write to a free
// block copies the rest of the block up from the parent (allocate); a child larger than
// its parent reads zeroes past the parent's end (VirtualBox resizes differencing images).
#include "formats/vdi.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "backends/async_mutex.hpp"
#include "backends/error.hpp"
#include "backends/log.hpp"
#include "formats/vdi_layout.hpp"
#include "formats/vdi_parent.hpp"

namespace imagenbd::formats {

namespace {

using backends::Caps;
using backends::Extent;
using backends::ExtentKind;
using backends::WriteFlags;
using vdi::is_allocated;

constexpr std::size_t max_extents = 1024;         // per extents() call; callers ask again
constexpr std::size_t map_read_chunk = 4u << 20;  // block map bytes per child read at open
constexpr uint64_t one_page = 4096;               // written whole or not at all if killed
constexpr uint64_t copy_chunk = 4u << 20;         // parent bytes per read when copying up

bool is_zero(std::span<const std::byte> s) {
  return s.empty() ||
         (s[0] == std::byte{0} && std::memcmp(s.data(), s.data() + 1, s.size() - 1) == 0);
}

Uuid random_uuid() {
  std::random_device random;
  std::array<uint8_t, 16> bytes;
  for (std::size_t i = 0; i < bytes.size(); i += 4) {
    const uint32_t r = random();
    for (std::size_t j = 0; j < 4; ++j) bytes[i + j] = static_cast<uint8_t>(r >> (8 * j));
  }
  return Uuid::random_v4(bytes);
}

class Vdi final : public backends::BlockDevice {
 public:
  Vdi(DevicePtr child, vdi::Header header, std::span<const std::byte> sector0,
      const vdi::Layout& layout, std::span<const uint32_t> entries, uint32_t next_physical,
      bool writable, DevicePtr parent)
      : child_(std::move(child)),
        child_caps_(child_->caps()),
        layout_(layout),
        parent_(std::move(parent)),
        parent_size_(parent_ ? parent_->size() : 0),
        map_(std::make_unique<std::atomic<uint32_t>[]>(layout.blocks)),
        header_(std::move(header)),
        next_physical_(next_physical) {
    std::copy(sector0.begin(), sector0.begin() + vdi::header_bytes, sector0_.begin());
    std::vector<bool> used(next_physical);
    for (uint32_t i = 0; i < layout.blocks; ++i) {
      map_[i].store(entries[i], std::memory_order_relaxed);
      if (is_allocated(entries[i])) used[entries[i]] = true;
    }
    for (uint32_t i = 0; i < std::min(layout.blocks, layout.disk_blocks()); ++i) {
      if (!is_allocated(entries[i])) unallocated_.fetch_add(1, std::memory_order_relaxed);
    }
    for (uint32_t p = next_physical; p-- > 0;) {
      if (!used[p]) leaked_.push_back(p);
    }
    caps_.writable = writable;
    caps_.flush = child_caps_.flush;
    caps_.fua = writable && (child_caps_.fua || child_caps_.flush);
    caps_.trim = caps_.zero = writable;
    caps_.fast_zero = writable && child_caps_.fast_zero;
    caps_.extents = true;
    caps_.cache = child_caps_.cache;
    caps_.multi_conn = child_caps_.multi_conn;
    caps_.block_min = 1;
    caps_.block_preferred = 4096;
    caps_.block_max = child_caps_.block_max;
  }

  std::string_view name() const override { return "vdi"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return layout_.disk_size; }
  Caps caps() const override { return caps_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    for (std::size_t done = 0; done < out.size();) {
      const Run run = run_at(offset + done, out.size() - done);
      const auto piece = out.subspan(done, run.length);
      if (is_allocated(run.entry)) {
        co_await child_->read(run.file_offset, piece);
      } else {
        co_await read_unallocated(run.entry, offset + done, piece);
      }
      done += run.length;
    }
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    check_writable("write");
    co_await note_modified();
    // One in-place run carries FUA down; anything else flushes once at the end.
    bool flush_after = false;
    for (std::size_t done = 0; done < in.size();) {
      const Run run = run_at(offset + done, in.size() - done);
      const auto piece = in.subspan(done, run.length);
      if (is_allocated(run.entry)) {
        const bool whole_request = run.length == in.size();
        co_await child_write(run.file_offset, piece, flags.fua && whole_request);
        flush_after = flags.fua && !whole_request;
      } else {
        co_await write_unallocated(offset + done, piece);
        flush_after = flags.fua;
      }
      done += run.length;
    }
    if (flush_after) co_await child_->flush();
  }

  asio::awaitable<void> flush() override { co_await child_->flush(); }

  // Allocated blocks keep their place in the map (giving one back would leave a hole in
  // the physical order that qemu-img check reports as "allocated blocks mismatch"); the
  // child releases the space inside them instead. Free blocks stay free: in a differencing
  // image they keep showing the parent, which a trim allows (zero() must not do that).
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("trim");
    co_await note_modified();
    for (uint64_t done = 0; done < length;) {
      const Run run = run_at(offset + done, length - done);
      if (is_allocated(run.entry)) co_await child_->trim(run.file_offset, run.length, {});
      done += run.length;
    }
    if (flags.fua) co_await child_->flush();
  }

  // Whole free blocks are marked zero (a metadata write, no data; in a differencing image
  // the entry hides the parent); allocated ranges are zeroed in the child, which may punch
  // holes unless no_hole is set. The partial ends of free runs already read as zeroes in a
  // base image; in a differencing image they get a block (copied up from the parent, the
  // range left zero) unless the parent reads zeroes there too.
  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("zero");
    co_await note_modified();
    const WriteFlags child_flags{.no_hole = flags.no_hole, .fast = flags.fast};
    bool allocated = false;
    for (uint64_t done = 0; done < length;) {
      const uint64_t at = offset + done;
      const Run run = run_at(at, length - done);
      if (is_allocated(run.entry)) {
        co_await child_->zero(run.file_offset, run.length, child_flags);
      } else if (run.entry == vdi::entry_free) {
        allocated |= co_await zero_free(at, run.length, child_flags);
      }
      done += run.length;
    }
    if (flags.fua || allocated) co_await child_->flush();
  }

  // Allocated blocks are data; zero blocks are holes (they read as zeroes and store
  // nothing, as qemu reports zero clusters of an overlay); free blocks are holes in a base
  // image and the parent's extents in a differencing one.
  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    std::vector<Extent> out;
    // False once the list is full and `e` would need a new entry.
    auto add = [&out](Extent e) {
      if (!out.empty() && out.back().kind == e.kind) {
        out.back().length += e.length;
        return true;
      }
      if (out.size() == max_extents) return false;
      out.push_back(e);
      return true;
    };
    for (uint64_t done = 0; done < length;) {
      const uint64_t at = offset + done;
      const Run run = run_at(at, length - done);
      if (run.entry != vdi::entry_free || !parent_) {
        if (!add({run.length, is_allocated(run.entry) ? ExtentKind::data : ExtentKind::hole})) {
          break;
        }
        done += run.length;
        continue;
      }
      // The parent answers for what it covers, maybe for less than asked: then stop there.
      const uint64_t in_parent = parent_bytes(at, run.length);
      uint64_t covered = 0;
      bool full = false;
      if (in_parent > 0) {
        for (const Extent& e : co_await parent_->extents(at, in_parent)) {
          if (!add(e)) {
            full = true;
            break;
          }
          covered += e.length;
        }
      }
      done += covered;
      if (full || covered < in_parent) break;
      if (run.length > in_parent && !add({run.length - in_parent, ExtentKind::hole})) break;
      done += run.length - in_parent;
    }
    co_return out;
  }
  // Every block allocated: extents() would say data from end to end.
  bool may_have_holes() const override { return unallocated_.load(std::memory_order_acquire) != 0; }

  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    for (uint64_t done = 0; done < length;) {
      const uint64_t at = offset + done;
      const Run run = run_at(at, length - done);
      if (is_allocated(run.entry)) {
        co_await child_->prefetch(run.file_offset, run.length);
      } else if (run.entry == vdi::entry_free && parent_) {
        if (const uint64_t n = parent_bytes(at, run.length)) co_await parent_->prefetch(at, n);
      }
      done += run.length;
    }
  }

 private:
  // A stretch of the virtual disk that maps one way: consecutive blocks whose entries are
  // all allocated and physically contiguous (file_offset is where it starts), or all the
  // same unallocated kind.
  struct Run {
    uint64_t length;
    uint32_t entry;  // of the first block
    uint64_t file_offset;
  };

  uint32_t block_index(uint64_t offset) const {
    return static_cast<uint32_t>(offset / layout_.block_size);
  }
  // Index of the first block not wholly below `end`: the end of the whole blocks before it,
  // except that the disk's last block counts as whole at the disk's end.
  uint32_t block_index_end(uint64_t end) const {
    return end == layout_.disk_size ? layout_.blocks : block_index(end);
  }
  uint32_t entry(uint32_t index) const { return map_[index].load(std::memory_order_acquire); }

  Run run_at(uint64_t offset, uint64_t max_length) const {
    const uint32_t bs = layout_.block_size;
    uint32_t index = block_index(offset);
    const uint32_t first = entry(index);
    const uint64_t in_block = offset % bs;
    Run run{std::min<uint64_t>(bs - in_block, max_length), first,
            is_allocated(first) ? layout_.block_data(first) + in_block : 0};
    uint32_t last = first;
    while (run.length < max_length) {
      const uint32_t next = entry(++index);
      const bool same = is_allocated(first)
                            ? is_allocated(next) && next == last + 1 && layout_.block_extra == 0
                            : next == first;
      if (!same) break;
      run.length += std::min<uint64_t>(bs, max_length - run.length);
      last = next;
    }
    return run;
  }

  void check_writable(std::string_view what) const {
    if (!caps_.writable) {
      backends::fail(std::errc::operation_not_permitted, "vdi: {}: {} on a read-only image",
                     describe(), what);
    }
  }

  asio::awaitable<void> child_write(uint64_t offset, std::span<const std::byte> data, bool fua) {
    co_await child_->write(offset, data, {.fua = fua && child_caps_.fua});
    if (fua && !child_caps_.fua) co_await child_->flush();
  }

  // How many of the `length` bytes at virtual `offset` the parent holds (a child may be
  // larger than its parent).
  uint64_t parent_bytes(uint64_t offset, uint64_t length) const {
    return offset < parent_size_ ? std::min(length, parent_size_ - offset) : 0;
  }

  // Free blocks of a differencing image read from the parent (zeroes past its end); zero
  // blocks, and free blocks of a base image, read as zeroes.
  asio::awaitable<void> read_unallocated(uint32_t entry, uint64_t offset,
                                         std::span<std::byte> out) {
    std::size_t n = 0;
    if (entry == vdi::entry_free && parent_) {
      n = static_cast<std::size_t>(parent_bytes(offset, out.size()));
      const std::size_t chunk = parent_->caps().block_max;
      for (std::size_t done = 0; done < n;) {
        const std::size_t len = std::min(chunk, n - done);
        co_await parent_->read(offset + done, out.subspan(done, len));
        done += len;
      }
    }
    std::memset(out.data() + n, 0, out.size() - n);
  }

  // True when the parent reads zeroes in [offset, offset + length) (or there is none).
  asio::awaitable<bool> parent_reads_zero(uint64_t offset, uint64_t length) {
    const uint64_t n = parent_ ? parent_bytes(offset, length) : 0;
    for (uint64_t done = 0; done < n;) {
      const auto extents = co_await parent_->extents(offset + done, n - done);
      if (extents.empty()) no_extents();
      for (const Extent& e : extents) {
        if (e.kind == ExtentKind::data) co_return false;
        done += e.length;
      }
    }
    co_return true;
  }

  // A parent that answers extents() with nothing would make the loops above spin.
  [[noreturn]] void no_extents() const {
    backends::fail(std::errc::io_error, "vdi: {}: the parent {} reported no extents", describe(),
                   parent_->describe());
  }

  // Zeroes [offset, offset + length), a run of free blocks: whole blocks are marked zero;
  // in a differencing image a partial block gets a block of its own unless the parent
  // reads zeroes there. Returns true when it allocated (a flush is due).
  asio::awaitable<bool> zero_free(uint64_t offset, uint64_t length, WriteFlags child_flags) {
    bool allocated = false;
    const uint64_t end = offset + length;
    for (uint64_t at = offset; at < end;) {
      const uint32_t index = block_index(at);
      const uint64_t block_start = uint64_t{index} * layout_.block_size;
      const uint64_t block_end = block_start + layout_.block_bytes(index);
      if (at == block_start && end >= block_end) {
        const uint32_t whole_end = block_index_end(end);
        co_await mark_zero(index, whole_end, child_flags);
        at = whole_end == layout_.blocks ? layout_.disk_size
                                         : uint64_t{whole_end} * layout_.block_size;
        continue;
      }
      const uint64_t n = std::min(block_end, end) - at;
      if (parent_ && !co_await parent_reads_zero(at, n)) {
        if (child_flags.fast) {
          // NBD_CMD_FLAG_FAST_ZERO: copying a block up is the slow path the client declined.
          backends::fail(std::errc::operation_not_supported,
                         "vdi: {}: a fast zero of part of block {} would copy it up from the "
                         "parent",
                         describe(), index);
        }
        co_await allocate(index, static_cast<uint32_t>(at - block_start), static_cast<uint32_t>(n),
                          {});
        allocated = true;
      }
      at += n;
    }
    co_return allocated;
  }

  // Writes `in` (at virtual `offset`, all in unallocated blocks) block by block.
  asio::awaitable<void> write_unallocated(uint64_t offset, std::span<const std::byte> in) {
    for (std::size_t done = 0; done < in.size();) {
      const uint32_t index = block_index(offset + done);
      const uint32_t in_block = static_cast<uint32_t>((offset + done) % layout_.block_size);
      const std::size_t n =
          std::min<std::size_t>(layout_.block_bytes(index) - in_block, in.size() - done);
      const auto piece = in.subspan(done, n);
      // A whole block of zeroes needs no data block: the entry says "zero" (VirtualBox
      // does the same).
      if (in_block == 0 && n == layout_.block_bytes(index) && is_zero(piece)) {
        co_await mark_zero(index, index + 1, {});
      } else {
        co_await allocate(index, in_block, static_cast<uint32_t>(n), piece);
      }
      done += n;
    }
  }

  // Gives block `index` a physical block holding `piece` (`length` bytes; zeroes when
  // piece is empty) at `in_block`, and elsewhere the parent's data if the block was free in
  // a differencing image, else zeroes. In the order of formats.md §2.6 (data, header
  // count, map entry):
  //   1. the data, in a block past the last one (growing the child) or in a leaked one;
  //   2. a flush: the data is durable before anything points at it;
  //   3. the header, with the block count that now includes the block;
  //   4. the map entry, which makes the block part of the disk.
  // Interrupted before 3, nothing points at the block and the next allocation overwrites
  // it. After 3 without 4, the count is one too high: a leaked block, which qemu-img check
  // reports and the next open reuses. 4 without 3 (a power loss may persist the two
  // writes in either order) leaves an entry at the count, which open accepts because its
  // data is durable. 3 and 4 go in one write when they share a page (see
  // write_count_and_entry), so a killed process leaves no leak with qemu's layout. One
  // flush per allocation, as in qemu; FUA adds the second.
  asio::awaitable<void> allocate(uint32_t index, uint32_t in_block, uint32_t length,
                                 std::span<const std::byte> piece) {
    auto guard = co_await mutex_.scoped();
    const uint32_t old = entry(index);
    if (is_allocated(old)) {
      // Another writer allocated the block while we waited for the lock.
      guard.unlock();
      if (piece.empty()) {
        co_await child_->zero(layout_.block_data(old) + in_block, length, {});
      } else {
        co_await child_->write(layout_.block_data(old) + in_block, piece, {});
      }
      co_return;
    }
    // Blocks leaked by an interrupted allocation (counted, but in no map entry) are used
    // first: that needs no new header, and heals the count qemu-img check complains about.
    // From here on the physical block is used up even if a step fails: never hand it out
    // twice (a failed map write may have reached the disk).
    const bool reuse = !leaked_.empty();
    if (!reuse && next_physical_ >= layout_.blocks) {
      backends::fail(std::errc::no_space_on_device,
                     "vdi: {}: no physical block left for block {}: all {} are in use (after "
                     "failed allocations)",
                     describe(), index, layout_.blocks);
    }
    const uint32_t physical = reuse ? leaked_.back() : next_physical_++;
    if (reuse) leaked_.pop_back();
    const uint64_t start = layout_.block_data(physical) - layout_.block_extra;
    const uint64_t end = layout_.block_end(physical);
    const uint64_t file_size = child_->size();
    // Growing the file gives zeroes. A block that lies (partly) inside the file already
    // holds what an interrupted allocation left there: zero it first.
    if (start < file_size) co_await child_->zero(start, std::min(end, file_size) - start, {});
    if (end > file_size) co_await child_->resize(end);
    if (old == vdi::entry_free && parent_) {
      // Copy-up: no sector bitmap says which bytes are the child's, so the block must hold
      // the parent's bytes around the piece. Serialised with the other allocations under
      // the lock (the parent is read-only: what it holds cannot change meanwhile).
      co_await copy_up(index, physical, 0, in_block);
      co_await copy_up(index, physical, in_block + length, layout_.block_bytes(index));
    }
    if (!piece.empty()) co_await child_->write(layout_.block_data(physical) + in_block, piece, {});
    co_await child_->flush();
    co_await write_count_and_entry(index, physical);
    map_[index].store(physical, std::memory_order_release);
    if (index < layout_.disk_blocks()) unallocated_.fetch_sub(1, std::memory_order_release);
    log::data("vdi: {}: block {} allocated at physical block {}", describe(), index, physical);
  }

  // Copies bytes [from, to) of virtual block `index` from the parent into physical block
  // `physical`, which reads as zeroes: only the parent's data extents are read and written.
  asio::awaitable<void> copy_up(uint32_t index, uint32_t physical, uint32_t from, uint32_t to) {
    const uint64_t block_start = uint64_t{index} * layout_.block_size;
    const uint64_t begin = block_start + from;
    const uint64_t n = from < to ? parent_bytes(begin, to - from) : 0;
    const uint64_t chunk = std::min<uint64_t>(
        {copy_chunk, parent_->caps().block_max, child_caps_.block_max, layout_.block_size});
    std::vector<std::byte> buffer;
    for (uint64_t done = 0; done < n;) {
      const auto extents = co_await parent_->extents(begin + done, n - done);
      if (extents.empty()) no_extents();
      for (const Extent& e : extents) {
        if (e.kind == ExtentKind::data) {
          buffer.resize(static_cast<std::size_t>(std::min(chunk, e.length)));
          for (uint64_t copied = 0; copied < e.length;) {
            const uint64_t at = begin + done + copied;
            const auto piece = std::span(buffer).first(std::min(chunk, e.length - copied));
            co_await parent_->read(at, piece);
            co_await child_->write(layout_.block_data(physical) + (at - block_start), piece, {});
            copied += piece.size();
          }
        }
        done += e.length;
      }
    }
  }

  // Marks the free blocks in [first, end) zero, writing the map entries of the run at once.
  // Blocks allocated meanwhile are zeroed in place.
  asio::awaitable<void> mark_zero(uint32_t first, uint32_t end, WriteFlags child_flags) {
    auto guard = co_await mutex_.scoped();
    std::vector<uint32_t> entries(end - first);
    for (uint32_t i = first; i < end; ++i) {
      const uint32_t e = entry(i);
      entries[i - first] = e == vdi::entry_free ? vdi::entry_zero : e;
    }
    // Write only the stretch that changes.
    uint32_t lo = first, hi = end;
    while (lo < hi && entry(lo) != vdi::entry_free) ++lo;
    while (hi > lo && entry(hi - 1) != vdi::entry_free) --hi;
    if (lo < hi) {
      const auto bytes = vdi::encode_block_map(std::span(entries).subspan(lo - first, hi - lo));
      co_await child_->write(layout_.entry_offset(lo), bytes, {});
      for (uint32_t i = lo; i < hi; ++i)
        map_[i].store(entries[i - first], std::memory_order_release);
    }
    guard.unlock();
    for (uint32_t i = first; i < end; ++i) {
      if (is_allocated(entries[i - first])) {
        co_await child_->zero(layout_.block_data(entries[i - first]), layout_.block_bytes(i),
                              child_flags);
      }
    }
  }

  // The first modification after open gives the image a new uuidModify, as VirtualBox
  // does (differencing children record it to notice a changed parent).
  asio::awaitable<void> note_modified() {
    if (modified_.load(std::memory_order_acquire)) co_return;
    auto guard = co_await mutex_.scoped();
    if (modified_.load(std::memory_order_relaxed)) co_return;
    header_.uuid_modify = random_uuid();
    co_await write_header();
    modified_.store(true, std::memory_order_release);
  }

  // Steps 2 and 4 of allocate: the header, if its count is behind next_physical_, then map
  // entry `index` = physical. Holds mutex_. When the entry lies in the first page with the
  // header (the map right after it, as qemu lays it out: entries below 896), both go in one
  // write of a single page, which a killed process cannot tear: qemu-img check then passes
  // whenever the process dies.
  asio::awaitable<void> write_count_and_entry(uint32_t index, uint32_t physical) {
    const auto entry_bytes = vdi::encode_entry(physical);
    const uint64_t entry_at = layout_.entry_offset(index);
    if (header_.blocks_allocated == next_physical_) {
      co_await child_->write(entry_at, entry_bytes, {});
      co_return;
    }
    header_.blocks_allocated = next_physical_;
    if (layout_.blocks_offset != vdi::header_bytes || entry_at + 4 > one_page) {
      co_await write_header();
      co_await child_->write(entry_at, entry_bytes, {});
      co_return;
    }
    // Under the lock the map on disk is the map in memory: entries 0 to index-1 are
    // rewritten as they are.
    std::vector<uint32_t> head(index + 1);
    for (uint32_t i = 0; i < index; ++i) head[i] = entry(i);
    head[index] = physical;
    vdi::encode_header(header_, sector0_);
    std::vector<std::byte> bytes(sector0_.begin(), sector0_.end());
    const auto map_bytes = vdi::encode_block_map(head);
    bytes.insert(bytes.end(), map_bytes.begin(), map_bytes.end());
    co_await child_->write(0, bytes, {});
  }

  // Writes the first sector from header_. Holds mutex_.
  asio::awaitable<void> write_header() {
    vdi::encode_header(header_, sector0_);
    co_await child_->write(0, sector0_, {});
  }

  const DevicePtr child_;
  const Caps child_caps_;
  const vdi::Layout layout_;
  const DevicePtr parent_;  // differencing images: the read-only parent; null otherwise
  const uint64_t parent_size_;
  Caps caps_;
  std::unique_ptr<std::atomic<uint32_t>[]> map_;
  std::atomic<uint64_t> unallocated_{0};  // free or zero entries of the blocks the disk covers
  std::atomic<bool> modified_{false};
  backends::AsyncMutex mutex_;  // guards what follows, and every metadata write
  vdi::Header header_;
  std::array<std::byte, vdi::header_bytes> sector0_{};
  uint32_t next_physical_;        // where the next block is appended
  std::vector<uint32_t> leaked_;  // physical blocks below it that no entry uses, last first
};

template <typename... Args>
[[noreturn]] void refuse(const DevicePtr& child, std::errc code, fmt::format_string<Args...> format,
                         Args&&... args) {
  backends::fail(code, "vdi: {}: {}", child->describe(),
                 fmt::format(format, std::forward<Args>(args)...));
}

[[noreturn]] void refuse(const DevicePtr& child, const vdi::Problem& problem) {
  refuse(child, problem.code, "{}", problem.message);
}

// The checks of open_vdi that need no I/O beyond the first sector. Throws.
vdi::Layout check_image(const DevicePtr& child, const vdi::Header& header, uint64_t file_size,
                        bool writable) {
  const auto checked = vdi::check_header(header, file_size);
  if (!checked.ok()) refuse(child, checked.problem());
  if (header.image_type == static_cast<uint32_t>(vdi::ImageType::undo)) {
    refuse(child, std::errc::operation_not_supported, "undo VDI images (type 3) are not supported");
  }
  for (const auto& [uuid, field] : {std::pair{&header.uuid_create, "uuidCreate"},
                                    std::pair{&header.uuid_modify, "uuidModify"}}) {
    if (!uuid->is_nil()) continue;
    if (writable) {
      refuse(child, std::errc::invalid_argument,
             "header: {} is nil (VirtualBox refuses such images); serve it read-only", field);
    }
    log::warn("vdi: {}: header: {} is nil (VirtualBox refuses such images)", child->describe(),
              field);
  }
  return checked.value();
}

// Checks the block map read from the file and reports what is odd but servable; returns
// the entries and the next physical block. Throws.
std::pair<std::vector<uint32_t>, uint32_t> check_map(const DevicePtr& child,
                                                     const vdi::Header& header,
                                                     const vdi::Layout& layout,
                                                     std::span<const std::byte> raw,
                                                     uint64_t file_size, bool writable) {
  std::vector<uint32_t> entries = vdi::decode_block_map(raw);
  const auto checked = vdi::check_block_map(layout, entries, file_size);
  if (!checked.ok()) refuse(child, checked.problem());
  const vdi::MapUse use = checked.value();
  if (layout.disk_size_rounded) {
    log::warn("vdi: {}: disk size {} is not a multiple of 512; serving the first {} bytes",
              child->describe(), header.disk_size, layout.disk_size);
  }
  const uint32_t next = std::max(layout.blocks_allocated, use.end);
  if (use.end > layout.blocks_allocated) {
    log::warn(
        "vdi: {}: the block map uses blocks up to {} but the header counts {} (an allocation "
        "was interrupted before the count reached the disk); the count becomes {}",
        child->describe(), use.end - 1, layout.blocks_allocated, next);
  }
  if (use.used < next) {
    log::warn(
        "vdi: {}: {} of the {} allocated blocks are in no block map entry (leaked by an "
        "interrupted allocation; qemu-img check reports this); new blocks will reuse them",
        child->describe(), next - use.used, next);
  }
  log::debug("vdi: {}: {} image, {} bytes, {} blocks of {} bytes, {} allocated{}",
             child->describe(), vdi::type_name(header.image_type), layout.disk_size, layout.blocks,
             layout.block_size, use.used, writable ? "" : ", read-only");
  return {std::move(entries), next};
}

// The parent of a differencing image, opened read-only as a VDI with the rest of its
// chain. It may be smaller than the child (VirtualBox resizes differencing images; the
// child reads zeroes past the parent's end), never larger. Throws.
asio::awaitable<DevicePtr> open_parent(backends::BlockDevice& child, const vdi::Header& header,
                                       const vdi::Layout& layout, const ParentChain& chain) {
  vdi::FoundParent found = co_await vdi::find_parent(child, header, chain);
  const std::string parent_name = found.device->describe();
  // A named options object: GCC 12 destroys aggregate temporaries in a co_await
  // expression twice.
  VdiOptions options{.read_only = true, .parents = {.finder = chain.finder, .names = chain.names}};
  options.parents.names.push_back(child.describe());
  DevicePtr parent = co_await open_vdi(std::move(found.device), options);
  if (parent->size() > layout.disk_size) {
    backends::fail(std::errc::invalid_argument,
                   "vdi: {}: its parent {} is {} bytes, larger than the differencing image ({} "
                   "bytes)",
                   child.describe(), parent_name, parent->size(), layout.disk_size);
  }
  log::debug("vdi: {}: parent {} ({}, uuidCreate {})", child.describe(), parent_name, found.source,
             header.uuid_linkage.to_string());
  co_return parent;
}

}  // namespace

asio::awaitable<DevicePtr> open_vdi(DevicePtr child, const VdiOptions& options) {
  const uint64_t file_size = child->size();
  const bool writable = !options.read_only && child->caps().writable;
  std::array<std::byte, vdi::header_bytes> sector0{};
  if (file_size >= sector0.size()) co_await child->read(0, sector0);
  if (auto problem = vdi::check_file_size(file_size)) refuse(child, *problem);
  const vdi::Header header = vdi::decode_header(sector0);
  const vdi::Layout layout = check_image(child, header, file_size, writable);

  // The whole block map, in pieces the child accepts.
  std::vector<std::byte> raw(uint64_t{layout.blocks} * 4);
  const uint64_t chunk = std::min<uint64_t>(map_read_chunk, child->caps().block_max) / 4 * 4;
  for (uint64_t done = 0; done < raw.size();) {
    const uint64_t n = std::min<uint64_t>(chunk, raw.size() - done);
    co_await child->read(layout.blocks_offset + done, std::span(raw).subspan(done, n));
    done += n;
  }
  const auto [entries, next] = check_map(child, header, layout, raw, file_size, writable);
  DevicePtr parent;
  if (header.image_type == static_cast<uint32_t>(vdi::ImageType::differencing)) {
    parent = co_await open_parent(*child, header, layout, options.parents);
  }
  co_return std::make_shared<Vdi>(std::move(child), header, sector0, layout, entries, next,
                                  writable, std::move(parent));
}

}  // namespace imagenbd::formats
