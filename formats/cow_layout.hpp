// The on-disk layout of a copy-on-write overlay file (formats/cow.hpp has the design): a
// 4 KiB header, a block map of one little-endian uint64 per virtual block, then data blocks
// of block_size bytes each, aligned to block_size. Pure: no I/O, never throws, never logs.
// Every field is checked before it is used in arithmetic; a check returns a Problem whose
// message names the structure, the field and the numbers ("header: block size 3000 is not
// a power of two"); the caller adds the layer and the file.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/layout_result.hpp"

namespace imagenbd::formats::cow {

using formats::Problem;
using formats::Result;

// "IMGNBDCW": imagenbd copy-on-write.
constexpr std::array<char, 8> magic = {'I', 'M', 'G', 'N', 'B', 'D', 'C', 'W'};
constexpr uint32_t version = 1;
constexpr uint32_t header_bytes = 4096;
constexpr uint32_t identity_offset = 512;  // the identity string's bytes in the header
constexpr uint32_t max_identity = 2048;
constexpr uint32_t min_block_size = 4096;
constexpr uint32_t max_block_size = 2u << 20;
constexpr uint32_t default_block_size = 64u << 10;
// Virtual sizes up to 2^56 bytes keep every offset below 2^62 (the map of 2^44 blocks is
// 2^47 bytes at most).
constexpr uint64_t max_virtual_size = uint64_t{1} << 56;

// Block map entries. Anything else is the file offset of the block's data.
constexpr uint64_t entry_absent = 0;  // never written here: read the lower disk
constexpr uint64_t entry_zero = 1;    // trimmed or zeroed here: reads as zeroes
constexpr bool is_data(uint64_t entry) {
  return entry > entry_zero;
}

// The header, decoded as it is (host byte order).
//   0  magic[8]         16 block_size u32       32 lower_size u64     56 crc32 u32 (of the
//   8  version u32      20 identity_length u32  40 map_offset u64        4096 bytes, this
//  12  header_bytes u32 24 virtual_size u64     48 data_offset u64       field as zero)
// 512  identity bytes (identity_length, at most 2048); the rest is zero.
struct Header {
  uint32_t version = cow::version;
  uint32_t header_size = header_bytes;
  uint32_t block_size = default_block_size;
  uint64_t virtual_size = 0;
  uint64_t lower_size = 0;  // the lower disk's size when the overlay was created
  uint64_t map_offset = 0;
  uint64_t data_offset = 0;
  std::string identity;  // the caller's name for the lower disk (URI, version tag)
  bool operator==(const Header&) const = default;
};

// Where things are, from a header that passed check_header.
struct Layout {
  uint64_t virtual_size = 0;
  uint32_t block_size = 0;
  uint64_t blocks = 0;
  uint64_t map_offset = 0;
  uint64_t map_bytes = 0;  // blocks * 8, rounded up to 4096
  uint64_t data_offset = 0;

  uint64_t entry_offset(uint64_t index) const { return map_offset + index * 8; }
  // Bytes of block `index` inside the disk: block_size, except maybe for the last block.
  uint32_t block_bytes(uint64_t index) const {
    const uint64_t start = index * block_size;
    return static_cast<uint32_t>(std::min<uint64_t>(block_size, virtual_size - start));
  }
};

// A new overlay's header: the map right after the header, data aligned to block_size.
Result<Header> make_header(uint64_t virtual_size, uint32_t block_size, std::string identity);

// Encodes the 4096 header bytes, with the checksum.
std::vector<std::byte> encode_header(const Header& header);
// Decodes and checks magic, version, checksum and identity length of the first
// header_bytes of `bytes`.
Result<Header> decode_header(std::span<const std::byte> bytes);

// Checks every field against each other and a file of file_size bytes (the map must lie
// inside it).
Result<Layout> check_header(const Header& header, uint64_t file_size);

// Refuses an overlay made over another lower disk, saying which changed.
std::optional<Problem> check_lower(const Header& header, uint64_t lower_size,
                                   std::string_view identity);

// The map: map_bytes / 8 little-endian entries; only the first `blocks` are used.
std::vector<uint64_t> decode_map(std::span<const std::byte> bytes, uint64_t blocks);
void encode_entry(uint64_t entry, std::span<std::byte, 8> out);

// What a checked map says about the data area.
struct MapUse {
  uint64_t data_end = 0;              // just past the last referenced block (data_offset if none)
  std::vector<uint64_t> free_blocks;  // unreferenced block offsets below data_end
};
// Every data entry must be aligned to block_size from data_offset, lie inside a file of
// file_size bytes, and not be shared with another entry.
Result<MapUse> check_map(const Layout& layout, std::span<const uint64_t> entries,
                         uint64_t file_size);

}  // namespace imagenbd::formats::cow
