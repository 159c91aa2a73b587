// parse_serve for Azure blob images: URIs are never split at a '=' of their query, the
// --snapshot/--force/--lease-duration/--retry-deadline flags and their usage errors.
#include <doctest/doctest.h>

#include <initializer_list>
#include <string>
#include <vector>

#include "server/cli.hpp"
#include "tests/unit/support/serve_args.hpp"

using imagenbd::server::ServeCommand;
using imagenbd::server::UsageError;

using imagenbd::test::parse_serve_args;
using imagenbd::test::serve_usage_error;

TEST_CASE("URIs with '=' in the query are not taken for NAME=IMAGE") {
  auto one = parse_serve_args({"az://acct/images/disk.vhd?snapshot=2026-11-21T04:55:55.2300000Z"});
  REQUIRE(one.exports.size() == 1);
  CHECK(one.exports[0].name == "");
  CHECK(one.exports[0].image == "az://acct/images/disk.vhd?snapshot=2026-11-21T04:55:55.2300000Z");
  auto sas =
      parse_serve_args({"https://acct.blob.core.windows.net/c/d.vhd?sv=2021-08-06&sig=a%2Bb="});
  CHECK(sas.exports[0].name == "");
  CHECK(sas.exports[0].image.starts_with("https://"));
  auto named = parse_serve_args({"disk=az://acct/images/disk.vhd?snapshot=T",
                                 "local=http://127.0.0.1:10000/devstoreaccount1/c/b?sv=1&sig=x"});
  REQUIRE(named.exports.size() == 2);
  CHECK(named.exports[0].name == "disk");
  CHECK(named.exports[0].image == "az://acct/images/disk.vhd?snapshot=T");
  CHECK(named.exports[1].name == "local");
  CHECK(named.exports[1].image == "http://127.0.0.1:10000/devstoreaccount1/c/b?sv=1&sig=x");
  // A prefix with ':' before the '=' is part of the image too.
  CHECK(parse_serve_args({"file:a=b.img"}).exports[0].image == "file:a=b.img");
}

TEST_CASE("Azure defaults: live blob, no force, 60 s lease and retry deadline") {
  auto cmd = parse_serve_args({"az://acct/images/disk.vhd"});
  const auto& spec = cmd.exports.at(0);
  CHECK(spec.snapshot.empty());
  CHECK_FALSE(spec.force);
  CHECK_FALSE(spec.read_only);
  CHECK(spec.lease_duration == 60);
  CHECK(spec.retry_deadline == 60);
}

TEST_CASE("--snapshot takes a new snapshot or names one, and implies read-only") {
  auto fresh = parse_serve_args({"--snapshot", "az://acct/images/disk.vhd"});
  CHECK(fresh.exports.at(0).snapshot == "new");
  CHECK(fresh.exports.at(0).read_only);
  auto named =
      parse_serve_args({"--snapshot=2026-11-21T04:55:55.2300000Z", "az://acct/images/disk.vhd"});
  CHECK(named.exports.at(0).snapshot == "2026-11-21T04:55:55.2300000Z");
  CHECK(named.exports.at(0).read_only);
}

TEST_CASE("--force, --lease-duration and --retry-deadline reach every export") {
  auto cmd = parse_serve_args(
      {"--force", "--lease-duration=15", "--retry-deadline", "5", "a=az://x/c/a", "b=az://x/c/b"});
  REQUIRE(cmd.exports.size() == 2);
  for (const auto& spec : cmd.exports) {
    CHECK(spec.force);
    CHECK(spec.lease_duration == 15);
    CHECK(spec.retry_deadline == 5);
  }
}

TEST_CASE("Azure usage errors say what is wrong") {
  CHECK(serve_usage_error({"--lease-duration=10", "az://x/c/b"}).find("15 to 60") !=
        std::string::npos);
  CHECK(serve_usage_error({"--lease-duration=61", "az://x/c/b"}).find("--lease-duration") !=
        std::string::npos);
  CHECK(serve_usage_error({"--retry-deadline=soon", "az://x/c/b"}).find("--retry-deadline") !=
        std::string::npos);
  CHECK(serve_usage_error({"--force", "-r", "az://x/c/b"}).find("--read-only") !=
        std::string::npos);
  CHECK(serve_usage_error({"--force", "--snapshot", "az://x/c/b"}).find("--snapshot") !=
        std::string::npos);
}
