// A fresh private directory for a test's files (config files, keys, sockets), removed
// with everything in it at the end of the test.
#pragma once

#include <stdlib.h>  // mkdtemp

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

namespace imagenbd::test {

struct TempDir {
  std::filesystem::path path;

  // PREFIX-XXXXXX under the system temp dir.
  explicit TempDir(const std::string& prefix = "imagenbd-test") {
    std::string templ = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    REQUIRE(::mkdtemp(templ.data()) != nullptr);
    path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // The path of `name` in the directory.
  std::string file(const std::string& name) const { return (path / name).string(); }

  // Writes `text` to `name` in the directory; returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream out(path / name);
    out << text;
    REQUIRE(out.good());
    return file(name);
  }
};

}  // namespace imagenbd::test
