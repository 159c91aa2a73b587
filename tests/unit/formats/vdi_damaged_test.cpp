// A corpus of damaged VDIs (formats.md §6, "Common to all formats" and "VDI"), built in
// memory by byte-patching one valid dynamic and one valid static image: each case must be
// refused by open_vdi with backends::Error, its errc, and a message that names the file,
// the structure and the field ("vdi: disk.vdi: header: block size 3000 ..."). The child
// is wrapped in a device that turns any access outside the file into a test failure; the
// ASan run of the unit tests covers the rest. Every case gets a different message.
// vdi_layout_test checks the same fields on decoded headers; this corpus goes through
// open_vdi and the bytes of whole files, as a damaged file reaches the server.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/vdi.hpp"
#include "formats/vdi_layout.hpp"
#include "tests/unit/support/bounds_checked_device.hpp"
#include "tests/unit/support/image_helpers.hpp"
#include "tests/unit/support/refusal.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::BoundsChecked;
using imagenbd::test::run;
namespace vdi = imagenbd::formats::vdi;

using imagenbd::test::uuid;

namespace {

using Bytes = std::vector<std::byte>;
constexpr uint64_t MiB = 1 << 20;

// Absolute field offsets, from formats.md §2.1-2.2, not from the codec under test.
constexpr uint64_t o_text = 0x00, o_signature = 0x40, o_version = 0x44, o_header_size = 0x48,
                   o_type = 0x4C, o_flags = 0x50, o_comment = 0x54, o_blocks_offset = 0x154,
                   o_data_offset = 0x158, o_legacy_sector_size = 0x168, o_disk_size = 0x170,
                   o_block_size = 0x178, o_block_extra = 0x17C, o_blocks = 0x180,
                   o_allocated = 0x184, o_uuid_create = 0x188, o_uuid_modify = 0x198,
                   o_uuid_linkage = 0x1A8, o_lchs_sector_size = 0x1D4;

// The valid dynamic image: 8 MiB of 1 MiB blocks; block map at 0x200, data at 0x400;
// entry 0 -> physical 0 (all 0x11), entry 5 -> physical 1 (all 0x55), 2 allocated.
constexpr uint64_t map_at = 0x200, data_at = 0x400;
constexpr uint64_t dynamic_size = data_at + 2 * MiB;  // 0x200400

void put32(Bytes& b, uint64_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) b.at(at + i) = static_cast<std::byte>(v >> (8 * i));
}
void put64(Bytes& b, uint64_t at, uint64_t v) {
  put32(b, at, static_cast<uint32_t>(v));
  put32(b, at + 4, static_cast<uint32_t>(v >> 32));
}

Bytes image(vdi::ImageType type, uint64_t disk, const std::vector<uint32_t>& map,
            uint32_t allocated) {
  vdi::Header h = vdi::new_header(disk, type, uuid(1), uuid(100));
  h.blocks_allocated = allocated;
  Bytes out(h.data_offset + uint64_t{allocated} * MiB);
  vdi::encode_header(h, out);
  const Bytes m = vdi::encode_block_map(map);
  std::copy(m.begin(), m.end(), out.begin() + h.blocks_offset);
  for (uint32_t i = 0; i < map.size(); ++i) {
    if (map[i] >= allocated) continue;
    std::fill_n(out.begin() + h.data_offset + map[i] * MiB, MiB,
                static_cast<std::byte>(0x11 * (i + 1)));
  }
  return out;
}

Bytes dynamic_image() {
  const uint32_t f = vdi::entry_free;
  return image(vdi::ImageType::dynamic, 8 * MiB, {0, f, f, f, f, 1, f, f}, 2);
}
// 4 MiB static: entries 0..3, all allocated.
Bytes static_image() {
  return image(vdi::ImageType::fixed, 4 * MiB, {0, 1, 2, 3}, 4);
}

Bytes field32(uint64_t at, uint32_t v) {
  Bytes b = dynamic_image();
  put32(b, at, v);
  return b;
}
Bytes field64(uint64_t at, uint64_t v) {
  Bytes b = dynamic_image();
  put64(b, at, v);
  return b;
}
Bytes nil_uuid(uint64_t at) {
  Bytes b = dynamic_image();
  std::fill_n(b.begin() + at, 16, std::byte{0});
  return b;
}
Bytes entry(uint32_t index, uint32_t v) {
  return field32(map_at + 4 * index, v);
}

std::shared_ptr<BoundsChecked> device(const Bytes& bytes) {
  auto m = open_memory(bytes.size(), "disk.vdi");
  if (!bytes.empty()) run(m->write(0, bytes, {}));
  return std::make_shared<BoundsChecked>(m);
}

std::set<std::string>& seen() {
  static std::set<std::string> messages;
  return messages;
}

// Opens `bytes` and checks the refusal: backends::Error with `code` and a message that is
// "vdi: disk.vdi: " followed by text containing `fragment`.
void refused(const char* what, const Bytes& bytes, std::errc code, std::string_view fragment,
             bool read_only = false) {
  imagenbd::test::check_refused(
      what, device(bytes), code, fragment, "vdi: disk.vdi: ", std::max<uint64_t>(bytes.size(), 512),
      seen(), [&](DevicePtr c) { run(open_vdi(std::move(c), {.read_only = read_only})); });
}

void invalid(const char* what, const Bytes& bytes, std::string_view fragment,
             bool read_only = false) {
  refused(what, bytes, std::errc::invalid_argument, fragment, read_only);
}

Bytes read(BlockDevice& d, uint64_t offset, std::size_t n) {
  Bytes v(n);
  run(d.read(offset, v));
  return v;
}

}  // namespace

TEST_CASE("vdi damaged: the valid images of the corpus open") {
  auto d = run(open_vdi(device(dynamic_image()), {}));
  CHECK(d->size() == 8 * MiB);
  CHECK(read(*d, 5 * MiB + 3, 100) == Bytes(100, std::byte{0x66}));
  CHECK(read(*d, 0, 100) == Bytes(100, std::byte{0x11}));
  CHECK(read(*d, MiB, 100) == Bytes(100, std::byte{0}));
  auto s = run(open_vdi(device(static_image()), {}));
  CHECK(read(*s, 3 * MiB, 10) == Bytes(10, std::byte{0x44}));
}

TEST_CASE("vdi damaged: short files and offsets beyond the end (formats.md §6, common)") {
  const Bytes good = dynamic_image();
  invalid("empty file", Bytes{}, "file is 0 bytes, shorter than the 512-byte header (truncated?)");
  invalid("511 bytes", Bytes(good.begin(), good.begin() + 511),
          "file is 511 bytes, shorter than the 512-byte header");
  invalid("header only", Bytes(good.begin(), good.begin() + 512),
          "header: the block map (0x200 to 0x220) extends past the end of the file (0x200 "
          "bytes; truncated?)");
  invalid("header and block map only", Bytes(good.begin(), good.begin() + data_at),
          "block map entry 0 points past the end of the file (block 0 ends at 0x100400, the "
          "file is 0x400 bytes)");
  invalid("cut inside the last block", Bytes(good.begin(), good.begin() + data_at + MiB + 4096),
          "block map entry 5 points past the end of the file (block 1 ends at 0x200400, the "
          "file is 0x101400 bytes)");
  Bytes cut_static = static_image();
  cut_static.resize(cut_static.size() - MiB);
  invalid("static image cut by a block", cut_static,
          "block map entry 3 points past the end of the file (block 3 ends at 0x400400, the "
          "file is 0x300400 bytes)");
  invalid("disk size 0", field64(o_disk_size, 0),
          "header: disk size 0 is smaller than one 512-byte sector");
  invalid("disk size 511", field64(o_disk_size, 511),
          "header: disk size 511 is smaller than one 512-byte sector");
  invalid("disk size 2^64 - 1", field64(o_disk_size, UINT64_MAX),
          "header: disk size 18446744073709551615 needs 17592186044416 blocks of 1048576 bytes, "
          "more than the limit of 536870784");
  invalid("disk size 2^63", field64(o_disk_size, uint64_t{1} << 63),
          "header: disk size 9223372036854775808 needs 8796093022208 blocks");
  // Offsets near 2^32: computed in 64 bits, so the map does not wrap around to the start.
  Bytes high = dynamic_image();
  put32(high, o_blocks_offset, 0xFFFFFE00);
  put32(high, o_data_offset, 0xFFFFFE00);
  invalid("block map and data at 2^32 - 512", high,
          "header: data offset 0xfffffe00 lies inside the block map (0xfffffe00 to 0xfffffe20)");
  Bytes past = dynamic_image();
  put32(past, o_blocks_offset, 0x80000000);
  put32(past, o_data_offset, 0x80000200);
  invalid("block map past the end", past,
          "header: the block map (0x80000000 to 0x80000020) extends past the end of the file "
          "(0x200400 bytes; truncated?)");
  invalid("data offset past the end", field32(o_data_offset, 0x7FFFFE00),
          "header: data offset 0x7ffffe00 is past the end of the file (0x200400 bytes)");
}

TEST_CASE("vdi damaged: pre-header and header fields (formats.md §6, VDI)") {
  invalid("signature", field32(o_signature, 0xBEDA107E),
          "header: signature 0xbeda107e is not 0xbeda107f (not a VDI image)");
  invalid("signature byte-swapped", field32(o_signature, 0x7F10DABE),
          "header: signature 0x7f10dabe is not 0xbeda107f");
  refused("version 1.2", field32(o_version, 0x00010002), std::errc::operation_not_supported,
          "header: version 1.2 is not supported (only 1.1)");
  refused("legacy version 0.2", field32(o_version, 0x00000002), std::errc::operation_not_supported,
          "header: version 0.2 is not supported (only 1.1)");
  refused("version 2.1", field32(o_version, 0x00020001), std::errc::operation_not_supported,
          "header: version 2.1 is not supported (only 1.1)");

  invalid("header size 0x17f", field32(o_header_size, 0x17F),
          "header: header size 383 is smaller than 384, the size of a version 1.1 header");
  invalid("header size 0", field32(o_header_size, 0), "header: header size 0 is smaller than 384");
  invalid("header size past the block map", field32(o_header_size, 0x1C0),
          "header: block map offset 0x200 lies inside the header (which ends at 0x208)");
  invalid("header size 2^32 - 1", field32(o_header_size, 0xFFFFFFFF),
          "header: block map offset 0x200 lies inside the header (which ends at 0x100000047)");

  for (uint32_t type : {0u, 5u, 0xFFFFFFFFu}) {
    invalid("image type", field32(o_type, type),
            fmt::format("header: image type {} is not 1 (dynamic), 2 (static), 3 (undo) or 4 "
                        "(differencing)",
                        type));
  }
  invalid("unknown flag bit", field32(o_flags, 0x2),
          "header: image flags 0x2 have unknown bits (only 0x1, zero-expand, exists)");
  invalid("flags 0x80000001", field32(o_flags, 0x80000001),
          "header: image flags 0x80000001 have unknown bits");
  invalid("differencing without a parent UUID", field32(o_type, 4),
          "header: differencing image without a parent UUID (uuidLinkage is nil)");
  invalid("dynamic with a parent UUID", field32(o_uuid_linkage, 0x01),
          "header: dynamic image with a parent UUID (uuidLinkage 00000001-0000-0000-0000-"
          "000000000000); only differencing images have one");
  refused("undo image", field32(o_type, 3), std::errc::operation_not_supported,
          "undo VDI images (type 3) are not supported");

  invalid("block map offset unaligned", field32(o_blocks_offset, 0x201),
          "header: block map offset 0x201 is not a multiple of 512");
  invalid("data offset unaligned", field32(o_data_offset, 0x401),
          "header: data offset 0x401 is not a multiple of 512");
  invalid("block map inside the header", field32(o_blocks_offset, 0),
          "header: block map offset 0x0 lies inside the header (which ends at 0x1c8)");
  invalid("data inside the block map", field32(o_data_offset, 0x200),
          "header: data offset 0x200 lies inside the block map (0x200 to 0x220)");
  invalid("data offset 0", field32(o_data_offset, 0),
          "header: data offset 0x0 lies inside the block map (0x200 to 0x220)");

  invalid("legacy sector size", field32(o_legacy_sector_size, 4096),
          "header: legacy geometry sector size 4096 is not 512");
  Bytes lchs = field32(o_header_size, vdi::header_size_v1plus);
  put32(lchs, o_lchs_sector_size, 0);
  invalid("LCHS sector size", lchs, "header: LCHS geometry sector size 0 is not 512");

  invalid("block size not a power of two", field32(o_block_size, 3000),
          "header: block size 3000 is not a power of two");
  invalid("block size 256", field32(o_block_size, 256),
          "header: block size 256 is smaller than 512");
  invalid("block size 0", field32(o_block_size, 0), "header: block size 0 is smaller than 512");
  invalid("block size 512 MiB", field32(o_block_size, 512 * MiB),
          "header: block size 536870912 is larger than 268435456 (256 MiB)");
  // A valid power of two that does not match the block count.
  invalid("block size 2 MiB", field32(o_block_size, 2 * MiB),
          "header: block count 8 does not match the disk size 8388608 (4 blocks of 2097152 "
          "bytes)");

  invalid("block extra 3", field32(o_block_extra, 3),
          "header: block extra size 3 is neither 0 nor a power of two");
  invalid("block extra 1 GiB", field32(o_block_extra, 1u << 30),
          "header: block extra size 1073741824 is larger than 268435456 (256 MiB)");
  // qemu ignores cbBlockExtra and misreads; we honour it, and the second block then ends
  // past the file.
  invalid("block extra 512: blocks shift past the end", field32(o_block_extra, 512),
          "block map entry 5 points past the end of the file (block 1 ends at 0x200800, the "
          "file is 0x200400 bytes)");

  invalid("disk size above the blocks", field64(o_disk_size, 9 * MiB),
          "header: block count 8 does not match the disk size 9437184 (9 blocks of 1048576 "
          "bytes)");
  invalid("block count 2^31 - 1", field32(o_blocks, 0x7FFFFFFF),
          "header: block count 2147483647 does not match the disk size 8388608");
  invalid("block count 0", field32(o_blocks, 0),
          "header: block count 0 does not match the disk size 8388608");
  invalid("allocated above the block count", field32(o_allocated, 9),
          "header: allocated block count 9 is larger than the block count 8");
  invalid("allocated 2^32 - 1", field32(o_allocated, 0xFFFFFFFF),
          "header: allocated block count 4294967295 is larger than the block count 8");

  invalid("uuidCreate nil, writable", nil_uuid(o_uuid_create),
          "header: uuidCreate is nil (VirtualBox refuses such images); serve it read-only");
  invalid("uuidModify nil, writable", nil_uuid(o_uuid_modify),
          "header: uuidModify is nil (VirtualBox refuses such images); serve it read-only");
}

TEST_CASE("vdi damaged: block map entries (formats.md §6, VDI)") {
  invalid("entry beyond the block count", entry(3, 1000),
          "block map entry 3 points at block 1000, beyond the 8 blocks of the image");
  invalid("entry just below the zero marker", entry(3, 0xFFFFFFFD),
          "block map entry 3 points at block 4294967293, beyond the 8 blocks of the image");
  invalid("entry inside the block count, past the end", entry(3, 7),
          "block map entry 3 points past the end of the file (block 7 ends at 0x800400, the "
          "file is 0x200400 bytes)");
  invalid("entry past the end, read-only too", entry(2, 7),
          "block map entry 2 points past the end of the file (block 7 ends at 0x800400, the "
          "file is 0x200400 bytes)",
          true);
  invalid("duplicated entry", entry(3, 1), "block map entries 3 and 5 point at the same block (1)");
  invalid("duplicated entry, read-only too", entry(7, 0),
          "block map entries 0 and 7 point at the same block (0)", true);
}

TEST_CASE("vdi damaged: odd but servable images are served") {
  SUBCASE("text and comment without a NUL") {
    Bytes b = dynamic_image();
    std::fill_n(b.begin() + o_text, 0x40, std::byte{'A'});
    std::fill_n(b.begin() + o_comment, 0x100, std::byte{'B'});
    auto d = run(open_vdi(device(b), {}));
    CHECK(read(*d, 0, 4) == Bytes(4, std::byte{0x11}));
  }
  SUBCASE("an odd disk size is rounded down") {
    auto d = run(open_vdi(device(field64(o_disk_size, 8 * MiB - 100)), {}));
    CHECK(d->size() == 8 * MiB - 512);
  }
  SUBCASE("nil UUIDs: read-only") {
    auto d = run(open_vdi(device(nil_uuid(o_uuid_create)), {.read_only = true}));
    CHECK(!d->caps().writable);
  }
  SUBCASE("an entry at the allocated count (the count did not reach the disk)") {
    auto d = run(open_vdi(device(field32(o_allocated, 1)), {}));
    CHECK(read(*d, 5 * MiB, 4) == Bytes(4, std::byte{0x66}));
  }
  SUBCASE("a count above what the file holds: new blocks go past the end, the file grows") {
    auto child = device(field32(o_allocated, 8));
    auto d = run(open_vdi(child, {}));
    const Bytes data(4096, std::byte{0x77});
    for (uint64_t block : {1, 2, 7}) run(d->write(block * MiB + 512, data, {}));
    for (uint64_t block : {1, 2, 7}) {
      CHECK(read(*d, block * MiB + 512, 4096) == data);
      CHECK(read(*d, block * MiB, 512) == Bytes(512, std::byte{0}));
    }
    CHECK(read(*d, 5 * MiB, 4) == Bytes(4, std::byte{0x66}));
    CHECK(child->size() <= data_at + 8 * MiB);
    // Reopened, the image is consistent.
    auto again = run(open_vdi(child, {}));
    CHECK(read(*again, 7 * MiB + 512, 4096) == data);
    CHECK(read(*again, 0, 4) == Bytes(4, std::byte{0x11}));
  }
}
