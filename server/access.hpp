// Who may use an export: client addresses (CIDR), TLS identities, a connection limit.
// Checked when a client names the export (INFO/GO/EXPORT_NAME): a refused client gets
// NBD_REP_ERR_POLICY with the reason, and NBD_OPT_LIST does not show it the export.
//
// Rules, in the order they are checked:
// - address: with a non-empty allow-list, a TCP client's address must be in one of the
//   blocks (IPv4-mapped IPv6 clients, ::ffff:a.b.c.d, match IPv4 blocks). Unix socket
//   clients have no address and pass: the socket file's permissions guard them.
// - identity: with a non-empty identity list, the client must have done STARTTLS and its
//   identity (certificate subject DN or PSK user name) must be listed.
// - connections: with max_connections > 0, an export already serving that many
//   connections refuses more (still listed by NBD_OPT_LIST: it is only full).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/ip/address.hpp>

#include "protocol/handshake.hpp"

namespace imagenbd::server {

class ExportRegistry;
struct Export;

// An address block such as 10.0.0.0/8, 2001:db8::/32 or 192.0.2.7 (a single host).
struct Cidr {
  boost::asio::ip::address network;  // host bits are zero
  unsigned prefix = 0;

  // "A.B.C.D[/0..32]" or "IPV6[/0..128]"; an address alone is one host (/32, /128).
  // Surrounding spaces are ignored; "::ffff:A.B.C.D/96+N" is stored as "A.B.C.D/N".
  // Throws std::invalid_argument naming the text for junk, a prefix out of range, a
  // scope id, and bits set past the prefix ("10.0.0.1/8": a typo in an allow-list must
  // not silently widen or narrow it; the message suggests the block).
  static Cidr parse(std::string_view text);
  // IPv4-mapped IPv6 addresses of clients (::ffff:a.b.c.d) match IPv4 blocks; IPv4
  // clients match IPv6 blocks that cover their mapped form (::ffff:0:0/96).
  bool contains(const boost::asio::ip::address& address) const;
  std::string to_string() const;
  bool operator==(const Cidr&) const = default;
};

struct AccessRules {
  std::vector<Cidr> allow;                  // empty: every address
  std::vector<std::string> tls_identities;  // empty: any client; else TLS required and
                                            // the identity (certificate subject DN or PSK
                                            // user name) must be one of these
  unsigned max_connections = 0;             // 0: no limit
  bool operator==(const AccessRules&) const = default;
};

// What we know about the client at the time it names an export.
struct PeerInfo {
  std::optional<boost::asio::ip::address> address;  // none for Unix sockets
  bool tls = false;
  std::string tls_identity;  // subject DN ("CN=...,O=...") or PSK user name
};

// Why a peer may not use an export, and which rule said so.
struct Refusal {
  enum class Kind { none, address, identity, full };
  Kind kind = Kind::none;
  std::string reason;  // "" when kind == none; otherwise for the client and the log
};

// The rules of `e` applied to `peer` and the export's current connection count. Pure:
// counts and logs nothing.
Refusal access_check(const Export& e, const PeerInfo& peer);

// "" if `peer` may connect to `e` now; otherwise why not, for the client and the log.
std::string access_refusal(const Export& e, const PeerInfo& peer);

// An allowed identity against the client's: equal as RFC 2253 DNs, ignoring spaces around
// ',' and '=' and the case of attribute types ("cn=node1, o=Example" matches
// "CN=node1,O=Example"); values and PSK user names compare exactly.
bool identity_matches(std::string_view allowed, std::string_view identity);

// The registry as one client sees it: lookup() fills ExportInfo::refusal, list() leaves
// out the exports it may not use (by address or identity; full ones stay listed). One per
// session, used from its strand only. Each export refused to this client is counted in
// ExportMetrics::connections_refused and logged once, however often it is looked up.
class PeerCatalog : public protocol::ExportCatalog {
 public:
  PeerCatalog(const ExportRegistry& registry, const PeerInfo& peer)
      : registry_(registry), peer_(peer) {}
  std::optional<protocol::ExportInfo> lookup(std::string_view name) const override;
  std::vector<protocol::ExportInfo> list() const override;

 private:
  void note_refusal(const Export& e, const std::string& reason) const;

  const ExportRegistry& registry_;
  const PeerInfo& peer_;  // the session's; its TLS identity is filled in after STARTTLS
  mutable std::vector<std::string> refused_;  // exports already counted as refused
};

}  // namespace imagenbd::server
