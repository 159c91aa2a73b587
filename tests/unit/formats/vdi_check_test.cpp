// check_vdi over images built with vdi_layout in memory and written through open_vdi: clean
// images pass; map entries out of range, past the end of the file or shared, and a count
// that differs from the map are errors (qemu-img check's severity); bytes past the last
// block are a leak.
#include "formats/vdi_check.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "backends/memory.hpp"
#include "formats/vdi.hpp"
#include "formats/vdi_layout.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/vdi_helpers.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::new_vdi;
using imagenbd::test::run;
namespace vdi = imagenbd::formats::vdi;


namespace {

constexpr uint64_t MiB = 1 << 20;

void write_through(DevicePtr file, uint64_t offset, std::size_t length, uint8_t value) {
  auto disk = run(open_vdi(file, {}));
  std::vector<std::byte> data(length, std::byte{value});
  run(disk->write(offset, data, {}));
  run(disk->flush());
}

void set_entry(BlockDevice& file, uint32_t index, uint32_t value) {
  run(file.write(512 + 4 * uint64_t{index}, vdi::encode_entry(value), {}));
}
void set_count(BlockDevice& file, uint32_t count) {
  run(file.write(0x184, vdi::encode_entry(count), {}));
}

bool mentions(const std::vector<CheckIssue>& issues, const std::string& field) {
  return std::any_of(issues.begin(), issues.end(),
                     [&](const CheckIssue& i) { return i.field == field; });
}

}  // namespace

TEST_CASE("check_vdi: dynamic and static images written through imagenbd are clean") {
  auto dynamic = new_vdi(10 * MiB, vdi::ImageType::dynamic);
  write_through(dynamic, 5 * MiB, 4096, 1);
  write_through(dynamic, 0, 512, 2);
  CheckReport r = run(check_vdi(dynamic, {}));
  CHECK(r.errors.empty());
  CHECK(r.warnings.empty());
  CHECK(r.allocated_blocks == 2);
  CHECK(r.total_blocks == 10);
  CHECK(r.leaked_bytes == 0);
  auto fixed = new_vdi(4 * MiB, vdi::ImageType::fixed);
  r = run(check_vdi(fixed, {}));
  CHECK(r.errors.empty());
  CHECK(r.allocated_blocks == 4);
}

TEST_CASE("check_vdi: every bad block map entry is reported") {
  auto file = new_vdi(10 * MiB, vdi::ImageType::dynamic);
  write_through(file, 0, 4096, 1);
  write_through(file, MiB, 4096, 2);
  write_through(file, 2 * MiB, 4096, 3);
  set_entry(*file, 5, 0);   // shares block 0 with entry 0
  set_entry(*file, 6, 50);  // beyond the 10 blocks
  set_entry(*file, 7, 9);   // inside the image, past the end of the file
  set_count(*file, 6);      // qemu's tally is 5: entries 0-2, 5 and 7
  const CheckReport r = run(check_vdi(file, {}));
  CHECK(mentions(r.errors, "entries 0 and 5"));
  CHECK(mentions(r.errors, "entry 6"));
  CHECK(mentions(r.errors, "entry 7"));
  CHECK(mentions(r.errors, "blocks_allocated"));
  CHECK(r.errors.size() == 4);
}

TEST_CASE("check_vdi: a count above the map is qemu's allocated blocks mismatch, and a leak") {
  auto file = new_vdi(10 * MiB, vdi::ImageType::dynamic);
  write_through(file, 0, 4096, 1);
  write_through(file, MiB, 4096, 2);
  set_entry(*file, 1, vdi::entry_free);  // the map update of the second block never landed
  const CheckReport r = run(check_vdi(file, {}));
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].field == "blocks_allocated");
  CHECK(r.errors[0].message.find("allocated blocks mismatch") != std::string::npos);
  CHECK(r.leaked_bytes == MiB);
}

TEST_CASE("check_vdi: bytes past the last block are leaked, no error") {
  auto file = new_vdi(10 * MiB, vdi::ImageType::dynamic);
  write_through(file, 0, 4096, 1);
  run(file->resize(file->size() + MiB));  // data written, header never updated
  const CheckReport r = run(check_vdi(file, {}));
  CHECK(r.errors.empty());
  CHECK(r.leaked_bytes == MiB);
  CHECK(mentions(r.warnings, "size"));
}

TEST_CASE("check_vdi: a damaged header stops the check with the field named") {
  auto file = new_vdi(10 * MiB, vdi::ImageType::dynamic);
  run(file->write(0x178, vdi::encode_entry(3000), {}));  // block size
  const CheckReport r = run(check_vdi(file, {}));
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].structure == "header");
  CHECK(r.errors[0].field == "block size");
  CHECK_FALSE(r.complete);
}
