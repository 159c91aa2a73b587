// The memory leaf: a map from page index to a 64 KiB page, behind one shared_mutex (reads
// share it, writes/trim/zero take it alone). Unallocated pages read as zeroes. All requests
// run inline on the caller's thread: a memcpy is cheaper than a thread hop.
#include "backends/memory.hpp"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>

namespace imagenbd::backends {

namespace {

constexpr uint64_t page_size = 64 << 10;
constexpr std::size_t max_extents = 1024;  // per extents() call; callers ask again

bool is_zero(const std::byte* p, std::size_t n) {
  return n == 0 || (p[0] == std::byte{0} && std::memcmp(p, p + 1, n - 1) == 0);
}

class Memory final : public BlockDevice {
 public:
  Memory(uint64_t size, std::string label) : size_(size), label_(std::move(label)) {
    caps_.writable = caps_.flush = caps_.fua = caps_.trim = caps_.zero = caps_.fast_zero = true;
    caps_.extents = caps_.cache = caps_.multi_conn = true;
  }

  std::string_view name() const override { return "memory"; }
  std::string describe() const override { return label_; }
  uint64_t size() const override { return size_.load(std::memory_order_relaxed); }
  Caps caps() const override { return caps_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    assert(offset + out.size() <= size());
    std::shared_lock lock(mutex_);
    for_each_piece(offset, out.size(),
                   [&](uint64_t index, uint64_t in_page, std::size_t done, std::size_t n) {
                     auto it = pages_.find(index);
                     if (it == pages_.end()) {
                       std::memset(out.data() + done, 0, n);
                     } else {
                       std::memcpy(out.data() + done, it->second.get() + in_page, n);
                     }
                   });
    co_return;
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in, WriteFlags) override {
    assert(offset + in.size() <= size());
    std::unique_lock lock(mutex_);
    for_each_piece(offset, in.size(),
                   [&](uint64_t index, uint64_t in_page, std::size_t done, std::size_t n) {
                     auto it = pages_.find(index);
                     if (it == pages_.end()) {
                       if (is_zero(in.data() + done, n)) return;  // stays a hole
                       // make_unique<T[]> value-initialises: a new page is all zeroes.
                       it = pages_.emplace(index, std::make_unique<std::byte[]>(page_size)).first;
                     }
                     std::memcpy(it->second.get() + in_page, in.data() + done, n);
                   });
    co_return;
  }

  asio::awaitable<void> flush() override { co_return; }

  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags) override {
    clear(offset, length);
    co_return;
  }

  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags) override {
    clear(offset, length);
    co_return;
  }

  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    assert(offset + length <= size());
    std::vector<Extent> out;
    std::shared_lock lock(mutex_);
    const uint64_t end = offset + length;
    uint64_t pos = offset;
    while (pos < end && out.size() < max_extents) {
      uint64_t index = pos / page_size;
      auto it = pages_.lower_bound(index);
      ExtentKind kind = ExtentKind::hole;
      uint64_t stop = end;
      if (it != pages_.end() && it->first == index) {
        kind = ExtentKind::data;  // to the end of this run of consecutive pages
        while (std::next(it) != pages_.end() && std::next(it)->first == it->first + 1) ++it;
        stop = std::min(end, (it->first + 1) * page_size);
      } else if (it != pages_.end()) {
        stop = std::min(end, it->first * page_size);
      }
      out.push_back(Extent{stop - pos, kind});
      pos = stop;
    }
    co_return out;
  }

  asio::awaitable<void> prefetch(uint64_t, uint64_t) override { co_return; }

  // Shrinking frees the pages past the end and zeroes the tail of the last one, so that
  // growing again reads zeroes.
  asio::awaitable<void> resize(uint64_t new_size) override {
    std::unique_lock lock(mutex_);
    const uint64_t old_size = size();
    if (new_size < old_size) {
      pages_.erase(pages_.lower_bound((new_size + page_size - 1) / page_size), pages_.end());
      if (auto it = pages_.find(new_size / page_size); it != pages_.end()) {
        const uint64_t in_page = new_size % page_size;
        std::memset(it->second.get() + in_page, 0, page_size - in_page);
      }
    }
    size_.store(new_size, std::memory_order_relaxed);
    co_return;
  }

 private:
  // Calls fn(page index, offset in page, bytes done so far, piece length) for each piece of
  // [offset, offset + length) that lies in one page.
  template <typename Fn>
  static void for_each_piece(uint64_t offset, std::size_t length, Fn&& fn) {
    for (std::size_t done = 0; done < length;) {
      const uint64_t pos = offset + done;
      const uint64_t in_page = pos % page_size;
      const std::size_t n =
          static_cast<std::size_t>(std::min<uint64_t>(page_size - in_page, length - done));
      fn(pos / page_size, in_page, done, n);
      done += n;
    }
  }

  // Frees pages inside the range and zeroes the parts of others it covers, freeing those
  // that end up all zero. Walks allocated pages only, so huge ranges cost nothing.
  void clear(uint64_t offset, uint64_t length) {
    assert(offset + length <= size());
    if (length == 0) return;
    const uint64_t end = offset + length;
    std::unique_lock lock(mutex_);
    auto it = pages_.lower_bound(offset / page_size);
    while (it != pages_.end() && it->first * page_size < end) {
      const uint64_t page_start = it->first * page_size;
      const uint64_t from = std::max(offset, page_start) - page_start;
      const uint64_t to = std::min(end, page_start + page_size) - page_start;
      std::byte* page = it->second.get();
      if (to - from < page_size) std::memset(page + from, 0, to - from);
      if (to - from == page_size || is_zero(page, page_size)) {
        it = pages_.erase(it);
      } else {
        ++it;
      }
    }
  }

  std::atomic<uint64_t> size_;
  const std::string label_;
  Caps caps_;
  mutable std::shared_mutex mutex_;
  std::map<uint64_t, std::unique_ptr<std::byte[]>> pages_;  // page index -> page_size bytes
};

}  // namespace

DevicePtr open_memory(uint64_t size, std::string label) {
  return std::make_shared<Memory>(size, std::move(label));
}

}  // namespace imagenbd::backends
