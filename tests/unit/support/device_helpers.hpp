// Small helpers shared by the layer tests: bytes from text, a synchronous read, a copy of a
// device in memory, and the backends::Error a call throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include <doctest/doctest.h>

#include "backends/block_device.hpp"
#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "tests/unit/support/run.hpp"

namespace imagenbd::test {

inline std::vector<std::byte> bytes(std::string_view s) {
  std::vector<std::byte> v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}

// Reads n bytes at offset. The buffer starts as 0xee, so bytes a layer forgot to fill show.
inline std::vector<std::byte> read(backends::BlockDevice& d, uint64_t offset, std::size_t n) {
  std::vector<std::byte> v(n, std::byte{0xee});
  run(d.read(offset, v));
  return v;
}

// A memory device holding a copy of `from`'s bytes, with the same label.
inline backends::DevicePtr copy_of(backends::BlockDevice& from) {
  auto to = backends::open_memory(from.size(), from.describe());
  std::vector<std::byte> all(from.size());
  run(from.read(0, all));
  run(to->write(0, all, {}));
  return to;
}

// The backends::Error fn() throws; fails the test if it throws nothing.
template <typename Fn>
backends::Error error_of(Fn&& fn) {
  try {
    fn();
  } catch (const backends::Error& e) {
    return e;
  }
  FAIL("expected backends::Error");
  throw;  // unreachable: FAIL throws
}

}  // namespace imagenbd::test
