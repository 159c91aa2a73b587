// The overlay file's codec: header round trip and every refusal (magic, version, checksum,
// block size, offsets, lower identity), and the map checks (aligned, inside the file, not
// shared) with the blocks a crash left unreferenced.
#include "formats/cow_layout.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

using namespace imagenbd::formats;

namespace {

cow::Header good_header(uint64_t size = 10u << 20, uint32_t block_size = 64u << 10) {
  auto h = cow::make_header(size, block_size, "az://acct/c/disk.vhd#etag1");
  REQUIRE(h.ok());
  return h.value();
}

bool mentions(const cow::Problem& p, const std::string& text) {
  return p.message.find(text) != std::string::npos;
}

}  // namespace

TEST_CASE("cow layout: a new header puts the map after the header and data block-aligned") {
  const cow::Header h = good_header(10u << 20, 64u << 10);
  CHECK(h.map_offset == 4096);
  // 160 blocks -> 1280 map bytes -> one 4 KiB page; data at the next 64 KiB boundary.
  CHECK(h.data_offset == 65536);
  const auto l = cow::check_header(h, h.data_offset);
  REQUIRE(l.ok());
  CHECK(l.value().blocks == 160);
  CHECK(l.value().map_bytes == 4096);
  CHECK(l.value().block_bytes(159) == 65536);

  // A size that is not a multiple of the block size: the last block is short.
  const cow::Header odd = good_header(65536 * 3 + 100, 65536);
  const auto lo = cow::check_header(odd, odd.data_offset);
  REQUIRE(lo.ok());
  CHECK(lo.value().blocks == 4);
  CHECK(lo.value().block_bytes(3) == 100);
}

TEST_CASE("cow layout: the header round-trips through its bytes") {
  const cow::Header h = good_header();
  const auto bytes = cow::encode_header(h);
  REQUIRE(bytes.size() == cow::header_bytes);
  CHECK(std::memcmp(bytes.data(), "IMGNBDCW", 8) == 0);
  const auto back = cow::decode_header(bytes);
  REQUIRE(back.ok());
  CHECK(back.value() == h);
}

TEST_CASE("cow layout: block sizes outside 4 KiB..2 MiB or not powers of two are refused") {
  for (uint32_t bs : {0u, 2048u, 3000u, 4096u * 3, 4u << 20}) {
    INFO("block size ", bs);
    const auto h = cow::make_header(1u << 20, bs, "x");
    REQUIRE_FALSE(h.ok());
    CHECK(mentions(h.problem(), "block size"));
  }
  CHECK(cow::make_header(1u << 20, 4096, "x").ok());
  CHECK(cow::make_header(8u << 20, 2u << 20, "x").ok());
  CHECK_FALSE(cow::make_header(0, 4096, "x").ok());
  CHECK_FALSE(cow::make_header(1u << 20, 4096, std::string(cow::max_identity + 1, 'a')).ok());
}

TEST_CASE("cow layout: damaged headers are refused naming the field") {
  const cow::Header h = good_header();
  auto bytes = cow::encode_header(h);

  SUBCASE("magic") {
    bytes[0] = std::byte{'X'};
    const auto r = cow::decode_header(bytes);
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "magic"));
  }
  SUBCASE("checksum") {
    bytes[600] ^= std::byte{1};  // inside the identity
    const auto r = cow::decode_header(bytes);
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "checksum"));
  }
  SUBCASE("version") {
    cow::Header v2 = h;
    v2.version = 2;
    const auto r = cow::decode_header(cow::encode_header(v2));
    REQUIRE_FALSE(r.ok());
    CHECK(r.problem().code == std::errc::operation_not_supported);
    CHECK(mentions(r.problem(), "version 2"));
  }
  SUBCASE("short") {
    const auto r = cow::decode_header(std::span(bytes).first(100));
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "100 bytes"));
  }
}

TEST_CASE("cow layout: check_header refuses inconsistent offsets and a truncated map") {
  const cow::Header h = good_header();
  SUBCASE("data offset not aligned") {
    cow::Header bad = h;
    bad.data_offset += 4096;
    const auto r = cow::check_header(bad, 1u << 30);
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "data offset"));
  }
  SUBCASE("data offset inside the map") {
    cow::Header bad = good_header(1u << 30, 4096);  // 2 MiB of map
    bad.data_offset = 8192;
    const auto r = cow::check_header(bad, 1u << 30);
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "data offset"));
  }
  SUBCASE("map offset") {
    cow::Header bad = h;
    bad.map_offset = 100;
    const auto r = cow::check_header(bad, 1u << 30);
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "map offset"));
  }
  SUBCASE("file ends inside the map") {
    const auto r = cow::check_header(h, 5000);
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "past the end of the file"));
  }
  SUBCASE("lower size differs from the virtual size") {
    cow::Header bad = h;
    bad.lower_size += 1;
    const auto r = cow::check_header(bad, 1u << 30);
    REQUIRE_FALSE(r.ok());
    CHECK(mentions(r.problem(), "lower size"));
  }
}

TEST_CASE("cow layout: another lower disk is refused saying what changed") {
  const cow::Header h = good_header();
  CHECK_FALSE(cow::check_lower(h, h.lower_size, h.identity).has_value());
  const auto size = cow::check_lower(h, h.lower_size + 512, h.identity);
  REQUIRE(size.has_value());
  CHECK(mentions(*size, "size changed from 10485760 to 10486272"));
  const auto id = cow::check_lower(h, h.lower_size, "az://acct/c/disk.vhd#etag2");
  REQUIRE(id.has_value());
  CHECK(mentions(*id, "etag1"));
  CHECK(mentions(*id, "etag2"));
}

TEST_CASE("cow layout: map entries round-trip and are checked") {
  const cow::Header h = good_header(4 * 65536, 65536);
  const auto layout = cow::check_header(h, 1u << 20);
  REQUIRE(layout.ok());
  const cow::Layout& l = layout.value();
  const uint64_t d = l.data_offset;
  const uint64_t file_size = d + 4 * 65536;

  std::vector<std::byte> page(4096);
  const std::vector<uint64_t> entries = {cow::entry_absent, cow::entry_zero, d + 2 * 65536, d};
  for (std::size_t i = 0; i < entries.size(); ++i)
    cow::encode_entry(entries[i], std::span<std::byte, 8>(page.data() + 8 * i, 8));
  CHECK(cow::decode_map(page, 4) == entries);

  const auto use = cow::check_map(l, entries, file_size);
  REQUIRE(use.ok());
  CHECK(use.value().data_end == d + 3 * 65536);
  // A crash left block 1 of the data area unreferenced: it is reusable.
  CHECK(use.value().free_blocks == std::vector<uint64_t>{d + 65536});

  const auto refused = [&](std::vector<uint64_t> bad, uint64_t size, const std::string& text) {
    const auto r = cow::check_map(l, bad, size);
    REQUIRE_FALSE(r.ok());
    CHECK_MESSAGE(mentions(r.problem(), text), r.problem().message);
  };
  refused({0, 0, d + 100, 0}, file_size, "entry 2");                // unaligned
  refused({0, 0, 4096, 0}, file_size, "entry 2");                   // inside the map
  refused({0, d + 4 * 65536, 0, 0}, file_size, "past the end");     // past EOF
  refused({0, d, 0, d}, file_size, "entry 3 (0x10000) is shared");  // shared
  refused({0, 0, 0}, file_size, "3 entries for 4 blocks");
}
