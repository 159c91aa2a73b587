// `resize` for static and dynamic VDI (formats.md §2): a new disk size and block count in
// the header and a longer block map. When the map does not fit before the data, the
// physical blocks where it must grow are copied to the end of the file and the new map is
// written into the space they leave; one header write (a single sector) then switches to
// the new map and data offsets. Differencing and undo images are refused.
#pragma once

#include "backends/block_device.hpp"
#include "formats/resize_options.hpp"

namespace imagenbd::formats {

namespace asio = boost::asio;

// Resizes the closed VDI in `file` (writable, with resize()) to options.new_size bytes and
// gives it options.modify_uuid. Static images get their new blocks allocated (the file
// grows, zero-filled); dynamic ones get free entries. Shrinking needs options.shrink; a
// dynamic image refuses it while a block past the new end is allocated, a static image
// cuts its blocks (with a warning) and its file. Crash-safe: every step before the final
// header write leaves the old image readable (at worst with leaked blocks and the
// allocated-count mismatch qemu-img check reports for them).
// @throws backends::Error: EINVAL for refusals and damaged images, ENOTSUP for
// differencing/undo images, block extra data, or a static image whose map is not in order
// when shrinking; EFBIG when the offsets outgrow the header's 32-bit fields; child errors.
asio::awaitable<ResizeResult> resize_vdi(backends::BlockDevice& file, const ResizeOptions& options);

}  // namespace imagenbd::formats
