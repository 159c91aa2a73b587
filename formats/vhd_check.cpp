// VHD check: the same codecs open_vhd uses (vhd_layout), run to the end instead of to the
// first refusal. Severity follows qemu-img check: what makes reads wrong or writes
// dangerous is an error, space that is merely wasted is a leak (a warning).
#include "formats/vhd_check.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "formats/vhd.hpp"
#include "formats/vhd_layout.hpp"

namespace imagenbd::formats {

namespace {

using vhd::footer_size;

bool is_dynamic_type(uint32_t disk_type) {
  return disk_type == static_cast<uint32_t>(vhd::DiskType::dynamic) ||
         disk_type == static_cast<uint32_t>(vhd::DiskType::differencing);
}

// "footer: checksum mismatch (...)" without its "footer: " prefix.
std::string without_prefix(const std::string& message, std::string_view prefix) {
  return message.starts_with(prefix) ? message.substr(prefix.size()) : message;
}

// Differences between the footer at the end and its copy at offset 0. qemu reads the copy
// at 0 first, so a field that decides what the disk is (type, size, where the header is,
// identity) must agree: an error; the others (timestamp, creator, original size) a warning.
void compare_footers(const vhd::Footer& end, const vhd::Footer& copy, CheckReport& report) {
  auto differs = [&](bool serious, std::string_view field, const std::string& a,
                     const std::string& b) {
    std::string message = fmt::format(
        "footer copy at offset 0: {} {} differs from the footer at the end ({})", field, b, a);
    if (serious) {
      report.error("footer copy", std::string(field), message + "; qemu reads the copy");
    } else {
      report.warning("footer copy", std::string(field), message);
    }
  };
  auto num = [](uint64_t v) { return fmt::format("{}", v); };
  auto hex = [](uint64_t v) { return fmt::format("0x{:x}", v); };
  if (end.disk_type != copy.disk_type) {
    differs(true, "disk_type", num(end.disk_type), num(copy.disk_type));
  }
  if (end.current_size != copy.current_size) {
    differs(true, "current_size", num(end.current_size), num(copy.current_size));
  }
  if (end.data_offset != copy.data_offset) {
    differs(true, "data_offset", hex(end.data_offset), hex(copy.data_offset));
  }
  if (end.geometry != copy.geometry) {
    auto g = [](const vhd::Geometry& x) {
      return fmt::format("{}/{}/{}", x.cylinders, x.heads, x.sectors_per_track);
    };
    differs(true, "geometry", g(end.geometry), g(copy.geometry));
  }
  if (end.unique_id != copy.unique_id) {
    differs(true, "unique_id", end.unique_id.to_string(), copy.unique_id.to_string());
  }
  if (end.features != copy.features) {
    differs(true, "features", hex(end.features), hex(copy.features));
  }
  if (end.saved_state != copy.saved_state) {
    differs(true, "saved_state", num(end.saved_state), num(copy.saved_state));
  }
  if (end.timestamp != copy.timestamp) {
    differs(false, "timestamp", num(end.timestamp), num(copy.timestamp));
  }
  if (end.creator_app != copy.creator_app || end.creator_version != copy.creator_version ||
      end.creator_host_os != copy.creator_host_os) {
    differs(false, "creator_app", "\"" + vhd::fourcc_text(end.creator_app) + "\"",
            "\"" + vhd::fourcc_text(copy.creator_app) + "\"");
  }
  if (end.original_size != copy.original_size) {
    differs(false, "original_size", num(end.original_size), num(copy.original_size));
  }
}

// Footer fields check_footer accepts but a reader should hear about.
void footer_warnings(const vhd::Footer& f, CheckReport& report) {
  if (f.features & vhd::features_temporary) {
    report.warning("footer", "features",
                   fmt::format("footer: features 0x{:08x} mark the disk as temporary", f.features));
  }
  if ((f.features & vhd::features_reserved) == 0) {
    report.note("footer", "features",
                fmt::format("footer: features 0x{:08x} lack the reserved bit 0x2 the spec "
                            "says is always set",
                            f.features));
  }
  if (f.saved_state != 0) {
    report.warning("footer", "saved_state",
                   fmt::format("footer: saved_state is {}: a virtual machine's saved state "
                               "refers to this disk (resize refuses it)",
                               f.saved_state));
  }
  const uint64_t chs = vhd::geometry_bytes(f.geometry);
  if (f.geometry != vhd::max_geometry && chs != f.current_size) {
    report.note("footer", "geometry",
                fmt::format("footer: geometry {}/{}/{} gives {} bytes, current_size is {}: "
                            "readers that use CHS (qemu <= 9 for most creators) see {} bytes",
                            f.geometry.cylinders, f.geometry.heads, f.geometry.sectors_per_track,
                            chs, f.current_size, chs));
  }
}

struct Block {
  uint64_t start;
  uint32_t index;
};

// BAT entries one by one: inside the file, clear of metadata, clear of each other. Returns
// the blocks inside the file and clear of metadata, sorted by offset.
std::vector<Block> check_entries(std::span<const uint32_t> bat, const vhd::DynamicLayout& layout,
                                 CheckReport& report) {
  const uint64_t span = layout.block_span();
  std::vector<Block> blocks;
  for (uint32_t i = 0; i < bat.size(); ++i) {
    if (bat[i] == vhd::bat_unused) continue;
    ++report.allocated_blocks;
    const uint64_t start = vhd::DynamicLayout::block_offset(bat[i]);
    const std::string field = fmt::format("entry {}", i);
    if (start > layout.data_limit || layout.data_limit - start < span) {
      report.error("BAT", field,
                   fmt::format("BAT entry {} points past the end of the file (block 0x{:x} to "
                               "0x{:x}, data ends at 0x{:x})",
                               i, start, start + span, layout.data_limit));
      continue;
    }
    bool overlaps = false;
    for (const vhd::Region& r : layout.metadata) {
      if (start < r.offset + r.length && r.offset < start + span) {
        report.error("BAT", field,
                     fmt::format("BAT entry {} points into {} at 0x{:x} (block 0x{:x} to 0x{:x})",
                                 i, r.what, r.offset, start, start + span));
        overlaps = true;
        break;
      }
    }
    if (overlaps) continue;
    if (uint64_t{i} * layout.block_size >= layout.current_size) {
      report.warning("BAT", field,
                     fmt::format("BAT entry {} is allocated, but its block starts at virtual "
                                 "offset {}, past the end of the disk ({} bytes)",
                                 i, uint64_t{i} * layout.block_size, layout.current_size));
    }
    blocks.push_back({start, i});
  }
  std::sort(blocks.begin(), blocks.end(),
            [](const Block& a, const Block& b) { return a.start < b.start; });
  // Every pair that shares bytes, not just neighbours (all blocks have the same span).
  for (std::size_t k = 1; k < blocks.size(); ++k) {
    const Block& b = blocks[k];
    for (std::size_t j = k; j-- > 0 && blocks[j].start + span > b.start;) {
      const Block& a = blocks[j];
      const auto [lo, hi] = std::minmax(a.index, b.index);
      const std::string field = fmt::format("entries {} and {}", lo, hi);
      if (a.start == b.start) {
        report.error(
            "BAT", field,
            fmt::format("BAT entries {} and {} point at the same block (0x{:x})", lo, hi, b.start));
      } else {
        report.error("BAT", field,
                     fmt::format("BAT entries {} and {} overlap (blocks at 0x{:x} and 0x{:x}, "
                                 "each 0x{:x} bytes)",
                                 lo, hi, a.start, b.start, span));
      }
    }
  }
  // Overlapping blocks still hold data, so they stay in the list for the space scan.
  return blocks;
}

// Space between the structures: gaps of at least one block are leaked blocks (a crash
// between writing a block and its BAT entry, or a block freed by trim); smaller ones are
// alignment padding (imagenbd puts block data on 4 KiB boundaries). Space between the
// metadata and the first block is slack, not a leak: it is what resize leaves when it
// moves the blocks after a growing BAT (blocks are only ever appended at the end).
void scan_space(const vhd::DynamicLayout& layout, const std::vector<Block>& blocks,
                uint64_t end_of_data, CheckReport& report) {
  struct Used {
    uint64_t offset, length;
  };
  std::vector<Used> used;
  for (const auto& r : layout.metadata) used.push_back({r.offset, r.length});
  for (const auto& b : blocks) used.push_back({b.start, layout.block_span()});
  std::sort(used.begin(), used.end(),
            [](const Used& a, const Used& b) { return a.offset < b.offset; });
  const uint64_t first_block = blocks.empty() ? 0 : blocks.front().start;
  uint64_t cursor = 0, leaked = 0, first_leak = 0, leaks = 0;
  auto gap = [&](uint64_t from, uint64_t to) {
    if (to <= from || to - from < layout.block_span() || to <= first_block) return;
    if (leaks++ == 0) first_leak = from;
    leaked += to - from;
  };
  for (const Used& u : used) {
    gap(cursor, u.offset);
    cursor = std::max(cursor, u.offset + u.length);
  }
  gap(cursor, end_of_data);
  if (leaked > 0) {
    report.leaked_bytes += leaked;
    report.warning("file", "leaked space",
                   fmt::format("{} bytes in {} range{} (the first at 0x{:x}) are referenced by no "
                               "BAT entry: leaked blocks, as a crash during a block allocation "
                               "leaves them",
                               leaked, leaks, leaks == 1 ? "" : "s", first_leak));
  }
}

asio::awaitable<void> check_bitmaps(backends::BlockDevice& child, const vhd::DynamicLayout& layout,
                                    const std::vector<Block>& blocks, CheckReport& report) {
  std::vector<std::byte> bitmap(layout.bitmap_bytes);
  uint32_t zero = 0, first_zero = 0;
  for (const Block& b : blocks) {
    try {
      co_await child.read(b.start, bitmap);
    } catch (const backends::Error& e) {
      report.error(fmt::format("block {}", b.index), "bitmap",
                   fmt::format("block {}: its bitmap at 0x{:x} cannot be read: {}", b.index,
                               b.start, e.what()));
      continue;
    }
    const bool empty =
        std::all_of(bitmap.begin(), bitmap.end(), [](std::byte x) { return x == std::byte{0}; });
    if (empty && zero++ == 0) first_zero = b.index;
  }
  if (zero > 0) {
    report.note(
        "BAT", "bitmap",
        fmt::format("{} allocated block{} (the first: block {}) have a bitmap with no "
                    "sector marked: {} as zeroes (or from the parent), and the space "
                    "could be given back",
                    zero, zero == 1 ? "" : "s", first_zero, zero == 1 ? "it reads" : "they read"));
  }
}

// open_vhd as serve runs it: the parent link of a differencing disk, and a last word on
// images whose structures passed.
asio::awaitable<void> check_open(backends::DevicePtr child, const vhd::Footer& footer,
                                 const CheckOptions& options, CheckReport& report) {
  const bool differencing = footer.disk_type == static_cast<uint32_t>(vhd::DiskType::differencing);
  co_await formats::check_open(
      open_vhd(child, VhdOptions{.read_only = true, .parents = options.parents}), differencing,
      report);
}

}  // namespace

asio::awaitable<CheckReport> check_vhd(backends::DevicePtr child, const CheckOptions& options) {
  CheckReport report;
  report.format = "vhd";
  const uint64_t file_size = child->size();
  if (file_size < footer_size) {
    report.error("file", "size",
                 fmt::format("the file is {} bytes, shorter than a {}-byte footer (truncated?)",
                             file_size, footer_size));
    report.complete = false;
    co_return report;
  }

  // Both footers (§1.4).
  std::array<std::byte, footer_size> end_bytes, head_bytes;
  co_await child->read(file_size - footer_size, end_bytes);
  co_await child->read(0, head_bytes);
  const auto end = vhd::parse_footer(end_bytes);
  const auto copy = vhd::parse_footer(head_bytes);
  vhd::Footer footer;
  uint64_t data_limit = file_size - footer_size;
  if (end.ok()) {
    footer = end.value();
    if (is_dynamic_type(footer.disk_type)) {
      if (!copy.ok()) {
        const std::string m = without_prefix(copy.problem().message, "footer: ");
        report.error("footer copy", problem_field(copy.problem().message),
                     "footer copy at offset 0: " + m + " (qemu reads this copy first)");
      } else if (head_bytes != end_bytes) {
        compare_footers(footer, copy.value(), report);
      }
    }
  } else if (copy.ok() && is_dynamic_type(copy.value().disk_type)) {
    report.error(
        "footer", problem_field(end.problem().message),
        "footer at the end of the file: " + without_prefix(end.problem().message, "footer: ") +
            "; the copy at offset 0 is sound. An interrupted block allocation leaves "
            "this: the image needs repair (imagenbd serves it read-only)");
    footer = copy.value();
    data_limit = file_size;
  } else {
    std::string message =
        "footer at the end of the file: " + without_prefix(end.problem().message, "footer: ");
    if (copy.ok()) {
      message += fmt::format("; the footer at offset 0 is a {} disk's, which keeps no copy there",
                             vhd::disk_type_name(copy.value().disk_type));
    } else {
      message += "; footer copy at offset 0: " + without_prefix(copy.problem().message, "footer: ");
    }
    report.error("footer", problem_field(end.problem().message), message);
    report.complete = false;
    co_return report;
  }
  if (auto problem = vhd::check_footer(footer, data_limit)) {
    report.error("footer", problem_field(problem->message), problem->message);
    report.complete = false;
    co_return report;
  }
  footer_warnings(footer, report);

  if (footer.disk_type == static_cast<uint32_t>(vhd::DiskType::fixed)) {
    if (data_limit > footer.current_size) {
      report.warning(
          "file", "size",
          fmt::format("the file holds {} bytes between the disk data (current_size "
                      "{}) and the footer at 0x{:x}; they are ignored",
                      data_limit - footer.current_size, footer.current_size, data_limit));
    }
    if (footer.current_size > vhd::max_dynamic_size) {
      report.warning("footer", "current_size",
                     fmt::format("footer: current_size {} is more than 2040 GiB: Azure takes "
                                 "such fixed disks, qemu and Hyper-V cannot open them",
                                 footer.current_size));
    }
    co_await check_open(child, footer, options, report);
    co_return report;
  }

  // Dynamic header and BAT (§1.5, §1.6).
  std::array<std::byte, vhd::header_size> header_bytes;
  co_await child->read(footer.data_offset, header_bytes);
  const auto header = vhd::parse_dynamic_header(header_bytes);
  if (!header.ok()) {
    report.error("dynamic header", problem_field(header.problem().message),
                 header.problem().message);
    report.complete = false;
    co_return report;
  }
  const auto layout = vhd::check_dynamic_header(header.value(), footer, data_limit);
  if (!layout.ok()) {
    report.error("dynamic header", problem_field(layout.problem().message),
                 layout.problem().message);
    report.complete = false;
    co_return report;
  }
  const vhd::DynamicLayout& l = layout.value();
  report.total_blocks = l.bat_entries;
  std::vector<std::byte> bat_bytes(l.bat_bytes);
  co_await child->read(l.bat_offset, bat_bytes);
  const std::vector<uint32_t> bat = vhd::decode_bat(bat_bytes, l.bat_entries);
  const std::vector<Block> blocks = check_entries(bat, l, report);
  co_await check_bitmaps(*child, l, blocks, report);
  scan_space(l, blocks, data_limit, report);
  if (file_size % vhd::sector_size != 0) {
    report.warning("file", "size",
                   fmt::format("the file size {} is not a multiple of {}: no block can be added "
                               "(imagenbd serves it read-only)",
                               file_size, vhd::sector_size));
  }
  co_await check_open(child, footer, options, report);
  co_return report;
}

}  // namespace imagenbd::formats
