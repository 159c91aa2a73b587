// parse_serve: qemu-nbd-style flags, NAME=IMAGE exports, and clear usage errors.
#include "server/cli.hpp"

#include <doctest/doctest.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "tests/unit/support/serve_args.hpp"

using imagenbd::server::ServeCommand;
using imagenbd::server::UsageError;

using imagenbd::test::parse_serve_args;
using imagenbd::test::serve_usage_error;

TEST_CASE("defaults: TCP port 10809 on every address, one unnamed export") {
  auto cmd = parse_serve_args({"disk.img"});
  CHECK(cmd.server.listen.tcp);
  CHECK(cmd.server.listen.port == 10809);
  CHECK(cmd.server.listen.bind_addresses.empty());
  REQUIRE(cmd.exports.size() == 1);
  CHECK(cmd.exports[0].name == "");
  CHECK(cmd.exports[0].image == "disk.img");
  CHECK_FALSE(cmd.exports[0].read_only);
  CHECK(cmd.server.max_clients == 0);
}

TEST_CASE("qemu-nbd flags") {
  auto cmd = parse_serve_args({"-r", "-p", "10900", "-b", "127.0.0.1", "-x", "disk", "-D",
                               "my disk", "-e", "4", "-t", "-f", "raw", "disk.img"});
  CHECK(cmd.server.listen.port == 10900);
  CHECK(cmd.server.listen.bind_addresses == std::vector<std::string>{"127.0.0.1"});
  CHECK(cmd.server.max_clients == 4);
  REQUIRE(cmd.exports.size() == 1);
  CHECK(cmd.exports[0].name == "disk");
  CHECK(cmd.exports[0].description == "my disk");
  CHECK(cmd.exports[0].read_only);
  CHECK(cmd.exports[0].format == imagenbd::formats::Format::raw);
  // Long forms and nbdkit's --export spelling.
  auto longs =
      parse_serve_args({"--read-only", "--port=10901", "--export=x", "--shared=2", "d.img"});
  CHECK(longs.server.listen.port == 10901);
  CHECK(longs.exports[0].name == "x");
  CHECK(longs.exports[0].read_only);
}

TEST_CASE("-k alone serves a Unix socket only, with -p both") {
  auto unix_only = parse_serve_args({"-k", "/tmp/s.sock", "d.img"});
  CHECK_FALSE(unix_only.server.listen.tcp);
  CHECK(unix_only.server.listen.unix_paths == std::vector<std::string>{"/tmp/s.sock"});
  auto both = parse_serve_args({"-k", "/tmp/s.sock", "-p", "10809", "d.img"});
  CHECK(both.server.listen.tcp);
}

TEST_CASE("several NAME=IMAGE exports, '=' inside a path is part of the path") {
  auto cmd = parse_serve_args({"a=one.img", "b=memory:64M", "c=/x/y=z.img"});
  REQUIRE(cmd.exports.size() == 3);
  CHECK(cmd.exports[0].name == "a");
  CHECK(cmd.exports[1].image == "memory:64M");
  CHECK(cmd.exports[2].name == "c");
  CHECK(cmd.exports[2].image == "/x/y=z.img");
  auto path = parse_serve_args({"./dir=1/disk.img"});
  CHECK(path.exports[0].name == "");
  CHECK(path.exports[0].image == "./dir=1/disk.img");
}

TEST_CASE("verbosity switches") {
  CHECK(parse_serve_args({"-v", "d.img"}).log.control_debug);
  CHECK_FALSE(parse_serve_args({"-v", "d.img"}).log.data_debug);
  CHECK(parse_serve_args({"-vv", "d.img"}).log.data_debug);
  CHECK(parse_serve_args({"--debug=data", "d.img"}).log.data_debug);
}

TEST_CASE("usage errors say what is wrong") {
  CHECK(serve_usage_error({}).find("no image") != std::string::npos);
  CHECK(serve_usage_error({"-p", "70000", "d.img"}).find("--port") != std::string::npos);
  CHECK(serve_usage_error({"-p", "abc", "d.img"}).find("'abc'") != std::string::npos);
  CHECK(serve_usage_error({"-f", "qcow9", "d.img"}).find("qcow9") != std::string::npos);
  CHECK(serve_usage_error({"--frobnicate", "d.img"}).find("--frobnicate") != std::string::npos);
  CHECK(serve_usage_error({"d.img", "-p"}).find("needs a value") != std::string::npos);
  CHECK(serve_usage_error({"one.img", "two.img"}).find("NAME=IMAGE") != std::string::npos);
  CHECK(serve_usage_error({"--debug=nope", "d.img"}).find("nope") != std::string::npos);
  CHECK(serve_usage_error({"a=", "d.img"}).find("no image") != std::string::npos);
}

TEST_CASE("--help and --version stop parsing") {
  CHECK(parse_serve_args({"--help"}).help);
  CHECK(parse_serve_args({"-V"}).version);
}
