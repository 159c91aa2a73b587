// The VDI format (VirtualBox Disk Image; shared/docs/formats.md §2): static, dynamic and
// differencing images, read/write, with blocks allocated on first write in a crash-safe
// order (a differencing image copies the rest of the block up from its parent). The
// on-disk codec is formats/vdi_layout.hpp, the parent search formats/vdi_parent.hpp.
// Limits: undo (type 3) images are refused; blocks are never given back (trim and zero
// punch holes inside allocated blocks instead).
#pragma once

#include "backends/block_device.hpp"
#include "formats/parent_finder.hpp"

namespace imagenbd::formats {

using backends::DevicePtr;
namespace asio = boost::asio;

struct VdiOptions {
  bool read_only = false;  // no writes; also the only way to serve images with nil UUIDs
  ParentChain parents;     // differencing images: how to find the parent
};

// Reads and checks the header and the whole block map of the VDI image in child, and
// returns the virtual disk. Writable when child is and options.read_only is not; dynamic
// images then grow child with resize().
// @throws backends::Error naming the file and the field: EINVAL for damaged images (a bad
// signature, a block map entry past the end of the file or shared by two entries, a
// differencing image without options.parents.finder, a parent loop), ENOENT when the
// parent is not found, ENOTSUP for valid ones we do not serve (undo, other versions), or
// child and parent errors. A differencing image's parent is opened read-only, recursively.
// @par Thread Safety: the device may be used from any thread concurrently.
asio::awaitable<DevicePtr> open_vdi(DevicePtr child, const VdiOptions& options);

}  // namespace imagenbd::formats
