// resize_vhd in memory: fixed and dynamic disks grow with their data intact and new space
// reading as zeroes; a dynamic disk whose BAT must grow past the first block moves that
// block; shrinking needs the flag and never drops an allocated block; and a failure at any
// step of a resize (a crash, for the memory leaf) leaves an image that opens at the old or
// the new size with the same data.
#include "formats/vhd_resize.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <vector>

#include "backends/memory.hpp"
#include "formats/vhd.hpp"
#include "formats/vhd_check.hpp"
#include "formats/vhd_layout.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/faulty_device.hpp"
#include "tests/unit/support/image_helpers.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/vhd_helpers.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::dynamic_vhd;
using imagenbd::test::copy_of;
using imagenbd::test::FaultyDevice;
using imagenbd::test::run;
namespace vhd = imagenbd::formats::vhd;

using imagenbd::test::all_zero;
using imagenbd::test::pattern;

namespace {

constexpr uint64_t MiB = 1 << 20;
using Bytes = std::vector<std::byte>;

DevicePtr fixed_vhd(uint64_t size) {
  vhd::Footer f;
  f.current_size = f.original_size = size;
  f.geometry = vhd::max_geometry;
  auto m = open_memory(size + 512, "fixed.vhd");
  run(m->write(size, vhd::encode_footer(f), {}));
  return m;
}

void write_at(DevicePtr file, uint64_t offset, const Bytes& data) {
  auto disk = run(open_vhd(file, {}));
  run(disk->write(offset, data, {}));
  run(disk->flush());
}

Bytes read_at(DevicePtr file, uint64_t offset, std::size_t n) {
  auto disk = run(open_vhd(file, {.read_only = true}));
  Bytes v(n);
  run(disk->read(offset, v));
  return v;
}

uint64_t disk_size(DevicePtr file) {
  return run(open_vhd(file, {.read_only = true}))->size();
}

}  // namespace

TEST_CASE("resize_vhd: a dynamic disk grows 200x, the block after the BAT moves") {
  // 10 MiB: 5 BAT entries, one BAT sector; block 0 follows it (its data 4 KiB aligned, at
  // 0x1000). 2000 MiB needs 1000 entries: 8 sectors, to 0x1600.
  auto file = dynamic_vhd(10 * MiB);
  const Bytes a = pattern(64 * 1024, 1), b = pattern(4096, 2), tail = pattern(4096, 3);
  write_at(file, 0, a);
  write_at(file, 5 * MiB, b);
  write_at(file, 10 * MiB - 4096, tail);
  const auto result = run(resize_vhd(*file, {.new_size = 2000 * MiB}));
  CHECK(result.old_size == 10 * MiB);
  CHECK(result.new_size == 2000 * MiB);
  CHECK(result.relocated_blocks == 1);
  CHECK(disk_size(file) == 2000 * MiB);
  CHECK(read_at(file, 0, a.size()) == a);
  CHECK(read_at(file, 5 * MiB, b.size()) == b);
  CHECK(read_at(file, 10 * MiB - 4096, tail.size()) == tail);
  CHECK(all_zero(read_at(file, 10 * MiB, 4 * MiB)));
  CHECK(all_zero(read_at(file, 2000 * MiB - 4096, 4096)));
  const CheckReport r = run(check_vhd(file, {}));
  CHECK(r.errors.empty());
  CHECK(r.total_blocks == 1000);
  CHECK(r.allocated_blocks == 3);
  // New blocks are appended after the moved one, and the disk stays writable.
  write_at(file, 999 * MiB, b);
  CHECK(read_at(file, 999 * MiB, b.size()) == b);
  CHECK(read_at(file, 0, a.size()) == a);
}

TEST_CASE("resize_vhd: an empty dynamic disk grows its BAT over the old end footer") {
  auto file = dynamic_vhd(MiB);
  run(resize_vhd(*file, {.new_size = 4096 * MiB}));
  CHECK(disk_size(file) == 4096 * MiB);
  CHECK(run(check_vhd(file, {})).errors.empty());
  std::array<std::byte, 512> head, end;
  run(file->read(0, head));
  run(file->read(file->size() - 512, end));
  CHECK(head == end);
  const auto f = vhd::parse_footer(end).value();
  CHECK(f.current_size == 4096 * MiB);
  CHECK(f.original_size == 4096 * MiB);  // libvhdi shows it as the media size
}

TEST_CASE("resize_vhd: bytes past the old end of a block read as zeroes after growing") {
  auto file = dynamic_vhd(3 * MiB);  // the second block is half in the disk
  write_at(file, 3 * MiB - 4096, pattern(4096, 9));
  // Something wrote past the end of the disk in that block (another tool, an old shrink).
  auto disk = run(open_vhd(file, {.read_only = true}));
  std::vector<std::byte> bat(4);
  run(file->read(1536 + 4, bat));
  const uint64_t block = uint64_t{vhd::decode_bat(bat, 1)[0]} * 512 + 512;
  run(file->write(block + MiB + 100, pattern(1000, 5), {}));
  run(resize_vhd(*file, {.new_size = 4 * MiB}));
  CHECK(all_zero(read_at(file, 3 * MiB, MiB)));
  CHECK(read_at(file, 3 * MiB - 4096, 4096) == pattern(4096, 9));
}

TEST_CASE("resize_vhd: shrinking") {
  auto file = dynamic_vhd(10 * MiB);
  write_at(file, 0, pattern(4096, 1));
  write_at(file, 6 * MiB, pattern(4096, 2));
  auto refused = [&](uint64_t size, bool shrink) {
    try {
      run(resize_vhd(*file, {.new_size = size, .shrink = shrink}));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(refused(8 * MiB, false).find("needs --shrink") != std::string::npos);
  CHECK(refused(4 * MiB, true).find("block 3 ") != std::string::npos);
  CHECK(refused(1000, true).find("multiple of 512") != std::string::npos);
  CHECK(refused(3000 * 1024 * MiB, true).find("2040 GiB") != std::string::npos);
  CHECK(disk_size(file) == 10 * MiB);
  run(resize_vhd(*file, {.new_size = 7 * MiB, .shrink = true}));
  CHECK(disk_size(file) == 7 * MiB);
  CHECK(read_at(file, 6 * MiB, 4096) == pattern(4096, 2));
  CHECK(run(check_vhd(file, {})).errors.empty());
}

TEST_CASE("resize_vhd: fixed disks move their footer, the old one becomes zeroes") {
  auto file = fixed_vhd(MiB);
  const Bytes data = pattern(MiB, 4);
  run(file->write(0, data, {}));
  run(resize_vhd(*file, {.new_size = 3 * MiB}));
  CHECK(file->size() == 3 * MiB + 512);
  CHECK(disk_size(file) == 3 * MiB);
  CHECK(read_at(file, 0, MiB) == data);
  CHECK(all_zero(read_at(file, MiB, 2 * MiB)));
  CHECK_THROWS_AS(run(resize_vhd(*file, {.new_size = MiB})), Error);
  run(resize_vhd(*file, {.new_size = 512 * 1024, .shrink = true}));
  CHECK(file->size() == 512 * 1024 + 512);
  CHECK(read_at(file, 0, 512 * 1024) == Bytes(data.begin(), data.begin() + 512 * 1024));
}

TEST_CASE("resize_vhd: a failure at any step leaves a sound image of the old or new size") {
  auto original = dynamic_vhd(10 * MiB);
  const Bytes a = pattern(8192, 1), b = pattern(8192, 2);
  write_at(original, 0, a);
  write_at(original, 4 * MiB, b);
  int completed_at = 0;
  for (int fail = 1; fail < 200 && !completed_at; ++fail) {
    CAPTURE(fail);
    auto file = copy_of(*original);
    auto faulty = std::make_shared<FaultyDevice>(file, fail);
    try {
      run(resize_vhd(*faulty, {.new_size = 2000 * MiB}));
      completed_at = fail;
    } catch (const Error&) {
    }
    const uint64_t size = disk_size(file);
    CHECK((size == 10 * MiB || size == 2000 * MiB));
    CHECK(read_at(file, 0, a.size()) == a);
    CHECK(read_at(file, 4 * MiB, b.size()) == b);
  }
  CHECK(completed_at > 10);  // every step before it was tried
}

TEST_CASE("resize_vhd: small blocks, several in the BAT's way, no leak is left behind") {
  auto file = dynamic_vhd(MiB, 64 * 1024);  // 16 entries; block data on 4 KiB boundaries
  for (uint64_t i = 0; i < 16; ++i) write_at(file, i * 64 * 1024, pattern(4096, uint8_t(i)));
  const auto result = run(resize_vhd(*file, {.new_size = 2048 * MiB}));  // a 128 KiB BAT
  CHECK(result.relocated_blocks >= 2);
  for (uint64_t i = 0; i < 16; ++i) {
    CAPTURE(i);
    CHECK(read_at(file, i * 64 * 1024, 4096) == pattern(4096, uint8_t(i)));
  }
  const CheckReport r = run(check_vhd(file, {}));
  CHECK(r.errors.empty());
  CHECK(r.warnings.empty());
  CHECK(r.leaked_bytes == 0);
  CHECK(r.allocated_blocks == 16);
}
