// What `imagenbd resize` asks of a format (formats/vhd_resize, formats/vdi_resize) and what
// it gets back. Resizing works on a closed image, through its child (the file): no format
// layer may have it open meanwhile.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "formats/uuid.hpp"

namespace imagenbd::formats {

struct ResizeOptions {
  uint64_t new_size = 0;  // bytes of virtual disk; a multiple of 512
  bool shrink = false;    // a smaller size is refused without it
  Uuid modify_uuid;       // VDI: the new uuidModify (VirtualBox changes it on every change)
};

struct ResizeResult {
  uint64_t old_size = 0;  // the virtual size before
  uint64_t new_size = 0;
  uint32_t relocated_blocks = 0;  // blocks copied to the end to make room for the table
  std::vector<std::string> warnings;
};

}  // namespace imagenbd::formats
