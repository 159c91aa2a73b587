// The dynamic VHD layer (formats.md §1.6, §1.7): virtual block i lives where BAT[i] points
// (a sector bitmap, then block_size bytes of data), or nowhere, and then reads as zeroes.
// A sector whose bitmap bit is clear reads as zeroes too, whatever the file holds there.
//
// Concurrency. Reads, and writes to present sectors of allocated blocks, take no lock: the
// BAT is an array of atomics and the bitmap copies are safe to read (vhd_bitmap.hpp). The
// image's AsyncMutex serialises whatever changes metadata -- allocating a block, setting
// bitmap bits, freeing a block -- and each of these looks at the BAT again once it holds
// the lock, because another request may have done the work meanwhile (qemu vdi's
// allocation race). The mutex is held across the child I/O of those paths; they are rare.
//
// Allocation (crash-safe order of §1.7): grow the file with the footer at its new end in
// one step (BlockDevice::grow: one write past the end of a file), so the file ends in a
// valid footer whenever the process dies; write the bitmap and the data (over the old
// footer, unless padding puts the block after it), flush, and only then write the BAT
// entry. A crash before the BAT write leaks the block; after it, the block is complete.
// A power cut may still leave a grown file without its tail (the file system orders
// nothing before the flush); such an image opens read-only from the footer copy at 0.
//
// Freed blocks (trim or zero of a whole block) are never reused: a request that read the
// BAT before the free may still be writing there. Their space is punched out of the file.
//
// Differencing disks (parent_ set): absent sectors read from the parent. A new block gets
// the bits of the sectors written only, its partial first and last sectors completed from
// the parent before the block is written (so the order above is unchanged); later writes
// to absent sectors write the data, then the bits (write_absent). Nothing is ever freed:
// a free block would show the parent again, so zero() writes zeroes and sets their bits,
// and trim() does nothing.
#include "formats/vhd_dynamic.hpp"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cstring>
#include <exception>
#include <memory>
#include <string>

#include "backends/async_mutex.hpp"
#include "backends/error.hpp"
#include "backends/log.hpp"
#include "formats/vhd_bitmap.hpp"

namespace imagenbd::formats::vhd {

namespace {

using backends::Caps;
using backends::DevicePtr;
using backends::Extent;
using backends::ExtentKind;
using backends::WriteFlags;
using State = SectorBitmaps::State;
namespace asio = boost::asio;

constexpr std::size_t max_extents = 1024;  // per extents() call; callers ask again
constexpr uint32_t sector = static_cast<uint32_t>(sector_size);
constexpr uint32_t entries_per_sector = sector / 4;

// The part of a request that lies in one block: bytes [offset, offset + length) of it.
struct Piece {
  uint32_t block;
  uint32_t offset;
  uint32_t length;
  uint32_t first_sector() const { return offset / sector; }
  uint32_t end_sector() const { return (offset + length - 1) / sector + 1; }
};

class DynamicVhd final : public backends::BlockDevice {
 public:
  explicit DynamicVhd(DynamicParams p)
      : child_(std::move(p.child)),
        parent_(std::move(p.parent)),
        layout_(std::move(p.layout)),
        footer_(p.footer),
        size_(p.size),
        block_size_(layout_.block_size),
        bat_(std::make_unique<std::atomic<uint32_t>[]>(layout_.bat_entries)),
        bitmaps_(blocks(), layout_.sectors_per_block()),
        file_size_(child_->size()) {
    assert(p.bat.size() == layout_.bat_entries && size_ <= layout_.current_size);
    for (uint32_t i = 0; i < layout_.bat_entries; ++i) bat_[i].store(p.bat[i]);
    for (uint32_t i = 0; i < blocks(); ++i) {
      if (p.bat[i] == bat_unused) unallocated_.fetch_add(1, std::memory_order_relaxed);
    }
    const Caps c = child_->caps();
    caps_.writable = p.writable;
    caps_.flush = c.flush;
    caps_.fua = caps_.writable && c.fua;
    caps_.trim = caps_.zero = caps_.writable;
    // Zeroing what a parent holds means writing zeroes: never fast.
    caps_.fast_zero = caps_.writable && c.fast_zero && !parent_;
    caps_.extents = true;
    caps_.cache = c.cache;
    caps_.multi_conn = c.multi_conn;
    caps_.block_min = c.block_min;
    caps_.block_preferred = c.block_preferred;
    caps_.block_max = c.block_max;
  }

  std::string_view name() const override { return "vhd"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return size_; }
  Caps caps() const override { return caps_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    assert(offset + out.size() <= size_);
    for (std::size_t done = 0; done < out.size();) {
      const Piece p = piece(offset + done, out.size() - done);
      co_await read_piece(p, out.subspan(done, p.length));
      done += p.length;
    }
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    check_writable("write");
    assert(offset + in.size() <= size_);
    for (std::size_t done = 0; done < in.size();) {
      const Piece p = piece(offset + done, in.size() - done);
      co_await write_piece(p, in.subspan(done, p.length), flags);
      done += p.length;
    }
  }

  // Every metadata update went to the child when it was made: its flush covers them.
  asio::awaitable<void> flush() override { co_await child_->flush(); }

  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("trim");
    co_await discard(offset, length, flags, false);
  }

  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("zero");
    co_await discard(offset, length, flags, true);
  }

  // Block granularity: allocated blocks are data; unallocated ones are holes, or what the
  // parent says of that range (data if any layer below has it).
  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    assert(offset + length <= size_);
    std::vector<Extent> out;
    auto add = [&](Extent e) {
      if (!out.empty() && out.back().kind == e.kind) {
        out.back().length += e.length;
      } else {
        out.push_back(e);
      }
    };
    for (uint64_t done = 0; done < length && out.size() < max_extents;) {
      const Piece p = piece(offset + done, length - done);
      const bool allocated = bat_[p.block].load(std::memory_order_acquire) != bat_unused;
      if (allocated || !parent_) {
        add(Extent{p.length, allocated ? ExtentKind::data : ExtentKind::hole});
        done += p.length;
        continue;
      }
      uint64_t covered = 0;
      for (const Extent& e :
           co_await parent_->extents(virtual_offset(p.block, p.offset), p.length)) {
        add(e);
        covered += e.length;
      }
      done += covered;
      if (covered < p.length) break;  // the parent answered for less: callers ask again
    }
    co_return out;
  }
  // Every block allocated: extents() would say data from end to end.
  bool may_have_holes() const override { return unallocated_.load(std::memory_order_acquire) != 0; }

  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    for (uint64_t done = 0; done < length;) {
      const Piece p = piece(offset + done, length - done);
      const uint32_t entry = bat_[p.block].load(std::memory_order_acquire);
      if (entry != bat_unused) {
        co_await child_->prefetch(layout_.block_data(entry) + p.offset, p.length);
      } else if (parent_) {
        co_await parent_->prefetch(virtual_offset(p.block, p.offset), p.length);
      }
      done += p.length;
    }
  }

 private:
  // Blocks the virtual disk covers (the BAT may have more entries).
  uint32_t blocks() const { return static_cast<uint32_t>((size_ + block_size_ - 1) / block_size_); }

  Piece piece(uint64_t offset, uint64_t remaining) const {
    const auto in_block = static_cast<uint32_t>(offset % block_size_);
    return Piece{static_cast<uint32_t>(offset / block_size_), in_block,
                 static_cast<uint32_t>(std::min<uint64_t>(block_size_ - in_block, remaining))};
  }

  uint64_t virtual_offset(uint32_t block, uint32_t offset) const {
    return uint64_t{block} * block_size_ + offset;
  }

  void check_writable(std::string_view what) const {
    if (!caps_.writable) {
      backends::fail(std::errc::operation_not_permitted, "vhd: {}: {} on a read-only image",
                     describe(), what);
    }
  }

  // Sectors this file does not hold: zeroes, or the parent's data (differencing).
  asio::awaitable<void> read_absent(uint32_t block, uint32_t offset, std::span<std::byte> out) {
    if (parent_) {
      co_await parent_->read(virtual_offset(block, offset), out);
    } else {
      std::memset(out.data(), 0, out.size());
    }
  }

  // The block's bitmap state, loading its bitmap from the file on first use.
  asio::awaitable<State> bitmap_state(uint32_t block, uint32_t entry) {
    const State known = bitmaps_.state(block);
    if (known != State::unknown) co_return known;
    std::vector<std::byte> bits(layout_.bitmap_bytes);
    co_await child_->read(DynamicLayout::block_offset(entry), bits);
    co_return bitmaps_.load(block, bits);
  }

  asio::awaitable<void> read_piece(const Piece& p, std::span<std::byte> out) {
    const uint32_t entry = bat_[p.block].load(std::memory_order_acquire);
    if (entry == bat_unused) {
      co_await read_absent(p.block, p.offset, out);
      co_return;
    }
    const uint64_t data = layout_.block_data(entry);
    if (co_await bitmap_state(p.block, entry) == State::full) {
      co_await child_->read(data + p.offset, out);
      co_return;
    }
    // Runs of present and absent sectors.
    const uint32_t end = p.offset + p.length;
    const uint32_t end_sector = p.end_sector();
    for (uint32_t pos = p.offset; pos < end;) {
      const uint32_t s = pos / sector;
      const bool present = bitmaps_.test(p.block, s);
      const uint32_t run = bitmaps_.run_end(p.block, s, end_sector, present);
      if (run == s) continue;  // a concurrent write set the bit: look again
      const uint32_t stop = std::min(end, run * sector);
      const auto part = out.subspan(pos - p.offset, stop - pos);
      if (present) {
        co_await child_->read(data + pos, part);
      } else {
        co_await read_absent(p.block, pos, part);
      }
      pos = stop;
    }
  }

  asio::awaitable<void> write_piece(const Piece& p, std::span<const std::byte> data,
                                    WriteFlags flags) {
    const uint32_t entry = bat_[p.block].load(std::memory_order_acquire);
    if (entry != bat_unused && co_await all_present(p, entry)) {
      co_await child_->write(layout_.block_data(entry) + p.offset, data, flags);
      co_return;
    }
    auto guard = co_await mutex_.scoped();
    const uint32_t now = bat_[p.block].load(std::memory_order_acquire);
    if (now == bat_unused) {
      co_await allocate(p, data, flags);
    } else if (co_await all_present(p, now)) {  // another request allocated it meanwhile
      co_await child_->write(layout_.block_data(now) + p.offset, data, flags);
    } else {
      co_await write_absent(p, now, data, flags);
    }
  }

  asio::awaitable<bool> all_present(const Piece& p, uint32_t entry) {
    co_return co_await bitmap_state(p.block, entry) == State::full ||
        bitmaps_.all_set(p.block, p.first_sector(), p.end_sector());
  }

  // A write that covers absent sectors of an allocated block (images from other tools set
  // only the bits of sectors written). Called under the lock: partial absent sectors are
  // written whole, from what they read as, and two such writes must not interleave.
  // The data goes first, then the bits: a crash in between leaves the sectors absent.
  asio::awaitable<void> write_absent(const Piece& p, uint32_t entry,
                                     std::span<const std::byte> data, WriteFlags flags) {
    const uint32_t first = p.first_sector(), last = p.end_sector();
    const uint32_t end = p.offset + p.length;
    const uint32_t from =
        p.offset % sector != 0 && !bitmaps_.test(p.block, first) ? first * sector : p.offset;
    const uint32_t to =
        end % sector != 0 && !bitmaps_.test(p.block, last - 1) ? last * sector : end;
    const uint64_t at = layout_.block_data(entry);
    const WriteFlags fua{.fua = flags.fua};
    if (from == p.offset && to == end) {
      co_await child_->write(at + from, data, fua);
    } else {
      std::vector<std::byte> buffer(to - from);
      if (from < p.offset) {
        co_await read_absent(p.block, from, std::span(buffer).first(p.offset - from));
      }
      if (to > end) co_await read_absent(p.block, end, std::span(buffer).last(to - end));
      std::memcpy(buffer.data() + (p.offset - from), data.data(), data.size());
      co_await child_->write(at + from, buffer, fua);
    }
    bitmaps_.set_range(p.block, first, last);
    co_await write_bitmap(p.block, entry, first, last, flags.fua);
  }

  // Writes the bitmap sectors of `block` that hold the bits of sectors [first, last).
  asio::awaitable<void> write_bitmap(uint32_t block, uint32_t entry, uint32_t first, uint32_t last,
                                     bool fua) {
    const uint64_t from = uint64_t{first} / 8 / sector * sector;
    const uint64_t to = (uint64_t{last - 1} / 8 / sector + 1) * sector;
    std::vector<std::byte> bytes(to - from);
    bitmaps_.encode(block, from, bytes);
    co_await child_->write(DynamicLayout::block_offset(entry) + from, bytes, {.fua = fua});
  }

  // Writes the BAT sector holding entry `index`, with `value` for that entry.
  asio::awaitable<void> write_bat_sector(uint32_t index, uint32_t value, bool fua) {
    const uint32_t first = index / entries_per_sector * entries_per_sector;
    std::array<uint32_t, entries_per_sector> entries;
    for (uint32_t k = 0; k < entries_per_sector; ++k) {
      const uint64_t i = uint64_t{first} + k;
      entries[k] = i == index                ? value
                   : i < layout_.bat_entries ? bat_[i].load(std::memory_order_relaxed)
                                             : bat_unused;
    }
    co_await child_->write(layout_.bat_entry_offset(first), encode_bat(entries, sector),
                           {.fua = fua});
  }

  // Called under the lock, for a block that is still unallocated. A dynamic disk's new block
  // has every bit set; a differencing disk's only those of the sectors written (the rest
  // still reads from the parent), and partial sectors at the ends are completed with the
  // parent's bytes, since a bit covers a whole sector (formats.md §1.7).
  asio::awaitable<void> allocate(const Piece& p, std::span<const std::byte> data,
                                 WriteFlags flags) {
    const uint64_t old_size = file_size_;
    const uint64_t start = block_start(old_size - footer_size);
    const uint64_t entry = start / sector;
    if (entry >= bat_unused) {
      backends::fail(std::errc::no_space_on_device,
                     "vhd: {}: cannot allocate block {}: it would start at 0x{:x}, past the 2 "
                     "TiB a BAT entry can address",
                     describe(), p.block, start);
    }
    // What goes into the block: bytes [from, to) of it, data plus the partial sectors'
    // rest from the parent.
    const uint32_t from = parent_ ? p.first_sector() * sector : p.offset;
    const uint32_t to = parent_ ? p.end_sector() * sector : p.offset + p.length;
    std::vector<std::byte> payload;
    if (from != p.offset || to != p.offset + p.length) {
      payload.resize(to - from);
      const uint32_t end = p.offset + p.length;
      if (from < p.offset) {
        co_await read_absent(p.block, from, std::span(payload).first(p.offset - from));
      }
      if (end < to) co_await read_absent(p.block, end, std::span(payload).last(to - end));
      std::memcpy(payload.data() + (p.offset - from), data.data(), data.size());
      data = payload;
    }
    const uint64_t new_size = start + layout_.block_span() + footer_size;
    // A fresh block is zeroes (grow() says so), so marking every sector present is
    // right for a dynamic disk and saves a bitmap update on every later first write; a
    // differencing disk marks the sectors written.
    std::vector<std::byte> bitmap(layout_.bitmap_bytes);
    const uint32_t first = parent_ ? p.first_sector() : 0;
    const uint32_t last = parent_ ? p.end_sector() : layout_.sectors_per_block();
    for (uint32_t k = first; k < last; ++k) bitmap[k / 8] |= bitmap_mask(k);
    std::exception_ptr error;
    try {
      // The file grows with the footer at its new end in one step; the old footer, at or
      // just before where the new block starts, is overwritten only afterwards.
      co_await child_->grow(new_size, footer_);
      if (from == 0) {
        std::vector<std::byte> head(bitmap);
        head.insert(head.end(), data.begin(), data.end());
        co_await child_->write(start, head, {});
      } else {
        co_await child_->write(start, bitmap, {});
        co_await child_->write(start + layout_.bitmap_bytes + from, data, {});
      }
      // Footer, bitmap, data and the new file size are durable before the BAT points here.
      co_await child_->flush();
    } catch (...) {
      error = std::current_exception();
    }
    if (error) {
      co_await undo_growth(old_size);
      std::rethrow_exception(error);
    }
    file_size_ = new_size;
    co_await write_bat_sector(p.block, static_cast<uint32_t>(entry), flags.fua);
    if (parent_) {
      bitmaps_.set_bits(p.block, bitmap);
    } else {
      bitmaps_.set_full(p.block);
    }
    bat_[p.block].store(static_cast<uint32_t>(entry), std::memory_order_release);
    unallocated_.fetch_sub(1, std::memory_order_release);
    log::data("vhd: {}: block {} allocated at 0x{:x}", describe(), p.block, start);
  }

  // Where a block appended after `end` (the old footer's place) starts. Its data is put on
  // a 4 KiB boundary when the block is big enough for the padding not to matter (at most
  // 3.5 KiB, left unreferenced; it may keep the old footer): page-aligned writes are what
  // the page cache takes without reading partial pages first, and what O_DIRECT and 4K
  // devices need. Blocks only need sector alignment (§1.6), so other readers do not care.
  uint64_t block_start(uint64_t end) const {
    constexpr uint64_t page = 4096;
    if (block_size_ < 16 * page) return end;
    const uint64_t bitmap = layout_.bitmap_bytes;
    return (end + bitmap + page - 1) / page * page - bitmap;
  }

  // Best effort after a failed allocation: the file as it was, ending in its footer.
  asio::awaitable<void> undo_growth(uint64_t old_size) {
    std::exception_ptr error;
    try {
      co_await child_->resize(old_size);
      co_await child_->write(old_size - footer_size, footer_, {});
    } catch (...) {
      error = std::current_exception();
    }
    if (error) {
      file_size_ = child_->size();
      log::error(
          "vhd: {}: could not restore the footer at the end of the file after a failed "
          "block allocation; the image needs repair",
          describe());
    }
  }

  // trim (zero = false) or zero. Whole blocks are freed (a free block of a dynamic disk
  // reads as zeroes); the rest goes to the child, which zeroes or punches in place (absent
  // sectors read as zeroes whatever the file holds, so their bits can stay as they are).
  asio::awaitable<void> discard(uint64_t offset, uint64_t length, WriteFlags flags, bool zero) {
    assert(offset + length <= size_);
    if (parent_) {
      if (zero) co_await zero_over_parent(offset, length, flags);
      co_return;  // a trim may leave anything, and freeing would show the parent
    }
    for (uint64_t done = 0; done < length;) {
      const Piece p = piece(offset + done, length - done);
      done += p.length;
      const uint32_t entry = bat_[p.block].load(std::memory_order_acquire);
      if (entry == bat_unused) continue;
      const bool whole =
          p.offset == 0 && (p.length == block_size_ || virtual_offset(p.block, p.length) == size_);
      if (whole && !(zero && flags.no_hole)) {
        co_await free_block(p.block, flags);
      } else if (zero) {
        co_await child_->zero(layout_.block_data(entry) + p.offset, p.length, flags);
      } else {
        co_await child_->trim(layout_.block_data(entry) + p.offset, p.length, flags);
      }
    }
  }

  // zero() on a differencing disk: the sectors must read as zeroes, not as the parent's
  // data, so absent sectors become present zeroes (written, then their bits set) and
  // present ones are zeroed in place. Blocks are never freed.
  asio::awaitable<void> zero_over_parent(uint64_t offset, uint64_t length, WriteFlags flags) {
    constexpr uint32_t chunk = 1u << 20;
    std::vector<std::byte> zeroes;
    for (uint64_t done = 0; done < length;) {
      const Piece p = piece(offset + done, std::min<uint64_t>(length - done, chunk));
      done += p.length;
      const uint32_t entry = bat_[p.block].load(std::memory_order_acquire);
      if (entry != bat_unused && co_await all_present(p, entry)) {
        co_await child_->zero(layout_.block_data(entry) + p.offset, p.length,
                              {.fua = flags.fua, .no_hole = flags.no_hole});
        continue;
      }
      zeroes.resize(std::max<std::size_t>(zeroes.size(), p.length));
      co_await write_piece(p, std::span(zeroes).first(p.length), {.fua = flags.fua});
    }
  }

  asio::awaitable<void> free_block(uint32_t block, WriteFlags flags) {
    assert(!parent_);  // differencing: a free block reads the parent, not zeroes
    auto guard = co_await mutex_.scoped();
    const uint32_t entry = bat_[block].load(std::memory_order_acquire);
    if (entry == bat_unused) co_return;
    co_await write_bat_sector(block, bat_unused, flags.fua);
    // Counted before the entry changes: a reader that sees the free entry sees the count.
    unallocated_.fetch_add(1, std::memory_order_release);
    bat_[block].store(bat_unused, std::memory_order_release);
    guard.unlock();
    log::data("vhd: {}: block {} freed (was at 0x{:x})", describe(), block,
              DynamicLayout::block_offset(entry));
    // Only a hint to the file: the block is already free.
    std::exception_ptr error;
    try {
      co_await child_->trim(DynamicLayout::block_offset(entry), layout_.block_span(), {});
    } catch (...) {
      error = std::current_exception();
    }
    if (error) log::debug("vhd: {}: punching freed block {} failed; ignored", describe(), block);
  }

  const DevicePtr child_;
  const DevicePtr parent_;
  const DynamicLayout layout_;
  const std::array<std::byte, footer_size> footer_;
  const uint64_t size_;
  const uint32_t block_size_;
  Caps caps_;
  // BAT entries: read without the lock (acquire), changed only under it (release), after
  // the block they point at is complete.
  std::unique_ptr<std::atomic<uint32_t>[]> bat_;
  SectorBitmaps bitmaps_;
  std::atomic<uint64_t> unallocated_{0};  // BAT entries of blocks() that are unused
  backends::AsyncMutex mutex_;
  uint64_t file_size_;  // the child's size; under mutex_
};

}  // namespace

DevicePtr make_dynamic(DynamicParams params) {
  return std::make_shared<DynamicVhd>(std::move(params));
}

}  // namespace imagenbd::formats::vhd
