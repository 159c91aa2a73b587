// The file leaf: a regular file or a block device served with positional I/O, holes found
// with SEEK_DATA/SEEK_HOLE and made with fallocate (cf. nbdkit plugins/file/file.c).
#pragma once

#include <string>

#include "backends/block_device.hpp"

namespace imagenbd::backends {

struct FileOptions {
  bool read_only = false;  // open O_RDONLY; writable/fua/trim/zero caps are off
};

// Opens path, a regular file or a block device, with O_CLOEXEC. The size is fixed at open.
// @throws Error naming the path and the reason ("file: /x.img: No such file or directory"),
// for directories and other non-disk files too.
// @par Thread Safety: the device may be used from any thread concurrently.
DevicePtr open_file(const std::string& path, const FileOptions& options);

}  // namespace imagenbd::backends
