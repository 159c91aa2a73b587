// The VHD codec on crafted bytes: checksums against qemu-made structures, round trips, every
// malformed case of formats.md §6 (VHD) refused with its own message, CHS geometry.
#include "formats/vhd_layout.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

using namespace imagenbd::formats;
using namespace imagenbd::formats::vhd;
using namespace std::literals;

namespace {

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t GiB = uint64_t{1} << 30;

std::vector<std::byte> hex(std::string_view text) {
  std::vector<std::byte> out;
  for (std::size_t i = 0; i + 1 < text.size(); i += 2) {
    out.push_back(static_cast<std::byte>(std::stoi(std::string(text.substr(i, 2)), nullptr, 16)));
  }
  return out;
}

// The footer qemu-img 7.2 wrote for `create -f vpc 10M` (formats.md §1.2).
std::vector<std::byte> qemu_footer() {
  auto bytes =
      hex("636f6e6563746978000000020001000000000000000002003293dfc871656d75000500035769326b"
          "0000000000a070000000000000a07000012e041100000003ffffed3e5a4a32b093224ed9a4d88086"
          "12c2764100");
  bytes.resize(footer_size);
  return bytes;
}

// A dynamic disk of `size` bytes laid out as qemu does: header at 0x200, BAT at 0x600.
Footer dynamic_footer(uint64_t size) {
  Footer f;
  f.data_offset = 0x200;
  f.current_size = f.original_size = size;
  f.geometry = max_geometry;
  f.disk_type = static_cast<uint32_t>(DiskType::dynamic);
  return f;
}
DynamicHeader dynamic_header(uint64_t size, uint32_t block_size = default_block_size) {
  DynamicHeader h;
  h.table_offset = 0x600;
  h.block_size = block_size;
  h.max_table_entries = static_cast<uint32_t>((size + block_size - 1) / block_size);
  return h;
}

std::string message(const std::optional<Problem>& p) {
  REQUIRE(p.has_value());
  return p->message;
}
template <typename T>
std::string message(const Result<T>& r) {
  REQUIRE(!r.ok());
  return r.problem().message;
}

}  // namespace

TEST_CASE("vhd checksum and footer parsing on qemu's bytes") {
  const auto bytes = qemu_footer();
  CHECK(checksum(bytes, 0x40) == 0xffffed3e);
  const auto parsed = parse_footer(bytes);
  REQUIRE(parsed.ok());
  const Footer& f = parsed.value();
  CHECK(f.features == 2);
  CHECK(f.format_version == 0x00010000);
  CHECK(f.data_offset == 0x200);
  CHECK(f.timestamp == 0x3293dfc8);
  CHECK(fourcc_text(f.creator_app) == "qemu");
  CHECK(f.creator_version == 0x00050003);
  CHECK(f.creator_host_os == 0x5769326b);
  CHECK(f.original_size == 10514432);
  CHECK(f.current_size == 10514432);
  CHECK(f.geometry == Geometry{302, 4, 17});
  CHECK(f.disk_type == 3);
  CHECK(f.checksum == 0xffffed3e);
  CHECK(f.unique_id.to_string() == "5a4a32b0-9322-4ed9-a4d8-808612c27641");
  CHECK(f.saved_state == 0);
  // Re-encoding gives the same bytes, checksum included.
  const auto again = encode_footer(f);
  CHECK(std::equal(again.begin(), again.end(), bytes.begin()));
  CHECK(check_footer(f, 1 << 20) == std::nullopt);
}

TEST_CASE("vhd footer: broken bytes") {
  auto bytes = qemu_footer();
  SUBCASE("checksum") {
    bytes[0x30] = std::byte{0x01};  // current_size changes, checksum does not
    CHECK(message(parse_footer(bytes)) ==
          "footer: checksum mismatch (stored 0xffffed3e, computed 0xffffed3d)");
    // The reserved bytes count too.
    bytes = qemu_footer();
    bytes[500] = std::byte{1};
    CHECK(message(parse_footer(bytes)).starts_with("footer: checksum mismatch"));
  }
  SUBCASE("cookie") {
    std::memcpy(bytes.data(), "conectiX", 8);
    CHECK(message(parse_footer(bytes)) == "footer: cookie \"conectiX\" is not \"conectix\"");
    std::memset(bytes.data(), 0, 8);
    CHECK(message(parse_footer(bytes)) ==
          "footer: cookie \"\\0\\0\\0\\0\\0\\0\\0\\0\" is not \"conectix\"");
  }
  SUBCASE("truncated") {
    CHECK(message(parse_footer(std::span(bytes).first(511))) ==
          "footer: truncated (511 bytes, a footer takes 512)");
    CHECK(!parse_footer({}).ok());
  }
}

TEST_CASE("vhd footer: field checks (formats.md §6)") {
  Footer f = dynamic_footer(10 * MiB);
  const uint64_t limit = 64 * MiB;
  REQUIRE(check_footer(f, limit) == std::nullopt);

  SUBCASE("version") {
    f.format_version = 0x00020000;
    CHECK(message(check_footer(f, limit)) ==
          "footer: file_format_version 0x00020000 is not supported (only 0x00010000)");
  }
  SUBCASE("disk types other than 2, 3, 4") {
    for (uint32_t t : {0u, 1u, 5u, 6u, 7u}) {
      f.disk_type = t;
      CHECK(
          message(check_footer(f, limit)) ==
          fmt::format("footer: disk_type {} is not 2 (fixed), 3 (dynamic) or 4 (differencing)", t));
    }
    f.disk_type = 4;  // differencing passes the codec; the layer decides
    CHECK(check_footer(f, limit) == std::nullopt);
  }
  SUBCASE("current_size") {
    f.current_size = 0;
    CHECK(message(check_footer(f, limit)) == "footer: current_size is 0 (an empty disk)");
    f.current_size = 10 * MiB + 100;
    CHECK(message(check_footer(f, limit)) ==
          "footer: current_size 10485860 is not a multiple of 512");
    f.current_size = 3 * (GiB << 10);  // 3 TiB
    const auto p = check_footer(f, limit);
    REQUIRE(p);
    CHECK(p->code == std::errc::file_too_large);
    CHECK(p->message ==
          "footer: current_size 3298534883328 is larger than 2190433320960 (2040 GiB), the limit "
          "of dynamic disks");
  }
  SUBCASE("data_offset") {
    f.data_offset = 0x201;
    CHECK(message(check_footer(f, limit)) ==
          "footer: data_offset 0x201 (the dynamic header) is not a multiple of 512");
    f.data_offset = 0;
    CHECK(message(check_footer(f, limit)) ==
          "footer: data_offset 0x0 (the dynamic header) overlaps the footer copy at 0");
    f.data_offset = limit - 512;  // the header takes 1024
    CHECK(message(check_footer(f, limit)) ==
          "footer: data_offset 0x3fffe00 (the dynamic header) is past the end of the file (data "
          "ends at 0x4000000)");
    f.data_offset = ~uint64_t{0} - 511;
    CHECK(message(check_footer(f, limit)).find("past the end") != std::string::npos);
  }
  SUBCASE("fixed disks: the data must fit, any size is allowed") {
    f.disk_type = 2;
    f.data_offset = fixed_data_offset;
    f.current_size = limit;
    CHECK(check_footer(f, limit) == std::nullopt);
    f.current_size = limit + 512;
    CHECK(message(check_footer(f, limit)) ==
          "footer: current_size 67109376 does not fit in the file (the data of a fixed disk must "
          "end by the footer at 0x4000000; truncated?)");
    f.current_size = 4 * (GiB << 10);  // Azure-sized
    CHECK(check_footer(f, f.current_size) == std::nullopt);
  }
}

TEST_CASE("vhd dynamic header: qemu's bytes and round trip") {
  const DynamicHeader h = dynamic_header(10514432);
  const auto bytes = encode_dynamic_header(h);
  // qemu's header for 10 MiB (formats.md §1.5): checksum 0xfffff471.
  CHECK(checksum(bytes, 0x24) == 0xfffff471);
  CHECK(std::to_integer<int>(bytes[0x27]) == 0x71);
  const auto parsed = parse_dynamic_header(bytes);
  REQUIRE(parsed.ok());
  CHECK(parsed.value().table_offset == 0x600);
  CHECK(parsed.value().max_table_entries == 6);
  CHECK(parsed.value().block_size == default_block_size);
  CHECK(parsed.value().data_offset == ~uint64_t{0});

  DynamicHeader with_parent = h;
  with_parent.parent_locators[1] = ParentLocator{0x57327275, 512, 40, 0, 0x800};
  with_parent.parent_timestamp = 1234;
  with_parent.parent_unicode_name[1] = std::byte{'p'};
  const auto p2 = parse_dynamic_header(encode_dynamic_header(with_parent));
  REQUIRE(p2.ok());
  CHECK(p2.value().parent_locators == with_parent.parent_locators);
  CHECK(p2.value().parent_timestamp == 1234);
  CHECK(p2.value().parent_unicode_name == with_parent.parent_unicode_name);
}

TEST_CASE("vhd dynamic header: broken bytes and fields (formats.md §6)") {
  const Footer f = dynamic_footer(10 * MiB);
  DynamicHeader h = dynamic_header(10 * MiB);
  const uint64_t limit = 64 * MiB;
  REQUIRE(check_dynamic_header(h, f, limit).ok());

  SUBCASE("checksum and cookie") {
    auto bytes = encode_dynamic_header(h);
    bytes[0x20] = std::byte{1};
    CHECK(message(parse_dynamic_header(bytes)) ==
          "dynamic header: checksum mismatch (stored 0xfffff472, computed 0xfffff471)");
    bytes = encode_dynamic_header(h);
    bytes[0] = std::byte{'C'};
    CHECK(message(parse_dynamic_header(bytes)) ==
          "dynamic header: cookie \"Cxsparse\" is not \"cxsparse\"");
    CHECK(message(parse_dynamic_header(std::span(bytes).first(1000))) ==
          "dynamic header: truncated (1000 bytes, the header takes 1024)");
  }
  SUBCASE("version") {
    h.header_version = 0x00010001;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: header_version 0x00010001 is not supported (only 0x00010000)");
  }
  SUBCASE("block_size") {
    h.block_size = 3000;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: block_size 3000 is not a power of two");
    h.block_size = 256;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: block_size 256 is smaller than 512");
    h.block_size = 0;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: block_size 0 is smaller than 512");
    h.block_size = 512u << 20;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: block_size 536870912 is larger than 268435456 (256 MiB)");
  }
  SUBCASE("max_table_entries") {
    h.max_table_entries = 4;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: max_table_entries 4 is too small for current_size 10485760 (needs 5 "
          "blocks of 2097152 bytes)");
    h.max_table_entries = 0xFFFFFFFF;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: max_table_entries 4294967295 is larger than the limit of 67108864");
    h.max_table_entries = 1000;  // more than needed is fine (room to grow)
    CHECK(check_dynamic_header(h, f, limit).ok());
  }
  SUBCASE("table_offset") {
    h.table_offset = 0x601;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: table_offset 0x601 (the BAT) is not a multiple of 512");
    h.table_offset = limit;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: table_offset 0x4000000 with 5 entries (0x200 bytes): the BAT runs past "
          "the end of the file (data ends at 0x4000000)");
    h.table_offset = ~uint64_t{0} - 511;
    CHECK(message(check_dynamic_header(h, f, limit)).find("runs past") != std::string::npos);
    h.table_offset = 0x400;  // inside the header (0x200 to 0x600)
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: table_offset 0x400: the BAT (0x200 bytes) overlaps the dynamic header "
          "at 0x200");
    h.table_offset = 0;
    CHECK(message(check_dynamic_header(h, f, limit)) ==
          "dynamic header: table_offset 0x0: the BAT (0x200 bytes) overlaps the footer copy at "
          "0x0");
  }
  SUBCASE("the layout") {
    const auto layout = check_dynamic_header(h, f, limit);
    REQUIRE(layout.ok());
    const DynamicLayout& l = layout.value();
    CHECK(l.header_offset == 0x200);
    CHECK(l.bat_offset == 0x600);
    CHECK(l.bat_entries == 5);
    CHECK(l.bat_bytes == 512);
    CHECK(l.bitmap_bytes == 512);
    CHECK(l.block_span() == 2 * MiB + 512);
    CHECK(l.sectors_per_block() == 4096);
    CHECK(l.block_data(4) == 4 * 512 + 512);
    CHECK(l.bat_entry_offset(3) == 0x600 + 12);
    CHECK(l.metadata.size() == 3);
  }
}

TEST_CASE("vhd BAT: encoding and checks (formats.md §6)") {
  const Footer f = dynamic_footer(40 * MiB);
  const DynamicHeader h = dynamic_header(40 * MiB);  // 20 entries
  // Blocks 2 MiB + 512 each from 0x800; room for 4 before the end footer.
  const uint64_t limit = 0x800 + 4 * (2 * MiB + 512);
  const auto layout = check_dynamic_header(h, f, limit);
  REQUIRE(layout.ok());
  const DynamicLayout& l = layout.value();
  std::vector<uint32_t> bat(20, bat_unused);
  bat[0] = 4;
  bat[17] = 4 + 3 * 4097;
  REQUIRE(check_bat(bat, l) == std::nullopt);

  SUBCASE("round trip, padded with 0xFF") {
    const auto bytes = encode_bat(bat, 512);
    REQUIRE(bytes.size() == 512);
    CHECK(std::to_integer<int>(bytes[3]) == 4);
    CHECK(std::to_integer<int>(bytes[80]) == 0xFF);  // entry 20: padding
    CHECK(std::to_integer<int>(bytes[511]) == 0xFF);
    CHECK(decode_bat(bytes, 20) == bat);
    std::array<std::byte, 4> one;
    store_bat_entry(one, 0x01020304);
    CHECK(std::to_integer<int>(one[0]) == 1);
    CHECK(std::to_integer<int>(one[3]) == 4);
  }
  SUBCASE("past the end of the file") {
    bat[17] = 4 + 4 * 4097;
    CHECK(message(check_bat(bat, l)) ==
          "BAT entry 17 points past the end of the file (block 0x801000 to 0xa01200, data ends "
          "at 0x801000)");
    bat[17] = 0xFFFFFFFE;
    CHECK(message(check_bat(bat, l)).starts_with("BAT entry 17 points past the end"));
  }
  SUBCASE("not leaving room for the whole block before the end footer") {
    bat[17] = 4 + 3 * 4097 + 1;
    CHECK(message(check_bat(bat, l)).starts_with("BAT entry 17 points past the end of the file"));
  }
  SUBCASE("into metadata") {
    bat[3] = 0;
    CHECK(message(check_bat(bat, l)) ==
          "BAT entry 3 points into the footer copy at 0x0 (block 0x0 to 0x200200)");
    bat[3] = 1;
    CHECK(message(check_bat(bat, l)) ==
          "BAT entry 3 points into the dynamic header at 0x200 (block 0x200 to 0x200400)");
    bat[3] = 2;
    CHECK(message(check_bat(bat, l)).starts_with("BAT entry 3 points into the dynamic header"));
    bat[3] = 3;
    CHECK(message(check_bat(bat, l)) ==
          "BAT entry 3 points into the BAT at 0x600 (block 0x600 to 0x200800)");
  }
  SUBCASE("two entries at one block, and overlapping blocks") {
    bat[9] = 4;
    CHECK(message(check_bat(bat, l)) == "BAT entries 0 and 9 point at the same block (0x800)");
    bat[9] = 4 + 4096;  // one sector short of the next block boundary
    CHECK(message(check_bat(bat, l)) ==
          "BAT entries 0 and 9 overlap (blocks at 0x800 and 0x200800, each 0x200200 bytes)");
    bat[9] = 4 + 4097;
    CHECK(check_bat(bat, l) == std::nullopt);
  }
}

TEST_CASE("vhd geometry (formats.md §1.9): qemu's sizes are C*H*S exact") {
  struct Case {
    uint64_t size;
    Geometry chs;
  };
  for (const Case& c :
       {Case{1079296, {31, 4, 17}}, Case{10514432, {302, 4, 17}}, Case{104865792, {1004, 12, 17}},
        Case{1073995776, {2081, 16, 63}}, Case{4295467008, {8323, 16, 63}},
        Case{32212647936, {62416, 16, 63}}, Case{136365219840, {65279, 16, 255}}}) {
    CAPTURE(c.size);
    CHECK(geometry_for(c.size / 512) == c.chs);
    CHECK(geometry_bytes(c.chs) == c.size);
  }
  // Rounds down; the maximum beyond 127.5 GiB.
  CHECK(geometry_for(10 * MiB / 512) == Geometry{301, 4, 17});
  CHECK(geometry_bytes(Geometry{301, 4, 17}) < 10 * MiB);
  CHECK(geometry_for(20 * MiB / 512) == Geometry{602, 4, 17});  // formats.md §1.10
  CHECK(geometry_for(128 * GiB / 512) == max_geometry);
  CHECK(geometry_for(2040 * GiB / 512) == max_geometry);
  CHECK(geometry_for(~uint64_t{0}) == max_geometry);
  CHECK(geometry_bytes(max_geometry) == 136899993600);
  CHECK(geometry_for(0) == Geometry{0, 4, 17});
}

TEST_CASE("vhd virtual size: creator apps and the override (formats.md §1.10)") {
  Footer f;
  f.current_size = 20 * MiB;
  f.geometry = Geometry{602, 4, 17};  // 20,959,232 bytes
  auto size = [&](std::string_view creator, SizePolicy policy = SizePolicy::automatic) {
    std::memcpy(f.creator_app.data(), creator.data(), 4);
    const auto r = virtual_size(f, policy);
    REQUIRE(r.ok());
    return r.value();
  };
  CHECK(size("vpc ") == 20959232);
  CHECK(size("qemu") == 20959232);
  for (std::string_view other : {"win "sv, "qem2"sv, "d2v "sv, "d2v\0"sv, "tap\0"sv, "CTXS"sv,
                                 "wa\0\0"sv, "inbd"sv, "xxxx"sv}) {
    CAPTURE(other);
    CHECK(size(other) == 20 * MiB);
  }
  CHECK(size("qemu", SizePolicy::current_size) == 20 * MiB);
  CHECK(size("win ", SizePolicy::chs) == 20959232);
  // The maximum geometry means "see current_size", whoever wrote it.
  f.geometry = max_geometry;
  CHECK(size("vpc ") == 20 * MiB);
  CHECK(size("vpc ", SizePolicy::chs) == 20 * MiB);
  // CHS beyond current_size: automatic ignores it, an explicit chs is refused.
  f.geometry = Geometry{1000, 16, 63};
  CHECK(size("qemu") == 20 * MiB);
  std::memcpy(f.creator_app.data(), "qemu", 4);
  CHECK(message(virtual_size(f, SizePolicy::chs)) ==
        "footer: geometry 1000/16/63 gives a CHS size of 516096000, larger than current_size "
        "20971520");
  f.geometry = Geometry{};
  CHECK(size("vpc ") == 20 * MiB);
  CHECK(message(virtual_size(f, SizePolicy::chs)) ==
        "footer: geometry 0/0/0 gives a CHS size of 0");
  CHECK(size_policy_name(SizePolicy::chs) == "chs");
}

TEST_CASE("vhd bitmap helpers") {
  CHECK(bitmap_bytes_for(2 * MiB) == 512);
  CHECK(bitmap_bytes_for(512 << 10) == 512);
  CHECK(bitmap_bytes_for(512) == 512);
  CHECK(bitmap_bytes_for(4 * MiB) == 1024);
  CHECK(bitmap_bytes_for(256 * MiB) == 65536);
  std::array<std::byte, 2> bits{std::byte{0x80}, std::byte{0x01}};
  CHECK(bitmap_test(bits, 0));
  CHECK(!bitmap_test(bits, 1));
  CHECK(bitmap_test(bits, 15));
  CHECK(!bitmap_test(bits, 8));
  CHECK(bitmap_mask(3) == std::byte{0x10});
  CHECK(fourcc_text(std::array<char, 4>{'w', 'a', '\0', '\0'}) == "wa\\0\\0");
  CHECK(fourcc_text(std::array<char, 4>{'a', '"', '\x7f', 'b'}) == "a\\x22\\x7fb");
  CHECK(disk_type_name(4) == "differencing");
  CHECK(disk_type_name(7) == "unknown");
}
