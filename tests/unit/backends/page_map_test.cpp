// PageMap: merging, splitting, clamping Get Page Ranges output, extents and clipping.
#include "backends/page_map.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <vector>

using namespace imagenbd::backends;
using Interval = PageMap::Interval;
using azure::PageRange;

TEST_CASE("page map: adjacent and overlapping intervals merge") {
  PageMap m;
  m.add(0, 4096);
  m.add(4096, 4608);  // adjacent, as Azurite lists them
  CHECK(m.intervals() == std::vector<Interval>{{0, 4608}});
  m.add(8192, 9216);
  m.add(10240, 11264);
  CHECK(m.intervals() == std::vector<Interval>{{0, 4608}, {8192, 9216}, {10240, 11264}});
  m.add(9000, 10300);  // bridges two
  CHECK(m.intervals() == std::vector<Interval>{{0, 4608}, {8192, 11264}});
  m.add(1024, 2048);  // inside: nothing changes
  CHECK(m.intervals() == std::vector<Interval>{{0, 4608}, {8192, 11264}});
  m.add(0, 20000);  // covers everything
  CHECK(m.intervals() == std::vector<Interval>{{0, 20000}});
  CHECK(m.data_bytes() == 20000);
  m.add(5, 5);  // empty: ignored
  CHECK(m.intervals() == std::vector<Interval>{{0, 20000}});
}

TEST_CASE("page map: remove splits, trims and drops") {
  PageMap m;
  m.add(0, 8192);
  m.remove(1024, 2048);
  CHECK(m.intervals() == std::vector<Interval>{{0, 1024}, {2048, 8192}});
  m.remove(0, 512);
  CHECK(m.intervals() == std::vector<Interval>{{512, 1024}, {2048, 8192}});
  m.remove(7680, 10000);
  CHECK(m.intervals() == std::vector<Interval>{{512, 1024}, {2048, 7680}});
  m.remove(0, 4096);
  CHECK(m.intervals() == std::vector<Interval>{{4096, 7680}});
  m.remove(10000, 20000);  // nothing there
  CHECK(m.intervals() == std::vector<Interval>{{4096, 7680}});
  m.remove(0, std::numeric_limits<uint64_t>::max());
  CHECK(m.intervals().empty());
  CHECK(m.data_bytes() == 0);
}

TEST_CASE("page map: extents cover the query exactly, data and holes alternating") {
  PageMap m;
  m.add(1024, 2048);
  m.add(4096, 8192);
  CHECK(m.extents(0, 10240) == std::vector<Extent>{{1024, ExtentKind::hole},
                                                   {1024, ExtentKind::data},
                                                   {2048, ExtentKind::hole},
                                                   {4096, ExtentKind::data},
                                                   {2048, ExtentKind::hole}});
  // Starting and ending inside data intervals.
  CHECK(m.extents(1536, 3584) == std::vector<Extent>{{512, ExtentKind::data},
                                                     {2048, ExtentKind::hole},
                                                     {1024, ExtentKind::data}});
  CHECK(m.extents(4608, 512) == std::vector<Extent>{{512, ExtentKind::data}});
  CHECK(m.extents(2048, 2048) == std::vector<Extent>{{2048, ExtentKind::hole}});
  CHECK(m.extents(0, 0).empty());
  PageMap empty;
  CHECK(empty.extents(512, 1024) == std::vector<Extent>{{1024, ExtentKind::hole}});
}

TEST_CASE("page map: data_in clips to the window") {
  PageMap m;
  m.add(1024, 2048);
  m.add(4096, 8192);
  CHECK(m.data_in(1536, 5000) == std::vector<Interval>{{1536, 2048}, {4096, 5000}});
  CHECK(m.data_in(2048, 4096).empty());
  CHECK(m.data_in(0, 100000) == std::vector<Interval>{{1024, 2048}, {4096, 8192}});
  CHECK(m.data_in(5000, 5000).empty());
}

TEST_CASE("page map: apply merges, clears in order, clamps and counts the odd ones") {
  PageMap m;
  std::vector<PageRange> ranges = {
      {4096, 4607, false},  // unsorted
      {0, 4095, false},     // adjacent to the one above
      {8192, 9215, false},  // cleared again below
      {8704, 9215, true},
  };
  CHECK(m.apply(ranges, 1 << 20) == 0);
  CHECK(m.intervals() == std::vector<Interval>{{0, 4608}, {8192, 8704}});

  SUBCASE("past the size: clamped (Azurite lists pages written past the end)") {
    PageMap c;
    std::vector<PageRange> past = {{0, 511, false}, {1024, 2559, false}, {4096, 4607, false}};
    CHECK(c.apply(past, 2048) == 2);
    CHECK(c.intervals() == std::vector<Interval>{{0, 512}, {1024, 2048}});
  }
  SUBCASE("misaligned ranges are counted and still applied") {
    PageMap c;
    std::vector<PageRange> odd = {{100, 511, false}, {1024, 1999, false}, {4096, 4607, false}};
    CHECK(c.apply(odd, 1 << 20) == 2);
    CHECK(c.intervals() == std::vector<Interval>{{100, 512}, {1024, 2000}, {4096, 4608}});
  }
  SUBCASE("start > end is ignored, and an end of 2^64-1 does not overflow") {
    PageMap c;
    uint64_t max = std::numeric_limits<uint64_t>::max();
    std::vector<PageRange> bad = {{4096, 511, false}, {0, max, false}};
    CHECK(c.apply(bad, 8192) == 2);
    CHECK(c.intervals() == std::vector<Interval>{{0, 8192}});
  }
}
