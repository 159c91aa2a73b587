// The readahead filter (see readahead.hpp). A stream remembers where its run started,
// where its next read should start, its window, and how far it has prefetched ("ahead"). A
// read that starts where a stream expects it continues that stream (a stream started by a
// read that overtook it is merged back in); when less than half a window is prefetched
// beyond the chunk the read ends in, the stream asks below for the next window,
// [ahead, ahead + window), and doubles the window up to max_window. So the lookahead stays
// between half a window and a window and a half while the window grows, and between one
// and two max_windows once it has grown (two fetches in flight), nothing is asked twice,
// and a run of small reads sends a few large prefetches (one per window), not one per
// read. A read that continues no stream starts a candidate at min_window in place of the
// least recently used one: random reads never prefetch, and a reader that seeks starts
// over small. Cf. the kernel's mm/readahead.c (the asynchronous readahead of the next
// window when the reader reaches a mark in the current one).
// The stream table is a small vector under a mutex held only while a read is classified,
// never across an await.
#include "backends/readahead.hpp"

#include <algorithm>
#include <atomic>
#include <bit>
#include <exception>
#include <mutex>
#include <utility>
#include <vector>

#include "backends/error.hpp"
#include "backends/log.hpp"

namespace imagenbd::backends {

namespace {

constexpr auto relaxed = std::memory_order_relaxed;

class Readahead final : public BlockDevice {
 public:
  Readahead(DevicePtr below, const ReadaheadOptions& o, uint64_t align)
      : below_(std::move(below)), options_(o), align_(align) {}

  std::string_view name() const override { return "readahead"; }
  std::string describe() const override { return below_->describe(); }
  uint64_t size() const override { return below_->size(); }
  Caps caps() const override { return below_->caps(); }
  std::string version_tag() const override { return below_->version_tag(); }

  // The prefetch is sent first: it returns at once (the cache runs it in the background)
  // and its range starts past the chunks this read fetches, so the read does not wait.
  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    const auto [from, to] = classify(offset, out.size());
    if (to > from) {
      try {
        co_await below_->prefetch(from, to - from);
      } catch (const std::exception& e) {
        log::debug("readahead: {}: prefetch of {}+{} failed: {}", describe(), from, to - from,
                   e.what());
      }
    }
    co_await below_->read(offset, out);
  }

  // NBD_CMD_CACHE: straight to the cache.
  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    co_await below_->prefetch(offset, length);
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    co_await below_->write(offset, in, flags);
  }
  asio::awaitable<void> flush() override { co_await below_->flush(); }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    co_await below_->trim(offset, length, flags);
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    co_await below_->zero(offset, length, flags);
  }
  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    co_return co_await below_->extents(offset, length);
  }
  asio::awaitable<void> resize(uint64_t new_size) override { co_await below_->resize(new_size); }
  asio::awaitable<void> grow(uint64_t new_size, std::span<const std::byte> tail) override {
    co_await below_->grow(new_size, tail);
  }
  asio::awaitable<void> close() override { co_await below_->close(); }

  ReadaheadStats stats() const {
    return {prefetches_.load(relaxed), prefetch_bytes_.load(relaxed),
            streams_started_.load(relaxed)};
  }

 private:
  struct Stream {
    uint64_t start = 0;   // where the run's first read started
    uint64_t next = 0;    // where the run's next read should start
    uint64_t window = 0;  // the next prefetch reaches this far past the end of a read
    uint64_t ahead = 0;   // the end of what this stream has prefetched
    uint64_t used = 0;    // clock_ when a read last touched it (least recent is dropped)
  };

  uint64_t round_up(uint64_t n, uint64_t size) const {
    return std::min(size, (n + align_ - 1) / align_ * align_);
  }

  // Reads of one run reach us out of order when several are in flight (a queue depth of 8
  // lets a read overtake the one before it while that one waits below). An overtaking read
  // started a stream of its own, where this run now arrives: that stream is merged into
  // this one (window and prefetched range kept from the longer run), so the run is not
  // lost and its window not reset. Returns the merged stream. Under mutex_.
  std::vector<Stream>::iterator absorb_overtakers(std::vector<Stream>::iterator s) {
    for (;;) {
      auto t = std::find_if(streams_.begin(), streams_.end(), [&](const Stream& x) {
        return &x != &*s && x.start == s->next && x.next > s->next;
      });
      if (t == streams_.end()) return s;
      s->next = t->next;
      s->ahead = std::max(s->ahead, t->ahead);
      s->window = std::max(s->window, t->window);
      s->used = clock_;
      const auto index = (s - streams_.begin()) - (t < s ? 1 : 0);
      streams_.erase(t);
      s = streams_.begin() + index;
    }
  }

  // The range to prefetch for a read of [offset, offset + length), empty if none.
  std::pair<uint64_t, uint64_t> classify(uint64_t offset, uint64_t length) {
    const uint64_t end = offset + length;
    const uint64_t size = below_->size();
    std::lock_guard lock(mutex_);
    ++clock_;
    auto it = std::find_if(streams_.begin(), streams_.end(),
                           [&](const Stream& s) { return s.next == offset; });
    if (it == streams_.end()) {
      streams_started_.fetch_add(1, relaxed);
      Stream candidate{offset, end, options_.min_window, 0, clock_};
      if (streams_.size() < options_.streams) {
        streams_.push_back(candidate);
        it = streams_.end() - 1;
      } else {
        it = std::min_element(streams_.begin(), streams_.end(),
                              [](const Stream& a, const Stream& b) { return a.used < b.used; });
        *it = candidate;
      }
      absorb_overtakers(it);
      return {0, 0};
    }
    it->next = end;
    it->used = clock_;
    it = absorb_overtakers(it);
    Stream& s = *it;
    const uint64_t read_edge = round_up(s.next, size);
    s.ahead = std::max(s.ahead, read_edge);  // what lies behind the read is of no use
    const uint64_t margin = s.ahead - read_edge;
    // Enough is prefetched ahead, or the disk ends there. Enough: half a window while the
    // window grows; a whole one at max_window, so that the next window's fetch overlaps
    // the one in flight (a remote that serves one request at a time no faster than the
    // reader reads would otherwise make the reader wait for every window).
    const uint64_t low_water = s.window < options_.max_window ? s.window / 2 : s.window;
    if ((margin > 0 && margin >= low_water) || s.ahead >= size) return {0, 0};
    const uint64_t from = s.ahead;
    const uint64_t to = round_up(from + s.window, size);
    s.ahead = to;
    log::data("readahead: {}: run at {}: prefetch {}+{} (window {})", describe(), end, from,
              to - from, s.window);
    s.window = std::min(s.window * 2, options_.max_window);
    prefetches_.fetch_add(1, relaxed);
    prefetch_bytes_.fetch_add(to - from, relaxed);
    return {from, to};
  }

  DevicePtr below_;
  const ReadaheadOptions options_;
  const uint64_t align_;
  std::mutex mutex_;  // streams_ and clock_
  std::vector<Stream> streams_;
  uint64_t clock_ = 0;
  std::atomic<uint64_t> prefetches_{0};
  std::atomic<uint64_t> prefetch_bytes_{0};
  std::atomic<uint64_t> streams_started_{0};
};

}  // namespace

DevicePtr open_readahead(DevicePtr below, const ReadaheadOptions& options) {
  const std::string what = below->describe();
  if (options.min_window == 0 || options.max_window < options.min_window)
    fail(std::errc::invalid_argument,
         "readahead: {}: windows {}..{} bytes are not a range (min_window > 0, max_window >= "
         "min_window)",
         what, options.min_window, options.max_window);
  if (options.streams == 0)
    fail(std::errc::invalid_argument, "readahead: {}: at least one stream must be tracked", what);
  if (options.align != 0 && !std::has_single_bit(options.align))
    fail(std::errc::invalid_argument, "readahead: {}: alignment {} is not a power of two", what,
         options.align);
  uint64_t align = options.align;
  if (align == 0) {
    align = std::bit_floor(options.min_window);
    const uint32_t preferred = below->caps().block_preferred;
    if (std::has_single_bit(preferred)) align = std::max<uint64_t>(align, preferred);
  }
  log::debug("readahead: {}: windows {}..{} bytes, {} streams, aligned to {}", what,
             options.min_window, options.max_window, options.streams, align);
  return std::make_shared<Readahead>(std::move(below), options, align);
}

ReadaheadStats readahead_stats(const BlockDevice& device) {
  if (const auto* r = dynamic_cast<const Readahead*>(&device)) return r->stats();
  return {};
}

}  // namespace imagenbd::backends
