// VDI check: the codecs open_vdi uses (vdi_layout), run over every entry.
#include "formats/vdi_check.hpp"

#include <algorithm>
#include <array>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "formats/vdi.hpp"
#include "formats/vdi_layout.hpp"

namespace imagenbd::formats {

namespace {

void header_notes(const vdi::Header& h, const vdi::Layout& l, CheckReport& report) {
  if (h.uuid_create.is_nil()) {
    report.warning("header", "uuidCreate",
                   "header: uuidCreate is nil: VirtualBox refuses the image, imagenbd serves it "
                   "read-only");
  }
  if (h.uuid_modify.is_nil()) {
    report.warning("header", "uuidModify",
                   "header: uuidModify is nil: VirtualBox refuses the image, imagenbd serves it "
                   "read-only");
  }
  if (l.disk_size_rounded) {
    report.warning("header", "disk size",
                   fmt::format("header: disk size {} is not a multiple of 512: imagenbd and "
                               "VirtualBox serve {} bytes, qemu rounds up",
                               h.disk_size, l.disk_size));
  }
  if (h.block_size != vdi::default_block_size) {
    report.note("header", "block size",
                fmt::format("header: block size {} is not 1048576: qemu cannot open the image",
                            h.block_size));
  }
}

asio::awaitable<void> check_open(backends::DevicePtr child, const vdi::Header& h,
                                 const CheckOptions& options, CheckReport& report) {
  const bool differencing = h.image_type == static_cast<uint32_t>(vdi::ImageType::differencing);
  co_await formats::check_open(
      open_vdi(child, VdiOptions{.read_only = true, .parents = options.parents}), differencing,
      report);
}

}  // namespace

asio::awaitable<CheckReport> check_vdi(backends::DevicePtr child, const CheckOptions& options) {
  CheckReport report;
  report.format = "vdi";
  const uint64_t file_size = child->size();
  if (auto problem = vdi::check_file_size(file_size)) {
    report.error("file", "size", problem->message);
    report.complete = false;
    co_return report;
  }
  std::array<std::byte, vdi::header_bytes> sector;
  co_await child->read(0, sector);
  const vdi::Header h = vdi::decode_header(sector);
  const auto layout = vdi::check_header(h, file_size);
  if (!layout.ok()) {
    report.error("header", problem_field(layout.problem().message), layout.problem().message);
    report.complete = false;
    co_return report;
  }
  const vdi::Layout& l = layout.value();
  header_notes(h, l, report);
  report.total_blocks = l.blocks;

  std::vector<std::byte> map_bytes(uint64_t{l.blocks} * 4);
  co_await child->read(l.blocks_offset, map_bytes);
  const std::vector<uint32_t> map = vdi::decode_block_map(map_bytes);
  // owner[p]: the first entry that points at physical block p.
  std::vector<uint32_t> owner(l.blocks, vdi::entry_free);
  uint32_t used = 0, end = 0;
  uint32_t in_range = 0;  // entries below the block count, shared ones too: qemu's tally
  for (uint32_t i = 0; i < map.size(); ++i) {
    const uint32_t p = map[i];
    if (!vdi::is_allocated(p)) continue;
    const std::string field = fmt::format("entry {}", i);
    if (p >= l.blocks) {
      report.error("block map", field,
                   fmt::format("block map entry {} points at block {}, beyond the {} blocks of "
                               "the image",
                               i, p, l.blocks));
      continue;
    }
    ++in_range;
    const uint64_t block_end = l.block_data(p) + l.block_bytes(i);
    if (block_end > file_size) {
      report.error("block map", field,
                   fmt::format("block map entry {} points past the end of the file (block {} "
                               "ends at 0x{:x}, the file is 0x{:x} bytes)",
                               i, p, block_end, file_size));
      continue;
    }
    if (owner[p] != vdi::entry_free) {
      report.error(
          "block map", fmt::format("entries {} and {}", owner[p], i),
          fmt::format("block map entries {} and {} point at the same block ({})", owner[p], i, p));
      continue;
    }
    owner[p] = i;
    ++used;
    end = std::max(end, p + 1);
  }
  report.allocated_blocks = used;

  if (in_range != h.blocks_allocated) {
    std::string why =
        h.blocks_allocated > in_range
            ? "; an allocation interrupted between the header and the block map update leaves "
              "this (the blocks no entry uses are leaked)"
            : "; blocks at or above the count are in use, so the next allocation must not "
              "trust the count";
    report.error("header", "blocks_allocated",
                 fmt::format("header: allocated block count {} does not match the {} blocks the "
                             "block map uses (qemu-img check: allocated blocks mismatch){}",
                             h.blocks_allocated, in_range, why));
  }

  // Space: physical blocks below the high-water mark that no entry uses, and bytes past it.
  const uint32_t mark = std::max(h.blocks_allocated, end);
  uint32_t unused = 0, first_unused = 0;
  for (uint32_t p = 0; p < mark; ++p) {
    if (owner[p] != vdi::entry_free) continue;
    if (unused++ == 0) first_unused = p;
  }
  uint64_t leaked = 0;
  if (unused > 0) {
    leaked += uint64_t{unused} * l.block_stride();
    report.warning(
        "block map", "leaked blocks",
        fmt::format("{} physical block{} below the allocated count (the first: {}) "
                    "{} used by no block map entry: leaked",
                    unused, unused == 1 ? "" : "s", first_unused, unused == 1 ? "is" : "are"));
  }
  const uint64_t data_end = l.data_offset + uint64_t{mark} * l.block_stride();
  if (file_size > data_end) {
    leaked += file_size - data_end;
    report.warning("file", "size",
                   fmt::format("the file holds {} bytes past the last allocated block (0x{:x} to "
                               "0x{:x}): a block allocation interrupted before the header was "
                               "updated leaves this",
                               file_size - data_end, data_end, file_size));
  }
  report.leaked_bytes = leaked;
  co_await check_open(child, h, options, report);
  co_return report;
}

}  // namespace imagenbd::formats
