// VHD resize. A fixed disk is its data plus a footer, so only the footer moves. A dynamic
// disk needs one BAT entry per block of the new size; when the larger BAT does not fit
// before the first block, the blocks in its way are moved to the end of the file one at a
// time, each with the order of a block allocation (formats.md §1.7): new end footer, data,
// flush, then the BAT entry, flush. A crash at any point leaves a sound image of the old
// size (at worst with leaked space), until the footers carry the new size.
#include "formats/vhd_resize.hpp"

#include <algorithm>
#include <array>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "formats/resize_copy.hpp"

namespace imagenbd::formats {

namespace {

using vhd::footer_size;
using vhd::sector_size;

uint64_t round_up(uint64_t v, uint64_t to) {
  return (v + to - 1) / to * to;
}

[[noreturn]] void refuse(const std::string& path, const Problem& problem) {
  throw backends::Error(problem.code, fmt::format("vhd: {}: {}", path, problem.message));
}

// Where a block moved behind `end` starts: its data on a 4 KiB boundary for blocks of 64
// KiB or more, as vhd_dynamic allocates (page-aligned data; the padding stays unused).
uint64_t block_start(uint64_t end, const vhd::DynamicLayout& layout) {
  constexpr uint64_t page = 4096;
  if (layout.block_size < 16 * page) return end;
  const uint64_t bitmap = layout.bitmap_bytes;
  return (end + bitmap + page - 1) / page * page - bitmap;
}

asio::awaitable<void> write_footer(backends::BlockDevice& file, uint64_t offset,
                                   std::span<const std::byte> footer) {
  co_await file.write(offset, footer, {});
}

asio::awaitable<void> resize_fixed(backends::BlockDevice& file, const std::string& path,
                                   const vhd::Footer& old_footer, uint64_t new_size,
                                   ResizeResult& result) {
  const uint64_t file_size = file.size();
  const uint64_t old_size = old_footer.current_size;
  vhd::Footer f = old_footer;
  f.current_size = new_size;
  f.original_size = new_size;  // libvhdi reports original_size as the media size
  f.geometry = vhd::geometry_to_record(new_size);
  const auto footer = vhd::encode_footer(f);
  if (new_size > old_size) {
    // The file grows with its new footer in one step (a fixed disk keeps no copy of its
    // footer, so it must always end in one); the old one is still at old_size then.
    if (new_size + footer_size > file_size) {
      co_await file.grow(new_size + footer_size, footer);
    } else {
      co_await write_footer(file, new_size, footer);
    }
    co_await file.flush();
    // The old footer and whatever lay between the data and it become disk bytes: zeroes.
    const uint64_t stale_end = std::min(new_size, file_size);
    if (stale_end > old_size) co_await file.zero(old_size, stale_end - old_size, {});
    if (new_size + footer_size < file_size) co_await file.resize(new_size + footer_size);
    co_await file.flush();
  } else {
    co_await write_footer(file, new_size, footer);
    co_await file.flush();
    co_await file.resize(new_size + footer_size);
    co_await file.flush();
    result.warnings.push_back(fmt::format("the {} bytes past the new end ({} bytes) are cut off",
                                          old_size - new_size, new_size));
  }
  (void)path;
}

// Writes the BAT sector holding entry `index` from `bat` (padding entries 0xFF).
asio::awaitable<void> write_bat_sector(backends::BlockDevice& file,
                                       const vhd::DynamicLayout& layout,
                                       const std::vector<uint32_t>& bat, uint32_t index) {
  constexpr uint32_t per_sector = sector_size / 4;
  const uint32_t first = index / per_sector * per_sector;
  std::array<uint32_t, per_sector> entries;
  for (uint32_t k = 0; k < per_sector; ++k) {
    const uint64_t i = uint64_t{first} + k;
    entries[k] = i < bat.size() ? bat[i] : vhd::bat_unused;
  }
  co_await file.write(layout.bat_entry_offset(first), vhd::encode_bat(entries, sector_size), {});
}

asio::awaitable<void> resize_dynamic(backends::BlockDevice& file, const std::string& path,
                                     const vhd::Footer& old_footer,
                                     std::span<const std::byte, footer_size> end_footer,
                                     uint64_t new_size, ResizeResult& result) {
  uint64_t file_size = file.size();
  if (file_size % sector_size != 0) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: the file size {} is not a multiple of {}; repair it first", path,
                   file_size, sector_size);
  }
  const uint64_t data_limit = file_size - footer_size;
  std::array<std::byte, vhd::header_size> header_bytes;
  co_await file.read(old_footer.data_offset, header_bytes);
  const auto parsed = vhd::parse_dynamic_header(header_bytes);
  if (!parsed.ok()) refuse(path, parsed.problem());
  vhd::DynamicHeader header = parsed.value();
  const auto checked = vhd::check_dynamic_header(header, old_footer, data_limit);
  if (!checked.ok()) refuse(path, checked.problem());
  const vhd::DynamicLayout& layout = checked.value();
  std::vector<std::byte> bat_bytes(layout.bat_bytes);
  co_await file.read(layout.bat_offset, bat_bytes);
  std::vector<uint32_t> bat = vhd::decode_bat(bat_bytes, layout.bat_entries);
  if (auto problem = vhd::check_bat(bat, layout)) refuse(path, *problem);

  const uint64_t old_size = old_footer.current_size;
  const uint64_t block_size = layout.block_size;
  const uint64_t needed = (new_size + block_size - 1) / block_size;
  if (needed > vhd::max_bat_entries) {
    backends::fail(std::errc::file_too_large,
                   "vhd: {}: {} bytes need {} BAT entries of {}-byte blocks, more than the "
                   "limit of {}",
                   path, new_size, needed, block_size, vhd::max_bat_entries);
  }
  if (new_size < old_size) {
    for (uint64_t i = needed; i < bat.size(); ++i) {
      if (bat[i] == vhd::bat_unused) continue;
      backends::fail(std::errc::invalid_argument,
                     "vhd: {}: block {} (virtual bytes {} to {}) is allocated and lies past the "
                     "new end ({} bytes); shrinking never drops allocated blocks (trim them "
                     "first)",
                     path, i, i * block_size, (i + 1) * block_size, new_size);
    }
  }
  const auto entries = static_cast<uint32_t>(
      new_size > old_size ? std::max<uint64_t>(needed, layout.bat_entries) : needed);

  // The block that holds the old (growing) or the new (shrinking) end: the bytes of it past
  // that end are zeroed, so that grown space reads as zeroes whatever was written there.
  const uint64_t low = std::min(old_size, new_size), high = std::max(old_size, new_size);
  if (low % block_size != 0) {
    const uint64_t index = low / block_size;
    if (index < bat.size() && bat[index] != vhd::bat_unused) {
      const uint64_t in_block = low - index * block_size;
      const uint64_t length = std::min(high, (index + 1) * block_size) - low;
      co_await file.zero(layout.block_data(bat[index]) + in_block, length, {});
      co_await file.flush();
    }
  }

  // Make room for the BAT: move the blocks in its way behind the end of the data.
  const uint64_t bat_bytes_new = round_up(uint64_t{entries} * 4, sector_size);
  const uint64_t bat_end = layout.bat_offset + bat_bytes_new;
  if (bat_bytes_new > layout.bat_bytes) {
    for (const vhd::Region& r : layout.metadata) {
      if (r.offset == layout.bat_offset) continue;  // the BAT itself
      if (r.offset < bat_end && layout.bat_offset < r.offset + r.length) {
        backends::fail(std::errc::operation_not_supported,
                       "vhd: {}: {} at 0x{:x} lies where the BAT must grow (to 0x{:x}); resize "
                       "cannot move it",
                       path, r.what, r.offset, bat_end);
      }
    }
    std::vector<std::pair<uint64_t, uint32_t>> in_way;  // (block offset, BAT index)
    for (uint32_t i = 0; i < bat.size(); ++i) {
      if (bat[i] == vhd::bat_unused) continue;
      const uint64_t start = vhd::DynamicLayout::block_offset(bat[i]);
      if (start < bat_end) in_way.emplace_back(start, i);
    }
    std::sort(in_way.begin(), in_way.end());
    uint64_t end = std::max(data_limit, bat_end);
    for (const auto& [start, index] : in_way) {
      const uint64_t to = block_start(end, layout);
      if (to / sector_size >= vhd::bat_unused) {
        backends::fail(std::errc::file_too_large,
                       "vhd: {}: block {} would move to 0x{:x}, past the 2 TiB a BAT entry can "
                       "address",
                       path, index, to);
      }
      const uint64_t new_file_size = to + layout.block_span() + footer_size;
      co_await file.resize(new_file_size);
      co_await write_footer(file, new_file_size - footer_size, end_footer);
      co_await copy_bytes(file, start, to, layout.block_span());
      co_await file.flush();  // footer, block and file size durable before the BAT moves
      bat[index] = static_cast<uint32_t>(to / sector_size);
      co_await write_bat_sector(file, layout, bat, index);
      co_await file.flush();
      end = to + layout.block_span();
      ++result.relocated_blocks;
    }
    if (end + footer_size > file.size()) {  // the BAT grows over the old end footer
      co_await file.resize(end + footer_size);
      co_await write_footer(file, end, end_footer);
      co_await file.flush();
    }
  }

  // The whole table (entries past the old count unused, the padding 0xFF), then the header.
  std::vector<uint32_t> table(entries, vhd::bat_unused);
  std::copy_n(bat.begin(), std::min<std::size_t>(bat.size(), entries), table.begin());
  co_await file.write(layout.bat_offset, vhd::encode_bat(table, bat_bytes_new), {});
  co_await file.flush();
  header.max_table_entries = entries;
  const auto new_header = vhd::encode_dynamic_header(header);
  co_await file.write(layout.header_offset, new_header, {});
  co_await file.flush();

  // Footers last: the end one first (what imagenbd reads), then the copy at 0 (what qemu
  // reads first).
  vhd::Footer f = old_footer;
  f.current_size = new_size;
  f.original_size = new_size;  // libvhdi reports original_size as the media size
  f.geometry = vhd::geometry_to_record(new_size);
  const auto footer = vhd::encode_footer(f);
  file_size = file.size();
  co_await write_footer(file, file_size - footer_size, footer);
  co_await file.flush();
  co_await write_footer(file, 0, footer);
  co_await file.flush();
}

}  // namespace

asio::awaitable<ResizeResult> resize_vhd(backends::BlockDevice& file,
                                         const ResizeOptions& options) {
  const std::string path = file.describe();
  const uint64_t file_size = file.size();
  if (file_size < footer_size) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: the file is {} bytes, shorter than a {}-byte footer", path, file_size,
                   footer_size);
  }
  std::array<std::byte, footer_size> end_bytes;
  co_await file.read(file_size - footer_size, end_bytes);
  const auto parsed = vhd::parse_footer(end_bytes);
  if (!parsed.ok()) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: the footer at the end of the file is damaged ({}); resize needs a "
                   "sound image (see imagenbd check)",
                   path, parsed.problem().message);
  }
  const vhd::Footer& footer = parsed.value();
  if (auto problem = vhd::check_footer(footer, file_size - footer_size)) refuse(path, *problem);
  const auto type = static_cast<vhd::DiskType>(footer.disk_type);
  if (type == vhd::DiskType::differencing) {
    backends::fail(std::errc::operation_not_supported,
                   "vhd: {}: a differencing disk cannot be resized (its size is its parent's)",
                   path);
  }
  if (footer.saved_state != 0) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: the footer's saved_state flag is set (a virtual machine's saved "
                   "state refers to this disk); refusing to resize",
                   path);
  }
  const uint64_t new_size = options.new_size;
  if (new_size == 0 || new_size % sector_size != 0) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: the new size {} is not a positive multiple of {}", path, new_size,
                   sector_size);
  }
  if (new_size > vhd::max_dynamic_size) {
    backends::fail(std::errc::file_too_large,
                   "vhd: {}: the new size {} is larger than 2040 GiB ({} bytes), the VHD limit "
                   "of qemu and Hyper-V",
                   path, new_size, vhd::max_dynamic_size);
  }
  ResizeResult result;
  const auto served = vhd::virtual_size(footer, vhd::SizePolicy::automatic);
  result.old_size = served.ok() ? served.value() : footer.current_size;
  result.new_size = new_size;
  if (new_size < footer.current_size && !options.shrink) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: {} bytes is smaller than the current {} bytes; shrinking cuts the "
                   "disk and needs --shrink",
                   path, new_size, footer.current_size);
  }
  if (new_size == footer.current_size && result.old_size == new_size) co_return result;
  if (type == vhd::DiskType::fixed) {
    co_await resize_fixed(file, path, footer, new_size, result);
  } else {
    co_await resize_dynamic(file, path, footer, end_bytes, new_size, result);
  }
  co_return result;
}

}  // namespace imagenbd::formats
