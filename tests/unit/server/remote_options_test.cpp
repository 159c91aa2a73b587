// The remote-image settings of an export (issue 6): --overlay, --cache*, --readahead,
// --boot-profile, --commit-to on the command line and as config keys, and the
// combinations refused before anything is opened.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "server/cli.hpp"
#include "server/config.hpp"
#include "tests/unit/support/serve_args.hpp"
#include "tests/unit/support/temp_dir.hpp"

using imagenbd::server::apply_config_file;
using imagenbd::server::ConfigError;
using imagenbd::server::ExportSpec;
using imagenbd::server::remote_options_problem;
using imagenbd::server::ServeCommand;
using imagenbd::test::parse_serve_args;
using imagenbd::test::serve_usage_error;

TEST_CASE("remote options: every flag reaches the export") {
  auto cmd =
      parse_serve_args({"-x", "disk", "--cache=/c/disk", "--cache-size=20G", "--cache-chunk=4M",
                        "--readahead=off", "--boot-profile=/p/disk", "--overlay=/o/disk.cow",
                        "--commit-to=az://a/c/mine", "s3://bucket/disk.vhd"});
  REQUIRE(cmd.exports.size() == 1);
  const ExportSpec& s = cmd.exports[0];
  CHECK(s.cache == "/c/disk");
  CHECK(s.cache_size == (uint64_t{20} << 30));
  CHECK(s.cache_chunk == 4u << 20);
  CHECK_FALSE(s.readahead);
  CHECK(s.boot_profile == "/p/disk");
  CHECK(s.overlay == "/o/disk.cow");
  CHECK(s.commit_to == "az://a/c/mine");
  CHECK_FALSE(s.read_only);
}

TEST_CASE("remote options: defaults, and --snapshot with an overlay stays writable") {
  auto plain = parse_serve_args({"disk.img"});
  CHECK(plain.exports[0].readahead);
  CHECK(plain.exports[0].cache.empty());
  CHECK(plain.exports[0].overlay.empty());
  auto snap = parse_serve_args({"--snapshot", "az://a/c/b"});
  CHECK(snap.exports[0].read_only);
  auto snap_overlay = parse_serve_args({"--snapshot", "--overlay=o.cow", "az://a/c/b"});
  CHECK_FALSE(snap_overlay.exports[0].read_only);
  CHECK(snap_overlay.exports[0].snapshot == "new");
}

TEST_CASE("remote options: combinations that cannot work are usage errors") {
  CHECK(serve_usage_error({"--boot-profile=p", "disk.img"}) == "--boot-profile needs --cache=PATH");
  CHECK(serve_usage_error({"--cache-size=1G", "disk.img"}) == "--cache-size needs --cache=PATH");
  CHECK(serve_usage_error({"--cache-chunk=1M", "disk.img"}) == "--cache-chunk needs --cache=PATH");
  CHECK(serve_usage_error({"--commit-to=az://a/c/b", "disk.img"})
            .starts_with("--commit-to needs --overlay=FILE"));
  CHECK(serve_usage_error({"-r", "--overlay=o", "disk.img"})
            .starts_with("--read-only with --overlay"));
  CHECK(serve_usage_error({"--overlay=disk.img", "disk.img"})
            .starts_with("--overlay must name a file of its own"));
  CHECK(serve_usage_error({"--readahead=maybe", "disk.img"}) ==
        "invalid --readahead 'maybe' (known: on, off)");
  CHECK(serve_usage_error({"--cache-size=lots", "--cache=c", "disk.img"})
            .starts_with("--cache-size: invalid size 'lots'"));
  CHECK(serve_usage_error({"--cache=c", "a=a.img", "b=b.img"}).find("single image") !=
        std::string::npos);
  ExportSpec ok;
  ok.cache = "c";
  ok.boot_profile = "p";
  ok.overlay = "o";
  ok.commit_to = "az://a/c/b";
  CHECK(remote_options_problem(ok).empty());
}

TEST_CASE("remote options: config keys, paths from the file's directory, errors with lines") {
  imagenbd::test::TempDir d("imagenbd-remote-config");
  const std::string f = d.write("a.toml", R"([[export]]
name = "disk"
image = "s3://bucket/disk.vhd"
cache = "cache/disk"
cache-size = "2G"
cache-chunk = "256K"
readahead = false
boot-profile = "profiles/disk"
overlay = "disk.cow"
commit-to = "az://acct/c/mine"
)");
  ServeCommand cmd = parse_serve_args(std::vector<std::string>{"--config", f});
  apply_config_file(cmd);
  REQUIRE(cmd.exports.size() == 1);
  const ExportSpec& s = cmd.exports[0];
  CHECK(s.cache == d.file("cache/disk"));
  CHECK(s.cache_size == (uint64_t{2} << 30));
  CHECK(s.cache_chunk == 256u << 10);
  CHECK_FALSE(s.readahead);
  CHECK(s.boot_profile == d.file("profiles/disk"));
  CHECK(s.overlay == d.file("disk.cow"));
  CHECK(s.commit_to == "az://acct/c/mine");

  const std::string bad = d.write("b.toml", R"([[export]]
name = "disk"
image = "m.img"

boot-profile = "p"
)");
  ServeCommand bad_cmd = parse_serve_args(std::vector<std::string>{"--config", bad});
  std::string error = "no error";
  try {
    apply_config_file(bad_cmd);
  } catch (const ConfigError& e) {
    error = e.what();
  }
  CHECK(error == bad + ":5: export 'disk': boot-profile needs cache=PATH");

  const std::string size = d.write("c.toml", R"([[export]]
name = "disk"
image = "m.img"
cache = "c"
cache-size = "huge"
)");
  ServeCommand size_cmd = parse_serve_args(std::vector<std::string>{"--config", size});
  error = "no error";
  try {
    apply_config_file(size_cmd);
  } catch (const ConfigError& e) {
    error = e.what();
  }
  CHECK(error.starts_with(size + ":5: export 'disk': cache-size: invalid size 'huge'"));
}

TEST_CASE("remote options: two exports cannot share an overlay file") {
  imagenbd::test::TempDir d("imagenbd-remote-config");
  const std::string f = d.write("a.toml", R"([[export]]
name = "a"
image = "a.img"
overlay = "x.cow"

[[export]]
name = "b"
image = "b.img"
overlay = "x.cow"
)");
  ServeCommand cmd = parse_serve_args(std::vector<std::string>{"--config", f});
  std::string error = "no error";
  try {
    apply_config_file(cmd);
  } catch (const ConfigError& e) {
    error = e.what();
  }
  CHECK(error == f + ":6: export 'b': overlay " + d.file("x.cow") +
                     " is also the overlay of export 'a' (at " + f +
                     ":1); each export needs its own overlay file");
}

TEST_CASE("check_config_files: overlay, cache and profile files can be created or written") {
  imagenbd::test::TempDir d("imagenbd-remote-config");
  d.write("base.img", std::string(4096, 'x'));
  const std::string f = d.write("a.toml", R"([[export]]
name = "disk"
image = "base.img"
overlay = "disk.cow"
cache = "cache.bin"
boot-profile = "profile"
)");
  ServeCommand cmd = parse_serve_args(std::vector<std::string>{"--config", f});
  apply_config_file(cmd);
  CHECK_NOTHROW(imagenbd::server::check_config_files(cmd));
  cmd.exports[0].overlay = d.file("missing-dir/disk.cow");
  std::string error = "no error";
  try {
    imagenbd::server::check_config_files(cmd);
  } catch (const ConfigError& e) {
    error = e.what();
  }
  CHECK(error == f + ": export 'disk': overlay (its directory, to create it): " +
                     d.file("missing-dir") + ": No such file or directory");
}
