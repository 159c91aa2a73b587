// TLS for NBD_OPT_STARTTLS: the OpenSSL context built from the command line or config
// (X.509 certificates or a TLS-PSK key file, flags named as nbdkit names them), and the
// client identity access rules check.
#pragma once

#include <memory>
#include <string>

#include "protocol/handshake.hpp"

namespace boost::asio::ssl {
class context;
}
typedef struct ssl_st SSL;

namespace imagenbd::server {

struct TlsSettings {
  protocol::TlsMode mode = protocol::TlsMode::off;  // --tls=off|on|require
  std::string certificates_dir;  // --tls-certificates DIR: ca-cert.pem, server-cert.pem,
                                 // server-key.pem
  std::string psk_file;          // --tls-psk FILE: lines "username:hexkey" (psktool)
  bool verify_peer = false;      // --tls-verify-peer: client certificates signed by the CA
  bool operator==(const TlsSettings&) const = default;
};

// Builds the server context, or throws std::runtime_error naming the file and what is
// wrong with it. Requires mode != off and exactly one of certificates_dir / psk_file.
std::shared_ptr<boost::asio::ssl::context> make_tls_context(const TlsSettings& settings);

// The client's identity once TLS is up: the subject DN of a verified client certificate
// (RFC 2253 form, e.g. "CN=client1,O=Example"), or the PSK user name; "" if none.
std::string tls_peer_identity(SSL* ssl);

// After a failed TLS handshake: what the server knows that OpenSSL's error does not say
// (the PSK user the client named, why its certificate failed), for the log; "" if
// nothing. Client-chosen names are sanitised.
std::string tls_failure_hint(SSL* ssl);

// The protocol version and cipher suite in use, for the log ("TLSv1.3,
// TLS_AES_256_GCM_SHA384"); "" if none.
std::string tls_session_summary(SSL* ssl);

}  // namespace imagenbd::server
