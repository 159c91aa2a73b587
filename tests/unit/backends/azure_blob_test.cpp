// BlobClient against canned answers (HttpTestServer): what it sends (ranges, page-write
// headers, Content-MD5, lease ids, a duration on every acquire, a fresh signature per
// retry), what it refuses to trust (a 200 for a range, a wrong Content-Range, a short
// body) and how refusals read (BlobError with status, code and lease_lost()).
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "backends/azure_blob.hpp"
#include "backends/azure_credentials.hpp"
#include "tests/unit/support/azure_test_client.hpp"
#include "tests/unit/support/http_test_server.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using imagenbd::test::blob_client_for;
using imagenbd::test::HttpTestServer;
using imagenbd::test::run;

namespace {

HttpTestServer::Reply range_reply(int status, std::string content_range, std::string body) {
  HttpTestServer::Reply r;
  r.status = status;
  if (!content_range.empty()) r.headers.push_back({"Content-Range", std::move(content_range)});
  r.body = std::move(body);
  return r;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace

TEST_CASE("read sends x-ms-range and accepts exactly the 206 asked for") {
  HttpTestServer server([](const HttpTestServer::Received&) {
    return range_reply(206, "bytes 1024-1027/4096", "abcd");
  });
  auto blob = blob_client_for(server, "2026-11-21T04:55:55.2300000Z");
  std::vector<std::byte> out(4);
  run(blob.read(1024, out, 4096));
  CHECK(std::string(reinterpret_cast<const char*>(out.data()), 4) == "abcd");
  const auto requests = server.requests();
  REQUIRE(requests.size() == 1);
  CHECK(requests[0].method == "GET");
  REQUIRE(requests[0].header("x-ms-range"));
  CHECK(*requests[0].header("x-ms-range") == "bytes=1024-1027");
  CHECK(requests[0].target.find("snapshot=2026-11-21T04%3A55%3A55.2300000Z") != std::string::npos);
  REQUIRE(requests[0].header("authorization"));
  CHECK(requests[0].header("authorization")->starts_with("SharedKey devstoreaccount1:"));
}

TEST_CASE("read never trusts a 200, another range, another size or a short body") {
  HttpTestServer::Reply reply;
  HttpTestServer server([&reply](const HttpTestServer::Received&) { return reply; });
  auto blob = blob_client_for(server);
  std::vector<std::byte> out(4);
  auto read = [&] { run(blob.read(1024, out, 4096)); };

  reply = range_reply(200, "", "abcd");
  CHECK(error_of(read).find("200") != std::string::npos);
  reply = range_reply(206, "bytes 0-3/4096", "abcd");
  CHECK(error_of(read).find("not the range asked for") != std::string::npos);
  reply = range_reply(206, "bytes 1024-1027/8192", "abcd");
  CHECK(error_of(read).find("did it change size") != std::string::npos);
  reply = range_reply(206, "", "abcd");
  CHECK(error_of(read).find("no Content-Range") != std::string::npos);
  reply = range_reply(206, "bytes 1024-1027/4096", "ab");
  CHECK(error_of(read).find("short body") != std::string::npos);
  try {
    read();
    FAIL("a short body was accepted");
  } catch (const Error& e) {
    CHECK(e.errc() == std::errc::io_error);
  }
}

TEST_CASE("put_pages sends update, range, Content-MD5 and the lease id") {
  HttpTestServer server([](const HttpTestServer::Received&) {
    HttpTestServer::Reply r;
    r.status = 201;
    return r;
  });
  auto blob = blob_client_for(server);
  const std::vector<std::byte> zeroes(512);
  azure::PagePutOptions options;
  options.lease_id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
  options.content_md5 = true;
  run(blob.put_pages(4096, zeroes, options));
  const auto requests = server.requests();
  REQUIRE(requests.size() == 1);
  const auto& r = requests[0];
  CHECK(r.method == "PUT");
  CHECK(r.target.find("comp=page") != std::string::npos);
  CHECK(r.body.size() == 512);
  REQUIRE(r.header("x-ms-page-write"));
  CHECK(*r.header("x-ms-page-write") == "update");
  REQUIRE(r.header("x-ms-range"));
  CHECK(*r.header("x-ms-range") == "bytes=4096-4607");
  REQUIRE(r.header("content-md5"));
  CHECK(*r.header("content-md5") == "v2GerAzfP2jUluqTRBN+iw==");  // MD5 of 512 zero bytes
  REQUIRE(r.header("x-ms-lease-id"));
  CHECK(*r.header("x-ms-lease-id") == options.lease_id);
}

TEST_CASE("put_pages refuses what the service would (Azurite does not): nothing is sent") {
  HttpTestServer server([](const HttpTestServer::Received&) { return HttpTestServer::Reply{}; });
  auto blob = blob_client_for(server);
  const std::vector<std::byte> big((4u << 20) + 512);
  const std::vector<std::byte> odd(1000);
  const std::vector<std::byte> one(512);
  const azure::PagePutOptions options;
  CHECK(error_of([&] { run(blob.put_pages(0, big, options)); }).find("4 MiB") != std::string::npos);
  CHECK(error_of([&] { run(blob.put_pages(0, odd, options)); }).find("aligned") !=
        std::string::npos);
  CHECK(error_of([&] { run(blob.put_pages(100, one, options)); }).find("aligned") !=
        std::string::npos);
  CHECK(server.requests().empty());
}

TEST_CASE("a lease refusal is a BlobError with status, code and lease_lost()") {
  HttpTestServer server([](const HttpTestServer::Received&) {
    HttpTestServer::Reply r;
    r.status = 412;
    r.headers.push_back({"x-ms-error-code", "LeaseIdMismatchWithBlobOperation"});
    r.body =
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>LeaseIdMismatchWithBlobOperation"
        "</Code><Message>The lease ID specified did not match.</Message></Error>";
    return r;
  });
  auto blob = blob_client_for(server);
  const std::vector<std::byte> one(512);
  const azure::PagePutOptions options;
  try {
    run(blob.put_pages(0, one, options));
    FAIL("a 412 was accepted");
  } catch (const azure::BlobError& e) {
    CHECK(e.status() == 412);
    CHECK(e.service_code() == "LeaseIdMismatchWithBlobOperation");
    CHECK(e.lease_lost());
    CHECK(std::string(e.what()).find("Put Page: 412 LeaseIdMismatchWithBlobOperation: The lease "
                                     "ID specified did not match.") != std::string::npos);
  }
  CHECK(server.requests().size() == 1);  // a 412 is not retried
}

TEST_CASE("every lease acquire carries a duration and a proposed id") {
  HttpTestServer server([](const HttpTestServer::Received& r) {
    HttpTestServer::Reply reply;
    reply.status = 201;
    const std::string* id = r.header("x-ms-proposed-lease-id");
    reply.headers.push_back({"x-ms-lease-id", id ? *id : "none"});
    return reply;
  });
  auto blob = blob_client_for(server);
  const std::string proposed = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
  CHECK(run(blob.lease_acquire(15, proposed)) == proposed);
  const std::string random_id = run(blob.lease_acquire(60, std::string()));
  CHECK(random_id.size() == 36);
  CHECK(random_id != "none");
  CHECK(error_of([&] { run(blob.lease_acquire(10, proposed)); }).find("15 to 60") !=
        std::string::npos);
  const auto requests = server.requests();
  REQUIRE(requests.size() == 2);  // the bad duration was never sent
  for (const auto& r : requests) {
    REQUIRE(r.header("x-ms-lease-duration"));
    CHECK_FALSE(r.header("x-ms-lease-duration")->empty());
    CHECK(*r.header("x-ms-lease-action") == "acquire");
  }
}

TEST_CASE("a 503 is retried with a fresh signature, a snapshot is not retried") {
  int calls = 0;
  HttpTestServer server([&calls](const HttpTestServer::Received& r) {
    HttpTestServer::Reply reply;
    if (++calls % 2 == 1) {
      reply.status = 503;
      reply.headers.push_back({"x-ms-error-code", "ServerBusy"});
      return reply;
    }
    reply.status = 201;
    if (r.target.find("comp=snapshot") != std::string::npos) {
      reply.headers.push_back({"x-ms-snapshot", "2026-11-21T04:55:55.2300000Z"});
    }
    return reply;
  });
  auto blob = blob_client_for(server);
  const std::vector<std::byte> one(512);
  const azure::PagePutOptions options;
  run(blob.put_pages(0, one, options));
  auto requests = server.requests();
  REQUIRE(requests.size() == 2);
  CHECK(requests[0].header("x-ms-date"));
  CHECK(requests[1].header("authorization"));

  // The next call is answered 503 first: Snapshot Blob fails instead of trying again.
  try {
    run(blob.snapshot());
    FAIL("a 503 to Snapshot Blob was accepted");
  } catch (const azure::BlobError& e) {
    CHECK(e.status() == 503);
  }
  CHECK(server.requests().size() == 3);
}
