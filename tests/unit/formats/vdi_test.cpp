// The VDI layer over the memory leaf, with images built by our own serialiser
// (vdi_layout): reads, in-place writes, allocation and its crash-safe order, concurrent
// writers racing for one block, zero/trim, extents, and refusals of damaged images.
#include "formats/vdi.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/vdi_layout.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/faulty_device.hpp"
#include "tests/unit/support/image_helpers.hpp"
#include "tests/unit/support/recording_device.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/vdi_helpers.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::error_of;
using imagenbd::test::FaultyDevice;
using imagenbd::test::header_of;
using imagenbd::test::map_of;
using imagenbd::test::put_header;
using imagenbd::test::put_map;
using imagenbd::test::read;
using imagenbd::test::RecordingDevice;
using imagenbd::test::run;
using imagenbd::test::write_new_vdi;
namespace vdi = imagenbd::formats::vdi;
namespace asio = boost::asio;

using imagenbd::test::all_zero;
using imagenbd::test::odd_pattern;
using imagenbd::test::uuid;

namespace {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1 << 20;
constexpr uint64_t data_at = 0x400;  // data offset of the small images below (< 128 blocks)

// Writes header and block map of a new image into a memory "file" labelled disk.vdi.
// Static images get their data area (reading as zeroes); `edit` may change the header
// first (the file size follows its data offset and block size).
template <typename Edit>
DevicePtr make_file(uint64_t disk, vdi::ImageType type, uint32_t block_size, Edit edit) {
  vdi::Header h = vdi::new_header(disk, type, uuid(1), uuid(100), block_size);
  edit(h);
  const uint64_t stride = uint64_t{h.block_size} + h.block_extra;
  const uint64_t size = h.data_offset + (type == vdi::ImageType::fixed ? h.blocks * stride : 0);
  auto file = open_memory(size, "disk.vdi");
  write_new_vdi(*file, h);
  return file;
}
DevicePtr make_file(uint64_t disk, vdi::ImageType type = vdi::ImageType::dynamic,
                    uint32_t block_size = MiB) {
  return make_file(disk, type, block_size, [](vdi::Header&) {});
}

DevicePtr open(DevicePtr file, bool read_only = false) {
  return run(open_vdi(std::move(file), {.read_only = read_only}));
}

std::string open_error(DevicePtr file, bool read_only = false) {
  const Error e = error_of([&] { open(file, read_only); });
  return e.what();
}

int count(const std::vector<std::string>& calls, std::string_view prefix) {
  return static_cast<int>(std::count_if(
      calls.begin(), calls.end(), [&](const std::string& c) { return c.starts_with(prefix); }));
}

}  // namespace

TEST_CASE("vdi: an empty dynamic image reads as zeroes and is one hole") {
  auto file = make_file(5 * MiB);
  auto d = open(file);
  CHECK(d->name() == "vdi");
  CHECK(d->describe() == "disk.vdi");
  CHECK(d->size() == 5 * MiB);
  const Caps c = d->caps();
  CHECK((c.writable && c.flush && c.fua && c.trim && c.zero && c.fast_zero && c.extents &&
         c.cache && c.multi_conn));
  CHECK(c.block_min == 1);
  CHECK(c.block_max == 32u << 20);
  CHECK(all_zero(read(*d, 0, 5 * MiB)));
  CHECK(run(d->extents(0, 5 * MiB)) == std::vector<Extent>{{5 * MiB, ExtentKind::hole}});
  CHECK(run(d->extents(MiB + 3, 100)) == std::vector<Extent>{{100, ExtentKind::hole}});
  run(d->flush());
  run(d->prefetch(0, 5 * MiB));
  // Nothing was written: not even a new uuidModify.
  CHECK(header_of(*file).uuid_modify == uuid(100));
}

TEST_CASE("vdi: a static image is all data, writes go in place and allocate nothing") {
  auto file = make_file(3 * MiB, vdi::ImageType::fixed);
  run(file->write(data_at + MiB + 10, odd_pattern(100, 1), {}));  // virtual MiB + 10
  auto d = open(file);
  CHECK(run(d->extents(0, 3 * MiB)) == std::vector<Extent>{{3 * MiB, ExtentKind::data}});
  CHECK(read(*d, MiB + 10, 100) == odd_pattern(100, 1));
  // Contiguous blocks make one child read.
  auto rec = std::make_shared<RecordingDevice>(file);
  auto r = open(rec);
  rec->clear();
  CHECK(read(*r, 100, 2 * MiB + 5) == read(*file, data_at + 100, 2 * MiB + 5));
  CHECK(rec->calls() == std::vector<std::string>{"read 1124+2097157"});

  run(r->write(3 * MiB - 7, odd_pattern(7, 2), {}));
  CHECK(read(*file, data_at + 3 * MiB - 7, 7) == odd_pattern(7, 2));
  CHECK(file->size() == data_at + 3 * MiB);
  CHECK(header_of(*file).blocks_allocated == 3);
  CHECK(map_of(*file) == std::vector<uint32_t>{0, 1, 2});
}

TEST_CASE("vdi: the first write to a free block allocates it in the crash-safe order") {
  auto file = make_file(8 * MiB);
  auto rec = std::make_shared<RecordingDevice>(file);
  auto d = open(rec);
  rec->clear();
  const auto data = odd_pattern(4096, 3);
  run(d->write(5 * MiB + 512, data, {}));
  // The first modification gives the image a new uuidModify (one header write); then:
  // grow, data, flush, and only then the header with the new count and the map entry,
  // in one write of the first page.
  CHECK(rec->calls() == std::vector<std::string>{
                            "write 0+512",
                            "resize 1049600",   // data_at + 1 MiB
                            "write 1536+4096",  // data_at + 512
                            "flush",
                            "write 0+536",  // header and map up to entry 5 (0x200 + 20)
                        });
  const vdi::Header h = header_of(*file);
  CHECK(h.blocks_allocated == 1);
  CHECK(h.uuid_modify != uuid(100));
  CHECK((h.uuid_modify.bytes[6] >> 4) == 4);
  CHECK(h.uuid_create == uuid(1));
  auto map = map_of(*file);
  CHECK(map[5] == 0);
  CHECK(std::count(map.begin(), map.end(), vdi::entry_free) == 7);
  CHECK(read(*file, data_at + 512, 4096) == data);
  CHECK(read(*d, 5 * MiB + 512, 4096) == data);
  CHECK(all_zero(read(*d, 5 * MiB, 512)));
  CHECK(all_zero(read(*d, 5 * MiB + 4608, MiB - 4608)));

  // A second write into the block goes in place; a write to another block takes the next
  // physical block. FUA: the in-place write carries it, the allocation ends with a flush.
  rec->clear();
  run(d->write(6 * MiB - 10, odd_pattern(20, 4), {.fua = true}));  // blocks 5 and 6
  CHECK(rec->calls() == std::vector<std::string>{
                            "write 1049590+10",
                            "resize 2098176",
                            "write 1049600+10",
                            "flush",
                            "write 0+540",
                            "flush",
                        });
  rec->clear();
  run(d->write(MiB, odd_pattern(10, 5), {.fua = true}));
  CHECK(rec->calls().back() == "flush");
  rec->clear();
  run(d->write(5 * MiB, odd_pattern(10, 5), {.fua = true}));
  CHECK(rec->calls() == std::vector<std::string>{"write 1024+10 fua"});

  map = map_of(*file);
  CHECK(map[5] == 0);
  CHECK(map[6] == 1);
  CHECK(map[1] == 2);
  CHECK(header_of(*file).blocks_allocated == 3);
  CHECK(file->size() == data_at + 3 * MiB);
  CHECK(run(d->extents(0, 8 * MiB)) == std::vector<Extent>{{MiB, ExtentKind::hole},
                                                           {MiB, ExtentKind::data},
                                                           {3 * MiB, ExtentKind::hole},
                                                           {2 * MiB, ExtentKind::data},
                                                           {MiB, ExtentKind::hole}});
  // Reopened, the image says the same.
  auto again = open(file);
  CHECK(read(*again, 5 * MiB + 10, 4096) == read(*d, 5 * MiB + 10, 4096));
  CHECK(read(*again, 6 * MiB - 10, 20) == odd_pattern(20, 4));
}

TEST_CASE("vdi: unaligned writes over small blocks match a shadow copy, also after reopening") {
  // 64 KiB blocks (from the header), an odd number of them, a last block cut short.
  const uint64_t disk = 2 * MiB + 4096;
  auto file = make_file(disk, vdi::ImageType::dynamic, 64 * KiB);
  auto d = open(file);
  std::vector<std::byte> shadow(disk);
  std::mt19937 rng(42);
  for (int i = 0; i < 200; ++i) {
    const uint64_t at = rng() % disk;
    const std::size_t n = 1 + rng() % std::min<uint64_t>(200 * KiB, disk - at);
    const auto data = odd_pattern(n, i);
    run(d->write(at, data, {}));
    std::copy(data.begin(), data.end(), shadow.begin() + static_cast<std::ptrdiff_t>(at));
    if (i % 50 == 0) CHECK(read(*d, 0, disk) == shadow);
  }
  CHECK(read(*d, 0, disk) == shadow);
  CHECK(read(*open(file), 0, disk) == shadow);
  const auto map = map_of(*file);
  const auto used = static_cast<uint32_t>(std::count_if(map.begin(), map.end(), vdi::is_allocated));
  CHECK(used > 10);
  CHECK(header_of(*file).blocks_allocated == used);
  CHECK(file->size() == header_of(*file).data_offset + used * 64 * KiB);
}

TEST_CASE("vdi: concurrent writers to one unallocated block on several threads") {
  auto file = make_file(4 * MiB);
  auto rec = std::make_shared<RecordingDevice>(file, /*yield=*/true);
  auto d = open(rec);
  constexpr int threads = 4, writers = 32;
  std::vector<std::unique_ptr<asio::io_context>> contexts;
  for (int t = 0; t < threads; ++t) contexts.push_back(std::make_unique<asio::io_context>(1));
  std::atomic<int> ok{0};
  for (int i = 0; i < writers; ++i) {
    // Writers 0-23 share block 2 (4 KiB each); 24-31 share block 3.
    const uint64_t at = (i < 24 ? 2 * MiB + i * 8 * KiB : 3 * MiB + (i - 24) * 8 * KiB) + 100;
    asio::co_spawn(
        *contexts[i % threads],
        [d, at, i]() -> asio::awaitable<void> { co_await d->write(at, odd_pattern(4096, i), {}); },
        [&ok](std::exception_ptr e) {
          if (!e) ++ok;
        });
  }
  std::vector<std::thread> pool;
  for (auto& c : contexts) pool.emplace_back([&c] { c->run(); });
  for (auto& t : pool) t.join();
  CHECK(ok == writers);

  // Each block got exactly one physical block, and every writer's data is there.
  const auto calls = rec->calls();
  CHECK(count(calls, "resize") == 2);
  CHECK(header_of(*file).blocks_allocated == 2);
  const auto map = map_of(*file);
  CHECK(std::count_if(map.begin(), map.end(), vdi::is_allocated) == 2);
  CHECK(vdi::is_allocated(map[2]));
  CHECK(vdi::is_allocated(map[3]));
  CHECK(file->size() == data_at + 2 * MiB);
  auto again = open(file);
  for (int i = 0; i < writers; ++i) {
    const uint64_t at = (i < 24 ? 2 * MiB + i * 8 * KiB : 3 * MiB + (i - 24) * 8 * KiB) + 100;
    CAPTURE(i);
    CHECK(read(*again, at, 4096) == odd_pattern(4096, i));
    CHECK(all_zero(read(*again, at + 4096, 4096 - 100)));
  }
}

TEST_CASE("vdi: a whole block of zeroes marks the entry zero instead of allocating") {
  auto file = make_file(3 * MiB);
  auto d = open(file);
  run(d->write(MiB, std::vector<std::byte>(MiB), {}));
  CHECK(map_of(*file) == std::vector<uint32_t>{vdi::entry_free, vdi::entry_zero, vdi::entry_free});
  CHECK(header_of(*file).blocks_allocated == 0);
  CHECK(file->size() == data_at);
  CHECK(all_zero(read(*d, 0, 3 * MiB)));
  // Zeroes that are not a whole block, or data, allocate as usual (a zero block too).
  run(d->write(MiB + 1, std::vector<std::byte>(MiB - 1), {}));
  CHECK(header_of(*file).blocks_allocated == 1);
  run(d->write(0, std::vector<std::byte>(2 * MiB), {}));  // block 0: zero; block 1: in place
  CHECK(map_of(*file) == std::vector<uint32_t>{vdi::entry_zero, 0, vdi::entry_free});
  run(d->write(MiB / 2, odd_pattern(MiB, 1), {}));  // the zero block 0 gets a block too
  CHECK(map_of(*file) == std::vector<uint32_t>{1, 0, vdi::entry_free});
  CHECK(read(*d, MiB / 2, MiB) == odd_pattern(MiB, 1));
  CHECK(all_zero(read(*d, 0, MiB / 2)));
}

TEST_CASE("vdi: zero and trim read back as zeroes and never give blocks back") {
  auto file = make_file(6 * MiB);
  auto d = open(file);
  run(d->write(MiB, odd_pattern(2 * MiB, 1), {}));     // blocks 1 and 2 -> physical 0 and 1
  run(d->write(4 * MiB + 5, odd_pattern(10, 2), {}));  // block 4 -> physical 2
  auto rec = std::make_shared<RecordingDevice>(file);
  d = open(rec);

  SUBCASE("zero") {
    rec->clear();
    // Half of block 0 (free: nothing to do), blocks 1-2 wholly, block 3 (free: marked
    // zero), a piece of block 4.
    run(d->zero(MiB / 2, 4 * MiB - MiB / 2 + 100, {}));
    const auto calls = rec->calls();
    CHECK(calls == std::vector<std::string>{"write 0+512",  // uuidModify
                                            "zero 1024+2097152", "write 524+4",
                                            "zero 2098176+100"});
    CHECK(map_of(*file) ==
          std::vector<uint32_t>{vdi::entry_free, 0, 1, vdi::entry_zero, 2, vdi::entry_free});
    CHECK(all_zero(read(*d, 0, 4 * MiB + 100)));
    CHECK(read(*d, 4 * MiB + 100, 10) == std::vector<std::byte>(10));  // past the data
    CHECK(header_of(*file).blocks_allocated == 3);
    // The whole free tail: block 5 (the last) marked, block 0 too; FUA flushes.
    rec->clear();
    run(d->zero(0, 6 * MiB, {.fua = true}));
    CHECK(map_of(*file) ==
          std::vector<uint32_t>{vdi::entry_zero, 0, 1, vdi::entry_zero, 2, vdi::entry_zero});
    CHECK(rec->calls().back() == "flush");
    CHECK(all_zero(read(*d, 0, 6 * MiB)));
    CHECK(run(d->extents(0, 6 * MiB)) == std::vector<Extent>{{MiB, ExtentKind::hole},
                                                             {2 * MiB, ExtentKind::data},
                                                             {MiB, ExtentKind::hole},
                                                             {MiB, ExtentKind::data},
                                                             {MiB, ExtentKind::hole}});
  }
  SUBCASE("trim") {
    rec->clear();
    run(d->trim(0, 6 * MiB, {}));
    CHECK(rec->calls() ==
          std::vector<std::string>{"write 0+512", "trim 1024+2097152", "trim 2098176+1048576"});
    CHECK(map_of(*file) ==
          std::vector<uint32_t>{vdi::entry_free, 0, 1, vdi::entry_free, 2, vdi::entry_free});
    CHECK(header_of(*file).blocks_allocated == 3);
    // The memory leaf frees trimmed pages: they read as zeroes.
    CHECK(all_zero(read(*d, 0, 6 * MiB)));
  }
  SUBCASE("fast zero of allocated data asks the child; of free blocks it needs nothing") {
    run(d->zero(MiB + 7, 100, {.no_hole = true, .fast = true}));
    CHECK(all_zero(read(*d, MiB + 7, 100)));
    run(d->zero(0, 512, {.fast = true}));
  }
  // The image is still sound: it opens, and the data that was not zeroed is there.
  auto again = open(file);
  CHECK(read(*again, 3 * MiB - 10, 10) == read(*d, 3 * MiB - 10, 10));
}

// The session skips the extents walk before a structured read when may_have_holes() says
// no: once every block is allocated. Zeroing allocated data keeps the blocks (data).
TEST_CASE("vdi: may_have_holes is false once every block is allocated") {
  auto file = make_file(3 * MiB);
  auto d = open(file);
  CHECK(d->may_have_holes());
  run(d->write(0, odd_pattern(2 * MiB, 1), {}));
  CHECK(d->may_have_holes());
  run(d->zero(2 * MiB, MiB, {}));  // a free block marked zero: still a hole
  CHECK(d->may_have_holes());
  run(d->write(3 * MiB - 1, odd_pattern(1, 2), {}));
  CHECK_FALSE(d->may_have_holes());
  run(d->zero(0, 3 * MiB, {}));
  CHECK_FALSE(d->may_have_holes());
  CHECK(run(d->extents(0, 3 * MiB)) == std::vector<Extent>{{3 * MiB, ExtentKind::data}});
  CHECK_FALSE(open(file)->may_have_holes());
}

TEST_CASE("vdi: extents merge runs of a kind and stop at 1024 per call") {
  // 2048 blocks of 512 bytes, every other one allocated: 2048 alternating runs.
  auto file = make_file(MiB, vdi::ImageType::dynamic, 512);
  auto d = open(file);
  for (uint64_t i = 0; i < 2048; i += 2) run(d->write(i * 512 + 1, odd_pattern(1, 1), {}));
  auto extents = run(d->extents(0, MiB));
  REQUIRE(extents.size() == 1024);
  CHECK(extents[0] == Extent{512, ExtentKind::data});
  CHECK(extents[1] == Extent{512, ExtentKind::hole});
  extents = run(d->extents(1024 * 512, MiB - 1024 * 512));
  CHECK(extents.size() == 1024);
  // Partial blocks at both ends of the range.
  CHECK(run(d->extents(100, 1000)) == std::vector<Extent>{{412, ExtentKind::data},
                                                          {512, ExtentKind::hole},
                                                          {76, ExtentKind::data}});
  CHECK(read(*open(file), 1024 * 512 + 1, 1) == odd_pattern(1, 1));
}

TEST_CASE("vdi: block extra bytes sit before each block's data") {
  auto edit = [](vdi::Header& h) { h.block_extra = 512; };
  auto file = make_file(2 * MiB, vdi::ImageType::fixed, MiB, edit);
  CHECK(file->size() == data_at + 2 * (MiB + 512));
  run(file->write(data_at + MiB + 512 + 512, odd_pattern(10, 1), {}));  // block 1, byte 0
  auto d = open(file);
  CHECK(read(*d, MiB, 10) == odd_pattern(10, 1));
  // Reads across the boundary skip the extra bytes of block 1.
  run(file->write(data_at + MiB + 512, odd_pattern(512, 9), {}));
  CHECK(read(*d, MiB - 5, 15) == [] {
    auto v = std::vector<std::byte>(5);
    auto tail = odd_pattern(10, 1);
    v.insert(v.end(), tail.begin(), tail.end());
    return v;
  }());

  auto dynamic = make_file(2 * MiB, vdi::ImageType::dynamic, MiB, edit);
  auto dd = open(dynamic);
  run(dd->write(MiB + 3, odd_pattern(10, 2), {}));
  CHECK(dynamic->size() == data_at + MiB + 512);
  CHECK(read(*dynamic, data_at + 512 + 3, 10) == odd_pattern(10, 2));
  CHECK(read(*open(dynamic), MiB + 3, 10) == odd_pattern(10, 2));
}

TEST_CASE("vdi: an odd disk size is rounded down, the last block holds only what fits") {
  auto file = make_file(3 * MiB - 100);
  auto d = open(file);
  CHECK(d->size() == 3 * MiB - 512);
  // A whole last block of zeroes is its 1 MiB - 512 bytes.
  run(d->write(2 * MiB, std::vector<std::byte>(MiB - 512), {}));
  CHECK(map_of(*file)[2] == vdi::entry_zero);
  run(d->write(3 * MiB - 1024, odd_pattern(512, 1), {}));
  CHECK(read(*d, 3 * MiB - 1024, 512) == odd_pattern(512, 1));
  CHECK(file->size() == data_at + MiB);  // the whole block is in the file, as qemu does
}

TEST_CASE("vdi: read-only opens refuse writes, nil UUIDs are served only read-only") {
  auto file = make_file(2 * MiB);
  auto d = open(file, /*read_only=*/true);
  CHECK(!d->caps().writable);
  CHECK(!d->caps().fua);
  CHECK(!d->caps().trim);
  CHECK(!d->caps().zero);
  CHECK(!d->caps().fast_zero);
  for (int op = 0; op < 3; ++op) {
    const Error e = error_of([&] {
      if (op == 0) run(d->write(0, odd_pattern(1, 1), {}));
      if (op == 1) run(d->trim(0, MiB, {}));
      if (op == 2) run(d->zero(0, MiB, {}));
    });
    CHECK(e.errc() == std::errc::operation_not_permitted);
    CHECK(std::string(e.what()).starts_with("vdi: disk.vdi: "));
  }
  CHECK(header_of(*file).blocks_allocated == 0);

  vdi::Header h = header_of(*file);
  h.uuid_modify = Uuid{};
  put_header(*file, h);
  CHECK(open_error(file) ==
        "vdi: disk.vdi: header: uuidModify is nil (VirtualBox refuses such images); serve it "
        "read-only");
  CHECK(open(file, true)->size() == 2 * MiB);
}

TEST_CASE("vdi: damaged and unsupported images are refused, naming the file and the field") {
  SUBCASE("too short") {
    CHECK(open_error(open_memory(100, "disk.vdi")) ==
          "vdi: disk.vdi: file is 100 bytes, shorter than the 512-byte header (truncated?)");
  }
  SUBCASE("bad signature") {
    auto file = make_file(2 * MiB);
    run(file->write(0x40, std::vector<std::byte>(4), {}));
    const Error e = error_of([&] { open(file); });
    CHECK(e.errc() == std::errc::invalid_argument);
    CHECK(std::string(e.what()) ==
          "vdi: disk.vdi: header: signature 0x00000000 is not 0xbeda107f (not a VDI image)");
  }
  SUBCASE("block map entry past the end of the file") {
    auto file = make_file(4 * MiB);
    run(open(file)->write(0, odd_pattern(10, 1), {}));
    vdi::Header h = header_of(*file);
    h.blocks_allocated = 2;
    put_header(*file, h);
    put_map(*file, {0, vdi::entry_free, 1, vdi::entry_free});
    CHECK(open_error(file, true) ==
          "vdi: disk.vdi: block map entry 2 points past the end of the file (block 1 ends at "
          "0x200400, the file is 0x100400 bytes)");
  }
  SUBCASE("two entries point at the same block") {
    auto file = make_file(4 * MiB, vdi::ImageType::fixed);
    put_map(*file, {0, 1, 2, 1});
    CHECK(open_error(file) ==
          "vdi: disk.vdi: block map entries 1 and 3 point at the same block (1)");
  }
  SUBCASE("differencing, with no way to find the parent (vdi_differencing_test has the rest)") {
    auto file = make_file(2 * MiB, vdi::ImageType::differencing, MiB,
                          [](vdi::Header& h) { h.uuid_linkage = uuid(7); });
    const Error e = error_of([&] { open(file); });
    CHECK(e.errc() == std::errc::invalid_argument);
    CHECK(std::string(e.what()) ==
          "vdi: disk.vdi: differencing VDI needs its parent (uuidLinkage "
          "0708090a-0b0c-0d0e-0f10-111213141516), and nothing was given to look for it");
  }
  SUBCASE("undo") {
    auto file = make_file(2 * MiB, vdi::ImageType::undo);
    CHECK(open_error(file) == "vdi: disk.vdi: undo VDI images (type 3) are not supported");
  }
  SUBCASE("an entry at the header's count: the count did not reach the disk") {
    auto file = make_file(4 * MiB);
    auto d = open(file);
    run(d->write(0, odd_pattern(10, 1), {}));
    run(d->write(MiB, odd_pattern(10, 2), {}));
    vdi::Header h = header_of(*file);
    h.blocks_allocated = 1;  // entry 1 points at block 1
    put_header(*file, h);
    d = open(file);
    CHECK(read(*d, MiB, 10) == odd_pattern(10, 2));
    run(d->write(2 * MiB, odd_pattern(10, 3), {}));
    CHECK(map_of(*file) == std::vector<uint32_t>{0, 1, 2, vdi::entry_free});
    CHECK(header_of(*file).blocks_allocated == 3);
  }
  SUBCASE("an entry beyond the block count") {
    auto file = make_file(4 * MiB);
    put_map(*file, {vdi::entry_free, 4, vdi::entry_free, vdi::entry_free});
    CHECK(open_error(file) ==
          "vdi: disk.vdi: block map entry 1 points at block 4, beyond the 4 blocks of the image");
  }
  SUBCASE("leaked blocks are reported, not refused, and used for the next allocation") {
    auto file = make_file(2 * MiB);
    run(open(file)->write(0, odd_pattern(10, 1), {}));
    vdi::Header h = header_of(*file);
    h.blocks_allocated = 2;  // an allocation interrupted before its map entry
    put_header(*file, h);
    run(file->resize(data_at + 2 * MiB));
    run(file->write(data_at + MiB, odd_pattern(MiB, 3), {}));  // what it left behind
    auto rec = std::make_shared<RecordingDevice>(file);
    auto d = open(rec);
    rec->clear();
    run(d->write(MiB + 10, odd_pattern(10, 2), {}));
    // No new block, no new count: the leaked block is zeroed, written, and mapped.
    CHECK(rec->calls() == std::vector<std::string>{"write 0+512", "zero 1049600+1048576",
                                                   "write 1049610+10", "flush", "write 516+4"});
    CHECK(map_of(*file) == std::vector<uint32_t>{0, 1});
    CHECK(header_of(*file).blocks_allocated == 2);
    CHECK(file->size() == data_at + 2 * MiB);
    CHECK(all_zero(read(*d, MiB, 10)));
    CHECK(read(*d, MiB + 10, 10) == odd_pattern(10, 2));
    CHECK(all_zero(read(*d, MiB + 20, MiB - 20)));
  }
}

TEST_CASE("vdi: a failure at any step of an allocation leaves an image that opens") {
  // Open reads twice (header, block map); then each call of one allocating write fails in
  // turn, until the write goes through.
  for (int step = 1;; ++step) {
    CAPTURE(step);
    auto file = make_file(4 * MiB);
    auto faulty = std::make_shared<FaultyDevice>(file, 2 + step);
    auto d = open(faulty);
    REQUIRE(faulty->calls() == 2);
    bool failed = false;
    try {
      run(d->write(2 * MiB + 100, odd_pattern(5000, step), {}));
    } catch (const Error& e) {
      failed = true;
      CHECK(std::string(e.what()).find("injected failure") != std::string::npos);
    }
    // Whatever happened, the image opens and block 2 holds the data or zeroes.
    auto again = open(file);
    const auto back = read(*again, 2 * MiB + 100, 5000);
    CHECK((back == odd_pattern(5000, step) || all_zero(back)));
    if (!failed) {
      CHECK(back == odd_pattern(5000, step));
      CHECK(step > 5);
      break;
    }
    // The same device can carry on: a retry allocates a block that nothing else uses.
    run(d->write(2 * MiB + 100, odd_pattern(5000, step), {}));
    CHECK(read(*open(file), 2 * MiB + 100, 5000) == odd_pattern(5000, step));
    REQUIRE(step < 20);
  }
}
