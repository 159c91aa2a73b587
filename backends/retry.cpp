// with_retries: the attempt loop. Delays are "full jitter" (uniform in [0, the exponential
// cap]), which spreads the retries of many requests that failed together; a server's
// Retry-After / x-ms-retry-after-ms is a floor; the deadline caps everything. The wait is
// a timer on the caller's executor, so only this request waits.
#include "backends/retry.hpp"

#include <algorithm>
#include <charconv>
#include <exception>
#include <optional>
#include <random>
#include <string>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/http_status.hpp"
#include "backends/log.hpp"

namespace imagenbd::backends::http {

namespace {

using std::chrono::milliseconds;

std::optional<long long> parse_number(const std::string* text) {
  if (text == nullptr) return std::nullopt;
  long long value = 0;
  const auto* end = text->data() + text->size();
  const auto [ptr, ec] = std::from_chars(text->data(), end, value);
  if (ec != std::errc() || ptr != end || value < 0) return std::nullopt;
  return value;
}

// The wait the server asked for; zero when it did not (an HTTP-date Retry-After is ignored).
milliseconds server_delay(const Response& response) {
  if (auto ms = parse_number(response.header("x-ms-retry-after-ms"))) return milliseconds(*ms);
  if (auto s = parse_number(response.header("retry-after"))) {
    return milliseconds(std::min<long long>(*s, 3600) * 1000);
  }
  return milliseconds(0);
}

milliseconds jitter(const RetryPolicy& policy, int attempt) {
  const int doublings = std::min(attempt - 1, 30);
  const auto cap = std::min<long long>(policy.max_delay.count(),
                                       policy.first_delay.count() * (1LL << doublings));
  thread_local std::mt19937_64 random{std::random_device{}()};
  std::uniform_int_distribution<long long> uniform(0, std::max<long long>(cap, 0));
  return milliseconds(uniform(random));
}

std::string_view transport_cause(std::errc code) {
  switch (code) {
    case std::errc::timed_out:
      return "timed out";
    case std::errc::connection_refused:
      return "connection refused";
    case std::errc::connection_reset:
      return "connection reset";
    case std::errc::host_unreachable:
      return "host unreachable";
    default:
      return "transport error";
  }
}

}  // namespace

asio::awaitable<Response> with_retries(const RetryPolicy& policy, std::string_view what,
                                       const std::function<asio::awaitable<Response>()>& attempt) {
  const auto deadline = std::chrono::steady_clock::now() + policy.deadline;
  asio::steady_timer timer(co_await asio::this_coro::executor);
  for (int count = 1;; ++count) {
    std::optional<Response> response;
    std::exception_ptr error;
    std::string cause;
    milliseconds floor(0);
    try {
      response = co_await attempt();
    } catch (const TransportError& e) {
      if (!e.transient()) throw;
      error = std::current_exception();
      cause = transport_cause(e.errc());
    }
    if (response) {
      const std::string* code = response->header("x-ms-error-code");
      const std::string_view service_code = code != nullptr ? *code : std::string_view();
      if (!is_transient(response->status, service_code)) co_return std::move(*response);
      cause = fmt::format("{} {}", response->status, service_code);
      while (!cause.empty() && cause.back() == ' ') cause.pop_back();
      floor = server_delay(*response);
    }
    const auto left =
        std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
    if (count >= policy.max_attempts || left <= milliseconds(0)) {
      if (error) std::rethrow_exception(error);
      co_return std::move(*response);
    }
    const milliseconds delay = std::min(std::max(jitter(policy, count), floor), left);
    log::warn("{}: {}, retrying in {:.1f} s (attempt {} of {})", what, cause,
              static_cast<double>(delay.count()) / 1000.0, count + 1, policy.max_attempts);
    timer.expires_after(delay);
    co_await timer.async_wait(asio::use_awaitable);
  }
}

}  // namespace imagenbd::backends::http
