// The VHD codec: byte offsets of the footer and dynamic header fields (formats.md §1.2,
// §1.5), big-endian load/store, checksums, the checks of formats.md §6 in the order a reader
// meets the fields, the BAT, CHS geometry (§1.9) and the virtual size rule (§1.10).
// Offsets in comments are from the start of the structure.
#include "formats/vhd_layout.hpp"

#include <algorithm>
#include <bit>
#include <cassert>
#include <cstring>

#include <fmt/format.h>

namespace imagenbd::formats::vhd {

namespace {

// Footer fields.
constexpr std::size_t f_cookie = 0x00;
constexpr std::size_t f_features = 0x08;
constexpr std::size_t f_version = 0x0C;
constexpr std::size_t f_data_offset = 0x10;
constexpr std::size_t f_timestamp = 0x18;
constexpr std::size_t f_creator_app = 0x1C;
constexpr std::size_t f_creator_version = 0x20;
constexpr std::size_t f_creator_host_os = 0x24;
constexpr std::size_t f_original_size = 0x28;
constexpr std::size_t f_current_size = 0x30;
constexpr std::size_t f_cylinders = 0x38;
constexpr std::size_t f_heads = 0x3A;
constexpr std::size_t f_sectors_per_track = 0x3B;
constexpr std::size_t f_disk_type = 0x3C;
constexpr std::size_t f_checksum = 0x40;
constexpr std::size_t f_unique_id = 0x44;
constexpr std::size_t f_saved_state = 0x54;

// Dynamic header fields.
constexpr std::size_t h_cookie = 0x000;
constexpr std::size_t h_data_offset = 0x008;
constexpr std::size_t h_table_offset = 0x010;
constexpr std::size_t h_version = 0x018;
constexpr std::size_t h_max_table_entries = 0x01C;
constexpr std::size_t h_block_size = 0x020;
constexpr std::size_t h_checksum = 0x024;
constexpr std::size_t h_parent_unique_id = 0x028;
constexpr std::size_t h_parent_timestamp = 0x038;
constexpr std::size_t h_parent_unicode_name = 0x040;
constexpr std::size_t h_parent_locators = 0x240;
constexpr std::size_t locator_size = 24;
static_assert(h_parent_locators + 8 * locator_size == 0x300);

constexpr std::array<char, 8> footer_cookie{'c', 'o', 'n', 'e', 'c', 't', 'i', 'x'};
constexpr std::array<char, 8> header_cookie{'c', 'x', 's', 'p', 'a', 'r', 's', 'e'};

uint16_t load_be16(const std::byte* p) {
  return static_cast<uint16_t>(std::to_integer<uint16_t>(p[0]) << 8 |
                               std::to_integer<uint16_t>(p[1]));
}
uint32_t load_be32(const std::byte* p) {
  return std::to_integer<uint32_t>(p[0]) << 24 | std::to_integer<uint32_t>(p[1]) << 16 |
         std::to_integer<uint32_t>(p[2]) << 8 | std::to_integer<uint32_t>(p[3]);
}
uint64_t load_be64(const std::byte* p) {
  return uint64_t{load_be32(p)} << 32 | load_be32(p + 4);
}
void store_be16(std::byte* p, uint16_t v) {
  p[0] = static_cast<std::byte>(v >> 8);
  p[1] = static_cast<std::byte>(v);
}
void store_be32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (24 - 8 * i));
}
void store_be64(std::byte* p, uint64_t v) {
  store_be32(p, static_cast<uint32_t>(v >> 32));
  store_be32(p + 4, static_cast<uint32_t>(v));
}

template <std::size_t N>
std::array<char, N> load_chars(const std::byte* p) {
  std::array<char, N> out;
  std::memcpy(out.data(), p, N);
  return out;
}
Uuid load_uuid(const std::byte* p) {
  Uuid u;
  std::memcpy(u.bytes.data(), p, 16);  // RFC 4122 order on disk (§1.2)
  return u;
}

template <typename... Args>
Problem invalid(fmt::format_string<Args...> format, Args&&... args) {
  return Problem{std::errc::invalid_argument, fmt::format(format, std::forward<Args>(args)...)};
}

uint64_t round_up(uint64_t v, uint64_t to) {
  return (v + to - 1) / to * to;
}

// Ranges [a, a + alen) and [b, b + blen) share a byte. Operands stay far below 2^63.
bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return a < b + blen && b < a + alen;
}

}  // namespace

std::string_view disk_type_name(uint32_t disk_type) {
  switch (disk_type) {
    case 2:
      return "fixed";
    case 3:
      return "dynamic";
    case 4:
      return "differencing";
    default:
      return "unknown";
  }
}

std::string fourcc_text(std::span<const char> code) {
  std::string out;
  for (char c : code) {
    const auto u = static_cast<unsigned char>(c);
    if (u == 0) {
      out += "\\0";
    } else if (u < 0x20 || u >= 0x7f || c == '"' || c == '\\') {
      out += fmt::format("\\x{:02x}", u);
    } else {
      out += c;
    }
  }
  return out;
}

uint32_t checksum(std::span<const std::byte> structure, std::size_t checksum_offset) {
  assert(checksum_offset + 4 <= structure.size());
  uint32_t sum = 0;
  for (std::size_t i = 0; i < structure.size(); ++i) {
    if (i - checksum_offset < 4) continue;  // the field itself counts as zero
    sum += std::to_integer<uint32_t>(structure[i]);
  }
  return ~sum;
}

Result<Footer> parse_footer(std::span<const std::byte> bytes) {
  if (bytes.size() < footer_size) {
    return invalid("footer: truncated ({} bytes, a footer takes {})", bytes.size(), footer_size);
  }
  const std::byte* p = bytes.data();
  Footer f;
  f.cookie = load_chars<8>(p + f_cookie);
  if (f.cookie != footer_cookie) {
    return invalid("footer: cookie \"{}\" is not \"conectix\"", fourcc_text(f.cookie));
  }
  f.features = load_be32(p + f_features);
  f.format_version = load_be32(p + f_version);
  f.data_offset = load_be64(p + f_data_offset);
  f.timestamp = load_be32(p + f_timestamp);
  f.creator_app = load_chars<4>(p + f_creator_app);
  f.creator_version = load_be32(p + f_creator_version);
  f.creator_host_os = load_be32(p + f_creator_host_os);
  f.original_size = load_be64(p + f_original_size);
  f.current_size = load_be64(p + f_current_size);
  f.geometry.cylinders = load_be16(p + f_cylinders);
  f.geometry.heads = std::to_integer<uint8_t>(p[f_heads]);
  f.geometry.sectors_per_track = std::to_integer<uint8_t>(p[f_sectors_per_track]);
  f.disk_type = load_be32(p + f_disk_type);
  f.checksum = load_be32(p + f_checksum);
  f.unique_id = load_uuid(p + f_unique_id);
  f.saved_state = std::to_integer<uint8_t>(p[f_saved_state]);
  const uint32_t computed = checksum(bytes.first(footer_size), f_checksum);
  if (f.checksum != computed) {
    return invalid("footer: checksum mismatch (stored 0x{:08x}, computed 0x{:08x})", f.checksum,
                   computed);
  }
  return f;
}

std::array<std::byte, footer_size> encode_footer(const Footer& f) {
  std::array<std::byte, footer_size> out{};
  std::byte* p = out.data();
  std::memcpy(p + f_cookie, f.cookie.data(), 8);
  store_be32(p + f_features, f.features);
  store_be32(p + f_version, f.format_version);
  store_be64(p + f_data_offset, f.data_offset);
  store_be32(p + f_timestamp, f.timestamp);
  std::memcpy(p + f_creator_app, f.creator_app.data(), 4);
  store_be32(p + f_creator_version, f.creator_version);
  store_be32(p + f_creator_host_os, f.creator_host_os);
  store_be64(p + f_original_size, f.original_size);
  store_be64(p + f_current_size, f.current_size);
  store_be16(p + f_cylinders, f.geometry.cylinders);
  p[f_heads] = static_cast<std::byte>(f.geometry.heads);
  p[f_sectors_per_track] = static_cast<std::byte>(f.geometry.sectors_per_track);
  store_be32(p + f_disk_type, f.disk_type);
  std::memcpy(p + f_unique_id, f.unique_id.bytes.data(), 16);
  p[f_saved_state] = static_cast<std::byte>(f.saved_state);
  store_be32(p + f_checksum, checksum(out, f_checksum));
  return out;
}

Result<DynamicHeader> parse_dynamic_header(std::span<const std::byte> bytes) {
  if (bytes.size() < header_size) {
    return invalid("dynamic header: truncated ({} bytes, the header takes {})", bytes.size(),
                   header_size);
  }
  const std::byte* p = bytes.data();
  DynamicHeader h;
  h.cookie = load_chars<8>(p + h_cookie);
  if (h.cookie != header_cookie) {
    return invalid("dynamic header: cookie \"{}\" is not \"cxsparse\"", fourcc_text(h.cookie));
  }
  h.data_offset = load_be64(p + h_data_offset);
  h.table_offset = load_be64(p + h_table_offset);
  h.header_version = load_be32(p + h_version);
  h.max_table_entries = load_be32(p + h_max_table_entries);
  h.block_size = load_be32(p + h_block_size);
  h.checksum = load_be32(p + h_checksum);
  h.parent_unique_id = load_uuid(p + h_parent_unique_id);
  h.parent_timestamp = load_be32(p + h_parent_timestamp);
  std::memcpy(h.parent_unicode_name.data(), p + h_parent_unicode_name, 512);
  for (std::size_t i = 0; i < h.parent_locators.size(); ++i) {
    const std::byte* l = p + h_parent_locators + i * locator_size;
    h.parent_locators[i] = ParentLocator{load_be32(l), load_be32(l + 4), load_be32(l + 8),
                                         load_be32(l + 12), load_be64(l + 16)};
  }
  const uint32_t computed = checksum(bytes.first(header_size), h_checksum);
  if (h.checksum != computed) {
    return invalid("dynamic header: checksum mismatch (stored 0x{:08x}, computed 0x{:08x})",
                   h.checksum, computed);
  }
  return h;
}

std::array<std::byte, header_size> encode_dynamic_header(const DynamicHeader& h) {
  std::array<std::byte, header_size> out{};
  std::byte* p = out.data();
  std::memcpy(p + h_cookie, h.cookie.data(), 8);
  store_be64(p + h_data_offset, h.data_offset);
  store_be64(p + h_table_offset, h.table_offset);
  store_be32(p + h_version, h.header_version);
  store_be32(p + h_max_table_entries, h.max_table_entries);
  store_be32(p + h_block_size, h.block_size);
  std::memcpy(p + h_parent_unique_id, h.parent_unique_id.bytes.data(), 16);
  store_be32(p + h_parent_timestamp, h.parent_timestamp);
  std::memcpy(p + h_parent_unicode_name, h.parent_unicode_name.data(), 512);
  for (std::size_t i = 0; i < h.parent_locators.size(); ++i) {
    std::byte* l = p + h_parent_locators + i * locator_size;
    const ParentLocator& loc = h.parent_locators[i];
    store_be32(l, loc.platform_code);
    store_be32(l + 4, loc.data_space);
    store_be32(l + 8, loc.data_length);
    store_be32(l + 12, loc.reserved);
    store_be64(l + 16, loc.data_offset);
  }
  store_be32(p + h_checksum, checksum(out, h_checksum));
  return out;
}

std::optional<Problem> check_footer(const Footer& f, uint64_t data_limit) {
  if (f.format_version != version_1_0) {
    return invalid("footer: file_format_version 0x{:08x} is not supported (only 0x{:08x})",
                   f.format_version, version_1_0);
  }
  if (f.disk_type < 2 || f.disk_type > 4) {
    return invalid("footer: disk_type {} is not 2 (fixed), 3 (dynamic) or 4 (differencing)",
                   f.disk_type);
  }
  if (f.current_size == 0) return invalid("footer: current_size is 0 (an empty disk)");
  if (f.current_size % sector_size != 0) {
    return invalid("footer: current_size {} is not a multiple of {}", f.current_size, sector_size);
  }
  if (f.disk_type == static_cast<uint32_t>(DiskType::fixed)) {
    if (f.current_size > data_limit) {
      return invalid(
          "footer: current_size {} does not fit in the file (the data of a fixed disk must end "
          "by the footer at 0x{:x}; truncated?)",
          f.current_size, data_limit);
    }
    return std::nullopt;
  }
  if (f.current_size > max_dynamic_size) {
    return Problem{std::errc::file_too_large,
                   fmt::format("footer: current_size {} is larger than {} (2040 GiB), the limit "
                               "of {} disks",
                               f.current_size, max_dynamic_size, disk_type_name(f.disk_type))};
  }
  if (f.data_offset % sector_size != 0) {
    return invalid("footer: data_offset 0x{:x} (the dynamic header) is not a multiple of {}",
                   f.data_offset, sector_size);
  }
  if (f.data_offset < footer_size) {
    return invalid("footer: data_offset 0x{:x} (the dynamic header) overlaps the footer copy at 0",
                   f.data_offset);
  }
  if (f.data_offset > data_limit || data_limit - f.data_offset < header_size) {
    return invalid(
        "footer: data_offset 0x{:x} (the dynamic header) is past the end of the file (data ends "
        "at 0x{:x})",
        f.data_offset, data_limit);
  }
  return std::nullopt;
}

uint32_t bitmap_bytes_for(uint32_t block_size) {
  const uint32_t bits = block_size / static_cast<uint32_t>(sector_size);
  return static_cast<uint32_t>(round_up((bits + 7) / 8, sector_size));
}

Result<DynamicLayout> check_dynamic_header(const DynamicHeader& h, const Footer& f,
                                           uint64_t data_limit) {
  if (h.header_version != version_1_0) {
    return invalid("dynamic header: header_version 0x{:08x} is not supported (only 0x{:08x})",
                   h.header_version, version_1_0);
  }
  if (h.block_size < sector_size) {
    return invalid("dynamic header: block_size {} is smaller than {}", h.block_size, sector_size);
  }
  if (!std::has_single_bit(h.block_size)) {
    return invalid("dynamic header: block_size {} is not a power of two", h.block_size);
  }
  if (h.block_size > max_block_size) {
    return invalid("dynamic header: block_size {} is larger than {} (256 MiB)", h.block_size,
                   max_block_size);
  }
  // current_size <= 2040 GiB (check_footer) and block_size >= 512: no overflow.
  const uint64_t needed = f.current_size / h.block_size + (f.current_size % h.block_size != 0);
  if (h.max_table_entries < needed) {
    return invalid(
        "dynamic header: max_table_entries {} is too small for current_size {} (needs {} "
        "blocks of {} bytes)",
        h.max_table_entries, f.current_size, needed, h.block_size);
  }
  if (h.max_table_entries > max_bat_entries) {
    return invalid("dynamic header: max_table_entries {} is larger than the limit of {}",
                   h.max_table_entries, max_bat_entries);
  }
  const uint64_t bat_bytes = round_up(uint64_t{h.max_table_entries} * 4, sector_size);
  if (h.table_offset % sector_size != 0) {
    return invalid("dynamic header: table_offset 0x{:x} (the BAT) is not a multiple of {}",
                   h.table_offset, sector_size);
  }
  if (h.table_offset > data_limit || data_limit - h.table_offset < bat_bytes) {
    return invalid(
        "dynamic header: table_offset 0x{:x} with {} entries (0x{:x} bytes): the BAT runs past "
        "the end of the file (data ends at 0x{:x})",
        h.table_offset, h.max_table_entries, bat_bytes, data_limit);
  }
  DynamicLayout layout;
  layout.header_offset = f.data_offset;
  layout.bat_offset = h.table_offset;
  layout.bat_entries = h.max_table_entries;
  layout.bat_bytes = bat_bytes;
  layout.block_size = h.block_size;
  layout.bitmap_bytes = bitmap_bytes_for(h.block_size);
  layout.current_size = f.current_size;
  layout.data_limit = data_limit;
  layout.metadata = {Region{0, footer_size, "the footer copy"},
                     Region{f.data_offset, header_size, "the dynamic header"}};
  for (const Region& r : layout.metadata) {
    if (overlaps(h.table_offset, bat_bytes, r.offset, r.length)) {
      return invalid(
          "dynamic header: table_offset 0x{:x}: the BAT (0x{:x} bytes) overlaps {} at 0x{:x}",
          h.table_offset, bat_bytes, r.what, r.offset);
    }
  }
  layout.metadata.push_back(Region{h.table_offset, bat_bytes, "the BAT"});
  if (f.disk_type == static_cast<uint32_t>(DiskType::differencing)) {
    if (h.parent_unique_id.is_nil()) {
      return invalid("dynamic header: parent_unique_id is nil in a differencing disk");
    }
    std::vector<Region> locators;
    if (auto problem = check_locators(h, data_limit, layout.metadata, &locators)) return *problem;
    layout.metadata.insert(layout.metadata.end(), locators.begin(), locators.end());
  }
  return layout;
}

std::vector<uint32_t> decode_bat(std::span<const std::byte> bytes, uint32_t entries) {
  assert(bytes.size() >= uint64_t{entries} * 4);
  std::vector<uint32_t> bat(entries);
  for (uint32_t i = 0; i < entries; ++i) bat[i] = load_be32(bytes.data() + uint64_t{i} * 4);
  return bat;
}

std::vector<std::byte> encode_bat(std::span<const uint32_t> entries, std::size_t padded_size) {
  assert(padded_size >= entries.size() * 4);
  std::vector<std::byte> bytes(padded_size, std::byte{0xFF});
  for (std::size_t i = 0; i < entries.size(); ++i) store_be32(bytes.data() + 4 * i, entries[i]);
  return bytes;
}

void store_bat_entry(std::span<std::byte, 4> out, uint32_t entry) {
  store_be32(out.data(), entry);
}

std::optional<Problem> check_bat(std::span<const uint32_t> bat, const DynamicLayout& layout) {
  const uint64_t span = layout.block_span();
  // (block offset, BAT index) of every allocated block, sorted to find overlaps.
  std::vector<std::pair<uint64_t, uint32_t>> blocks;
  for (uint32_t i = 0; i < bat.size(); ++i) {
    if (bat[i] == bat_unused) continue;
    const uint64_t start = DynamicLayout::block_offset(bat[i]);
    if (start > layout.data_limit || layout.data_limit - start < span) {
      return invalid(
          "BAT entry {} points past the end of the file (block 0x{:x} to 0x{:x}, data ends at "
          "0x{:x})",
          i, start, start + span, layout.data_limit);
    }
    for (const Region& r : layout.metadata) {
      if (overlaps(start, span, r.offset, r.length)) {
        return invalid("BAT entry {} points into {} at 0x{:x} (block 0x{:x} to 0x{:x})", i, r.what,
                       r.offset, start, start + span);
      }
    }
    blocks.emplace_back(start, i);
  }
  std::sort(blocks.begin(), blocks.end());
  for (std::size_t k = 1; k < blocks.size(); ++k) {
    const auto& [prev, a] = blocks[k - 1];
    const auto& [next, b] = blocks[k];
    if (next == prev) {
      return invalid("BAT entries {} and {} point at the same block (0x{:x})", std::min(a, b),
                     std::max(a, b), next);
    }
    if (next - prev < span) {
      return invalid(
          "BAT entries {} and {} overlap (blocks at 0x{:x} and 0x{:x}, each 0x{:x} bytes)", a, b,
          prev, next, span);
    }
  }
  return std::nullopt;
}

Geometry geometry_for(uint64_t total_sectors) {
  // The spec's appendix, step by step (formats.md §1.9).
  const uint64_t total = std::min<uint64_t>(total_sectors, 65535ull * 16 * 255);
  uint64_t spt, heads, cth;
  if (total >= 65535ull * 16 * 63) {
    spt = 255;
    heads = 16;
    cth = total / spt;
  } else {
    spt = 17;
    cth = total / spt;
    heads = std::max<uint64_t>(4, (cth + 1023) / 1024);
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cth = total / spt;
    }
    if (cth >= heads * 1024) {
      spt = 63;
      heads = 16;
      cth = total / spt;
    }
  }
  return Geometry{static_cast<uint16_t>(cth / heads), static_cast<uint8_t>(heads),
                  static_cast<uint8_t>(spt)};
}

uint64_t geometry_bytes(Geometry g) {
  return uint64_t{g.cylinders} * g.heads * g.sectors_per_track * sector_size;
}

Geometry geometry_to_record(uint64_t size) {
  const Geometry g = geometry_for(size / sector_size);
  return geometry_bytes(g) == size ? g : max_geometry;
}

std::string_view size_policy_name(SizePolicy policy) {
  switch (policy) {
    case SizePolicy::automatic:
      return "auto";
    case SizePolicy::current_size:
      return "current_size";
    case SizePolicy::chs:
      return "chs";
  }
  return "?";
}

bool creator_uses_chs(const std::array<char, 4>& app) {
  // qemu >= 10 keeps CHS for Virtual PC and for qemu's own rounded images only; every other
  // creator (Hyper-V "win ", Disk2vhd, XenServer, Azure "wa\0\0", qemu force_size "qem2")
  // means current_size. Compared over all 4 bytes, as qemu does.
  constexpr std::array<char, 4> vpc{'v', 'p', 'c', ' '}, qemu{'q', 'e', 'm', 'u'};
  return app == vpc || app == qemu;
}

Result<uint64_t> virtual_size(const Footer& f, SizePolicy policy) {
  const uint64_t chs = geometry_bytes(f.geometry);
  const bool chs_usable = f.geometry != max_geometry && chs > 0 && chs <= f.current_size;
  switch (policy) {
    case SizePolicy::current_size:
      return f.current_size;
    case SizePolicy::automatic:
      return chs_usable && creator_uses_chs(f.creator_app) ? chs : f.current_size;
    case SizePolicy::chs:
      if (f.geometry == max_geometry) return f.current_size;
      if (chs == 0) {
        return invalid("footer: geometry {}/{}/{} gives a CHS size of 0", f.geometry.cylinders,
                       f.geometry.heads, f.geometry.sectors_per_track);
      }
      if (chs > f.current_size) {
        return invalid(
            "footer: geometry {}/{}/{} gives a CHS size of {}, larger than current_size {}",
            f.geometry.cylinders, f.geometry.heads, f.geometry.sectors_per_track, chs,
            f.current_size);
      }
      return chs;
  }
  return f.current_size;
}

void append_utf8(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// Parent locators and their text (formats.md §1.8).

namespace {

constexpr std::array<std::string_view, 8> locator_regions{
    "parent locator 0's data", "parent locator 1's data", "parent locator 2's data",
    "parent locator 3's data", "parent locator 4's data", "parent locator 5's data",
    "parent locator 6's data", "parent locator 7's data"};

bool known_platform(uint32_t code) {
  switch (code) {
    case platform::wi2r:
    case platform::wi2k:
    case platform::w2ru:
    case platform::w2ku:
    case platform::mac:
    case platform::macx:
      return true;
    default:
      return false;
  }
}

// Decodes the UTF-8 code point at text[i], advancing i; nullopt when it is invalid
// (overlong forms, surrogates and values past U+10FFFF included).
std::optional<uint32_t> next_code_point(std::string_view text, std::size_t& i) {
  const auto b0 = static_cast<uint8_t>(text[i]);
  int extra;
  uint32_t c;
  if (b0 < 0x80) {
    ++i;
    return b0;
  } else if ((b0 & 0xE0) == 0xC0) {
    extra = 1;
    c = b0 & 0x1F;
  } else if ((b0 & 0xF0) == 0xE0) {
    extra = 2;
    c = b0 & 0x0F;
  } else if ((b0 & 0xF8) == 0xF0) {
    extra = 3;
    c = b0 & 0x07;
  } else {
    return std::nullopt;
  }
  if (text.size() - i <= static_cast<std::size_t>(extra)) return std::nullopt;
  for (int k = 1; k <= extra; ++k) {
    const auto b = static_cast<uint8_t>(text[i + k]);
    if ((b & 0xC0) != 0x80) return std::nullopt;
    c = c << 6 | (b & 0x3F);
  }
  static constexpr uint32_t min_value[] = {0, 0x80, 0x800, 0x10000};
  if (c < min_value[extra] || c > 0x10FFFF || (c >= 0xD800 && c < 0xE000)) return std::nullopt;
  i += static_cast<std::size_t>(extra) + 1;
  return c;
}

// Drops trailing NUL bytes (locator data is often NUL terminated or padded).
std::span<const std::byte> trim_nuls(std::span<const std::byte> data, std::size_t unit) {
  while (data.size() >= unit) {
    bool nul = true;
    for (std::size_t k = 0; k < unit; ++k) nul = nul && data[data.size() - 1 - k] == std::byte{0};
    if (!nul) break;
    data = data.first(data.size() - unit);
  }
  return data;
}

// A Windows path (".\a\b", "c:\a\b", "\a\b") in POSIX form.
LocatorPath from_windows(std::string text, bool relative) {
  for (char& c : text)
    if (c == '\\') c = '/';
  if (!relative && text.size() >= 2 && text[1] == ':' &&
      ((text[0] >= 'a' && text[0] <= 'z') || (text[0] >= 'A' && text[0] <= 'Z'))) {
    text.erase(0, 2);  // the drive letter means nothing here
  }
  if (!relative && !text.starts_with('/')) text.insert(0, 1, '/');
  while (relative && text.starts_with("./")) text.erase(0, 2);
  return LocatorPath{std::move(text), relative};
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

std::string platform_name(uint32_t code) {
  const std::array<char, 4> text{static_cast<char>(code >> 24), static_cast<char>(code >> 16),
                                 static_cast<char>(code >> 8), static_cast<char>(code)};
  return fourcc_text(text);
}

Result<uint64_t> locator_space_bytes(const ParentLocator& l) {
  if (l.data_space < sector_size) return uint64_t{l.data_space} * sector_size;
  if (l.data_space % sector_size != 0) {
    return invalid(
        "data_space {} is neither a sector count (below 512) nor a multiple of 512 bytes",
        l.data_space);
  }
  return uint64_t{l.data_space};
}

std::optional<Problem> check_locators(const DynamicHeader& h, uint64_t data_limit,
                                      std::span<const Region> metadata,
                                      std::vector<Region>* regions) {
  std::vector<Region> mine;
  for (std::size_t k = 0; k < h.parent_locators.size(); ++k) {
    const ParentLocator& l = h.parent_locators[k];
    if (l.platform_code == platform::none) continue;
    const std::string name =
        fmt::format("dynamic header: parent locator {} ({})", k, platform_name(l.platform_code));
    if (!known_platform(l.platform_code)) {
      return invalid("{}: unknown platform code 0x{:08x}", name, l.platform_code);
    }
    const auto space = locator_space_bytes(l);
    if (!space.ok()) return invalid("{}: {}", name, space.problem().message);
    if (space.value() > max_locator_bytes) {
      return invalid("{}: data_space {} bytes is more than {}", name, space.value(),
                     max_locator_bytes);
    }
    if (l.data_length > space.value()) {
      return invalid("{}: data_length {} is more than its data_space ({} bytes)", name,
                     l.data_length, space.value());
    }
    if (l.data_offset > data_limit || data_limit - l.data_offset < space.value()) {
      return invalid(
          "{}: data_offset 0x{:x} (+{} bytes) is past the end of the file (data ends at 0x{:x})",
          name, l.data_offset, space.value(), data_limit);
    }
    if (space.value() == 0) continue;  // occupies nothing
    for (const Region& r : metadata) {
      if (overlaps(l.data_offset, space.value(), r.offset, r.length)) {
        return invalid("{}: its data at 0x{:x} (+{} bytes) overlaps {} at 0x{:x}", name,
                       l.data_offset, space.value(), r.what, r.offset);
      }
    }
    for (const Region& r : mine) {
      if (overlaps(l.data_offset, space.value(), r.offset, r.length)) {
        return invalid("{}: its data at 0x{:x} (+{} bytes) overlaps {} at 0x{:x}", name,
                       l.data_offset, space.value(), r.what, r.offset);
      }
    }
    mine.push_back(Region{l.data_offset, space.value(), locator_regions[k]});
  }
  if (regions) *regions = std::move(mine);
  return std::nullopt;
}

Result<std::string> utf16_to_utf8(std::span<const std::byte> bytes, bool big_endian,
                                  std::string_view what) {
  if (bytes.size() % 2 != 0) {
    return invalid("{}: {} bytes is not a whole number of UTF-16 units", what, bytes.size());
  }
  auto unit = [&](std::size_t i) {
    const auto a = std::to_integer<uint32_t>(bytes[i]), b = std::to_integer<uint32_t>(bytes[i + 1]);
    return big_endian ? a << 8 | b : b << 8 | a;
  };
  std::string out;
  for (std::size_t i = 0; i < bytes.size(); i += 2) {
    uint32_t c = unit(i);
    if (c == 0) return invalid("{}: a NUL character at byte {}", what, i);
    if (c >= 0xDC00 && c < 0xE000) {
      return invalid("{}: a lone low surrogate 0x{:04x} at byte {}", what, c, i);
    }
    if (c >= 0xD800 && c < 0xDC00) {
      const uint32_t low = i + 3 < bytes.size() ? unit(i + 2) : 0;
      if (low < 0xDC00 || low >= 0xE000) {
        return invalid("{}: a lone high surrogate 0x{:04x} at byte {}", what, c, i);
      }
      c = 0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00);
      i += 2;
    }
    append_utf8(out, c);
  }
  return out;
}

Result<std::vector<std::byte>> utf8_to_utf16(std::string_view text, bool big_endian,
                                             std::string_view what) {
  std::vector<std::byte> out;
  auto put = [&](uint32_t u) {
    const auto hi = static_cast<std::byte>(u >> 8), lo = static_cast<std::byte>(u);
    out.push_back(big_endian ? hi : lo);
    out.push_back(big_endian ? lo : hi);
  };
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t at = i;
    const auto c = next_code_point(text, i);
    if (!c) return invalid("{}: invalid UTF-8 at byte {}", what, at);
    if (*c >= 0x10000) {
      put(0xD800 + ((*c - 0x10000) >> 10));
      put(0xDC00 + ((*c - 0x10000) & 0x3FF));
    } else {
      put(*c);
    }
  }
  return out;
}

Result<LocatorPath> decode_locator_path(uint32_t code, std::span<const std::byte> data) {
  const std::string what = fmt::format("{} locator", platform_name(code));
  std::string text;
  switch (code) {
    case platform::w2ru:
    case platform::w2ku: {
      auto decoded = utf16_to_utf8(trim_nuls(data, 2), false, what);
      if (!decoded.ok()) return decoded.problem();
      text = decoded.value();
      break;
    }
    case platform::wi2r:
    case platform::wi2k:
    case platform::macx: {
      const auto bytes = trim_nuls(data, 1);
      text.assign(reinterpret_cast<const char*>(bytes.data()), bytes.size());
      if (text.find('\0') != std::string::npos) {
        return invalid("{}: a NUL character at byte {}", what, text.find('\0'));
      }
      if (code == platform::macx) {
        for (std::size_t i = 0; i < text.size();) {
          if (!next_code_point(text, i)) return invalid("{}: invalid UTF-8 at byte {}", what, i);
        }
      }
      break;
    }
    case platform::mac:
      return Problem{std::errc::not_supported,
                     fmt::format("{}: Mac OS alias records are not supported", what)};
    default:
      return invalid("unknown locator platform code 0x{:08x}", code);
  }
  if (text.empty()) return invalid("{}: empty path", what);
  if (code == platform::w2ru || code == platform::wi2r) return from_windows(std::move(text), true);
  if (code == platform::w2ku || code == platform::wi2k) return from_windows(std::move(text), false);
  // MacX: file://[host]/absolute or file://./relative.
  constexpr std::string_view scheme = "file://";
  if (!text.starts_with(scheme)) return invalid("{}: \"{}\" is not a file:// URL", what, text);
  std::string_view rest = std::string_view(text).substr(scheme.size());
  bool relative = false;
  if (rest.starts_with("./")) {
    relative = true;
    while (rest.starts_with("./")) rest.remove_prefix(2);
  } else {
    const auto slash = rest.find('/');
    if (slash == std::string_view::npos) return invalid("{}: \"{}\" has no path", what, text);
    rest.remove_prefix(slash);  // the host ("localhost" or none) does not matter
  }
  std::string path;
  for (std::size_t i = 0; i < rest.size(); ++i) {
    if (rest[i] == '%' && i + 2 < rest.size() && hex_value(rest[i + 1]) >= 0 &&
        hex_value(rest[i + 2]) >= 0) {
      const char c = static_cast<char>(hex_value(rest[i + 1]) * 16 + hex_value(rest[i + 2]));
      if (c == '\0') return invalid("{}: a NUL character (%00) in \"{}\"", what, text);
      path += c;
      i += 2;
    } else {
      path += rest[i];
    }
  }
  if (path.empty() || path == "/") return invalid("{}: \"{}\" has no path", what, text);
  return LocatorPath{std::move(path), relative};
}

Result<std::vector<std::byte>> encode_locator_path(uint32_t code, std::string_view path) {
  const std::string what = fmt::format("{} locator", platform_name(code));
  for (std::size_t i = 0; i < path.size();) {
    if (!next_code_point(path, i)) return invalid("{}: invalid UTF-8 at byte {}", what, i);
  }
  if (path.empty()) return invalid("{}: empty path", what);
  if (code == platform::w2ru || code == platform::w2ku) {
    std::string text = code == platform::w2ru ? ".\\" : "";
    for (char c : path) text += c == '/' ? '\\' : c;
    return utf8_to_utf16(text, false, what);
  }
  if (code == platform::macx) {
    std::string text = "file://";
    if (!path.starts_with('/')) text += "./";
    for (char c : path) {
      const auto u = static_cast<unsigned char>(c);
      if (u <= 0x20 || u >= 0x7f || c == '%') {
        text += fmt::format("%{:02X}", u);
      } else {
        text += c;
      }
    }
    std::vector<std::byte> out(text.size());
    std::memcpy(out.data(), text.data(), text.size());
    return out;
  }
  return invalid("{}: imagenbd writes only W2ru, W2ku and MacX locators", what);
}

std::string parent_name(const DynamicHeader& h) {
  std::span<const std::byte> name = h.parent_unicode_name;
  for (std::size_t i = 0; i + 1 < name.size(); i += 2) {
    if (name[i] == std::byte{0} && name[i + 1] == std::byte{0}) {
      name = name.first(i);
      break;
    }
  }
  const auto text = utf16_to_utf8(name, true, "parent name");
  return text.ok() ? text.value() : std::string();
}

Result<std::array<std::byte, 512>> encode_parent_name(std::string_view name) {
  const auto units = utf8_to_utf16(name, true, "parent name");
  if (!units.ok()) return units.problem();
  std::array<std::byte, 512> out{};
  if (units.value().size() > out.size()) {
    return invalid("parent name: \"{}\" takes {} UTF-16 units, more than 256", name,
                   units.value().size() / 2);
  }
  std::memcpy(out.data(), units.value().data(), units.value().size());
  return out;
}

}  // namespace imagenbd::formats::vhd
