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
  // Differencing disks (not opened yet): sectors this file does not hold are read from the
  // parent instead of as zeroes. A layer with a parent is read-only until allocation
  // learns to copy up and to set only the bits written (formats.md §1.7).
  backends::DevicePtr parent;
};

backends::DevicePtr make_dynamic(DynamicParams params);

}  // namespace imagenbd::formats::vhd
