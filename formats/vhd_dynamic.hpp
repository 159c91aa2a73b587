// Internal to formats/vhd: the layer serving a dynamic VHD, built by open_vhd once the
// footer, the dynamic header and the BAT have passed their checks.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "backends/block_device.hpp"
#include "formats/vhd_layout.hpp"

namespace imagenbd::formats::vhd {

struct DynamicParams {
  backends::DevicePtr child;
  DynamicLayout layout;
  std::vector<uint32_t> bat;  // layout.bat_entries entries that passed check_bat
  // The end footer as read; written again at each new end of file.
  std::array<std::byte, footer_size> footer{};
  uint64_t size = 0;  // the virtual size, <= layout.current_size
  bool writable = false;
  // Differencing disks: the parent layer (as large as `size`), opened read-only. Sectors
  // this file does not hold read from it instead of as zeroes; writes set only the bits of
  // the sectors written; blocks are never freed (formats.md §1.7).
  backends::DevicePtr parent;
};

backends::DevicePtr make_dynamic(DynamicParams params);

}  // namespace imagenbd::formats::vhd
