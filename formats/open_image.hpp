// Opens the virtual disk stored in a byte store: probes the format by its magic unless the
// user named it, then stacks the format layer on the child: raw, VHD or VDI.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

#include "backends/block_device.hpp"
#include "formats/parent_finder.hpp"
#include "formats/vhd_layout.hpp"

namespace imagenbd::formats {

using backends::DevicePtr;
namespace asio = boost::asio;

enum class Format { automatic, raw, vhd, vdi };

// "raw", "vhd" (or qemu's "vpc"), "vdi", "auto".
// @throws std::invalid_argument "unknown image format 'x' (known: raw, vhd, vdi)"
Format parse_format(std::string_view name);
// "auto", "raw", "vhd", "vdi".
std::string_view format_name(Format format);

struct ImageOptions {
  Format format = Format::automatic;
  bool read_only = false;
  vhd::SizePolicy vhd_size = vhd::SizePolicy::automatic;  // VHD only (formats.md §1.10)
  ParentChain parents;  // how differencing images find their parents
};

// Pure: the format whose magic `head` (the first bytes of the image, up to 512) and `tail`
// (its last bytes, up to 512) carry: a VHD footer cookie "conectix" at the start of the
// last 512 bytes or its copy at 0 (dynamic disks), or the VDI signature 0xBEDA107F (LE) at
// 0x40. Anything else is raw. Never returns automatic.
Format probe_format(std::span<const std::byte> head, std::span<const std::byte> tail);

// Reads up to 512 bytes at each end of `child` (the whole of a shorter image, as head and
// as tail) and returns probe_format of them.
asio::awaitable<Format> probe_device(backends::BlockDevice& child);

// Reads the head and tail of child, probes unless options.format names the format, and
// returns the format layer. Probed raw images are opened with RawOptions::probed.
// @throws backends::Error: child read errors, the format's open errors (open_vhd, open_vdi), or
// ENOTSUP for formats not built yet.
asio::awaitable<DevicePtr> open_image(DevicePtr child, ImageOptions options);

}  // namespace imagenbd::formats
