// A corpus of damaged VHDs (formats.md §6, "Common to all formats" and "VHD"), built in
// memory by byte-patching one valid dynamic and one valid fixed image the way a broken
// tool, a truncated copy or an attacker would: each case must be refused by open_vhd with
// backends::Error, its errc, and a message that names the file, the structure and the
// field ("vhd: disk.vhd: dynamic header: block_size 3000 ..."). The child is wrapped in a
// device that turns any access outside the file into a test failure, so a check that comes
// too late shows even where the memory leaf's own asserts are compiled out; the ASan run of
// the unit tests covers the rest. Every case gets a different message.
// Differencing disks (parent locators, chains) are left to their own tests.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/vhd.hpp"
#include "formats/vhd_layout.hpp"
#include "tests/unit/support/bounds_checked_device.hpp"
#include "tests/unit/support/refusal.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::BoundsChecked;
using imagenbd::test::run;
namespace vhd = imagenbd::formats::vhd;
namespace asio = boost::asio;

namespace {

using Bytes = std::vector<std::byte>;
constexpr uint64_t MiB = 1 << 20;

// Field offsets, from the spec (formats.md §1.2, §1.5), not from the codec under test.
constexpr uint64_t f_features = 0x08, f_version = 0x0C, f_data_offset = 0x10, f_current_size = 0x30,
                   f_geometry = 0x38, f_disk_type = 0x3C, f_checksum = 0x40, f_saved_state = 0x54;
constexpr uint64_t h_cookie = 0x00, h_table_offset = 0x10, h_version = 0x18,
                   h_max_table_entries = 0x1C, h_block_size = 0x20, h_checksum = 0x24;

// The valid dynamic image: 8 MiB of 2 MiB blocks (4 BAT entries), blocks 0 and 2 present.
//   0x000 footer copy | 0x200 dynamic header | 0x600 BAT (one sector) |
//   0x800 block 0 (sector 4) | 0x200a00 block 2 (sector 0x1005) | 0x400c00 footer
constexpr uint64_t header_at = 0x200, bat_at = 0x600;
constexpr uint64_t block_span = 512 + 2 * MiB;
constexpr uint64_t block0_at = 0x800, block2_at = block0_at + block_span;
constexpr uint64_t end_footer_at = block2_at + block_span;  // 0x400c00

void put_be(Bytes& b, uint64_t at, uint64_t value, int width) {
  for (int i = 0; i < width; ++i) {
    b.at(at + i) = static_cast<std::byte>(value >> (8 * (width - 1 - i)));
  }
}
void put32(Bytes& b, uint64_t at, uint32_t v) {
  put_be(b, at, v, 4);
}
void put64(Bytes& b, uint64_t at, uint64_t v) {
  put_be(b, at, v, 8);
}

// Recomputes the checksum of the structure of `size` bytes at `at` (formats.md §1.3), so
// that a patched field is what gets checked, not the checksum.
void reseal(Bytes& b, uint64_t at, uint64_t size, uint64_t field) {
  put32(b, at + field, 0);
  uint32_t sum = 0;
  for (uint64_t i = 0; i < size; ++i) sum += std::to_integer<uint32_t>(b.at(at + i));
  put32(b, at + field, ~sum);
}

Bytes dynamic_image() {
  vhd::Footer f;
  f.data_offset = header_at;
  f.current_size = f.original_size = 8 * MiB;
  f.geometry = vhd::max_geometry;
  f.disk_type = static_cast<uint32_t>(vhd::DiskType::dynamic);
  f.unique_id = Uuid{{0x5a, 0x4a, 0x32}};
  vhd::DynamicHeader h;
  h.table_offset = bat_at;
  h.max_table_entries = 4;
  h.block_size = 2 * MiB;
  const std::vector<uint32_t> bat{block0_at / 512, vhd::bat_unused, block2_at / 512,
                                  vhd::bat_unused};

  Bytes out(end_footer_at + 512);
  const auto footer = vhd::encode_footer(f);
  const auto header = vhd::encode_dynamic_header(h);
  const Bytes bat_bytes = vhd::encode_bat(bat, 512);
  std::copy(footer.begin(), footer.end(), out.begin());
  std::copy(header.begin(), header.end(), out.begin() + header_at);
  std::copy(bat_bytes.begin(), bat_bytes.end(), out.begin() + bat_at);
  for (uint64_t block : {block0_at, block2_at}) {
    std::fill_n(out.begin() + block, 512, std::byte{0xFF});  // every sector present
    std::fill_n(out.begin() + block + 512, 2 * MiB, std::byte{0x5A});
  }
  std::copy(footer.begin(), footer.end(), out.begin() + end_footer_at);
  return out;
}

// The valid fixed image: 1 MiB of data and the footer.
Bytes fixed_image() {
  vhd::Footer f;
  f.current_size = f.original_size = MiB;
  f.geometry = vhd::max_geometry;
  Bytes out(MiB, std::byte{0x33});
  const auto footer = vhd::encode_footer(f);
  out.insert(out.end(), footer.begin(), footer.end());
  return out;
}

// Patches a footer field of a dynamic image in both copies, checksums recomputed: the
// image is consistent, only the field is wrong.
template <typename Patch>
Bytes both_footers(Patch patch) {
  Bytes b = dynamic_image();
  for (uint64_t at : {uint64_t{0}, end_footer_at}) {
    patch(b, at);
    reseal(b, at, 512, f_checksum);
  }
  return b;
}
Bytes footer32(uint64_t field, uint32_t v) {
  return both_footers([&](Bytes& b, uint64_t at) { put32(b, at + field, v); });
}
Bytes footer64(uint64_t field, uint64_t v) {
  return both_footers([&](Bytes& b, uint64_t at) { put64(b, at + field, v); });
}
// Patches a dynamic header field, checksum recomputed.
template <typename Patch>
Bytes header(Patch patch) {
  Bytes b = dynamic_image();
  patch(b);
  reseal(b, header_at, 1024, h_checksum);
  return b;
}
Bytes header32(uint64_t field, uint32_t v) {
  return header([&](Bytes& b) { put32(b, header_at + field, v); });
}
Bytes header64(uint64_t field, uint64_t v) {
  return header([&](Bytes& b) { put64(b, header_at + field, v); });
}
Bytes bat_entry(uint32_t index, uint32_t v) {
  Bytes b = dynamic_image();
  put32(b, bat_at + 4 * index, v);
  return b;
}
// Patches the fixed image's footer, checksum recomputed.
template <typename Patch>
Bytes fixed(Patch patch) {
  Bytes b = fixed_image();
  patch(b, MiB);
  reseal(b, MiB, 512, f_checksum);
  return b;
}

std::shared_ptr<BoundsChecked> device(const Bytes& bytes) {
  auto m = open_memory(bytes.size(), "disk.vhd");
  if (!bytes.empty()) run(m->write(0, bytes, {}));
  return std::make_shared<BoundsChecked>(m);
}

// Messages of every refusal so far: each case must have its own.
std::set<std::string>& seen() {
  static std::set<std::string> messages;
  return messages;
}

// Opens `bytes` and checks the refusal: backends::Error with `code` and a message that is
// "vhd: disk.vhd: " followed by text containing `fragment`.
void refused(const char* what, const Bytes& bytes, std::errc code, std::string_view fragment,
             VhdOptions options = {}) {
  imagenbd::test::check_refused(what, device(bytes), code, fragment, "vhd: disk.vhd: ",
                                std::max<uint64_t>(bytes.size(), 1024), seen(),
                                [&](DevicePtr c) { run(open_vhd(std::move(c), options)); });
}

void invalid(const char* what, const Bytes& bytes, std::string_view fragment,
             VhdOptions options = {}) {
  refused(what, bytes, std::errc::invalid_argument, fragment, options);
}

}  // namespace

TEST_CASE("vhd damaged: the valid images of the corpus open") {
  auto d = run(open_vhd(device(dynamic_image()), {}));
  CHECK(d->size() == 8 * MiB);
  CHECK(d->caps().writable);
  Bytes got(4096);
  run(d->read(4 * MiB + 100, got));
  CHECK(got == Bytes(4096, std::byte{0x5A}));
  run(d->read(2 * MiB, got));
  CHECK(got == Bytes(4096, std::byte{0}));
  auto f = run(open_vhd(device(fixed_image()), {}));
  CHECK(f->size() == MiB);
}

TEST_CASE("vhd damaged: short files and offsets beyond the end (formats.md §6, common)") {
  const Bytes good = dynamic_image();
  invalid("empty file", Bytes{}, "the file is 0 bytes, shorter than a 512-byte footer");
  invalid("511 bytes", Bytes(good.begin(), good.begin() + 511),
          "the file is 511 bytes, shorter than a 512-byte footer");
  // Footer copy and dynamic header only: the copy at 0 is taken, the BAT is missing.
  invalid("footer copy and header only", Bytes(good.begin(), good.begin() + 0x600),
          "dynamic header: table_offset 0x600 with 4 entries (0x200 bytes): the BAT runs past "
          "the end of the file (data ends at 0x600)");
  // Cut in the middle of block 2, end footer gone.
  invalid("cut inside a block", Bytes(good.begin(), good.begin() + 3 * MiB),
          "BAT entry 2 points past the end of the file (block 0x200a00 to 0x400c00, data ends "
          "at 0x300000)");
  invalid("current_size 0", footer64(f_current_size, 0), "footer: current_size is 0");
  invalid("current_size not a multiple of 512", footer64(f_current_size, 8 * MiB + 100),
          "footer: current_size 8388708 is not a multiple of 512");
  invalid("data_offset near 2^64", footer64(f_data_offset, 0xFFFFFFFFFFFFFE00),
          "footer: data_offset 0xfffffffffffffe00 (the dynamic header) is past the end of the "
          "file (data ends at 0x400c00)");
  invalid("table_offset near 2^64", header64(h_table_offset, 0xFFFFFFFFFFFFFE00),
          "dynamic header: table_offset 0xfffffffffffffe00 with 4 entries (0x200 bytes): the "
          "BAT runs past the end of the file");
  invalid("BAT entry at the last sector number", bat_entry(1, 0xFFFFFFFE),
          "BAT entry 1 points past the end of the file (block 0x1fffffffc00 to");
}

TEST_CASE("vhd damaged: footers (formats.md §6, VHD)") {
  SUBCASE("cookies") {
    Bytes b = dynamic_image();
    b[0] = b[end_footer_at] = std::byte{'C'};
    invalid("bad cookie at both ends", b,
            "not a VHD: no \"conectix\" footer at the end of the file or at offset 0");
    Bytes moved = fixed_image();
    std::copy(moved.end() - 512, moved.end(), moved.begin());
    std::fill(moved.end() - 512, moved.end(), std::byte{0});
    invalid("a fixed disk's footer only at offset 0", moved,
            "footer: cookie \"\\0\\0\\0\\0\\0\\0\\0\\0\" is not \"conectix\"; the footer at "
            "offset 0 is a fixed disk's, which keeps no copy there");
    Bytes end_cookie = dynamic_image();
    end_cookie[end_footer_at + 7] = std::byte{'X'};
    end_cookie[0x30] ^= std::byte{1};
    invalid("end footer cookie, copy checksum", end_cookie,
            "footer: cookie \"conectiX\" is not \"conectix\"; footer copy at offset 0: footer: "
            "checksum mismatch (stored 0x");
  }
  SUBCASE("checksums") {
    Bytes b = fixed_image();
    b[MiB + f_disk_type + 3] = std::byte{3};
    invalid("fixed footer checksum", b, "footer: checksum mismatch (stored 0x");
    Bytes both = dynamic_image();
    both[f_current_size + 5] ^= std::byte{1};
    both[end_footer_at + f_current_size + 5] ^= std::byte{2};
    invalid("both footers of a dynamic disk", both,
            "footer: checksum mismatch (stored 0xfffff4bc, computed 0xfffff4ba); footer copy at "
            "offset 0: footer: checksum mismatch (stored 0xfffff4bc, computed 0xfffff4bb)");
  }
  SUBCASE("fields") {
    for (uint32_t type : {0u, 1u, 5u, 6u, 7u, 0xFFFFFFFFu}) {
      const std::string fragment =
          fmt::format("footer: disk_type {} is not 2 (fixed), 3 (dynamic) or 4", type);
      invalid("unknown disk type", footer32(f_disk_type, type), fragment);
    }
    invalid("file format version", footer32(f_version, 0x00010001),
            "footer: file_format_version 0x00010001 is not supported (only 0x00010000)");
    invalid("data_offset past the end", footer64(f_data_offset, 0x10000000),
            "footer: data_offset 0x10000000 (the dynamic header) is past the end of the file");
    invalid("data_offset where the header would overlap the end footer",
            footer64(f_data_offset, end_footer_at - 512),
            "footer: data_offset 0x400a00 (the dynamic header) is past the end of the file");
    invalid("data_offset unaligned", footer64(f_data_offset, 0x201),
            "footer: data_offset 0x201 (the dynamic header) is not a multiple of 512");
    invalid("data_offset 0", footer64(f_data_offset, 0),
            "footer: data_offset 0x0 (the dynamic header) overlaps the footer copy at 0");
    invalid("data_offset at the BAT", footer64(f_data_offset, bat_at),
            "dynamic header: cookie \"\\0\\0\\0\\x04\\xff\\xff\\xff\\xff\" is not \"cxsparse\"");
  }
  SUBCASE("sizes") {
    refused("dynamic current_size just above 2040 GiB",
            footer64(f_current_size, vhd::max_dynamic_size + 512), std::errc::file_too_large,
            "footer: current_size 2190433321472 is larger than 2190433320960 (2040 GiB), the "
            "limit of dynamic disks");
    refused("dynamic current_size near 2^64", footer64(f_current_size, 0xFFFFFFFFFFFFFE00),
            std::errc::file_too_large, "footer: current_size 18446744073709551104 is larger");
    invalid("fixed current_size beyond the file",
            fixed([](Bytes& b, uint64_t at) { put64(b, at + f_current_size, 2 * MiB); }),
            "footer: current_size 2097152 does not fit in the file (the data of a fixed disk "
            "must end by the footer at 0x100000; truncated?)");
    invalid("fixed current_size near 2^64",
            fixed([](Bytes& b, uint64_t at) { put64(b, at + f_current_size, 0xFFFFFFFFFFFFFE00); }),
            "footer: current_size 18446744073709551104 does not fit in the file");
    // CHS inconsistent with current_size: only an explicit --size-policy chs refuses.
    auto chs = [](uint16_t c, uint8_t h, uint8_t s) {
      return fixed([&](Bytes& b, uint64_t at) {
        put_be(b, at + f_geometry, c, 2);
        b[at + f_geometry + 2] = std::byte{h};
        b[at + f_geometry + 3] = std::byte{s};
      });
    };
    invalid("CHS 0/0/0 with the chs policy", chs(0, 0, 0),
            "footer: geometry 0/0/0 gives a CHS size of 0", {.size = vhd::SizePolicy::chs});
    invalid("CHS beyond current_size with the chs policy", chs(1000, 16, 63),
            "footer: geometry 1000/16/63 gives a CHS size of 516096000, larger than "
            "current_size 1048576",
            {.size = vhd::SizePolicy::chs});
  }
}

TEST_CASE("vhd damaged: dynamic headers (formats.md §6, VHD)") {
  Bytes sum = dynamic_image();
  sum[header_at + 0x300] = std::byte{1};  // a reserved byte
  invalid("header checksum", sum, "dynamic header: checksum mismatch (stored 0x");
  invalid("header cookie", header([](Bytes& b) { b[header_at + h_cookie + 7] = std::byte{'X'}; }),
          "dynamic header: cookie \"cxsparsX\" is not \"cxsparse\"");
  invalid("header version", header32(h_version, 0x00020000),
          "dynamic header: header_version 0x00020000 is not supported (only 0x00010000)");

  invalid("block size not a power of two", header32(h_block_size, 3000),
          "dynamic header: block_size 3000 is not a power of two");
  invalid("block size below 512", header32(h_block_size, 256),
          "dynamic header: block_size 256 is smaller than 512");
  invalid("block size 0", header32(h_block_size, 0),
          "dynamic header: block_size 0 is smaller than 512");
  invalid("block size 512 MiB", header32(h_block_size, 512 * MiB),
          "dynamic header: block_size 536870912 is larger than 268435456 (256 MiB)");
  invalid("block size 2^31", header32(h_block_size, 0x80000000),
          "dynamic header: block_size 2147483648 is larger than 268435456 (256 MiB)");
  // 256 MiB blocks are allowed, but bitmap (64 KiB) + block run far past the file.
  invalid("block size 256 MiB: bitmap + block past the end", header32(h_block_size, 256 * MiB),
          "BAT entry 0 points past the end of the file (block 0x800 to 0x10010800");

  invalid("max_table_entries too small", header32(h_max_table_entries, 3),
          "dynamic header: max_table_entries 3 is too small for current_size 8388608 (needs 4 "
          "blocks of 2097152 bytes)");
  invalid("max_table_entries 0", header32(h_max_table_entries, 0),
          "dynamic header: max_table_entries 0 is too small");
  invalid("max_table_entries 2^32 - 1", header32(h_max_table_entries, 0xFFFFFFFF),
          "dynamic header: max_table_entries 4294967295 is larger than the limit of 67108864");
  invalid("max_table_entries at the limit, BAT beyond the file",
          header32(h_max_table_entries, vhd::max_bat_entries),
          "dynamic header: table_offset 0x600 with 67108864 entries (0x10000000 bytes): the BAT "
          "runs past the end of the file");
  // 129 entries take two sectors: the BAT then covers block 0's bitmap.
  invalid("BAT overlapping a block", header32(h_max_table_entries, 129),
          "BAT entry 0 points into the BAT at 0x600 (block 0x800 to 0x200a00)");

  invalid("table_offset unaligned", header64(h_table_offset, bat_at + 1),
          "dynamic header: table_offset 0x601 (the BAT) is not a multiple of 512");
  invalid("table_offset inside the header", header64(h_table_offset, 0x400),
          "dynamic header: table_offset 0x400: the BAT (0x200 bytes) overlaps the dynamic "
          "header at 0x200");
  invalid("table_offset 0", header64(h_table_offset, 0),
          "dynamic header: table_offset 0x0: the BAT (0x200 bytes) overlaps the footer copy at 0");
  invalid("table_offset past the end", header64(h_table_offset, 0x10000000),
          "dynamic header: table_offset 0x10000000 with 4 entries (0x200 bytes): the BAT runs "
          "past the end of the file (data ends at 0x400c00)");
  invalid("table_offset at the end footer", header64(h_table_offset, end_footer_at),
          "dynamic header: table_offset 0x400c00 with 4 entries (0x200 bytes): the BAT runs "
          "past the end of the file (data ends at 0x400c00)");
}

TEST_CASE("vhd damaged: BAT entries (formats.md §6, VHD)") {
  invalid("entry 0: the footer copy", bat_entry(1, 0),
          "BAT entry 1 points into the footer copy at 0x0 (block 0x0 to 0x200200)");
  invalid("entry 1: the dynamic header", bat_entry(1, 1),
          "BAT entry 1 points into the dynamic header at 0x200 (block 0x200 to 0x200400)");
  invalid("entry 3: the BAT", bat_entry(3, 3),
          "BAT entry 3 points into the BAT at 0x600 (block 0x600 to 0x200800)");
  invalid("two entries, one block", bat_entry(2, block0_at / 512),
          "BAT entries 0 and 2 point at the same block (0x800)");
  invalid("two overlapping blocks", bat_entry(2, block0_at / 512 + 1),
          "BAT entries 0 and 2 overlap (blocks at 0x800 and 0xa00, each 0x200200 bytes)");
  invalid("a block into the end footer", bat_entry(2, block2_at / 512 + 1),
          "BAT entry 2 points past the end of the file (block 0x200c00 to 0x400e00, data ends "
          "at 0x400c00)");
  invalid("an entry past the end", bat_entry(3, 0x100000),
          "BAT entry 3 points past the end of the file (block 0x20000000 to 0x20200200");
}

TEST_CASE("vhd damaged: odd but servable images are served") {
  SUBCASE("end footer zeroed: read-only from the copy at 0, same data") {
    Bytes b = dynamic_image();
    std::fill(b.end() - 512, b.end(), std::byte{0});
    auto d = run(open_vhd(device(b), {}));
    CHECK(!d->caps().writable);
    Bytes got(512);
    run(d->read(4 * MiB, got));
    CHECK(got == Bytes(512, std::byte{0x5A}));
  }
  SUBCASE("temporary and saved-state flags: served (a warning for temporary)") {
    Bytes b = both_footers([](Bytes& b, uint64_t at) {
      put32(b, at + f_features, 3);
      b[at + f_saved_state] = std::byte{1};
    });
    CHECK(run(open_vhd(device(b), {}))->caps().writable);
  }
  SUBCASE("unused BAT padding and reserved header bytes are ignored") {
    Bytes b = header([](Bytes& b) { b[header_at + 0x3FF] = std::byte{7}; });
    put32(b, bat_at + 4 * 100, 0x12345678);  // padding after the 4 entries
    CHECK(run(open_vhd(device(b), {}))->size() == 8 * MiB);
  }
}
