// The byte stream of one connection: the accepted socket, and once NBD_OPT_STARTTLS
// succeeded, a TLS stream over it. The session reads and writes only through this, so the
// transmission code is the same with and without TLS.
//
// Not thread-safe: used from the session's one thread. One read and one write may be in
// flight at the same time (the reader and the writer coroutines), as asio's ssl::stream
// allows.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/generic/stream_protocol.hpp>

namespace boost::asio::ssl {
class context;
}
typedef struct ssl_st SSL;

namespace imagenbd::server {

namespace asio = boost::asio;
using Socket = asio::generic::stream_protocol::socket;
using boost::system::error_code;

class Transport {
 public:
  explicit Transport(Socket socket);
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  asio::any_io_executor get_executor() { return socket_.get_executor(); }

  // Like asio's read_some / async_read / async_write; errors in `ec`, never thrown.
  asio::awaitable<std::size_t> read_some(asio::mutable_buffer buffer, error_code& ec);
  asio::awaitable<void> read_exact(asio::mutable_buffer buffer, error_code& ec);
  asio::awaitable<void> write(std::span<const asio::const_buffer> buffers, error_code& ec);

  // Runs the server side of a TLS handshake; afterwards every read and write is
  // encrypted. On failure `ec` says why and the connection must be closed.
  asio::awaitable<void> start_tls(asio::ssl::context& context, error_code& ec);
  bool tls() const { return tls_ != nullptr; }
  SSL* native_tls();  // null without TLS

  // Ends TLS cleanly before close(): sends close_notify and waits up to `limit` for the
  // peer's, so a client reading sees a proper end, not a possible truncation attack.
  // Nothing to do without an established TLS session; errors are ignored (the client
  // may be gone). No read or write may be in flight.
  asio::awaitable<void> shutdown_tls(std::chrono::milliseconds limit);

  // Ends the receive side (pending reads see EOF), both sides, or closes the socket.
  void shutdown_receive();
  void shutdown_both();
  void close();

 private:
  struct Tls;
  Socket socket_;
  std::unique_ptr<Tls> tls_;
  bool tls_established_ = false;
};

}  // namespace imagenbd::server
