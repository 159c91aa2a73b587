// The VDI codec on crafted bytes: a header as qemu-img 7.2 writes it, UUID byte order,
// encode/decode round trips, and every malformed case of formats.md §6 (VDI and common)
// refused with a message naming the field.
#include "formats/vdi_layout.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <array>
#include <cstring>
#include <functional>
#include <string>
#include <vector>
#include "tests/unit/support/image_helpers.hpp"

using namespace imagenbd::formats;
using namespace imagenbd::formats::vdi;

using imagenbd::test::uuid;

namespace {

constexpr uint64_t MiB = 1 << 20;

std::vector<std::byte> hex(std::string_view text) {
  std::vector<std::byte> out;
  for (std::size_t i = 0; i + 1 < text.size();) {
    if (text[i] == ' ') {
      ++i;
      continue;
    }
    out.push_back(static_cast<std::byte>(std::stoi(std::string(text.substr(i, 2)), nullptr, 16)));
    i += 2;
  }
  return out;
}

void put(std::vector<std::byte>& buffer, std::size_t at, std::string_view hex_bytes) {
  const auto bytes = hex(hex_bytes);
  std::memcpy(buffer.data() + at, bytes.data(), bytes.size());
}

// The first sector of `qemu-img create -f vdi d.vdi 5M` (qemu 7.2), non-zero bytes only.
std::vector<std::byte> qemu_sector() {
  std::vector<std::byte> s(512);
  const std::string_view text = "<<< QEMU VM Virtual Disk Image >>>\n";
  std::memcpy(s.data(), text.data(), text.size());
  put(s, 0x40, "7f10dabe 01000100 80010000 01000000");
  put(s, 0x154, "00020000 00040000");
  put(s, 0x168, "00020000");
  put(s, 0x170, "00005000 00000000 00001000 00000000");
  put(s, 0x180, "05000000 00000000 40b92802 8c4f7a4e 8b5cb9ed c26b1ae7");
  put(s, 0x198, "6fe11af6 ea2ac14f 9078b716 18e19699");
  return s;
}

constexpr uint64_t qemu_file_size = 1024;  // header sector + block map sector, no data

// A valid dynamic header for `disk` bytes, and the file size that holds its map.
Header good(uint64_t disk = 5 * MiB) {
  return new_header(disk, ImageType::dynamic, uuid(1), uuid(100));
}
uint64_t map_end(const Header& h) {
  return h.data_offset;
}

}  // namespace

TEST_CASE("vdi layout: a header written by qemu-img decodes field by field") {
  const Header h = decode_header(qemu_sector());
  CHECK(h.text == "<<< QEMU VM Virtual Disk Image >>>\n");
  CHECK(h.signature == signature);
  CHECK(h.version == version_1_1);
  CHECK(h.header_size == 0x180);
  CHECK(h.image_type == 1);
  CHECK(h.flags == 0);
  CHECK(h.comment.empty());
  CHECK(h.blocks_offset == 0x200);
  CHECK(h.data_offset == 0x400);
  CHECK(h.legacy == Geometry{0, 0, 0, 512});
  CHECK(h.disk_size == 5 * MiB);
  CHECK(h.block_size == MiB);
  CHECK(h.block_extra == 0);
  CHECK(h.blocks == 5);
  CHECK(h.blocks_allocated == 0);
  CHECK(h.uuid_linkage.is_nil());
  CHECK(h.uuid_parent_modify.is_nil());

  const auto r = check_header(h, qemu_file_size);
  REQUIRE(r.ok());
  const Layout& l = r.value();
  CHECK(l.disk_size == 5 * MiB);
  CHECK(!l.disk_size_rounded);
  CHECK(l.blocks == 5);
  CHECK(l.block_data(0) == 0x400);
  CHECK(l.block_data(2) == 0x400 + 2 * MiB);
  CHECK(l.block_end(2) == 0x400 + 3 * MiB);
  CHECK(l.entry_offset(3) == 0x200 + 12);
  CHECK(l.block_bytes(4) == MiB);
}

TEST_CASE("vdi layout: UUIDs are stored in GUID layout (first three fields little-endian)") {
  const Header h = decode_header(qemu_sector());
  // Read as a GUID, qemu's random UUIDs have the version-4 nibble where RFC 4122 puts it.
  CHECK(h.uuid_create.to_string() == "0228b940-4f8c-4e7a-8b5c-b9edc26b1ae7");
  CHECK(h.uuid_modify.to_string() == "f61ae16f-2aea-4fc1-9078-b71618e19699");
  CHECK((h.uuid_create.bytes[6] >> 4) == 4);
  CHECK((h.uuid_create.bytes[8] & 0xc0) == 0x80);

  const Uuid u = Uuid::random_v4({0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa,
                                  0xbb, 0xcc, 0xdd, 0xee, 0xff});
  CHECK(u.to_string() == "00112233-4455-4677-8899-aabbccddeeff");
  std::array<std::byte, 16> stored;
  store_uuid(u, stored);
  CHECK(std::vector<std::byte>(stored.begin(), stored.end()) ==
        hex("33221100 55447746 8899aabb ccddeeff"));
  CHECK(load_uuid(stored) == u);
}

TEST_CASE("vdi layout: encode writes every field and keeps bytes it does not know") {
  Header h = good(7 * MiB + 512);
  h.header_size = header_size_v1plus;
  h.flags = flag_zero_expand;
  h.comment = "a comment";
  h.legacy = Geometry{1, 2, 3, 512};
  h.lchs = Geometry{1023, 16, 63, 512};
  h.blocks_allocated = 3;
  h.uuid_linkage = uuid(50);
  h.uuid_parent_modify = uuid(70);
  std::vector<std::byte> sector(512, std::byte{0xAB});
  encode_header(h, sector);
  CHECK(sector[0x1E0] == std::byte{0xAB});  // after the LCHS geometry: untouched
  const Header back = decode_header(sector);
  CHECK(back.text == h.text);
  CHECK(back.comment == "a comment");
  CHECK(back.flags == h.flags);
  CHECK(back.legacy == h.legacy);
  CHECK(back.lchs == h.lchs);
  CHECK(back.disk_size == h.disk_size);
  CHECK(back.blocks == 8);
  CHECK(back.blocks_allocated == 3);
  CHECK(back.uuid_create == h.uuid_create);
  CHECK(back.uuid_modify == h.uuid_modify);
  CHECK(back.uuid_linkage == h.uuid_linkage);
  CHECK(back.uuid_parent_modify == h.uuid_parent_modify);

  // A plain 1.1 header (0x180) has no LCHS geometry: those bytes are not touched either.
  h.header_size = header_size_v1;
  std::vector<std::byte> plain(512, std::byte{0xCD});
  encode_header(h, plain);
  CHECK(plain[0x1C8] == std::byte{0xCD});
  CHECK(decode_header(plain).lchs == Geometry{});

  // The qemu sector re-encodes to itself.
  const auto qemu = qemu_sector();
  std::vector<std::byte> again(512);
  encode_header(decode_header(qemu), again);
  CHECK(again == qemu);

  // Text fields longer than their space are cut, keeping a NUL.
  h.comment = std::string(300, 'x');
  encode_header(h, again);
  CHECK(decode_header(again).comment == std::string(255, 'x'));
}

TEST_CASE("vdi layout: new_header lays images out as qemu does") {
  const Header d = new_header(5 * MiB, ImageType::dynamic, uuid(1), uuid(2));
  CHECK(d.blocks_offset == 0x200);
  CHECK(d.data_offset == 0x400);
  CHECK(d.blocks == 5);
  CHECK(d.blocks_allocated == 0);
  CHECK(new_block_map(d) == std::vector<uint32_t>(5, entry_free));
  REQUIRE(check_header(d, 0x400).ok());

  const Header s = new_header(300 * MiB + 1024, ImageType::fixed, uuid(1), uuid(2), 1 << 16);
  CHECK(s.blocks == 300 * 16 + 1);
  CHECK(s.data_offset == 0x200 + 4 * 4801 / 512 * 512 + 512);
  CHECK(s.blocks_allocated == s.blocks);
  const auto map = new_block_map(s);
  CHECK(map[0] == 0);
  CHECK(map[4800] == 4800);
  const uint64_t file = s.data_offset + uint64_t{s.blocks} * (1 << 16);
  const auto r = check_header(s, file);
  REQUIRE(r.ok());
  CHECK(r.value().block_bytes(4800) == 1024);  // the last block is mostly outside the disk
  CHECK(check_block_map(r.value(), map, file).ok());
}

TEST_CASE("vdi layout: the file must hold the first sector") {
  for (uint64_t size : {0, 1, 72, 511}) {
    const auto p = check_file_size(size);
    REQUIRE(p);
    CHECK(p->message ==
          fmt::format("file is {} bytes, shorter than the 512-byte header (truncated?)", size));
  }
  CHECK(!check_file_size(512));
}

TEST_CASE("vdi layout: every malformed header field is refused, naming it") {
  struct Case {
    const char* what;
    std::function<void(Header&)> damage;
    std::string message;
    std::errc code = std::errc::invalid_argument;
    uint64_t file_size = 0x400;
  };
  const std::vector<Case> cases = {
      {"signature", [](Header& h) { h.signature = 0xBEDA107E; },
       "header: signature 0xbeda107e is not 0xbeda107f (not a VDI image)"},
      {"version 1.2", [](Header& h) { h.version = 0x00010002; },
       "header: version 1.2 is not supported (only 1.1)", std::errc::operation_not_supported},
      {"legacy version 0.2", [](Header& h) { h.version = 2; },
       "header: version 0.2 is not supported (only 1.1)", std::errc::operation_not_supported},
      {"header size too small", [](Header& h) { h.header_size = 0x17f; },
       "header: header size 383 is smaller than 384, the size of a version 1.1 header"},
      {"header size past the block map", [](Header& h) { h.header_size = 0x200; },
       "header: block map offset 0x200 lies inside the header (which ends at 0x248)"},
      {"image type 0", [](Header& h) { h.image_type = 0; },
       "header: image type 0 is not 1 (dynamic), 2 (static), 3 (undo) or 4 (differencing)"},
      {"image type 5", [](Header& h) { h.image_type = 5; },
       "header: image type 5 is not 1 (dynamic), 2 (static), 3 (undo) or 4 (differencing)"},
      {"unknown flags", [](Header& h) { h.flags = 0x101; },
       "header: image flags 0x101 have unknown bits (only 0x1, zero-expand, exists)"},
      {"differencing without a parent", [](Header& h) { h.image_type = 4; },
       "header: differencing image without a parent UUID (uuidLinkage is nil)"},
      {"dynamic with a parent", [](Header& h) { h.uuid_linkage = uuid(9); },
       "header: dynamic image with a parent UUID (uuidLinkage 090a0b0c-0d0e-0f10-1112-"
       "131415161718); only differencing images have one"},
      {"unaligned block map", [](Header& h) { h.blocks_offset = 0x201; },
       "header: block map offset 0x201 is not a multiple of 512"},
      {"unaligned data", [](Header& h) { h.data_offset = 0x401; },
       "header: data offset 0x401 is not a multiple of 512"},
      {"block map inside the header", [](Header& h) { h.blocks_offset = 0; },
       "header: block map offset 0x0 lies inside the header (which ends at 0x1c8)"},
      {"legacy sector size", [](Header& h) { h.legacy.sector_size = 4096; },
       "header: legacy geometry sector size 4096 is not 512"},
      {"LCHS sector size",
       [](Header& h) {
         h.header_size = header_size_v1plus;
         h.lchs.sector_size = 0;
       },
       "header: LCHS geometry sector size 0 is not 512"},
      {"disk size 0", [](Header& h) { h.disk_size = 0; },
       "header: disk size 0 is smaller than one 512-byte sector"},
      {"disk size 100", [](Header& h) { h.disk_size = 100; },
       "header: disk size 100 is smaller than one 512-byte sector"},
      {"block size not a power of two", [](Header& h) { h.block_size = 3000; },
       "header: block size 3000 is not a power of two"},
      {"block size 0", [](Header& h) { h.block_size = 0; },
       "header: block size 0 is smaller than 512"},
      {"block size 256", [](Header& h) { h.block_size = 256; },
       "header: block size 256 is smaller than 512"},
      {"block size 512 MiB", [](Header& h) { h.block_size = 512u << 20; },
       "header: block size 536870912 is larger than 268435456 (256 MiB)"},
      {"block extra not a power of two", [](Header& h) { h.block_extra = 3; },
       "header: block extra size 3 is neither 0 nor a power of two"},
      {"block extra huge", [](Header& h) { h.block_extra = 1u << 31; },
       "header: block extra size 2147483648 is larger than 268435456 (256 MiB)"},
      {"disk larger than the blocks", [](Header& h) { h.disk_size = 5 * MiB + 512; },
       "header: block count 5 does not match the disk size 5243392 (6 blocks of 1048576 bytes)"},
      {"block count far too big", [](Header& h) { h.blocks = 0x7FFFFFFF; },
       "header: block count 2147483647 does not match the disk size 5242880 (5 blocks of "
       "1048576 bytes)"},
      {"disk size that overflows", [](Header& h) { h.disk_size = UINT64_MAX; },
       "header: disk size 18446744073709551615 needs 17592186044416 blocks of 1048576 bytes, "
       "more than the limit of 536870784"},
      {"more allocated than blocks", [](Header& h) { h.blocks_allocated = 6; },
       "header: allocated block count 6 is larger than the block count 5"},
      {"data inside the block map", [](Header& h) { h.data_offset = 0x200; },
       "header: data offset 0x200 lies inside the block map (0x200 to 0x214)"},
      {"block map after the data", [](Header& h) { h.blocks_offset = 0x1000; },
       "header: data offset 0x400 lies inside the block map (0x1000 to 0x1014)"},
      {"block map past the end of the file",
       [](Header& h) {
         h.blocks_offset = 0x1000;
         h.data_offset = 0x1200;
       },
       "header: the block map (0x1000 to 0x1014) extends past the end of the file (0x400 bytes; "
       "truncated?)"},
      {"data offset past the end of the file", [](Header& h) { h.data_offset = 0x600; },
       "header: data offset 0x600 is past the end of the file (0x400 bytes)"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.what);
    Header h = good();
    REQUIRE(check_header(h, c.file_size).ok());
    c.damage(h);
    const auto r = check_header(h, c.file_size);
    REQUIRE_FALSE(r.ok());
    CHECK(r.problem().message == c.message);
    CHECK(r.problem().code == c.code);
  }
}

TEST_CASE("vdi layout: odd disk sizes round down, other valid variants pass") {
  Header h = good(5 * MiB - 100);
  auto r = check_header(h, map_end(h));
  REQUIRE(r.ok());
  CHECK(r.value().disk_size == 5 * MiB - 512);
  CHECK(r.value().disk_size_rounded);
  CHECK(r.value().block_bytes(4) == MiB - 512);

  // VirtualBox's 1 MiB alignment, its 0x190 header, block extra bytes, small blocks.
  h = good(3 * MiB);
  h.header_size = header_size_v1plus;
  h.blocks_offset = MiB;
  h.data_offset = 2 * MiB;
  h.block_extra = 512;
  CHECK(check_header(h, 2 * MiB).ok());
  h = new_header(MiB, ImageType::fixed, uuid(1), uuid(2), 512);
  r = check_header(h, h.data_offset + 2048 * 512);
  REQUIRE(r.ok());
  CHECK(r.value().blocks == 2048);
  // Differencing and undo images are well formed; serving them is another matter.
  h = good();
  h.image_type = 4;
  h.uuid_linkage = uuid(3);
  CHECK(check_header(h, 0x400).ok());
  h.image_type = 3;
  h.uuid_linkage = Uuid{};
  CHECK(check_header(h, 0x400).ok());
}

TEST_CASE("vdi layout: block map entries are checked one by one") {
  Header h = good();  // 5 blocks of 1 MiB, data at 0x400
  h.blocks_allocated = 3;
  const Layout l = check_header(h, 0x400 + 3 * MiB).value();
  const uint64_t file = 0x400 + 3 * MiB;
  std::vector<uint32_t> map{2, entry_free, 0, entry_zero, 1};
  auto use = check_block_map(l, map, file);
  REQUIRE(use.ok());
  CHECK(use.value().used == 3);
  CHECK(use.value().end == 3);
  use = check_block_map(l, std::vector<uint32_t>{2, entry_free, entry_free, entry_zero, 0}, file);
  REQUIRE(use.ok());
  CHECK(use.value().used == 2);  // block 1 leaked
  CHECK(use.value().end == 3);
  CHECK(check_block_map(l, std::vector<uint32_t>(5, entry_free), 0x400).value().end == 0);
  // An entry at or above the count, inside the file: the count did not reach the disk.
  use = check_block_map(l, std::vector<uint32_t>{2, entry_free, 0, entry_zero, 3}, file + MiB);
  REQUIRE(use.ok());
  CHECK(use.value().end == 4);

  auto message = [&](std::vector<uint32_t> entries, uint64_t size) {
    const auto p = check_block_map(l, entries, size);
    REQUIRE_FALSE(p.ok());
    CHECK(p.problem().code == std::errc::invalid_argument);
    return p.problem().message;
  };
  CHECK(message({2, entry_free, 0, entry_zero, 3}, file) ==
        "block map entry 4 points past the end of the file (block 3 ends at 0x400400, the file "
        "is 0x300400 bytes)");
  CHECK(message({1000, entry_free, 0, entry_zero, 1}, file) ==
        "block map entry 0 points at block 1000, beyond the 5 blocks of the image");
  CHECK(message({entry_free, entry_free, 0, entry_zero, 5}, file) ==
        "block map entry 4 points at block 5, beyond the 5 blocks of the image");
  CHECK(message({2, entry_free, 0, entry_zero, 1}, file - 1) ==
        "block map entry 0 points past the end of the file (block 2 ends at 0x300400, the file "
        "is 0x3003ff bytes)");
  CHECK(message({2, entry_free, 2, entry_zero, 1}, file) ==
        "block map entries 0 and 2 point at the same block (2)");
  CHECK(message({0, 1, 2, 0, 1}, file) == "block map entries 0 and 3 point at the same block (0)");

  // Only the bytes of a block inside the disk must be in the file.
  h = good(4 * MiB + 4096);
  h.blocks_allocated = 1;
  const Layout last = check_header(h, 0x400 + 4096).value();
  CHECK(check_block_map(last,
                        std::vector<uint32_t>{entry_free, entry_free, entry_free, entry_free, 0},
                        0x400 + 4096)
            .ok());
  CHECK(!check_block_map(last,
                         std::vector<uint32_t>{entry_free, entry_free, entry_free, entry_free, 0},
                         0x400 + 4095)
             .ok());
}

TEST_CASE("vdi layout: block map entries are little-endian") {
  const std::vector<uint32_t> entries{0, 1, 0x01020304, entry_zero, entry_free};
  const auto bytes = encode_block_map(entries);
  CHECK(bytes == hex("00000000 01000000 04030201 feffffff ffffffff"));
  CHECK(decode_block_map(bytes) == entries);
  const auto one = encode_entry(0x01020304);
  CHECK(std::vector<std::byte>(one.begin(), one.end()) == hex("04030201"));
  CHECK(is_allocated(0));
  CHECK(is_allocated(0xFFFFFFFD));
  CHECK(!is_allocated(entry_zero));
  CHECK(!is_allocated(entry_free));
}
