// The copy-on-write overlay over memory devices: reads fall through to the lower disk,
// partial writes are completed from it, the lower disk is never written, the map reaches
// the file only after a flush of the data, zero/trim/extents, FUA, reuse of given-up
// blocks, and refusals (another lower disk, damaged map, non-empty file at create).
#include "formats/cow.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/cow_layout.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/recording_device.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::copy_of;
using imagenbd::test::error_of;
using imagenbd::test::read;
using imagenbd::test::RecordingDevice;
using imagenbd::test::run;

namespace {

constexpr uint32_t bs = 4096;
constexpr uint64_t disk = 16 * bs + 1000;  // a short last block

// A lower disk whose byte i is (i * 7 + i / 4096) & 0xff, except the last 1000 bytes (the
// short block 16), never written: a hole of the memory device's second 64 KiB page.
DevicePtr make_lower() {
  auto lower = open_memory(disk, "lower");
  std::vector<std::byte> all(16 * bs);
  for (uint64_t i = 0; i < all.size(); ++i) all[i] = std::byte((i * 7 + i / 4096) & 0xff);
  run(lower->write(0, all, {}));
  return lower;
}

std::vector<std::byte> lower_bytes(BlockDevice& lower, uint64_t offset, std::size_t n) {
  return read(lower, offset, n);
}

struct Stack {
  DevicePtr lower = make_lower();
  std::shared_ptr<RecordingDevice> lower_rec = std::make_shared<RecordingDevice>(lower);
  DevicePtr file = open_memory(0, "overlay.cow");
  std::shared_ptr<RecordingDevice> file_rec = std::make_shared<RecordingDevice>(file);
  DevicePtr cow;

  Stack() {
    run(create_cow(*file, disk, {.block_size = bs, .identity = "lower#1"}));
    cow = run(open_cow(lower_rec, file_rec, {.identity = "lower#1"}));
  }
  // Opens the overlay again from the file's bytes as they are now.
  DevicePtr reopen() { return run(open_cow(lower, copy_of(*file), {.identity = "lower#1"})); }
  void check_lower_untouched() const {
    for (const std::string& call : lower_rec->calls()) {
      INFO(call);
      CHECK((call.starts_with("read") || call.starts_with("extents") ||
             call.starts_with("prefetch")));
    }
  }
};

std::vector<std::byte> pattern(std::size_t n, int seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::byte((i * 13 + seed) & 0xff);
  return v;
}

}  // namespace

TEST_CASE("cow: a new overlay reads the lower disk and reports its caps") {
  Stack s;
  CHECK(s.cow->size() == disk);
  CHECK(s.cow->name() == "cow");
  const Caps c = s.cow->caps();
  CHECK(c.writable);
  CHECK(c.flush);
  CHECK(c.fua);
  CHECK(c.multi_conn);
  CHECK(c.block_min == 1);
  CHECK(read(*s.cow, 0, disk) == lower_bytes(*s.lower, 0, disk));
  s.check_lower_untouched();
}

TEST_CASE("cow: partial writes are completed from the lower disk and never reach it") {
  Stack s;
  const auto data = pattern(100, 1);
  run(s.cow->write(bs + 10, data, {}));
  auto expected = lower_bytes(*s.lower, 0, disk);
  std::copy(data.begin(), data.end(), expected.begin() + bs + 10);
  CHECK(read(*s.cow, 0, disk) == expected);
  // Across three blocks, unaligned at both ends, and into the short last block.
  const auto big = pattern(2 * bs + 500, 2);
  run(s.cow->write(6 * bs + 100, big, {}));
  std::copy(big.begin(), big.end(), expected.begin() + 6 * bs + 100);
  const auto tail = pattern(700, 3);
  run(s.cow->write(disk - 700, tail, {}));
  std::copy(tail.begin(), tail.end(), expected.end() - 700);
  CHECK(read(*s.cow, 0, disk) == expected);
  CHECK(read(*s.lower, 0, disk) == lower_bytes(*make_lower(), 0, disk));
  s.check_lower_untouched();
}

TEST_CASE("cow: the map reaches the file only after a flush of the data") {
  Stack s;
  s.file_rec->clear();
  const auto data = pattern(bs, 4);
  run(s.cow->write(2 * bs, data, {}));
  // Before the flush: data written, no map page written.
  for (const std::string& call : s.file_rec->calls()) CHECK(!call.starts_with("write 4096+"));
  // Reopened now, the write is lost but nothing is garbage: the lower disk shows.
  CHECK(read(*s.reopen(), 2 * bs, bs) == lower_bytes(*s.lower, 2 * bs, bs));

  s.file_rec->clear();
  run(s.cow->flush());
  const auto calls = s.file_rec->calls();
  REQUIRE(calls.size() == 3);
  CHECK(calls[0] == "flush");
  CHECK(calls[1] == "write 4096+4096");
  CHECK(calls[2] == "flush");
  CHECK(read(*s.reopen(), 2 * bs, bs) == data);
}

TEST_CASE("cow: a FUA write is durable when it returns") {
  Stack s;
  const auto data = pattern(300, 5);
  run(s.cow->write(4 * bs + 5, data, {.fua = true}));
  auto expected = lower_bytes(*s.lower, 4 * bs, bs);
  std::copy(data.begin(), data.end(), expected.begin() + 5);
  CHECK(read(*s.reopen(), 4 * bs, bs) == expected);
}

TEST_CASE("cow: zero and trim, whole and partial blocks, with the fast flag") {
  Stack s;
  auto expected = lower_bytes(*s.lower, 0, disk);
  // Whole blocks 1 and 2 plus half of block 3: the map marks 1 and 2 zero; block 3 is
  // written (from the lower disk) with zeroes.
  run(s.cow->zero(bs, 2 * bs + 100, {}));
  std::fill_n(expected.begin() + bs, 2 * bs + 100, std::byte{0});
  CHECK(read(*s.cow, 0, disk) == expected);
  const auto ext = run(s.cow->extents(bs, 3 * bs));
  REQUIRE(ext.size() >= 2);
  CHECK(ext[0] == Extent{2 * bs, ExtentKind::zero});
  CHECK(ext[1] == Extent{bs, ExtentKind::data});

  // A fast zero of part of a block is refused before anything changes.
  const auto e = error_of([&] { run(s.cow->zero(7 * bs + 1, bs, {.fast = true})); });
  CHECK(e.errc() == std::errc::operation_not_supported);
  CHECK(read(*s.cow, 7 * bs, 2 * bs) ==
        std::vector(expected.begin() + 7 * bs, expected.begin() + 9 * bs));
  // Whole blocks are fine, up to the disk's end with its short last block.
  run(s.cow->zero(15 * bs, disk - 15 * bs, {.fast = true}));
  std::fill(expected.begin() + 15 * bs, expected.end(), std::byte{0});
  // Trim behaves as zero.
  run(s.cow->trim(8 * bs + 10, 20, {}));
  std::fill_n(expected.begin() + 8 * bs + 10, 20, std::byte{0});
  CHECK(read(*s.cow, 0, disk) == expected);
  run(s.cow->flush());
  CHECK(read(*s.reopen(), 0, disk) == expected);
  s.check_lower_untouched();
}

TEST_CASE("cow: extents come from the map, and from the lower disk where absent") {
  Stack s;
  run(s.cow->write(bs, pattern(10, 6), {}));
  run(s.cow->zero(2 * bs, bs, {}));
  const auto ext = run(s.cow->extents(0, disk));
  // Block 0 data (lower), block 1 data (overlay), block 2 zero (overlay), blocks 3..15 data
  // (lower), block 16 a hole (lower).
  const std::vector<Extent> expected = {{2 * bs, ExtentKind::data},
                                        {bs, ExtentKind::zero},
                                        {13 * bs, ExtentKind::data},
                                        {1000, ExtentKind::hole}};
  CHECK(ext == expected);
}

TEST_CASE("cow: a block given up is reused only after the flush that wrote its new entry") {
  Stack s;
  run(s.cow->write(0, pattern(bs, 7), {}));
  run(s.cow->flush());
  const uint64_t size_after_first = s.file->size();
  run(s.cow->zero(0, bs, {}));  // gives the block up; the map on disk still points at it
  s.file_rec->clear();
  run(s.cow->write(2 * bs, pattern(bs, 8), {}));
  // The new block went elsewhere (the old one may still be read after a crash).
  auto first_write = s.file_rec->calls().front();
  CHECK(first_write != "write 8192+4096");  // data_offset 8192: the given-up block
  CHECK(read(*s.reopen(), 0, bs) == pattern(bs, 7));
  run(s.cow->flush());
  CHECK(read(*s.reopen(), 0, bs) == std::vector<std::byte>(bs));
  // Now reusable: the next new block lands in it.
  s.file_rec->clear();
  run(s.cow->write(3 * bs, pattern(bs, 9), {}));
  CHECK(s.file_rec->calls().front() == "write 8192+4096");
  CHECK(s.file->size() == size_after_first);
}

TEST_CASE("cow: another lower disk is refused, saying what changed") {
  Stack s;
  const auto id = error_of([&] { run(open_cow(s.lower, s.file, {.identity = "lower#2"})); });
  CHECK(id.errc() == std::errc::invalid_argument);
  CHECK(std::string(id.what()).find("\"lower#1\", not \"lower#2\"") != std::string::npos);
  auto bigger = open_memory(disk + 512, "lower");
  const auto size = error_of([&] { run(open_cow(bigger, s.file, {.identity = "lower#1"})); });
  CHECK(std::string(size.what()).find("size changed") != std::string::npos);
}

TEST_CASE("cow: a damaged map is refused naming the entry") {
  Stack s;
  run(s.cow->write(0, pattern(bs, 10), {}));
  run(s.cow->flush());
  std::byte entry[8];
  cow::encode_entry(s.file->size() + bs, entry);  // past the end of the file
  run(s.file->write(4096 + 3 * 8, entry, {}));
  const auto e = error_of([&] { s.reopen(); });
  CHECK(e.errc() == std::errc::invalid_argument);
  CHECK(std::string(e.what()).starts_with("cow: overlay.cow: map: entry 3"));
  // Entry 5 pointing at entry 0's block: shared.
  std::byte shared[8];
  cow::encode_entry(8192, shared);
  run(s.file->write(4096 + 3 * 8, std::span<const std::byte>(shared, 8), {}));
  run(s.file->write(4096 + 5 * 8, std::span<const std::byte>(shared, 8), {}));
  const auto e2 = error_of([&] { s.reopen(); });
  CHECK(std::string(e2.what()).find("shared") != std::string::npos);
}

TEST_CASE("cow: create refuses a non-empty file and a bad block size") {
  auto file = open_memory(100, "used.cow");
  const auto e = error_of([&] { run(create_cow(*file, disk, {.block_size = bs})); });
  CHECK(e.errc() == std::errc::file_exists);
  auto empty = open_memory(0, "new.cow");
  const auto e2 = error_of([&] { run(create_cow(*empty, disk, {.block_size = 1000})); });
  CHECK(e2.errc() == std::errc::invalid_argument);
  CHECK(std::string(e2.what()).find("block size 1000") != std::string::npos);
}
