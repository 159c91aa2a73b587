// The VHD on-disk layout (Microsoft "Virtual Hard Disk Image Format Specification" 1.0;
// shared/docs/formats.md §1 and §6): the 512-byte footer, the 1024-byte dynamic header, the
// BAT, the per-block sector bitmaps, checksums, CHS geometry and the virtual size rule.
// Pure: no I/O, never throws, never logs. Every field is checked before it is used in
// arithmetic; a check returns a Problem whose message names the structure, the field, its
// value and what is allowed ("dynamic header: block_size 3000 is not a power of two"); the
// caller adds the layer and the file. All integers on disk are big-endian.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>
#include "formats/layout_result.hpp"

#include "formats/uuid.hpp"

namespace imagenbd::formats::vhd {

constexpr uint64_t sector_size = 512;
constexpr std::size_t footer_size = 512;
constexpr std::size_t header_size = 1024;           // the dynamic header
constexpr uint32_t version_1_0 = 0x00010000;        // footer file_format_version, header_version
constexpr uint32_t features_reserved = 0x00000002;  // always set
constexpr uint32_t features_temporary = 0x00000001;
constexpr uint64_t fixed_data_offset = ~uint64_t{0};  // footer data_offset of a fixed disk
constexpr uint32_t bat_unused = 0xFFFFFFFF;           // BAT entry of an unallocated block
constexpr uint32_t default_block_size = 2u << 20;
constexpr uint32_t max_block_size = 256u << 20;  // larger ones are absurd (formats.md §6)
// 2040 GiB = 0xFF000000 sectors: the ceiling of Microsoft's tools and of qemu (§1.11).
// Fixed disks may be larger (Azure); dynamic ones may not.
constexpr uint64_t max_dynamic_size = uint64_t{0xFF000000} * sector_size;
// The BAT is held in memory: 64 Mi entries (256 MiB) is far beyond any real image (2040 GiB
// needs 1 Mi entries at the default block size) and keeps a crafted header from asking for
// gigabytes.
constexpr uint32_t max_bat_entries = 1u << 26;

enum class DiskType : uint32_t { fixed = 2, dynamic = 3, differencing = 4 };

// "fixed", "dynamic", "differencing" or "unknown".
std::string_view disk_type_name(uint32_t disk_type);

struct Geometry {
  uint16_t cylinders = 0;
  uint8_t heads = 0;
  uint8_t sectors_per_track = 0;
  bool operator==(const Geometry&) const = default;
};
// 65535/16/255: what tools write when the size is not CHS-exact (qemu force_size, §1.10).
constexpr Geometry max_geometry{65535, 16, 255};

// The hard disk footer, decoded as it is (host byte order).
struct Footer {
  std::array<char, 8> cookie{'c', 'o', 'n', 'e', 'c', 't', 'i', 'x'};
  uint32_t features = features_reserved;
  uint32_t format_version = version_1_0;
  uint64_t data_offset = fixed_data_offset;  // the dynamic header; all ones when fixed
  uint32_t timestamp = 0;                    // seconds since 2000-01-01 00:00:00 UTC
  std::array<char, 4> creator_app{'i', 'n', 'b', 'd'};
  uint32_t creator_version = 0x00010000;
  uint32_t creator_host_os = 0x5769326B;  // "Wi2k"
  uint64_t original_size = 0;
  uint64_t current_size = 0;
  Geometry geometry;
  uint32_t disk_type = static_cast<uint32_t>(DiskType::fixed);
  uint32_t checksum = 0;  // as stored; encode_footer computes its own
  Uuid unique_id;
  uint8_t saved_state = 0;
};

struct ParentLocator {
  uint32_t platform_code = 0;  // 0: unused entry
  uint32_t data_space = 0;     // sectors or bytes (formats.md §1.8)
  uint32_t data_length = 0;    // bytes
  uint32_t reserved = 0;
  uint64_t data_offset = 0;  // absolute file offset
  bool operator==(const ParentLocator&) const = default;
};

// The dynamic disk header, decoded as it is.
struct DynamicHeader {
  std::array<char, 8> cookie{'c', 'x', 's', 'p', 'a', 'r', 's', 'e'};
  uint64_t data_offset = ~uint64_t{0};  // unused
  uint64_t table_offset = 0;            // the BAT
  uint32_t header_version = version_1_0;
  uint32_t max_table_entries = 0;
  uint32_t block_size = default_block_size;
  uint32_t checksum = 0;  // as stored; encode_dynamic_header computes its own
  Uuid parent_unique_id;
  uint32_t parent_timestamp = 0;
  std::array<std::byte, 512> parent_unicode_name{};  // UTF-16BE, NUL padded
  std::array<ParentLocator, 8> parent_locators{};
};

// A reason to refuse an image: invalid_argument for damage, not_supported for valid images
// we cannot serve, file_too_large for sizes beyond the format's limits.
using formats::Problem;
using formats::Result;

// One's complement of the byte sum of `structure`, with the 4 bytes at checksum_offset
// taken as zero (§1.3).
uint32_t checksum(std::span<const std::byte> structure, std::size_t checksum_offset);

// Decodes 512 bytes and checks what makes them a footer at all: the cookie and the
// checksum. Field values are checked by check_footer.
Result<Footer> parse_footer(std::span<const std::byte> bytes);
// The 512 bytes of `footer`, reserved bytes zero, with a freshly computed checksum.
std::array<std::byte, footer_size> encode_footer(const Footer& footer);

// Decodes 1024 bytes and checks the cookie and the checksum.
Result<DynamicHeader> parse_dynamic_header(std::span<const std::byte> bytes);
std::array<std::byte, header_size> encode_dynamic_header(const DynamicHeader& header);

// A byte range of the file that holds metadata; blocks must not overlap it.
struct Region {
  uint64_t offset = 0;
  uint64_t length = 0;
  std::string_view what;  // "footer copy", "dynamic header", "BAT"
};

// Checks the footer's fields against the file: data must end by data_limit (the offset of
// the end footer, or the file size when the end footer is damaged and the copy at 0 is
// used). Passes fixed, dynamic and differencing disks; what to serve is the caller's call.
// Does not limit fixed disks to 2040 GiB (Azure stores bigger ones): callers warn.
std::optional<Problem> check_footer(const Footer& footer, uint64_t data_limit);

// Where things are in a dynamic or differencing disk, from a header that passed
// check_dynamic_header. No method overflows: offsets stay below 2^42.
struct DynamicLayout {
  uint64_t header_offset = 0;
  uint64_t bat_offset = 0;
  uint32_t bat_entries = 0;      // max_table_entries
  uint64_t bat_bytes = 0;        // bat_entries * 4, padded to a sector
  uint32_t block_size = 0;       // data bytes per block
  uint32_t bitmap_bytes = 0;     // sector bitmap before each block's data, padded to a sector
  uint64_t current_size = 0;     // from the footer
  uint64_t data_limit = 0;       // blocks must end by this offset
  std::vector<Region> metadata;  // footer copy, dynamic header, BAT

  uint32_t sectors_per_block() const { return block_size / static_cast<uint32_t>(sector_size); }
  uint64_t block_span() const { return uint64_t{bitmap_bytes} + block_size; }
  // The bitmap of the block whose BAT entry is `entry` starts here; its data follows.
  static uint64_t block_offset(uint32_t entry) { return uint64_t{entry} * sector_size; }
  uint64_t block_data(uint32_t entry) const { return block_offset(entry) + bitmap_bytes; }
  uint64_t bat_entry_offset(uint32_t index) const { return bat_offset + uint64_t{index} * 4; }
};

// Bytes of the sector bitmap for blocks of block_size bytes: one bit per sector, padded to
// a whole sector (§1.6). block_size must be a power of two >= 512.
uint32_t bitmap_bytes_for(uint32_t block_size);

// Checks the dynamic header read at footer.data_offset against the footer (which passed
// check_footer) and data_limit: version, block size, BAT size and position.
Result<DynamicLayout> check_dynamic_header(const DynamicHeader& header, const Footer& footer,
                                           uint64_t data_limit);

// The BAT: `entries` big-endian uint32 values from `bytes` (which must hold them).
std::vector<uint32_t> decode_bat(std::span<const std::byte> bytes, uint32_t entries);
// `entries` as bytes, padded with 0xFF to `padded_size` bytes (>= 4 * entries.size()).
std::vector<std::byte> encode_bat(std::span<const uint32_t> entries, std::size_t padded_size);
void store_bat_entry(std::span<std::byte, 4> out, uint32_t entry);

// Checks every BAT entry: an allocated block (bitmap and data) lies inside the file before
// layout.data_limit, overlaps no metadata region and no other block (§6).
std::optional<Problem> check_bat(std::span<const uint32_t> bat, const DynamicLayout& layout);

// Sector bitmaps: sector k of a block is bit k, most significant bit first (§1.6).
constexpr std::byte bitmap_mask(uint32_t sector) {
  return static_cast<std::byte>(0x80u >> (sector % 8));
}
inline bool bitmap_test(std::span<const std::byte> bitmap, uint32_t sector) {
  return (bitmap[sector / 8] & bitmap_mask(sector)) != std::byte{0};
}

// Parent locators (formats.md §1.8). Platform codes, as the big-endian uint32 they are.
namespace platform {
constexpr uint32_t none = 0;
constexpr uint32_t wi2r = 0x57693272;  // "Wi2r": relative, ANSI (deprecated)
constexpr uint32_t wi2k = 0x5769326B;  // "Wi2k": absolute, ANSI (deprecated)
constexpr uint32_t w2ru = 0x57327275;  // "W2ru": relative to the child, UTF-16LE
constexpr uint32_t w2ku = 0x57326B75;  // "W2ku": absolute, UTF-16LE
constexpr uint32_t mac = 0x4D616320;   // "Mac ": a Mac OS alias blob (opaque)
constexpr uint32_t macx = 0x4D616358;  // "MacX": a UTF-8 file:// URL
}  // namespace platform
// The code as text: "W2ru", "Mac ".
std::string platform_name(uint32_t code);

// Locator data must fit in this many bytes (a sane path is far shorter).
constexpr uint32_t max_locator_bytes = 64u << 10;

// The bytes reserved for a locator's data. data_space is sectors per the spec but bytes in
// what Microsoft writes; blktap's rule reads both: below 512 it counts sectors, otherwise
// it must be a multiple of 512 and counts bytes.
Result<uint64_t> locator_space_bytes(const ParentLocator& locator);

// Checks the used locators of a differencing disk's header (entry k is "parent locator
// k"): a known platform code, data_length <= the space, the space within max_locator_bytes,
// and the data inside the file before data_limit, clear of the footer copy, the dynamic
// header, the BAT and each other. check_dynamic_header runs it for differencing disks and
// adds each locator's data to DynamicLayout::metadata.
std::optional<Problem> check_locators(const DynamicHeader& header, uint64_t data_limit,
                                      std::span<const Region> metadata,
                                      std::vector<Region>* regions = nullptr);

// A parent's path as a locator records it, in POSIX form ('/' separators, no drive letter).
struct LocatorPath {
  std::string path;       // UTF-8
  bool relative = false;  // relative to the child's directory
  bool operator==(const LocatorPath&) const = default;
};

// Decodes a locator's data (its first data_length bytes): W2ru/W2ku as UTF-16LE (".\a\b"
// is relative, "c:\a\b" absolute: the drive letter is dropped, '\' becomes '/'),
// Wi2r/Wi2k as 8-bit text the same way, MacX as a file:// URL ("file://./a" relative,
// "file://localhost/a" or "file:///a" absolute, %XX escapes decoded). Trailing NULs are
// ignored. A Problem for "Mac " aliases (not_supported), unknown codes, odd UTF-16 byte
// counts, bad surrogates or UTF-8, embedded NULs and empty paths.
Result<LocatorPath> decode_locator_path(uint32_t platform_code, std::span<const std::byte> data);

// The data of a new locator for `path` (POSIX form; for W2ru relative to the child's
// directory, for W2ku and MacX absolute): W2ru ".\a\b" and W2ku "\dir\b" in UTF-16LE,
// MacX "file://" + the path with '%' and bytes outside printable ASCII escaped. Path must be
// valid UTF-8 (else a Problem).
Result<std::vector<std::byte>> encode_locator_path(uint32_t platform_code, std::string_view path);

// Appends code point `c` (at most U+10FFFF, not a surrogate) to `out` as UTF-8.
void append_utf8(std::string& out, uint32_t c);
// UTF-16 (little- or big-endian) to UTF-8, strictly: odd byte counts, lone surrogates and
// NUL units are Problems naming `what`.
Result<std::string> utf16_to_utf8(std::span<const std::byte> bytes, bool big_endian,
                                  std::string_view what);
// UTF-8 to UTF-16; invalid UTF-8 is a Problem naming `what`.
Result<std::vector<std::byte>> utf8_to_utf16(std::string_view text, bool big_endian,
                                             std::string_view what);
// The header's parent Unicode name (UTF-16BE, NUL padded) as UTF-8, up to the first NUL
// unit; "" when it is not valid UTF-16.
std::string parent_name(const DynamicHeader& header);
// `name` as the header's parent Unicode name field; a Problem when it is not UTF-8 or
// takes more than 256 UTF-16 units.
Result<std::array<std::byte, 512>> encode_parent_name(std::string_view name);

// CHS geometry for a disk of total_sectors sectors, as the spec's appendix computes it
// (§1.9): rounds down, capped at 65535/16/255.
Geometry geometry_for(uint64_t total_sectors);
// C * H * S * 512.
uint64_t geometry_bytes(Geometry geometry);
// The geometry to record for a disk of exactly `size` bytes, as imagenbd writes it (create,
// convert, resize; §1.10): geometry_for(size / 512) when its C*H*S*512 equals size, else
// 65535/16/255, which every reader takes to mean "see current_size".
Geometry geometry_to_record(uint64_t size);

// How the virtual size is chosen (§1.10).
enum class SizePolicy {
  automatic,     // current_size, except CHS for creators "vpc " and "qemu" (qemu >= 10)
  current_size,  // always current_size (libvhdi, Hyper-V, Azure)
  chs,           // always C * H * S * 512 (qemu <= 9 for most creators)
};
// "auto", "current_size", "chs".
std::string_view size_policy_name(SizePolicy policy);
// True for the creator apps whose images take their size from CHS: "vpc " and "qemu".
bool creator_uses_chs(const std::array<char, 4>& creator_app);
// The virtual size of a disk whose footer passed check_footer. CHS is never used when the
// geometry is the maximum (it then means "see current_size"), and never allowed to exceed
// current_size (the data ends there); automatic falls back to current_size in both cases,
// an explicit chs is a Problem.
Result<uint64_t> virtual_size(const Footer& footer, SizePolicy policy);

// A 4-byte code as text, NUL and other non-printable bytes escaped: "d2v\0", "wa\0\0".
std::string fourcc_text(std::span<const char> code);

}  // namespace imagenbd::formats::vhd
