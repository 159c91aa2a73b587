// check_vhd over images built with our own codecs in memory and written through open_vhd:
// clean images pass, and each kind of damage is reported with its structure and field,
// every bad BAT entry (not just the first), leaks as warnings, a damaged end footer as an
// error that does not stop the check.
#include "formats/vhd_check.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "backends/memory.hpp"
#include "formats/vhd.hpp"
#include "formats/vhd_layout.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/vhd_helpers.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::dynamic_vhd;
using imagenbd::test::run;
namespace vhd = imagenbd::formats::vhd;

namespace {

constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t bat_offset = 1536;

void write_through(DevicePtr file, uint64_t offset, std::size_t length, uint8_t value) {
  auto disk = run(open_vhd(file, {}));
  std::vector<std::byte> data(length, std::byte{value});
  run(disk->write(offset, data, {}));
  run(disk->flush());
}

uint32_t bat_entry(BlockDevice& file, uint32_t index) {
  std::vector<std::byte> b(4);
  run(file.read(bat_offset + 4 * index, b));
  return vhd::decode_bat(b, 1)[0];
}
void set_bat_entry(BlockDevice& file, uint32_t index, uint32_t value) {
  std::array<std::byte, 4> b;
  vhd::store_bat_entry(b, value);
  run(file.write(bat_offset + 4 * index, b, {}));
}

bool mentions(const std::vector<CheckIssue>& issues, const std::string& field) {
  return std::any_of(issues.begin(), issues.end(),
                     [&](const CheckIssue& i) { return i.field == field; });
}

}  // namespace

TEST_CASE("check_vhd: a dynamic disk written through imagenbd is clean") {
  auto file = dynamic_vhd(10 * MiB);
  write_through(file, 0, 4096, 1);
  write_through(file, 5 * MiB, 4096, 2);
  const CheckReport r = run(check_vhd(file, {}));
  CHECK(r.format == "vhd");
  CHECK(r.errors.empty());
  CHECK(r.warnings.empty());
  CHECK(r.complete);
  CHECK(r.allocated_blocks == 2);
  CHECK(r.total_blocks == 5);
  CHECK(r.leaked_bytes == 0);
}

TEST_CASE("check_vhd: every bad BAT entry is reported, each naming its entry") {
  auto file = dynamic_vhd(10 * MiB);
  write_through(file, 0, 4096, 1);
  write_through(file, 2 * MiB, 4096, 2);
  const uint32_t first = bat_entry(*file, 0);
  set_bat_entry(*file, 3, first);                 // shares block 0's space
  set_bat_entry(*file, 4, 0x00100000);            // far past the end of the file
  set_bat_entry(*file, 2, bat_offset / 512 - 1);  // the dynamic header's last sector
  const CheckReport r = run(check_vhd(file, {}));
  CHECK(r.errors.size() == 3);
  CHECK(mentions(r.errors, "entries 0 and 3"));
  CHECK(mentions(r.errors, "entry 4"));
  CHECK(mentions(r.errors, "entry 2"));
  CHECK(r.complete);
}

TEST_CASE("check_vhd: a damaged end footer is an error, the copy at 0 carries the check on") {
  auto file = dynamic_vhd(10 * MiB);
  write_through(file, 0, 4096, 1);
  std::array<std::byte, 1> x{std::byte{'X'}};
  run(file->write(file->size() - 512 + 100, x, {}));
  const CheckReport r = run(check_vhd(file, {}));
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].structure == "footer");
  CHECK(r.errors[0].field == "checksum");
  CHECK(r.errors[0].message.find("copy at offset 0 is sound") != std::string::npos);
  CHECK(r.complete);
  CHECK(r.allocated_blocks == 1);
}

TEST_CASE("check_vhd: a damaged footer copy at 0, or one that differs, is an error") {
  auto file = dynamic_vhd(10 * MiB);
  SUBCASE("checksum") {
    std::array<std::byte, 1> x{std::byte{'X'}};
    run(file->write(100, x, {}));
    const CheckReport r = run(check_vhd(file, {}));
    REQUIRE(r.errors.size() == 1);
    CHECK(r.errors[0].structure == "footer copy");
    CHECK(r.errors[0].field == "checksum");
  }
  SUBCASE("current_size differs") {
    std::array<std::byte, 512> head;
    run(file->read(0, head));
    auto f = vhd::parse_footer(head).value();
    f.current_size = 8 * MiB;
    run(file->write(0, vhd::encode_footer(f), {}));
    const CheckReport r = run(check_vhd(file, {}));
    REQUIRE(r.errors.size() == 1);
    CHECK(r.errors[0].field == "current_size");
  }
}

TEST_CASE("check_vhd: space no BAT entry references is a leak, not an error") {
  auto file = dynamic_vhd(10 * MiB);
  write_through(file, 0, 4096, 1);
  // What a crash after the new footer and data but before the BAT entry leaves: one more
  // block's worth of file before the footer.
  std::array<std::byte, 512> footer;
  const uint64_t old_size = file->size();
  run(file->read(old_size - 512, footer));
  const uint64_t span = 2 * MiB + 512;
  run(file->resize(old_size + span));
  run(file->write(old_size + span - 512, footer, {}));
  const CheckReport r = run(check_vhd(file, {}));
  CHECK(r.errors.empty());
  CHECK(r.leaked_bytes == span);
  CHECK(mentions(r.warnings, "leaked space"));
}

TEST_CASE("check_vhd: a block whose bitmap marks nothing is noted") {
  auto file = dynamic_vhd(10 * MiB);
  write_through(file, 0, 4096, 1);
  const uint64_t block = uint64_t{bat_entry(*file, 0)} * 512;
  std::vector<std::byte> zero(512);
  run(file->write(block, zero, {}));
  const CheckReport r = run(check_vhd(file, {}));
  CHECK(r.errors.empty());
  CHECK(mentions(r.notes, "bitmap"));
}

TEST_CASE("check_vhd: fixed disks") {
  vhd::Footer f;
  f.current_size = f.original_size = MiB;
  f.geometry = vhd::max_geometry;
  auto file = open_memory(MiB + 512, "fixed.vhd");
  run(file->write(MiB, vhd::encode_footer(f), {}));
  CHECK(run(check_vhd(file, {})).errors.empty());
  SUBCASE("bad checksum stops the check") {
    std::array<std::byte, 1> x{std::byte{0x55}};
    run(file->write(MiB + 0x40, x, {}));
    const CheckReport r = run(check_vhd(file, {}));
    REQUIRE(r.errors.size() == 1);
    CHECK(r.errors[0].field == "checksum");
    CHECK_FALSE(r.complete);
  }
  SUBCASE("a bad field") {
    f.format_version = 0x00020000;
    run(file->write(MiB, vhd::encode_footer(f), {}));
    const CheckReport r = run(check_vhd(file, {}));
    REQUIRE(r.errors.size() == 1);
    CHECK(r.errors[0].field == "file_format_version");
  }
}
