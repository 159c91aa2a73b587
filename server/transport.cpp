#include "server/transport.hpp"

#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/stream.hpp>
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
