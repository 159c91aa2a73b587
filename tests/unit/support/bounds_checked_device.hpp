// A BlockDevice double for the damaged-image corpora: forwards to a child and throws
// std::out_of_range (deliberately not backends::Error, so a test that expects a clean
// refusal fails) on any access outside the child, whether or not the leaf's own asserts
// are compiled in. It records the largest single read, so a test can check that a table
// sized from a header field was never read (or allocated) beyond the file.
#pragma once

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>

#include <fmt/format.h>

#include "backends/block_device.hpp"

namespace imagenbd::test {

class BoundsChecked final : public backends::BlockDevice {
 public:
  explicit BoundsChecked(backends::DevicePtr child) : child_(std::move(child)) {}

  uint64_t largest_read() const { return largest_read_.load(); }

  std::string_view name() const override { return "bounds"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return child_->size(); }
  backends::Caps caps() const override { return child_->caps(); }
  boost::asio::awaitable<void> read(uint64_t o, std::span<std::byte> out) override {
    check("read", o, out.size());
    uint64_t seen = largest_read_.load();
    while (seen < out.size() && !largest_read_.compare_exchange_weak(seen, out.size())) {
    }
    co_await child_->read(o, out);
  }
  boost::asio::awaitable<void> write(uint64_t o, std::span<const std::byte> in,
                                     backends::WriteFlags f) override {
    check("write", o, in.size());
    co_await child_->write(o, in, f);
  }
  boost::asio::awaitable<void> flush() override { co_await child_->flush(); }
  boost::asio::awaitable<void> trim(uint64_t o, uint64_t n, backends::WriteFlags f) override {
    check("trim", o, n);
    co_await child_->trim(o, n, f);
  }
  boost::asio::awaitable<void> zero(uint64_t o, uint64_t n, backends::WriteFlags f) override {
    check("zero", o, n);
    co_await child_->zero(o, n, f);
  }
  boost::asio::awaitable<std::vector<backends::Extent>> extents(uint64_t o, uint64_t n) override {
    check("extents", o, n);
    co_return co_await child_->extents(o, n);
  }
  boost::asio::awaitable<void> prefetch(uint64_t o, uint64_t n) override {
    check("prefetch", o, n);
    co_await child_->prefetch(o, n);
  }
  boost::asio::awaitable<void> resize(uint64_t n) override { co_await child_->resize(n); }

 private:
  void check(const char* what, uint64_t offset, uint64_t length) const {
    if (offset > size() || length > size() - offset) {
      throw std::out_of_range(fmt::format("{} of {} bytes at 0x{:x}, outside the {}-byte file",
                                          what, length, offset, size()));
    }
  }

  backends::DevicePtr child_;
  std::atomic<uint64_t> largest_read_{0};
};

}  // namespace imagenbd::test
