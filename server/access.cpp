// Access rules: CIDR blocks, TLS identities and connection limits, checked when a client
// names an export. Decisions are pure functions of the rules, what we know about the peer
// and the export's live connection count; PeerCatalog applies them for one session.
#include "server/access.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <stdexcept>

#include "backends/log.hpp"
#include "server/exports.hpp"

namespace imagenbd::server {

namespace ip = boost::asio::ip;

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// ::ffff:a.b.c.d as a.b.c.d; everything else unchanged. Dual-stack listeners ([::]) see
// IPv4 clients this way.
ip::address unmapped(const ip::address& a) {
  if (a.is_v6() && a.to_v6().is_v4_mapped()) {
    return ip::make_address_v4(ip::v4_mapped, a.to_v6());
  }
  return a;
}

// The address with every bit past `prefix` cleared, as bytes (4 or 16 of them).
template <std::size_t N>
std::array<unsigned char, N> masked(std::array<unsigned char, N> bytes, unsigned prefix) {
  for (std::size_t i = 0; i < N; ++i) {
    const unsigned first_bit = static_cast<unsigned>(i) * 8;
    if (prefix <= first_bit) {
      bytes[i] = 0;
    } else if (prefix < first_bit + 8) {
      bytes[i] &= static_cast<unsigned char>(0xFF00u >> (prefix - first_bit));
    }
  }
  return bytes;
}

// The client as a log line names it.
std::string describe(const PeerInfo& peer) {
  if (!peer.address) return "Unix socket client";
  return unmapped(*peer.address).to_string();
}

// RFC 2253 subject DNs as tls_peer_identity() writes them ("CN=node1,O=Example"), with
// what people add when they type one: spaces after the commas or around '=', and
// lower-case attribute types ("cn=node1, o=Example"). Values keep their case and any
// escaped characters ("\,"). A PSK user name has no '=' and is compared as it is.
std::string normalise_identity(std::string_view text) {
  text = trim(text);
  if (text.find('=') == std::string_view::npos) return std::string(text);
  std::string out;
  std::string_view rest = text;
  while (true) {
    // The next unescaped ',' (or '+', which joins the parts of a multi-valued RDN).
    std::size_t end = 0;
    while (end < rest.size() && rest[end] != ',' && rest[end] != '+') {
      end += rest[end] == '\\' && end + 1 < rest.size() ? 2 : 1;
    }
    std::string_view part = trim(rest.substr(0, end));
    auto eq = part.find('=');
    if (eq == std::string_view::npos) {
      out += part;
    } else {
      for (char c : trim(part.substr(0, eq))) {
        out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      }
      out += '=';
      out += trim(part.substr(eq + 1));
    }
    if (end >= rest.size()) break;
    out += rest[end];
    rest.remove_prefix(end + 1);
  }
  return out;
}

}  // namespace

// Host bits set ("10.0.0.1/8") are refused rather than cleared: in an allow-list a typo
// for "10.0.0.1/32" or "10.0.0.0/8" should not silently mean something else.
Cidr Cidr::parse(std::string_view text) {
  const std::string original(text);
  const std::string_view t = trim(text);
  auto bad = [&](const std::string& why) {
    return std::invalid_argument("'" + original + "' is not an address block: " + why +
                                 " (expected e.g. 10.0.0.0/8, 192.0.2.7, 2001:db8::/32 or ::1)");
  };
  if (t.empty()) throw bad("it is empty");
  const auto slash = t.find('/');
  const std::string address_text(t.substr(0, slash));
  if (address_text.find('%') != std::string::npos) {
    throw bad("a scope id (%...) has no place in an address block");
  }
  boost::system::error_code ec;
  ip::address address = ip::make_address(address_text, ec);
  if (ec) throw bad("'" + address_text + "' is not an IPv4 or IPv6 address");
  const unsigned bits = address.is_v4() ? 32 : 128;

  unsigned prefix = bits;
  if (slash != std::string_view::npos) {
    const std::string_view p = t.substr(slash + 1);
    if (p.empty() || p.size() > 3 ||
        !std::all_of(p.begin(), p.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      throw bad("the prefix length after '/' must be a number");
    }
    prefix = static_cast<unsigned>(std::stoul(std::string(p)));
    if (prefix > bits) {
      throw bad("the prefix length is " + std::to_string(prefix) + ", at most " +
                std::to_string(bits) + " for an " + (address.is_v4() ? "IPv4" : "IPv6") +
                " address");
    }
  }

  // ::ffff:10.0.0.0/104 is 10.0.0.0/8: keep IPv4 blocks in one form.
  if (address.is_v6() && address.to_v6().is_v4_mapped() && prefix >= 96) {
    address = unmapped(address);
    prefix -= 96;
  }

  Cidr cidr{.network = address, .prefix = prefix};
  const bool host_bits =
      address.is_v4() ? masked(address.to_v4().to_bytes(), prefix) != address.to_v4().to_bytes()
                      : masked(address.to_v6().to_bytes(), prefix) != address.to_v6().to_bytes();
  if (host_bits) {
    Cidr network = cidr;
    network.network = address.is_v4()
                          ? ip::address(ip::address_v4(masked(address.to_v4().to_bytes(), prefix)))
                          : ip::address(ip::address_v6(masked(address.to_v6().to_bytes(), prefix)));
    throw bad("bits are set past the prefix length; write " + network.to_string() +
              " for the block, or the address alone for one host");
  }
  return cidr;
}

bool Cidr::contains(const ip::address& address) const {
  ip::address a = unmapped(address);
  if (network.is_v4()) {
    if (!a.is_v4()) return false;
    return masked(a.to_v4().to_bytes(), prefix) == network.to_v4().to_bytes();
  }
  // An IPv6 block that covers ::ffff:0:0/96 (or part of it) also covers IPv4 clients.
  if (a.is_v4()) a = ip::make_address_v6(ip::v4_mapped, a.to_v4());
  return masked(a.to_v6().to_bytes(), prefix) == network.to_v6().to_bytes();
}

std::string Cidr::to_string() const {
  return network.to_string() + "/" + std::to_string(prefix);
}

bool identity_matches(std::string_view allowed, std::string_view identity) {
  if (identity.empty()) return false;
  return normalise_identity(allowed) == normalise_identity(identity);
}

Refusal access_check(const Export& e, const PeerInfo& peer) {
  const AccessRules& rules = e.access;
  // Unix socket clients have no address: the socket's file permissions decide who may
  // connect, so the address rule does not apply to them (the others still do).
  if (!rules.allow.empty() && peer.address) {
    const bool allowed = std::any_of(rules.allow.begin(), rules.allow.end(),
                                     [&](const Cidr& c) { return c.contains(*peer.address); });
    if (!allowed) {
      return {Refusal::Kind::address, "client " + unmapped(*peer.address).to_string() +
                                          " is not allowed to use export '" + e.name + "'"};
    }
  }
  if (!rules.tls_identities.empty()) {
    if (!peer.tls) return {Refusal::Kind::identity, "export '" + e.name + "' requires TLS"};
    if (peer.tls_identity.empty()) {
      return {Refusal::Kind::identity,
              "export '" + e.name +
                  "' requires a TLS client identity (a client certificate or a PSK user name)"};
    }
    const bool listed =
        std::any_of(rules.tls_identities.begin(), rules.tls_identities.end(),
                    [&](const std::string& id) { return identity_matches(id, peer.tls_identity); });
    if (!listed) {
      return {Refusal::Kind::identity, "TLS identity '" + peer.tls_identity +
                                           "' is not allowed to use export '" + e.name + "'"};
    }
  }
  // Counted when a session reaches transmission (Session::handshake). Two clients that
  // both check here before either is counted may both get in: the limit can be exceeded
  // by the number of handshakes finishing at the same moment. Closing that would need a
  // reservation taken at GO and handed to the session; an occasional extra connection
  // is an acceptable price for keeping the check a read.
  if (rules.max_connections > 0 && e.metrics &&
      e.metrics->connections.load(std::memory_order_relaxed) >=
          static_cast<int64_t>(rules.max_connections)) {
    return {Refusal::Kind::full, "export '" + e.name + "' has its maximum of " +
                                     std::to_string(rules.max_connections) + " connection" +
                                     (rules.max_connections == 1 ? "" : "s")};
  }
  return {};
}

std::string access_refusal(const Export& e, const PeerInfo& peer) {
  return access_check(e, peer).reason;
}

std::optional<protocol::ExportInfo> PeerCatalog::lookup(std::string_view name) const {
  auto e = registry_.find(name);
  if (!e) return std::nullopt;
  protocol::ExportInfo info = e->info();
  info.refusal = access_check(*e, peer_).reason;
  if (!info.refusal.empty()) note_refusal(*e, info.refusal);
  return info;
}

std::vector<protocol::ExportInfo> PeerCatalog::list() const {
  std::vector<protocol::ExportInfo> out;
  for (const auto& e : registry_.all()) {
    // A full export is still listed: it is this client's to use once a slot frees up.
    const Refusal r = access_check(*e, peer_);
    if (r.kind == Refusal::Kind::address || r.kind == Refusal::Kind::identity) continue;
    out.push_back(e->info());
  }
  return out;
}

// The handshake may look an export up several times for one client (SET_META_CONTEXT,
// INFO, GO): count and log each refused export once per connection.
void PeerCatalog::note_refusal(const Export& e, const std::string& reason) const {
  if (std::find(refused_.begin(), refused_.end(), e.name) != refused_.end()) return;
  refused_.push_back(e.name);
  if (e.metrics) e.metrics->connections_refused.fetch_add(1, std::memory_order_relaxed);
  log::notice("{}: access refused: {}", describe(peer_), reason);
}

}  // namespace imagenbd::server
