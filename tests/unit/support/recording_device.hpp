// A BlockDevice double that forwards to a child and records every call as one line
// ("write 1024+512", "flush", "resize 2098176"), so a test can check what a layer sent
// down and in which order (crash-safe allocation, "Cow never writes to its child").
// With yield set, each call first goes round its executor's queue: coroutines on one
// io_context then interleave at every child call, as they would over a real file.
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/block_device.hpp"

namespace imagenbd::test {

namespace asio = boost::asio;

class RecordingDevice final : public backends::BlockDevice {
 public:
  explicit RecordingDevice(backends::DevicePtr child, bool yield = false)
      : child_(std::move(child)), yield_(yield) {}

  // The calls so far, oldest first.
  std::vector<std::string> calls() const {
    std::lock_guard lock(mutex_);
    return calls_;
  }
  void clear() {
    std::lock_guard lock(mutex_);
    calls_.clear();
  }

  std::string_view name() const override { return "recording"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return child_->size(); }
  backends::Caps caps() const override { return child_->caps(); }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    co_await record(fmt::format("read {}+{}", offset, out.size()));
    co_await child_->read(offset, out);
  }
  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              backends::WriteFlags flags) override {
    co_await record(fmt::format("write {}+{}{}", offset, in.size(), flags.fua ? " fua" : ""));
    co_await child_->write(offset, in, flags);
  }
  asio::awaitable<void> flush() override {
    co_await record("flush");
    co_await child_->flush();
  }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    co_await record(fmt::format("trim {}+{}", offset, length));
    co_await child_->trim(offset, length, flags);
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    co_await record(fmt::format("zero {}+{}", offset, length));
    co_await child_->zero(offset, length, flags);
  }
  asio::awaitable<std::vector<backends::Extent>> extents(uint64_t offset,
                                                         uint64_t length) override {
    co_await record(fmt::format("extents {}+{}", offset, length));
    co_return co_await child_->extents(offset, length);
  }
  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    co_await record(fmt::format("prefetch {}+{}", offset, length));
    co_await child_->prefetch(offset, length);
  }
  asio::awaitable<void> resize(uint64_t new_size) override {
    co_await record(fmt::format("resize {}", new_size));
    co_await child_->resize(new_size);
  }

 private:
  asio::awaitable<void> record(std::string line) {
    {
      std::lock_guard lock(mutex_);
      calls_.push_back(std::move(line));
    }
    if (yield_) co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  }

  backends::DevicePtr child_;
  bool yield_;
  mutable std::mutex mutex_;
  std::vector<std::string> calls_;
};

}  // namespace imagenbd::test
