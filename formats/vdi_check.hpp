// `check` for VDI (formats.md §2, §6): the header, every block map entry and the file's
// space, reported in full rather than refused at the first problem as open_vdi does.
// Severity follows qemu-img check (block/vdi.c vdi_co_check): an entry beyond the block
// count, two entries sharing a block, and an allocated-block count that differs from the
// map ("allocated blocks mismatch", also what a crash between the header and the map update
// leaves) are errors. Reads the child only.
#pragma once

#include "backends/block_device.hpp"
#include "formats/check_report.hpp"

namespace imagenbd::formats {

namespace asio = boost::asio;

// Checks the VDI held by child: header fields (vdi::check_header), nil UUIDs, odd sizes;
// each block map entry (inside the image and the file, no two sharing a physical block);
// blocks_allocated against the map; leaked space (physical blocks no entry uses, bytes
// past the last block); the parent link of a differencing image through options.parents
// (ENOTSUP: a warning "parent link not checked: ..."), and that open_vdi accepts an image
// whose structures passed. report.complete is false when the header stopped the check.
// @throws backends::Error only for read errors of the child's metadata.
asio::awaitable<CheckReport> check_vdi(backends::DevicePtr child, const CheckOptions& options);

}  // namespace imagenbd::formats
