// The raw format: the virtual disk is the child's bytes, one to one (cf. qemu
// block/raw-format.c). Adds two things: a read-only mask, and qemu's "probed raw" guard.
#pragma once

#include "backends/block_device.hpp"

namespace imagenbd::formats {

using backends::DevicePtr;

struct RawOptions {
  bool read_only = false;  // mask writable/fua/trim/zero/fast_zero; writes fail with EPERM
  // The user did not name the format and probing said raw. Then writes that would make the
  // image probe as VHD or VDI next time are refused with EPERM: a guest must not be able to
  // turn its raw disk into an image format (and so reach files the host never meant to
  // expose, such as a differencing disk's parent).
  bool probed = false;
};

// Wraps child; never fails. The result is valid for as long as it is held.
DevicePtr open_raw(DevicePtr child, const RawOptions& options);

}  // namespace imagenbd::formats
