// The admin endpoint: one accept loop and one coroutine per connection on the main
// io_context, with Beast's request parser under size limits and a watchdog timer per
// connection (a client that stops sending or reading is closed, Asio 1.18 having no
// per-operation timeouts). Handlers are quick and never block: rendering the metrics
// reads atomics; a reload is the one slow action, and it runs here by design.
#include "server/admin.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "backends/http_status.hpp"
#include "backends/log.hpp"
#include "protocol/wire.hpp"
#include "server/commit.hpp"
#include "server/exports.hpp"
#include "server/metrics.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using generic = asio::generic::stream_protocol;

std::string AdminAddress::to_string() const {
  if (is_unix()) return "unix:" + path;
  if (address.is_v6()) return fmt::format("[{}]:{}", address.to_string(), port);
  return fmt::format("{}:{}", address.to_string(), port);
}

AdminAddress parse_admin_address(std::string_view text) {
  const auto invalid = [&](std::string_view why) {
    return std::invalid_argument(fmt::format(
        "admin address '{}': {} (use unix:PATH, 127.0.0.1:PORT or [::1]:PORT)", text, why));
  };
  AdminAddress out;
  if (text.starts_with("unix:")) {
    out.path = text.substr(5);
    if (out.path.empty()) throw invalid("no socket path after 'unix:'");
    if (out.path.size() >= sizeof(sockaddr_un::sun_path)) throw invalid("socket path too long");
    return out;
  }
  std::string_view host;
  std::string_view port;
  if (text.starts_with("[")) {
    const auto close = text.find("]:");
    if (close == std::string_view::npos) throw invalid("expected [ADDRESS]:PORT");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) throw invalid("no port");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) throw invalid("put IPv6 addresses in [ ]");
  }
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535) {
    throw invalid(fmt::format("bad port '{}'", port));
  }
  out.port = static_cast<uint16_t>(value);
  if (host == "localhost") {
    out.address = asio::ip::address_v4::loopback();
    return out;
  }
  boost::system::error_code bad;
  out.address = asio::ip::make_address(std::string(host), bad);
  if (bad) throw invalid(fmt::format("'{}' is not a numeric IP address", host));
  return out;
}

namespace {

using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

// Beast 1.74 hands out boost::string_view.
std::string_view sv(beast::string_view text) {
  return {text.data(), text.size()};
}

Response make_response(const Request& request, http::status status, std::string_view type,
                       std::string body) {
  Response r(status, request.version());
  r.set(http::field::server, "imagenbd");
  r.set(http::field::content_type, beast::string_view(type.data(), type.size()));
  r.set(http::field::cache_control, "no-store");
  r.body() = std::move(body);
  return r;
}

Response json_error(const Request& request, http::status status, std::string_view message) {
  return make_response(request, status, "application/json",
                       fmt::format("{{\"error\":{}}}\n", json_string(message)));
}

// %XX and + in a query value.
std::string percent_decode(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '+') {
      out += ' ';
    } else if (text[i] == '%' && i + 2 < text.size()) {
      unsigned value = 0;
      const auto [end, ec] = std::from_chars(text.data() + i + 1, text.data() + i + 3, value, 16);
      if (ec == std::errc() && end == text.data() + i + 3) {
        out += static_cast<char>(value);
        i += 2;
      } else {
        out += '%';
      }
    } else {
      out += text[i];
    }
  }
  return out;
}

// The values of every "export=" in the query string (?export=a&export=b): the exports a
// request is about; none means all.
std::vector<std::string> export_filter(std::string_view query) {
  std::vector<std::string> names;
  while (!query.empty()) {
    const auto amp = query.find('&');
    const std::string_view pair = query.substr(0, amp);
    if (pair == "export") names.emplace_back();
    if (pair.starts_with("export=")) names.push_back(percent_decode(pair.substr(7)));
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return names;
}

// A JSON string, or null for "" (a setting not given).
std::string optional_string(const std::string& text) {
  return text.empty() ? std::string("null") : json_string(text);
}

std::string exports_json(const ExportRegistry& registry, const std::vector<std::string>& only) {
  std::string out = "{\"exports\":[";
  bool first = true;
  for (const auto& e : registry.all()) {
    if (!only.empty() && std::find(only.begin(), only.end(), e->name) == only.end()) continue;
    const protocol::ExportInfo info = e->info();
    const ExportMetrics& m = *e->metrics;
    std::string allow;
    for (const auto& cidr : e->access.allow) {
      allow += (allow.empty() ? "" : ",") + json_string(cidr.to_string());
    }
    std::string identities;
    for (const auto& id : e->access.tls_identities) {
      identities += (identities.empty() ? "" : ",") + json_string(id);
    }
    fmt::format_to(std::back_inserter(out),
                   "{}{{\"name\":{},\"description\":{},\"image\":{},\"format\":{},\"size\":{},"
                   "\"read_only\":{},\"connections\":{},\"connections_total\":{},"
                   "\"connections_refused\":{},\"in_flight\":{},"
                   "\"access\":{{\"allow\":[{}],\"allow_identities\":[{}],\"max_connections\":{}}},"
                   "\"overlay\":{},\"cache\":{},\"cache_size\":{},\"boot_profile\":{}}}",
                   first ? "" : ",", json_string(e->name), json_string(e->description),
                   json_string(backends::http::redact(e->spec.image)),
                   json_string((e->lower ? e->lower : e->device)->name()), info.size,
                   (info.flags & protocol::tx_flag::read_only) ? "true" : "false",
                   m.connections.load(std::memory_order_relaxed),
                   m.connections_total.load(std::memory_order_relaxed),
                   m.connections_refused.load(std::memory_order_relaxed),
                   m.in_flight.load(std::memory_order_relaxed), allow, identities,
                   e->access.max_connections, optional_string(e->spec.overlay),
                   optional_string(e->spec.cache), e->spec.cache_size,
                   optional_string(e->spec.boot_profile));
    first = false;
  }
  out += "]}\n";
  return out;
}

}  // namespace

struct AdminServer::Impl : std::enable_shared_from_this<Impl> {
  Impl(asio::io_context& context, AdminHooks hooks, AdminLimits limits)
      : acceptor(context), hooks(std::move(hooks)), limits(limits) {}

  asio::awaitable<void> accept_loop();
  asio::awaitable<void> serve(generic::socket socket, uint64_t id);
  asio::awaitable<Response> respond_async(const Request& request);
  asio::awaitable<Response> respond_snapshot_post(const Request& request, std::string name);
  std::optional<Response> refuse_cross_site(const Request& request) const;
  Response respond(const Request& request);
  Response respond_reload(const Request& request);
  void close();

  asio::basic_socket_acceptor<generic> acceptor;
  AdminHooks hooks;
  AdminLimits limits;
  std::string label;
  std::string unix_path;  // the socket file we made, removed by close()
  bool closed = false;
  uint64_t next_id = 0;
  // The open connections' sockets, for close(); each coroutine removes its own.
  std::unordered_map<uint64_t, std::weak_ptr<generic::socket>> connections;
  Commits commits;  // live snapshots of the exports
};

AdminServer::AdminServer(asio::io_context& context, const AdminSettings& settings, AdminHooks hooks,
                         AdminLimits limits)
    : impl_(std::make_shared<Impl>(context, std::move(hooks), limits)) {
  const AdminAddress where = parse_admin_address(settings.listen);
  Impl& s = *impl_;
  s.label = where.to_string();
  const std::string what = "admin endpoint " + s.label;
  boost::system::error_code ec;
  if (where.is_unix()) {
    // A socket file left by a crashed server is replaced; a live one is not.
    struct stat st {};
    if (::lstat(where.path.c_str(), &st) == 0) {
      if (!S_ISSOCK(st.st_mode)) {
        throw std::runtime_error(what + ": " + where.path + " exists and is not a socket");
      }
      asio::local::stream_protocol::socket probe(context);
      probe.connect(asio::local::stream_protocol::endpoint(where.path), ec);
      if (!ec) {
        throw std::runtime_error(what + ": another server is already listening there");
      }
      ::unlink(where.path.c_str());
    }
    const generic::endpoint endpoint(asio::local::stream_protocol::endpoint{where.path});
    s.acceptor.open(endpoint.protocol(), ec);
    if (!ec) s.acceptor.bind(endpoint, ec);
    if (ec) throw std::runtime_error(what + ": " + ec.message());
    s.unix_path = where.path;
    // Owner only: the endpoint has no authentication. Nobody can connect before listen(),
    // so there is no window with looser permissions.
    if (::chmod(where.path.c_str(), 0600) != 0) {
      const int error = errno;
      s.close();
      throw std::runtime_error(what + ": chmod 0600: " + std::strerror(error));
    }
  } else {
    if (!where.address.is_loopback()) {
      throw std::runtime_error(
          what +
          ": not a loopback address; the admin endpoint has no authentication, so it "
          "listens only on 127.0.0.1, ::1 or a Unix socket (put a proxy with "
          "authentication in front of it for remote access)");
    }
    const generic::endpoint endpoint(asio::ip::tcp::endpoint(where.address, where.port));
    s.acceptor.open(endpoint.protocol(), ec);
    if (!ec) s.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) s.acceptor.bind(endpoint, ec);
    if (ec == asio::error::address_in_use) {
      throw std::runtime_error(what + ": the address is already in use (pick another port)");
    }
    if (ec) throw std::runtime_error(what + ": " + ec.message());
  }
  s.acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    s.close();
    throw std::runtime_error(what + ": listen: " + ec.message());
  }
  asio::co_spawn(context, impl_->accept_loop(), [label = s.label](std::exception_ptr ep) {
    if (!ep) return;
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      log::error("admin endpoint {} failed: {}", label, e.what());
    }
  });
}

AdminServer::~AdminServer() {
  if (impl_) impl_->close();
}

void AdminServer::close() {
  impl_->close();
}

const std::string& AdminServer::label() const {
  return impl_->label;
}

void AdminServer::Impl::close() {
  if (closed) return;
  closed = true;
  boost::system::error_code ignored;
  acceptor.close(ignored);
  for (auto& [_, weak] : connections) {
    if (auto socket = weak.lock()) socket->close(ignored);
  }
  if (!unix_path.empty()) ::unlink(unix_path.c_str());
}

asio::awaitable<void> AdminServer::Impl::accept_loop() {
  auto self = shared_from_this();
  while (!closed) {
    boost::system::error_code ec;
    generic::socket socket =
        co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (closed) co_return;
    if (ec) {
      if (ec == asio::error::operation_aborted) co_return;
      // EMFILE and friends: pause, keep serving.
      log::warn("admin endpoint {}: accept failed: {}", label, ec.message());
      asio::steady_timer pause(acceptor.get_executor(), std::chrono::milliseconds(100));
      co_await pause.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      continue;
    }
    if (connections.size() >= limits.max_connections) {
      log::warn("admin endpoint {}: {} connections open already; closing a new one", label,
                connections.size());
      socket.close(ec);
      continue;
    }
    const uint64_t id = next_id++;
    asio::co_spawn(acceptor.get_executor(), serve(std::move(socket), id),
                   [self, id](std::exception_ptr ep) {
                     self->connections.erase(id);
                     if (!ep) return;
                     try {
                       std::rethrow_exception(ep);
                     } catch (const std::exception& e) {
                       log::warn("admin endpoint {}: connection failed: {}", self->label, e.what());
                     }
                   });
  }
}

asio::awaitable<void> AdminServer::Impl::serve(generic::socket accepted, uint64_t id) {
  auto self = shared_from_this();
  auto socket = std::make_shared<generic::socket>(std::move(accepted));
  connections.emplace(id, socket);
  // The watchdog: each read or write gets a deadline; when it passes, the socket is closed
  // and the pending operation fails.
  asio::steady_timer watchdog(socket->get_executor());
  const auto arm = [&watchdog, weak = std::weak_ptr<generic::socket>(socket)](auto timeout) {
    watchdog.expires_after(timeout);
    watchdog.async_wait([weak](boost::system::error_code ec) {
      if (ec) return;
      if (auto s = weak.lock()) s->close(ec);
    });
  };
  beast::flat_buffer buffer(limits.max_header + limits.max_body);
  for (;;) {
    http::request_parser<http::string_body> parser;
    parser.header_limit(static_cast<uint32_t>(limits.max_header));
    parser.body_limit(limits.max_body);
    boost::system::error_code ec;
    arm(limits.read_timeout);
    co_await http::async_read(*socket, buffer, parser,
                              asio::redirect_error(asio::use_awaitable, ec));
    if (closed) break;
    std::optional<Response> response;
    if (ec) {
      if (ec == http::error::end_of_stream || ec == asio::error::eof ||
          ec == asio::error::operation_aborted || ec == asio::error::bad_descriptor ||
          ec == asio::error::connection_reset) {
        break;  // the client is gone, or the watchdog closed it
      }
      // Malformed or too large: say so once, then close (the stream is out of step).
      Request none;
      const bool too_large = ec == http::error::body_limit || ec == http::error::header_limit ||
                             ec == http::error::buffer_overflow;
      response =
          json_error(none, too_large ? http::status::payload_too_large : http::status::bad_request,
                     too_large ? fmt::format("request too large (headers up to {} bytes, "
                                             "body up to {} bytes)",
                                             limits.max_header, limits.max_body)
                               : "bad request: " + ec.message());
      response->keep_alive(false);
    } else {
      const Request& request = parser.get();
      response = co_await respond_async(request);
      response->keep_alive(request.keep_alive());
      log::debug("admin endpoint {}: {} {} -> {}", label, sv(request.method_string()),
                 sv(request.target()), response->result_int());
    }
    response->prepare_payload();
    arm(limits.write_timeout);
    boost::system::error_code write_ec;
    co_await http::async_write(*socket, *response,
                               asio::redirect_error(asio::use_awaitable, write_ec));
    if (write_ec || !response->keep_alive() || closed) break;
  }
  if (!closed && socket->is_open()) {
    // A lingering close: the client may still be sending (the body of a refused request);
    // closing now would reset the connection before it reads our answer. Read and drop
    // what comes for a moment, as web servers do.
    boost::system::error_code ec;
    socket->shutdown(generic::socket::shutdown_send, ec);
    arm(std::chrono::seconds(1));
    std::array<char, 4096> sink;
    for (std::size_t drained = 0; !ec && drained < (1u << 20);) {
      drained += co_await socket->async_read_some(asio::buffer(sink),
                                                  asio::redirect_error(asio::use_awaitable, ec));
    }
  }
  watchdog.cancel();
  boost::system::error_code ignored;
  socket->shutdown(generic::socket::shutdown_both, ignored);
  socket->close(ignored);
}

namespace {

// "127.0.0.1", "[::1]:9109", "localhost:9109": the names a local tool uses for a loopback
// endpoint. Anything else reaching a loopback port is a browser tricked into it.
bool loopback_host(std::string_view host) {
  if (host.starts_with('[')) {
    const auto close = host.find(']');
    if (close == std::string_view::npos) return false;
    const std::string_view rest = host.substr(close + 1);
    if (!rest.empty() && !rest.starts_with(':')) return false;
    host = host.substr(1, close - 1);
  } else {
    host = host.substr(0, host.find(':'));
  }
  if (host == "localhost") return true;
  boost::system::error_code ec;
  const auto address = asio::ip::make_address(std::string(host), ec);
  return !ec && address.is_loopback();
}

// The export NAME of a /exports/NAME/snapshot path (percent-decoded), or nullopt.
std::optional<std::string> snapshot_route(std::string_view path) {
  constexpr std::string_view head = "/exports/", tail = "/snapshot";
  if (!path.starts_with(head) || !path.ends_with(tail) || path.size() < head.size() + tail.size())
    return std::nullopt;
  const std::string_view name = path.substr(head.size(), path.size() - head.size() - tail.size());
  if (name.find('/') != std::string_view::npos) return std::nullopt;
  return percent_decode(name);
}

}  // namespace

std::optional<Response> AdminServer::Impl::refuse_cross_site(const Request& request) const {
  // The endpoint has no authentication; what keeps web pages out is that browsers always
  // send Origin on cross-site POSTs and keep the page's Host under DNS rebinding.
  if (request.count(http::field::origin) > 0) {
    return json_error(request, http::status::forbidden,
                      "cross-origin requests are refused (the admin endpoint is for local tools)");
  }
  if (unix_path.empty() && !loopback_host(sv(request[http::field::host]))) {
    return json_error(request, http::status::forbidden,
                      fmt::format("Host '{}' is refused: use 127.0.0.1, [::1] or localhost",
                                  sv(request[http::field::host])));
  }
  return std::nullopt;
}

// POST /exports/NAME/snapshot waits for the commit's point in time (a short pause of the
// overlay, on a worker); everything else answers at once.
asio::awaitable<Response> AdminServer::Impl::respond_async(const Request& request) {
  const std::string_view target = sv(request.target());
  auto name = snapshot_route(target.substr(0, target.find('?')));
  if (request.method() == http::verb::post && name && !refuse_cross_site(request)) {
    co_return co_await respond_snapshot_post(request, std::move(*name));
  }
  co_return respond(request);
}

asio::awaitable<Response> AdminServer::Impl::respond_snapshot_post(const Request& request,
                                                                   std::string name) {
  const auto e = hooks.exports()->find(name);
  if (!e)
    co_return json_error(request, http::status::not_found, fmt::format("no export '{}'", name));
  log::info("admin endpoint {}: live snapshot of export '{}' requested", label, e->name);
  const asio::any_io_executor worker =
      hooks.worker ? hooks.worker() : asio::any_io_executor(acceptor.get_executor());
  std::optional<Response> refusal;
  try {
    const CommitStatus status = co_await commits.start(e, worker);
    co_return make_response(request, http::status::accepted, "application/json",
                            commit_status_json(status));
  } catch (const CommitBusy& x) {
    refusal = json_error(request, http::status::conflict, x.what());
  } catch (const std::invalid_argument& x) {
    refusal = json_error(request, http::status::bad_request, x.what());
  } catch (const backends::Error& x) {
    refusal = json_error(request,
                         x.errc() == std::errc::device_or_resource_busy
                             ? http::status::conflict
                             : http::status::internal_server_error,
                         x.what());
  } catch (const std::exception& x) {
    refusal = json_error(request, http::status::internal_server_error, x.what());
  }
  log::warn("admin endpoint {}: live snapshot of export '{}' refused: {}", label, e->name,
            refusal->body());
  co_return std::move(*refusal);
}

Response AdminServer::Impl::respond(const Request& request) {
  const std::string_view target = sv(request.target());
  const auto question = target.find('?');
  const std::string_view path = target.substr(0, question);
  const std::string_view query =
      question == std::string_view::npos ? std::string_view() : target.substr(question + 1);
  const http::verb method = request.method();

  if (auto refused = refuse_cross_site(request)) return std::move(*refused);
  if (const auto name = snapshot_route(path)) {
    if (method != http::verb::get && method != http::verb::post) {
      Response r = json_error(
          request, http::status::method_not_allowed,
          fmt::format("{} takes GET or POST, not {}", path, sv(request.method_string())));
      r.set(http::field::allow, "GET, POST");
      return r;
    }
    const auto e = hooks.exports()->find(*name);
    if (!e)
      return json_error(request, http::status::not_found, fmt::format("no export '{}'", *name));
    return make_response(request, http::status::ok, "application/json",
                         commit_status_json(commits.status(*e)));
  }

  struct Route {
    std::string_view path;
    http::verb method;
  };
  static constexpr Route routes[] = {{"/metrics", http::verb::get},
                                     {"/exports", http::verb::get},
                                     {"/health", http::verb::get},
                                     {"/reload", http::verb::post}};
  const Route* route = nullptr;
  for (const auto& r : routes) {
    if (r.path == path) route = &r;
  }
  if (!route) {
    return json_error(request, http::status::not_found,
                      fmt::format("no such resource: {} (try /metrics, /exports, /health, "
                                  "POST /reload, GET or POST /exports/NAME/snapshot)",
                                  path));
  }
  if (method != route->method) {
    Response r =
        json_error(request, http::status::method_not_allowed,
                   fmt::format("{} takes {}, not {}", path, sv(http::to_string(route->method)),
                               sv(request.method_string())));
    r.set(http::field::allow, http::to_string(route->method));
    return r;
  }
  if (path == "/health") return make_response(request, http::status::ok, "text/plain", "ok\n");
  if (path == "/reload") return respond_reload(request);

  const std::shared_ptr<const ExportRegistry> exports = hooks.exports();
  // The names asked for, as the exports call themselves ("" finds the default export).
  std::vector<std::string> only;
  for (const auto& name : export_filter(query)) {
    const auto e = exports->find(name);
    if (!e) {
      return json_error(request, http::status::not_found, fmt::format("no export '{}'", name));
    }
    only.push_back(e->name);
  }
  if (path == "/metrics") {
    static const ServerMetrics none;
    return make_response(request, http::status::ok, "text/plain; version=0.0.4; charset=utf-8",
                         render_prometheus(hooks.metrics ? *hooks.metrics : none, *exports, only));
  }
  return make_response(request, http::status::ok, "application/json", exports_json(*exports, only));
}

Response AdminServer::Impl::respond_reload(const Request& request) {
  if (!hooks.reload) {
    return json_error(request, http::status::conflict,
                      "nothing to reload: the server was not started with --config");
  }
  log::info("admin endpoint {}: reload requested", label);
  try {
    const std::string summary = hooks.reload();
    return make_response(
        request, http::status::ok, "application/json",
        fmt::format("{{\"result\":\"reloaded\",\"summary\":{}}}\n", json_string(summary)));
  } catch (const std::exception& e) {
    return json_error(request, http::status::internal_server_error,
                      fmt::format("reload failed, the previous configuration stays: {}", e.what()));
  }
}

}  // namespace imagenbd::server
