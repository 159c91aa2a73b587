// Differencing VDI over memory leaves: a fake ParentFinder serves a "directory" of memory
// files by name. Chains read through, copy-up on partial writes, zero entries hiding the
// parent, extents, concurrent writers to one free block, the parent search (explicit,
// by UUID among siblings, mismatches, missing parents, loops, depth) and failures at each
// step of a copy-up.
#include "formats/vdi.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
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

std::vector<std::byte> cat(std::vector<std::byte> a, const std::vector<std::byte>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A directory of memory files, and a ParentFinder over it.
struct Directory {
  std::map<std::string, DevicePtr> files;
  std::vector<std::string> opened;  // names finder.open was asked for
  ParentFinder finder;

  explicit Directory(std::string explicit_parent = {}) {
    finder.open = [this](const std::string& name) -> asio::awaitable<DevicePtr> {
      opened.push_back(name);
      auto it = files.find(name);
      co_return it == files.end() ? nullptr : it->second;
    };
    finder.siblings = [this](const std::string&) {
      std::vector<std::string> names;
      for (const auto& [name, file] : files) names.push_back(name);
      return names;
    };
    finder.explicit_parent = std::move(explicit_parent);
  }

  // A new empty VDI named `name` with uuidCreate uuid(id) and uuidModify uuid(id + 100); a
  // differencing one when parent_id is given (uuidLinkage uuid(parent_id), uuidParentModify
  // the current uuidModify of the file here with that uuidCreate, else uuid(parent_id + 100)).
  DevicePtr add(const std::string& name, uint64_t disk, uint32_t block_size = MiB,
                int parent_id = -1, int id = 0) {
    const auto type = parent_id < 0 ? vdi::ImageType::dynamic : vdi::ImageType::differencing;
    vdi::Header h = vdi::new_header(disk, type, uuid(static_cast<uint8_t>(id)),
                                    uuid(static_cast<uint8_t>(id + 100)), block_size);
    if (parent_id >= 0) {
      h.uuid_linkage = uuid(static_cast<uint8_t>(parent_id));
      h.uuid_parent_modify = uuid(static_cast<uint8_t>(parent_id + 100));
      for (const auto& [other, file] : files) {
        if (file->size() < vdi::header_bytes) continue;
        const vdi::Header p = vdi::decode_header(read(*file, 0, vdi::header_bytes));
        if (p.uuid_create == h.uuid_linkage) h.uuid_parent_modify = p.uuid_modify;
      }
    }
    auto file = open_memory(h.data_offset, name);
    write_new_vdi(*file, h);
    files[name] = file;
    return file;
  }

  DevicePtr open(DevicePtr file, bool read_only = false) {
    return run(open_vdi(std::move(file), {.read_only = read_only, .parents = {.finder = &finder}}));
  }
  DevicePtr open(const std::string& name, bool read_only = false) {
    return open(files.at(name), read_only);
  }
  std::string open_error(const std::string& name) {
    const Error e = error_of([&] { open(name); });
    return e.what();
  }
};

// Writes `data` at `offset` of a base image (opened and closed again).
void fill(Directory& dir, const std::string& name, uint64_t offset,
          const std::vector<std::byte>& data) {
  run(dir.open(name)->write(offset, data, {}));
}

}  // namespace

TEST_CASE("vdi differencing: free blocks read from the parent, written blocks from the child") {
  Directory dir;
  dir.add("base.vdi", 4 * MiB, MiB, -1, 1);
  fill(dir, "base.vdi", 0, odd_pattern(2 * MiB, 1));  // blocks 0 and 1; 2 and 3 stay free
  dir.add("diff.vdi", 4 * MiB, MiB, 1, 2);
  auto d = dir.open("diff.vdi");
  CHECK(d->size() == 4 * MiB);
  CHECK(d->caps().writable);
  CHECK(read(*d, 0, 2 * MiB) == odd_pattern(2 * MiB, 1));
  CHECK(all_zero(read(*d, 2 * MiB, 2 * MiB)));
  CHECK(run(d->extents(0, 4 * MiB)) ==
        std::vector<Extent>{{2 * MiB, ExtentKind::data}, {2 * MiB, ExtentKind::hole}});

  // A partial write to a free block copies the rest of the block up from the parent.
  run(d->write(MiB / 2, odd_pattern(100, 2), {}));
  auto expect = odd_pattern(2 * MiB, 1);
  const auto p2 = odd_pattern(100, 2);
  std::copy(p2.begin(), p2.end(), expect.begin() + MiB / 2);
  CHECK(read(*d, 0, 2 * MiB) == expect);
  auto& file = *dir.files.at("diff.vdi");
  CHECK(map_of(file)[0] == 0);
  CHECK(read(file, data_at, MiB) == std::vector(expect.begin(), expect.begin() + MiB));
  // The parent is untouched; a reopened chain reads the same.
  CHECK(read(*dir.open("base.vdi", true), 0, 2 * MiB) == odd_pattern(2 * MiB, 1));
  CHECK(read(*dir.open("diff.vdi"), 0, 4 * MiB) == read(*d, 0, 4 * MiB));
  CHECK(run(d->extents(0, 4 * MiB)) ==
        std::vector<Extent>{{2 * MiB, ExtentKind::data}, {2 * MiB, ExtentKind::hole}});
}

TEST_CASE("vdi differencing: the copy-up order, and no copy where the parent holds nothing") {
  Directory dir;
  dir.add("base.vdi", 4 * MiB, MiB, -1, 1);
  fill(dir, "base.vdi", MiB, odd_pattern(MiB, 1));  // block 1 only
  auto child = dir.add("diff.vdi", 4 * MiB, MiB, 1, 2);
  auto rec = std::make_shared<RecordingDevice>(child);
  auto d = dir.open(rec);
  rec->clear();
  run(d->write(MiB + 4096, odd_pattern(4096, 2), {}));
  // uuidModify; grow; the parent's bytes before and after the piece; the piece; flush; the
  // header and map entry in one page.
  CHECK(rec->calls() == std::vector<std::string>{
                            "write 0+512",
                            "resize 1049600",
                            "write 1024+4096",
                            "write 9216+1040384",
                            "write 5120+4096",
                            "flush",
                            "write 0+520",
                        });
  auto expect = odd_pattern(MiB, 1);
  const auto p2 = odd_pattern(4096, 2);
  std::copy(p2.begin(), p2.end(), expect.begin() + 4096);
  CHECK(read(*d, MiB, MiB) == expect);

  // Block 2 is free in the parent too: nothing to copy.
  rec->clear();
  run(d->write(2 * MiB + 10, odd_pattern(10, 3), {}));
  CHECK(rec->calls() ==
        std::vector<std::string>{"resize 2098176", "write 1049610+10", "flush", "write 0+524"});
  CHECK(all_zero(read(*d, 2 * MiB, 10)));
  CHECK(read(*d, 2 * MiB + 10, 10) == odd_pattern(10, 3));

  // A whole-block write needs no parent data either.
  rec->clear();
  run(d->write(0, odd_pattern(MiB, 4), {}));
  CHECK(rec->calls() == std::vector<std::string>{"resize 3146752", "write 2098176+1048576", "flush",
                                                 "write 0+516"});
  CHECK(read(*d, 0, MiB) == odd_pattern(MiB, 4));
}

TEST_CASE("vdi differencing: a three-image chain matches a flat shadow, also reopened") {
  // 64 KiB blocks in the children, 128 KiB in the base: the chain does not need one size.
  const uint64_t disk = 2 * MiB;
  Directory dir;
  dir.add("base.vdi", disk, 128 * KiB, -1, 1);
  dir.add("mid.vdi", disk, 64 * KiB, 1, 2);
  dir.add("top.vdi", disk, 64 * KiB, 2, 3);
  std::vector<std::byte> shadow(disk);
  std::mt19937 rng(7);
  auto random_writes = [&](const std::string& name, int count, int seed) {
    auto d = dir.open(name);
    for (int i = 0; i < count; ++i) {
      const uint64_t at = rng() % disk;
      const std::size_t n = 1 + rng() % std::min<uint64_t>(100 * KiB, disk - at);
      if (i % 7 == 3) {
        run(d->zero(at, n, {}));
        std::fill_n(shadow.begin() + static_cast<std::ptrdiff_t>(at), n, std::byte{0});
      } else {
        const auto data = odd_pattern(n, seed + i);
        run(d->write(at, data, {}));
        std::copy(data.begin(), data.end(), shadow.begin() + static_cast<std::ptrdiff_t>(at));
      }
    }
    CHECK(read(*d, 0, disk) == shadow);
  };
  random_writes("base.vdi", 20, 100);
  const auto base_content = shadow;
  random_writes("mid.vdi", 30, 200);
  const auto mid_content = shadow;
  random_writes("top.vdi", 40, 300);
  CHECK(read(*dir.open("top.vdi", true), 0, disk) == shadow);
  CHECK(read(*dir.open("mid.vdi", true), 0, disk) == mid_content);
  CHECK(read(*dir.open("base.vdi", true), 0, disk) == base_content);
  // Every image of the chain still passes the block map checks with counts that match.
  for (const char* name : {"base.vdi", "mid.vdi", "top.vdi"}) {
    auto& file = *dir.files.at(name);
    const auto map = map_of(file);
    CAPTURE(name);
    CHECK(header_of(file).blocks_allocated ==
          std::count_if(map.begin(), map.end(), vdi::is_allocated));
  }
  // Extents of the top agree with the data: every byte outside data extents reads zero.
  auto top = dir.open("top.vdi", true);
  uint64_t at = 0;
  while (at < disk) {
    for (const Extent& e : run(top->extents(at, disk - at))) {
      if (e.kind != ExtentKind::data) {
        CHECK(all_zero(std::vector(shadow.begin() + static_cast<std::ptrdiff_t>(at),
                                   shadow.begin() + static_cast<std::ptrdiff_t>(at + e.length))));
      }
      at += e.length;
    }
  }
  CHECK(at == disk);
}

TEST_CASE("vdi differencing: zero hides the parent, trim may leave it visible") {
  Directory dir;
  dir.add("base.vdi", 4 * MiB, MiB, -1, 1);
  fill(dir, "base.vdi", 0, odd_pattern(4 * MiB, 1));
  auto child = dir.add("diff.vdi", 4 * MiB, MiB, 1, 2);
  auto d = dir.open("diff.vdi");

  SUBCASE("a whole free block becomes a zero entry; partial ones get a block") {
    run(d->zero(MiB / 2, 2 * MiB, {}));  // half of 0, all of 1, half of 2
    const auto map = map_of(*child);
    CHECK(map[1] == vdi::entry_zero);
    CHECK(vdi::is_allocated(map[0]));
    CHECK(vdi::is_allocated(map[2]));
    CHECK(map[3] == vdi::entry_free);
    const auto all = read(*d, 0, 4 * MiB);
    const auto base = odd_pattern(4 * MiB, 1);
    CHECK(std::equal(all.begin(), all.begin() + MiB / 2, base.begin()));
    CHECK(all_zero(std::vector(all.begin() + MiB / 2, all.begin() + 5 * MiB / 2)));
    CHECK(std::equal(all.begin() + 5 * MiB / 2, all.end(), base.begin() + 5 * MiB / 2));
    CHECK(run(d->extents(0, 4 * MiB)) == std::vector<Extent>{{MiB, ExtentKind::data},
                                                             {MiB, ExtentKind::hole},
                                                             {2 * MiB, ExtentKind::data}});
    CHECK(read(*dir.open("diff.vdi"), 0, 4 * MiB) == all);
  }
  SUBCASE("a fast zero that would copy up is refused; of whole blocks it is fine") {
    const Error e = error_of([&] { run(d->zero(100, 1000, {.fast = true})); });
    CHECK(e.errc() == std::errc::operation_not_supported);
    CHECK(map_of(*child)[0] == vdi::entry_free);
    const auto base = odd_pattern(4 * MiB, 1);
    CHECK(read(*d, 0, MiB) == std::vector(base.begin(), base.begin() + MiB));
    run(d->zero(MiB, MiB, {.fast = true}));
    CHECK(map_of(*child)[1] == vdi::entry_zero);
  }
  SUBCASE("a whole block of zeroes written is a zero entry too") {
    run(d->write(3 * MiB, std::vector<std::byte>(MiB), {}));
    CHECK(map_of(*child)[3] == vdi::entry_zero);
    CHECK(all_zero(read(*d, 3 * MiB, MiB)));
    CHECK(header_of(*child).blocks_allocated == 0);
  }
  SUBCASE("trim of free blocks changes nothing") {
    run(d->trim(0, 4 * MiB, {}));
    CHECK(map_of(*child) == std::vector<uint32_t>(4, vdi::entry_free));
    CHECK(read(*d, 0, 4 * MiB) == odd_pattern(4 * MiB, 1));
  }
  SUBCASE("zero over a parent that holds nothing there needs no block") {
    Directory empty;
    empty.add("base.vdi", 4 * MiB, MiB, -1, 1);
    auto c = empty.add("diff.vdi", 4 * MiB, MiB, 1, 2);
    run(empty.open("diff.vdi")->zero(100, 1000, {}));
    CHECK(map_of(*c) == std::vector<uint32_t>(4, vdi::entry_free));
  }
}

TEST_CASE("vdi differencing: concurrent writers to one free block copy up once") {
  Directory dir;
  dir.add("base.vdi", 4 * MiB, MiB, -1, 1);
  fill(dir, "base.vdi", 0, odd_pattern(4 * MiB, 9));
  auto child = dir.add("diff.vdi", 4 * MiB, MiB, 1, 2);
  auto rec = std::make_shared<RecordingDevice>(child, /*yield=*/true);
  auto d = dir.open(rec);
  constexpr int threads = 4, writers = 24;
  std::vector<std::unique_ptr<asio::io_context>> contexts;
  for (int t = 0; t < threads; ++t) contexts.push_back(std::make_unique<asio::io_context>(1));
  std::atomic<int> ok{0};
  auto at_of = [](int i) { return 2 * MiB + static_cast<uint64_t>(i) * 16 * KiB + 100; };
  for (int i = 0; i < writers; ++i) {
    asio::co_spawn(
        *contexts[i % threads],
        [d, at = at_of(i), i]() -> asio::awaitable<void> {
          co_await d->write(at, odd_pattern(4096, i), {});
        },
        [&ok](std::exception_ptr e) {
          if (!e) ++ok;
        });
  }
  std::vector<std::thread> pool;
  for (auto& c : contexts) pool.emplace_back([&c] { c->run(); });
  for (auto& t : pool) t.join();
  CHECK(ok == writers);
  const auto calls = rec->calls();
  CHECK(std::count_if(calls.begin(), calls.end(),
                      [](const std::string& c) { return c.starts_with("resize"); }) == 1);
  CHECK(header_of(*child).blocks_allocated == 1);
  auto expect = odd_pattern(4 * MiB, 9);
  for (int i = 0; i < writers; ++i) {
    const auto p = odd_pattern(4096, i);
    std::copy(p.begin(), p.end(), expect.begin() + static_cast<std::ptrdiff_t>(at_of(i)));
  }
  CHECK(read(*dir.open("diff.vdi", true), 0, 4 * MiB) == expect);
}

TEST_CASE("vdi differencing: the parent is found by UUID next to the image, or named") {
  Directory dir;
  dir.add("a-other.vdi", 4 * MiB, MiB, -1, 5);
  dir.files["notes.txt"] = open_memory(100, "notes.txt");
  dir.files["raw.img"] = open_memory(MiB, "raw.img");
  dir.add("base.vdi", 4 * MiB, MiB, -1, 1);
  fill(dir, "base.vdi", 0, odd_pattern(10, 1));
  dir.add("diff.vdi", 4 * MiB, MiB, 1, 2);
  CHECK(read(*dir.open("diff.vdi"), 0, 10) == odd_pattern(10, 1));

  SUBCASE("--parent names it; the siblings are not searched") {
    Directory named("base.vdi");
    named.files = dir.files;
    CHECK(read(*named.open("diff.vdi"), 0, 10) == odd_pattern(10, 1));
    CHECK(named.opened == std::vector<std::string>{"base.vdi"});
  }
  SUBCASE("a --parent with another UUID is an error, not a fallback") {
    Directory named("a-other.vdi");
    named.files = dir.files;
    CHECK(named.open_error("diff.vdi") ==
          "vdi: diff.vdi: --parent a-other.vdi is not its parent: uuidCreate "
          "05060708-090a-0b0c-0d0e-0f1011121314 (the parent has uuidCreate "
          "01020304-0506-0708-090a-0b0c0d0e0f10)");
  }
  SUBCASE("a --parent that is no VDI, or is not there") {
    Directory named("notes.txt");
    named.files = dir.files;
    CHECK(named.open_error("diff.vdi").find("--parent notes.txt is not its parent: not a VDI") !=
          std::string::npos);
    named.finder.explicit_parent = "missing.vdi";
    const Error e = error_of([&] { named.open("diff.vdi"); });
    CHECK(e.errc() == std::errc::no_such_file_or_directory);
    CHECK(std::string(e.what()).find("--parent missing.vdi is not its parent: not found") !=
          std::string::npos);
  }
  SUBCASE("--parent applies to the top image only: deeper parents are searched") {
    dir.add("top.vdi", 4 * MiB, MiB, 2, 3);
    Directory named("diff.vdi");
    named.files = dir.files;
    CHECK(read(*named.open("top.vdi"), 0, 10) == odd_pattern(10, 1));
  }
  SUBCASE("a missing parent: the message lists what was searched") {
    dir.files.erase("base.vdi");
    const Error e = error_of([&] { dir.open("diff.vdi"); });
    CHECK(e.errc() == std::errc::no_such_file_or_directory);
    CHECK(std::string(e.what()) ==
          "vdi: diff.vdi: parent not found: no image with uuidCreate "
          "01020304-0506-0708-090a-0b0c0d0e0f10 (its uuidLinkage) next to it; name it with "
          "--parent. Searched 4 files: a-other.vdi: uuidCreate "
          "05060708-090a-0b0c-0d0e-0f1011121314; diff.vdi: uuidCreate "
          "02030405-0607-0809-0a0b-0c0d0e0f1011; notes.txt: not a VDI; raw.img: not a VDI");
  }
  SUBCASE("without a finder a differencing image is refused") {
    const Error e = error_of([&] { run(open_vdi(dir.files.at("diff.vdi"), {})); });
    CHECK(e.errc() == std::errc::invalid_argument);
    CHECK(std::string(e.what()) ==
          "vdi: diff.vdi: differencing VDI needs its parent (uuidLinkage "
          "01020304-0506-0708-090a-0b0c0d0e0f10), and nothing was given to look for it");
  }
  SUBCASE("copies of the parent: the one with the recorded uuidModify wins") {
    // A copy with the same uuidCreate that was modified since (another uuidModify) sorts
    // first; the original is still the one used.
    auto copy = dir.add("a-copy.vdi", 4 * MiB, MiB, -1, 1);
    vdi::Header h = header_of(*copy);
    h.uuid_modify = uuid(77);
    put_header(*copy, h);
    CHECK(read(*dir.open("diff.vdi"), 0, 10) == odd_pattern(10, 1));
    // Without the original, the modified copy is used (with a warning).
    dir.files.erase("base.vdi");
    CHECK(all_zero(read(*dir.open("diff.vdi"), 0, 10)));
  }
}

TEST_CASE("vdi differencing: loops, depth and sizes are refused") {
  SUBCASE("an image that is its own parent") {
    Directory dir;
    dir.add("self.vdi", 2 * MiB, MiB, 4, 4);
    CHECK(dir.open_error("self.vdi") == "vdi: self.vdi: parent loop: self.vdi -> self.vdi");
  }
  SUBCASE("two images that are each other's parent") {
    Directory dir;
    dir.add("a.vdi", 2 * MiB, MiB, 2, 1);
    dir.add("b.vdi", 2 * MiB, MiB, 1, 2);
    CHECK(dir.open_error("a.vdi") == "vdi: b.vdi: parent loop: a.vdi -> b.vdi -> a.vdi");
  }
  SUBCASE("a chain deeper than max_parent_depth") {
    Directory dir;
    dir.add("base.vdi", 2 * MiB, MiB, -1, 1);
    dir.add("diff.vdi", 2 * MiB, MiB, 1, 2);
    ParentChain deep{.finder = &dir.finder, .names = std::vector<std::string>(64, "x.vdi")};
    const Error e = error_of([&] { run(open_vdi(dir.files.at("diff.vdi"), {.parents = deep})); });
    CHECK(std::string(e.what()).starts_with(
        "vdi: diff.vdi: the parent chain is deeper than 64 images (a loop?): x.vdi -> "));
    deep.names.resize(63);
    CHECK(run(open_vdi(dir.files.at("diff.vdi"), {.parents = deep}))->size() == 2 * MiB);
  }
  SUBCASE("a parent larger than the child is refused; a smaller one reads zeroes past its end") {
    Directory dir;
    dir.add("big.vdi", 4 * MiB, MiB, -1, 1);
    dir.add("diff.vdi", 2 * MiB, MiB, 1, 2);
    CHECK(dir.open_error("diff.vdi") ==
          "vdi: diff.vdi: its parent big.vdi is 4194304 bytes, larger than the differencing "
          "image (2097152 bytes)");

    Directory grown;
    grown.add("base.vdi", 2 * MiB, MiB, -1, 1);
    fill(grown, "base.vdi", 0, odd_pattern(2 * MiB, 1));
    grown.add("diff.vdi", 3 * MiB, MiB, 1, 2);
    auto d = grown.open("diff.vdi");
    CHECK(d->size() == 3 * MiB);
    CHECK(read(*d, 0, 2 * MiB) == odd_pattern(2 * MiB, 1));
    CHECK(all_zero(read(*d, 2 * MiB, MiB)));
    CHECK(run(d->extents(0, 3 * MiB)) ==
          std::vector<Extent>{{2 * MiB, ExtentKind::data}, {MiB, ExtentKind::hole}});
    run(d->write(2 * MiB + 10, odd_pattern(10, 2), {}));
    CHECK(cat(read(*d, 2 * MiB, 10), read(*d, 2 * MiB + 10, 10)) ==
          cat(std::vector<std::byte>(10), odd_pattern(10, 2)));
  }
  SUBCASE("the parent is opened read-only, whatever the child") {
    Directory dir;
    dir.add("base.vdi", 2 * MiB, MiB, -1, 1);
    auto child = dir.add("diff.vdi", 2 * MiB, MiB, 1, 2);
    auto d = dir.open("diff.vdi");
    run(d->write(0, odd_pattern(MiB, 3), {}));
    CHECK(header_of(*dir.files.at("base.vdi")).uuid_modify == uuid(101));  // unchanged
    CHECK(header_of(*child).uuid_modify != uuid(102));
  }
}

TEST_CASE("vdi differencing: a failure at any step of a copy-up leaves an image that opens") {
  for (int step = 1;; ++step) {
    CAPTURE(step);
    Directory dir;
    dir.add("base.vdi", 4 * MiB, MiB, -1, 1);
    fill(dir, "base.vdi", 0, odd_pattern(4 * MiB, 1));
    auto child = dir.add("diff.vdi", 4 * MiB, MiB, 1, 2);
    auto faulty = std::make_shared<FaultyDevice>(child, 2 + step);
    auto d = dir.open(faulty);
    REQUIRE(faulty->calls() == 2);
    bool failed = false;
    try {
      run(d->write(2 * MiB + 100, odd_pattern(5000, step), {}));
    } catch (const Error& e) {
      failed = true;
      CHECK(std::string(e.what()).find("injected failure") != std::string::npos);
    }
    // Whatever happened, the block reads as the parent's or as the parent's with the write.
    auto base = odd_pattern(4 * MiB, 1);
    const std::vector<std::byte> before(base.begin() + 2 * MiB, base.begin() + 3 * MiB);
    auto after = before;
    const auto p = odd_pattern(5000, step);
    std::copy(p.begin(), p.end(), after.begin() + 100);
    const auto back = read(*dir.open("diff.vdi"), 2 * MiB, MiB);
    CHECK((back == before || back == after));
    if (!failed) {
      CHECK(back == after);
      CHECK(step > 6);
      break;
    }
    run(d->write(2 * MiB + 100, odd_pattern(5000, step), {}));
    CHECK(read(*dir.open("diff.vdi"), 2 * MiB, MiB) == after);
    REQUIRE(step < 20);
  }
}
