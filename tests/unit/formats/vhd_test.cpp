// The VHD layer over the memory leaf, with images built by our own serialiser: fixed and
// dynamic reads and writes, allocation (its order, its file layout, concurrent writers to
// one block on several threads, failures at every step), bitmaps written by other tools,
// trim/zero, extents, and every refusal at open.
#include "formats/vhd.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/open_image.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/faulty_device.hpp"
#include "tests/unit/support/image_helpers.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::FaultyDevice;
using imagenbd::test::run;
using namespace std::literals;
namespace vhd = imagenbd::formats::vhd;
namespace asio = boost::asio;

using imagenbd::test::error_of;
using imagenbd::test::pattern;

namespace {

constexpr uint64_t KiB = 1 << 10;
constexpr uint64_t MiB = 1 << 20;

using Bytes = std::vector<std::byte>;

Bytes read(BlockDevice& d, uint64_t offset, std::size_t n) {
  Bytes v(n);
  run(d.read(offset, v));
  return v;
}

Bytes whole(BlockDevice& d) {
  return read(d, 0, d.size());
}

DevicePtr memory_with(const Bytes& bytes, std::string label = "disk.vhd") {
  auto m = open_memory(bytes.size(), std::move(label));
  run(m->write(0, bytes, {}));
  return m;
}

bool is_zero(std::span<const std::byte> s) {
  return std::all_of(s.begin(), s.end(), [](std::byte b) { return b == std::byte{0}; });
}

DevicePtr open(DevicePtr child, VhdOptions options = {}) {
  return run(open_vhd(std::move(child), options));
}

// A dynamic VHD file laid out as qemu does (footer copy, header at 0x200, BAT at 0x600, blocks,
// footer), with blocks added as another tool would write them.
struct DynamicFile {
  vhd::Footer footer;
  vhd::DynamicHeader header;
  std::vector<uint32_t> bat;
  Bytes blocks;  // every block, bitmap and data, from first_block()

  explicit DynamicFile(uint64_t size, uint32_t block_size = 2 * MiB) {
    footer.data_offset = 0x200;
    footer.current_size = footer.original_size = size;
    footer.geometry = vhd::max_geometry;
    footer.disk_type = static_cast<uint32_t>(vhd::DiskType::dynamic);
    footer.unique_id = imagenbd::formats::Uuid{{0x5a, 0x4a}};
    header.table_offset = 0x600;
    header.block_size = block_size;
    header.max_table_entries = static_cast<uint32_t>((size + block_size - 1) / block_size);
    bat.assign(header.max_table_entries, vhd::bat_unused);
  }
  // From the entries we hold, not from the header, which a test may make lie.
  uint64_t bat_bytes() const { return (uint64_t{bat.size()} * 4 + 511) / 512 * 512; }
  uint64_t first_block() const { return 0x600 + bat_bytes(); }
  uint32_t bitmap_bytes() const { return vhd::bitmap_bytes_for(header.block_size); }
  uint64_t span() const { return bitmap_bytes() + header.block_size; }

  // Appends virtual block `index`: its data all `fill` (absent sectors too, which the spec
  // says should hold zeroes: they must read as zeroes anyway), bits where `present` says.
  void add_block(uint32_t index, uint8_t fill, const std::function<bool(uint32_t)>& present) {
    const uint64_t at = first_block() + blocks.size();
    bat[index] = static_cast<uint32_t>(at / 512);
    Bytes block(span(), std::byte{fill});
    std::memset(block.data(), 0, bitmap_bytes());
    for (uint32_t k = 0; k < header.block_size / 512; ++k) {
      if (present(k)) block[k / 8] |= vhd::bitmap_mask(k);
    }
    blocks.insert(blocks.end(), block.begin(), block.end());
  }

  Bytes bytes() const {
    const auto f = vhd::encode_footer(footer);
    const auto h = vhd::encode_dynamic_header(header);
    Bytes out(f.begin(), f.end());
    out.insert(out.end(), h.begin(), h.end());
    const Bytes b = vhd::encode_bat(bat, bat_bytes());
    out.insert(out.end(), b.begin(), b.end());
    out.insert(out.end(), blocks.begin(), blocks.end());
    out.insert(out.end(), f.begin(), f.end());
    return out;
  }
  DevicePtr device(std::string label = "disk.vhd") const { return memory_with(bytes(), label); }
};

Bytes fixed_file(const Bytes& data, std::array<char, 4> creator = {'i', 'n', 'b', 'd'},
                 vhd::Geometry geometry = vhd::max_geometry) {
  vhd::Footer f;
  f.current_size = f.original_size = data.size();
  f.geometry = geometry;
  f.creator_app = creator;
  Bytes out = data;
  const auto footer = vhd::encode_footer(f);
  out.insert(out.end(), footer.begin(), footer.end());
  return out;
}

uint32_t load_be32(const Bytes& b, uint64_t at) {
  return std::to_integer<uint32_t>(b[at]) << 24 | std::to_integer<uint32_t>(b[at + 1]) << 16 |
         std::to_integer<uint32_t>(b[at + 2]) << 8 | std::to_integer<uint32_t>(b[at + 3]);
}

// Yields to the executor before every call, so that concurrent coroutines interleave at
// each I/O (the memory leaf would complete inline).
class YieldingDevice final : public BlockDevice {
 public:
  explicit YieldingDevice(DevicePtr child) : child_(std::move(child)) {}
  std::string_view name() const override { return "yielding"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return child_->size(); }
  Caps caps() const override { return child_->caps(); }
  asio::awaitable<void> read(uint64_t o, std::span<std::byte> out) override {
    co_await yield();
    co_await child_->read(o, out);
  }
  asio::awaitable<void> write(uint64_t o, std::span<const std::byte> in, WriteFlags f) override {
    co_await yield();
    co_await child_->write(o, in, f);
  }
  asio::awaitable<void> flush() override {
    co_await yield();
    co_await child_->flush();
  }
  asio::awaitable<void> trim(uint64_t o, uint64_t n, WriteFlags f) override {
    co_await yield();
    co_await child_->trim(o, n, f);
  }
  asio::awaitable<void> zero(uint64_t o, uint64_t n, WriteFlags f) override {
    co_await yield();
    co_await child_->zero(o, n, f);
  }
  asio::awaitable<std::vector<Extent>> extents(uint64_t o, uint64_t n) override {
    co_await yield();
    co_return co_await child_->extents(o, n);
  }
  asio::awaitable<void> prefetch(uint64_t o, uint64_t n) override {
    co_await child_->prefetch(o, n);
  }
  asio::awaitable<void> resize(uint64_t n) override {
    co_await yield();
    co_await child_->resize(n);
  }

 private:
  static asio::awaitable<void> yield() {
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  }
  DevicePtr child_;
};

// Records the calls that change the child: "resize 0x…", "write 0x… +n [fua]", "flush".
class RecordingDevice final : public BlockDevice {
 public:
  explicit RecordingDevice(DevicePtr child) : child_(std::move(child)) {}
  std::vector<std::string> calls;
  std::string_view name() const override { return "recording"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return child_->size(); }
  Caps caps() const override { return child_->caps(); }
  asio::awaitable<void> read(uint64_t o, std::span<std::byte> out) override {
    co_await child_->read(o, out);
  }
  asio::awaitable<void> write(uint64_t o, std::span<const std::byte> in, WriteFlags f) override {
    calls.push_back(fmt::format("write 0x{:x} +{}{}", o, in.size(), f.fua ? " fua" : ""));
    co_await child_->write(o, in, f);
  }
  asio::awaitable<void> flush() override {
    calls.push_back("flush");
    co_await child_->flush();
  }
  asio::awaitable<void> trim(uint64_t o, uint64_t n, WriteFlags f) override {
    calls.push_back(fmt::format("trim 0x{:x} +{}", o, n));
    co_await child_->trim(o, n, f);
  }
  asio::awaitable<void> zero(uint64_t o, uint64_t n, WriteFlags f) override {
    calls.push_back(fmt::format("zero 0x{:x} +{}", o, n));
    co_await child_->zero(o, n, f);
  }
  asio::awaitable<std::vector<Extent>> extents(uint64_t o, uint64_t n) override {
    co_return co_await child_->extents(o, n);
  }
  asio::awaitable<void> prefetch(uint64_t o, uint64_t n) override {
    co_await child_->prefetch(o, n);
  }
  asio::awaitable<void> resize(uint64_t n) override {
    calls.push_back(fmt::format("resize 0x{:x}", n));
    co_await child_->resize(n);
  }

 private:
  DevicePtr child_;
};

// Applies random writes, zeroes and trims to `disk` and to `model` alike, checking reads
// along the way. Requests are unaligned, cross blocks, and carry random flags.
void random_workload(BlockDevice& disk, Bytes& model, unsigned seed, int operations) {
  std::mt19937_64 random(seed);
  const uint64_t size = disk.size();
  auto pick = [&](uint64_t n) { return random() % n; };
  for (int op = 0; op < operations; ++op) {
    const uint64_t offset = pick(size);
    const uint64_t length =
        1 + pick(std::min<uint64_t>(size - offset, pick(4) == 0 ? 300 * KiB : 9000));
    const WriteFlags flags{.fua = pick(2) == 0, .no_hole = pick(3) == 0};
    const uint64_t kind = pick(10);
    CAPTURE(op);
    CAPTURE(offset);
    CAPTURE(length);
    if (kind < 6) {
      const Bytes data = pattern(length, static_cast<uint8_t>(random()));
      run(disk.write(offset, data, flags));
      std::memcpy(model.data() + offset, data.data(), length);
    } else {
      // trim leaves unspecified contents; over the memory leaf they read as zeroes.
      if (kind < 9) {
        run(disk.zero(offset, length, flags));
      } else {
        run(disk.trim(offset, length, flags));
      }
      std::memset(model.data() + offset, 0, length);
    }
    const uint64_t check_at = pick(size);
    const uint64_t check_length = 1 + pick(std::min<uint64_t>(size - check_at, 100 * KiB));
    REQUIRE(read(disk, check_at, check_length) ==
            Bytes(model.begin() + check_at, model.begin() + check_at + check_length));
  }
  REQUIRE(whole(disk) == model);
}

}  // namespace

TEST_CASE("vhd fixed: the bytes before the footer") {
  const Bytes data = pattern(4 * MiB, 1);
  auto child = memory_with(fixed_file(data));
  auto disk = open(child);
  CHECK(disk->name() == "vhd");
  CHECK(disk->describe() == "disk.vhd");
  CHECK(disk->size() == 4 * MiB);
  const Caps c = disk->caps();
  CHECK((c.writable && c.fua && c.trim && c.zero && c.extents && c.multi_conn));
  CHECK(c.block_min == 1);
  CHECK(whole(*disk) == data);

  const Bytes footer = read(*child, 4 * MiB, 512);
  run(disk->write(4 * MiB - 1000, pattern(1000, 9), {.fua = true}));
  run(disk->zero(0, 64 * KiB, {}));
  run(disk->trim(MiB, 64 * KiB, {}));
  run(disk->flush());
  CHECK(read(*disk, 4 * MiB - 1000, 1000) == pattern(1000, 9));
  CHECK(is_zero(read(*disk, 0, 64 * KiB)));
  CHECK(read(*child, 4 * MiB, 512) == footer);  // never touched
  CHECK(run(disk->extents(0, 4 * MiB)) == run(child->extents(0, 4 * MiB)));
  run(disk->prefetch(0, MiB));

  auto ro = open(child, {.read_only = true});
  CHECK(!ro->caps().writable);
  CHECK(!ro->caps().fua);
  const Error e = error_of([&] { run(ro->write(0, pattern(10, 1), {})); });
  CHECK(e.errc() == std::errc::operation_not_permitted);
  CHECK(std::string(e.what()) == "vhd: disk.vhd: write on a read-only image");
  CHECK(error_of([&] { run(ro->zero(0, 512, {})); }).errc() == std::errc::operation_not_permitted);
  CHECK(error_of([&] { run(ro->trim(0, 512, {})); }).errc() == std::errc::operation_not_permitted);
}

TEST_CASE("vhd fixed: file size against current_size") {
  Bytes file = fixed_file(pattern(MiB, 2));
  SUBCASE("more bytes than needed: served, with a warning") {
    file.insert(file.begin() + MiB, 4096, std::byte{0x55});
    CHECK(open(memory_with(file))->size() == MiB);
  }
  SUBCASE("fewer: refused") {
    file.erase(file.begin(), file.begin() + 4096);
    const Error e = error_of([&] { open(memory_with(file)); });
    CHECK(std::string(e.what()) ==
          "vhd: disk.vhd: footer: current_size 1048576 does not fit in the file (the data of a "
          "fixed disk must end by the footer at 0xff000; truncated?)");
  }
}

TEST_CASE("vhd: the size policy (formats.md §1.10)") {
  // 20 MiB with the spec's geometry 602/4/17 = 20,959,232 bytes.
  const Bytes data(20 * MiB);
  const vhd::Geometry chs{602, 4, 17};
  CHECK(open(memory_with(fixed_file(data, {'w', 'a', 0, 0}, chs)))->size() == 20 * MiB);
  CHECK(open(memory_with(fixed_file(data, {'w', 'i', 'n', ' '}, chs)))->size() == 20 * MiB);
  auto qemu = memory_with(fixed_file(data, {'q', 'e', 'm', 'u'}, chs));
  CHECK(open(qemu)->size() == 20959232);
  CHECK(open(qemu, {.size = vhd::SizePolicy::current_size})->size() == 20 * MiB);
  CHECK(open(memory_with(fixed_file(data, {'w', 'a', 0, 0}, chs)), {.size = vhd::SizePolicy::chs})
            ->size() == 20959232);
}

TEST_CASE("vhd dynamic: an empty image") {
  DynamicFile file(10 * MiB);
  auto child = file.device();
  auto disk = open(child);
  CHECK(disk->name() == "vhd");
  CHECK(disk->size() == 10 * MiB);
  const Caps c = disk->caps();
  CHECK((c.writable && c.flush && c.fua && c.trim && c.zero && c.fast_zero && c.extents &&
         c.multi_conn));
  CHECK(c.block_min == 1);
  CHECK(is_zero(whole(*disk)));
  CHECK(run(disk->extents(0, 10 * MiB)) == std::vector<Extent>{{10 * MiB, ExtentKind::hole}});
  CHECK(run(disk->extents(3 * MiB, 100)) == std::vector<Extent>{{100, ExtentKind::hole}});
  // Zeroes and trims of unallocated blocks change nothing.
  run(disk->zero(0, 10 * MiB, {}));
  run(disk->trim(0, 10 * MiB, {}));
  run(disk->zero(MiB, 4 * MiB, {.no_hole = true}));
  CHECK(child->size() == file.bytes().size());
  CHECK(whole(*child) == file.bytes());
}

TEST_CASE("vhd dynamic: the first write allocates a block at the end, in the safe order") {
  DynamicFile file(10 * MiB);
  const Bytes before = file.bytes();
  const uint64_t old_size = before.size();  // 0x800 + 512: 2560
  auto memory = file.device();
  auto recording = std::make_shared<RecordingDevice>(memory);
  auto disk = open(recording);

  const Bytes data = pattern(4096, 3);
  run(disk->write(3 * MiB + 4096, data, {.fua = true}));  // block 1

  // Right after the old footer would do; the block goes 3 sectors further, so that its data
  // starts on a 4 KiB boundary.
  const uint64_t start = 4096 - 512;
  REQUIRE(old_size - 512 == 2048);
  const uint64_t new_size = start + 512 + 2 * MiB + 512;
  CHECK(recording->calls ==
        std::vector<std::string>{
            fmt::format("resize 0x{:x}", new_size),
            fmt::format("write 0x{:x} +512", new_size - 512),             // footer at the new end
            fmt::format("write 0x{:x} +512", start),                      // the bitmap
            fmt::format("write 0x{:x} +4096", start + 512 + MiB + 4096),  // data
            "flush",
            "write 0x600 +512 fua",  // the BAT sector, last
        });

  const Bytes after = whole(*memory);
  REQUIRE(after.size() == new_size);
  // Both footers as they were; the BAT entry; a full bitmap; the data; zeroes elsewhere.
  CHECK(Bytes(after.begin(), after.begin() + 0x600) ==
        Bytes(before.begin(), before.begin() + 0x600));
  CHECK(Bytes(after.end() - 512, after.end()) == Bytes(before.end() - 512, before.end()));
  CHECK(Bytes(after.begin() + 2048, after.begin() + 2560) ==
        Bytes(before.end() - 512, before.end()));
  CHECK(is_zero(std::span(after).subspan(2560, start - 2560)));  // the padding
  CHECK(load_be32(after, 0x600) == vhd::bat_unused);
  CHECK(load_be32(after, 0x604) == start / 512);
  CHECK(load_be32(after, 0x608) == vhd::bat_unused);
  CHECK(std::all_of(after.begin() + start, after.begin() + start + 512,
                    [](std::byte b) { return b == std::byte{0xFF}; }));
  CHECK(Bytes(after.begin() + start + 512 + MiB + 4096, after.begin() + start + 512 + MiB + 8192) ==
        data);
  CHECK(is_zero(std::span(after).subspan(start + 512, MiB + 4096)));

  CHECK(read(*disk, 3 * MiB + 4096, 4096) == data);
  CHECK(is_zero(read(*disk, 2 * MiB, MiB + 4096)));
  CHECK(run(disk->extents(0, 10 * MiB)) == std::vector<Extent>{{2 * MiB, ExtentKind::hole},
                                                               {2 * MiB, ExtentKind::data},
                                                               {6 * MiB, ExtentKind::hole}});
  // A second write to the block goes in place: no metadata.
  recording->calls.clear();
  run(disk->write(3 * MiB, data, {}));
  CHECK(recording->calls ==
        std::vector<std::string>{fmt::format("write 0x{:x} +4096", start + 512 + MiB)});

  // Another process sees the same.
  auto again = open(memory);
  CHECK(read(*again, 3 * MiB, 4096) == data);
  CHECK(read(*again, 3 * MiB + 4096, 4096) == data);
  CHECK(is_zero(read(*again, 0, 3 * MiB)));
}

TEST_CASE("vhd dynamic: blocks under 64 KiB are not padded to align their data") {
  DynamicFile file(MiB, 32 * KiB);
  auto memory = file.device();
  auto disk = open(memory);
  run(disk->write(40 * KiB, pattern(100, 1), {}));
  run(disk->write(0, pattern(100, 2), {}));
  CHECK(memory->size() == 2048 + 2 * (32 * KiB + 512) + 512);
  CHECK(load_be32(whole(*memory), 0x600) == (2048 + 32 * KiB + 512) / 512);
  CHECK(load_be32(whole(*memory), 0x604) == 2048 / 512);
  CHECK(read(*open(memory), 40 * KiB, 100) == pattern(100, 1));
}

TEST_CASE("vhd dynamic: writes crossing blocks, unaligned, at the end of the disk") {
  // 5 MiB + 1 KiB: the last block holds only 1 KiB of the disk, but takes a whole block.
  DynamicFile file(5 * MiB + KiB);
  auto memory = file.device();
  auto disk = open(memory);
  Bytes model(disk->size());
  const Bytes a = pattern(3 * MiB + 333, 4);
  run(disk->write(MiB + 77, a, {}));
  std::memcpy(model.data() + MiB + 77, a.data(), a.size());
  const Bytes tail = pattern(KiB + 100, 5);
  run(disk->write(5 * MiB - 100, tail, {}));
  std::memcpy(model.data() + 5 * MiB - 100, tail.data(), tail.size());
  CHECK(whole(*disk) == model);
  // The first block at 4096 - 512, each data area 4 KiB aligned: 3584 bytes of padding.
  CHECK(file.bytes().size() == 2560);
  CHECK(memory->size() == 3 * (2 * MiB + 4096) + 512);
  CHECK(whole(*open(memory)) == model);
}

TEST_CASE("vhd dynamic: random workload against a model, then reopened") {
  // Small blocks (64 KiB: 128 sectors, bitmap padded to 512 bytes) to cross many of them.
  DynamicFile file(8 * MiB + 3 * 512, 64 * KiB);
  auto memory = file.device();
  auto disk = open(memory);
  Bytes model(disk->size());
  random_workload(*disk, model, 7, 400);
  CHECK(whole(*open(memory)) == model);
}

TEST_CASE("vhd dynamic: blocks written by other tools, with partial bitmaps") {
  DynamicFile file(4 * MiB, 64 * KiB);
  // Block 1: sectors 0-7 and 100 present. Block 3: everything present. Block 5: nothing.
  file.add_block(1, 0xAB, [](uint32_t k) { return k < 8 || k == 100; });
  file.add_block(3, 0xCD, [](uint32_t) { return true; });
  file.add_block(5, 0xEF, [](uint32_t) { return false; });
  auto memory = file.device();
  auto disk = open(memory);
  Bytes model(disk->size());
  std::memset(model.data() + 64 * KiB, 0xAB, 4 * KiB);
  std::memset(model.data() + 64 * KiB + 100 * 512, 0xAB, 512);
  std::memset(model.data() + 3 * 64 * KiB, 0xCD, 64 * KiB);
  REQUIRE(whole(*disk) == model);
  CHECK(run(disk->extents(0, 6 * 64 * KiB)) == std::vector<Extent>{{64 * KiB, ExtentKind::hole},
                                                                   {64 * KiB, ExtentKind::data},
                                                                   {64 * KiB, ExtentKind::hole},
                                                                   {64 * KiB, ExtentKind::data},
                                                                   {64 * KiB, ExtentKind::hole},
                                                                   {64 * KiB, ExtentKind::data}});

  SUBCASE("an unaligned write into absent sectors reads back over zeroes") {
    const uint64_t at = 64 * KiB + 20 * 512 + 100;  // block 1, sector 20
    const Bytes data = pattern(1000, 6);
    auto recording = std::make_shared<RecordingDevice>(memory);
    auto d = open(recording);
    run(d->write(at, data, {.fua = true}));
    std::memcpy(model.data() + at, data.data(), data.size());
    CHECK(whole(*d) == model);
    // Sectors 20-22 written whole (from zeroes), then the bitmap sector.
    const uint64_t block = file.first_block();
    CHECK(recording->calls ==
          std::vector<std::string>{fmt::format("write 0x{:x} +1536 fua", block + 512 + 20 * 512),
                                   fmt::format("write 0x{:x} +512 fua", block)});
    const Bytes bitmap = read(*memory, block, 512);
    CHECK(bitmap[0] == std::byte{0xFF});
    CHECK(bitmap[2] == std::byte{0x0E});   // sectors 20, 21, 22
    CHECK(bitmap[12] == std::byte{0x08});  // sector 100
    CHECK(whole(*open(memory)) == model);
  }
  SUBCASE("random workload") {
    random_workload(*disk, model, 11, 300);
    CHECK(whole(*open(memory)) == model);
  }
}

TEST_CASE("vhd dynamic: concurrent writers to unallocated blocks, on several threads") {
  DynamicFile file(16 * MiB);
  auto memory = file.device();
  auto disk = open(std::make_shared<YieldingDevice>(memory));
  constexpr int writers = 96;
  // Writers 0-63 all hit block 2 (4 KiB each), the others block 5.
  auto where = [](int i) -> uint64_t {
    return i < 64 ? 4 * MiB + uint64_t(i) * 4 * KiB : 10 * MiB + uint64_t(i - 64) * 64 * KiB;
  };
  asio::io_context context;
  std::mutex mutex;
  std::vector<std::exception_ptr> errors;
  for (int i = 0; i < writers; ++i) {
    asio::co_spawn(
        context,
        [&, i]() -> asio::awaitable<void> {
          co_await disk->write(where(i), pattern(4 * KiB, static_cast<uint8_t>(i)),
                               {.fua = i % 3 == 0});
        },
        [&](std::exception_ptr e) {
          if (e) {
            std::lock_guard lock(mutex);
            errors.push_back(e);
          }
        });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) threads.emplace_back([&] { context.run(); });
  for (auto& t : threads) t.join();
  for (auto& e : errors) CHECK_NOTHROW(std::rethrow_exception(e));

  // Two blocks, each allocated once.
  CHECK(memory->size() == 2 * (2 * MiB + 4096) + 512);
  for (int i = 0; i < writers; ++i) {
    CAPTURE(i);
    CHECK(read(*disk, where(i), 4 * KiB) == pattern(4 * KiB, static_cast<uint8_t>(i)));
  }
  auto again = open(memory);  // check_bat: no two entries share a block
  for (int i = 0; i < writers; ++i) {
    CHECK(read(*again, where(i), 4 * KiB) == pattern(4 * KiB, static_cast<uint8_t>(i)));
  }
  CHECK(run(again->extents(0, 16 * MiB)) == std::vector<Extent>{{4 * MiB, ExtentKind::hole},
                                                                {2 * MiB, ExtentKind::data},
                                                                {4 * MiB, ExtentKind::hole},
                                                                {2 * MiB, ExtentKind::data},
                                                                {4 * MiB, ExtentKind::hole}});
}

TEST_CASE("vhd dynamic: concurrent reads, writes, zeroes and frees keep the image valid") {
  DynamicFile file(8 * MiB, 256 * KiB);
  auto memory = file.device();
  auto disk = open(std::make_shared<YieldingDevice>(memory));
  asio::io_context context;
  std::atomic<int> failures{0};
  for (int i = 0; i < 64; ++i) {
    asio::co_spawn(
        context,
        [&, i]() -> asio::awaitable<void> {
          std::mt19937 random(i);
          for (int op = 0; op < 20; ++op) {
            const uint64_t block = random() % 32;
            const uint64_t offset = block * 256 * KiB + random() % (200 * KiB);
            Bytes buffer(1 + random() % (56 * KiB));
            switch (random() % 4) {
              case 0:
                co_await disk->read(offset, buffer);
                break;
              case 1:
                co_await disk->zero(block * 256 * KiB, 256 * KiB, {});  // frees the block
                break;
              default:
                co_await disk->write(offset, pattern(buffer.size(), 1), {});
            }
          }
        },
        [&](std::exception_ptr e) {
          if (e) ++failures;
        });
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) threads.emplace_back([&] { context.run(); });
  for (auto& t : threads) t.join();
  CHECK(failures == 0);
  // Whatever the interleaving, the file passes every check at open and reads the same.
  CHECK(whole(*open(memory)) == whole(*disk));
}

TEST_CASE("vhd dynamic: zero and trim") {
  DynamicFile file(8 * MiB);
  auto memory = file.device();
  auto recording = std::make_shared<RecordingDevice>(memory);
  auto disk = open(recording);
  for (uint64_t b = 0; b < 4; ++b) run(disk->write(b * 2 * MiB, pattern(2 * MiB, uint8_t(b)), {}));
  const uint64_t grown = memory->size();
  // Blocks 0..3 in order, each data area 4 KiB aligned (see the allocation test).
  auto at = [](uint64_t k) { return 4096 - 512 + k * (2 * MiB + 4096); };

  SUBCASE("zero of a whole block frees it") {
    recording->calls.clear();
    run(disk->zero(2 * MiB, 2 * MiB, {.fua = true}));
    CHECK(recording->calls ==
          std::vector<std::string>{"write 0x600 +512 fua",
                                   fmt::format("trim 0x{:x} +{}", at(1), file.span())});
    CHECK(is_zero(read(*disk, 2 * MiB, 2 * MiB)));
    CHECK(load_be32(whole(*memory), 0x604) == vhd::bat_unused);
    CHECK(run(disk->extents(0, 8 * MiB)) == std::vector<Extent>{{2 * MiB, ExtentKind::data},
                                                                {2 * MiB, ExtentKind::hole},
                                                                {4 * MiB, ExtentKind::data}});
    // Writing there again allocates a new block at the end: freed space is never reused.
    run(disk->write(3 * MiB, pattern(512, 9), {}));
    CHECK(memory->size() == grown + 2 * MiB + 4096);
    CHECK(grown == at(3) + 512 + 2 * MiB + 512);
    CHECK(load_be32(whole(*memory), 0x604) == at(4) / 512);
    CHECK(read(*disk, 3 * MiB, 512) == pattern(512, 9));
    CHECK(is_zero(read(*disk, 2 * MiB, MiB)));
    CHECK(whole(*open(memory)) == whole(*disk));
  }
  SUBCASE("trim of whole blocks frees them; a partial trim leaves neighbours") {
    run(disk->trim(MiB, 6 * MiB, {}));
    CHECK(run(disk->extents(0, 8 * MiB)) == std::vector<Extent>{{2 * MiB, ExtentKind::data},
                                                                {4 * MiB, ExtentKind::hole},
                                                                {2 * MiB, ExtentKind::data}});
    const Bytes p0 = pattern(2 * MiB, 0), p3 = pattern(2 * MiB, 3);
    CHECK(read(*disk, 0, MiB) == Bytes(p0.begin(), p0.begin() + MiB));
    CHECK(read(*disk, 7 * MiB, MiB) == Bytes(p3.begin() + MiB, p3.end()));
    CHECK(is_zero(read(*disk, MiB, MiB)));
    CHECK(is_zero(read(*disk, 6 * MiB, MiB)));
  }
  SUBCASE("zero of part of a block, and NO_HOLE, keep it allocated") {
    recording->calls.clear();
    run(disk->zero(100, 5000, {}));
    run(disk->zero(2 * MiB, 2 * MiB, {.no_hole = true}));
    CHECK(recording->calls ==
          std::vector<std::string>{fmt::format("zero 0x{:x} +5000", at(0) + 512 + 100),
                                   fmt::format("zero 0x{:x} +{}", at(1) + 512, 2 * MiB)});
    CHECK(is_zero(read(*disk, 100, 5000)));
    CHECK(read(*disk, 0, 100) == Bytes(pattern(100, 0)));
    CHECK(is_zero(read(*disk, 2 * MiB, 2 * MiB)));
    CHECK(run(disk->extents(0, 8 * MiB)) == std::vector<Extent>{{8 * MiB, ExtentKind::data}});
  }
  SUBCASE("the last block of a disk that ends mid-block") {
    DynamicFile small(3 * MiB);
    auto m = small.device();
    auto d = open(m);
    run(d->write(2 * MiB, pattern(MiB, 1), {}));
    run(d->zero(2 * MiB, MiB, {}));  // all of the disk's part of block 1: freed
    CHECK(run(d->extents(0, 3 * MiB)) == std::vector<Extent>{{3 * MiB, ExtentKind::hole}});
  }
}

// The session skips the extents walk before a structured read when may_have_holes() says
// no: it must turn false once every block of the disk is allocated, and true again when
// one is freed. BAT entries past the end of the disk do not count.
TEST_CASE("vhd dynamic: may_have_holes follows the blocks the disk covers") {
  DynamicFile file(3 * MiB);
  file.header.max_table_entries = 4;  // two entries past the end of the disk
  file.bat.assign(4, vhd::bat_unused);
  auto memory = file.device();
  auto disk = open(memory);
  CHECK(disk->may_have_holes());
  run(disk->write(0, pattern(512, 1), {}));
  CHECK(disk->may_have_holes());  // block 1 still unallocated
  run(disk->write(3 * MiB - 512, pattern(512, 2), {}));
  CHECK_FALSE(disk->may_have_holes());
  CHECK(run(disk->extents(0, 3 * MiB)) == std::vector<Extent>{{3 * MiB, ExtentKind::data}});
  run(disk->zero(0, 2 * MiB, {}));  // frees block 0
  CHECK(disk->may_have_holes());
  run(disk->write(MiB, pattern(512, 3), {}));
  CHECK_FALSE(disk->may_have_holes());

  SUBCASE("reopened fully allocated") {
    CHECK_FALSE(open(memory)->may_have_holes());
  }
  SUBCASE("a fixed VHD passes its file's answer up") {
    auto fixed = memory_with(fixed_file(pattern(MiB, 4)));
    CHECK(open(fixed)->may_have_holes() == fixed->may_have_holes());
  }
}

TEST_CASE("vhd dynamic: a failed allocation leaves an image that opens") {
  // open_vhd reads 4 times (end footer, copy at 0, header, BAT); the allocation then
  // resizes, writes the footer, the bitmap with the data, flushes, writes the BAT.
  for (int call = 5; call <= 10; ++call) {
    CAPTURE(call);
    DynamicFile file(6 * MiB);
    auto memory = file.device();
    auto faulty = std::make_shared<FaultyDevice>(memory, call, std::errc::no_space_on_device);
    auto disk = open(faulty);
    const Bytes data = pattern(8 * KiB, 8);
    bool written = true;
    try {
      run(disk->write(0, data, {}));
    } catch (const Error& e) {
      CHECK(e.errc() == std::errc::no_space_on_device);
      written = false;
    }
    CHECK(written == (call >= 10));
    auto again = open(memory);
    CHECK(again->caps().writable);
    if (written) {
      CHECK(read(*again, 0, data.size()) == data);
    } else {
      CHECK(is_zero(whole(*again)));
      // The failed layer carries on too.
      run(disk->write(0, data, {}));
      CHECK(read(*disk, 0, data.size()) == data);
    }
  }
}

TEST_CASE("vhd: the footer copy at offset 0 when the end footer is damaged") {
  DynamicFile file(4 * MiB);
  file.add_block(1, 0x11, [](uint32_t) { return true; });
  Bytes bytes = file.bytes();

  SUBCASE("bad checksum: read-only, data served") {
    bytes[bytes.size() - 512 + 0x30] ^= std::byte{1};
    auto disk = open(memory_with(bytes));
    CHECK(!disk->caps().writable);
    CHECK(read(*disk, 2 * MiB, 512) == Bytes(512, std::byte{0x11}));
    CHECK(error_of([&] { run(disk->write(0, Bytes(1), {})); }).errc() ==
          std::errc::operation_not_permitted);
  }
  SUBCASE("the last sector cut short") {
    bytes.resize(bytes.size() - 100);
    auto disk = open(memory_with(bytes));
    CHECK(!disk->caps().writable);
    CHECK(disk->size() == 4 * MiB);
    CHECK(read(*disk, 2 * MiB, 512) == Bytes(512, std::byte{0x11}));
  }
  SUBCASE("the footer gone entirely") {
    bytes.resize(bytes.size() - 512);
    CHECK(!open(memory_with(bytes))->caps().writable);
  }
  SUBCASE("the copy at 0 damaged too") {
    bytes[bytes.size() - 512 + 0x30] ^= std::byte{1};
    bytes[0x30] ^= std::byte{2};
    const Error e = error_of([&] { open(memory_with(bytes)); });
    CHECK(e.errc() == std::errc::invalid_argument);
    CHECK(std::string(e.what()) ==
          "vhd: disk.vhd: footer: checksum mismatch (stored 0xfffff56e, computed 0xfffff56d); "
          "footer copy at offset 0: footer: checksum mismatch (stored 0xfffff56e, computed "
          "0xfffff56c)");
  }
  SUBCASE("a damaged copy at 0 alone is only a warning") {
    bytes[0x30] ^= std::byte{2};
    CHECK(open(memory_with(bytes))->caps().writable);
  }
}

TEST_CASE("vhd: malformed images are refused, each with its own message") {
  auto refusal = [](const Bytes& bytes) {
    const Error e = error_of([&] { open(memory_with(bytes)); });
    return std::pair{e.errc(), std::string(e.what())};
  };
  DynamicFile file(4 * MiB);
  file.add_block(0, 0x22, [](uint32_t) { return true; });

  SUBCASE("no cookie anywhere") {
    CHECK(refusal(Bytes(4096)) ==
          std::pair{std::errc::invalid_argument,
                    "vhd: disk.vhd: not a VHD: no \"conectix\" footer at the end of the file or at "
                    "offset 0"s});
  }
  SUBCASE("too short") {
    CHECK(refusal(Bytes(100)).second ==
          "vhd: disk.vhd: the file is 100 bytes, shorter than a 512-byte footer (truncated?)");
  }
  SUBCASE("fixed disk with a bad footer checksum") {
    Bytes bytes = fixed_file(pattern(MiB, 1));
    bytes[MiB + 0x3C + 3] = std::byte{3};  // disk_type, checksum unchanged
    const auto [code, text] = refusal(bytes);
    CHECK(code == std::errc::invalid_argument);
    CHECK(text.starts_with("vhd: disk.vhd: footer: checksum mismatch (stored 0x"));
  }
  SUBCASE("a fixed disk's footer only at offset 0") {
    Bytes bytes = fixed_file(pattern(MiB, 1));
    std::copy(bytes.end() - 512, bytes.end(), bytes.begin());
    std::fill(bytes.end() - 512, bytes.end(), std::byte{0});
    CHECK(refusal(bytes).second ==
          "vhd: disk.vhd: footer: cookie \"\\0\\0\\0\\0\\0\\0\\0\\0\" is not \"conectix\"; the "
          "footer at offset 0 is a fixed disk's, which keeps no copy there");
  }
  SUBCASE("differencing without a parent id") {
    file.footer.disk_type = 4;
    CHECK(refusal(file.bytes()) ==
          std::pair{std::errc::invalid_argument,
                    "vhd: disk.vhd: dynamic header: parent_unique_id is nil in a differencing "
                    "disk"s});
  }
  SUBCASE("differencing, opened with no way to find its parent") {
    file.footer.disk_type = 4;
    file.header.parent_unique_id = imagenbd::formats::Uuid{{1, 2}};
    CHECK(refusal(file.bytes()) ==
          std::pair{std::errc::invalid_argument,
                    "vhd: disk.vhd: differencing VHD needs its parent (unique id "
                    "01020000-0000-0000-0000-000000000000, name \"\"), and nothing was given "
                    "to look for it"s});
  }
  SUBCASE("unknown disk type") {
    file.footer.disk_type = 7;
    CHECK(refusal(file.bytes()).second ==
          "vhd: disk.vhd: footer: disk_type 7 is not 2 (fixed), 3 (dynamic) or 4 (differencing)");
  }
  SUBCASE("dynamic header checksum") {
    Bytes bytes = file.bytes();
    bytes[0x200 + 0x20] = std::byte{1};
    CHECK(refusal(bytes).second.starts_with(
        "vhd: disk.vhd: dynamic header: checksum mismatch (stored 0x"));
  }
  SUBCASE("dynamic header past the end") {
    file.footer.data_offset = 64 * MiB;
    CHECK(refusal(file.bytes()).second ==
          "vhd: disk.vhd: footer: data_offset 0x4000000 (the dynamic header) is past the end of "
          "the file (data ends at 0x200a00)");
  }
  SUBCASE("dynamic header cookie") {
    Bytes bytes = file.bytes();
    bytes[0x200] = std::byte{'X'};
    CHECK(refusal(bytes).second ==
          "vhd: disk.vhd: dynamic header: cookie \"Xxsparse\" is not \"cxsparse\"");
  }
  SUBCASE("block size") {
    file.header.block_size = 3000;
    CHECK(refusal(file.bytes()).second ==
          "vhd: disk.vhd: dynamic header: block_size 3000 is not a power of two");
  }
  SUBCASE("BAT too small, or huge") {
    file.header.max_table_entries = 1;
    CHECK(
        refusal(file.bytes())
            .second.starts_with("vhd: disk.vhd: dynamic header: max_table_entries 1 is too small"));
    file.header.max_table_entries = 0xFFFFFFFF;
    CHECK(refusal(file.bytes())
              .second.starts_with(
                  "vhd: disk.vhd: dynamic header: max_table_entries 4294967295 is larger"));
  }
  SUBCASE("BAT entries past the end, at metadata, twice the same block") {
    file.bat[1] = 0x100000;
    CHECK(refusal(file.bytes())
              .second.starts_with("vhd: disk.vhd: BAT entry 1 points past the end of the file"));
    file.bat[1] = 0;
    CHECK(refusal(file.bytes())
              .second.starts_with("vhd: disk.vhd: BAT entry 1 points into the footer copy"));
    file.bat[1] = 3;
    CHECK(
        refusal(file.bytes()).second.starts_with("vhd: disk.vhd: BAT entry 1 points into the BAT"));
    file.bat[1] = file.bat[0];
    CHECK(refusal(file.bytes()).second ==
          "vhd: disk.vhd: BAT entries 0 and 1 point at the same "
          "block (0x800)");
  }
  SUBCASE("sizes beyond 2040 GiB") {
    file.footer.current_size = file.footer.original_size = uint64_t{3} << 40;
    const auto [code, text] = refusal(file.bytes());
    CHECK(code == std::errc::file_too_large);
    CHECK(text.starts_with("vhd: disk.vhd: footer: current_size 3298534883328 is larger"));
  }
  SUBCASE("version") {
    file.footer.format_version = 0x00020000;
    CHECK(refusal(file.bytes()).second ==
          "vhd: disk.vhd: footer: file_format_version 0x00020000 is not supported (only "
          "0x00010000)");
  }
}

TEST_CASE("vhd: open_image probes VHDs and -f vhd opens them") {
  DynamicFile file(4 * MiB);
  auto dynamic = file.device();
  auto fixed = memory_with(fixed_file(pattern(MiB, 1)), "fixed.vhd");
  for (auto& child : {dynamic, fixed}) {
    CHECK(run(open_image(child, {}))->name() == "vhd");
    CHECK(run(open_image(child, {.format = Format::vhd}))->name() == "vhd");
    CHECK(!run(open_image(child, {.read_only = true}))->caps().writable);
    CHECK(run(open_image(child, {.format = Format::raw}))->name() == "raw");
  }
  CHECK(run(open_image(fixed, {}))->size() == MiB);
}
