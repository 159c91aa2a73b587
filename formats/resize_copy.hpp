// What vhd_resize and vdi_resize share: moving blocks inside the file.
#pragma once

#include <cstdint>
#include <limits>

#include "backends/block_device.hpp"

namespace imagenbd::formats {

// Copies `length` bytes of `file` from offset `from` to offset `to`, 4 MiB at a time.
// Source bytes at or past `source_end` (the old end of a file that has grown) are zeroes
// and are not read.
boost::asio::awaitable<void> copy_bytes(backends::BlockDevice& file, uint64_t from, uint64_t to,
                                        uint64_t length,
                                        uint64_t source_end = std::numeric_limits<uint64_t>::max());

}  // namespace imagenbd::formats
