// What `imagenbd check` finds in an image (formats/vhd_check, formats/vdi_check): problems
// sorted by what they mean for the data, in qemu-img check's terms. Errors are corruptions
// (reads may return wrong data or writes may damage it); warnings are harmless damage
// (leaked space, trailing bytes, a structure qemu or VirtualBox would judge differently);
// notes are worth knowing and need no action. Each names the structure and the field.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "backends/block_device.hpp"
#include "formats/parent_finder.hpp"

namespace imagenbd::formats {

struct CheckIssue {
  std::string structure;  // "footer", "footer copy", "dynamic header", "BAT", "header", ...
  std::string field;      // "checksum", "entry 7", "entries 3 and 9", "blocks_allocated"
  std::string message;    // the whole sentence, structure included
};

struct CheckReport {
  std::string format;  // "vhd", "vdi"
  std::vector<CheckIssue> errors;
  std::vector<CheckIssue> warnings;
  std::vector<CheckIssue> notes;
  uint64_t allocated_blocks = 0;  // BAT / block map entries that point at a block
  uint64_t total_blocks = 0;      // BAT / block map entries (0 for a fixed VHD)
  uint64_t leaked_bytes = 0;      // file space no structure references
  bool complete = true;           // false: a damaged structure stopped the check early

  void error(std::string structure, std::string field, std::string message) {
    errors.push_back({std::move(structure), std::move(field), std::move(message)});
  }
  void warning(std::string structure, std::string field, std::string message) {
    warnings.push_back({std::move(structure), std::move(field), std::move(message)});
  }
  void note(std::string structure, std::string field, std::string message) {
    notes.push_back({std::move(structure), std::move(field), std::move(message)});
  }
};

struct CheckOptions {
  ParentChain parents;  // differencing images: how to find (and so check) the parent
};

// The field a codec's Problem message names: "footer: current_size 0 is ..." gives
// "current_size", "header: block count 5 does not ..." gives "block count". Words up to
// the first value, verb or parenthesis after the "structure: " prefix.
std::string problem_field(const std::string& message);

// Awaits `open` (open_vhd or open_vdi as serve runs it, created but not yet started): the
// parent link of a differencing image, and a last word on images whose structures passed.
// ENOTSUP is a warning; other failures are an error only when the check found none before.
boost::asio::awaitable<void> check_open(boost::asio::awaitable<backends::DevicePtr> open,
                                        bool differencing, CheckReport& report);

}  // namespace imagenbd::formats
