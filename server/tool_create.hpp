// `imagenbd create -f raw|vhd|vdi [--subformat S] [--block-size N] [--parent FILE] [--force]
// FILE [SIZE]`: a new, empty image of exactly SIZE bytes (with --parent: a differencing
// image of FILE, SIZE defaulting to the parent's). VHD footers carry creator app "inbd" and the
// geometry formats.md §1.10 recommends (the size's own CHS geometry when it is CHS-exact,
// else 65535/16/255), so qemu (any version), libvhdi and imagenbd all read SIZE. VDI
// images are laid out as qemu lays them out (block map at 0x200).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "formats/open_image.hpp"
#include "formats/uuid.hpp"
#include "formats/vhd_layout.hpp"

namespace imagenbd::server {

// create --parent: what a new differencing image records of its parent, read from the
// parent (which must be of the same format) before planning.
struct ParentImage {
  std::string path;           // as the user gave it
  std::string absolute_path;  // its realpath; relative locators are computed from the two
  formats::Format format = formats::Format::raw;
  uint64_t size = 0;           // the parent's virtual size: the default SIZE
  formats::Uuid uuid;          // vhd: footer unique_id; vdi: uuid_create
  formats::Uuid modify_uuid;   // vdi: uuid_modify
  uint32_t vhd_timestamp = 0;  // vhd: footer timestamp
  uint32_t block_size = 0;     // dynamic vhd / vdi block size; 0 when the parent has none
};

struct CreateRequest {
  formats::Format format = formats::Format::raw;
  std::string subformat;    // "" = the default: vhd dynamic, vdi dynamic
  uint32_t block_size = 0;  // 0 = the format's default (vhd 2 MiB, vdi 1 MiB)
  uint64_t size = 0;
  std::string path;                   // the new file (for relative parent locators)
  std::optional<ParentImage> parent;  // a differencing image of this parent
};

// What to put in the new file: its length (the rest reads as zeroes) and the metadata.
struct CreatePlan {
  std::string subformat;  // resolved: "fixed", "dynamic", "static" (raw: "")
  uint32_t block_size = 0;
  uint64_t file_size = 0;
  std::vector<std::pair<uint64_t, std::vector<std::byte>>> writes;  // offset, bytes
  std::vector<std::string> warnings;
};

// Ids and time a new image needs; random and the clock in the command, fixed in tests.
struct CreateIds {
  formats::Uuid uuid;
  formats::Uuid modify_uuid;   // vdi only
  uint32_t vhd_timestamp = 0;  // seconds since 2000-01-01 UTC
};

// The creator app written into VHD footers (4 bytes, documented in the help text).
inline constexpr std::array<char, 4> vhd_creator_app{'i', 'n', 'b', 'd'};

// Opens `path` as serve would (read-only, its own parents resolved) and reads what a
// differencing child records of it. @throws backends::Error, std::invalid_argument.
ParentImage read_parent(const std::string& path);

// Pure: the file for `request`. @throws std::invalid_argument naming what is wrong (size
// not a multiple of 512, too large, bad block size, a subformat the format lacks).
CreatePlan plan_image(const CreateRequest& request, const CreateIds& ids);

// A random (version 4) UUID for a new image.
formats::Uuid random_uuid();

// Writes the plan to path: O_EXCL unless force (then the old contents go); removes the
// file when a write fails. @throws backends::Error (EEXIST says to use --force).
void write_plan(const std::string& path, const CreatePlan& plan, bool force);

// The command: argv[0] is "create". Returns the exit status (0, 1 on errors, 2 on usage).
int tool_create(int argc, char** argv);
const char* create_help();

}  // namespace imagenbd::server
