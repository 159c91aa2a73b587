#include "server/local_parents.hpp"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <system_error>

#include "backends/error.hpp"
#include "backends/file.hpp"

namespace imagenbd::server {

namespace {

// The canonical path of an existing file, or "" when there is none.
std::string real_path(const std::string& path) {
  std::unique_ptr<char, decltype(&std::free)> resolved(::realpath(path.c_str(), nullptr),
                                                       &std::free);
  if (!resolved) {
    if (errno == ENOENT || errno == ENOTDIR) return {};
    backends::fail_errno(errno, "parent: " + path);
  }
  return resolved.get();
}

}  // namespace

formats::ParentFinder local_parent_finder(std::string explicit_parent) {
  formats::ParentFinder finder;
  finder.open = [](const std::string& name) -> boost::asio::awaitable<backends::DevicePtr> {
    const std::string path = real_path(name);
    if (path.empty()) co_return nullptr;
    co_return backends::open_file(path, {.read_only = true});
  };
  finder.siblings = [](const std::string& name) {
    std::vector<std::string> out;
    std::error_code ec;
    const auto dir = std::filesystem::path(name).parent_path();
    for (const auto& entry :
         std::filesystem::directory_iterator(dir.empty() ? std::filesystem::path(".") : dir, ec)) {
      if (entry.is_regular_file(ec)) out.push_back(entry.path().string());
    }
    return out;
  };
  finder.explicit_parent = std::move(explicit_parent);
  return finder;
}

}  // namespace imagenbd::server
