// The parent resolution order of formats.md §1.8. Relative W2ru paths come first: they keep
// working when a whole directory of images moves, which absolute ones do not.
#include "formats/vhd_parent.hpp"

#include <algorithm>
#include <array>

#include <fmt/format.h>

namespace imagenbd::formats::vhd {

std::string join_path(std::string_view dir, std::string_view relative) {
  if (dir.empty()) return std::string(relative);
  std::string out(dir);
  if (!out.ends_with('/')) out += '/';
  out += relative;
  return out;
}

std::string dir_name(std::string_view name) {
  const auto slash = name.rfind('/');
  if (slash == std::string_view::npos) return {};
  if (slash == 0) return "/";
  return std::string(name.substr(0, slash));
}

std::string base_name(std::string_view path) {
  const auto sep = path.find_last_of("/\\");
  return std::string(sep == std::string_view::npos ? path : path.substr(sep + 1));
}

std::vector<ParentCandidate> parent_candidates(std::span<const DecodedLocator> locators,
                                               std::string_view header_parent_name,
                                               std::string_view child_name) {
  static constexpr std::array<uint32_t, 5> order{platform::w2ru, platform::w2ku, platform::macx,
                                                 platform::wi2r, platform::wi2k};
  const std::string dir = dir_name(child_name);
  std::vector<ParentCandidate> out;
  auto add = [&](std::string name, std::string source) {
    if (name.empty()) return;
    const bool seen = std::any_of(out.begin(), out.end(),
                                  [&](const ParentCandidate& c) { return c.name == name; });
    if (!seen) out.push_back(ParentCandidate{std::move(name), std::move(source)});
  };
  for (uint32_t code : order) {
    for (const DecodedLocator& l : locators) {
      if (l.platform_code != code || !l.path) continue;
      add(l.path->relative ? join_path(dir, l.path->path) : l.path->path,
          fmt::format("{} locator {}", platform_name(code), l.index));
    }
  }
  const std::string base = base_name(header_parent_name);
  if (!base.empty() && base != "." && base != "..") {
    add(join_path(dir, base), "the header's parent name");
  }
  return out;
}

}  // namespace imagenbd::formats::vhd
