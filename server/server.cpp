#include "server/server.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/log.hpp"
#include "server/service_notify.hpp"

namespace imagenbd::server {

namespace {

// The client's IP endpoint, none for Unix sockets.
std::optional<asio::ip::tcp::endpoint> peer_endpoint(const Socket& socket) {
  boost::system::error_code ec;
  auto ep = socket.remote_endpoint(ec);
  if (ec) return std::nullopt;
  const auto* sa = static_cast<const sockaddr*>(ep.data());
  if (sa->sa_family != AF_INET && sa->sa_family != AF_INET6) return std::nullopt;
  asio::ip::tcp::endpoint tep;
  std::memcpy(tep.data(), ep.data(), ep.size());
  tep.resize(ep.size());
  return tep;
}

std::string peer_name(const std::optional<asio::ip::tcp::endpoint>& ep, const Listener& listener) {
  if (!listener.tcp) return listener.label;
  if (!ep) return "client";
  return ep->address().is_v6() ? "[" + ep->address().to_string() + "]:" + std::to_string(ep->port())
                               : ep->address().to_string() + ":" + std::to_string(ep->port());
}

}  // namespace

Server::Server(ServerOptions options, std::shared_ptr<const ExportRegistry> exports)
    : options_(std::move(options)), exports_(std::move(exports)) {
  if (!options_.session.memory) {
    options_.session.memory = std::make_shared<MemoryBudget>(options_.memory_budget);
  }
  options_.session.metrics = &metrics_;
  options_.session.tls_mode = options_.tls.mode;
  if (options_.tls.mode != protocol::TlsMode::off) {
    options_.session.tls_context = make_tls_context(options_.tls);
  }
  unsigned n =
      options_.threads ? options_.threads : std::max(1u, std::thread::hardware_concurrency());
  for (unsigned i = 0; i < n; ++i) workers_.push_back(std::make_unique<asio::io_context>(1));
}

Server::~Server() {
  for (auto& w : workers_) w->stop();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

std::shared_ptr<const ExportRegistry> Server::exports() const {
  std::lock_guard lock(exports_mutex_);
  return exports_;
}

void Server::set_exports(std::shared_ptr<const ExportRegistry> exports) {
  std::lock_guard lock(exports_mutex_);
  exports_ = std::move(exports);
}

void Server::set_tls_context(std::shared_ptr<asio::ssl::context> context) {
  std::lock_guard lock(exports_mutex_);
  options_.session.tls_context = std::move(context);
}

void Server::set_reload_handler(std::function<std::string()> handler) {
  reload_handler_ = std::move(handler);
}

std::string Server::reload() {
  if (!reload_handler_) {
    throw std::runtime_error("nothing to reload: the server was not started with --config");
  }
  notify_service_manager(fmt::format("RELOADING=1\nMONOTONIC_USEC={}",
                                     std::chrono::duration_cast<std::chrono::microseconds>(
                                         std::chrono::steady_clock::now().time_since_epoch())
                                         .count()));
  try {
    std::string summary = reload_handler_();
    ++metrics_.reloads;
    log::notice("configuration reloaded: {}", summary);
    notify_service_manager("READY=1\nSTATUS=configuration reloaded: " + summary);
    return summary;
  } catch (const std::exception& e) {
    ++metrics_.reload_failures;
    log::error("reload failed, the previous configuration stays: {}", e.what());
    notify_service_manager(std::string("READY=1\nSTATUS=reload failed: ") + e.what());
    throw;
  }
}

asio::io_context& Server::next_context() {
  return *workers_[next_worker_.fetch_add(1, std::memory_order_relaxed) % workers_.size()];
}

void Server::run() {
  ::signal(SIGPIPE, SIG_IGN);
  // main() blocked SIGINT/SIGTERM before any thread was started, so every thread inherits
  // the block; they are unblocked in this thread only once the handler is in place, and a
  // signal sent during startup is handled gracefully instead of killing the process.
  asio::signal_set signals(main_, SIGINT, SIGTERM);
  std::function<void(boost::system::error_code, int)> on_signal = [&](boost::system::error_code ec,
                                                                      int signo) {
    if (ec) return;
    if (stopping_) {
      log::warn("second signal {}: stopping now, without waiting for clients", signo);
      std::_Exit(1);
    }
    log::notice("signal {} received: stopping (finishing {} connection(s))", signo,
                session_count_.load());
    notify_service_manager(fmt::format("STOPPING=1\nSTATUS=stopping: finishing {} connection(s)",
                                       session_count_.load()));
    stop();
    signals.async_wait(on_signal);
  };
  signals.async_wait(on_signal);
  asio::signal_set hangup(main_, SIGHUP);
  std::function<void(boost::system::error_code, int)> on_hangup = [&](boost::system::error_code ec,
                                                                      int) {
    if (ec) return;
    if (!reload_handler_) {
      log::warn("SIGHUP ignored: the server was not started with --config, nothing to reload");
    } else {
      try {
        reload();
      } catch (const std::exception&) {
        // logged by reload()
      }
    }
    hangup.async_wait(on_hangup);
  };
  hangup.async_wait(on_hangup);

  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGHUP);
  listeners_ = adopt_activated_listeners(main_);
  if (listeners_.empty()) {
    listeners_ = open_listeners(main_, options_.listen);
  } else {
    log::info(
        "socket activation: serving on {} socket(s) passed by the service manager; "
        "--port, --bind and --socket are not used",
        listeners_.size());
  }
  for (auto& l : listeners_) log::info("listening on {}", l->label);
  if (!options_.admin.listen.empty()) {
    admin_ = std::make_unique<AdminServer>(
        main_, options_.admin,
        AdminHooks{.exports = [this] { return exports(); },
                   .metrics = &metrics_,
                   .reload = reload_handler_
                                 ? std::function<std::string()>([this] { return reload(); })
                                 : std::function<std::string()>(),
                   .worker = [this] {
                     return asio::any_io_executor(next_context().get_executor());
                   }});
    log::info("admin endpoint on {}", admin_->label());
  }

  if (!options_.pid_file.empty()) {
    std::ofstream pid(options_.pid_file, std::ios::trunc);
    pid << ::getpid() << '\n';
    if (!pid) throw std::runtime_error("cannot write the pid file " + options_.pid_file);
  }

  std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards;
  for (auto& w : workers_) {
    guards.push_back(asio::make_work_guard(*w));
    threads_.emplace_back([ctx = w.get()] { ctx->run(); });
  }
  ::pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
  // Listening and the pid file written: systemd (Type=notify) may start what depends on us.
  notify_service_manager(fmt::format("READY=1\nMAINPID={}\nSTATUS=serving on {} listener(s)",
                                     ::getpid(), listeners_.size()));

  for (auto& l : listeners_) {
    asio::co_spawn(main_, accept_loop(*l), [label = l->label](std::exception_ptr ep) {
      if (!ep) return;
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        log::error("listener {} failed: {}", label, e.what());
      }
    });
  }
  main_.run();

  // Stopping: wait for the connections to finish their requests, up to stop_timeout.
  const auto deadline = std::chrono::steady_clock::now() + options_.stop_timeout;
  while (session_count_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (session_count_.load() > 0) {
    log::warn("{} connection(s) still busy after {} s; closing them", session_count_.load(),
              options_.stop_timeout.count());
  }
  guards.clear();
  for (auto& w : workers_) w->stop();
  for (auto& t : threads_) t.join();
  threads_.clear();
  // Let the accept loops see their cancelled accepts and return, so nothing is left
  // pending on main_ when the contexts are destroyed.
  boost::system::error_code ignored;
  signals.cancel(ignored);
  hangup.cancel(ignored);
  if (admin_) admin_->close();
  for (auto& l : listeners_) close_listener(*l);
  main_.restart();
  main_.run();
  if (!options_.pid_file.empty()) ::unlink(options_.pid_file.c_str());
}

void Server::stop() {
  if (stopping_.exchange(true)) return;
  asio::post(main_, [this] {
    for (auto& l : listeners_) {
      boost::system::error_code ec;
      l->acceptor.close(ec);
    }
    std::lock_guard lock(sessions_mutex_);
    for (auto& [_, weak] : sessions_) {
      if (auto s = weak.lock()) s->stop();
    }
    main_.stop();
  });
}

asio::awaitable<void> Server::accept_loop(Listener& listener) {
  while (!stopping_) {
    auto& ctx = next_context();
    boost::system::error_code ec;
    Socket socket =
        co_await listener.acceptor.async_accept(ctx, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (ec == asio::error::operation_aborted || stopping_) co_return;
      // EMFILE and friends: log, pause briefly, keep serving the clients we have.
      log::warn("accept on {} failed: {}", listener.label, ec.message());
      asio::steady_timer pause(main_, std::chrono::milliseconds(100));
      co_await pause.async_wait(asio::use_awaitable);
      continue;
    }
    const auto endpoint = listener.tcp ? peer_endpoint(socket) : std::nullopt;
    std::string peer = peer_name(endpoint, listener);
    ++metrics_.connections_total;
    if (options_.max_clients && session_count_.load() >= options_.max_clients) {
      log::warn("{}: refused: {} clients already connected (--shared={})", peer,
                session_count_.load(), options_.max_clients);
      ++metrics_.connections_refused;
      socket.close(ec);
      continue;
    }
    if (listener.tcp) {
      socket.set_option(asio::ip::tcp::no_delay(true), ec);
      socket.set_option(asio::socket_base::keep_alive(true), ec);
    }
    std::optional<asio::ip::address> address;
    if (endpoint) address = endpoint->address();
    start_session(std::move(socket), std::move(peer), address);
  }
}

void Server::start_session(Socket socket, std::string peer,
                           std::optional<asio::ip::address> address) {
  auto ex = socket.get_executor();
  std::shared_ptr<const ExportRegistry> registry;
  SessionOptions session_options;
  {
    std::lock_guard lock(exports_mutex_);
    registry = exports_;
    session_options = options_.session;
  }
  auto session = std::make_shared<Session>(std::move(socket), std::move(peer), address,
                                           std::move(registry), std::move(session_options));
  {
    std::lock_guard lock(sessions_mutex_);
    sessions_.emplace(session.get(), session);
  }
  ++session_count_;
  ++metrics_.connections;
  log::debug("{}: connected", session->peer());
  // A connection accepted just as the stop began must stop too.
  if (stopping_) session->stop();
  asio::co_spawn(ex, session->run(), [this, session](std::exception_ptr) {
    {
      std::lock_guard lock(sessions_mutex_);
      sessions_.erase(session.get());
    }
    --session_count_;
    --metrics_.connections;
  });
}

}  // namespace imagenbd::server
