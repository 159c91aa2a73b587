// One client connection: the handshake (driven through protocol::Handshake), then the
// transmission phase. A reader coroutine decodes requests continuously and spawns one
// handler per request (bounded in count and bytes, for backpressure); handlers finish in
// any order and queue their replies; one writer sends whatever is queued in a single
// gathered write, header and payload together.
//
// Thread safety: a session lives on one io_context run by one thread; everything below
// runs there. stop() may be called from elsewhere: it posts to that executor.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/container/small_vector.hpp>

#include "protocol/handshake.hpp"
#include "protocol/transmission.hpp"
#include "server/access.hpp"
#include "server/buffer_pool.hpp"
#include "server/exports.hpp"
#include "server/metrics.hpp"
#include "server/transport.hpp"
#include "server/validate.hpp"

namespace imagenbd::server {

// Payload bytes held by requests in flight across every connection of the server: bounds
// memory when many clients send large requests and do not read the replies.
class MemoryBudget {
 public:
  explicit MemoryBudget(uint64_t limit) : limit_(limit) {}
  bool try_acquire(uint64_t bytes) {
    uint64_t used = used_.load(std::memory_order_relaxed);
    do {
      if (used + bytes > limit_ && used > 0) return false;
    } while (!used_.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
    return true;
  }
  void release(uint64_t bytes) { used_.fetch_sub(bytes, std::memory_order_relaxed); }

 private:
  const uint64_t limit_;
  std::atomic<uint64_t> used_{0};
};

struct SessionOptions {
  std::chrono::milliseconds handshake_timeout{10'000};
  uint32_t max_in_flight = 128;                 // requests being handled at once
  uint64_t max_in_flight_bytes = 128ull << 20;  // payload bytes held by those requests
  std::shared_ptr<MemoryBudget> memory;         // shared by all sessions; may be null
  // Close a connection with no request in flight for this long; 0 = never.
  std::chrono::milliseconds idle_timeout{0};
  protocol::TlsMode tls_mode = protocol::TlsMode::off;
  std::shared_ptr<asio::ssl::context> tls_context;  // set when tls_mode != off
  ServerMetrics* metrics = nullptr;                 // may be null (tests)
};

// Counters of one session, logged when it ends.
struct SessionStats {
  uint64_t requests = 0;
  uint64_t errors = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  // `address`: the client's IP address, none for Unix sockets (access rules use it).
  Session(Socket socket, std::string peer, std::optional<asio::ip::address> address,
          std::shared_ptr<const ExportRegistry> exports, SessionOptions options);

  // Runs the whole connection; returns when it is closed. Never throws.
  asio::awaitable<void> run();
  // Graceful stop: no new requests are read; requests in flight finish and are answered,
  // the export is flushed, the connection is closed. Safe to call from any thread.
  void stop();

  const std::string& peer() const { return peer_; }

 private:
  // A reply waiting to be sent: header bytes of one or more chunks, and the payload they
  // refer to. Pieces say in which order head and payload ranges go on the wire.
  struct Piece {
    bool payload;
    uint32_t offset;
    uint32_t length;
  };
  struct Reply {
    boost::container::small_vector<std::byte, 64> head;
    boost::container::small_vector<Piece, 4> pieces;
    Buffer payload;
    uint64_t budget = 0;  // in-flight bytes this request holds until the reply is written
    std::byte* add_head(std::size_t n);
    void add_payload(std::size_t offset, std::size_t n);
  };
  // Wakes coroutines waiting for a condition on this session (single-threaded).
  class Signal {
   public:
    explicit Signal(const asio::any_io_executor& ex) : timer_(ex) {}
    asio::awaitable<void> wait();
    void notify() { timer_.cancel(); }

   private:
    asio::steady_timer timer_;
  };

  asio::awaitable<bool> handshake();
  asio::awaitable<bool> start_tls(protocol::Handshake& hs, std::vector<std::byte>& out);
  asio::awaitable<void> transmission();
  asio::awaitable<bool> fill(std::size_t wanted);  // false on EOF or error
  asio::awaitable<void> discard(uint64_t length);
  asio::awaitable<void> acquire(uint64_t bytes);
  void release(uint64_t bytes);
  asio::awaitable<void> handle(protocol::Request request, Buffer payload, uint64_t budget);
  asio::awaitable<void> do_read(const protocol::Request& r, Reply& reply);
  asio::awaitable<void> read_pieces(uint64_t offset, std::span<std::byte> out);
  asio::awaitable<void> write_pieces(uint64_t offset, std::span<const std::byte> in,
                                     backends::WriteFlags flags);
  asio::awaitable<void> do_block_status(const protocol::Request& r, Reply& reply);
  asio::awaitable<void> write_loop();
  asio::awaitable<void> drain_and_close();
  void reply_ok(const protocol::Request& r, Reply& reply);
  void reply_error(const protocol::Request& r, protocol::Errno error, std::string_view message,
                   Reply& reply);
  void send(Reply reply);
  void log_request(const protocol::Request& r, protocol::Errno result) const;
  void arm_idle_timer();

  Transport transport_;
  std::string peer_;
  PeerInfo peer_info_;
  std::shared_ptr<const ExportRegistry> exports_;
  SessionOptions options_;

  // Read buffer: bytes [begin_, end_) are received and not yet decoded.
  std::unique_ptr<std::byte[]> rbuf_;
  std::size_t begin_ = 0;
  std::size_t end_ = 0;

  // Set once the handshake reaches transmission.
  protocol::Negotiated negotiated_;
  std::shared_ptr<const Export> export_;
  backends::DevicePtr device_;
  backends::Caps caps_;
  RequestLimits limits_;

  uint32_t in_flight_ = 0;
  uint64_t in_flight_bytes_ = 0;
  Signal progress_;           // a request finished, or the writer went idle
  asio::steady_timer grace_;  // after stop(): how long requests still get ESHUTDOWN
  asio::steady_timer idle_;   // --idle-timeout
  std::chrono::steady_clock::time_point last_activity_;

  std::deque<Reply> queue_;
  bool writing_ = false;
  bool broken_ = false;  // a socket write failed: drop further replies
  bool stopping_ = false;
  bool handshake_done_ = false;  // disarms the handshake deadline
  bool wrote_data_ = false;
  bool counted_ = false;  // export_->metrics counts this connection
  bool closed_ = false;   // run() has finished with the connection
  SessionStats stats_;
};

}  // namespace imagenbd::server
