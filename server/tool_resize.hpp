// `imagenbd resize [-f FMT] [--shrink] [--json] IMAGE [+|-]SIZE`: a new virtual size for a
// raw, VHD (fixed, dynamic) or VDI (static, dynamic) image, as qemu-img resize and
// vhd-util resize do. One command; the per-format work is formats/vhd_resize and
// vdi_resize (raw: the file is truncated).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace imagenbd::server {

// "+SIZE" and "-SIZE" are relative to `current`, anything else absolute; suffixes as in
// parse_size. @throws std::invalid_argument for bad text and sizes below zero.
uint64_t parse_new_size(std::string_view text, uint64_t current);

// The command: argv[0] is "resize". Returns 0, 1 on errors (nothing changed unless the
// message says otherwise), 2 on usage errors.
int tool_resize(int argc, char** argv);
const char* resize_help();

}  // namespace imagenbd::server
