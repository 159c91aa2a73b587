// The http leaf and the shared ranged-GET object against an in-process HTTP server that
// serves one object: size and version from HEAD, strict 206 checks (a server that ignores
// Range, a wrong Content-Range, a short body), If-Match on every GET and 412 as "changed",
// reads split into parallel ranges, 503s retried, redirects followed at open, read-only.
#include "backends/http_range.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backends/http_leaf.hpp"
#include "tests/unit/support/http_test_server.hpp"
#include "tests/unit/support/run.hpp"

namespace asio = boost::asio;
namespace backends = imagenbd::backends;
using backends::DevicePtr;
using backends::Error;
using imagenbd::test::HttpTestServer;
using imagenbd::test::run;
using Reply = HttpTestServer::Reply;
using Received = HttpTestServer::Received;

namespace {

// How the fake server misbehaves.
struct Behaviour {
  bool ignore_range = false;        // answer every GET with 200 and the whole object
  bool wrong_range = false;         // answer with the range shifted by one byte
  bool short_body = false;          // one byte fewer than the range
  bool accept_ranges_none = false;  // HEAD says Accept-Ranges: none
  bool no_etag = false;             // only Last-Modified
  std::atomic<int> fail_503{0};     // this many GETs answered 503 first
};

// One object with an ETag; serves ranges and honours If-Match the way nginx and S3 do.
struct ObjectServer {
  std::string data;
  std::string etag = "\"v1\"";
  Behaviour how;
  HttpTestServer server;

  explicit ObjectServer(std::size_t size)
      : data(make_data(size)), server([this](const Received& r) { return answer(r); }) {}

  static std::string make_data(std::size_t size) {
    std::string d(size, '\0');
    for (std::size_t i = 0; i < size; ++i) d[i] = static_cast<char>((i * 7 + i / 251) & 0xff);
    return d;
  }

  Reply answer(const Received& r) {
    std::vector<std::pair<std::string, std::string>> h;
    if (how.no_etag) {
      h.emplace_back("Last-Modified", "Sat, 21 Nov 2026 10:00:00 GMT");
    } else {
      h.emplace_back("ETag", etag);
    }
    if (r.method == "HEAD") {
      h.emplace_back("Accept-Ranges", how.accept_ranges_none ? "none" : "bytes");
      return Reply{200, h, data};  // the test server sends no body for HEAD
    }
    if (how.fail_503 > 0) {
      --how.fail_503;
      return Reply{503, {}, "busy"};
    }
    if (const std::string* m = r.header("if-match"); m && *m != etag) {
      return Reply{412, {}, "<Error><Code>PreconditionFailed</Code></Error>"};
    }
    const std::string* range = r.header("range");
    if (!range || how.ignore_range) return Reply{200, h, data};
    uint64_t start = 0, end = 0;
    // (no doctest assertions here: this runs on the server's thread)
    if (std::sscanf(range->c_str(), "bytes=%lu-%lu", &start, &end) != 2) return Reply{400};
    if (how.wrong_range) ++start, ++end;
    std::string body = data.substr(start, end - start + 1);
    if (how.short_body) body.pop_back();
    h.emplace_back("Content-Range", fmt::format("bytes {}-{}/{}", start, end, data.size()));
    return Reply{206, h, body};
  }

  std::vector<Received> gets() const {
    std::vector<Received> out;
    for (const auto& r : server.requests()) {
      if (r.method == "GET") out.push_back(r);
    }
    return out;
  }
};

backends::HttpOptions fast_options() {
  backends::HttpOptions o;
  o.range.retry.first_delay = std::chrono::milliseconds(1);
  o.range.retry.max_delay = std::chrono::milliseconds(2);
  return o;
}

DevicePtr open(const std::string& url, backends::HttpOptions options = fast_options()) {
  return run(backends::open_http(url, options));
}

std::string read(const DevicePtr& d, uint64_t offset, std::size_t length) {
  std::string out(length, '\0');
  run([&]() -> asio::awaitable<void> {
    co_await d->read(offset, std::as_writable_bytes(std::span(out.data(), out.size())));
  }());
  return out;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("http leaf: size and version tag from HEAD, then a probe GET, read-only caps") {
  ObjectServer s(100000);
  const DevicePtr d = open(s.server.url("/disk.img"));
  CHECK(d->name() == "http");
  CHECK(d->size() == 100000);
  CHECK(d->version_tag() == "\"v1\"");
  CHECK_FALSE(d->caps().writable);
  const auto requests = s.server.requests();
  REQUIRE(requests.size() == 2);
  CHECK(requests[0].method == "HEAD");
  CHECK(requests[1].method == "GET");
  CHECK(*requests[1].header("range") == "bytes=0-511");
  CHECK(*requests[1].header("if-match") == "\"v1\"");
}

TEST_CASE("http leaf: reads return the object's bytes, every GET ranged and conditional") {
  ObjectServer s(100000);
  const DevicePtr d = open(s.server.url("/disk.img"));
  CHECK(read(d, 0, 100000) == s.data);
  CHECK(read(d, 12345, 777) == s.data.substr(12345, 777));
  CHECK(read(d, 99999, 1) == s.data.substr(99999, 1));
  for (const auto& g : s.gets()) {
    REQUIRE(g.header("range") != nullptr);
    CHECK(*g.header("if-match") == "\"v1\"");
  }
}

TEST_CASE("http leaf: a large read is split into ranged GETs of at most read_split bytes") {
  ObjectServer s(1 << 20);
  auto options = fast_options();
  options.range.read_split = 64 << 10;
  options.range.parallel = 4;
  const DevicePtr d = open(s.server.url("/disk.img"), options);
  const std::size_t before = s.gets().size();
  CHECK(read(d, 1000, 300000) == s.data.substr(1000, 300000));
  const auto gets = s.gets();
  CHECK(gets.size() - before == 5);  // ceil(300000 / 65536)
  std::vector<std::string> ranges;
  for (std::size_t i = before; i < gets.size(); ++i) ranges.push_back(*gets[i].header("range"));
  std::sort(ranges.begin(), ranges.end());
  CHECK(ranges.front() == "bytes=1000-66535");
  CHECK(std::find(ranges.begin(), ranges.end(), "bytes=263144-300999") != ranges.end());
}

TEST_CASE("http leaf: a server that ignores Range is refused at open, before the body") {
  ObjectServer s(3 << 20);
  s.how.ignore_range = true;
  const std::string e = error_of([&] { open(s.server.url("/disk.img")); });
  CHECK(e.find("ignores Range requests; imagenbd cannot serve it without downloading it whole") !=
        std::string::npos);
  CHECK(e.find("200 instead of 206") != std::string::npos);
}

TEST_CASE("http leaf: Accept-Ranges none is refused at open") {
  ObjectServer s(4096);
  s.how.accept_ranges_none = true;
  const std::string e = error_of([&] { open(s.server.url("/disk.img")); });
  CHECK(e.find("ignores Range requests") != std::string::npos);
  CHECK(s.gets().empty());
}

TEST_CASE("http leaf: a server that stops honouring Range later fails the read") {
  ObjectServer s(100000);
  const DevicePtr d = open(s.server.url("/disk.img"));
  s.how.ignore_range = true;
  const std::string e = error_of([&] { read(d, 4096, 4096); });
  CHECK(e.find("ignores Range requests") != std::string::npos);
}

TEST_CASE("http leaf: a wrong Content-Range or a short body is an I/O error") {
  ObjectServer s(100000);
  const DevicePtr d = open(s.server.url("/disk.img"));
  s.how.wrong_range = true;
  CHECK(error_of([&] { read(d, 4096, 4096); }).find("is not the range asked for") !=
        std::string::npos);
  s.how.wrong_range = false;
  s.how.short_body = true;
  CHECK(error_of([&] { read(d, 4096, 4096); }).find("short body") != std::string::npos);
}

TEST_CASE("http leaf: a replaced object fails reads with 'changed', never mixed data") {
  ObjectServer s(100000);
  const DevicePtr d = open(s.server.url("/disk.img"));
  s.etag = "\"v2\"";
  s.data[5000] = static_cast<char>(s.data[5000] ^ 0xff);
  const std::string e = error_of([&] { read(d, 4096, 4096); });
  CHECK(e.find("the object changed since it was opened") != std::string::npos);
}

TEST_CASE("http leaf: without an ETag, Last-Modified is the version and If-Unmodified-Since") {
  ObjectServer s(8192);
  s.how.no_etag = true;
  const DevicePtr d = open(s.server.url("/disk.img"));
  CHECK(d->version_tag() == "Sat, 21 Nov 2026 10:00:00 GMT");
  CHECK(read(d, 0, 8192) == s.data);
  const auto g = s.gets().back();
  CHECK(g.header("if-match") == nullptr);
  CHECK(*g.header("if-unmodified-since") == "Sat, 21 Nov 2026 10:00:00 GMT");
}

TEST_CASE("http leaf: 503s are retried and the read succeeds") {
  ObjectServer s(100000);
  const DevicePtr d = open(s.server.url("/disk.img"));
  s.how.fail_503 = 3;
  CHECK(read(d, 50000, 1000) == s.data.substr(50000, 1000));
  CHECK(s.how.fail_503 == 0);
}

TEST_CASE("http leaf: not found and access denied are named") {
  HttpTestServer server([](const Received& r) {
    return Reply{r.target.starts_with("/secret") ? 403 : 404, {}, ""};
  });
  const std::string missing = error_of([&] { open(server.url("/nothing")); });
  CHECK(missing.find("not found") != std::string::npos);
  const std::string denied = error_of([&] { open(server.url("/secret?sig=TOPSECRET")); });
  CHECK(denied.find("access denied") != std::string::npos);
  CHECK(denied.find("TOPSECRET") == std::string::npos);
}

TEST_CASE("http leaf: writes, trims and zeroes are refused with EPERM") {
  ObjectServer s(8192);
  const DevicePtr d = open(s.server.url("/disk.img"));
  std::vector<std::byte> buffer(512);
  try {
    run([&]() -> asio::awaitable<void> { co_await d->write(0, buffer, {}); }());
    FAIL("write succeeded");
  } catch (const Error& e) {
    CHECK(e.code() == std::errc::operation_not_permitted);
    CHECK(std::string(e.what()).find("read-only") != std::string::npos);
  }
  CHECK_THROWS_AS(run([&]() -> asio::awaitable<void> { co_await d->trim(0, 512, {}); }()), Error);
  CHECK_THROWS_AS(run([&]() -> asio::awaitable<void> { co_await d->zero(0, 512, {}); }()), Error);
  const auto extents = run(d->extents(0, 8192));
  REQUIRE(extents.size() == 1);
  CHECK(extents[0].length == 8192);
  CHECK(extents[0].kind == backends::ExtentKind::data);
}

TEST_CASE("http leaf: a redirect at open is followed and reads go to the final URL") {
  ObjectServer s(8192);
  HttpTestServer front([&s](const Received&) {
    return Reply{302, {{"Location", s.server.url("/real/disk.img")}}, ""};
  });
  const DevicePtr d = open(front.url("/disk.img"));
  CHECK(d->size() == 8192);
  CHECK(read(d, 0, 8192) == s.data);
  CHECK(front.requests().size() == 1);
  CHECK(s.gets().back().target == "/real/disk.img");
}

TEST_CASE("http leaf: redirects stop after max_redirects") {
  HttpTestServer loop([](const Received&) { return Reply{301, {{"Location", "/again"}}, ""}; });
  const std::string e = error_of([&] { open(loop.url("/disk.img")); });
  CHECK(e.find("after 5 hops") != std::string::npos);
  CHECK(loop.requests().size() == 6);
}

TEST_CASE("check_content_range and resolve_location") {
  const std::string ok = "bytes 10-19/100";
  CHECK(backends::check_content_range(&ok, 10, 10, 100).empty());
  CHECK(backends::check_content_range(nullptr, 10, 10, 100) == "no Content-Range header");
  CHECK(backends::check_content_range(&ok, 10, 10, 200).find("did it change") != std::string::npos);
  CHECK(backends::check_content_range(&ok, 11, 10, 100).find("not the range") != std::string::npos);
  CHECK(backends::resolve_location("http://h:1/a/b?x=1", "c") == "http://h:1/a/c");
  CHECK(backends::resolve_location("http://h:1/a/b", "/d") == "http://h:1/d");
  CHECK(backends::resolve_location("http://h:1/a/b", "https://o/e") == "https://o/e");
}
