// Which bytes of a page blob hold data: a sorted set of disjoint, non-adjacent
// [start, end) intervals, merged on insert. Built from Get Page Ranges (which returns
// unmerged, possibly unsorted or out-of-bounds ranges: clamped here), kept up to date by
// the writer's own Put/Clear Page calls, read by extents() and by sparse reads.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "backends/azure_xml.hpp"
#include "backends/block_device.hpp"

namespace imagenbd::backends {

class PageMap {
 public:
  struct Interval {
    uint64_t start;
    uint64_t end;  // exclusive
    bool operator==(const Interval&) const = default;
  };

  PageMap() = default;
  // From Get Page Ranges output: <PageRange> entries added, <ClearRange> entries removed,
  // in order; everything clamped to [0, size). Returns how many ranges had to be clamped
  // or were misaligned (the caller logs it).
  std::size_t apply(const std::vector<azure::PageRange>& ranges, uint64_t size);

  void add(uint64_t start, uint64_t end);     // mark [start, end) as data
  void remove(uint64_t start, uint64_t end);  // mark [start, end) as hole
  void clear() { data_.clear(); }

  // Data intervals intersecting [start, end), clipped to it.
  std::vector<Interval> data_in(uint64_t start, uint64_t end) const;
  // Extents (data / hole) covering [offset, offset+length) exactly, in order.
  std::vector<Extent> extents(uint64_t offset, uint64_t length) const;
  uint64_t data_bytes() const;
  std::vector<Interval> intervals() const;

 private:
  std::map<uint64_t, uint64_t> data_;  // start -> end
};

}  // namespace imagenbd::backends
