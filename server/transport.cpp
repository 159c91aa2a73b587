#include "server/transport.hpp"

#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

namespace imagenbd::server {

struct Transport::Tls {
  Tls(Socket& socket, asio::ssl::context& context) : stream(socket, context) {}
  asio::ssl::stream<Socket&> stream;
};

Transport::Transport(Socket socket) : socket_(std::move(socket)) {}
Transport::~Transport() = default;

asio::awaitable<std::size_t> Transport::read_some(asio::mutable_buffer buffer, error_code& ec) {
  auto token = asio::redirect_error(asio::use_awaitable, ec);
  if (tls_) co_return co_await tls_->stream.async_read_some(buffer, token);
  co_return co_await socket_.async_read_some(buffer, token);
}

asio::awaitable<void> Transport::read_exact(asio::mutable_buffer buffer, error_code& ec) {
  auto token = asio::redirect_error(asio::use_awaitable, ec);
  if (tls_) {
    co_await asio::async_read(tls_->stream, buffer, token);
  } else {
    co_await asio::async_read(socket_, buffer, token);
  }
}

asio::awaitable<void> Transport::write(std::span<const asio::const_buffer> buffers,
                                       error_code& ec) {
  auto token = asio::redirect_error(asio::use_awaitable, ec);
  if (tls_) {
    co_await asio::async_write(tls_->stream, buffers, token);
  } else {
    co_await asio::async_write(socket_, buffers, token);
  }
}

asio::awaitable<void> Transport::start_tls(asio::ssl::context& context, error_code& ec) {
  tls_ = std::make_unique<Tls>(socket_, context);
  co_await tls_->stream.async_handshake(asio::ssl::stream_base::server,
                                        asio::redirect_error(asio::use_awaitable, ec));
  tls_established_ = !ec;
}

asio::awaitable<void> Transport::shutdown_tls(std::chrono::milliseconds limit) {
  if (!tls_established_) co_return;
  tls_established_ = false;
  // A peer that never answers our close_notify: ending the socket makes the pending read
  // fail at once. Once the shutdown is over the handler touches nothing (it may still
  // run, with success, if it was queued just before the cancel).
  auto over = std::make_shared<bool>(false);
  asio::steady_timer timer(socket_.get_executor(), limit);
  timer.async_wait([this, over](error_code ec) {
    if (!ec && !*over) shutdown_both();
  });
  error_code ec;
  co_await tls_->stream.async_shutdown(asio::redirect_error(asio::use_awaitable, ec));
  *over = true;
  timer.cancel();
}

SSL* Transport::native_tls() {
  return tls_ ? tls_->stream.native_handle() : nullptr;
}

void Transport::shutdown_receive() {
  error_code ec;
  socket_.shutdown(asio::socket_base::shutdown_receive, ec);
}

void Transport::shutdown_both() {
  error_code ec;
  socket_.shutdown(asio::socket_base::shutdown_both, ec);
}

void Transport::close() {
  error_code ec;
  socket_.close(ec);
}

}  // namespace imagenbd::server
