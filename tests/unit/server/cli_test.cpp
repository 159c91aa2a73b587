// parse_serve: qemu-nbd-style flags, NAME=IMAGE exports, and clear usage errors.
#include "server/cli.hpp"

#include <doctest/doctest.h>

#include <initializer_list>
#include <string>
#include <vector>

using imagenbd::server::parse_serve;
using imagenbd::server::ServeCommand;
using imagenbd::server::UsageError;

namespace {

ServeCommand parse(std::initializer_list<const char*> args) {
  std::vector<std::string> storage{"serve"};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  return parse_serve(static_cast<int>(storage.size()), argv.data());
}

std::string usage_error(std::initializer_list<const char*> args) {
  try {
    parse(args);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("defaults: TCP port 10809 on every address, one unnamed export") {
  auto cmd = parse({"disk.img"});
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
  auto cmd = parse({"-r", "-p", "10900", "-b", "127.0.0.1", "-x", "disk", "-D", "my disk", "-e",
                    "4", "-t", "-f", "raw", "disk.img"});
  CHECK(cmd.server.listen.port == 10900);
  CHECK(cmd.server.listen.bind_addresses == std::vector<std::string>{"127.0.0.1"});
  CHECK(cmd.server.max_clients == 4);
  REQUIRE(cmd.exports.size() == 1);
  CHECK(cmd.exports[0].name == "disk");
  CHECK(cmd.exports[0].description == "my disk");
  CHECK(cmd.exports[0].read_only);
  CHECK(cmd.exports[0].format == imagenbd::formats::Format::raw);
  // Long forms and nbdkit's --export spelling.
  auto longs = parse({"--read-only", "--port=10901", "--export=x", "--shared=2", "d.img"});
  CHECK(longs.server.listen.port == 10901);
  CHECK(longs.exports[0].name == "x");
  CHECK(longs.exports[0].read_only);
}

TEST_CASE("-k alone serves a Unix socket only, with -p both") {
  auto unix_only = parse({"-k", "/tmp/s.sock", "d.img"});
  CHECK_FALSE(unix_only.server.listen.tcp);
  CHECK(unix_only.server.listen.unix_paths == std::vector<std::string>{"/tmp/s.sock"});
  auto both = parse({"-k", "/tmp/s.sock", "-p", "10809", "d.img"});
  CHECK(both.server.listen.tcp);
}

TEST_CASE("several NAME=IMAGE exports, '=' inside a path is part of the path") {
  auto cmd = parse({"a=one.img", "b=memory:64M", "c=/x/y=z.img"});
  REQUIRE(cmd.exports.size() == 3);
  CHECK(cmd.exports[0].name == "a");
  CHECK(cmd.exports[1].image == "memory:64M");
  CHECK(cmd.exports[2].name == "c");
  CHECK(cmd.exports[2].image == "/x/y=z.img");
  auto path = parse({"./dir=1/disk.img"});
  CHECK(path.exports[0].name == "");
  CHECK(path.exports[0].image == "./dir=1/disk.img");
}

TEST_CASE("verbosity switches") {
  CHECK(parse({"-v", "d.img"}).log.control_debug);
  CHECK_FALSE(parse({"-v", "d.img"}).log.data_debug);
  CHECK(parse({"-vv", "d.img"}).log.data_debug);
  CHECK(parse({"--debug=data", "d.img"}).log.data_debug);
}

TEST_CASE("usage errors say what is wrong") {
  CHECK(usage_error({}).find("no image") != std::string::npos);
  CHECK(usage_error({"-p", "70000", "d.img"}).find("--port") != std::string::npos);
  CHECK(usage_error({"-p", "abc", "d.img"}).find("'abc'") != std::string::npos);
  CHECK(usage_error({"-f", "qcow9", "d.img"}).find("qcow9") != std::string::npos);
  CHECK(usage_error({"--frobnicate", "d.img"}).find("--frobnicate") != std::string::npos);
  CHECK(usage_error({"d.img", "-p"}).find("needs a value") != std::string::npos);
  CHECK(usage_error({"one.img", "two.img"}).find("NAME=IMAGE") != std::string::npos);
  CHECK(usage_error({"--debug=nope", "d.img"}).find("nope") != std::string::npos);
  CHECK(usage_error({"a=", "d.img"}).find("no image") != std::string::npos);
}

TEST_CASE("--help and --version stop parsing") {
  CHECK(parse({"--help"}).help);
  CHECK(parse({"-V"}).version);
}
