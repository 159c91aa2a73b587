// The admin endpoint over a real Unix socket on a local io_context: routes, status codes,
// JSON, limits and timeouts, the socket file's handling, loopback-only TCP.
#include "server/admin.hpp"

#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "backends/memory.hpp"
#include "server/exports.hpp"
#include "server/metrics.hpp"
#include "tests/unit/support/temp_dir.hpp"

using namespace imagenbd::server;
namespace asio = boost::asio;
using local = asio::local::stream_protocol;

namespace {

struct TempDir : imagenbd::test::TempDir {
  TempDir() : imagenbd::test::TempDir("imagenbd-admin-test") {}
};

std::shared_ptr<ExportRegistry> registry_with_disk() {
  auto e = std::make_shared<Export>();
  e->name = "disk";
  e->description = "a \"test\" disk";
  e->device = imagenbd::backends::open_memory(1 << 20);
  e->leaf = e->device;
  e->spec.image = "memory:1M";
  e->access.allow = {Cidr::parse("10.0.0.0/8"), Cidr::parse("::1")};
  e->access.tls_identities = {"alice"};
  e->access.max_connections = 4;
  auto r = std::make_shared<ExportRegistry>();
  r->add(std::move(e));
  return r;
}

// The server and a client on one io_context; each exchange runs it until the client is
// done (the accept loop never lets run() return by itself).
struct Fixture {
  TempDir dir;
  std::string path = (dir.path / "admin.sock").string();
  asio::io_context context;
  std::shared_ptr<ExportRegistry> registry = registry_with_disk();
  ServerMetrics metrics;
  std::function<std::string()> reload;
  std::unique_ptr<AdminServer> server;

  void start(AdminLimits limits = {}) {
    server = std::make_unique<AdminServer>(
        context, AdminSettings{"unix:" + path},
        AdminHooks{.exports = [this] { return std::shared_ptr<const ExportRegistry>(registry); },
                   .metrics = &metrics,
                   .reload = [this]() -> std::string {
                     if (!reload) throw std::logic_error("no reload hook in this test");
                     return reload();
                   }},
        limits);
  }
  void start_without_reload() {
    server = std::make_unique<AdminServer>(
        context, AdminSettings{"unix:" + path},
        AdminHooks{.exports = [this] { return std::shared_ptr<const ExportRegistry>(registry); },
                   .metrics = &metrics});
  }

  template <typename T>
  T run(asio::awaitable<T> task) {
    std::exception_ptr error;
    std::optional<T> result;
    context.restart();
    asio::co_spawn(context, std::move(task), [&](std::exception_ptr ep, T value) {
      error = ep;
      if (!ep) result = std::move(value);
      context.stop();
    });
    context.run();
    if (error) std::rethrow_exception(error);
    return std::move(*result);
  }

  // Sends `request` as it is and returns everything the server sends until it closes.
  std::string exchange(std::string request) {
    return run([](std::string path, std::string request) -> asio::awaitable<std::string> {
      local::socket socket(co_await asio::this_coro::executor);
      co_await socket.async_connect(local::endpoint(path), asio::use_awaitable);
      co_await asio::async_write(socket, asio::buffer(request), asio::use_awaitable);
      std::string out;
      boost::system::error_code ec;
      co_await asio::async_read(socket, asio::dynamic_buffer(out),
                                asio::redirect_error(asio::use_awaitable, ec));
      co_return out;
    }(path, std::move(request)));
  }
  std::string get(const std::string& target, const std::string& method = "GET") {
    return exchange(method + " " + target +
                    " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
  }
};

std::string body_of(const std::string& response) {
  const auto at = response.find("\r\n\r\n");
  return at == std::string::npos ? "" : response.substr(at + 4);
}

}  // namespace

TEST_CASE("admin addresses: unix paths, IPv4 and bracketed IPv6 with ports") {
  CHECK(parse_admin_address("unix:/run/a.sock").path == "/run/a.sock");
  CHECK(parse_admin_address("unix:/run/a.sock").to_string() == "unix:/run/a.sock");
  const AdminAddress v4 = parse_admin_address("127.0.0.1:9109");
  CHECK_FALSE(v4.is_unix());
  CHECK(v4.address.to_string() == "127.0.0.1");
  CHECK(v4.port == 9109);
  const AdminAddress v6 = parse_admin_address("[::1]:9109");
  CHECK(v6.address.to_string() == "::1");
  CHECK(v6.to_string() == "[::1]:9109");
  CHECK(parse_admin_address("localhost:80").address.to_string() == "127.0.0.1");
  for (const char* bad : {"unix:", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "::1:80",
                          "[::1]80", "example.com:80", "127.0.0.1:8x"}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(parse_admin_address(bad), std::invalid_argument);
  }
}

TEST_CASE("a non-loopback address is refused, naming why") {
  asio::io_context context;
  for (const char* address : {"0.0.0.0:9109", "192.0.2.1:9109", "[::]:9109"}) {
    CAPTURE(address);
    try {
      AdminServer server(context, {address}, {});
      FAIL("accepted a non-loopback address");
    } catch (const std::runtime_error& e) {
      CHECK(std::string(e.what()).find("not a loopback address") != std::string::npos);
      CHECK(std::string(e.what()).find("no authentication") != std::string::npos);
    }
  }
}

TEST_CASE("GET /health, 404 for unknown paths, 405 with Allow for wrong methods") {
  Fixture f;
  f.start();
  std::string r = f.get("/health");
  CHECK(r.starts_with("HTTP/1.1 200 OK\r\n"));
  CHECK(body_of(r) == "ok\n");

  r = f.get("/nope");
  CHECK(r.starts_with("HTTP/1.1 404 "));
  CHECK(r.find("Content-Type: application/json") != std::string::npos);
  CHECK(body_of(r).starts_with("{\"error\":\"no such resource: /nope"));

  r = f.get("/metrics", "POST");
  CHECK(r.starts_with("HTTP/1.1 405 "));
  CHECK(r.find("Allow: GET\r\n") != std::string::npos);
  CHECK(body_of(r).starts_with("{\"error\":"));

  r = f.get("/reload", "GET");
  CHECK(r.starts_with("HTTP/1.1 405 "));
  CHECK(r.find("Allow: POST\r\n") != std::string::npos);
}

TEST_CASE("GET /metrics is Prometheus text, ?export= narrows it, an unknown export is 404") {
  Fixture f;
  f.start();
  f.metrics.connections_total = 7;
  std::string r = f.get("/metrics");
  CHECK(r.starts_with("HTTP/1.1 200 OK\r\n"));
  CHECK(r.find("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n") != std::string::npos);
  CHECK(body_of(r).find("\nimagenbd_connections_accepted_total 7\n") != std::string::npos);
  CHECK(body_of(r).find("imagenbd_export_connections{export=\"disk\"} 0") != std::string::npos);

  r = f.get("/metrics?export=disk");
  CHECK(r.starts_with("HTTP/1.1 200 OK\r\n"));
  r = f.get("/metrics?export=");  // the default export
  CHECK(body_of(r).find("export=\"disk\"") != std::string::npos);
  r = f.get("/metrics?export=no%20such");
  CHECK(r.starts_with("HTTP/1.1 404 "));
  CHECK(body_of(r) == "{\"error\":\"no export 'no such'\"}\n");
}

TEST_CASE("GET /exports describes every export as JSON") {
  Fixture f;
  f.start();
  f.registry->all().front()->metrics->connection_opened();
  const std::string r = f.get("/exports");
  CHECK(r.starts_with("HTTP/1.1 200 OK\r\n"));
  CHECK(r.find("Content-Type: application/json\r\n") != std::string::npos);
  CHECK(body_of(r) ==
        "{\"exports\":[{\"name\":\"disk\",\"description\":\"a \\\"test\\\" disk\","
        "\"image\":\"memory:1M\",\"format\":\"memory\",\"size\":1048576,\"read_only\":false,"
        "\"connections\":1,\"connections_total\":1,\"connections_refused\":0,"
        "\"in_flight\":0,\"access\":{\"allow\":[\"10.0.0.0/8\",\"::1/128\"],"
        "\"allow_identities\":[\"alice\"],\"max_connections\":4},"
        "\"overlay\":null,\"cache\":null,\"cache_size\":0,\"boot_profile\":null}]}\n");
}

TEST_CASE("POST /reload: 409 without --config, 200 with the summary, 500 when it fails") {
  SUBCASE("no reload hook") {
    Fixture f;
    f.start_without_reload();
    const std::string r = f.get("/reload", "POST");
    CHECK(r.starts_with("HTTP/1.1 409 "));
    CHECK(body_of(r).find("not started with --config") != std::string::npos);
  }
  SUBCASE("reloaded, then failed") {
    Fixture f;
    f.start();
    f.reload = [] { return std::string("1 export added, 0 removed"); };
    std::string r = f.get("/reload", "POST");
    CHECK(r.starts_with("HTTP/1.1 200 OK\r\n"));
    CHECK(body_of(r) == "{\"result\":\"reloaded\",\"summary\":\"1 export added, 0 removed\"}\n");
    f.reload = []() -> std::string { throw std::runtime_error("imagenbd.toml:3: bad key"); };
    r = f.get("/reload", "POST");
    CHECK(r.starts_with("HTTP/1.1 500 "));
    CHECK(body_of(r).find("imagenbd.toml:3: bad key") != std::string::npos);
  }
}

TEST_CASE("keep-alive: two requests on one connection get two responses") {
  Fixture f;
  f.start();
  const std::string r = f.exchange(
      "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: "
      "close\r\n\r\n");
  CHECK(r.find("HTTP/1.1 200 OK") == 0);
  CHECK(r.find("HTTP/1.1 200 OK", 10) != std::string::npos);
}

TEST_CASE("a request body over the limit gets 413, a malformed request 400") {
  Fixture f;
  f.start();
  std::string r = f.exchange("POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" +
                             std::string(70000, 'x'));
  CHECK(r.starts_with("HTTP/1.1 413 "));
  r = f.exchange("THIS IS NOT HTTP\r\n\r\n");
  CHECK(r.starts_with("HTTP/1.1 400 "));
}

TEST_CASE("a client that sends nothing is closed after the read timeout") {
  Fixture f;
  f.start({.read_timeout = std::chrono::milliseconds(200)});
  const auto started = std::chrono::steady_clock::now();
  const std::string r = f.exchange("GET /health HTTP/1.1\r\n");  // never finished
  CHECK(r.empty());
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));
  // The endpoint still serves others.
  CHECK(f.get("/health").starts_with("HTTP/1.1 200 OK"));
}

TEST_CASE("the socket file: owner-only, a stale one replaced, a live one or a file refused") {
  Fixture f;
  {
    // A stale socket: bound, then its server gone.
    local::acceptor stale(f.context, local::endpoint(f.path));
  }
  REQUIRE(std::filesystem::exists(f.path));
  f.start();
  struct stat st {};
  REQUIRE(::stat(f.path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(f.get("/health").starts_with("HTTP/1.1 200 OK"));

  // A second server on the same live path is refused.
  CHECK_THROWS_WITH_AS(AdminServer(f.context, {"unix:" + f.path}, {}),
                       doctest::Contains("already listening"), std::runtime_error);

  // close() removes the socket file.
  f.server->close();
  CHECK_FALSE(std::filesystem::exists(f.path));

  std::ofstream(f.path) << "not a socket";
  CHECK_THROWS_WITH_AS(AdminServer(f.context, {"unix:" + f.path}, {}),
                       doctest::Contains("is not a socket"), std::runtime_error);
}

TEST_CASE("close() ends open connections") {
  Fixture f;
  f.start();
  auto client = [](std::string path, AdminServer* server) -> asio::awaitable<std::string> {
    local::socket socket(co_await asio::this_coro::executor);
    co_await socket.async_connect(local::endpoint(path), asio::use_awaitable);
    // Give the server a turn to accept, then close it while we wait for a response.
    asio::steady_timer pause(co_await asio::this_coro::executor, std::chrono::milliseconds(50));
    co_await pause.async_wait(asio::use_awaitable);
    server->close();
    std::string out;
    boost::system::error_code ec;
    co_await asio::async_read(socket, asio::dynamic_buffer(out),
                              asio::redirect_error(asio::use_awaitable, ec));
    co_return ec == asio::error::eof ? std::string("eof") : ec.message();
  };
  CHECK(f.run(client(f.path, f.server.get())) == "eof");
}
