// The VDI on-disk layout (VirtualBox VDICore.h, qemu block/vdi.c; shared/docs/formats.md §2
// and §6): the pre-header and header v1.1 in the first 512 bytes, the block map, and where
// a block lives in the file. Pure: no I/O, never throws, never logs. Every field is checked
// before it is used in arithmetic; a check returns a Problem whose message names the
// structure, the field, its value and what is allowed ("header: block size 3000 is not a
// power of two"); the caller adds the layer and the file.
// Limits: header version 1.1 only (VirtualBox's legacy 0.x layout is refused).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>
#include "formats/layout_result.hpp"

#include "formats/uuid.hpp"

namespace imagenbd::formats::vdi {

constexpr uint32_t signature = 0xBEDA107F;  // file bytes 7F 10 DA BE at 0x40
constexpr uint32_t version_1_1 = 0x00010001;
constexpr std::size_t header_bytes = 512;       // the first sector: pre-header + header
constexpr uint32_t header_size_v1 = 0x180;      // cbHeader of plain 1.1 (qemu)
constexpr uint32_t header_size_v1plus = 0x190;  // 1.1 with LCHS geometry (VirtualBox)
constexpr uint32_t pre_header_size = 0x48;
constexpr uint32_t flag_zero_expand = 1;     // the only defined image flag
constexpr uint32_t entry_free = 0xFFFFFFFF;  // never allocated: zeroes, or the parent's data
constexpr uint32_t entry_zero = 0xFFFFFFFE;  // discarded: zeroes, never the parent's
constexpr uint32_t sector_size = 512;
constexpr uint32_t default_block_size = 1 << 20;
constexpr uint32_t max_block_size = 256 << 20;  // larger ones are absurd (formats.md §6)
// qemu's VDI_BLOCKS_IN_IMAGE_MAX: the block map (4 bytes an entry, padded to a sector) stays
// below 2 GiB. Nothing we accept is refused by qemu for its size.
constexpr uint32_t max_blocks = 0x1FFFFF80;

// True for block map entries that point at a physical block.
constexpr bool is_allocated(uint32_t entry) {
  return entry < entry_zero;
}

enum class ImageType : uint32_t { dynamic = 1, fixed = 2, undo = 3, differencing = 4 };

// "dynamic", "static", "undo", "differencing", or "unknown".
std::string_view type_name(uint32_t image_type);

struct Geometry {
  uint32_t cylinders = 0;
  uint32_t heads = 0;
  uint32_t sectors = 0;
  uint32_t sector_size = vdi::sector_size;
  bool operator==(const Geometry&) const = default;
};

// The first 512 bytes, decoded as they are (host byte order, UUIDs in RFC order). Field
// comments give VirtualBox's names.
struct Header {
  std::string text;  // pre-header text, NUL padded on disk (64 bytes); informational
  uint32_t signature = vdi::signature;
  uint32_t version = version_1_1;
  uint32_t header_size = header_size_v1;  // cbHeader: bytes after the pre-header
  uint32_t image_type = static_cast<uint32_t>(ImageType::dynamic);  // u32Type
  uint32_t flags = 0;                                               // fFlags
  std::string comment;         // szComment, UTF-8, NUL terminated on disk (256 bytes)
  uint32_t blocks_offset = 0;  // offBlocks: the block map
  uint32_t data_offset = 0;    // offData: physical block 0
  Geometry legacy;             // LegacyGeometry; only its sector size matters
  uint32_t unused = 0;
  uint64_t disk_size = 0;                    // cbDisk: virtual size in bytes
  uint32_t block_size = default_block_size;  // cbBlock
  uint32_t block_extra = 0;                  // cbBlockExtra: bytes before the data of each block
  uint32_t blocks = 0;                       // cBlocks: block map entries
  uint32_t blocks_allocated = 0;             // cBlocksAllocated: the next physical block index
  Uuid uuid_create;                          // this image
  Uuid uuid_modify;                          // changes whenever the image is modified
  Uuid uuid_linkage;                         // differencing: the parent's uuid_create
  Uuid uuid_parent_modify;                   // differencing: the parent's uuid_modify when linked
  Geometry lchs;  // LCHSGeometry; on disk only when header_size >= header_size_v1plus
};

// Decodes the first header_bytes of `sector` (which must hold at least that many).
Header decode_header(std::span<const std::byte> sector);
// Writes every field of `header` into the first header_bytes of `out` (LCHS geometry only
// when header_size says it is there); bytes that hold no field are left as they are, so
// re-encoding a header read from a file keeps what we do not know.
void encode_header(const Header& header, std::span<std::byte> out);

// A reason to refuse an image: invalid_argument for damage, operation_not_supported for valid
// images we cannot serve.
using formats::Problem;
using formats::Result;

// Where things are, from a header that passed check_header. Every method is free of
// overflow for such a header (offsets stay below 2^62).
struct Layout {
  uint64_t disk_size = 0;          // cbDisk rounded down to a multiple of 512
  bool disk_size_rounded = false;  // cbDisk was not a multiple of 512
  uint32_t block_size = 0;
  uint32_t block_extra = 0;
  uint32_t blocks = 0;
  uint32_t blocks_allocated = 0;
  uint64_t blocks_offset = 0;
  uint64_t data_offset = 0;

  uint64_t block_stride() const { return uint64_t{block_size} + block_extra; }
  // File offset of the data of physical block p (after its extra bytes).
  uint64_t block_data(uint32_t physical) const {
    return data_offset + physical * block_stride() + block_extra;
  }
  // File offset just past physical block p, extra bytes and all.
  uint64_t block_end(uint32_t physical) const {
    return data_offset + (uint64_t{physical} + 1) * block_stride();
  }
  // File offset of block map entry `index`.
  uint64_t entry_offset(uint32_t index) const { return blocks_offset + uint64_t{index} * 4; }
  // Virtual blocks the disk covers (the map may have entries past them).
  uint32_t disk_blocks() const {
    return static_cast<uint32_t>((disk_size + block_size - 1) / block_size);
  }
  // Bytes of virtual block `index` that lie inside the disk: block_size, except maybe for
  // the last block.
  uint32_t block_bytes(uint32_t index) const {
    const uint64_t start = uint64_t{index} * block_size;
    return static_cast<uint32_t>(std::min<uint64_t>(block_size, disk_size - start));
  }
};

// The file must hold at least the first sector.
std::optional<Problem> check_file_size(uint64_t file_size);

// Checks every header field against the formats.md §6 list and a file of file_size bytes
// (the block map and the data offset must lie inside it). Differencing and undo images
// pass (their links are checked); whether to serve them is the caller's decision.
Result<Layout> check_header(const Header& header, uint64_t file_size);

// The block map: `entries` little-endian uint32 values.
std::vector<uint32_t> decode_block_map(std::span<const std::byte> bytes);
std::vector<std::byte> encode_block_map(std::span<const uint32_t> entries);
std::array<std::byte, 4> encode_entry(uint32_t entry);

// How a checked block map uses the physical blocks.
struct MapUse {
  uint32_t used = 0;  // entries that point at a block
  uint32_t end = 0;   // 1 + the highest physical block an entry points at (0: none)
};

// Checks every entry of a block map read with `layout` from a file of file_size bytes:
// each is free, zero, or a physical block below the block count whose used bytes lie
// inside the file, and no two entries share a physical block.
// Entries at or above blocks_allocated pass (formats.md §2.6, not §6): they are what an
// allocation leaves when its map entry reached the disk and the header's count did not;
// their data was flushed first, and the caller takes max(blocks_allocated, end) as the
// count. Entries past the end of the file are refused.
Result<MapUse> check_block_map(const Layout& layout, std::span<const uint32_t> entries,
                               uint64_t file_size);

// UUIDs as VDI stores them: Microsoft GUID layout (the 4-, 2- and 2-byte fields
// little-endian, the last 8 bytes as they are). 16 bytes each.
Uuid load_uuid(std::span<const std::byte, 16> in);
void store_uuid(const Uuid& uuid, std::span<std::byte, 16> out);

// A header for a new image as qemu lays it out (block map at 0x200, data after it aligned
// to 512), with cBlocks = ceil(disk_size / block_size). Static images get blocks_allocated
// = blocks and need the block map from new_block_map. The caller passes the UUIDs.
Header new_header(uint64_t disk_size, ImageType type, Uuid create, Uuid modify,
                  uint32_t block_size = default_block_size);
// Its block map: all free for dynamic images, entry i = block i for static ones.
std::vector<uint32_t> new_block_map(const Header& header);

}  // namespace imagenbd::formats::vdi
