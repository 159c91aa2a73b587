// make_tls_context (server/tls.hpp): the errors for bad certificate directories and PSK
// files name the file (and the line), and real TLS handshakes over a socket pair through
// Transport::start_tls: PSK (TLS 1.3 and 1.2) and X.509 with client verification give the
// identities access rules check, and wrong keys, unknown users and certificates from
// another CA are refused. Certificates are made here with the OpenSSL API.
#include "server/tls.hpp"

#include <doctest/doctest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "server/transport.hpp"
#include "tests/unit/support/temp_dir.hpp"

namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using imagenbd::protocol::TlsMode;
using imagenbd::server::make_tls_context;
using imagenbd::server::tls_failure_hint;
using imagenbd::server::tls_peer_identity;
using imagenbd::server::TlsSettings;
using imagenbd::server::Transport;

// A fresh directory for keys and certificates, removed at the end of the test.
struct TempDir : imagenbd::test::TempDir {
  TempDir() : imagenbd::test::TempDir("imagenbd-tls") {}
};

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  REQUIRE(out.good());
  out.close();
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write);
}

// ------------------------------------------------------------------------------------
// Keys and certificates.

using Key = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;
using Cert = std::unique_ptr<X509, decltype(&X509_free)>;

Key new_key() {
  Key key(EVP_EC_gen("P-256"), EVP_PKEY_free);
  REQUIRE(key);
  return key;
}

// A certificate for `subject` ("CN=x,O=y") with `key`, signed by `issuer_key` under
// `issuer` (self-signed when issuer is null). CA certificates get basicConstraints CA.
Cert new_cert(const std::string& subject, EVP_PKEY* key, X509* issuer, EVP_PKEY* issuer_key,
              bool ca) {
  Cert cert(X509_new(), X509_free);
  REQUIRE(cert);
  static long serial = 1;
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial++);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600 * 24);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  // "CN=a,O=b" is RFC 2253 order, the most specific part first: the DN holds them the
  // other way round.
  std::vector<std::string> parts;
  for (std::string rest = subject; !rest.empty();) {
    const auto comma = rest.find(',');
    parts.push_back(rest.substr(0, comma));
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
  }
  for (auto part = parts.rbegin(); part != parts.rend(); ++part) {
    const auto eq = part->find('=');
    REQUIRE(X509_NAME_add_entry_by_txt(
                name, part->substr(0, eq).c_str(), MBSTRING_UTF8,
                reinterpret_cast<const unsigned char*>(part->c_str() + eq + 1), -1, -1, 0) == 1);
  }
  X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer ? issuer : cert.get(), cert.get(), nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, NID_basic_constraints,
                                            ca ? "critical,CA:TRUE" : "CA:FALSE");
  REQUIRE(ext);
  X509_add_ext(cert.get(), ext, -1);
  X509_EXTENSION_free(ext);
  REQUIRE(X509_sign(cert.get(), issuer_key, EVP_sha256()) > 0);
  return cert;
}

void write_pem(const fs::path& path, X509* cert) {
  FILE* f = std::fopen(path.c_str(), "w");
  REQUIRE(f);
  PEM_write_X509(f, cert);
  std::fclose(f);
}
void write_pem(const fs::path& path, EVP_PKEY* key) {
  FILE* f = std::fopen(path.c_str(), "w");
  REQUIRE(f);
  PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr);
  std::fclose(f);
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write);
}

// A CA, a server certificate it signed (in server_dir with ca-cert.pem, as qemu and nbdkit
// lay it out) and a client certificate it signed (client_cert/client_key).
struct Pki {
  Key ca_key = new_key();
  Cert ca = new_cert("CN=Test CA,O=Example", ca_key.get(), nullptr, ca_key.get(), true);
  Key server_key = new_key();
  Cert server = new_cert("CN=localhost,O=Example", server_key.get(), ca.get(), ca_key.get(), false);
  Key client_key = new_key();
  Cert client = new_cert("CN=client1,O=Example", client_key.get(), ca.get(), ca_key.get(), false);

  void write_server_dir(const fs::path& dir) {
    fs::create_directories(dir);
    write_pem(dir / "ca-cert.pem", ca.get());
    write_pem(dir / "server-cert.pem", server.get());
    write_pem(dir / "server-key.pem", server_key.get());
  }
};

std::string error_of(const TlsSettings& settings) {
  try {
    make_tls_context(settings);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

TlsSettings x509(const fs::path& dir, bool verify = false) {
  return {.mode = TlsMode::on, .certificates_dir = dir.string(), .verify_peer = verify};
}
TlsSettings psk(const fs::path& file) {
  return {.mode = TlsMode::require, .psk_file = file.string()};
}

// ------------------------------------------------------------------------------------
// One TLS handshake between Transport::start_tls (server) and an asio client.

struct HandshakeResult {
  boost::system::error_code server_ec;
  boost::system::error_code client_ec;
  std::string identity;  // tls_peer_identity on the server side
  std::string echoed;    // what the server read after the handshake
  std::string hint;      // tls_failure_hint when the server's handshake failed
};

using ClientSetup = std::function<void(asio::ssl::context&)>;

HandshakeResult handshake(asio::ssl::context& server_context, const ClientSetup& setup) {
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  asio::io_context io;
  Transport server(
      imagenbd::server::Socket(io, asio::generic::stream_protocol(AF_UNIX, SOCK_STREAM), fds[0]));
  asio::ssl::context client_context(asio::ssl::context::tls_client);
  setup(client_context);
  asio::ssl::stream<asio::local::stream_protocol::socket> client(
      asio::local::stream_protocol::socket(io, asio::local::stream_protocol(), fds[1]),
      client_context);
  HandshakeResult result;

  auto server_side = [&]() -> asio::awaitable<void> {
    co_await server.start_tls(server_context, result.server_ec);
    if (result.server_ec) {
      result.hint = tls_failure_hint(server.native_tls());
      server.close();
      co_return;
    }
    result.identity = tls_peer_identity(server.native_tls());
    char buf[5] = {};
    boost::system::error_code ec;
    co_await server.read_exact(asio::buffer(buf, 5), ec);
    if (!ec) result.echoed.assign(buf, 5);
    server.close();
  };
  auto client_side = [&]() -> asio::awaitable<void> {
    auto token = asio::redirect_error(asio::use_awaitable, result.client_ec);
    co_await client.async_handshake(asio::ssl::stream_base::client, token);
    if (result.client_ec) {
      client.lowest_layer().close();
      co_return;
    }
    co_await asio::async_write(client, asio::buffer("hello", 5), token);
  };
  asio::co_spawn(io, server_side(), asio::detached);
  asio::co_spawn(io, client_side(), asio::detached);
  io.run();
  return result;
}

void client_psk(asio::ssl::context& c, std::string user, std::string key_hex) {
  struct Psk {
    std::string user, key;
  };
  static Psk current;  // the client callback has no user pointer on the context
  current = {std::move(user), std::move(key_hex)};
  SSL_CTX_set_psk_client_callback(
      c.native_handle(),
      [](SSL*, const char*, char* identity, unsigned max_identity, unsigned char* psk,
         unsigned max_psk) -> unsigned {
        if (current.user.size() + 1 > max_identity) return 0;
        std::memcpy(identity, current.user.c_str(), current.user.size() + 1);
        long length = 0;
        unsigned char* key = OPENSSL_hexstr2buf(current.key.c_str(), &length);
        if (!key || static_cast<unsigned long>(length) > max_psk) return 0;
        std::memcpy(psk, key, static_cast<std::size_t>(length));
        OPENSSL_free(key);
        return static_cast<unsigned>(length);
      });
}

void client_cert(asio::ssl::context& c, X509* trust, X509* cert, EVP_PKEY* key) {
  X509_STORE_add_cert(SSL_CTX_get_cert_store(c.native_handle()), trust);
  c.set_verify_mode(asio::ssl::verify_peer);
  if (cert) {
    REQUIRE(SSL_CTX_use_certificate(c.native_handle(), cert) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey(c.native_handle(), key) == 1);
  }
}

const std::string alice_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const std::string bob_key = "ffeeddccbbaa99887766554433221100";

}  // namespace

TEST_CASE("make_tls_context: certificate directory errors name the file") {
  TempDir tmp;
  const fs::path dir = tmp.path / "tls";
  CHECK(error_of(x509(dir)) ==
        "--tls-certificates: " + (dir / "server-cert.pem").string() + ": no such file");
  Pki pki;
  fs::create_directories(dir);
  write_pem(dir / "server-cert.pem", pki.server.get());
  CHECK(error_of(x509(dir)) ==
        "--tls-certificates: " + (dir / "server-key.pem").string() + ": no such file");
  write_pem(dir / "server-key.pem", pki.client_key.get());
  CHECK(error_of(x509(dir)) == "--tls-certificates: " + (dir / "server-key.pem").string() +
                                   ": does not match server-cert.pem");
  write_file(dir / "server-key.pem", "not a key\n");
  CHECK(error_of(x509(dir)).find("server-key.pem: not an unencrypted PEM private key") !=
        std::string::npos);
  write_file(dir / "server-cert.pem", "-----BEGIN CERTIFICATE-----\nxx\n");
  CHECK(error_of(x509(dir)).find("server-cert.pem: not a PEM certificate") != std::string::npos);
  write_pem(dir / "server-cert.pem", pki.server.get());
  write_pem(dir / "server-key.pem", pki.server_key.get());
  CHECK_NOTHROW(make_tls_context(x509(dir)));
  CHECK(error_of(x509(dir, true)) ==
        "--tls-verify-peer: " + (dir / "ca-cert.pem").string() + ": no such file");
  write_pem(dir / "ca-cert.pem", pki.ca.get());
  CHECK_NOTHROW(make_tls_context(x509(dir, true)));
}

TEST_CASE("make_tls_context: PSK file errors name the file and the line") {
  TempDir tmp;
  const fs::path file = tmp.path / "keys.psk";
  const std::string where = "--tls-psk: " + file.string();
  CHECK(error_of(psk(file)) == where + ": no such file");
  const std::pair<std::string, std::string> cases[] = {
      {"", ": no keys in it"},
      {"\n\n", ": no keys in it"},
      {"alice\n", ":1: expected username:hexkey (as psktool writes)"},
      {"alice:" + alice_key + "\n:00ff\n", ":2: empty user name"},
      {"alice:abc\n", ":1: the key must be an even number of hexadecimal digits"},
      {"alice:\n", ":1: the key must be an even number of hexadecimal digits"},
      {"\nalice:zz00\n", ":2: the key is not hexadecimal"},
      {"alice:00\nbob:11\nalice:22\n", ":3: user 'alice' appears twice"},
  };
  for (const auto& [text, error] : cases) {
    INFO("file: ", text);
    write_file(file, text);
    CHECK(error_of(psk(file)) == where + error);
  }
  // The error never quotes a key.
  write_file(file, "alice:" + alice_key + "g\n");
  CHECK(error_of(psk(file)).find(alice_key) == std::string::npos);
  write_file(file, "alice:" + alice_key + "\r\nbob:" + bob_key + "\n");
  CHECK_NOTHROW(make_tls_context(psk(file)));
}

TEST_CASE("make_tls_context: exactly one kind of credentials") {
  CHECK(error_of({.mode = TlsMode::on}).find("exactly one") != std::string::npos);
  CHECK(error_of({.mode = TlsMode::on, .certificates_dir = "/x", .psk_file = "/y"})
            .find("exactly one") != std::string::npos);
}

TEST_CASE("TLS-PSK handshakes: the user name is the identity, wrong keys are refused") {
  TempDir tmp;
  const fs::path file = tmp.path / "keys.psk";
  write_file(file, "alice:" + alice_key + "\nbob:" + bob_key + "\n");
  auto context = make_tls_context(psk(file));

  for (bool tls12 : {false, true}) {
    INFO("TLS 1.2 only: ", tls12);
    auto limit = [&](asio::ssl::context& c) {
      if (tls12) SSL_CTX_set_max_proto_version(c.native_handle(), TLS1_2_VERSION);
    };
    auto ok = handshake(*context, [&](asio::ssl::context& c) {
      limit(c);
      client_psk(c, "alice", alice_key);
    });
    CHECK_MESSAGE(!ok.server_ec, ok.server_ec.message());
    CHECK_MESSAGE(!ok.client_ec, ok.client_ec.message());
    CHECK(ok.identity == "alice");
    CHECK(ok.echoed == "hello");

    auto bob = handshake(*context, [&](asio::ssl::context& c) {
      limit(c);
      client_psk(c, "bob", bob_key);
    });
    CHECK(!bob.server_ec);
    CHECK(bob.identity == "bob");

    auto wrong_key = handshake(*context, [&](asio::ssl::context& c) {
      limit(c);
      client_psk(c, "alice", bob_key);
    });
    CHECK(wrong_key.server_ec);
    CHECK(wrong_key.echoed.empty());
    CHECK(wrong_key.hint.find("TLS-PSK user 'alice'") != std::string::npos);
    CHECK(wrong_key.hint.find(bob_key) == std::string::npos);

    auto unknown = handshake(*context, [&](asio::ssl::context& c) {
      limit(c);
      client_psk(c, "mallory", alice_key);
    });
    CHECK(unknown.server_ec);
    CHECK(unknown.echoed.empty());
    CHECK(unknown.hint == "unknown TLS-PSK user 'mallory'");
  }
}

TEST_CASE("X.509 handshakes: verified client subjects, other CAs refused") {
  TempDir tmp;
  Pki pki;
  pki.write_server_dir(tmp.path / "tls");
  Pki other;  // a second, unrelated CA with its own client certificate

  auto verifying = make_tls_context(x509(tmp.path / "tls", true));
  auto good = handshake(*verifying, [&](asio::ssl::context& c) {
    client_cert(c, pki.ca.get(), pki.client.get(), pki.client_key.get());
  });
  CHECK_MESSAGE(!good.server_ec, good.server_ec.message());
  CHECK(good.identity == "CN=client1,O=Example");
  CHECK(good.echoed == "hello");

  auto foreign = handshake(*verifying, [&](asio::ssl::context& c) {
    client_cert(c, pki.ca.get(), other.client.get(), other.client_key.get());
  });
  CHECK(foreign.echoed.empty());
  REQUIRE(foreign.server_ec);
  CHECK(foreign.hint.find("client certificate: ") == 0);

  auto anonymous = handshake(
      *verifying, [&](asio::ssl::context& c) { client_cert(c, pki.ca.get(), nullptr, nullptr); });
  CHECK(anonymous.echoed.empty());

  // Without --tls-verify-peer no certificate is asked for, so there is no identity.
  auto plain = make_tls_context(x509(tmp.path / "tls"));
  auto unverified = handshake(*plain, [&](asio::ssl::context& c) {
    client_cert(c, pki.ca.get(), pki.client.get(), pki.client_key.get());
  });
  CHECK(!unverified.server_ec);
  CHECK(unverified.identity.empty());
  CHECK(unverified.echoed == "hello");

  // A client that does not trust our CA gives up; the server sees a failed handshake.
  auto distrust = handshake(
      *plain, [&](asio::ssl::context& c) { client_cert(c, other.ca.get(), nullptr, nullptr); });
  CHECK(distrust.client_ec);
  CHECK(distrust.server_ec);
}
