// `check` for VHD (formats.md §1.4-§1.7, §6): every structure of a fixed, dynamic or
// differencing disk, reported in full rather than refused at the first problem as open_vhd
// does. Reads the child only (never writes).
#pragma once

#include "backends/block_device.hpp"
#include "formats/check_report.hpp"

namespace imagenbd::formats {

namespace asio = boost::asio;

// Checks the VHD held by child:
// - both footers: cookie and checksum, which one is damaged (a bad end footer with a sound
//   copy at 0 is the mark of an interrupted allocation), fields that differ between them;
// - every footer field (vhd::check_footer), temporary and saved-state flags;
// - the dynamic header and its BAT: every entry inside the file, clear of the metadata and
//   of every other entry (all bad entries are reported, not just the first);
// - each allocated block's bitmap is readable (all-zero bitmaps are noted);
// - the file's space: leaked blocks (space no BAT entry references: what a crash during an
//   allocation leaves) and bytes a fixed disk keeps between its data and its footer;
// - the parent link of a differencing disk, by opening it with options.parents (ENOTSUP is
//   a warning, "parent link not checked: ..."), and for every image whose structures look
//   sound, that open_vhd accepts it.
// Stops early (report.complete = false) when a structure the rest depends on is damaged.
// @throws backends::Error only for read errors of the child's metadata.
asio::awaitable<CheckReport> check_vhd(backends::DevicePtr child, const CheckOptions& options);

}  // namespace imagenbd::formats
