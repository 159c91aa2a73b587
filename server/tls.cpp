// The OpenSSL server context for NBD_OPT_STARTTLS. TLS 1.2 or later; either X.509 (the
// files nbdkit and qemu expect in a directory) or TLS-PSK (psktool's "username:hexkey"
// file). PSK works with TLS 1.3 too: OpenSSL 3 calls the TLS 1.2-style server callback for
// TLS 1.3 external PSKs (with a SHA-256 cipher suite), which is what GnuTLS clients offer.
// Keys are never logged or quoted in errors.
#include "server/tls.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string_view>
#include <vector>

#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <boost/asio/ssl/context.hpp>

#include "backends/log.hpp"

namespace imagenbd::server {

namespace {

using PskKeys = std::map<std::string, std::vector<unsigned char>, std::less<>>;

// The PSK table lives as long as the SSL_CTX (ex_data freed with it); the identity a
// client used lives with its SSL.
int psk_keys_index() {
  static const int index = SSL_CTX_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
        delete static_cast<PskKeys*>(ptr);
      });
  return index;
}
// A name the client sent, safe to log.
std::string printable(std::string_view text) {
  return log::printable(text, 64);
}

int psk_identity_index() {
  static const int index = SSL_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
        delete static_cast<std::string*>(ptr);
      });
  return index;
}

int psk_unknown_index() {
  static const int index = SSL_get_ex_new_index(
      0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
        delete static_cast<std::string*>(ptr);
      });
  return index;
}

// OpenSSL's queued errors as one line ("" if none), and the queue emptied.
std::string openssl_errors() {
  std::string text;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!text.empty()) text += "; ";
    text += buf;
  }
  return text;
}

[[noreturn]] void fail(std::string_view flag, const std::string& path, const std::string& what) {
  const std::string detail = openssl_errors();
  throw std::runtime_error(std::string(flag) + ": " + path + ": " + what +
                           (detail.empty() ? "" : " (" + detail + ")"));
}

// Errors for missing or unreadable files say so plainly, before OpenSSL's own wording.
void require_readable(std::string_view flag, const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT)
      throw std::runtime_error(std::string(flag) + ": " + path + ": no such file");
    throw std::runtime_error(std::string(flag) + ": " + path + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    throw std::runtime_error(std::string(flag) + ": " + path + ": not a regular file");
  }
}

// Secrets readable by everyone are worth a warning, not a refusal (nbdkit does neither).
void warn_if_world_readable(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && (st.st_mode & S_IROTH)) {
    log::warn("tls: {} is readable by every user; chmod o-r it", path);
  }
}

std::string name_rfc2253(const X509_NAME* name) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (!bio) return {};
  std::string text;
  if (X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253) >= 0) {
    char* data = nullptr;
    const long length = BIO_get_mem_data(bio, &data);
    if (length > 0) text.assign(data, static_cast<std::size_t>(length));
  }
  BIO_free(bio);
  return text;
}

void load_certificates(SSL_CTX* ctx, const TlsSettings& settings) {
  constexpr std::string_view flag = "--tls-certificates";
  const std::string dir = settings.certificates_dir;
  const std::string cert_path = dir + "/server-cert.pem";
  const std::string key_path = dir + "/server-key.pem";
  require_readable(flag, cert_path);
  require_readable(flag, key_path);
  if (SSL_CTX_use_certificate_chain_file(ctx, cert_path.c_str()) != 1) {
    fail(flag, cert_path, "not a PEM certificate");
  }
  BIO* bio = BIO_new_file(key_path.c_str(), "r");
  if (!bio) fail(flag, key_path, "cannot open");
  // A callback that gives no passphrase: OpenSSL's default would prompt on the terminal.
  EVP_PKEY* key = PEM_read_bio_PrivateKey(
      bio, nullptr, [](char*, int, int, void*) { return 0; }, nullptr);
  BIO_free(bio);
  if (!key) fail(flag, key_path, "not an unencrypted PEM private key");
  const bool matches = X509_check_private_key(SSL_CTX_get0_certificate(ctx), key) == 1;
  const bool used = matches && SSL_CTX_use_PrivateKey(ctx, key) == 1;
  EVP_PKEY_free(key);
  if (!matches) {
    openssl_errors();
    throw std::runtime_error(std::string(flag) + ": " + key_path +
                             ": does not match server-cert.pem");
  }
  if (!used) fail(flag, key_path, "cannot use the private key");
  warn_if_world_readable(key_path);

  if (settings.verify_peer) {
    const std::string ca_path = dir + "/ca-cert.pem";
    require_readable("--tls-verify-peer", ca_path);
    if (SSL_CTX_load_verify_locations(ctx, ca_path.c_str(), nullptr) != 1) {
      fail("--tls-verify-peer", ca_path, "not a PEM CA certificate");
    }
    // Tell clients which CA we accept, so one with several certificates picks right.
    if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(ca_path.c_str())) {
      SSL_CTX_set_client_CA_list(ctx, names);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  log::info("tls: X.509 certificate {} from {}{}",
            name_rfc2253(X509_get_subject_name(SSL_CTX_get0_certificate(ctx))), dir,
            settings.verify_peer ? ", client certificates verified against ca-cert.pem" : "");
}

// psktool's format: one "username:hexkey" per line. Blank lines are skipped.
PskKeys read_psk_file(const std::string& path) {
  constexpr std::string_view flag = "--tls-psk";
  require_readable(flag, path);
  std::ifstream in(path);
  if (!in) throw std::runtime_error(std::string(flag) + ": " + path + ": " + std::strerror(errno));
  PskKeys keys;
  std::string line;
  auto bad = [&](unsigned number, const std::string& what) {
    return std::runtime_error(std::string(flag) + ": " + path + ":" + std::to_string(number) +
                              ": " + what);
  };
  for (unsigned number = 1; std::getline(in, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const auto colon = line.rfind(':');
    if (colon == std::string::npos)
      throw bad(number, "expected username:hexkey (as psktool writes)");
    const std::string user = line.substr(0, colon);
    const std::string_view hex = std::string_view(line).substr(colon + 1);
    if (user.empty()) throw bad(number, "empty user name");
    if (user.size() > PSK_MAX_IDENTITY_LEN) {
      throw bad(number, "user name longer than " + std::to_string(PSK_MAX_IDENTITY_LEN) + " bytes");
    }
    if (hex.empty() || hex.size() % 2 != 0) {
      throw bad(number, "the key must be an even number of hexadecimal digits");
    }
    if (hex.size() / 2 > PSK_MAX_PSK_LEN) {
      throw bad(number, "key longer than " + std::to_string(PSK_MAX_PSK_LEN) + " bytes");
    }
    std::vector<unsigned char> key;
    for (std::size_t i = 0; i < hex.size(); i += 2) {
      const int hi = OPENSSL_hexchar2int(static_cast<unsigned char>(hex[i]));
      const int lo = OPENSSL_hexchar2int(static_cast<unsigned char>(hex[i + 1]));
      if (hi < 0 || lo < 0) throw bad(number, "the key is not hexadecimal");
      key.push_back(static_cast<unsigned char>(hi * 16 + lo));
    }
    if (!keys.emplace(user, std::move(key)).second) {
      throw bad(number, "user '" + user + "' appears twice");
    }
  }
  if (in.bad()) throw std::runtime_error(std::string(flag) + ": " + path + ": read error");
  if (keys.empty()) throw std::runtime_error(std::string(flag) + ": " + path + ": no keys in it");
  return keys;
}

unsigned int psk_server_callback(SSL* ssl, const char* identity, unsigned char* psk,
                                 unsigned int max_psk_len) {
  const auto* keys =
      static_cast<const PskKeys*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), psk_keys_index()));
  if (!keys || !identity) return 0;
  const auto it = keys->find(std::string_view(identity));
  if (it == keys->end() || it->second.size() > max_psk_len) {
    // The handshake fails; OpenSSL's error will not say why, the log should.
    delete static_cast<std::string*>(SSL_get_ex_data(ssl, psk_unknown_index()));
    SSL_set_ex_data(ssl, psk_unknown_index(), new std::string(identity));
    return 0;
  }
  std::memcpy(psk, it->second.data(), it->second.size());
  delete static_cast<std::string*>(SSL_get_ex_data(ssl, psk_identity_index()));
  SSL_set_ex_data(ssl, psk_identity_index(), new std::string(it->first));
  return static_cast<unsigned int>(it->second.size());
}

void load_psk(SSL_CTX* ctx, const TlsSettings& settings) {
  psk_identity_index();  // registered before the first connection's SSL exists
  psk_unknown_index();
  auto keys = std::make_unique<PskKeys>(read_psk_file(settings.psk_file));
  const std::size_t users = keys->size();
  if (SSL_CTX_set_ex_data(ctx, psk_keys_index(), keys.get()) != 1) {
    throw std::runtime_error("tls: cannot attach the PSK table: " + openssl_errors());
  }
  keys.release();  // owned by ctx now
  SSL_CTX_set_psk_server_callback(ctx, psk_server_callback);
  // TLS 1.2 PSK suites (TLS 1.3 suites are separate and stay at their defaults). Plain
  // PSK last: it has no forward secrecy. RSA-PSK needs a certificate we do not have.
  if (SSL_CTX_set_cipher_list(ctx, "ECDHEPSK:DHEPSK:PSK:!RSAPSK:!NULL:!3DES:!RC4:!MD5") != 1) {
    throw std::runtime_error("tls: no usable TLS-PSK cipher suites: " + openssl_errors());
  }
  SSL_CTX_set_dh_auto(ctx, 1);
  warn_if_world_readable(settings.psk_file);
  log::info("tls: TLS-PSK with {} user{} from {}", users, users == 1 ? "" : "s", settings.psk_file);
}

}  // namespace

std::shared_ptr<boost::asio::ssl::context> make_tls_context(const TlsSettings& settings) {
  if (settings.mode == protocol::TlsMode::off) {
    throw std::invalid_argument("make_tls_context: TLS is off");
  }
  if (settings.certificates_dir.empty() == settings.psk_file.empty()) {
    throw std::runtime_error("TLS needs exactly one of --tls-certificates=DIR and --tls-psk=FILE");
  }
  if (settings.verify_peer && settings.certificates_dir.empty()) {
    throw std::runtime_error("--tls-verify-peer needs --tls-certificates=DIR (with ca-cert.pem)");
  }
  ERR_clear_error();
  auto context = std::make_shared<boost::asio::ssl::context>(boost::asio::ssl::context::tls_server);
  SSL_CTX* ctx = context->native_handle();
  // TLS 1.2 at least (the NBD spec's minimum). No compression (CRIME), no renegotiation
  // (a client-driven CPU sink), no session resumption: NBD connections are long-lived.
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET |
                               SSL_OP_CIPHER_SERVER_PREFERENCE);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_num_tickets(ctx, 0);
  static constexpr unsigned char session_context[] = "imagenbd";
  SSL_CTX_set_session_id_context(ctx, session_context, sizeof session_context - 1);

  if (!settings.certificates_dir.empty()) {
    load_certificates(ctx, settings);
  } else {
    load_psk(ctx, settings);
  }
  return context;
}

std::string tls_peer_identity(SSL* ssl) {
  if (!ssl) return {};
  // Only a certificate that passed verification names the client; without
  // --tls-verify-peer none is asked for.
  if (const X509* cert = SSL_get0_peer_certificate(ssl);
      cert && SSL_get_verify_result(ssl) == X509_V_OK &&
      (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER)) {
    return name_rfc2253(X509_get_subject_name(cert));
  }
  if (const auto* user =
          static_cast<const std::string*>(SSL_get_ex_data(ssl, psk_identity_index()))) {
    return *user;
  }
  return {};
}

std::string tls_failure_hint(SSL* ssl) {
  if (!ssl) return {};
  if (const auto* user =
          static_cast<const std::string*>(SSL_get_ex_data(ssl, psk_unknown_index()))) {
    return "unknown TLS-PSK user '" + printable(*user) + "'";
  }
  if (const auto* user =
          static_cast<const std::string*>(SSL_get_ex_data(ssl, psk_identity_index()))) {
    return "TLS-PSK user '" + printable(*user) + "': is the client's key the one in our file?";
  }
  if (const long result = SSL_get_verify_result(ssl);
      result != X509_V_OK && (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER)) {
    std::string hint = std::string("client certificate: ") + X509_verify_cert_error_string(result);
    if (const X509* cert = SSL_get0_peer_certificate(ssl)) {
      hint += " (" + printable(name_rfc2253(X509_get_subject_name(cert))) + ")";
    }
    return hint;
  }
  return {};
}

std::string tls_session_summary(SSL* ssl) {
  if (!ssl) return {};
  const SSL_CIPHER* cipher = SSL_get_current_cipher(ssl);
  return std::string(SSL_get_version(ssl)) + ", " + (cipher ? SSL_CIPHER_get_name(cipher) : "?");
}

}  // namespace imagenbd::server
