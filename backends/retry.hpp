// Retries of transient faults, per HTTP request: exponential backoff with full jitter,
// Retry-After / x-ms-retry-after-ms honoured, a deadline over all attempts. Only the one
// request waits; other requests of the same connection go on meanwhile.
#pragma once

#include <chrono>
#include <functional>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>

#include "backends/http_client.hpp"

namespace imagenbd::backends::http {

struct RetryPolicy {
  std::chrono::milliseconds first_delay{500};  // before the second attempt (then x2 ...)
  std::chrono::milliseconds max_delay{30000};  // cap of one delay
  std::chrono::milliseconds deadline{60000};   // no new attempt starts after this
  int max_attempts = 10;                       // 1 = no retries
};

// Calls attempt() until it returns a response that is_transient() says is final, or throws
// something other than a transient TransportError, or the attempts or the deadline run
// out; then returns the last response (the caller maps its status) or rethrows the last
// error. Logs one warning line per retry naming `what` (already redacted) and the cause.
asio::awaitable<Response> with_retries(const RetryPolicy& policy, std::string_view what,
                                       const std::function<asio::awaitable<Response>()>& attempt);

}  // namespace imagenbd::backends::http
