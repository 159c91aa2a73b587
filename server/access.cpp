#include "server/access.hpp"

#include <stdexcept>

#include "server/exports.hpp"

namespace imagenbd::server {

// Placeholders until access control lands: everything is allowed.
Cidr Cidr::parse(std::string_view text) {
  throw std::invalid_argument("access rules are not built yet: '" + std::string(text) + "'");
}
bool Cidr::contains(const boost::asio::ip::address&) const {
  return true;
}
std::string Cidr::to_string() const {
  return network.to_string() + "/" + std::to_string(prefix);
}

std::string access_refusal(const Export&, const PeerInfo&) {
  return {};
}

std::optional<protocol::ExportInfo> PeerCatalog::lookup(std::string_view name) const {
  return registry_.lookup(name);
}

std::vector<protocol::ExportInfo> PeerCatalog::list() const {
  return registry_.list();
}

}  // namespace imagenbd::server
