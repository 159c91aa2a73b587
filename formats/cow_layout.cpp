// The overlay file's codec (formats/cow_layout.hpp).
#include "formats/cow_layout.hpp"

#include <cstring>
#include <unordered_set>

#include <fmt/format.h>

namespace imagenbd::formats::cow {

namespace {

uint32_t load_le32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | std::to_integer<uint32_t>(p[i]);
  return v;
}
uint64_t load_le64(const std::byte* p) {
  return load_le32(p) | uint64_t{load_le32(p + 4)} << 32;
}
void store_le32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = std::byte(v >> (8 * i));
}
void store_le64(std::byte* p, uint64_t v) {
  store_le32(p, static_cast<uint32_t>(v));
  store_le32(p + 4, static_cast<uint32_t>(v >> 32));
}

// CRC-32 (IEEE, reflected, as zlib), bitwise: the header is checked once per open.
uint32_t crc32(std::span<const std::byte> bytes) {
  uint32_t crc = 0xFFFFFFFF;
  for (std::byte b : bytes) {
    crc ^= std::to_integer<uint32_t>(b);
    for (int k = 0; k < 8; ++k) crc = crc >> 1 ^ (0xEDB88320 & (0 - (crc & 1)));
  }
  return ~crc;
}

constexpr std::size_t crc_offset = 56;

uint32_t header_crc(std::span<const std::byte> header) {
  std::vector<std::byte> copy(header.begin(), header.begin() + header_bytes);
  std::memset(copy.data() + crc_offset, 0, 4);
  return crc32(copy);
}

bool power_of_two(uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}
uint64_t round_up(uint64_t v, uint64_t to) {
  return (v + to - 1) / to * to;
}

Problem problem(std::string message) {
  return Problem{std::errc::invalid_argument, std::move(message)};
}

std::optional<Problem> check_block_size(uint32_t block_size) {
  if (!power_of_two(block_size) || block_size < min_block_size || block_size > max_block_size)
    return problem(fmt::format("header: block size {} is not a power of two between {} and {}",
                               block_size, min_block_size, max_block_size));
  return std::nullopt;
}

}  // namespace

Result<Header> make_header(uint64_t virtual_size, uint32_t block_size, std::string identity) {
  if (auto p = check_block_size(block_size)) return *p;
  if (virtual_size == 0 || virtual_size > max_virtual_size)
    return problem(fmt::format("header: virtual size {} is not between 1 and {}", virtual_size,
                               max_virtual_size));
  if (identity.size() > max_identity)
    return problem(fmt::format("header: identity of {} bytes is longer than {}", identity.size(),
                               max_identity));
  Header h;
  h.block_size = block_size;
  h.virtual_size = virtual_size;
  h.lower_size = virtual_size;
  h.map_offset = header_bytes;
  const uint64_t blocks = round_up(virtual_size, block_size) / block_size;
  h.data_offset = round_up(h.map_offset + round_up(blocks * 8, 4096), block_size);
  h.identity = std::move(identity);
  return h;
}

std::vector<std::byte> encode_header(const Header& h) {
  std::vector<std::byte> out(header_bytes);
  std::byte* p = out.data();
  std::memcpy(p, magic.data(), magic.size());
  store_le32(p + 8, h.version);
  store_le32(p + 12, h.header_size);
  store_le32(p + 16, h.block_size);
  const auto identity_length =
      static_cast<uint32_t>(std::min<std::size_t>(h.identity.size(), max_identity));
  store_le32(p + 20, identity_length);
  store_le64(p + 24, h.virtual_size);
  store_le64(p + 32, h.lower_size);
  store_le64(p + 40, h.map_offset);
  store_le64(p + 48, h.data_offset);
  std::memcpy(p + identity_offset, h.identity.data(), identity_length);
  store_le32(p + crc_offset, header_crc(out));
  return out;
}

Result<Header> decode_header(std::span<const std::byte> bytes) {
  if (bytes.size() < header_bytes)
    return problem(fmt::format("header: {} bytes, a header needs {}", bytes.size(), header_bytes));
  const std::byte* p = bytes.data();
  if (std::memcmp(p, magic.data(), magic.size()) != 0)
    return problem("header: no overlay magic (\"IMGNBDCW\") at offset 0");
  Header h;
  h.version = load_le32(p + 8);
  if (h.version != version)
    return Problem{
        std::errc::operation_not_supported,
        fmt::format("header: version {} is not supported (only {})", h.version, version)};
  const uint32_t stored_crc = load_le32(p + crc_offset);
  const uint32_t crc = header_crc(bytes);
  if (stored_crc != crc)
    return problem(fmt::format("header: checksum {:#010x} does not match the contents ({:#010x})",
                               stored_crc, crc));
  h.header_size = load_le32(p + 12);
  h.block_size = load_le32(p + 16);
  const uint32_t identity_length = load_le32(p + 20);
  if (identity_length > max_identity)
    return problem(
        fmt::format("header: identity length {} is more than {}", identity_length, max_identity));
  h.virtual_size = load_le64(p + 24);
  h.lower_size = load_le64(p + 32);
  h.map_offset = load_le64(p + 40);
  h.data_offset = load_le64(p + 48);
  h.identity.assign(reinterpret_cast<const char*>(p + identity_offset), identity_length);
  return h;
}

Result<Layout> check_header(const Header& h, uint64_t file_size) {
  if (h.header_size != header_bytes)
    return problem(fmt::format("header: header size {} is not {}", h.header_size, header_bytes));
  if (auto p = check_block_size(h.block_size)) return *p;
  if (h.virtual_size == 0 || h.virtual_size > max_virtual_size)
    return problem(fmt::format("header: virtual size {} is not between 1 and {}", h.virtual_size,
                               max_virtual_size));
  if (h.lower_size != h.virtual_size)
    return problem(fmt::format("header: lower size {} differs from the virtual size {}",
                               h.lower_size, h.virtual_size));
  Layout l;
  l.virtual_size = h.virtual_size;
  l.block_size = h.block_size;
  l.blocks = round_up(h.virtual_size, h.block_size) / h.block_size;
  l.map_bytes = round_up(l.blocks * 8, 4096);
  if (h.map_offset < header_bytes || h.map_offset % 4096 != 0 || h.map_offset > max_virtual_size)
    return problem(fmt::format("header: map offset {} is not a multiple of 4096 after the header",
                               h.map_offset));
  l.map_offset = h.map_offset;
  if (h.data_offset < l.map_offset + l.map_bytes || h.data_offset % h.block_size != 0 ||
      h.data_offset > max_virtual_size)
    return problem(fmt::format(
        "header: data offset {} is not a multiple of the block size {} after the map ({}+{})",
        h.data_offset, h.block_size, l.map_offset, l.map_bytes));
  l.data_offset = h.data_offset;
  if (file_size < l.map_offset + l.map_bytes)
    return problem(fmt::format("header: the map ({}+{}) ends past the end of the file ({} bytes)",
                               l.map_offset, l.map_bytes, file_size));
  return l;
}

std::optional<Problem> check_lower(const Header& h, uint64_t lower_size,
                                   std::string_view identity) {
  if (h.lower_size != lower_size)
    return problem(fmt::format(
        "the lower disk's size changed from {} to {} bytes since the overlay was made (use a new "
        "overlay, or the lower disk it was made for)",
        h.lower_size, lower_size));
  if (h.identity != identity)
    return problem(fmt::format(
        "the lower disk changed: the overlay was made over \"{}\", not \"{}\" (use a new overlay, "
        "or the lower disk it was made for)",
        h.identity, identity));
  return std::nullopt;
}

std::vector<uint64_t> decode_map(std::span<const std::byte> bytes, uint64_t blocks) {
  std::vector<uint64_t> out(std::min<uint64_t>(blocks, bytes.size() / 8));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = load_le64(bytes.data() + 8 * i);
  return out;
}

void encode_entry(uint64_t entry, std::span<std::byte, 8> out) {
  store_le64(out.data(), entry);
}

Result<MapUse> check_map(const Layout& l, std::span<const uint64_t> entries, uint64_t file_size) {
  if (entries.size() != l.blocks)
    return problem(fmt::format("map: {} entries for {} blocks", entries.size(), l.blocks));
  MapUse use;
  use.data_end = l.data_offset;
  std::unordered_set<uint64_t> seen;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const uint64_t e = entries[i];
    if (!is_data(e)) continue;
    if (e < l.data_offset || (e - l.data_offset) % l.block_size != 0)
      return problem(fmt::format(
          "map: entry {} ({:#x}) is not a block of the data area (from {:#x}, {} bytes each)", i, e,
          l.data_offset, l.block_size));
    if (e > file_size || file_size - e < l.block_bytes(i))
      return problem(fmt::format("map: entry {} ({:#x}) points past the end of the file ({:#x})", i,
                                 e, file_size));
    if (!seen.insert(e).second)
      return problem(fmt::format("map: entry {} ({:#x}) is shared with another entry", i, e));
    use.data_end = std::max(use.data_end, e + l.block_size);
  }
  for (uint64_t at = l.data_offset; at < use.data_end; at += l.block_size)
    if (!seen.contains(at)) use.free_blocks.push_back(at);
  return use;
}

}  // namespace imagenbd::formats::cow
