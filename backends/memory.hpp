// The memory leaf: a sparse RAM disk (cf. nbdkit plugins/memory). Used by unit tests and by
// `imagenbd serve memory:SIZE`; contents are lost when the last reference goes.
#pragma once

#include <cstdint>
#include <string>

#include "backends/block_device.hpp"

namespace imagenbd::backends {

// A writable device of `size` bytes that reads as zeroes. RAM is allocated in 64 KiB pages
// on the first non-zero write and freed again by trim/zero; extents() reports allocated
// pages as data and the rest as holes. resize() grows or shrinks it. describe() returns
// `label`.
// @par Thread Safety: the device may be used from any thread concurrently.
DevicePtr open_memory(uint64_t size, std::string label = "memory");

}  // namespace imagenbd::backends
