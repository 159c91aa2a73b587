// SectorBitmaps: loading on-disk bitmaps (MSB first), runs, setting bits, encoding back.
#include "formats/vhd_bitmap.hpp"

#include <doctest/doctest.h>

#include <vector>

using namespace imagenbd::formats::vhd;
using State = SectorBitmaps::State;

TEST_CASE("SectorBitmaps: load, runs, set_range, encode") {
  constexpr uint32_t sectors = 200;  // not a multiple of 64 nor of 8
  SectorBitmaps maps(3, sectors);
  CHECK(maps.state(0) == State::unknown);

  std::vector<std::byte> disk(512);
  SUBCASE("all bits set: full, no copy kept") {
    for (uint32_t k = 0; k < sectors; ++k) disk[k / 8] |= std::byte(0x80 >> (k % 8));
    CHECK(maps.load(1, disk) == State::full);
    CHECK(maps.test(1, 199));
    CHECK(maps.run_end(1, 5, 200, true) == 200);
    CHECK(maps.run_end(1, 5, 200, false) == 5);
    // A second load does not replace what is known.
    CHECK(maps.load(1, std::vector<std::byte>(512)) == State::full);
    std::vector<std::byte> out(30);
    maps.encode(1, 0, out);
    CHECK(out[0] == std::byte{0xFF});
    CHECK(out[24] == std::byte{0xFF});  // sectors 192..199
    CHECK(out[25] == std::byte{0});     // padding
  }
  SUBCASE("partial") {
    disk[0] = std::byte{0x80};   // sector 0
    disk[8] = std::byte{0x0F};   // sectors 68..71
    disk[24] = std::byte{0x01};  // sector 199
    disk[30] = std::byte{0xFF};  // padding past the last sector: ignored
    CHECK(maps.load(0, disk) == State::partial);
    CHECK(maps.test(0, 0));
    CHECK(!maps.test(0, 1));
    CHECK(maps.test(0, 68));
    CHECK(maps.test(0, 71));
    CHECK(!maps.test(0, 72));
    CHECK(maps.run_end(0, 0, 200, true) == 1);
    CHECK(maps.run_end(0, 1, 200, false) == 68);
    CHECK(maps.run_end(0, 68, 200, true) == 72);
    CHECK(maps.run_end(0, 72, 200, false) == 199);
    CHECK(maps.run_end(0, 72, 100, false) == 100);
    CHECK(maps.run_end(0, 1, 200, true) == 1);
    CHECK(!maps.all_set(0, 0, 2));
    CHECK(maps.all_set(0, 68, 72));

    maps.set_range(0, 1, 68);
    CHECK(maps.all_set(0, 0, 72));
    CHECK(maps.state(0) == State::partial);
    std::vector<std::byte> out(512);
    maps.encode(0, 0, out);
    CHECK(out[0] == std::byte{0xFF});
    CHECK(out[8] == std::byte{0xFF});
    CHECK(out[9] == std::byte{0});
    CHECK(out[24] == std::byte{0x01});
    CHECK(out[30] == std::byte{0});
    maps.set_range(0, 72, 199);
    CHECK(maps.state(0) == State::full);  // every bit set now
  }
  SUBCASE("set_full replaces a copy") {
    CHECK(maps.load(2, disk) == State::partial);
    CHECK(!maps.test(2, 7));
    maps.set_full(2);
    CHECK(maps.state(2) == State::full);
    CHECK(maps.test(2, 7));
  }
}
