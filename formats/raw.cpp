// The raw format: forwards every call to the child. Derives from BlockDevice directly, so
// a new interface method is a compile error here rather than a silent pass-through.
//
// The probed-raw guard follows qemu's raw-format.c ("probed raw: writes to block 0
// restricted"), but asks probe_format() itself, so the guard and the prober can never
// disagree: a write is refused if, after it, the image would probe as anything but raw.
#include "formats/raw.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/error.hpp"
#include "formats/open_image.hpp"

namespace imagenbd::formats {

namespace {

using backends::Caps;
using backends::Extent;
using backends::WriteFlags;
namespace asio = boost::asio;

constexpr uint64_t probe_bytes = 512;  // what open_image reads at each end

std::string_view upper_name(Format format) {
  switch (format) {
    case Format::vhd:
      return "VHD";
    case Format::vdi:
      return "VDI";
    default:
      return "another format";
  }
}

class Raw final : public backends::BlockDevice {
 public:
  Raw(DevicePtr child, const RawOptions& options)
      : child_(std::move(child)), size_(child_->size()), caps_(child_->caps()) {
    if (options.read_only) {
      caps_.writable = caps_.fua = caps_.trim = caps_.zero = caps_.fast_zero = false;
    }
    guarded_ = options.probed && caps_.writable;
    probe_length_ = std::min(size_, probe_bytes);
  }

  std::string_view name() const override { return "raw"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return size_; }
  Caps caps() const override { return caps_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    co_await child_->read(offset, out);
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    check_writable("write");
    if (guarded_ && in_probe_area(offset, in.size())) {
      co_await guarded_write(offset, in, flags);
    } else {
      co_await child_->write(offset, in, flags);
    }
  }

  asio::awaitable<void> flush() override { co_await child_->flush(); }

  // Neither trim nor zero can create a magic (both have no zero bytes), so no guard here.
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("trim");
    co_await child_->trim(offset, length, flags);
  }

  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("zero");
    co_await child_->zero(offset, length, flags);
  }

  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    co_return co_await child_->extents(offset, length);
  }
  bool may_have_holes() const override { return child_->may_have_holes(); }

  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    co_await child_->prefetch(offset, length);
  }

 private:
  void check_writable(std::string_view what) const {
    if (!caps_.writable) {
      backends::fail(std::errc::operation_not_permitted, "raw: {}: {} on a read-only image",
                     describe(), what);
    }
  }

  bool in_probe_area(uint64_t offset, uint64_t length) const {
    return offset < probe_length_ || offset + length > size_ - probe_length_;
  }

  // Builds the probe window at `at` as it will be after the write: the child's bytes,
  // overlaid with the part of `in` that falls inside it. A window the write does not touch
  // is left empty: it probed as raw at open, and every write that could change that comes
  // through here.
  asio::awaitable<std::vector<std::byte>> window_after(uint64_t at, uint64_t offset,
                                                       std::span<const std::byte> in) {
    const uint64_t from = std::max(at, offset);
    const uint64_t to = std::min(at + probe_length_, offset + in.size());
    if (from >= to) co_return std::vector<std::byte>{};
    std::vector<std::byte> window(probe_length_);
    const bool covered = from == at && to == at + probe_length_;
    if (!covered) co_await child_->read(at, window);
    std::memcpy(window.data() + (from - at), in.data() + (from - offset), to - from);
    co_return window;
  }

  asio::awaitable<void> guarded_write(uint64_t offset, std::span<const std::byte> in,
                                      WriteFlags flags) {
    // Two partial writes checked at the same time could form a magic together, so guarded
    // writes go one at a time. They are rare (sector 0 and the last sector), so yielding
    // until the flag is free is enough; a real async mutex is not worth it here.
    while (guard_busy_.exchange(true, std::memory_order_acquire)) {
      co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
    }
    struct Release {
      std::atomic<bool>& flag;
      ~Release() { flag.store(false, std::memory_order_release); }
    } release{guard_busy_};

    const auto head = co_await window_after(0, offset, in);
    const auto tail = co_await window_after(size_ - probe_length_, offset, in);
    const Format format = probe_format(head, tail);
    if (format != Format::raw) {
      backends::fail(std::errc::operation_not_permitted,
                     "raw: {}: refusing a write that would make the image look like {} (format "
                     "was probed; use --format=raw)",
                     describe(), upper_name(format));
    }
    co_await child_->write(offset, in, flags);
  }

  const DevicePtr child_;
  const uint64_t size_;
  Caps caps_;
  bool guarded_ = false;
  uint64_t probe_length_ = 0;
  std::atomic<bool> guard_busy_{false};
};

}  // namespace

DevicePtr open_raw(DevicePtr child, const RawOptions& options) {
  return std::make_shared<Raw>(std::move(child), options);
}

}  // namespace imagenbd::formats
