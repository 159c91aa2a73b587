// Differencing VHDs over memory devices (formats.md §1.7, §1.8): parent locators decoded
// and checked, the candidate order, chains of three read and written (partial sectors,
// zeroes over the parent, extents), and each refusal: missing parent, wrong unique id,
// loops, depth, size, no finder, a wrong --parent.
#include <doctest/doctest.h>

#include <cstring>
#include <exception>
#include <map>
#include <random>
#include <string>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/vhd.hpp"
#include "formats/vhd_layout.hpp"
#include "formats/vhd_parent.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/image_helpers.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::run;
using namespace std::literals;
namespace vhd = imagenbd::formats::vhd;
namespace platform = vhd::platform;

using imagenbd::test::error_of;
using imagenbd::test::pattern;
using imagenbd::test::read;

namespace {

constexpr uint64_t KiB = 1 << 10;
constexpr uint64_t MiB = 1 << 20;
using Bytes = std::vector<std::byte>;

Bytes text_bytes(std::string_view s) {
  Bytes v(s.size());
  std::memcpy(v.data(), s.data(), s.size());
  return v;
}

Bytes utf16le(std::u16string_view s) {
  Bytes v;
  for (char16_t c : s) {
    v.push_back(static_cast<std::byte>(c & 0xff));
    v.push_back(static_cast<std::byte>(c >> 8));
  }
  return v;
}

Uuid id(uint8_t n) {
  Uuid u;
  u.bytes.fill(n);
  return u;
}

// Yields to the executor before each call, so concurrent coroutines interleave at each I/O.
class YieldingDevice final : public BlockDevice {
 public:
  explicit YieldingDevice(DevicePtr child) : child_(std::move(child)) {}
  std::string_view name() const override { return "yielding"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return child_->size(); }
  Caps caps() const override { return child_->caps(); }
  boost::asio::awaitable<void> read(uint64_t o, std::span<std::byte> out) override {
    co_await yield();
    co_await child_->read(o, out);
  }
  boost::asio::awaitable<void> write(uint64_t o, std::span<const std::byte> in,
                                     WriteFlags f) override {
    co_await yield();
    co_await child_->write(o, in, f);
  }
  boost::asio::awaitable<void> flush() override {
    co_await yield();
    co_await child_->flush();
  }
  boost::asio::awaitable<void> trim(uint64_t o, uint64_t n, WriteFlags f) override {
    co_await child_->trim(o, n, f);
  }
  boost::asio::awaitable<void> zero(uint64_t o, uint64_t n, WriteFlags f) override {
    co_await yield();
    co_await child_->zero(o, n, f);
  }
  boost::asio::awaitable<std::vector<Extent>> extents(uint64_t o, uint64_t n) override {
    co_return co_await child_->extents(o, n);
  }
  boost::asio::awaitable<void> prefetch(uint64_t o, uint64_t n) override {
    co_await child_->prefetch(o, n);
  }
  boost::asio::awaitable<void> resize(uint64_t n) override {
    co_await yield();
    co_await child_->resize(n);
  }

 private:
  static boost::asio::awaitable<void> yield() {
    co_await boost::asio::post(co_await boost::asio::this_coro::executor,
                               boost::asio::use_awaitable);
  }
  DevicePtr child_;
};

struct Locator {
  uint32_t code;
  Bytes data;
};

// An empty dynamic (no parent) or differencing VHD as tools lay it out: footer copy, header
// at 0x200, BAT at 0x600, locator data after the BAT in whole sectors, footer.
Bytes empty_vhd(uint64_t size, uint32_t block_size, Uuid unique_id,
                std::optional<Uuid> parent = std::nullopt, std::vector<Locator> locators = {},
                std::string_view parent_name = "", uint32_t parent_timestamp = 7) {
  vhd::Footer f;
  f.current_size = f.original_size = size;
  f.geometry = vhd::max_geometry;
  f.data_offset = 0x200;
  f.timestamp = 7;
  f.unique_id = unique_id;
  f.disk_type =
      static_cast<uint32_t>(parent ? vhd::DiskType::differencing : vhd::DiskType::dynamic);
  vhd::DynamicHeader h;
  h.table_offset = 0x600;
  h.block_size = block_size;
  h.max_table_entries = static_cast<uint32_t>((size + block_size - 1) / block_size);
  const uint64_t bat_bytes = (uint64_t{h.max_table_entries} * 4 + 511) / 512 * 512;
  uint64_t at = 0x600 + bat_bytes;
  std::vector<std::pair<uint64_t, Bytes>> data;
  if (parent) {
    h.parent_unique_id = *parent;
    h.parent_timestamp = parent_timestamp;
    h.parent_unicode_name = vhd::encode_parent_name(parent_name).value();
    for (std::size_t k = 0; k < locators.size(); ++k) {
      const uint64_t space = (locators[k].data.size() + 511) / 512 * 512;
      h.parent_locators[k] =
          vhd::ParentLocator{locators[k].code, static_cast<uint32_t>(space),
                             static_cast<uint32_t>(locators[k].data.size()), 0, at};
      data.emplace_back(at, locators[k].data);
      at += space;
    }
  }
  Bytes out(at + 512);
  const auto fb = vhd::encode_footer(f);
  const auto hb = vhd::encode_dynamic_header(h);
  std::copy(fb.begin(), fb.end(), out.begin());
  std::copy(hb.begin(), hb.end(), out.begin() + 0x200);
  std::fill(out.begin() + 0x600, out.begin() + 0x600 + bat_bytes, std::byte{0xff});
  for (const auto& [offset, bytes] : data)
    std::copy(bytes.begin(), bytes.end(), out.begin() + offset);
  std::copy(fb.begin(), fb.end(), out.end() - 512);
  return out;
}

// Byte stores by name, as a ParentFinder sees them (describe() is the name).
struct Store {
  std::map<std::string, DevicePtr> files;
  ParentFinder finder;
  std::vector<std::string> asked;

  Store() {
    finder.open = [this](const std::string& name) -> boost::asio::awaitable<DevicePtr> {
      asked.push_back(name);
      const auto it = files.find(name);
      co_return it == files.end() ? nullptr : it->second;
    };
  }
  DevicePtr add(const std::string& name, const Bytes& bytes) {
    auto m = open_memory(bytes.size(), name);
    run(m->write(0, bytes, {}));
    files[name] = m;
    return m;
  }
  DevicePtr open(const std::string& name, bool read_only = false) {
    return run(open_vhd(files.at(name),
                        VhdOptions{.read_only = read_only, .parents = {.finder = &finder}}));
  }
};

void write(BlockDevice& d, uint64_t offset, const Bytes& data, Bytes& model) {
  run(d.write(offset, data, {}));
  std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(offset));
}

// base.vhd (dynamic) <- mid.vhd <- top.vhd in directory "imgs", 4 MiB, 64 KiB blocks; mid
// finds base by W2ru, top finds mid by the header name only.
struct Chain {
  static constexpr uint64_t size = 4 * MiB;
  static constexpr uint32_t block = 64 * KiB;
  Store store;
  Bytes model = Bytes(size);

  Chain() {
    store.add("imgs/base.vhd", empty_vhd(size, block, id(1)));
    {
      auto base = store.open("imgs/base.vhd");
      write(*base, 0, pattern(3 * block, 1), model);
      write(*base, 2 * MiB + 512, pattern(10 * KiB, 2), model);
    }
    store.add("imgs/mid.vhd", empty_vhd(size, block, id(2), id(1),
                                        {{platform::w2ru, utf16le(u".\\base.vhd")}}, "base.vhd"));
    {
      auto mid = store.open("imgs/mid.vhd");
      write(*mid, block + 4 * KiB, pattern(8 * KiB, 3), model);  // over base's data
      write(*mid, 3 * MiB, pattern(4 * KiB, 4), model);          // over base's hole
    }
    store.add("imgs/top.vhd", empty_vhd(size, block, id(3), id(2), {}, "c:\\x\\mid.vhd"));
    store.asked.clear();
  }
};

}  // namespace

TEST_CASE("vhd locators: decoding each platform code") {
  using vhd::LocatorPath;
  auto decode = [](uint32_t code, const Bytes& data) {
    return vhd::decode_locator_path(code, data);
  };
  CHECK(decode(platform::w2ru, utf16le(u".\\dir\\p.vhd")).value() ==
        LocatorPath{"dir/p.vhd", true});
  CHECK(decode(platform::w2ru, utf16le(u".\\..\\p.vhd")).value() == LocatorPath{"../p.vhd", true});
  CHECK(decode(platform::w2ku, utf16le(u"C:\\dir\\p.vhd")).value() ==
        LocatorPath{"/dir/p.vhd", false});
  CHECK(decode(platform::w2ku, utf16le(u"\\tmp\\p\u00e9.vhd\0\0"sv)).value() ==
        LocatorPath{"/tmp/p\xc3\xa9.vhd", false});
  CHECK(decode(platform::wi2r, text_bytes(".\\p.vhd\0"sv)).value() == LocatorPath{"p.vhd", true});
  CHECK(decode(platform::wi2k, text_bytes("d:\\p.vhd")).value() == LocatorPath{"/p.vhd", false});
  CHECK(decode(platform::macx, text_bytes("file://./p.vhd")).value() == LocatorPath{"p.vhd", true});
  CHECK(decode(platform::macx, text_bytes("file://localhost/a%20b/p.vhd")).value() ==
        LocatorPath{"/a b/p.vhd", false});
  CHECK(decode(platform::macx, text_bytes("file:///p.vhd")).value() ==
        LocatorPath{"/p.vhd", false});

  CHECK(decode(platform::mac, text_bytes("alias")).problem().code == std::errc::not_supported);
  CHECK(decode(0x12345678, text_bytes("x")).problem().message ==
        "unknown locator platform code 0x12345678");
  CHECK(decode(platform::w2ru, text_bytes("abc")).problem().message ==
        "W2ru locator: 3 bytes is not a whole number of UTF-16 units");
  CHECK(decode(platform::w2ku, utf16le(u"\\a\0b"sv)).problem().message ==
        "W2ku locator: a NUL character at byte 4");
  CHECK(decode(platform::w2ku, utf16le(u"\xd800x")).problem().message ==
        "W2ku locator: a lone high surrogate 0xd800 at byte 0");
  CHECK(decode(platform::w2ku, utf16le(u"\xdc00")).problem().message ==
        "W2ku locator: a lone low surrogate 0xdc00 at byte 0");
  CHECK(decode(platform::w2ru, Bytes(4)).problem().message == "W2ru locator: empty path");
  CHECK(decode(platform::macx, text_bytes("http://x/p.vhd")).problem().message ==
        "MacX locator: \"http://x/p.vhd\" is not a file:// URL");
  CHECK(decode(platform::macx, text_bytes("file://\xff")).problem().message ==
        "MacX locator: invalid UTF-8 at byte 7");
}

TEST_CASE("vhd locators: encoding round-trips") {
  const std::string path = "/srv/images/p\xc3\xa9 1%.vhd";
  for (uint32_t code : {platform::w2ku, platform::macx}) {
    const auto data = vhd::encode_locator_path(code, path);
    REQUIRE(data.ok());
    CHECK(vhd::decode_locator_path(code, data.value()).value() == vhd::LocatorPath{path, false});
  }
  const auto rel = vhd::encode_locator_path(platform::w2ru, "../base.vhd");
  CHECK(rel.value() == utf16le(u".\\..\\base.vhd"));
  CHECK(vhd::decode_locator_path(platform::w2ru, rel.value()).value() ==
        vhd::LocatorPath{"../base.vhd", true});
  CHECK(vhd::encode_locator_path(platform::macx, "/a b").value() == text_bytes("file:///a%20b"));
  CHECK(!vhd::encode_locator_path(platform::w2ku, "\xff").ok());
  CHECK(!vhd::encode_locator_path(platform::mac, "/a").ok());
  // The header's name: UTF-16BE, at most 256 units.
  vhd::DynamicHeader h;
  h.parent_unicode_name = vhd::encode_parent_name("b\xc3\xa9.vhd").value();
  CHECK(h.parent_unicode_name[0] == std::byte{0});
  CHECK(h.parent_unicode_name[1] == std::byte{'b'});
  CHECK(vhd::parent_name(h) == "b\xc3\xa9.vhd");
  CHECK(vhd::encode_parent_name(std::string(256, 'a')).ok());
  CHECK(vhd::encode_parent_name(std::string(257, 'a')).problem().message ==
        fmt::format("parent name: \"{}\" takes 257 UTF-16 units, more than 256",
                    std::string(257, 'a')));
}

TEST_CASE("vhd locators: data_space in sectors or bytes, and the checks at open") {
  CHECK(vhd::locator_space_bytes({platform::w2ru, 1, 40, 0, 0}).value() == 512);
  CHECK(vhd::locator_space_bytes({platform::w2ru, 511, 40, 0, 0}).value() == 511 * 512);
  CHECK(vhd::locator_space_bytes({platform::w2ru, 512, 40, 0, 0}).value() == 512);
  CHECK(vhd::locator_space_bytes({platform::w2ru, 1024, 40, 0, 0}).value() == 1024);
  CHECK(vhd::locator_space_bytes({platform::w2ru, 700, 40, 0, 0}).problem().message ==
        "data_space 700 is neither a sector count (below 512) nor a multiple of 512 bytes");

  // A differencing image whose locator k is patched; the file ends at 0x1000 + 512.
  const Bytes good = empty_vhd(MiB, 64 * KiB, id(2), id(1),
                               {{platform::w2ru, utf16le(u".\\base.vhd")}}, "base.vhd");
  auto refusal = [&](vhd::ParentLocator l) {
    Bytes bytes = good;
    auto h = vhd::parse_dynamic_header(std::span(bytes).subspan(0x200, 1024)).value();
    h.parent_locators[1] = l;
    const auto hb = vhd::encode_dynamic_header(h);
    std::copy(hb.begin(), hb.end(), bytes.begin() + 0x200);
    Store store;
    store.add("d.vhd", bytes);
    return std::string(error_of([&] { store.open("d.vhd"); }).what());
  };
  CHECK(refusal({0x41424344, 1, 8, 0, 0xa00}) ==
        "vhd: d.vhd: dynamic header: parent locator 1 (ABCD): unknown platform code 0x41424344");
  CHECK(refusal({platform::w2ku, 700, 8, 0, 0xa00}) ==
        "vhd: d.vhd: dynamic header: parent locator 1 (W2ku): data_space 700 is neither a "
        "sector count (below 512) nor a multiple of 512 bytes");
  CHECK(refusal({platform::w2ku, 1, 513, 0, 0xa00}) ==
        "vhd: d.vhd: dynamic header: parent locator 1 (W2ku): data_length 513 is more than "
        "its data_space (512 bytes)");
  CHECK(refusal({platform::w2ku, 2, 8, 0, 0xa00}) ==
        "vhd: d.vhd: dynamic header: parent locator 1 (W2ku): data_offset 0xa00 (+1024 "
        "bytes) is past the end of the file (data ends at 0xa00)");
  CHECK(refusal({platform::w2ku, 1, 8, 0, 0x600}) ==
        "vhd: d.vhd: dynamic header: parent locator 1 (W2ku): its data at 0x600 (+512 bytes) "
        "overlaps the BAT at 0x600");
  CHECK(refusal({platform::w2ku, 1, 8, 0, 0x800}) ==
        "vhd: d.vhd: dynamic header: parent locator 1 (W2ku): its data at 0x800 (+512 bytes) "
        "overlaps parent locator 0's data at 0x800");
}

TEST_CASE("vhd parent candidates: the order of formats.md §1.8, each name once") {
  std::vector<vhd::DecodedLocator> locators{
      {.index = 0, .platform_code = platform::macx, .path = vhd::LocatorPath{"/m/p.vhd", false}},
      {.index = 1, .platform_code = platform::w2ku, .path = vhd::LocatorPath{"/k/p.vhd", false}},
      {.index = 2, .platform_code = platform::w2ru, .path = vhd::LocatorPath{"r/p.vhd", true}},
      {.index = 3, .platform_code = platform::w2ku, .problem = "bad"},
      {.index = 4, .platform_code = platform::wi2k, .path = vhd::LocatorPath{"/k/p.vhd", false}},
  };
  const auto c = vhd::parent_candidates(locators, "C:\\old\\p.vhd", "/imgs/child.vhd");
  REQUIRE(c.size() == 4);
  CHECK(c[0].name == "/imgs/r/p.vhd");
  CHECK(c[0].source == "W2ru locator 2");
  CHECK(c[1].name == "/k/p.vhd");
  CHECK(c[1].source == "W2ku locator 1");
  CHECK(c[2].name == "/m/p.vhd");
  CHECK(c[3].name == "/imgs/p.vhd");
  CHECK(c[3].source == "the header's parent name");
  // A child named without a directory: relative names stay relative.
  const auto bare = vhd::parent_candidates({}, "p.vhd", "child.vhd");
  REQUIRE(bare.size() == 1);
  CHECK(bare[0].name == "p.vhd");
  CHECK(vhd::parent_candidates({}, "", "child.vhd").empty());
}

TEST_CASE("vhd differencing: a chain of three reads through every layer") {
  Chain chain;
  auto top = chain.store.open("imgs/top.vhd");
  CHECK(top->size() == Chain::size);
  CHECK(top->caps().writable);
  CHECK(read(*top, 0, Chain::size) == chain.model);
  // Parents were opened read-only: writing to them through the chain is impossible, and
  // the names asked for were the W2ru path and the header name, relative to each child.
  CHECK(chain.store.asked == std::vector<std::string>{"imgs/mid.vhd", "imgs/base.vhd"});
}

TEST_CASE("vhd differencing: writes set only the bits of sectors written") {
  Chain chain;
  {
    auto top = chain.store.open("imgs/top.vhd");
    // Unallocated block 0 of top, partial sectors at both ends (sectors 1 and 2).
    write(*top, 1000, pattern(100, 9), chain.model);
    // A second write into the allocated block: an absent sector, whole.
    write(*top, 8 * KiB, pattern(512, 10), chain.model);
    // Across a block boundary, unaligned.
    write(*top, Chain::block - 300, pattern(900, 11), chain.model);
    CHECK(read(*top, 0, Chain::size) == chain.model);
  }
  // On disk: block 0's bitmap holds sectors 1, 2, 16 and 127 only.
  const DevicePtr file = chain.store.files.at("imgs/top.vhd");
  const Bytes header = read(*file, 0x200, 1024);
  const auto h = vhd::parse_dynamic_header(header).value();
  const auto bat = vhd::decode_bat(read(*file, h.table_offset, 512), 64);
  REQUIRE(bat[0] != vhd::bat_unused);
  const Bytes bitmap = read(*file, uint64_t{bat[0]} * 512, 512);
  Bytes expected(512);
  for (uint32_t s : {1u, 2u, 16u, 127u}) expected[s / 8] |= vhd::bitmap_mask(s);
  CHECK(bitmap == expected);
  // Reopened: the same data, the parents still showing through.
  auto top = chain.store.open("imgs/top.vhd");
  CHECK(read(*top, 0, Chain::size) == chain.model);
}

TEST_CASE("vhd differencing: zeroes hide the parent, trims change nothing") {
  Chain chain;
  auto top = chain.store.open("imgs/top.vhd");
  CHECK(!top->caps().fast_zero);
  run(top->trim(0, Chain::size, {}));
  CHECK(read(*top, 0, Chain::size) == chain.model);
  // Zero over an unallocated block (parent data), part of a sector too.
  run(top->zero(100, 64 * KiB, {}));
  std::fill(chain.model.begin() + 100, chain.model.begin() + 100 + 64 * KiB, std::byte{0});
  // A whole block, zero with may-trim: still never freed.
  run(top->write(2 * MiB, pattern(512, 5), {}));
  run(top->zero(2 * MiB, Chain::block, {}));
  std::fill(chain.model.begin() + 2 * MiB, chain.model.begin() + 2 * MiB + Chain::block,
            std::byte{0});
  CHECK(read(*top, 0, Chain::size) == chain.model);
  top.reset();
  CHECK(read(*chain.store.open("imgs/top.vhd"), 0, Chain::size) == chain.model);
}

TEST_CASE("vhd differencing: extents are data where any layer has data") {
  Chain chain;
  auto top = chain.store.open("imgs/top.vhd");
  run(top->write(3 * MiB + 512 * KiB, pattern(512, 1), {}));
  std::vector<Extent> all;
  for (uint64_t at = 0; at < Chain::size;) {
    const auto part = run(top->extents(at, Chain::size - at));
    for (const auto& e : part) {
      if (!all.empty() && all.back().kind == e.kind) {
        all.back().length += e.length;
      } else {
        all.push_back(e);
      }
      at += e.length;
    }
  }
  // base: blocks 0-2 and 32; mid: blocks 1 and 48; top: block 56.
  const std::vector<Extent> expected{
      {3 * Chain::block, ExtentKind::data}, {29 * Chain::block, ExtentKind::hole},
      {1 * Chain::block, ExtentKind::data}, {15 * Chain::block, ExtentKind::hole},
      {1 * Chain::block, ExtentKind::data}, {7 * Chain::block, ExtentKind::hole},
      {1 * Chain::block, ExtentKind::data}, {7 * Chain::block, ExtentKind::hole},
  };
  CHECK(all == expected);
}

TEST_CASE("vhd differencing: concurrent unaligned writers sharing blocks and sectors") {
  // Every child I/O yields, so the writers interleave at each step; their ranges do not
  // overlap, but many share a block and some share a sector.
  Chain chain;
  chain.store.files["imgs/top.vhd"] =
      std::make_shared<YieldingDevice>(chain.store.files.at("imgs/top.vhd"));
  auto top = chain.store.open("imgs/top.vhd");
  boost::asio::io_context context;
  std::mt19937 random(42);
  std::exception_ptr error;
  uint64_t at = 100;
  for (int k = 0; k < 64; ++k) {
    const std::size_t length = 1 + random() % 1500;
    const Bytes data = pattern(length, static_cast<uint8_t>(k));
    std::copy(data.begin(), data.end(), chain.model.begin() + static_cast<std::ptrdiff_t>(at));
    boost::asio::co_spawn(
        context,
        [top, at, data]() -> boost::asio::awaitable<void> { co_await top->write(at, data, {}); },
        [&](std::exception_ptr e) {
          if (e) error = e;
        });
    at += length + random() % 700;
  }
  REQUIRE(at < 3 * Chain::block);  // blocks 0-2: base data under them
  context.run();
  if (error) std::rethrow_exception(error);
  CHECK(read(*top, 0, Chain::size) == chain.model);
  top.reset();
  CHECK(read(*chain.store.open("imgs/top.vhd"), 0, Chain::size) == chain.model);
}

TEST_CASE("vhd differencing: a parent timestamp mismatch is only a warning") {
  Store store;
  store.add("base.vhd", empty_vhd(MiB, 64 * KiB, id(1)));  // footer timestamp 7
  store.add("c.vhd", empty_vhd(MiB, 64 * KiB, id(2), id(1), {}, "base.vhd", 8));
  CHECK(store.open("c.vhd")->size() == MiB);
}

TEST_CASE("vhd differencing: refusals name what was tried") {
  const uint64_t size = MiB;
  Store store;
  store.add("d/base.vhd", empty_vhd(size, 64 * KiB, id(1)));

  SUBCASE("no finder") {
    store.add("d/c.vhd", empty_vhd(size, 64 * KiB, id(2), id(1), {}, "base.vhd"));
    const auto e = error_of([&] { run(open_vhd(store.files.at("d/c.vhd"), {})); });
    CHECK(e.errc() == std::errc::invalid_argument);
    CHECK(std::string(e.what()) ==
          "vhd: d/c.vhd: differencing VHD needs its parent (unique id "
          "01010101-0101-0101-0101-010101010101, name \"base.vhd\"), and nothing was given to "
          "look for it");
  }
  SUBCASE("missing parent") {
    store.add("d/c.vhd", empty_vhd(size, 64 * KiB, id(2), id(1),
                                   {{platform::w2ku, utf16le(u"C:\\gone\\base.vhd")},
                                    {platform::w2ru, utf16le(u".\\old\\base.vhd")},
                                    {platform::w2ru, text_bytes("abc")}},
                                   "b2.vhd"));
    const auto e = error_of([&] { store.open("d/c.vhd"); });
    CHECK(e.errc() == std::errc::no_such_file_or_directory);
    CHECK(std::string(e.what()) ==
          "vhd: d/c.vhd: parent not found: wanted unique id 01010101-0101-0101-0101-"
          "010101010101 (name \"b2.vhd\"); tried: locator 2: W2ru locator: 3 bytes is not a "
          "whole number of UTF-16 units; d/old/base.vhd (W2ru locator 1): not found; "
          "/gone/base.vhd (W2ku locator 0): not found; d/b2.vhd (the header's parent name): "
          "not found");
  }
  SUBCASE("unique id mismatch, then the right one") {
    store.add("d/other.vhd", empty_vhd(size, 64 * KiB, id(9)));
    store.add("d/c.vhd", empty_vhd(size, 64 * KiB, id(2), id(1),
                                   {{platform::w2ru, utf16le(u".\\other.vhd")}}, "base.vhd"));
    CHECK(store.open("d/c.vhd")->size() == size);  // other.vhd skipped, base.vhd taken
    store.files.erase("d/base.vhd");
    CHECK(std::string(error_of([&] { store.open("d/c.vhd"); }).what()) ==
          "vhd: d/c.vhd: parent not found: wanted unique id 01010101-0101-0101-0101-"
          "010101010101 (name \"base.vhd\"); tried: d/other.vhd (W2ru locator 0): unique id "
          "09090909-0909-0909-0909-090909090909; d/base.vhd (the header's parent name): not "
          "found");
  }
  SUBCASE("an unreadable candidate is skipped, an unreadable --parent is an error") {
    store.add("d/c.vhd", empty_vhd(size, 64 * KiB, id(2), id(1),
                                   {{platform::w2ru, utf16le(u".\\locked.vhd")}}, "base.vhd"));
    const auto open = store.finder.open;
    store.finder.open = [&](const std::string& name) -> boost::asio::awaitable<DevicePtr> {
      if (name == "d/locked.vhd") {
        imagenbd::backends::fail(std::errc::permission_denied, "file: {}: Permission denied", name);
      }
      co_return co_await open(name);
    };
    CHECK(store.open("d/c.vhd")->size() == size);  // locked.vhd skipped, base.vhd taken
    store.files.erase("d/base.vhd");
    CHECK(std::string(error_of([&] { store.open("d/c.vhd"); }).what())
              .find("d/locked.vhd (W2ru locator 0): file: d/locked.vhd: Permission denied; ") !=
          std::string::npos);
    store.finder.explicit_parent = "d/locked.vhd";
    CHECK(error_of([&] { store.open("d/c.vhd"); }).errc() == std::errc::permission_denied);
  }
  SUBCASE("not a VHD") {
    store.add("d/raw.img", Bytes(4096));
    store.add("d/c.vhd", empty_vhd(size, 64 * KiB, id(2), id(1), {}, "raw.img"));
    CHECK(std::string(error_of([&] { store.open("d/c.vhd"); }).what())
              .ends_with("tried: d/raw.img (the header's parent name): not a VHD"));
  }
  SUBCASE("explicit --parent") {
    store.add("d/other.vhd", empty_vhd(size, 64 * KiB, id(9)));
    store.add("d/c.vhd", empty_vhd(size, 64 * KiB, id(2), id(1), {}, "base.vhd"));
    store.finder.explicit_parent = "d/other.vhd";
    CHECK(std::string(error_of([&] { store.open("d/c.vhd"); }).what()) ==
          "vhd: d/c.vhd: --parent d/other.vhd is not its parent: unique id "
          "09090909-0909-0909-0909-090909090909 (the parent has unique id "
          "01010101-0101-0101-0101-010101010101)");
    store.finder.explicit_parent = "d/base.vhd";
    CHECK(store.open("d/c.vhd")->size() == size);
    store.finder.explicit_parent = "d/nothing.vhd";
    CHECK(error_of([&] { store.open("d/c.vhd"); }).errc() == std::errc::no_such_file_or_directory);
  }
  SUBCASE("a parent of another size") {
    store.add("d/c.vhd", empty_vhd(2 * size, 64 * KiB, id(2), id(1), {}, "base.vhd"));
    CHECK(std::string(error_of([&] { store.open("d/c.vhd"); }).what()) ==
          "vhd: d/c.vhd: its parent d/base.vhd is 1048576 bytes, the differencing disk "
          "2097152: they must be the same size");
  }
  SUBCASE("a loop") {
    store.add("d/a.vhd", empty_vhd(size, 64 * KiB, id(5), id(6), {}, "b.vhd"));
    store.add("d/b.vhd", empty_vhd(size, 64 * KiB, id(6), id(5), {}, "a.vhd"));
    CHECK(std::string(error_of([&] { store.open("d/a.vhd"); }).what()) ==
          "vhd: d/b.vhd: parent loop: d/a.vhd -> d/b.vhd -> d/a.vhd");
  }
  SUBCASE("a chain deeper than max_parent_depth") {
    for (uint32_t k = 0; k <= max_parent_depth + 1; ++k) {
      // c<k> has id k+10 and parent c<k+1>; the last one is a base.
      const bool last = k == max_parent_depth + 1;
      Uuid mine = id(10), parent = id(10);
      mine.bytes[0] = static_cast<uint8_t>(k);
      parent.bytes[0] = static_cast<uint8_t>(k + 1);
      store.add(fmt::format("d/c{}.vhd", k),
                last ? empty_vhd(size, 64 * KiB, mine)
                     : empty_vhd(size, 64 * KiB, mine, parent, {}, fmt::format("c{}.vhd", k + 1)));
    }
    CHECK(std::string(error_of([&] { store.open("d/c0.vhd"); }).what())
              .starts_with("vhd: d/c64.vhd: the parent chain is deeper than 64 images (a loop?): "
                           "d/c0.vhd -> d/c1.vhd -> "));
    CHECK(store.open("d/c1.vhd")->size() == size);  // 64 parents are fine
  }
}
