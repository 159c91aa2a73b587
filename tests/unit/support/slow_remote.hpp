// A remote-like leaf for the cache and remote-stack tests: a memory device that delays each
// read and write a little (a timer, so coroutines interleave as over a network), counts
// its requests, can hold reads at a gate, and has a version tag that behaves like an Azure
// ETag under our own writes: every write, zero or trim changes the object's generation,
// and version_tag() reports the generation seen at open, refreshed by flush() (as the Azure
// leaf does). reopen() gives a fresh view of the same object, like a server restart.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/block_device.hpp"
#include "backends/memory.hpp"

namespace imagenbd::test {

namespace asio = boost::asio;

class SlowRemote final : public backends::BlockDevice {
 public:
  // The object's bytes and generation, shared by every view (reopen()).
  struct Object {
    backends::DevicePtr bytes;
    std::atomic<uint64_t> generation{1};
  };

  SlowRemote(std::shared_ptr<Object> object, bool writable)
      : object_(std::move(object)), writable_(writable), seen_(object_->generation.load()) {}

  static std::shared_ptr<SlowRemote> make(uint64_t size, bool writable) {
    auto o = std::make_shared<Object>();
    o->bytes = backends::open_memory(size, "slow://remote/disk.img");
    return std::make_shared<SlowRemote>(std::move(o), writable);
  }
  std::shared_ptr<SlowRemote> reopen() const {
    auto r = std::make_shared<SlowRemote>(object_, writable_);
    r->set_delay(delay_);
    return r;
  }

  backends::BlockDevice& bytes() { return *object_->bytes; }
  uint64_t generation() const { return object_->generation.load(); }
  // The object changes under us (another writer, a replaced blob).
  void change_behind_our_back() { object_->generation.fetch_add(1); }

  int reads() const { return reads_.load(); }
  uint64_t bytes_read() const { return bytes_read_.load(); }
  int writes() const { return writes_.load(); }
  int extents_calls() const { return extents_calls_.load(); }
  void set_delay(std::chrono::microseconds d) { delay_ = d; }
  // Reads wait while the gate is closed (polled every millisecond).
  void close_gate() { gate_closed_ = true; }
  void open_gate() { gate_closed_ = false; }
  int reads_at_gate() const { return at_gate_.load(); }

  std::string_view name() const override { return "slow"; }
  std::string describe() const override { return object_->bytes->describe(); }
  uint64_t size() const override { return object_->bytes->size(); }
  backends::Caps caps() const override {
    backends::Caps c;
    c.writable = c.flush = c.fua = c.trim = c.zero = writable_;
    c.multi_conn = true;
    c.block_preferred = 4096;
    return c;
  }
  std::string version_tag() const override {
    std::lock_guard lock(mutex_);
    return "g" + std::to_string(seen_);
  }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    reads_.fetch_add(1);
    bytes_read_.fetch_add(out.size());
    if (gate_closed_.load()) {
      at_gate_.fetch_add(1);
      while (gate_closed_.load()) co_await sleep(std::chrono::milliseconds(1));
      at_gate_.fetch_sub(1);
    }
    co_await sleep(delay_);
    co_await object_->bytes->read(offset, out);
  }
  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              backends::WriteFlags flags) override {
    writes_.fetch_add(1);
    co_await sleep(delay_);
    co_await object_->bytes->write(offset, in, flags);
    object_->generation.fetch_add(1);
  }
  asio::awaitable<void> flush() override {
    const uint64_t g = object_->generation.load();
    std::lock_guard lock(mutex_);
    seen_ = g;
    co_return;
  }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    writes_.fetch_add(1);
    co_await sleep(delay_);
    co_await object_->bytes->trim(offset, length, flags);
    object_->generation.fetch_add(1);
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    writes_.fetch_add(1);
    co_await sleep(delay_);
    co_await object_->bytes->zero(offset, length, flags);
    object_->generation.fetch_add(1);
  }
  asio::awaitable<std::vector<backends::Extent>> extents(uint64_t, uint64_t length) override {
    extents_calls_.fetch_add(1);
    co_return std::vector<backends::Extent>{{length, backends::ExtentKind::data}};
  }
  asio::awaitable<void> prefetch(uint64_t, uint64_t) override { co_return; }

 private:
  static asio::awaitable<void> sleep(std::chrono::microseconds d) {
    if (d.count() <= 0) co_return;
    asio::steady_timer timer(co_await asio::this_coro::executor, d);
    co_await timer.async_wait(asio::use_awaitable);
  }

  std::shared_ptr<Object> object_;
  const bool writable_;
  mutable std::mutex mutex_;
  uint64_t seen_;  // the generation version_tag() reports; under mutex_
  std::chrono::microseconds delay_{0};
  std::atomic<bool> gate_closed_{false};
  std::atomic<int> at_gate_{0};
  std::atomic<int> reads_{0};
  std::atomic<int> extents_calls_{0};
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<int> writes_{0};
};

}  // namespace imagenbd::test
