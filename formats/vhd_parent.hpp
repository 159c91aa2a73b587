// Where a differencing VHD's parent may be (formats.md §1.8): the names to try, in order,
// from what the child records. Pure: no I/O; the caller opens each name through its
// ParentFinder and keeps the first whose footer unique id is the child's parent id.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "formats/vhd_layout.hpp"

namespace imagenbd::formats::vhd {

// One used locator entry of the child's header, decoded (or why it could not be).
struct DecodedLocator {
  uint32_t index = 0;  // 0..7 in the header
  uint32_t platform_code = 0;
  std::optional<LocatorPath> path;  // empty when decoding failed
  std::string problem;              // why, when path is empty
};

struct ParentCandidate {
  std::string name;    // for the finder: a POSIX path
  std::string source;  // "W2ru locator 1", "the header's parent name"
};

// `dir` joined with `relative`; `relative` alone when dir is empty.
std::string join_path(std::string_view dir, std::string_view relative);
// The directory part of a name ("a/b/c.vhd" -> "a/b", "c.vhd" -> "", "/c.vhd" -> "/").
std::string dir_name(std::string_view name);
// The last component of a Windows or POSIX path ("c:\a\p.vhd" -> "p.vhd").
std::string base_name(std::string_view path);

// The names to try for the parent of the child named `child_name`, in the order of
// formats.md §1.8: W2ru (relative to the child's directory), W2ku (absolute), MacX, the
// deprecated Wi2r and Wi2k, then the header's parent name (its last component) in the
// child's directory. Each name appears once, at its first place.
std::vector<ParentCandidate> parent_candidates(std::span<const DecodedLocator> locators,
                                               std::string_view header_parent_name,
                                               std::string_view child_name);

}  // namespace imagenbd::formats::vhd
