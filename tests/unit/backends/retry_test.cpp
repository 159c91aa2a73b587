// with_retries against the in-process HTTP server: transient statuses and transport errors
// retried with backoff, final statuses returned at once, server delays honoured, the
// deadline and the attempt count respected, one warning per retry.
#include "backends/retry.hpp"

#include <doctest/doctest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "tests/unit/support/http_test_server.hpp"
#include "tests/unit/support/run.hpp"

namespace asio = boost::asio;
namespace http = imagenbd::backends::http;
using imagenbd::test::HttpTestServer;
using imagenbd::test::run;
using Reply = HttpTestServer::Reply;
using Received = HttpTestServer::Received;
using std::chrono::milliseconds;

namespace {

// Collects what is written to stderr (the log) while it lives.
class StderrCapture {
 public:
  StderrCapture() : file_(std::tmpfile()), saved_(::dup(STDERR_FILENO)) {
    ::fflush(stderr);
    ::dup2(::fileno(file_), STDERR_FILENO);
  }
  ~StderrCapture() {
    restore();
    std::fclose(file_);
  }
  std::string text() {
    restore();
    std::string out;
    std::rewind(file_);
    char buffer[4096];
    while (std::size_t n = std::fread(buffer, 1, sizeof buffer, file_)) out.append(buffer, n);
    return out;
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    ::fflush(stderr);
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
    saved_ = -1;
  }
  std::FILE* file_;
  int saved_;
};

struct Outcome {
  http::Response response;
  milliseconds elapsed;
};

Outcome retried(http::Client& client, const std::string& url, const http::RetryPolicy& policy,
                int* attempts = nullptr) {
  const auto start = std::chrono::steady_clock::now();
  auto response = run([&]() -> asio::awaitable<http::Response> {
    co_return co_await http::with_retries(policy, "GET blob",
                                          [&]() -> asio::awaitable<http::Response> {
                                            if (attempts != nullptr) ++*attempts;
                                            http::Request request;
                                            request.url = url;
                                            co_return co_await client.request(request);
                                          });
  }());
  return {std::move(response),
          std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start)};
}

http::RetryPolicy fast_policy() {
  http::RetryPolicy policy;
  policy.first_delay = milliseconds(10);
  policy.max_delay = milliseconds(100);
  policy.deadline = milliseconds(5000);
  return policy;
}

}  // namespace

TEST_CASE("retry 503 twice then 200 returns the 200 after 3 attempts, with one warning each") {
  int served = 0;
  HttpTestServer server([&served](const Received&) {
    return ++served <= 2 ? Reply{503, {{"x-ms-error-code", "ServerBusy"}}, "busy"}
                         : Reply{200, {}, "data"};
  });
  http::Client client;
  int attempts = 0;
  StderrCapture log;
  const auto outcome = retried(client, server.url(), fast_policy(), &attempts);
  const std::string text = log.text();
  CHECK(outcome.response.status == 200);
  CHECK(outcome.response.body == "data");
  CHECK(attempts == 3);
  CHECK(text.find("GET blob: 503 ServerBusy, retrying in ") != std::string::npos);
  CHECK(text.find("(attempt 2 of 10)") != std::string::npos);
  CHECK(text.find("(attempt 3 of 10)") != std::string::npos);
  CHECK(text.find("(attempt 4 of 10)") == std::string::npos);
}

TEST_CASE("retry a final status (404) is returned at once") {
  HttpTestServer server([](const Received&) { return Reply{404, {}, ""}; });
  http::Client client;
  int attempts = 0;
  const auto outcome = retried(client, server.url(), fast_policy(), &attempts);
  CHECK(outcome.response.status == 404);
  CHECK(attempts == 1);
}

TEST_CASE("retry a service code ServerBusy is transient whatever the status") {
  int served = 0;
  HttpTestServer server([&served](const Received&) {
    return ++served == 1 ? Reply{403, {{"x-ms-error-code", "ServerBusy"}}, ""} : Reply{200, {}, ""};
  });
  http::Client client;
  int attempts = 0;
  StderrCapture log;
  CHECK(retried(client, server.url(), fast_policy(), &attempts).response.status == 200);
  CHECK(attempts == 2);
}

TEST_CASE("retry the deadline ends the retries and returns the last 503") {
  HttpTestServer server([](const Received&) { return Reply{503, {}, ""}; });
  http::Client client;
  http::RetryPolicy policy;
  policy.first_delay = milliseconds(50);
  policy.deadline = milliseconds(300);
  policy.max_attempts = 1000;
  int attempts = 0;
  StderrCapture log;
  const auto outcome = retried(client, server.url(), policy, &attempts);
  CHECK(outcome.response.status == 503);
  CHECK(attempts >= 2);
  CHECK(attempts < 100);
  CHECK(outcome.elapsed >= milliseconds(250));
  CHECK(outcome.elapsed < milliseconds(2000));
}

TEST_CASE("retry max_attempts ends the retries") {
  HttpTestServer server([](const Received&) { return Reply{500, {}, ""}; });
  http::Client client;
  auto policy = fast_policy();
  policy.max_attempts = 3;
  int attempts = 0;
  StderrCapture log;
  CHECK(retried(client, server.url(), policy, &attempts).response.status == 500);
  CHECK(attempts == 3);
  policy.max_attempts = 1;
  attempts = 0;
  CHECK(retried(client, server.url(), policy, &attempts).response.status == 500);
  CHECK(attempts == 1);
}

TEST_CASE("retry Retry-After and x-ms-retry-after-ms set the least delay") {
  int served = 0;
  HttpTestServer server([&served](const Received&) {
    ++served;
    if (served == 1) return Reply{503, {{"Retry-After", "1"}}, ""};
    if (served == 2) return Reply{429, {{"x-ms-retry-after-ms", "200"}}, ""};
    return Reply{200, {}, ""};
  });
  http::Client client;
  auto policy = fast_policy();
  policy.first_delay = milliseconds(1);
  StderrCapture log;
  const auto outcome = retried(client, server.url(), policy);
  CHECK(outcome.response.status == 200);
  CHECK(outcome.elapsed >= milliseconds(1200));
  CHECK(outcome.elapsed < milliseconds(3000));
  CHECK(log.text().find("retrying in 1.0 s") != std::string::npos);
}

TEST_CASE("retry a reset connection is retried, then its error rethrown when attempts run out") {
  int served = 0;
  HttpTestServer server([&served](const Received&) {
    Reply reply{200, {}, "ok"};
    reply.reset = ++served <= 2;
    return reply;
  });
  http::Client client;
  int attempts = 0;
  StderrCapture log;
  CHECK(retried(client, server.url(), fast_policy(), &attempts).response.status == 200);
  CHECK(attempts == 3);
  CHECK(log.text().find("GET blob: connection reset, retrying in") != std::string::npos);

  served = -100;  // resets from now on
  StderrCapture quiet;
  auto policy = fast_policy();
  policy.max_attempts = 2;
  attempts = 0;
  try {
    retried(client, server.url(), policy, &attempts);
    FAIL("no exception");
  } catch (const http::TransportError& e) {
    CHECK(e.errc() == std::errc::connection_reset);
  }
  CHECK(attempts == 2);
}

TEST_CASE("retry a non-transient transport error is thrown at once") {
  http::Client client;
  int attempts = 0;
  CHECK_THROWS_AS(retried(client, "ftp://127.0.0.1/", fast_policy(), &attempts),
                  http::TransportError);
  CHECK(attempts == 1);
}
