// VHD fixtures shared by the format tests.
#pragma once

#include <cstdint>
#include <vector>

#include "backends/block_device.hpp"
#include "backends/memory.hpp"
#include "formats/vhd_layout.hpp"
#include "tests/unit/support/run.hpp"

namespace imagenbd::test {

// A new empty dynamic VHD of `size` bytes in a memory file named disk.vhd, laid out as qemu
// does: footer copy at 0, dynamic header at 512, BAT (all unused) at 1536, footer.
inline backends::DevicePtr dynamic_vhd(uint64_t size, uint32_t block_size = 2u << 20) {
  namespace vhd = formats::vhd;
  constexpr uint64_t bat_offset = 1536;
  vhd::Footer f;
  f.disk_type = static_cast<uint32_t>(vhd::DiskType::dynamic);
  f.data_offset = 512;
  f.current_size = f.original_size = size;
  f.geometry = vhd::max_geometry;
  vhd::DynamicHeader h;
  h.table_offset = bat_offset;
  h.block_size = block_size;
  h.max_table_entries = static_cast<uint32_t>((size + block_size - 1) / block_size);
  const uint64_t bat_bytes = (uint64_t{h.max_table_entries} * 4 + 511) / 512 * 512;
  auto m = backends::open_memory(bat_offset + bat_bytes + 512, "disk.vhd");
  const auto fb = vhd::encode_footer(f);
  run(m->write(0, fb, {}));
  run(m->write(512, vhd::encode_dynamic_header(h), {}));
  run(m->write(
      bat_offset,
      vhd::encode_bat(std::vector<uint32_t>(h.max_table_entries, vhd::bat_unused), bat_bytes), {}));
  run(m->write(bat_offset + bat_bytes, fb, {}));
  return m;
}

}  // namespace imagenbd::test
