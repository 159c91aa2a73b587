// The admin endpoint (off by default): HTTP/1.1 with Boost.Beast on a Unix socket or a
// loopback TCP port. GET /metrics (Prometheus text), GET /exports (JSON), POST /reload,
// GET /health, and live snapshots of overlay exports (POST /exports/NAME/snapshot starts
// one, GET the same path reports it: server/commit.hpp). Runs on the server's main
// io_context; the actions it triggers run off the data path (a commit on a worker).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>

namespace imagenbd::server {

class ExportRegistry;
struct ServerMetrics;

struct AdminSettings {
  // "" (off), "unix:PATH", or "HOST:PORT" on a loopback address (127.0.0.1:9000,
  // [::1]:9000); anything else is refused: the endpoint has no authentication.
  std::string listen;
  bool operator==(const AdminSettings&) const = default;
};

// An admin address, parsed: a Unix socket path, or an IP address and port.
struct AdminAddress {
  std::string path;  // non-empty for unix:PATH
  boost::asio::ip::address address;
  uint16_t port = 0;
  bool is_unix() const { return !path.empty(); }
  std::string to_string() const;  // "unix:PATH", "127.0.0.1:9109", "[::1]:9109"
};

// Parses "unix:PATH", "HOST:PORT" or "[V6]:PORT" (HOST numeric, or "localhost" for
// 127.0.0.1). Throws std::invalid_argument naming the text and the accepted forms. Does
// not check for loopback: the server does (AdminServer), a client need not.
AdminAddress parse_admin_address(std::string_view text);

struct AdminHooks {
  std::function<std::shared_ptr<const ExportRegistry>()> exports;  // the current exports
  const ServerMetrics* metrics = nullptr;
  // Reloads the configuration; returns a one-line summary, throws on failure (the old
  // configuration stays). Null when the server was not started with --config.
  std::function<std::string()> reload;
  // An executor of a worker thread, where a live snapshot's commit runs; null: the admin
  // endpoint's own (tests).
  std::function<boost::asio::any_io_executor()> worker;
};

// Limits that keep slow or stuck admin clients from piling up (they only ever cost a
// socket and a small buffer each, never the data path).
struct AdminLimits {
  std::size_t max_connections = 32;  // more are closed at once
  std::size_t max_header = 8 * 1024;
  std::size_t max_body = 64 * 1024;                // larger request bodies get 413
  std::chrono::milliseconds read_timeout{10000};   // a request, or keep-alive idleness
  std::chrono::milliseconds write_timeout{10000};  // a response taken by the client
};

class AdminServer {
 public:
  // Binds the endpoint now (throws with a clear message on failure: a non-loopback
  // address, a path in use by a live server, a port taken); serves once the io_context
  // runs; stops when close() is called. A stale Unix socket file is replaced; the new one
  // is made 0600 (owner only) and removed by close().
  AdminServer(boost::asio::io_context& context, const AdminSettings& settings, AdminHooks hooks,
              AdminLimits limits = {});
  ~AdminServer();
  // Stops accepting and ends every admin connection (their coroutines finish once the
  // io_context runs again). Idempotent.
  void close();
  const std::string& label() const;

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;  // shared with the coroutines that serve it
};

}  // namespace imagenbd::server
