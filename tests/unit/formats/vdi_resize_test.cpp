// resize_vdi in memory: dynamic and static images grow with their data intact, moving the
// block map into the first physical blocks when it must grow past the data offset;
// shrinking needs the flag and never drops an allocated block of a dynamic image; a
// failure at any step leaves an image that opens at the old or the new size with the same
// data.
#include "formats/vdi_resize.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <vector>

#include "backends/memory.hpp"
#include "formats/vdi.hpp"
#include "formats/vdi_check.hpp"
#include "formats/vdi_layout.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/faulty_device.hpp"
#include "tests/unit/support/image_helpers.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/vdi_helpers.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::copy_of;
using imagenbd::test::FaultyDevice;
using imagenbd::test::header_of;
using imagenbd::test::new_vdi;
using imagenbd::test::run;
namespace vdi = imagenbd::formats::vdi;

using imagenbd::test::all_zero;
using imagenbd::test::pattern;
using imagenbd::test::uuid_v4;

namespace {

constexpr uint64_t MiB = 1 << 20;
using Bytes = std::vector<std::byte>;

void write_at(DevicePtr file, uint64_t offset, const Bytes& data) {
  auto disk = run(open_vdi(file, {}));
  run(disk->write(offset, data, {}));
  run(disk->flush());
}

Bytes read_at(DevicePtr file, uint64_t offset, std::size_t n) {
  auto disk = run(open_vdi(file, {.read_only = true}));
  Bytes v(n);
  run(disk->read(offset, v));
  return v;
}

uint64_t disk_size(DevicePtr file) {
  return run(open_vdi(file, {.read_only = true}))->size();
}

}  // namespace

TEST_CASE("resize_vdi: a dynamic image grows within its map, then past it") {
  auto file = new_vdi(10 * MiB, vdi::ImageType::dynamic);
  const Bytes a = pattern(4096, 1), b = pattern(4096, 2);
  write_at(file, 5 * MiB, a);  // physical block 0
  write_at(file, 0, b);        // physical block 1
  SUBCASE("within: 100 MiB still fits the map's one sector") {
    run(resize_vdi(*file, {.new_size = 100 * MiB, .modify_uuid = uuid_v4(7)}));
    CHECK(disk_size(file) == 100 * MiB);
    CHECK(header_of(*file).data_offset == 0x400);
    CHECK(header_of(*file).uuid_modify == uuid_v4(7));
  }
  SUBCASE("past: 300 MiB needs 3 map sectors; block 0 moves to the end") {
    const auto result = run(resize_vdi(*file, {.new_size = 300 * MiB, .modify_uuid = uuid_v4(7)}));
    CHECK(result.relocated_blocks == 1);
    const vdi::Header h = header_of(*file);
    CHECK(h.blocks_offset == 0x400);
    CHECK(h.data_offset == 0x400 + MiB);
    CHECK(h.blocks == 300);
    CHECK(h.blocks_allocated == 2);
    CHECK(disk_size(file) == 300 * MiB);
  }
  CHECK(read_at(file, 5 * MiB, a.size()) == a);
  CHECK(read_at(file, 0, b.size()) == b);
  CHECK(all_zero(read_at(file, 10 * MiB, 4 * MiB)));
  const CheckReport r = run(check_vdi(file, {}));
  CHECK(r.errors.empty());
  CHECK(r.leaked_bytes == 0);
  write_at(file, 99 * MiB, a);
  CHECK(read_at(file, 99 * MiB, a.size()) == a);
  CHECK(run(check_vdi(file, {})).errors.empty());
}

TEST_CASE("resize_vdi: a static image grows with allocated, zeroed blocks") {
  auto file = new_vdi(4 * MiB, vdi::ImageType::fixed);
  const Bytes data = pattern(4 * MiB, 3);
  write_at(file, 0, data);
  SUBCASE("within the map") {
    run(resize_vdi(*file, {.new_size = 6 * MiB}));
  }
  SUBCASE("past the map") {
    run(resize_vdi(*file, {.new_size = 200 * MiB}));
  }
  CHECK(read_at(file, 0, data.size()) == data);
  CHECK(all_zero(read_at(file, 4 * MiB, 2 * MiB)));
  const CheckReport r = run(check_vdi(file, {}));
  CHECK(r.errors.empty());
  CHECK(r.allocated_blocks == r.total_blocks);
  CHECK(r.leaked_bytes == 0);
}

TEST_CASE("resize_vdi: shrinking") {
  auto file = new_vdi(10 * MiB, vdi::ImageType::dynamic);
  write_at(file, 6 * MiB, pattern(4096, 1));
  CHECK_THROWS_AS(run(resize_vdi(*file, {.new_size = 8 * MiB})), Error);
  try {
    run(resize_vdi(*file, {.new_size = 4 * MiB, .shrink = true}));
    FAIL("a shrink over an allocated block was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("block 6 ") != std::string::npos);
  }
  run(resize_vdi(*file, {.new_size = 7 * MiB, .shrink = true}));
  CHECK(disk_size(file) == 7 * MiB);
  CHECK(read_at(file, 6 * MiB, 4096) == pattern(4096, 1));
  CHECK(run(check_vdi(file, {})).errors.empty());
  auto fixed = new_vdi(8 * MiB, vdi::ImageType::fixed);
  run(resize_vdi(*fixed, {.new_size = 2 * MiB, .shrink = true}));
  CHECK(fixed->size() == 0x400 + 2 * MiB);
  CHECK(run(check_vdi(fixed, {})).errors.empty());
}

TEST_CASE("resize_vdi: a failure at any step leaves a sound image of the old or new size") {
  for (auto type : {vdi::ImageType::dynamic, vdi::ImageType::fixed}) {
    CAPTURE(static_cast<int>(type));
    auto original = new_vdi(10 * MiB, type);
    const Bytes a = pattern(8192, 1), b = pattern(8192, 2);
    write_at(original, 5 * MiB, a);
    write_at(original, 0, b);
    int completed_at = 0;
    for (int fail = 1; fail < 200 && !completed_at; ++fail) {
      CAPTURE(fail);
      auto file = copy_of(*original);
      auto faulty = std::make_shared<FaultyDevice>(file, fail);
      try {
        run(resize_vdi(*faulty, {.new_size = 300 * MiB}));
        completed_at = fail;
      } catch (const Error&) {
      }
      const uint64_t size = disk_size(file);
      CHECK(size >= 10 * MiB);
      CHECK(size <= 300 * MiB);
      CHECK(read_at(file, 5 * MiB, a.size()) == a);
      CHECK(read_at(file, 0, b.size()) == b);
      CHECK(all_zero(read_at(file, 10 * MiB - 4096, 4096)));
    }
    CHECK(completed_at > 5);
  }
}
