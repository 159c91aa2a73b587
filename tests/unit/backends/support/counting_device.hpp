// A remote-like leaf for the cache tests: a memory device that counts its reads, can make
// them wait (a timer, so coroutines on one io_context interleave as over a network), fail
// the next N of them, and change its version_tag() and contents like a changed blob.
#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <system_error>
#include <utility>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/block_device.hpp"
#include "backends/error.hpp"
#include "backends/memory.hpp"

namespace imagenbd::test {

namespace asio = boost::asio;

class CountingDevice final : public backends::BlockDevice {
 public:
  CountingDevice(backends::DevicePtr child, std::string tag = "v1")
      : child_(std::move(child)), tag_(std::move(tag)) {}

  int reads() const { return reads_.load(); }
  int extents_calls() const { return extents_calls_.load(); }
  uint64_t bytes_read() const { return bytes_.load(); }
  void reset_counts() {
    reads_ = 0;
    bytes_ = 0;
  }
  void set_delay(std::chrono::milliseconds d) { delay_ms_ = d.count(); }
  void fail_next_reads(int n) { fail_reads_ = n; }
  void set_version_tag(std::string tag) {
    std::lock_guard lock(mutex_);
    tag_ = std::move(tag);
  }
  void set_block_preferred(uint32_t n) { block_preferred_ = n; }
  backends::BlockDevice& child() { return *child_; }

  std::string_view name() const override { return "counting"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return child_->size(); }
  backends::Caps caps() const override {
    auto c = child_->caps();
    c.writable = false;
    c.block_preferred = block_preferred_.load();
    return c;
  }
  std::string version_tag() const override {
    std::lock_guard lock(mutex_);
    return tag_;
  }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    reads_.fetch_add(1);
    bytes_.fetch_add(out.size());
    if (const auto ms = delay_ms_.load(); ms > 0) {
      asio::steady_timer timer(co_await asio::this_coro::executor, std::chrono::milliseconds(ms));
      co_await timer.async_wait(asio::use_awaitable);
    }
    if (fail_reads_.load() > 0 && fail_reads_.fetch_sub(1) > 0)
      backends::fail(std::errc::io_error, "counting: injected read failure at {}", offset);
    co_await child_->read(offset, out);
  }
  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              backends::WriteFlags flags) override {
    co_await child_->write(offset, in, flags);
  }
  asio::awaitable<void> flush() override { co_await child_->flush(); }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    co_await child_->trim(offset, length, flags);
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    co_await child_->zero(offset, length, flags);
  }
  asio::awaitable<std::vector<backends::Extent>> extents(uint64_t offset,
                                                         uint64_t length) override {
    extents_calls_.fetch_add(1);
    co_return co_await child_->extents(offset, length);
  }
  asio::awaitable<void> prefetch(uint64_t, uint64_t) override { co_return; }

 private:
  backends::DevicePtr child_;
  mutable std::mutex mutex_;
  std::string tag_;
  std::atomic<int> reads_{0};
  std::atomic<int> extents_calls_{0};
  std::atomic<uint64_t> bytes_{0};
  std::atomic<long> delay_ms_{0};
  std::atomic<int> fail_reads_{0};
  std::atomic<uint32_t> block_preferred_{4096};
};

}  // namespace imagenbd::test
