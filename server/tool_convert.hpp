// `imagenbd convert [-f FMT] -O FMT [--subformat S] [--azure] [-p] [--json] IN OUT`: copies
// the virtual disk IN into a new image OUT of another (or the same) format, raw, VHD and
// VDI in every direction. Only data is copied: holes and zero extents of IN, and data that
// reads as zeroes (checked per 4 KiB), are skipped, so sparse stays sparse in every output
// (a fresh image reads as zeroes). VHD and VDI outputs keep IN's UUID (RFC order in VHD,
// GUID order in VDI, via the codecs); raw inputs give a random one. --azure makes the fixed
// VHD Azure takes (formats.md §1.12): a whole number of MiB, so the file is N MiB + 512.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "formats/open_image.hpp"

namespace imagenbd::server {

struct ConvertCommand {
  formats::Format in_format = formats::Format::automatic;
  formats::Format out_format = formats::Format::automatic;  // -O, required
  std::string subformat;                                    // "" = the format's default
  uint32_t block_size = 0;                                  // 0 = the format's default
  bool azure = false;
  bool progress = false;  // -p
  bool quiet = false;     // -q
  bool json = false;
  bool force = false;
  bool help = false;
  std::string in, out;
};

// Pure: argv[0] is "convert". --azure implies -O vhd --subformat fixed and refuses other
// choices. @throws std::invalid_argument with the usage message.
ConvertCommand parse_convert(int argc, char** argv);

// The output's virtual size for an input of in_size bytes, and what to tell the user when
// it differs.
struct OutputSize {
  uint64_t size = 0;
  std::vector<std::string> notes;  // what the user should know (rounding, Azure limits)
};

// Pure: raw keeps in_size; VHD and VDI round up to a multiple of 512 (their sector size);
// --azure rounds up to a whole MiB (and notes managed disks start at 20 MiB).
OutputSize convert_output_size(uint64_t in_size, formats::Format out_format, bool azure);

// Pure: the byte ranges (offset, length) of `data` that are not all zeroes, checked per
// `granule` bytes (the last granule may be short); adjacent ones are merged.
std::vector<std::pair<std::size_t, std::size_t>> nonzero_runs(std::span<const std::byte> data,
                                                              std::size_t granule);

// What a conversion did, for --json.
struct ConvertSummary {
  std::string input, output;
  std::string input_format, output_format, output_subformat;
  uint64_t input_size = 0;
  uint64_t virtual_size = 0;  // of OUT
  uint64_t file_size = 0;     // of OUT
  uint64_t bytes_read = 0;    // data extents of IN read
  uint64_t bytes_written = 0;
  uint64_t bytes_zero = 0;   // read but all zeroes: not written
  uint64_t bytes_holes = 0;  // hole and zero extents of IN: neither read nor written
  std::string uuid;          // OUT's, "" for raw
  double seconds = 0;
};

// Pure: one JSON object (snake_case keys as in ConvertSummary), ending with a newline.
std::string convert_json(const ConvertSummary& summary);

// The command: argv[0] is "convert". Returns the exit status (0, 1 on errors, 2 on usage).
int tool_convert(int argc, char** argv);
const char* convert_help();

}  // namespace imagenbd::server
