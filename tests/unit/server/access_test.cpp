// Access rules: CIDR parsing and matching, refusal reasons, and what PeerCatalog shows one
// client (refusals filled in, exports hidden, refusals counted once).
#include "server/access.hpp"

#include <doctest/doctest.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "backends/memory.hpp"
#include "server/exports.hpp"

using imagenbd::server::access_check;
using imagenbd::server::access_refusal;
using imagenbd::server::AccessRules;
using imagenbd::server::Cidr;
using imagenbd::server::Export;
using imagenbd::server::ExportRegistry;
using imagenbd::server::identity_matches;
using imagenbd::server::PeerCatalog;
using imagenbd::server::PeerInfo;
using imagenbd::server::Refusal;
namespace ip = boost::asio::ip;

namespace {

ip::address addr(const char* text) {
  return ip::make_address(text);
}

bool in(const char* block, const char* address) {
  return Cidr::parse(block).contains(addr(address));
}

std::string parse_error(const char* text) {
  try {
    Cidr::parse(text);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(parsed)";
}

std::shared_ptr<Export> make_export(std::string name, AccessRules rules = {}) {
  auto e = std::make_shared<Export>();
  e->name = std::move(name);
  e->device = imagenbd::backends::open_memory(1 << 20);
  e->leaf = e->device;
  e->access = std::move(rules);
  return e;
}

PeerInfo tcp(const char* address) {
  return PeerInfo{.address = addr(address)};
}

PeerInfo tls(std::string identity, const char* address = "192.0.2.1") {
  return PeerInfo{.address = addr(address), .tls = true, .tls_identity = std::move(identity)};
}

}  // namespace

TEST_CASE("Cidr parses v4 and v6 blocks and single hosts") {
  CHECK(Cidr::parse("10.0.0.0/8").to_string() == "10.0.0.0/8");
  CHECK(Cidr::parse("192.0.2.7").to_string() == "192.0.2.7/32");
  CHECK(Cidr::parse("0.0.0.0/0").to_string() == "0.0.0.0/0");
  CHECK(Cidr::parse("192.0.2.7/32").to_string() == "192.0.2.7/32");
  CHECK(Cidr::parse("::1").to_string() == "::1/128");
  CHECK(Cidr::parse("::/0").to_string() == "::/0");
  CHECK(Cidr::parse("2001:db8::/32").to_string() == "2001:db8::/32");
  CHECK(Cidr::parse("2001:DB8:0:0::/64").to_string() == "2001:db8::/64");
  CHECK(Cidr::parse("fe80::1/128").prefix == 128);
  // Spaces, as in "--allow='10.0.0.0/8, ::1'", are forgiven.
  CHECK(Cidr::parse("  10.0.0.0/8 ").to_string() == "10.0.0.0/8");
  // IPv4-mapped blocks are kept in their IPv4 form.
  CHECK(Cidr::parse("::ffff:10.0.0.0/104").to_string() == "10.0.0.0/8");
  CHECK(Cidr::parse("::ffff:192.0.2.7").to_string() == "192.0.2.7/32");
  CHECK(Cidr::parse("::ffff:0:0/96").to_string() == "0.0.0.0/0");
  CHECK(Cidr::parse("10.0.0.0/8") == Cidr::parse("::ffff:10.0.0.0/104"));
}

TEST_CASE("Cidr refuses junk, prefixes out of range and host bits with a clear message") {
  for (const char* junk :
       {"", " ", "/8", "10.0.0.0/", "10.0.0.0/x", "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/8/8",
        "10.0.0.0/ 8", "10.0.0", "10.0.0.256", "1.2.3.4.5", "localhost", "10.0.0.0/8,", "::g",
        "1:2:3:4:5:6:7:8:9", "fe80::1%eth0", "fe80::1%eth0/64", "10.0.0.0/0008",
        // Leading zeros read as octal elsewhere: ambiguous, refused.
        "010.0.0.1", "10.0.0.01/32"}) {
    CAPTURE(junk);
    CHECK_THROWS_AS(Cidr::parse(junk), std::invalid_argument);
  }
  CHECK(parse_error("bogus").find("'bogus' is not an address block") != std::string::npos);
  CHECK(parse_error("10.0.0.0/33").find("at most 32 for an IPv4 address") != std::string::npos);
  CHECK(parse_error("::/129").find("at most 128 for an IPv6 address") != std::string::npos);
  CHECK(parse_error("10.0.0.0/999").find("at most 32") != std::string::npos);
  // Host bits: refused, naming the block the user probably meant.
  CHECK(parse_error("10.0.0.1/8").find("write 10.0.0.0/8") != std::string::npos);
  CHECK(parse_error("192.168.1.5/24").find("write 192.168.1.0/24") != std::string::npos);
  CHECK(parse_error("2001:db8::1/32").find("write 2001:db8::/32") != std::string::npos);
  CHECK(parse_error("10.0.0.1/31").find("write 10.0.0.0/31") != std::string::npos);
  CHECK(parse_error("0.0.0.1/0").find("write 0.0.0.0/0") != std::string::npos);
}

TEST_CASE("Cidr matching, with edge prefixes") {
  struct Case {
    const char* block;
    const char* address;
    bool expected;
  };
  const Case table[] = {
      {"10.0.0.0/8", "10.0.0.1", true},
      {"10.0.0.0/8", "10.255.255.255", true},
      {"10.0.0.0/8", "11.0.0.0", false},
      {"10.0.0.0/8", "9.255.255.255", false},
      {"192.0.2.0/25", "192.0.2.127", true},
      {"192.0.2.0/25", "192.0.2.128", false},
      {"192.0.2.128/25", "192.0.2.128", true},
      {"172.16.0.0/12", "172.31.255.1", true},
      {"172.16.0.0/12", "172.32.0.1", false},
      {"0.0.0.0/0", "203.0.113.9", true},
      {"0.0.0.0/0", "::ffff:203.0.113.9", true},
      {"0.0.0.0/0", "2001:db8::1", false},
      {"192.0.2.7/32", "192.0.2.7", true},
      {"192.0.2.7/32", "192.0.2.6", false},
      {"192.0.2.7/32", "192.0.2.8", false},
      {"127.0.0.1", "127.0.0.1", true},
      {"127.0.0.2/32", "127.0.0.1", false},
      {"127.0.0.0/8", "127.0.0.2", true},
      // IPv4-mapped IPv6 clients (dual-stack listeners) match IPv4 blocks.
      {"127.0.0.0/8", "::ffff:127.0.0.1", true},
      {"10.0.0.0/8", "::ffff:10.1.2.3", true},
      {"10.0.0.0/8", "::ffff:11.1.2.3", false},
      {"192.0.2.7", "::ffff:192.0.2.7", true},
      // ... and IPv6 blocks that cover the mapped range match IPv4 clients.
      {"::ffff:0:0/96", "198.51.100.1", true},
      {"::/0", "198.51.100.1", true},
      {"2001:db8::/32", "198.51.100.1", false},
      // Plain IPv6.
      {"::1", "::1", true},
      {"::1", "::2", false},
      {"::1/128", "::1", true},
      {"::1", "127.0.0.1", false},
      {"127.0.0.1", "::1", false},
      {"::/0", "2001:db8::1", true},
      {"2001:db8::/32", "2001:db8:ffff:ffff::1", true},
      {"2001:db8::/32", "2001:db9::1", false},
      {"2001:db8::/33", "2001:db8:7fff::1", true},
      {"2001:db8::/33", "2001:db8:8000::1", false},
      {"2001:db8::1/127", "2001:db8::", false},
      {"2001:db8::/127", "2001:db8::1", true},
      {"2001:db8::/127", "2001:db8::2", false},
      {"fe80::/10", "febf::1", true},
      {"fe80::/10", "fec0::1", false},
      // The IPv4-compatible (deprecated) form is not IPv4.
      {"10.0.0.0/8", "::10.0.0.1", false},
  };
  for (const auto& c : table) {
    CAPTURE(c.block);
    CAPTURE(c.address);
    if (std::string(c.block) == "2001:db8::1/127") {
      CHECK_THROWS_AS(Cidr::parse(c.block), std::invalid_argument);
      continue;
    }
    CHECK(in(c.block, c.address) == c.expected);
  }
}

TEST_CASE("everyone may use an export without rules") {
  auto e = make_export("disk");
  CHECK(access_refusal(*e, tcp("203.0.113.9")) == "");
  CHECK(access_refusal(*e, PeerInfo{}) == "");
  CHECK(access_refusal(*e, tls("CN=anyone")) == "");
  CHECK(access_check(*e, tcp("::1")).kind == Refusal::Kind::none);
}

TEST_CASE("address rule") {
  auto e = make_export("disk", {.allow = {Cidr::parse("192.0.2.0/24"), Cidr::parse("::1")}});
  CHECK(access_refusal(*e, tcp("192.0.2.1")) == "");
  CHECK(access_refusal(*e, tcp("::ffff:192.0.2.200")) == "");
  CHECK(access_refusal(*e, tcp("::1")) == "");
  CHECK(access_refusal(*e, tcp("198.51.100.1")) ==
        "client 198.51.100.1 is not allowed to use export 'disk'");
  // Mapped clients are named in their IPv4 form.
  CHECK(access_refusal(*e, tcp("::ffff:198.51.100.1")) ==
        "client 198.51.100.1 is not allowed to use export 'disk'");
  CHECK(access_refusal(*e, tcp("2001:db8::5")) ==
        "client 2001:db8::5 is not allowed to use export 'disk'");
  CHECK(access_check(*e, tcp("2001:db8::5")).kind == Refusal::Kind::address);
  // Unix socket clients have no address: file permissions guard the socket.
  CHECK(access_refusal(*e, PeerInfo{}) == "");
  // TLS does not bypass the address rule.
  CHECK(access_check(*e, tls("CN=x", "198.51.100.1")).kind == Refusal::Kind::address);
}

TEST_CASE("identity rule") {
  auto e = make_export("disk", {.tls_identities = {"CN=node1,O=Example", "alice"}});
  CHECK(access_refusal(*e, tcp("192.0.2.1")) == "export 'disk' requires TLS");
  CHECK(access_refusal(*e, PeerInfo{}) == "export 'disk' requires TLS");
  CHECK(access_check(*e, PeerInfo{}).kind == Refusal::Kind::identity);
  CHECK(access_refusal(*e, tls("")).find("requires a TLS client identity") != std::string::npos);
  CHECK(access_refusal(*e, tls("CN=node1,O=Example")) == "");
  CHECK(access_refusal(*e, tls("alice")) == "");
  CHECK(access_refusal(*e, tls("bob")) == "TLS identity 'bob' is not allowed to use export 'disk'");
  CHECK(access_refusal(*e, tls("CN=node2,O=Example")) ==
        "TLS identity 'CN=node2,O=Example' is not allowed to use export 'disk'");
  CHECK(access_check(*e, tls("ALICE")).kind == Refusal::Kind::identity);
  // Unix socket clients must present an identity too.
  CHECK(access_refusal(*e, PeerInfo{.tls = true, .tls_identity = "alice"}) == "");
}

TEST_CASE("identities compare as DNs, forgiving spaces and attribute case") {
  CHECK(identity_matches("CN=node1,O=Example", "CN=node1,O=Example"));
  CHECK(identity_matches("cn=node1, o=Example", "CN=node1,O=Example"));
  CHECK(identity_matches(" CN = node1 , O = Example ", "CN=node1,O=Example"));
  CHECK_FALSE(identity_matches("CN=Node1,O=Example", "CN=node1,O=Example"));
  CHECK_FALSE(identity_matches("O=Example,CN=node1", "CN=node1,O=Example"));
  CHECK_FALSE(identity_matches("CN=node1", "CN=node1,O=Example"));
  CHECK_FALSE(identity_matches("CN=node1,O=Example", "CN=node1,O=Example,C=US"));
  // Escaped commas belong to the value.
  CHECK(identity_matches("CN=Doe\\, John,O=Example", "CN=Doe\\, John,O=Example"));
  CHECK_FALSE(identity_matches("CN=Doe\\, John", "CN=Doe,CN=John"));
  // PSK user names: exact.
  CHECK(identity_matches("alice", "alice"));
  CHECK_FALSE(identity_matches("alice", "Alice"));
  CHECK_FALSE(identity_matches("alice", ""));
  CHECK_FALSE(identity_matches("", ""));
}

TEST_CASE("connection limit") {
  auto e = make_export("disk", {.max_connections = 2});
  CHECK(access_refusal(*e, tcp("192.0.2.1")) == "");
  e->metrics->connection_opened();
  CHECK(access_refusal(*e, tcp("192.0.2.1")) == "");
  e->metrics->connection_opened();
  CHECK(access_refusal(*e, tcp("192.0.2.1")) == "export 'disk' has its maximum of 2 connections");
  CHECK(access_check(*e, PeerInfo{}).kind == Refusal::Kind::full);
  e->metrics->connection_closed();
  CHECK(access_refusal(*e, tcp("192.0.2.1")) == "");

  auto one = make_export("solo", {.max_connections = 1});
  one->metrics->connection_opened();
  CHECK(access_refusal(*one, tcp("192.0.2.1")) == "export 'solo' has its maximum of 1 connection");
  // Address refusals come first: a stranger learns nothing about the load.
  auto both = make_export("both", {.allow = {Cidr::parse("10.0.0.0/8")}, .max_connections = 1});
  both->metrics->connection_opened();
  CHECK(access_check(*both, tcp("192.0.2.1")).kind == Refusal::Kind::address);
  CHECK(access_check(*both, tcp("10.0.0.1")).kind == Refusal::Kind::full);
}

TEST_CASE("PeerCatalog fills refusals, hides forbidden exports and counts each refusal once") {
  ExportRegistry registry;
  auto open = make_export("open");
  auto local = make_export("local", {.allow = {Cidr::parse("127.0.0.0/8")}});
  auto secret = make_export("secret", {.tls_identities = {"alice"}});
  auto full = make_export("full", {.max_connections = 1});
  full->metrics->connection_opened();
  registry.add(open);
  registry.add(local);
  registry.add(secret);
  registry.add(full);

  PeerInfo peer = tcp("192.0.2.1");
  PeerCatalog catalog(registry, peer);

  CHECK_FALSE(catalog.lookup("nonexistent").has_value());
  auto info = catalog.lookup("open");
  REQUIRE(info.has_value());
  CHECK(info->refusal == "");
  CHECK(info->size == 1 << 20);
  // The default export is the first one.
  REQUIRE(catalog.lookup("").has_value());
  CHECK(catalog.lookup("")->name == "open");

  info = catalog.lookup("local");
  REQUIRE(info.has_value());
  CHECK(info->refusal == "client 192.0.2.1 is not allowed to use export 'local'");
  CHECK(local->metrics->connections_refused == 1);
  // Looked up again (SET_META_CONTEXT, then GO): still refused, counted once.
  CHECK(catalog.lookup("local")->refusal != "");
  CHECK(local->metrics->connections_refused == 1);

  CHECK(catalog.lookup("secret")->refusal == "export 'secret' requires TLS");
  CHECK(catalog.lookup("full")->refusal == "export 'full' has its maximum of 1 connection");
  CHECK(secret->metrics->connections_refused == 1);
  CHECK(full->metrics->connections_refused == 1);
  CHECK(open->metrics->connections_refused == 0);

  // LIST: the full export stays (only busy), the forbidden ones go; listing counts nothing.
  auto names = [&] {
    std::string out;
    for (const auto& i : catalog.list()) out += i.name + " ";
    return out;
  };
  CHECK(names() == "open full ");
  CHECK(local->metrics->connections_refused == 1);

  // After STARTTLS the session fills in the identity: the catalog sees it.
  peer.tls = true;
  peer.tls_identity = "alice";
  CHECK(catalog.lookup("secret")->refusal == "");
  CHECK(names() == "open secret full ");

  // A local client sees the local export; a Unix socket client too.
  PeerInfo loopback = tcp("::ffff:127.0.0.1");
  PeerCatalog local_catalog(registry, loopback);
  CHECK(local_catalog.lookup("local")->refusal == "");
  PeerInfo unix_client;
  PeerCatalog unix_catalog(registry, unix_client);
  CHECK(unix_catalog.lookup("local")->refusal == "");
  CHECK(local->metrics->connections_refused == 1);

  // A new connection of the same client is a new refusal.
  PeerCatalog again(registry, peer);
  CHECK(again.lookup("local")->refusal != "");
  CHECK(local->metrics->connections_refused == 2);
}
