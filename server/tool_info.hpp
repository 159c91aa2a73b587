// `imagenbd info [-f FMT] [--json] IMAGE`: what an image is, in qemu-img info's words, or
// as JSON with stable snake_case keys. The image is opened exactly as `serve` opens it
// (same probing, same checks, same messages for damaged images), then its metadata is
// decoded with the formats' pure codecs for the details.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "formats/open_image.hpp"
#include "formats/vhd_layout.hpp"

namespace imagenbd::server {

struct VhdInfo {
  std::string subformat;    // "fixed", "dynamic", "differencing"
  std::string creator_app;  // fourcc_text: "qem2", "wa\0\0"
  uint32_t creator_version = 0;
  std::string creator_host_os;
  uint32_t timestamp = 0;  // seconds since 2000-01-01 UTC
  uint64_t current_size = 0;
  uint64_t original_size = 0;
  formats::vhd::Geometry geometry;
  uint64_t chs_size = 0;
  std::string size_source;   // "current_size" or "chs": what imagenbd serves
  uint64_t qemu72_size = 0;  // what qemu <= 9 (7.2 here) computes (formats.md §1.10)
  std::string uuid;
  bool footer_copy_used = false;  // the end footer is damaged; the copy at 0 was read
  // dynamic and differencing
  uint32_t block_size = 0;
  uint32_t blocks_total = 0;  // BAT entries
  uint32_t blocks_allocated = 0;
  // differencing
  std::string parent_name;
  std::string parent_uuid;
};

struct VdiInfo {
  std::string subformat;  // "dynamic", "static", "differencing", "undo"
  std::string version;    // "1.1"
  uint32_t header_size = 0;
  std::string comment;
  uint32_t block_size = 0;
  uint32_t blocks_total = 0;
  uint32_t blocks_allocated = 0;  // cBlocksAllocated from the header
  uint32_t blocks_used = 0;       // block map entries that point at a block
  std::string uuid;
  std::string modify_uuid;
  std::string parent_uuid;         // uuidLinkage; nil unless differencing
  std::string parent_modify_uuid;  // uuidParentModify
};

// One image of a differencing image's parent chain (parent first, then its parent...).
struct ParentInfo {
  std::string filename;  // as the finder opened it (the real path of a local file)
  std::string format;    // "vhd", "vdi"
  std::string uuid;      // vhd: footer unique id; vdi: uuid_create
};

struct ImageInfo {
  std::string filename;
  std::string format;  // "raw", "vhd", "vdi"
  uint64_t virtual_size = 0;
  uint64_t file_size = 0;
  uint64_t allocated_bytes = 0;  // st_blocks * 512 ("disk size" in qemu-img)
  std::string not_served;        // why serve refuses this valid image (ENOTSUP), or ""
  std::optional<VhdInfo> vhd;
  std::optional<VdiInfo> vdi;
  // Differencing images: the parents serve opened, nearest first (complete when
  // not_served is empty).
  std::vector<ParentInfo> parents;
};

// Opens path read-only like serve does (parents found the way serve finds them) and gathers
// its information. A differencing image whose parent is missing is still described, with
// serve's message in not_served.
// @throws backends::Error with serve's message for unreadable or damaged images.
ImageInfo gather_info(const std::string& path, formats::Format format);

// Pure renderings. JSON: one object, keys as in the structs above ("format",
// "virtual_size", ..., "vhd": {...} or "vdi": {...}), ending with a newline.
std::string info_json(const ImageInfo& info);
std::string info_text(const ImageInfo& info);

// The size qemu <= 9 gives a VHD (formats.md §1.10): current_size for creators "win ",
// "qem2", "d2v ", "CTXS", "tap\0" or the maximum geometry, CHS * 512 otherwise.
uint64_t qemu72_virtual_size(const formats::vhd::Footer& footer);

// UTF-16BE, NUL padded (the VHD parent name) as UTF-8.
std::string utf16be_to_utf8(std::span<const std::byte> bytes);

// The command: argv[0] is "info". Returns the exit status (0, 1 on errors, 2 on usage).
int tool_info(int argc, char** argv);
const char* info_help();

}  // namespace imagenbd::server
