// An HTTP/1.1 client for the blob-store leaves: libcurl's multi-socket interface driven by
// an asio io_context that runs on the client's own network thread (one curl multi handle,
// touched only from that thread), so every caller, whatever executor it runs on, shares
// one pool of keep-alive connections and any number of requests are in flight at once.
// request() resumes the awaiting coroutine on its own executor. Cf. curl's
// docs/examples/asiohiper.cpp for the wiring (without its globals).
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include "backends/error.hpp"

namespace imagenbd::backends::http {

namespace asio = boost::asio;

struct Header {
  std::string name;
  std::string value;
};

// AWS Signature Version 4 by libcurl (CURLOPT_AWS_SIGV4 + CURLOPT_USERPWD), for S3.
// libcurl 7.88 signs host, x-amz-date and every header in Request::headers verbatim; the
// caller adds x-amz-content-sha256 itself (formats.md §4.3).
struct AwsSigV4 {
  std::string provider;  // "aws:amz:REGION:s3"
  std::string user;      // the access key id
  std::string secret;    // the secret access key
};

struct Request {
  std::string method = "GET";  // GET, HEAD, PUT, DELETE
  std::string url;             // full URL, already percent-encoded
  // Sent as given (an empty value is sent as an empty header). The client sends
  // Content-Length on every PUT, POST and DELETE (0 for an empty body; never chunked) and
  // never adds Content-Type, Expect or Accept-Encoding of its own.
  std::vector<Header> headers;
  // The request body; the caller keeps it alive until request() returns.
  std::span<const std::byte> body;
  // When non-empty, a 2xx response body is written here instead of Response::body (straight
  // from curl's buffer, one copy); a 2xx body longer than into.size() fails with EIO (an
  // Error, not a TransportError). Error (non-2xx) bodies always go to Response::body, and
  // are also copied here while they fit; they never fail for their size.
  std::span<std::byte> into;
  // Whole-request timeout (connect + transfer). A stalled transfer also fails after it.
  std::chrono::milliseconds timeout{30000};
  // When set, a 2xx response with another status (a 200 with the whole object where a
  // 206 was asked for) is cut off before its first body byte and returned with its status
  // and headers, body_size 0: a server that ignores Range never sends us gigabytes.
  long expect_2xx = 0;
  // When set, the request is signed with SigV4 (S3); the Azure path never sets it.
  std::optional<AwsSigV4> aws_sigv4;
};

struct Response {
  long status = 0;
  std::vector<Header> headers;  // names lowercased, in the order received (last response only)
  std::string body;             // all of it, unless a 2xx went to Request::into
  std::size_t body_size = 0;    // bytes of body received, wherever they went
  // The first header with this (lowercase) name, or nullptr.
  const std::string* header(std::string_view lowercase_name) const;
};

// A request that got no HTTP response: connection refused or reset, timeout, DNS, TLS.
// errc: timed_out, connection_refused, connection_reset, host_unreachable, or io_error.
// transient() says whether trying again may help (everything but TLS verification and
// malformed URLs).
class TransportError : public Error {
 public:
  TransportError(std::errc code, std::string message, bool transient)
      : Error(code, std::move(message)), transient_(transient) {}
  bool transient() const noexcept { return transient_; }

 private:
  bool transient_;
};

struct ClientOptions {
  bool verify_tls = true;                            // CURLOPT_SSL_VERIFYPEER/HOST
  std::chrono::milliseconds connect_timeout{10000};  // CURLOPT_CONNECTTIMEOUT_MS
  long max_host_connections = 64;                    // CURLMOPT_MAX_HOST_CONNECTIONS
};

class Client {
 public:
  explicit Client(const ClientOptions& options = {});
  // Stops the network thread; requests still running fail with TransportError
  // (operation_canceled, not transient). Must not run on the network thread itself.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // The process-wide client, started on first use (never destroyed: its thread may still
  // be finishing a request while static destructors run).
  static Client& shared();

  // Performs one request. Throws TransportError when no response arrived; any HTTP status
  // is returned, not thrown (the caller maps it, see http_status.hpp). The awaiting
  // coroutine resumes on its own executor (posted there from the network thread), never on
  // the network thread unless it was already running there. Redirects are not followed.
  // @par Thread Safety: callable from any thread and executor, concurrently.
  asio::awaitable<Response> request(Request request);

  // The executor of the network thread, for background work that must outlive a caller's
  // io_context (lease renewal).
  asio::any_io_executor executor();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace imagenbd::backends::http
