// Who may use an export: client addresses (CIDR), TLS identities, a connection limit.
// Checked when a client names the export (INFO/GO/EXPORT_NAME): a refused client gets
// NBD_REP_ERR_POLICY with the reason, and NBD_OPT_LIST does not show it the export.
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
  boost::asio::ip::address network;
  unsigned prefix = 0;

  // Throws std::invalid_argument naming the text. IPv4-mapped IPv6 addresses of clients
  // match IPv4 blocks.
  static Cidr parse(std::string_view text);
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

// "" if `peer` may connect to `e` now; otherwise why not, for the client and the log.
std::string access_refusal(const Export& e, const PeerInfo& peer);

// The registry as one client sees it: lookup() fills ExportInfo::refusal, list() leaves
// out the exports it may not use.
class PeerCatalog : public protocol::ExportCatalog {
 public:
  PeerCatalog(const ExportRegistry& registry, const PeerInfo& peer)
      : registry_(registry), peer_(peer) {}
  std::optional<protocol::ExportInfo> lookup(std::string_view name) const override;
  std::vector<protocol::ExportInfo> list() const override;

 private:
  const ExportRegistry& registry_;
  const PeerInfo& peer_;  // the session's; its TLS identity is filled in after STARTTLS
};

}  // namespace imagenbd::server
