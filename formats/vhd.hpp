// The VHD format (Virtual PC / Hyper-V / Azure "Virtual Hard Disk" v1; shared/docs/formats.md
// §1): fixed, dynamic and differencing disks, read and write, over a child holding the
// file's bytes. A differencing disk's parents are found through options.parents (§1.8) and
// opened read-only, as deep as max_parent_depth.
#pragma once

#include "backends/block_device.hpp"
#include "formats/parent_finder.hpp"
#include "formats/vhd_layout.hpp"

namespace imagenbd::formats {

using backends::DevicePtr;
namespace asio = boost::asio;

struct VhdOptions {
  bool read_only = false;  // writable/fua/trim/zero caps off; writes fail with EPERM
  // Where the virtual size comes from (formats.md §1.10). automatic: current_size, except
  // CHS geometry for images made by Virtual PC ("vpc ") and qemu's rounded sizes ("qemu").
  vhd::SizePolicy size = vhd::SizePolicy::automatic;
  ParentChain parents;  // differencing disks: how to find the parent
};

// Reads and checks the footer (falling back to the copy at offset 0 of a dynamic disk whose
// last sector is damaged: then read-only, with a warning), the dynamic header and the BAT,
// and returns the virtual disk. Dynamic disks allocate blocks at the end of the file (the
// child must support resize()), crash-safely (formats.md §1.7).
// @throws backends::Error naming the file, the structure and the field
// ("vhd: disk.vhd: footer: checksum mismatch (stored 0x…, computed 0x…)"): EINVAL for
// damage, loops, parents of another size or no finder for a differencing disk; ENOENT when
// no candidate parent has the recorded unique id (the message lists every name tried);
// EFBIG beyond 2040 GiB; child read errors.
// @par Thread Safety: the result may be used from any thread concurrently.
asio::awaitable<DevicePtr> open_vhd(DevicePtr child, const VhdOptions& options);

}  // namespace imagenbd::formats
