// Regressions from the review of issue 7's configuration handling: settings that were
// silently ignored or could never be satisfied are now refused, with a message that says
// where to put them.
#include <doctest/doctest.h>

#include <string>

#include "server/config.hpp"
#include "tests/unit/support/serve_args.hpp"
#include "tests/unit/support/temp_dir.hpp"

using imagenbd::server::apply_config_file;
using imagenbd::server::ConfigError;
using imagenbd::server::ServeCommand;
using imagenbd::test::parse_serve_args;
using imagenbd::test::serve_usage_error;

namespace {

struct ConfigDir : imagenbd::test::TempDir {
  ConfigDir() : TempDir("imagenbd-config-review") {}
};

ServeCommand load(const std::string& file, std::vector<std::string> args = {}) {
  args.insert(args.begin(), {"--config", file});
  ServeCommand cmd = parse_serve_args(args);
  apply_config_file(cmd);
  return cmd;
}

std::string load_error(const std::string& file, std::vector<std::string> args = {}) {
  try {
    load(file, std::move(args));
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

const std::string one_export = "[[export]]\nname = \"a\"\nimage = \"memory:1M\"\n";

}  // namespace

TEST_CASE("review: per-image flags with --config and no image are refused, not ignored") {
  ConfigDir d;
  const std::string file = d.write("a.toml", one_export);
  for (const char* flag : {"--allow=10.0.0.0/8", "--read-only", "--max-connections=2",
                           "--allow-identity=alice", "--format=raw", "--description=x"}) {
    CAPTURE(flag);
    const std::string error = serve_usage_error({"--config", file.c_str(), flag});
    CHECK(error.find("applies to the images given on the command line") != std::string::npos);
    CHECK(error.find("[[export]]") != std::string::npos);
  }
  // With an image on the command line they describe that image, as before.
  const ServeCommand cmd = load(file, {"--allow=10.0.0.0/8", "extra=memory:1M"});
  REQUIRE(cmd.exports.size() == 2);
  CHECK(cmd.exports[0].access.allow.empty());
  CHECK(cmd.exports[1].access.allow.size() == 1);
  // Server-wide flags are fine alone.
  CHECK_NOTHROW(load(file, {"--threads=2", "--idle-timeout=5"}));
}

TEST_CASE("review: --tls=off on the command line wins over the file's [tls]") {
  ConfigDir d;
  d.write("keys.psk", "alice:0123456789abcdef\n");
  const std::string file = d.write("a.toml", "[tls]\npsk-file = \"keys.psk\"\n" + one_export);
  CHECK(load(file).server.tls.mode == imagenbd::protocol::TlsMode::on);
  CHECK(load(file, {"--tls=off"}).server.tls.mode == imagenbd::protocol::TlsMode::off);
  CHECK(load(file, {"--tls=off"}).server.tls.psk_file.empty());
}

TEST_CASE("review: a zero handshake timeout is refused (it would drop every client)") {
  CHECK(serve_usage_error({"--handshake-timeout=0", "memory:1M"}).find("--handshake-timeout") !=
        std::string::npos);
  ConfigDir d;
  const std::string file = d.write("a.toml", "[server]\nhandshake-timeout = 0\n" + one_export);
  CHECK(load_error(file).find("handshake-timeout: 0 is out of range") != std::string::npos);
}

TEST_CASE("review: allowed identities with X.509 need verify-peer") {
  ConfigDir d;
  const std::string file = d.write("a.toml", "[tls]\ncertificates = \"certs\"\n" + one_export +
                                                 "allow-identities = [\"CN=x\"]\n");
  CHECK(load_error(file).find("allow-identities with X.509 certificates needs [tls] verify-peer") !=
        std::string::npos);
  CHECK(serve_usage_error({"--tls-certificates=/x", "--allow-identity=CN=x", "memory:1M"})
            .find("needs --tls-verify-peer") != std::string::npos);
  CHECK(serve_usage_error({"--tls-certificates=/x", "--tls-verify-peer", "--allow-identity=CN=x",
                           "memory:1M"}) == "no error");
}

TEST_CASE("review: [admin] listen is checked as the server checks it") {
  ConfigDir d;
  const std::string remote = d.write("a.toml", "[admin]\nlisten = \"0.0.0.0:9109\"\n" + one_export);
  CHECK(load_error(remote).find(":2: [admin]: listen: '0.0.0.0:9109' is not a loopback address") !=
        std::string::npos);
  const std::string junk = d.write("b.toml", "[admin]\nlisten = \"9109\"\n" + one_export);
  CHECK(load_error(junk).find("admin address '9109'") != std::string::npos);
  const std::string fine = d.write("c.toml", "[admin]\nlisten = \"[::1]:9109\"\n" + one_export);
  CHECK(load(fine).server.admin.listen == "[::1]:9109");
}
