#include "server/tls.hpp"

#include <stdexcept>

namespace imagenbd::server {

// Placeholders until TLS lands.
std::shared_ptr<boost::asio::ssl::context> make_tls_context(const TlsSettings&) {
  throw std::runtime_error("TLS is not built yet");
}

std::string tls_peer_identity(SSL*) {
  return {};
}

}  // namespace imagenbd::server
