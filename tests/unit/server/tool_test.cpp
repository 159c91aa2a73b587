// The pure parts of the image tools: JSON strings, human sizes, the geometry and layout of
// images `create` writes (decoded back with the formats' own codecs), qemu 7.2's VHD size
// rule, UTF-16BE parent names and the --json shape of `info`.
#include <doctest/doctest.h>

#include <cstring>

#include "formats/vdi_layout.hpp"
#include "formats/vhd_layout.hpp"
#include "server/tool_common.hpp"
#include "server/tool_create.hpp"
#include "server/tool_info.hpp"

namespace vhd = imagenbd::formats::vhd;
namespace vdi = imagenbd::formats::vdi;
using imagenbd::formats::Format;
using imagenbd::formats::Uuid;
using namespace imagenbd::server;

namespace {

constexpr uint64_t mib = 1 << 20;

CreateIds test_ids() {
  CreateIds ids;
  ids.uuid = Uuid::random_v4({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16});
  ids.modify_uuid = Uuid::random_v4({16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1});
  ids.vhd_timestamp = 12345;
  return ids;
}

CreateRequest req(Format format, uint64_t size, std::string subformat, uint64_t block_size) {
  CreateRequest r;
  r.format = format;
  r.size = size;
  r.subformat = std::move(subformat);
  r.block_size = static_cast<uint32_t>(block_size);
  return r;
}

// The file a plan describes, in memory.
std::vector<std::byte> materialise(const CreatePlan& plan) {
  std::vector<std::byte> file(plan.file_size);
  for (const auto& [offset, bytes] : plan.writes) {
    REQUIRE(offset + bytes.size() <= file.size());
    std::memcpy(file.data() + offset, bytes.data(), bytes.size());
  }
  return file;
}

}  // namespace

TEST_CASE("json_string escapes quotes, backslashes and control characters") {
  CHECK(json_string("plain") == "\"plain\"");
  CHECK(json_string("a\"b\\c") == "\"a\\\"b\\\\c\"");
  CHECK(json_string("l1\nl2\t") == "\"l1\\nl2\\t\"");
  CHECK(json_string(std::string_view("wa\0\0", 4)) == "\"wa\\u0000\\u0000\"");
  CHECK(json_string("\x01\xc3\xa9") == "\"\\u0001\xc3\xa9\"");
}

TEST_CASE("human_size prints like qemu-img") {
  CHECK(human_size(0) == "0 B");
  CHECK(human_size(512) == "512 B");
  CHECK(human_size(4096) == "4 KiB");
  CHECK(human_size(2560) == "2.5 KiB");
  CHECK(human_size(24 * mib) == "24 MiB");
  CHECK(human_size(1536 * mib) == "1.5 GiB");
  CHECK(human_size(136365219840) == "127 GiB");
  CHECK(human_size(uint64_t{1} << 40) == "1 TiB");
}

TEST_CASE("vhd::geometry_to_record: own geometry when CHS-exact, else the maximum") {
  CHECK(vhd::geometry_to_record(20959232) == vhd::Geometry{602, 4, 17});
  CHECK(vhd::geometry_to_record(20 * mib) == vhd::max_geometry);
  CHECK(vhd::geometry_to_record(10514432) == vhd::Geometry{302, 4, 17});
  CHECK(vhd::geometry_to_record(5 * mib + 1536) == vhd::max_geometry);
  CHECK(vhd::geometry_to_record(2040 * 1024 * mib) == vhd::max_geometry);
  for (uint64_t size :
       {uint64_t{512}, 1 * mib, uint64_t{20959232}, uint64_t{1073995776}, 333 * mib}) {
    const auto g = vhd::geometry_to_record(size);
    CHECK((g == vhd::max_geometry || vhd::geometry_bytes(g) == size));
  }
}

TEST_CASE("plan_image: fixed VHD is the data then a footer every reader agrees on") {
  const auto plan = plan_image(req(Format::vhd, 20 * mib, "fixed", 0), test_ids());
  CHECK(plan.subformat == "fixed");
  CHECK(plan.file_size == 20 * mib + 512);
  const auto file = materialise(plan);
  const auto footer = vhd::parse_footer(std::span(file).last(512));
  REQUIRE(footer.ok());
  const auto& f = footer.value();
  CHECK(f.disk_type == static_cast<uint32_t>(vhd::DiskType::fixed));
  CHECK(f.current_size == 20 * mib);
  CHECK(f.original_size == 20 * mib);
  CHECK(f.creator_app == vhd_creator_app);
  CHECK(f.timestamp == 12345);
  CHECK(f.unique_id == test_ids().uuid);
  CHECK_FALSE(vhd::check_footer(f, 20 * mib).has_value());
  CHECK(vhd::virtual_size(f, vhd::SizePolicy::automatic).value() == 20 * mib);
  CHECK(vhd::virtual_size(f, vhd::SizePolicy::chs).value() == 20 * mib);
  CHECK(qemu72_virtual_size(f) == 20 * mib);
}

TEST_CASE("plan_image: dynamic VHD passes the codec's own checks, BAT all unused") {
  const uint64_t size = 5 * mib + 1536;
  const auto plan = plan_image(req(Format::vhd, size, "", 0), test_ids());
  CHECK(plan.subformat == "dynamic");
  CHECK(plan.block_size == vhd::default_block_size);
  const auto file = materialise(plan);
  const auto footer = vhd::parse_footer(std::span(file).last(512));
  REQUIRE(footer.ok());
  CHECK(std::memcmp(file.data(), file.data() + file.size() - 512, 512) == 0);  // the copy
  const uint64_t data_limit = file.size() - 512;
  REQUIRE_FALSE(vhd::check_footer(footer.value(), data_limit).has_value());
  const auto header =
      vhd::parse_dynamic_header(std::span(file).subspan(footer.value().data_offset, 1024));
  REQUIRE(header.ok());
  const auto layout = vhd::check_dynamic_header(header.value(), footer.value(), data_limit);
  REQUIRE(layout.ok());
  CHECK(layout.value().bat_entries == 3);
  const auto bat = vhd::decode_bat(
      std::span(file).subspan(layout.value().bat_offset, layout.value().bat_bytes), 3);
  for (uint32_t entry : bat) CHECK(entry == vhd::bat_unused);
  CHECK_FALSE(vhd::check_bat(bat, layout.value()).has_value());
  CHECK(qemu72_virtual_size(footer.value()) == size);

  const auto small = plan_image(req(Format::vhd, mib, "", 4096), {});
  CHECK(small.block_size == 4096);
}

TEST_CASE("plan_image: VDI static and dynamic pass check_header and check_block_map") {
  for (const char* sub : {"static", "dynamic"}) {
    CAPTURE(sub);
    const auto plan = plan_image(req(Format::vdi, 10 * mib, sub, 0), test_ids());
    const auto file = materialise(plan);
    const auto header = vdi::decode_header(file);
    CHECK(header.uuid_create == test_ids().uuid);
    CHECK(header.uuid_modify == test_ids().modify_uuid);
    const auto layout = vdi::check_header(header, file.size());
    REQUIRE(layout.ok());
    CHECK(layout.value().disk_size == 10 * mib);
    const auto map = vdi::decode_block_map(std::span(file).subspan(0x200, 40));
    const auto use = vdi::check_block_map(layout.value(), map, file.size());
    REQUIRE(use.ok());
    const bool is_static = std::string_view(sub) == "static";
    CHECK(use.value().used == (is_static ? 10u : 0u));
    CHECK(plan.file_size == 0x400 + (is_static ? 10 * mib : 0));
    CHECK(plan.warnings.empty());
  }
  const auto odd = plan_image(req(Format::vdi, mib, "", 2 * mib), {});
  CHECK(odd.warnings.size() == 1);
}

TEST_CASE("plan_image refuses what the formats cannot hold") {
  const CreateIds ids = test_ids();
  CHECK_THROWS_WITH(plan_image(req(Format::vhd, 1000, "", 0), ids),
                    "vhd size 1000 is not a positive multiple of 512");
  CHECK_THROWS_WITH(plan_image(req(Format::vdi, 0, "", 0), ids),
                    "vdi size 0 is not a positive multiple of 512");
  CHECK_THROWS_AS(plan_image(req(Format::vhd, vhd::max_dynamic_size + 512, "", 0), ids),
                  std::invalid_argument);
  CHECK_THROWS_WITH(plan_image(req(Format::vhd, mib, "static", 0), ids),
                    "vhd subformat 'static' is not fixed or dynamic");
  CHECK_THROWS_WITH(plan_image(req(Format::vdi, mib, "fixed", 0), ids),
                    "vdi subformat 'fixed' is not static or dynamic");
  CHECK_THROWS_AS(plan_image(req(Format::vhd, mib, "", 3000), ids), std::invalid_argument);
  CHECK_THROWS_AS(plan_image(req(Format::vhd, mib, "fixed", 4096), ids), std::invalid_argument);
  CHECK_THROWS_AS(plan_image(req(Format::raw, mib, "fixed", 0), ids), std::invalid_argument);
  CHECK_THROWS_AS(plan_image(req(Format::automatic, mib, "", 0), ids), std::invalid_argument);
  CHECK(plan_image(req(Format::raw, 1000, "", 0), ids).file_size == 1000);
}

TEST_CASE("qemu72_virtual_size follows qemu 7.2's creator table (formats.md §1.10)") {
  vhd::Footer f;
  f.current_size = 20 * mib;
  f.geometry = {602, 4, 17};
  f.creator_app = {'w', 'i', 'n', ' '};
  CHECK(qemu72_virtual_size(f) == 20 * mib);
  f.creator_app = {'t', 'a', 'p', '\0'};
  CHECK(qemu72_virtual_size(f) == 20 * mib);
  f.creator_app = {'t', 'a', 'p', ' '};
  CHECK(qemu72_virtual_size(f) == 20959232);
  f.creator_app = {'w', 'a', '\0', '\0'};
  CHECK(qemu72_virtual_size(f) == 20959232);
  f.creator_app = vhd_creator_app;
  CHECK(qemu72_virtual_size(f) == 20959232);
  f.geometry = vhd::max_geometry;
  CHECK(qemu72_virtual_size(f) == 20 * mib);
}

TEST_CASE("utf16be_to_utf8 decodes parent names, surrogates and all") {
  auto bytes = [](std::initializer_list<int> v) {
    std::vector<std::byte> out;
    for (int b : v) out.push_back(static_cast<std::byte>(b));
    return out;
  };
  CHECK(utf16be_to_utf8(bytes({0, 'a', 0, 'b', 0, 0, 0, 'x'})) == "ab");
  CHECK(utf16be_to_utf8(bytes({0, 0xe9})) == "\xc3\xa9");
  CHECK(utf16be_to_utf8(bytes({0x20, 0xac})) == "\xe2\x82\xac");
  CHECK(utf16be_to_utf8(bytes({0xd8, 0x3d, 0xde, 0x00})) == "\xf0\x9f\x98\x80");
  CHECK(utf16be_to_utf8(bytes({0xd8, 0x3d, 0, 'a'})) ==
        "\xef\xbf\xbd"
        "a");
  CHECK(utf16be_to_utf8(bytes({0, 'a', 0})) == "a");  // odd length
}

TEST_CASE("info_json: stable keys, nested format objects") {
  ImageInfo info;
  info.filename = "d\"x.vhd";
  info.format = "vhd";
  info.virtual_size = 1024;
  info.vhd = VhdInfo{};
  info.vhd->subformat = "fixed";
  const std::string json = info_json(info);
  CHECK(json.starts_with("{\n  \"filename\": \"d\\\"x.vhd\",\n  \"format\": \"vhd\",\n"));
  CHECK(json.find("\"virtual_size\": 1024,") != std::string::npos);
  CHECK(json.find("\"geometry\": {\"cylinders\": 0, \"heads\": 0, \"sectors\": 0}") !=
        std::string::npos);
  CHECK(json.find("\"footer_copy_used\": false\n  }\n}\n") != std::string::npos);
  CHECK(json.find("block_size") == std::string::npos);  // fixed disks have none
  CHECK(json.find("not_served") == std::string::npos);
  const std::string text = info_text(info);
  CHECK(text.find("virtual size: 1 KiB (1024 bytes)\n") != std::string::npos);
}
