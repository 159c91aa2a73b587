// `resize` for fixed and dynamic VHD (formats.md §1.4-§1.7, §1.9-§1.11), like vhd-util
// resize: a new current_size and geometry in both footers (original_size too: libvhdi
// reports it as the media size); a dynamic disk's BAT grows with it, moving the blocks
// that sit where the BAT must grow to the end of the file first.
// Differencing disks are refused (their size is their parent's).
#pragma once

#include "backends/block_device.hpp"
#include "formats/resize_options.hpp"
#include "formats/vhd_layout.hpp"

namespace imagenbd::formats {

namespace asio = boost::asio;

// Resizes the closed VHD in `file` (which must be writable and support resize()) to
// options.new_size bytes. The image must be sound (the caller opens it first); checks what
// it relies on again. Crash-safe order for dynamic disks: each block in the BAT's way is
// copied to the end of the file (behind a new end footer) and flushed before its BAT entry
// moves, then the larger BAT, the header and last the footers (end, then the copy at 0) are
// written, each flushed. A fixed disk's file grows first and gets its new footer before the
// old one is zeroed; shrinking writes the footer at the new end before cutting the file.
// The bytes of a block past the old size are zeroed, so grown space reads as zeroes.
// @throws backends::Error: EINVAL for refusals (a smaller size without options.shrink, an
// allocated block past the new end, sizes not a multiple of 512, a damaged footer), EFBIG
// above 2040 GiB, ENOTSUP for differencing disks; child errors.
asio::awaitable<ResizeResult> resize_vhd(backends::BlockDevice& file, const ResizeOptions& options);

}  // namespace imagenbd::formats
