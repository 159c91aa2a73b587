// A BlockDevice double that forwards to a child and fails one chosen call (nbdkit's error
// filter; Beast's test::stream fail_count): the Nth data call (read, write, flush, trim,
// zero, extents, prefetch, resize; counting from 1) throws backends::Error with `code`.
// Loop N upward to reach every failure path of the layer above.
#pragma once

#include <atomic>
#include <system_error>

#include "backends/block_device.hpp"
#include "backends/error.hpp"

namespace imagenbd::test {

namespace asio = boost::asio;

class FaultyDevice final : public backends::BlockDevice {
 public:
  FaultyDevice(backends::DevicePtr child, int fail_call, std::errc code = std::errc::io_error)
      : child_(std::move(child)), fail_call_(fail_call), code_(code) {}

  int calls() const { return calls_.load(); }

  std::string_view name() const override { return "faulty"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return child_->size(); }
  backends::Caps caps() const override { return child_->caps(); }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    count("read");
    co_await child_->read(offset, out);
  }
  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              backends::WriteFlags flags) override {
    count("write");
    co_await child_->write(offset, in, flags);
  }
  asio::awaitable<void> flush() override {
    count("flush");
    co_await child_->flush();
  }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    count("trim");
    co_await child_->trim(offset, length, flags);
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length,
                             backends::WriteFlags flags) override {
    count("zero");
    co_await child_->zero(offset, length, flags);
  }
  asio::awaitable<std::vector<backends::Extent>> extents(uint64_t offset,
                                                         uint64_t length) override {
    count("extents");
    co_return co_await child_->extents(offset, length);
  }
  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    count("prefetch");
    co_await child_->prefetch(offset, length);
  }
  asio::awaitable<void> resize(uint64_t new_size) override {
    count("resize");
    co_await child_->resize(new_size);
  }

 private:
  void count(std::string_view what) {
    const int call = ++calls_;
    if (call == fail_call_)
      backends::fail(code_, "faulty: injected failure of call {} ({})", call, what);
  }

  backends::DevicePtr child_;
  int fail_call_;
  std::errc code_;
  std::atomic<int> calls_{0};
};

}  // namespace imagenbd::test
