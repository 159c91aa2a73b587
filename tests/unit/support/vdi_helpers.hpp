// VDI fixtures shared by the format tests: new images in memory files, and the header and
// block map of a file, read or written directly (not through the vdi layer).
#pragma once

#include <cstdint>
#include <vector>

#include "backends/block_device.hpp"
#include "backends/memory.hpp"
#include "formats/vdi_layout.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/image_helpers.hpp"
#include "tests/unit/support/run.hpp"

namespace imagenbd::test {

inline formats::vdi::Header header_of(backends::BlockDevice& file) {
  return formats::vdi::decode_header(read(file, 0, formats::vdi::header_bytes));
}

inline std::vector<uint32_t> map_of(backends::BlockDevice& file) {
  const formats::vdi::Header h = header_of(file);
  return formats::vdi::decode_block_map(read(file, h.blocks_offset, h.blocks * 4));
}

inline void put_header(backends::BlockDevice& file, const formats::vdi::Header& h) {
  std::vector<std::byte> sector(formats::vdi::header_bytes);
  formats::vdi::encode_header(h, sector);
  run(file.write(0, sector, {}));
}

inline void put_map(backends::BlockDevice& file, const std::vector<uint32_t>& map) {
  run(file.write(header_of(file).blocks_offset, formats::vdi::encode_block_map(map), {}));
}

// Writes header `h` and its block map with every entry free (vdi::new_block_map).
inline void write_new_vdi(backends::BlockDevice& file, const formats::vdi::Header& h) {
  put_header(file, h);
  run(file.write(h.blocks_offset, formats::vdi::encode_block_map(formats::vdi::new_block_map(h)),
                 {}));
}

// A new empty image of `size` bytes in a memory file named disk.vdi, uuidCreate
// uuid_v4(1) and uuidModify uuid_v4(2); a fixed one gets its data area (zeroes).
inline backends::DevicePtr new_vdi(uint64_t size, formats::vdi::ImageType type) {
  const formats::vdi::Header h = formats::vdi::new_header(size, type, uuid_v4(1), uuid_v4(2));
  uint64_t file_size = h.data_offset;
  if (type == formats::vdi::ImageType::fixed) file_size += uint64_t{h.blocks} * h.block_size;
  auto m = backends::open_memory(file_size, "disk.vdi");
  write_new_vdi(*m, h);
  return m;
}

}  // namespace imagenbd::test
