// The admin endpoint (off by default): HTTP/1.1 with Boost.Beast on a Unix socket or a
// loopback TCP port. GET /metrics (Prometheus text), GET /exports (JSON), POST /reload;
// later issues add actions (snapshot/commit). Runs on the server's main io_context; the
// actions it triggers run off the data path.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/io_context.hpp>

namespace imagenbd::server {

class ExportRegistry;
struct ServerMetrics;

struct AdminSettings {
  // "" (off), "unix:PATH", or "HOST:PORT" on a loopback address (127.0.0.1:9000,
  // [::1]:9000); anything else is refused: the endpoint has no authentication.
  std::string listen;
  bool operator==(const AdminSettings&) const = default;
};

struct AdminHooks {
  std::function<std::shared_ptr<const ExportRegistry>()> exports;  // the current exports
  const ServerMetrics* metrics = nullptr;
  // Reloads the configuration; returns a one-line summary, throws on failure (the old
  // configuration stays). Null when the server was not started with --config.
  std::function<std::string()> reload;
};

class AdminServer {
 public:
  // Binds the endpoint now (throws with a clear message on failure); serves once the
  // io_context runs; stops when the io_context stops or close() is called.
  AdminServer(boost::asio::io_context& context, const AdminSettings& settings, AdminHooks hooks);
  ~AdminServer();
  void close();
  const std::string& label() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace imagenbd::server
