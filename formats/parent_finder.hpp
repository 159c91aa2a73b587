// How a differencing image reaches its parent. formats/ never knows where bytes live, so
// whoever opens the image (the server for local files, later the Azure backend for blobs in
// one container) hands the format layer a ParentFinder that opens byte stores by name. The
// format layer decides which names to try (VHD parent locators, VDI UUID search), checks
// the candidate's identity (UUIDs) and opens it read-only, recursively, with loop
// detection and a depth limit.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <string>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/awaitable.hpp>

#include "backends/block_device.hpp"

namespace imagenbd::formats {

// Deeper chains are refused as probable loops the identity check missed (formats.md §1.8).
constexpr std::size_t max_parent_depth = 64;

struct ParentFinder {
  // Opens the byte store `name` read-only, or returns nullptr when nothing has that name (a
  // locator pointing nowhere is normal: the next candidate is tried). Names are what the
  // image records, already turned into the finder's syntax: for local files a POSIX path,
  // absolute or relative to the current directory. The device's describe() must be a
  // canonical name (realpath for files), which loop detection compares.
  // @throws backends::Error for other failures (permission denied, I/O errors).
  std::function<boost::asio::awaitable<backends::DevicePtr>(const std::string& name)> open;
  // The names of the byte stores next to `name` (same directory / container), for formats
  // that record their parent only by UUID (VDI). Empty when listing is not possible.
  std::function<std::vector<std::string>(const std::string& name)> siblings;
  // --parent: the user's choice for the first parent, tried before what the image records
  // (still checked by UUID; a mismatch is an error, not a fallback).
  std::string explicit_parent;
};

// Where a layer stands in a chain: the canonical names of the images opened on the way
// down (the top image first), for loop detection and for messages ("parent of parent of
// top.vhd").
struct ParentChain {
  const ParentFinder* finder = nullptr;  // null: differencing images are refused (EINVAL)
  std::vector<std::string> names;

  // True when `name` is already in the chain (a parent loop).
  bool contains(const std::string& name) const {
    return std::find(names.begin(), names.end(), name) != names.end();
  }
  // "a.vhd -> b.vhd -> name": the chain so far and `name`, for loop and depth messages.
  std::string text(const std::string& name) const {
    std::string out;
    for (const auto& n : names) out += n + " -> ";
    return out + name;
  }
};

}  // namespace imagenbd::formats
