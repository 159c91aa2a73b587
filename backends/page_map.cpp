// The data intervals of a page blob, kept merged: a std::map from start to end, where no
// two intervals touch (adjacent ones are joined on insert).
#include "backends/page_map.hpp"

#include <algorithm>
#include <limits>

namespace imagenbd::backends {

namespace {
constexpr uint64_t page_size = 512;
}

std::size_t PageMap::apply(const std::vector<azure::PageRange>& ranges, uint64_t size) {
  std::size_t odd = 0;
  for (const auto& r : ranges) {
    if (r.start > r.end) {  // nonsense: ignored
      ++odd;
      continue;
    }
    // end + 1 without overflow.
    uint64_t end = r.end == std::numeric_limits<uint64_t>::max() ? r.end : r.end + 1;
    bool bad = r.start % page_size != 0 || end % page_size != 0 ||
               r.end == std::numeric_limits<uint64_t>::max();
    // Azurite lists pages written past the end of the blob: never trust them for bounds.
    if (end > size) {
      bad = true;
      end = size;
    }
    if (bad) ++odd;
    if (r.start >= end) continue;
    if (r.clear)
      remove(r.start, end);
    else
      add(r.start, end);
  }
  return odd;
}

void PageMap::add(uint64_t start, uint64_t end) {
  if (start >= end) return;
  // The first interval that ends at or after start touches or overlaps [start, end).
  auto it = data_.upper_bound(start);
  if (it != data_.begin() && std::prev(it)->second >= start) --it;
  while (it != data_.end() && it->first <= end) {
    start = std::min(start, it->first);
    end = std::max(end, it->second);
    it = data_.erase(it);
  }
  data_.emplace(start, end);
}

void PageMap::remove(uint64_t start, uint64_t end) {
  if (start >= end) return;
  auto it = data_.upper_bound(start);
  if (it != data_.begin() && std::prev(it)->second > start) --it;
  while (it != data_.end() && it->first < end) {
    auto [s, e] = *it;
    it = data_.erase(it);
    if (s < start) data_.emplace(s, start);
    if (e > end) {
      data_.emplace(end, e);
      break;
    }
  }
}

std::vector<PageMap::Interval> PageMap::data_in(uint64_t start, uint64_t end) const {
  std::vector<Interval> out;
  if (start >= end) return out;
  auto it = data_.upper_bound(start);
  if (it != data_.begin() && std::prev(it)->second > start) --it;
  for (; it != data_.end() && it->first < end; ++it)
    out.push_back({std::max(start, it->first), std::min(end, it->second)});
  return out;
}

std::vector<Extent> PageMap::extents(uint64_t offset, uint64_t length) const {
  std::vector<Extent> out;
  uint64_t end = offset + length;
  uint64_t at = offset;
  for (const auto& i : data_in(offset, end)) {
    if (i.start > at) out.push_back({i.start - at, ExtentKind::hole});
    out.push_back({i.end - i.start, ExtentKind::data});
    at = i.end;
  }
  if (at < end) out.push_back({end - at, ExtentKind::hole});
  return out;
}

uint64_t PageMap::data_bytes() const {
  uint64_t total = 0;
  for (const auto& [s, e] : data_) total += e - s;
  return total;
}

std::vector<PageMap::Interval> PageMap::intervals() const {
  std::vector<Interval> out;
  out.reserve(data_.size());
  for (const auto& [s, e] : data_) out.push_back({s, e});
  return out;
}

}  // namespace imagenbd::backends
