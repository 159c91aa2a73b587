// The VDI codec: byte offsets of the header fields (formats.md §2.1-2.2), little-endian
// load/store, the checks of formats.md §6 in the order a reader meets the fields, and the
// block map. Offsets in comments are absolute file offsets.
#include "formats/vdi_layout.hpp"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cstring>

#include <fmt/format.h>

namespace imagenbd::formats::vdi {

namespace {

// Absolute offsets of the fields in the first sector.
constexpr std::size_t off_text = 0x00, text_size = 0x40;
constexpr std::size_t off_signature = 0x40;
constexpr std::size_t off_version = 0x44;
constexpr std::size_t off_header_size = 0x48;
constexpr std::size_t off_type = 0x4C;
constexpr std::size_t off_flags = 0x50;
constexpr std::size_t off_comment = 0x54, comment_size = 0x100;
constexpr std::size_t off_blocks_offset = 0x154;
constexpr std::size_t off_data_offset = 0x158;
constexpr std::size_t off_legacy = 0x15C;  // 4 x u32: cylinders, heads, sectors, sector size
constexpr std::size_t off_unused = 0x16C;
constexpr std::size_t off_disk_size = 0x170;
constexpr std::size_t off_block_size = 0x178;
constexpr std::size_t off_block_extra = 0x17C;
constexpr std::size_t off_blocks = 0x180;
constexpr std::size_t off_blocks_allocated = 0x184;
constexpr std::size_t off_uuid_create = 0x188;
constexpr std::size_t off_uuid_modify = 0x198;
constexpr std::size_t off_uuid_linkage = 0x1A8;
constexpr std::size_t off_uuid_parent_modify = 0x1B8;
constexpr std::size_t off_lchs = 0x1C8;  // only when header_size >= 0x190
static_assert(off_lchs + 16 <= header_bytes);
static_assert(pre_header_size + header_size_v1 == off_lchs);

uint32_t load_le32(const std::byte* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}
uint64_t load_le64(const std::byte* p) {
  return load_le32(p) | uint64_t{load_le32(p + 4)} << 32;
}
void store_le32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
void store_le64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}

// A NUL-padded text field: up to the first NUL, or the whole field.
std::string load_text(const std::byte* p, std::size_t size) {
  const char* c = reinterpret_cast<const char*>(p);
  return std::string(c, strnlen(c, size));
}
// Stores text NUL padded, cut so that at least one NUL remains.
void store_text(std::byte* p, std::size_t size, const std::string& text) {
  std::memset(p, 0, size);
  std::memcpy(p, text.data(), std::min(text.size(), size - 1));
}

Geometry load_geometry(const std::byte* p) {
  return Geometry{load_le32(p), load_le32(p + 4), load_le32(p + 8), load_le32(p + 12)};
}
void store_geometry(std::byte* p, const Geometry& g) {
  store_le32(p, g.cylinders);
  store_le32(p + 4, g.heads);
  store_le32(p + 8, g.sectors);
  store_le32(p + 12, g.sector_size);
}

template <typename... Args>
Problem invalid(fmt::format_string<Args...> format, Args&&... args) {
  return Problem{std::errc::invalid_argument, fmt::format(format, std::forward<Args>(args)...)};
}
template <typename... Args>
Problem unsupported(fmt::format_string<Args...> format, Args&&... args) {
  return Problem{std::errc::operation_not_supported,
                 fmt::format(format, std::forward<Args>(args)...)};
}

bool is_power_of_two(uint32_t v) {
  return std::has_single_bit(v);
}

uint64_t round_up(uint64_t v, uint64_t to) {
  return (v + to - 1) / to * to;
}

}  // namespace

std::string_view type_name(uint32_t image_type) {
  switch (image_type) {
    case 1:
      return "dynamic";
    case 2:
      return "static";
    case 3:
      return "undo";
    case 4:
      return "differencing";
    default:
      return "unknown";
  }
}

std::optional<Problem> check_file_size(uint64_t file_size) {
  if (file_size < header_bytes) {
    return invalid("file is {} bytes, shorter than the {}-byte header (truncated?)", file_size,
                   header_bytes);
  }
  return std::nullopt;
}

Header decode_header(std::span<const std::byte> sector) {
  assert(sector.size() >= header_bytes);
  const std::byte* p = sector.data();
  Header h;
  h.text = load_text(p + off_text, text_size);
  h.signature = load_le32(p + off_signature);
  h.version = load_le32(p + off_version);
  h.header_size = load_le32(p + off_header_size);
  h.image_type = load_le32(p + off_type);
  h.flags = load_le32(p + off_flags);
  h.comment = load_text(p + off_comment, comment_size);
  h.blocks_offset = load_le32(p + off_blocks_offset);
  h.data_offset = load_le32(p + off_data_offset);
  h.legacy = load_geometry(p + off_legacy);
  h.unused = load_le32(p + off_unused);
  h.disk_size = load_le64(p + off_disk_size);
  h.block_size = load_le32(p + off_block_size);
  h.block_extra = load_le32(p + off_block_extra);
  h.blocks = load_le32(p + off_blocks);
  h.blocks_allocated = load_le32(p + off_blocks_allocated);
  h.uuid_create = load_uuid(sector.subspan<off_uuid_create, 16>());
  h.uuid_modify = load_uuid(sector.subspan<off_uuid_modify, 16>());
  h.uuid_linkage = load_uuid(sector.subspan<off_uuid_linkage, 16>());
  h.uuid_parent_modify = load_uuid(sector.subspan<off_uuid_parent_modify, 16>());
  if (h.header_size >= header_size_v1plus) h.lchs = load_geometry(p + off_lchs);
  return h;
}

void encode_header(const Header& h, std::span<std::byte> out) {
  assert(out.size() >= header_bytes);
  std::byte* p = out.data();
  store_text(p + off_text, text_size, h.text);
  store_le32(p + off_signature, h.signature);
  store_le32(p + off_version, h.version);
  store_le32(p + off_header_size, h.header_size);
  store_le32(p + off_type, h.image_type);
  store_le32(p + off_flags, h.flags);
  store_text(p + off_comment, comment_size, h.comment);
  store_le32(p + off_blocks_offset, h.blocks_offset);
  store_le32(p + off_data_offset, h.data_offset);
  store_geometry(p + off_legacy, h.legacy);
  store_le32(p + off_unused, h.unused);
  store_le64(p + off_disk_size, h.disk_size);
  store_le32(p + off_block_size, h.block_size);
  store_le32(p + off_block_extra, h.block_extra);
  store_le32(p + off_blocks, h.blocks);
  store_le32(p + off_blocks_allocated, h.blocks_allocated);
  auto sector = out.first<header_bytes>();
  store_uuid(h.uuid_create, sector.subspan<off_uuid_create, 16>());
  store_uuid(h.uuid_modify, sector.subspan<off_uuid_modify, 16>());
  store_uuid(h.uuid_linkage, sector.subspan<off_uuid_linkage, 16>());
  store_uuid(h.uuid_parent_modify, sector.subspan<off_uuid_parent_modify, 16>());
  if (h.header_size >= header_size_v1plus) store_geometry(p + off_lchs, h.lchs);
}

Result<Layout> check_header(const Header& h, uint64_t file_size) {
  // What the image is, and whether this is a layout we know.
  if (h.signature != signature) {
    return invalid("header: signature 0x{:08x} is not 0x{:08x} (not a VDI image)", h.signature,
                   signature);
  }
  if (h.version != version_1_1) {
    return unsupported("header: version {}.{} is not supported (only 1.1)", h.version >> 16,
                       h.version & 0xffff);
  }
  if (h.header_size < header_size_v1) {
    return invalid("header: header size {} is smaller than {}, the size of a version 1.1 header",
                   h.header_size, header_size_v1);
  }
  if (h.image_type < 1 || h.image_type > 4) {
    return invalid(
        "header: image type {} is not 1 (dynamic), 2 (static), 3 (undo) or 4 (differencing)",
        h.image_type);
  }
  if ((h.flags & ~flag_zero_expand) != 0) {
    return invalid("header: image flags 0x{:x} have unknown bits (only 0x1, zero-expand, exists)",
                   h.flags);
  }
  const bool differencing = h.image_type == static_cast<uint32_t>(ImageType::differencing);
  if (differencing && h.uuid_linkage.is_nil()) {
    return invalid("header: differencing image without a parent UUID (uuidLinkage is nil)");
  }
  if (!differencing && !h.uuid_linkage.is_nil()) {
    return invalid(
        "header: {} image with a parent UUID (uuidLinkage {}); only differencing "
        "images have one",
        type_name(h.image_type), h.uuid_linkage.to_string());
  }

  // Where the structures are.
  const uint64_t header_end = uint64_t{pre_header_size} + h.header_size;
  if (h.blocks_offset % sector_size != 0) {
    return invalid("header: block map offset 0x{:x} is not a multiple of {}", h.blocks_offset,
                   sector_size);
  }
  if (h.data_offset % sector_size != 0) {
    return invalid("header: data offset 0x{:x} is not a multiple of {}", h.data_offset,
                   sector_size);
  }
  if (h.blocks_offset < header_end) {
    return invalid("header: block map offset 0x{:x} lies inside the header (which ends at 0x{:x})",
                   h.blocks_offset, header_end);
  }
  if (h.legacy.sector_size != sector_size) {
    return invalid("header: legacy geometry sector size {} is not {}", h.legacy.sector_size,
                   sector_size);
  }
  if (h.header_size >= header_size_v1plus && h.lchs.sector_size != sector_size) {
    return invalid("header: LCHS geometry sector size {} is not {}", h.lchs.sector_size,
                   sector_size);
  }

  // Sizes.
  if (h.disk_size < sector_size) {
    return invalid("header: disk size {} is smaller than one {}-byte sector", h.disk_size,
                   sector_size);
  }
  if (h.block_size < sector_size) {
    return invalid("header: block size {} is smaller than {}", h.block_size, sector_size);
  }
  if (!is_power_of_two(h.block_size)) {
    return invalid("header: block size {} is not a power of two", h.block_size);
  }
  if (h.block_size > max_block_size) {
    return invalid("header: block size {} is larger than {} (256 MiB)", h.block_size,
                   max_block_size);
  }
  if (h.block_extra != 0 && !is_power_of_two(h.block_extra)) {
    return invalid("header: block extra size {} is neither 0 nor a power of two", h.block_extra);
  }
  if (h.block_extra > max_block_size) {
    return invalid("header: block extra size {} is larger than {} (256 MiB)", h.block_extra,
                   max_block_size);
  }
  // disk_size < 2^64 and block_size >= 512, so this cannot overflow.
  const uint64_t needed = h.disk_size / h.block_size + (h.disk_size % h.block_size != 0);
  if (needed > max_blocks) {
    return invalid("header: disk size {} needs {} blocks of {} bytes, more than the limit of {}",
                   h.disk_size, needed, h.block_size, max_blocks);
  }
  if (h.blocks != needed) {
    return invalid("header: block count {} does not match the disk size {} ({} blocks of {} bytes)",
                   h.blocks, h.disk_size, needed, h.block_size);
  }
  if (h.blocks_allocated > h.blocks) {
    return invalid("header: allocated block count {} is larger than the block count {}",
                   h.blocks_allocated, h.blocks);
  }
  // blocks <= 2^29, so the map ends below 2^32 + 2^31.
  const uint64_t map_end = uint64_t{h.blocks_offset} + uint64_t{h.blocks} * 4;
  if (h.data_offset < map_end) {
    return invalid("header: data offset 0x{:x} lies inside the block map (0x{:x} to 0x{:x})",
                   h.data_offset, h.blocks_offset, map_end);
  }
  if (map_end > file_size) {
    return invalid(
        "header: the block map (0x{:x} to 0x{:x}) extends past the end of the file (0x{:x} "
        "bytes; truncated?)",
        h.blocks_offset, map_end, file_size);
  }
  if (h.data_offset > file_size) {
    return invalid("header: data offset 0x{:x} is past the end of the file (0x{:x} bytes)",
                   h.data_offset, file_size);
  }

  Layout layout;
  layout.disk_size = h.disk_size / sector_size * sector_size;
  layout.disk_size_rounded = layout.disk_size != h.disk_size;
  layout.block_size = h.block_size;
  layout.block_extra = h.block_extra;
  layout.blocks = h.blocks;
  layout.blocks_allocated = h.blocks_allocated;
  layout.blocks_offset = h.blocks_offset;
  layout.data_offset = h.data_offset;
  return layout;
}

std::vector<uint32_t> decode_block_map(std::span<const std::byte> bytes) {
  std::vector<uint32_t> entries(bytes.size() / 4);
  for (std::size_t i = 0; i < entries.size(); ++i) entries[i] = load_le32(bytes.data() + 4 * i);
  return entries;
}

std::vector<std::byte> encode_block_map(std::span<const uint32_t> entries) {
  std::vector<std::byte> bytes(entries.size() * 4);
  for (std::size_t i = 0; i < entries.size(); ++i) store_le32(bytes.data() + 4 * i, entries[i]);
  return bytes;
}

std::array<std::byte, 4> encode_entry(uint32_t entry) {
  std::array<std::byte, 4> bytes;
  store_le32(bytes.data(), entry);
  return bytes;
}

Result<MapUse> check_block_map(const Layout& layout, std::span<const uint32_t> entries,
                               uint64_t file_size) {
  assert(entries.size() == layout.blocks);
  // owner[p] = the entry that points at physical block p. The file holds the 4-byte map, so
  // this costs no more than the map itself.
  std::vector<uint32_t> owner(layout.blocks, entry_free);
  MapUse use;
  for (uint32_t i = 0; i < entries.size(); ++i) {
    const uint32_t p = entries[i];
    if (!is_allocated(p)) continue;
    if (p >= layout.blocks) {
      return invalid("block map entry {} points at block {}, beyond the {} blocks of the image", i,
                     p, layout.blocks);
    }
    const uint64_t end = layout.block_data(p) + layout.block_bytes(i);
    if (end > file_size) {
      return invalid(
          "block map entry {} points past the end of the file (block {} ends at 0x{:x}, the "
          "file is 0x{:x} bytes)",
          i, p, end, file_size);
    }
    if (owner[p] != entry_free) {
      return invalid("block map entries {} and {} point at the same block ({})", owner[p], i, p);
    }
    owner[p] = i;
    ++use.used;
    use.end = std::max(use.end, p + 1);
  }
  return use;
}

Uuid load_uuid(std::span<const std::byte, 16> in) {
  Uuid u;
  for (std::size_t i = 0; i < 16; ++i) u.bytes[i] = static_cast<uint8_t>(in[i]);
  // GUID layout: time_low (4), time_mid (2), time_hi_and_version (2) are little-endian.
  std::reverse(u.bytes.begin(), u.bytes.begin() + 4);
  std::reverse(u.bytes.begin() + 4, u.bytes.begin() + 6);
  std::reverse(u.bytes.begin() + 6, u.bytes.begin() + 8);
  return u;
}

void store_uuid(const Uuid& uuid, std::span<std::byte, 16> out) {
  auto b = uuid.bytes;
  std::reverse(b.begin(), b.begin() + 4);
  std::reverse(b.begin() + 4, b.begin() + 6);
  std::reverse(b.begin() + 6, b.begin() + 8);
  for (std::size_t i = 0; i < 16; ++i) out[i] = static_cast<std::byte>(b[i]);
}

Header new_header(uint64_t disk_size, ImageType type, Uuid create, Uuid modify,
                  uint32_t block_size) {
  Header h;
  h.text = "<<< imagenbd Virtual Disk Image >>>\n";
  h.image_type = static_cast<uint32_t>(type);
  h.disk_size = disk_size;
  h.block_size = block_size;
  h.blocks = static_cast<uint32_t>(disk_size / block_size + (disk_size % block_size != 0));
  h.blocks_offset = header_bytes;
  h.data_offset = static_cast<uint32_t>(header_bytes + round_up(uint64_t{h.blocks} * 4, 512));
  h.blocks_allocated = type == ImageType::fixed ? h.blocks : 0;
  h.uuid_create = create;
  h.uuid_modify = modify;
  return h;
}

std::vector<uint32_t> new_block_map(const Header& h) {
  std::vector<uint32_t> entries(h.blocks, entry_free);
  if (h.image_type == static_cast<uint32_t>(ImageType::fixed)) {
    for (uint32_t i = 0; i < h.blocks; ++i) entries[i] = i;
  }
  return entries;
}

}  // namespace imagenbd::formats::vdi
