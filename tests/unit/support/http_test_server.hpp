// An in-process HTTP/1.1 server for the HTTP client tests: 127.0.0.1 on a free port, its
// own io_context and thread, keep-alive, one coroutine per connection. Each request is
// answered by a handler that returns a canned Reply: status, headers, body, an optional
// delay before answering, or a connection reset instead of an answer. The requests are
// recorded (headers lowercased) for the tests to inspect. For unit tests only.
#pragma once

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <fmt/format.h>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

namespace imagenbd::test {

namespace asio = boost::asio;

class HttpTestServer {
 public:
  struct Received {
    std::string method;
    std::string target;
    std::vector<std::pair<std::string, std::string>> headers;  // names lowercased
    std::string body;
    // The first header with this lowercase name, or nullptr.
    const std::string* header(const std::string& name) const {
      for (const auto& [n, v] : headers) {
        if (n == name) return &v;
      }
      return nullptr;
    }
  };
  struct Reply {
    int status = 200;
    std::vector<std::pair<std::string, std::string>> headers;
    std::string body;
    std::chrono::milliseconds delay{0};  // wait this long before answering
    bool reset = false;                  // close the connection with an RST instead
  };
  using Handler = std::function<Reply(const Received&)>;

  explicit HttpTestServer(Handler handler)
      : handler_(std::move(handler)),
        acceptor_(context_, {asio::ip::make_address("127.0.0.1"), 0}) {
    asio::co_spawn(context_, accept_loop(), asio::detached);
    thread_ = std::thread([this] { context_.run(); });
  }
  ~HttpTestServer() {
    context_.stop();
    thread_.join();
  }
  HttpTestServer(const HttpTestServer&) = delete;
  HttpTestServer& operator=(const HttpTestServer&) = delete;

  uint16_t port() const { return acceptor_.local_endpoint().port(); }
  std::string url(const std::string& path = "/") const {
    return fmt::format("http://127.0.0.1:{}{}", port(), path);
  }
  std::vector<Received> requests() const {
    std::lock_guard lock(mutex_);
    return requests_;
  }
  int connections() const { return connections_.load(); }

 private:
  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto socket = co_await acceptor_.async_accept(asio::use_awaitable);
      ++connections_;
      asio::co_spawn(context_, session(std::move(socket)), asio::detached);
    }
  }

  static std::string lower(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    return s;
  }
  static std::string trim(const std::string& s) {
    const auto b = s.find_first_not_of(" \t");
    const auto e = s.find_last_not_of(" \t\r");
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
  }

  asio::awaitable<void> session(asio::ip::tcp::socket socket) {
    socket.set_option(asio::ip::tcp::no_delay(true));
    std::string buffer;
    for (;;) {
      const std::size_t head = co_await asio::async_read_until(socket, asio::dynamic_buffer(buffer),
                                                               "\r\n\r\n", asio::use_awaitable);
      Received r;
      std::size_t pos = 0;
      bool first = true;
      std::size_t length = 0;
      while (pos < head - 2) {
        const auto end = buffer.find("\r\n", pos);
        const std::string line = buffer.substr(pos, end - pos);
        pos = end + 2;
        if (first) {
          const auto s1 = line.find(' ');
          const auto s2 = line.find(' ', s1 + 1);
          r.method = line.substr(0, s1);
          r.target = line.substr(s1 + 1, s2 - s1 - 1);
          first = false;
          continue;
        }
        const auto colon = line.find(':');
        if (colon == std::string::npos) continue;
        r.headers.emplace_back(lower(line.substr(0, colon)), trim(line.substr(colon + 1)));
        if (r.headers.back().first == "content-length") {
          length = std::stoull(r.headers.back().second);
        }
      }
      buffer.erase(0, head);
      if (buffer.size() < length) {
        co_await asio::async_read(socket, asio::dynamic_buffer(buffer),
                                  asio::transfer_exactly(length - buffer.size()),
                                  asio::use_awaitable);
      }
      r.body = buffer.substr(0, length);
      buffer.erase(0, length);
      Reply reply;
      {
        std::lock_guard lock(mutex_);
        requests_.push_back(r);
        reply = handler_(r);
      }
      if (reply.delay.count() > 0) {
        asio::steady_timer timer(context_, reply.delay);
        co_await timer.async_wait(asio::use_awaitable);
      }
      if (reply.reset) {
        socket.set_option(asio::socket_base::linger(true, 0));  // close() sends an RST
        socket.close();
        co_return;
      }
      std::string out = fmt::format("HTTP/1.1 {} Canned\r\nContent-Length: {}\r\n", reply.status,
                                    reply.body.size());
      for (const auto& [n, v] : reply.headers) out += fmt::format("{}: {}\r\n", n, v);
      out += "\r\n";
      if (r.method != "HEAD") out += reply.body;
      co_await asio::async_write(socket, asio::buffer(out), asio::use_awaitable);
    }
  }

  Handler handler_;
  asio::io_context context_;
  asio::ip::tcp::acceptor acceptor_;
  std::thread thread_;
  mutable std::mutex mutex_;
  std::vector<Received> requests_;
  std::atomic<int> connections_{0};
};

}  // namespace imagenbd::test
