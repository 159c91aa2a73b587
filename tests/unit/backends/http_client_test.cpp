// http::Client against an in-process HTTP server: methods, headers sent and received,
// bodies into caller buffers, concurrency, and each kind of transport failure.
#include "backends/http_client.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "tests/unit/support/http_test_server.hpp"
#include "tests/unit/support/run.hpp"

namespace asio = boost::asio;
namespace http = imagenbd::backends::http;
using imagenbd::backends::Error;
using imagenbd::test::HttpTestServer;
using imagenbd::test::run;
using Reply = HttpTestServer::Reply;
using Received = HttpTestServer::Received;

namespace {

http::Response perform(http::Client& client, http::Request request) {
  return run([&client, request = std::move(request)]() mutable -> asio::awaitable<http::Response> {
    co_return co_await client.request(std::move(request));
  }());
}

std::span<const std::byte> bytes(const std::string& s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

// A port nothing listens on: bound and closed again.
uint16_t closed_port() {
  asio::io_context context;
  asio::ip::tcp::acceptor acceptor(context, {asio::ip::make_address("127.0.0.1"), 0});
  return acceptor.local_endpoint().port();
}

}  // namespace

TEST_CASE("http GET returns status, lowercased headers and the body, on the caller's thread") {
  HttpTestServer server([](const Received&) {
    return Reply{200, {{"X-MS-Request-Id", "abc"}, {"ETag", "\"0x1\""}}, "hello body"};
  });
  http::Client client;
  const auto caller = std::this_thread::get_id();
  std::thread::id resumed;
  http::Request request;
  request.url = server.url("/container/blob?comp=x");
  auto response = run([&]() -> asio::awaitable<http::Response> {
    auto r = co_await client.request(request);
    resumed = std::this_thread::get_id();
    co_return r;
  }());
  CHECK(resumed == caller);
  CHECK(response.status == 200);
  CHECK(response.body == "hello body");
  CHECK(response.body_size == 10);
  REQUIRE(response.header("x-ms-request-id") != nullptr);
  CHECK(*response.header("x-ms-request-id") == "abc");
  CHECK(*response.header("etag") == "\"0x1\"");
  CHECK(response.header("X-MS-Request-Id") == nullptr);  // lookups are by lowercase name
  const auto received = server.requests();
  REQUIRE(received.size() == 1);
  CHECK(received[0].method == "GET");
  CHECK(received[0].target == "/container/blob?comp=x");
  CHECK(received[0].header("accept-encoding") == nullptr);
  CHECK(received[0].header("content-type") == nullptr);
}

TEST_CASE("http GET into a caller buffer writes the body there and not into Response::body") {
  HttpTestServer server([](const Received&) { return Reply{206, {}, "0123456789"}; });
  http::Client client;
  std::vector<std::byte> buffer(16, std::byte{0xff});
  http::Request request;
  request.url = server.url();
  request.into = buffer;
  auto response = perform(client, request);
  CHECK(response.status == 206);
  CHECK(response.body.empty());
  CHECK(response.body_size == 10);
  CHECK(std::memcmp(buffer.data(), "0123456789", 10) == 0);
  CHECK(buffer[10] == std::byte{0xff});
}

TEST_CASE("http an error body goes to Response::body even when into was given") {
  HttpTestServer server([](const Received&) {
    return Reply{404, {{"x-ms-error-code", "BlobNotFound"}}, "<Error><Code>BlobNotFound</Code>"};
  });
  http::Client client;
  std::vector<std::byte> small(4);
  http::Request request;
  request.url = server.url();
  request.into = small;
  auto response = perform(client, request);
  CHECK(response.status == 404);
  CHECK(response.body == "<Error><Code>BlobNotFound</Code>");
  CHECK(response.body_size == 32);
  // Also copied to into when it fits, for callers that parse it from there.
  std::vector<std::byte> large(512);
  request.into = large;
  response = perform(client, request);
  CHECK(response.body == "<Error><Code>BlobNotFound</Code>");
  CHECK(std::memcmp(large.data(), "<Error><Code>BlobNotFound</Code>", 32) == 0);
}

TEST_CASE("http a body longer than into fails with EIO") {
  HttpTestServer server([](const Received&) { return Reply{200, {}, std::string(100, 'x')}; });
  http::Client client;
  std::vector<std::byte> buffer(10);
  http::Request request;
  request.url = server.url("/blob");
  request.into = buffer;
  try {
    perform(client, request);
    FAIL("no exception");
  } catch (const http::TransportError&) {
    FAIL("an overflow is not a transport error");
  } catch (const Error& e) {
    CHECK(e.errc() == std::errc::io_error);
    CHECK(std::string(e.what()).find("larger than the 10 bytes expected") != std::string::npos);
  }
}

TEST_CASE("http HEAD returns the headers and no body") {
  HttpTestServer server([](const Received&) {
    return Reply{200, {{"x-ms-blob-content-length", "1048576"}}, std::string(5, 'x')};
  });
  http::Client client;
  http::Request request;
  request.method = "HEAD";
  request.url = server.url();
  auto response = perform(client, request);
  CHECK(response.status == 200);
  CHECK(response.body.empty());
  CHECK(*response.header("x-ms-blob-content-length") == "1048576");
  CHECK(server.requests().at(0).method == "HEAD");
}

TEST_CASE("http PUT sends the body with Content-Length and without Expect or Content-Type") {
  HttpTestServer server([](const Received&) { return Reply{201, {}, ""}; });
  http::Client client;
  const std::string body(5000, 'p');
  http::Request request;
  request.method = "PUT";
  request.url = server.url("/c/b?comp=page");
  request.headers = {{"x-ms-range", "bytes=0-4999"}, {"x-ms-empty", ""}};
  request.body = bytes(body);
  auto response = perform(client, request);
  CHECK(response.status == 201);
  const auto r = server.requests().at(0);
  CHECK(r.method == "PUT");
  CHECK(r.body == body);
  REQUIRE(r.header("content-length") != nullptr);
  CHECK(*r.header("content-length") == "5000");
  CHECK(r.header("expect") == nullptr);
  CHECK(r.header("content-type") == nullptr);
  CHECK(r.header("transfer-encoding") == nullptr);
  CHECK(*r.header("x-ms-range") == "bytes=0-4999");
  REQUIRE(r.header("x-ms-empty") != nullptr);
  CHECK(r.header("x-ms-empty")->empty());
}

TEST_CASE("http PUT with no body sends Content-Length 0, a given Content-Type is kept") {
  HttpTestServer server([](const Received&) { return Reply{201, {}, ""}; });
  http::Client client;
  http::Request request;
  request.method = "PUT";
  request.url = server.url();
  request.headers = {{"Content-Type", "application/xml"}};
  CHECK(perform(client, request).status == 201);
  const auto r = server.requests().at(0);
  REQUIRE(r.header("content-length") != nullptr);
  CHECK(*r.header("content-length") == "0");
  CHECK(*r.header("content-type") == "application/xml");
}

TEST_CASE("http DELETE is sent as DELETE with Content-Length 0") {
  HttpTestServer server([](const Received&) { return Reply{202, {}, ""}; });
  http::Client client;
  http::Request request;
  request.method = "DELETE";
  request.url = server.url("/c/b");
  CHECK(perform(client, request).status == 202);
  const auto r = server.requests().at(0);
  CHECK(r.method == "DELETE");
  REQUIRE(r.header("content-length") != nullptr);
  CHECK(*r.header("content-length") == "0");
}

TEST_CASE("http consecutive requests reuse one keep-alive connection") {
  HttpTestServer server([](const Received&) { return Reply{200, {}, "ok"}; });
  http::Client client;
  run([&]() -> asio::awaitable<void> {
    for (int i = 0; i < 5; ++i) {
      http::Request request;
      request.url = server.url();
      auto r = co_await client.request(request);
      CHECK(r.status == 200);
    }
  }());
  CHECK(server.requests().size() == 5);
  CHECK(server.connections() == 1);
}

TEST_CASE("http 50 requests in flight run concurrently") {
  HttpTestServer server([](const Received& r) {
    return Reply{200, {}, r.target, std::chrono::milliseconds(100)};
  });
  http::Client client;
  asio::io_context context;
  std::atomic<int> ok{0};
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 50; ++i) {
    asio::co_spawn(
        context,
        [&client, &server, &ok, i]() -> asio::awaitable<void> {
          http::Request request;
          request.url = server.url("/" + std::to_string(i));
          auto r = co_await client.request(request);
          if (r.status == 200 && r.body == "/" + std::to_string(i)) ++ok;
        },
        [](std::exception_ptr e) { CHECK(!e); });
  }
  context.run();
  const auto elapsed = std::chrono::steady_clock::now() - start;
  CHECK(ok == 50);
  CHECK(elapsed < std::chrono::milliseconds(2500));  // serial would take 5 s
  CHECK(server.connections() > 1);
}

TEST_CASE("http a request slower than its timeout fails with a transient timed_out") {
  HttpTestServer server([](const Received&) {
    return Reply{200, {}, "late", std::chrono::milliseconds(1500)};
  });
  http::Client client;
  http::Request request;
  request.url = server.url("/slow?sig=SECRETSIG&sv=1");
  request.timeout = std::chrono::milliseconds(200);
  const auto start = std::chrono::steady_clock::now();
  try {
    perform(client, request);
    FAIL("no exception");
  } catch (const http::TransportError& e) {
    CHECK(e.errc() == std::errc::timed_out);
    CHECK(e.transient());
    const std::string what = e.what();
    CHECK(what.starts_with("http: GET http://127.0.0.1:"));
    CHECK(what.find("SECRETSIG") == std::string::npos);
    CHECK(what.find("sig=REDACTED") != std::string::npos);
  }
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::milliseconds(1000));
}

TEST_CASE("http a refused connection is a transient connection_refused") {
  http::Client client;
  http::Request request;
  request.url = fmt::format("http://127.0.0.1:{}/", closed_port());
  try {
    perform(client, request);
    FAIL("no exception");
  } catch (const http::TransportError& e) {
    CHECK(e.errc() == std::errc::connection_refused);
    CHECK(e.transient());
  }
}

TEST_CASE("http a connection reset instead of a response is transient") {
  HttpTestServer server([](const Received&) {
    Reply reply;
    reply.reset = true;
    return reply;
  });
  http::Client client;
  http::Request request;
  request.url = server.url();
  try {
    perform(client, request);
    FAIL("no exception");
  } catch (const http::TransportError& e) {
    CHECK(e.errc() == std::errc::connection_reset);
    CHECK(e.transient());
  }
}

TEST_CASE("http a malformed URL is not transient") {
  http::Client client;
  http::Request request;
  request.url = "ftp://127.0.0.1/x";
  try {
    perform(client, request);
    FAIL("no exception");
  } catch (const http::TransportError& e) {
    CHECK(e.errc() == std::errc::invalid_argument);
    CHECK_FALSE(e.transient());
  }
}

TEST_CASE("http destroying the client fails the requests still running") {
  HttpTestServer server([](const Received&) {
    return Reply{200, {}, "", std::chrono::milliseconds(3000)};
  });
  auto client = std::make_unique<http::Client>();
  asio::io_context context;
  std::exception_ptr failure;
  asio::co_spawn(
      context,
      [&]() -> asio::awaitable<void> {
        http::Request request;
        request.url = server.url();
        co_await client->request(request);
      },
      [&](std::exception_ptr e) { failure = e; });
  // Let the request reach the server, then stop the client.
  while (server.requests().empty()) {
    context.poll();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const auto start = std::chrono::steady_clock::now();
  client.reset();
  context.run();
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::milliseconds(1000));
  REQUIRE(failure);
  CHECK_THROWS_AS(std::rethrow_exception(failure), http::TransportError);
}

TEST_CASE("http the shared client is one object and serves requests") {
  HttpTestServer server([](const Received&) { return Reply{204, {}, ""}; });
  CHECK(&http::Client::shared() == &http::Client::shared());
  http::Request request;
  request.url = server.url();
  CHECK(perform(http::Client::shared(), request).status == 204);
}

TEST_CASE("http a coroutine on the client's own executor can make requests") {
  HttpTestServer server([](const Received&) { return Reply{200, {}, "renewed"}; });
  http::Client client;
  std::promise<std::string> result;
  asio::co_spawn(
      client.executor(),
      [&]() -> asio::awaitable<std::string> {
        std::string bodies;
        for (int i = 0; i < 3; ++i) {
          http::Request request;
          request.url = server.url();
          auto r = co_await client.request(request);
          bodies += r.body;
        }
        co_return bodies;
      },
      [&](std::exception_ptr e, std::string bodies) {
        if (e) {
          result.set_exception(e);
        } else {
          result.set_value(bodies);
        }
      });
  auto future = result.get_future();
  REQUIRE(future.wait_for(std::chrono::seconds(5)) == std::future_status::ready);
  CHECK(future.get() == "renewedrenewedrenewed");
}

TEST_CASE("http a 4 MiB PUT body and a 4 MiB GET into a buffer arrive intact") {
  std::string page(4 << 20, '\0');
  for (std::size_t i = 0; i < page.size(); ++i) page[i] = static_cast<char>(i * 7 + i / 4096);
  HttpTestServer server([&page](const Received& r) {
    if (r.method == "PUT") return Reply{r.body == page ? 201 : 400, {}, ""};
    return Reply{206, {}, page};
  });
  http::Client client;
  http::Request put;
  put.method = "PUT";
  put.url = server.url();
  put.body = bytes(page);
  CHECK(perform(client, put).status == 201);
  std::vector<std::byte> buffer(page.size());
  http::Request get;
  get.url = server.url();
  get.into = buffer;
  auto response = perform(client, get);
  CHECK(response.status == 206);
  CHECK(response.body_size == page.size());
  CHECK(std::memcmp(buffer.data(), page.data(), page.size()) == 0);
}
