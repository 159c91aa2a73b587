// See admin_client.hpp. (tool_stats.cpp has its own keep-alive client for GETs.)
#include "server/admin_client.hpp"

#include <stdexcept>

#include <fmt/format.h>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

namespace imagenbd::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using generic = asio::generic::stream_protocol;

asio::awaitable<AdminAnswer> admin_request(AdminAddress where, std::string method,
                                           std::string target, std::chrono::milliseconds deadline) {
  const auto executor = co_await asio::this_coro::executor;
  generic::socket socket(executor);
  asio::steady_timer timer(executor);
  bool timed_out = false;
  timer.expires_after(deadline);
  timer.async_wait([&](boost::system::error_code ec) {
    if (ec) return;
    timed_out = true;
    socket.close(ec);
  });
  const generic::endpoint endpoint =
      where.is_unix() ? generic::endpoint(asio::local::stream_protocol::endpoint(where.path))
                      : generic::endpoint(asio::ip::tcp::endpoint(where.address, where.port));
  std::string failure;
  AdminAnswer answer;
  try {
    co_await socket.async_connect(endpoint, asio::use_awaitable);
  } catch (const boost::system::system_error& e) {
    failure = fmt::format(
        "cannot connect to the admin endpoint {}: {} (is the server running with --admin={}?)",
        where.to_string(), timed_out ? "timed out" : e.code().message(), where.to_string());
  }
  if (failure.empty()) {
    http::request<http::empty_body> request(http::string_to_verb(method), target, 11);
    request.set(http::field::host, where.is_unix() ? "localhost" : where.to_string());
    request.set(http::field::user_agent, "imagenbd");
    request.set(http::field::connection, "close");
    request.prepare_payload();
    http::response_parser<http::string_body> parser;
    parser.body_limit(16u << 20);
    beast::flat_buffer buffer;
    try {
      co_await http::async_write(socket, request, asio::use_awaitable);
      co_await http::async_read(socket, buffer, parser, asio::use_awaitable);
      answer = AdminAnswer{parser.get().result_int(), std::move(parser.get().body())};
    } catch (const boost::system::system_error& e) {
      failure =
          fmt::format("admin endpoint {}: {} {}: {}", where.to_string(), method, target,
                      timed_out ? fmt::format("no answer within {} s", deadline.count() / 1000)
                                : e.code().message());
    }
  }
  timer.cancel();
  boost::system::error_code ignored;
  socket.close(ignored);
  if (!failure.empty()) throw std::runtime_error(failure);
  co_return answer;
}

std::string admin_error_message(std::string_view body) {
  const std::string_view key = "{\"error\":\"";
  std::string out;
  if (!body.starts_with(key)) {
    out = std::string(body);
  } else {
    for (std::size_t i = key.size(); i < body.size() && body[i] != '"'; ++i) {
      if (body[i] == '\\' && i + 1 < body.size()) {
        ++i;
        out += body[i] == 'n' ? '\n' : body[i];
      } else {
        out += body[i];
      }
    }
  }
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

}  // namespace imagenbd::server
