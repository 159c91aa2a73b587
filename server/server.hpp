// The running server: one io_context per worker thread (connections are spread over them,
// and each connection stays on one thread), the listeners, the live sessions, and the
// graceful stop on SIGINT/SIGTERM: stop accepting, let requests in flight finish, flush,
// close.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "server/admin.hpp"
#include "server/exports.hpp"
#include "server/listener.hpp"
#include "server/metrics.hpp"
#include "server/session.hpp"
#include "server/tls.hpp"

namespace imagenbd::server {

struct ServerOptions {
  ListenSpec listen;
  unsigned threads = 0;      // worker io threads; 0 = one per CPU
  unsigned max_clients = 0;  // simultaneous connections; 0 = unlimited
  std::string pid_file;      // written once every listener is bound
  std::chrono::seconds stop_timeout{30};
  TlsSettings tls;
  AdminSettings admin;
  uint64_t memory_budget = 1ull << 30;  // payload bytes in flight, all connections together
  SessionOptions session;
};

class Server {
 public:
  Server(ServerOptions options, std::shared_ptr<const ExportRegistry> exports);
  ~Server();
  // Binds the listeners (throws with a clear message on failure), then serves until a
  // stop signal; returns once every connection is closed.
  void run();
  // Begins the graceful stop (thread-safe).
  void stop();

  // The exports new connections see (thread-safe). Connections keep the registry they
  // started with; replacing it is how a reload adds and removes exports.
  std::shared_ptr<const ExportRegistry> exports() const;
  void set_exports(std::shared_ptr<const ExportRegistry> exports);
  // The TLS credentials new connections get (thread-safe): a reload reads the files again,
  // so certificates and keys rotated in place take effect without a restart.
  void set_tls_context(std::shared_ptr<asio::ssl::context> context);
  // Run on SIGHUP and by the admin endpoint's POST /reload, on the main thread; returns a
  // summary, throws on failure. Without one, SIGHUP is logged and ignored.
  void set_reload_handler(std::function<std::string()> handler);
  // Runs the reload handler, logging the outcome and notifying systemd
  // (RELOADING=1 ... READY=1); rethrows its failure.
  std::string reload();

  ServerMetrics& metrics() { return metrics_; }

 private:
  asio::awaitable<void> accept_loop(Listener& listener);
  void start_session(Socket socket, std::string peer, std::optional<asio::ip::address> address);
  asio::io_context& next_context();

  ServerOptions options_;
  mutable std::mutex exports_mutex_;  // also guards options_.session.tls_context
  std::shared_ptr<const ExportRegistry> exports_;
  std::function<std::string()> reload_handler_;
  ServerMetrics metrics_;
  // Destruction runs bottom-up and the order matters: a pending accept in main_ holds a
  // socket of a worker context, so listeners go first, then main_, then the workers.
  std::vector<std::unique_ptr<asio::io_context>> workers_;
  std::vector<std::thread> threads_;
  asio::io_context main_;  // listeners and signals
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::unique_ptr<AdminServer> admin_;  // on main_
  std::atomic<unsigned> next_worker_{0};
  std::atomic<bool> stopping_{false};

  std::mutex sessions_mutex_;
  std::unordered_map<Session*, std::weak_ptr<Session>> sessions_;
  std::atomic<unsigned> session_count_{0};
};

}  // namespace imagenbd::server
