// VDI resize. The block map must hold one entry per block of the new size and lie before
// the data (VirtualBox and imagenbd require offData >= offBlocks + 4 * cBlocks). When it
// does not fit, the first k physical blocks make room: they are copied behind the last
// block, the old map is re-pointed at the copies (count first, so no entry is ever above
// it), the new map is written where the copies came from, and one header sector switches
// offBlocks, offData (k blocks further: every physical index drops by k), the block count
// and the size at once. Every state before that header write is the old image, readable,
// at worst with blocks qemu-img check calls leaked.
#include "formats/vdi_resize.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "formats/resize_copy.hpp"
#include "formats/vdi_layout.hpp"

namespace imagenbd::formats {

namespace {

uint64_t round_up(uint64_t v, uint64_t to) {
  return (v + to - 1) / to * to;
}

[[noreturn]] void refuse(const std::string& path, const Problem& problem) {
  throw backends::Error(problem.code, fmt::format("vdi: {}: {}", path, problem.message));
}

asio::awaitable<void> write_header(backends::BlockDevice& file,
                                   std::array<std::byte, vdi::header_bytes>& sector,
                                   const vdi::Header& header) {
  vdi::encode_header(header, sector);
  co_await file.write(0, sector, {});
  co_await file.flush();
}

}  // namespace

asio::awaitable<ResizeResult> resize_vdi(backends::BlockDevice& file,
                                         const ResizeOptions& options) {
  const std::string path = file.describe();
  const uint64_t file_size = file.size();
  if (auto problem = vdi::check_file_size(file_size)) refuse(path, *problem);
  std::array<std::byte, vdi::header_bytes> sector;
  co_await file.read(0, sector);
  vdi::Header h = vdi::decode_header(sector);
  const auto checked = vdi::check_header(h, file_size);
  if (!checked.ok()) refuse(path, checked.problem());
  const vdi::Layout l = checked.value();
  if (h.image_type == static_cast<uint32_t>(vdi::ImageType::differencing) ||
      h.image_type == static_cast<uint32_t>(vdi::ImageType::undo)) {
    backends::fail(std::errc::operation_not_supported,
                   "vdi: {}: a {} image cannot be resized (its size is its parent's)", path,
                   vdi::type_name(h.image_type));
  }
  if (l.block_extra != 0) {
    backends::fail(std::errc::operation_not_supported,
                   "vdi: {}: images with block extra data ({} bytes a block) cannot be resized",
                   path, l.block_extra);
  }
  std::vector<std::byte> map_bytes(uint64_t{l.blocks} * 4);
  co_await file.read(l.blocks_offset, map_bytes);
  std::vector<uint32_t> map = vdi::decode_block_map(map_bytes);
  const auto use = vdi::check_block_map(l, map, file_size);
  if (!use.ok()) refuse(path, use.problem());

  const uint64_t new_size = options.new_size;
  if (new_size == 0 || new_size % vdi::sector_size != 0) {
    backends::fail(std::errc::invalid_argument,
                   "vdi: {}: the new size {} is not a positive multiple of {}", path, new_size,
                   vdi::sector_size);
  }
  const uint64_t bs = l.block_size;
  const uint64_t needed64 = (new_size + bs - 1) / bs;
  if (needed64 > vdi::max_blocks) {
    backends::fail(std::errc::file_too_large,
                   "vdi: {}: {} bytes need {} blocks of {} bytes, more than the limit of {}", path,
                   new_size, needed64, bs, vdi::max_blocks);
  }
  const auto needed = static_cast<uint32_t>(needed64);
  ResizeResult result;
  result.old_size = l.disk_size;
  result.new_size = new_size;
  if (new_size < h.disk_size && !options.shrink) {
    backends::fail(std::errc::invalid_argument,
                   "vdi: {}: {} bytes is smaller than the current {} bytes; shrinking cuts the "
                   "disk and needs --shrink",
                   path, new_size, h.disk_size);
  }
  if (new_size == h.disk_size) co_return result;
  const bool fixed = h.image_type == static_cast<uint32_t>(vdi::ImageType::fixed);
  const uint64_t stride = l.block_stride();
  const uint32_t count = std::max(h.blocks_allocated, use.value().end);

  // The block holding the smaller end: zero its bytes past that end, and give it its whole
  // slot in the file (the last block of a file may stop where the old disk did).
  const uint64_t low = std::min<uint64_t>(l.disk_size, new_size);
  const uint64_t high = std::max<uint64_t>(l.disk_size, new_size);
  if (low % bs != 0 && low / bs < map.size() && vdi::is_allocated(map[low / bs])) {
    const uint64_t index = low / bs;
    const uint32_t p = map[index];
    const uint64_t from = l.block_data(p) + (low - index * bs);
    const uint64_t to = l.block_data(p) + std::min(high - index * bs, bs);
    if (to > file.size()) co_await file.resize(to);
    co_await file.zero(from, to - from, {});
    co_await file.flush();
  }
  h.uuid_modify = options.modify_uuid;

  if (new_size < h.disk_size) {
    if (!fixed) {
      for (uint32_t i = needed; i < map.size(); ++i) {
        if (!vdi::is_allocated(map[i])) continue;
        backends::fail(std::errc::invalid_argument,
                       "vdi: {}: block {} (virtual bytes {} to {}) is allocated and lies past "
                       "the new end ({} bytes); shrinking never drops allocated blocks",
                       path, i, uint64_t{i} * bs, (uint64_t{i} + 1) * bs, new_size);
      }
    } else {
      for (uint32_t i = 0; i < map.size(); ++i) {
        if (map[i] == i) continue;
        backends::fail(std::errc::operation_not_supported,
                       "vdi: {}: block map entry {} points at block {}: a static image whose "
                       "blocks are not in order cannot be shrunk",
                       path, i, map[i]);
      }
      result.warnings.push_back(fmt::format("the {} bytes past the new end ({} bytes) are cut off",
                                            h.disk_size - new_size, new_size));
    }
    h.disk_size = new_size;
    h.blocks = needed;
    if (fixed) h.blocks_allocated = needed;
    co_await write_header(file, sector, h);
    if (fixed) {
      co_await file.resize(l.data_offset + uint64_t{needed} * stride);
      co_await file.flush();
    }
    co_return result;
  }

  const uint32_t added = needed - l.blocks;
  const uint32_t static_new = fixed ? added : 0;
  // New entries: free, or (static) the next physical blocks from `first_slot` on.
  auto new_entries = [&](uint32_t first_slot) {
    std::vector<uint32_t> e(added, vdi::entry_free);
    if (fixed) {
      for (uint32_t t = 0; t < added; ++t) e[t] = first_slot + t;
    }
    return e;
  };
  // Makes the file end at `end`; bytes between the old end of the data and old EOF (a
  // leak) are zeroed when they become blocks.
  auto grow_file = [&](uint64_t data_end, uint64_t end) -> asio::awaitable<void> {
    if (file_size > data_end) co_await file.zero(data_end, file_size - data_end, {});
    if (end > file.size()) co_await file.resize(end);
  };

  if (l.blocks_offset + uint64_t{needed} * 4 <= l.data_offset) {
    // The map fits: new entries into its padding, then the header.
    const uint64_t data_end = l.data_offset + uint64_t{count} * stride;
    if (fixed) co_await grow_file(data_end, data_end + uint64_t{static_new} * stride);
    co_await file.write(l.entry_offset(l.blocks), vdi::encode_block_map(new_entries(count)), {});
    co_await file.flush();
    h.disk_size = new_size;
    h.blocks = needed;
    if (fixed) h.blocks_allocated = count + static_new;
    co_await write_header(file, sector, h);
    co_return result;
  }

  // The map moves to where physical blocks 0..k-1 are.
  const uint64_t map_bytes_new = round_up(uint64_t{needed} * 4, vdi::sector_size);
  const uint32_t k = static_cast<uint32_t>((map_bytes_new + stride - 1) / stride);
  const uint64_t new_blocks_offset = l.data_offset;
  const uint64_t new_data_offset = l.data_offset + uint64_t{k} * stride;
  if (new_data_offset > std::numeric_limits<uint32_t>::max()) {
    backends::fail(std::errc::file_too_large,
                   "vdi: {}: the block map for {} blocks would push the data to 0x{:x}, past "
                   "the 4 GiB the header's data offset can hold",
                   path, needed, new_data_offset);
  }
  std::vector<uint32_t> owner(std::max(count, k), vdi::entry_free);
  for (uint32_t i = 0; i < map.size(); ++i) {
    if (vdi::is_allocated(map[i])) owner[map[i]] = i;
  }
  std::vector<uint32_t> moved;  // physical blocks below k that hold data
  for (uint32_t p = 0; p < k && p < count; ++p) {
    if (owner[p] != vdi::entry_free) moved.push_back(p);
  }
  const uint32_t base = std::max(count, k);  // first slot for the copies (old numbering)
  const auto interim = static_cast<uint32_t>(base + moved.size());  // count once re-pointed
  const uint32_t capacity = static_cast<uint32_t>((l.data_offset - l.blocks_offset) / 4);
  if (interim > l.blocks && (interim > capacity || interim > needed)) {
    backends::fail(std::errc::operation_not_supported,
                   "vdi: {}: growing needs {} more block map entries than fit before the data, "
                   "and the map is too full ({} of {} entries) to move {} block{} out of the "
                   "way crash-safely; convert the image instead",
                   path, needed - capacity, l.blocks, capacity, moved.size(),
                   moved.size() == 1 ? "" : "s");
  }

  // 1. Copies behind the last block (unreferenced until step 3), and the new static blocks.
  const uint64_t copies = l.data_offset + uint64_t{base} * stride;
  co_await grow_file(copies, copies + (uint64_t{moved.size()} + static_new) * stride);
  for (std::size_t j = 0; j < moved.size(); ++j) {
    co_await copy_bytes(file, l.data_offset + uint64_t{moved[j]} * stride, copies + j * stride,
                        stride, file_size);
  }
  co_await file.flush();

  // 2. The count covers the copies (with more entries, free, when it must exceed the old
  // block count: a crash then leaves a slightly larger disk, never a broken one).
  vdi::Header step = h;
  step.blocks_allocated = interim;
  if (interim > l.blocks) {
    const std::vector<uint32_t> free_entries(interim - l.blocks, vdi::entry_free);
    co_await file.write(l.entry_offset(l.blocks), vdi::encode_block_map(free_entries), {});
    co_await file.flush();
    step.blocks = interim;
    step.disk_size = uint64_t{interim} * bs;
    map.resize(interim, vdi::entry_free);
  }
  std::array<std::byte, vdi::header_bytes> step_sector = sector;
  co_await write_header(file, step_sector, step);

  // 3. The old map points at the copies; blocks 0..k-1 are free from here on.
  for (std::size_t j = 0; j < moved.size(); ++j) map[owner[moved[j]]] = base + uint32_t(j);
  co_await file.write(l.blocks_offset, vdi::encode_block_map(map), {});
  co_await file.flush();

  // 4. The new map where blocks 0..k-1 were, every index k lower, padded with free entries.
  std::vector<uint32_t> next(map_bytes_new / 4, vdi::entry_free);
  for (uint32_t i = 0; i < l.blocks; ++i) {
    next[i] = vdi::is_allocated(map[i]) ? map[i] - k : map[i];
  }
  const auto extra = new_entries(interim - k);
  std::copy(extra.begin(), extra.end(), next.begin() + l.blocks);
  co_await file.write(new_blocks_offset, vdi::encode_block_map(next), {});
  co_await file.flush();

  // 5. One header sector switches to the new map, data offset, count and size.
  h.blocks_offset = static_cast<uint32_t>(new_blocks_offset);
  h.data_offset = static_cast<uint32_t>(new_data_offset);
  h.disk_size = new_size;
  h.blocks = needed;
  h.blocks_allocated = interim - k + static_new;
  co_await write_header(file, sector, h);
  result.relocated_blocks = static_cast<uint32_t>(moved.size());
  co_return result;
}

}  // namespace imagenbd::formats
