// The configuration file: every key, defaults, errors with file:line and "did you mean",
// relative paths, merging with the command line, credentials from env: and file:.
#include "server/config.hpp"

#include <doctest/doctest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "tests/unit/support/serve_args.hpp"
#include "tests/unit/support/temp_dir.hpp"

namespace fs = std::filesystem;
using imagenbd::server::apply_config_file;
using imagenbd::server::ConfigError;
using imagenbd::server::ServeCommand;
using imagenbd::test::parse_serve_args;

namespace {

// A private directory with the config file (and whatever else a test writes).
struct ConfigDir : imagenbd::test::TempDir {
  ConfigDir() : TempDir("imagenbd-config") {}
};

// serve --config FILE [ARGS...] with the file applied.
ServeCommand load(const std::string& file, std::initializer_list<const char*> args = {}) {
  std::vector<std::string> all{"--config", file};
  all.insert(all.end(), args.begin(), args.end());
  ServeCommand cmd = parse_serve_args(all);
  apply_config_file(cmd);
  return cmd;
}

// The ConfigError's message, or "no error".
std::string load_error(const std::string& file, std::initializer_list<const char*> args = {}) {
  try {
    load(file, args);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("config: every key of the contract is read") {
  ConfigDir d;
  ::setenv("IMAGENBD_TEST_AZ", "UseDevelopmentStorage=true", 1);
  const std::string file = d.write("imagenbd.toml", R"(
[server]
listen = ["127.0.0.1:10900", "[::1]:10900", "unix:/run/imagenbd/nbd.sock"]
threads = 3
blocking-threads = 7
max-connections = 20
handshake-timeout = 5
idle-timeout = 600
pid-file = "/run/imagenbd/pid"
log-level = "debug"

[admin]
listen = "127.0.0.1:9109"

[tls]
mode = "require"
certificates = "/etc/imagenbd/tls"
verify-peer = true

[[export]]
name = "disk"
image = "/var/lib/imagenbd/disk.vhd"
description = "the disk"
format = "vhd"
read-only = false
parent = "/var/lib/imagenbd/base.vhd"
vhd-size = "chs"
allow = ["10.0.0.0/8", "::1"]
allow-identities = ["CN=node1,O=Example", "alice"]
max-connections = 4

[[export]]
name = "blob"
image = "az://devstoreaccount1/images/disk.vhd"
snapshot = "new"
lease-duration = 30
retry-deadline = 90
credentials = "env:IMAGENBD_TEST_AZ"

[[export]]
name = "writer"
image = "az://devstoreaccount1/images/other.vhd"
force = true
credentials = "file:/etc/imagenbd/azure.secret"
)");
  const ServeCommand cmd = load(file);
  const auto& s = cmd.server;
  CHECK(s.listen.tcp);
  CHECK(s.listen.port == 10900);
  CHECK(s.listen.bind_addresses == std::vector<std::string>{"127.0.0.1", "::1"});
  CHECK(s.listen.unix_paths == std::vector<std::string>{"/run/imagenbd/nbd.sock"});
  CHECK(s.threads == 3);
  CHECK(cmd.blocking_threads == 7);
  CHECK(s.max_clients == 20);
  CHECK(s.session.handshake_timeout == std::chrono::seconds(5));
  CHECK(s.session.idle_timeout == std::chrono::seconds(600));
  CHECK(s.pid_file == "/run/imagenbd/pid");
  CHECK(cmd.log.control_debug);
  CHECK_FALSE(cmd.log.data_debug);
  CHECK(s.admin.listen == "127.0.0.1:9109");
  CHECK(s.tls.mode == imagenbd::protocol::TlsMode::require);
  CHECK(s.tls.certificates_dir == "/etc/imagenbd/tls");
  CHECK(s.tls.verify_peer);

  REQUIRE(cmd.exports.size() == 3);
  const auto& disk = cmd.exports[0];
  CHECK(disk.name == "disk");
  CHECK(disk.image == "/var/lib/imagenbd/disk.vhd");
  CHECK(disk.description == "the disk");
  CHECK(disk.format == imagenbd::formats::Format::vhd);
  CHECK_FALSE(disk.read_only);
  CHECK(disk.parent == "/var/lib/imagenbd/base.vhd");
  CHECK(disk.vhd_size == imagenbd::formats::vhd::SizePolicy::chs);
  REQUIRE(disk.access.allow.size() == 2);
  CHECK(disk.access.allow[0].prefix == 8);
  CHECK(disk.access.allow[1].prefix == 128);
  CHECK(disk.access.tls_identities == std::vector<std::string>{"CN=node1,O=Example", "alice"});
  CHECK(disk.access.max_connections == 4);
  const auto& blob = cmd.exports[1];
  CHECK(blob.snapshot == "new");
  CHECK(blob.read_only);  // a snapshot cannot be written
  CHECK(blob.lease_duration == 30);
  CHECK(blob.retry_deadline == 90);
  CHECK(blob.credentials == "env:IMAGENBD_TEST_AZ");
  const auto& writer = cmd.exports[2];
  CHECK(writer.force);
  CHECK(writer.credentials == "file:/etc/imagenbd/azure.secret");
  ::unsetenv("IMAGENBD_TEST_AZ");
}

TEST_CASE("config: defaults of a minimal file are the command line's") {
  ConfigDir d;
  const std::string file = d.write("min.toml", "[[export]]\nname = \"\"\nimage = \"memory:1M\"\n");
  const ServeCommand cmd = load(file);
  const ServeCommand plain = parse_serve_args({"memory:1M"});
  CHECK(cmd.server.listen.tcp);
  CHECK(cmd.server.listen.port == 10809);
  CHECK(cmd.server.listen.bind_addresses.empty());
  CHECK(cmd.server.threads == 0);
  CHECK(cmd.server.max_clients == 0);
  CHECK(cmd.server.session.handshake_timeout == plain.server.session.handshake_timeout);
  CHECK(cmd.server.session.idle_timeout.count() == 0);
  CHECK(cmd.server.tls.mode == imagenbd::protocol::TlsMode::off);
  CHECK(cmd.server.admin.listen.empty());
  CHECK(cmd.log.level == imagenbd::log::Level::info);
  REQUIRE(cmd.exports.size() == 1);
  CHECK(cmd.exports[0] == plain.exports[0]);
}

TEST_CASE("config: errors name file:line, the export and the key, with did-you-mean") {
  ConfigDir d;
  const std::string f1 = d.write("a.toml", R"([[export]]
name = "disk"
image = "memory:1M"
readonly = true
)");
  CHECK(load_error(f1) ==
        f1 + ":4: export 'disk': unknown key 'readonly' (did you mean 'read-only'?)");

  const std::string f2 = d.write("b.toml", "[server]\nthreads = \"4\"\n");
  CHECK(load_error(f2) ==
        f2 + ":2: [server]: threads: expected an integer (no quotes), not a string");

  const std::string f3 = d.write("c.toml", "[server]\n\nthread = 4\n");
  CHECK(load_error(f3) == f3 + ":3: [server]: unknown key 'thread' (did you mean 'threads'?)");

  const std::string f4 = d.write("d.toml",
                                 "[[export]]\nname = \"x\"\nimage = \"m.img\"\n"
                                 "lease-duration = 5\n");
  CHECK(load_error(f4) ==
        f4 + ":4: export 'x': lease-duration: 5 is out of range (expected 15 to 60)");

  const std::string f5 = d.write("e.toml", "[[export]]\nimage = \"m.img\"\n");
  CHECK(load_error(f5).starts_with(f5 + ":1: export #1: 'name' is missing"));

  const std::string f6 = d.write("f.toml",
                                 "[[export]]\nname = \"x\"\nimage = \"a.img\"\n\n"
                                 "[[export]]\nname = \"x\"\nimage = \"b.img\"\n");
  CHECK(load_error(f6) == f6 + ":5: export name 'x' is used twice (also at " + f6 + ":1)");

  const std::string f7 = d.write("g.toml", "[server]\nthreads = 4\nlisten = [\"a:1\"\n");
  CHECK(load_error(f7).starts_with(f7 + ":"));
  CHECK(load_error(f7).find("not valid TOML") != std::string::npos);

  const std::string f8 = d.write("h.toml", "[export]\nname = \"x\"\nimage = \"a.img\"\n");
  CHECK(load_error(f8).find("[[export]] table (double brackets)") != std::string::npos);

  const std::string f9 = d.write("i.toml", "threads = 4\n");
  CHECK(load_error(f9) == f9 + ":1: unknown key 'threads' (it belongs under [server])");

  const std::string f10 = d.write("j.toml", "[[exports]]\nname = \"x\"\n");
  CHECK(load_error(f10) == f10 + ":1: unknown key 'exports' (did you mean 'export'?)");

  const std::string f11 = d.write("k.toml", "[server]\nlisten = [\"127.0.0.1\"]\n");
  CHECK(load_error(f11).starts_with(f11 + ":2: [server]: listen: '127.0.0.1' is not HOST:PORT"));

  const std::string f12 = d.write("l.toml", "[server]\nlisten = [\"127.0.0.1:1\", \"[::1]:2\"]\n");
  CHECK(load_error(f12).find("every TCP address must use the same port") != std::string::npos);

  const std::string f13 = d.write("m.toml",
                                  "[[export]]\nname = \"x\"\nimage = \"a.img\"\n"
                                  "format = \"qcow2\"\n");
  CHECK(load_error(f13).starts_with(f13 + ":4: export 'x': format: unknown image format 'qcow2'"));

  const std::string f14 = d.write("n.toml",
                                  "[[export]]\nname = \"x\"\nimage = \"a.img\"\n"
                                  "read-only = \"yes\"\n");
  CHECK(load_error(f14) == f14 +
                               ":4: export 'x': read-only: expected a boolean (true or false, "
                               "no quotes), not a string");

  const std::string f15 = d.write("o.toml", "[tls]\nmode = \"require\"\n");
  CHECK(load_error(f15).find("needs certificates") != std::string::npos);

  const std::string f16 = d.write("p.toml",
                                  "[[export]]\nname = \"x\"\nimage = \"a.img\"\n"
                                  "snapshot = \"new\"\n");
  CHECK(load_error(f16) ==
        f16 + ":4: export 'x': snapshot: applies to Azure blob images only (az://, https://...)");

  const std::string f17 = d.write("q.toml",
                                  "[[export]]\nname = \"x\"\nimage = \"a.img\"\n"
                                  "allow-identities = [\"alice\"]\n");
  CHECK(load_error(f17).find("allow-identities needs TLS") != std::string::npos);

  const std::string f18 = d.write("r.toml", "[server]\nthreads = 1\n");
  CHECK(load_error(f18).find("no exports") != std::string::npos);

  CHECK(load_error(d.file("missing.toml")).starts_with("cannot read " + d.file("missing.toml")));
}

TEST_CASE("config: allow takes CIDR blocks and names the bad one") {
  ConfigDir d;
  const std::string file = d.write("a.toml",
                                   "[[export]]\nname = \"x\"\nimage = \"memory:1M\"\n"
                                   "allow = [\"10.0.0.0/8\",\n  \"300.1.1.1\"]\n");
  const std::string error = load_error(file);
  CHECK(error.starts_with(file + ":5: export 'x': allow: "));
  CHECK(error.find("300.1.1.1") != std::string::npos);
}

TEST_CASE("config: relative paths start at the file's directory") {
  ConfigDir d;
  fs::create_directories(d.path / "etc");
  const std::string file = d.write("etc/imagenbd.toml", R"(
[server]
listen = ["unix:run/nbd.sock"]
pid-file = "run/pid"
[admin]
listen = "unix:admin.sock"
[tls]
psk-file = "keys.psk"
[[export]]
name = "a"
image = "../images/a.vhd"
parent = "base.vhd"
[[export]]
name = "b"
image = "file:b.img"
[[export]]
name = "c"
image = "memory:1G"
[[export]]
name = "d"
image = "az://acct/cont/blob"
credentials = "file:secret"
)");
  const ServeCommand cmd = load(file);
  const std::string etc = (fs::absolute(d.path) / "etc").string();
  CHECK(cmd.server.listen.unix_paths == std::vector<std::string>{etc + "/run/nbd.sock"});
  CHECK_FALSE(cmd.server.listen.tcp);
  CHECK(cmd.server.pid_file == etc + "/run/pid");
  CHECK(cmd.server.admin.listen == "unix:" + etc + "/admin.sock");
  CHECK(cmd.server.tls.psk_file == etc + "/keys.psk");
  CHECK(cmd.server.tls.mode == imagenbd::protocol::TlsMode::on);  // credentials alone
  CHECK(cmd.exports[0].image == (fs::absolute(d.path) / "images/a.vhd").string());
  CHECK(cmd.exports[0].parent == etc + "/base.vhd");
  CHECK(cmd.exports[1].image == "file:" + etc + "/b.img");
  CHECK(cmd.exports[2].image == "memory:1G");
  CHECK(cmd.exports[3].image == "az://acct/cont/blob");
  CHECK(cmd.exports[3].credentials == "file:" + etc + "/secret");
}

TEST_CASE("config: the command line wins, its images come after the file's exports") {
  ConfigDir d;
  const std::string file = d.write("a.toml", R"(
[server]
listen = ["127.0.0.1:10900"]
threads = 8
max-connections = 3
log-level = "warning"
[[export]]
name = "disk"
image = "memory:1M"
)");
  const ServeCommand cmd =
      load(file, {"--threads=4", "-k", "/tmp/x.sock", "-v", "extra=memory:2M"});
  CHECK(cmd.server.threads == 4);
  CHECK(cmd.server.max_clients == 3);  // not on the command line: from the file
  CHECK(cmd.server.listen.unix_paths == std::vector<std::string>{"/tmp/x.sock"});
  CHECK_FALSE(cmd.server.listen.tcp);  // -k alone, as without a file
  CHECK(cmd.log.level == imagenbd::log::Level::info);
  CHECK(cmd.log.control_debug);
  REQUIRE(cmd.exports.size() == 2);
  CHECK(cmd.exports[0].name == "disk");
  CHECK(cmd.exports[1].name == "extra");
  // The command line is kept as it was, for reloads.
  REQUIRE(cmd.command_line);
  CHECK(cmd.command_line->exports.size() == 1);
  CHECK(cmd.command_line->server.max_clients == 0);
  CHECK(cmd.command_line->config_file == file);

  CHECK(load_error(file, {"disk=memory:4M"}) ==
        "export name 'disk' is used twice: in " + file + ":7 and on the command line");
  // Without a conflicting flag the file's listener is used.
  const ServeCommand plain = load(file);
  CHECK(plain.server.listen.bind_addresses == std::vector<std::string>{"127.0.0.1"});
  CHECK(plain.server.listen.port == 10900);
  CHECK(plain.log.level == imagenbd::log::Level::warning);
}

TEST_CASE("config: credentials come from env:VAR or file:PATH, never inline") {
  ConfigDir d;
  const std::string head = "[[export]]\nname = \"x\"\nimage = \"az://acct/cont/blob\"\n";
  ::unsetenv("IMAGENBD_TEST_MISSING");
  const std::string f1 = d.write("a.toml", head + "credentials = \"env:IMAGENBD_TEST_MISSING\"\n");
  CHECK(load_error(f1).starts_with(
      f1 +
      ":4: export 'x': credentials: the environment variable 'IMAGENBD_TEST_MISSING' is "
      "not set"));
  const std::string f2 = d.write("b.toml", head + "credentials = \"AccountKey=abc\"\n");
  CHECK(load_error(f2) == f2 + ":4: export 'x': credentials: credentials must be env:VAR or "
                               "file:PATH (never inline)");
  const std::string f3 = d.write("c.toml",
                                 "[[export]]\nname = \"x\"\nimage = \"x.img\"\n"
                                 "credentials = \"env:HOME\"\n");
  CHECK(load_error(f3).find("applies to Azure blob images only") != std::string::npos);

  using imagenbd::server::resolve_credentials;
  ::setenv("IMAGENBD_TEST_CS",
           "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey=a2V5;"
           "BlobEndpoint=http://127.0.0.1:1/acct",
           1);
  const auto from_env = resolve_credentials("env:IMAGENBD_TEST_CS");
  CHECK(from_env.account == "acct");
  CHECK(from_env.key == "a2V5");
  CHECK(from_env.blob_endpoint == "http://127.0.0.1:1/acct");
  ::unsetenv("IMAGENBD_TEST_CS");
  CHECK_THROWS_WITH_AS(resolve_credentials("env:IMAGENBD_TEST_CS"),
                       doctest::Contains("'IMAGENBD_TEST_CS' is not set"), std::invalid_argument);

  d.write("sas", "?sv=2022-11-02&sp=rw&sig=abc%3D\n");
  const auto sas = resolve_credentials("file:" + d.file("sas"));
  CHECK(sas.sas == "sv=2022-11-02&sp=rw&sig=abc%3D");  // '?' and newline dropped
  CHECK(sas.key.empty());
  d.write("cs", "UseDevelopmentStorage=true\r\n");
  CHECK(resolve_credentials("file:" + d.file("cs")).account == "devstoreaccount1");
  d.write("bad", "AccountName=acct;AccountKey=not base64!\n");
  CHECK_THROWS_WITH_AS(resolve_credentials("file:" + d.file("bad")),
                       doctest::Contains(("(in " + d.file("bad") + ")").c_str()),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(resolve_credentials("file:" + d.file("nothing")),
                       doctest::Contains(("cannot read " + d.file("nothing")).c_str()),
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(resolve_credentials("sv=1&sig=2"),
                       "credentials must be env:VAR or file:PATH (never inline)",
                       std::invalid_argument);
}

TEST_CASE("check_config_files: local images, parents, TLS and credential files exist") {
  ConfigDir d;
  d.write("a.img", "");
  const std::string ok = d.write("ok.toml", "[[export]]\nname = \"a\"\nimage = \"a.img\"\n");
  CHECK_NOTHROW(imagenbd::server::check_config_files(load(ok)));
  const std::string missing =
      d.write("missing.toml", "[[export]]\nname = \"b\"\nimage = \"b.img\"\n");
  CHECK_THROWS_WITH_AS(
      imagenbd::server::check_config_files(load(missing)),
      (missing + ": export 'b': " + d.file("b.img") + ": No such file or directory").c_str(),
      ConfigError);
  const std::string tls = d.write("tls.toml",
                                  "[tls]\ncertificates = \"certs\"\n"
                                  "[[export]]\nname = \"a\"\nimage = \"a.img\"\n");
  CHECK_THROWS_WITH_AS(imagenbd::server::check_config_files(load(tls)),
                       doctest::Contains("server-cert.pem"), ConfigError);
}
