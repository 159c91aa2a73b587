// The S3 leaf against an in-process HTTP server standing in for an S3 endpoint: URLs
// (path style for endpoints, virtual-hosted for AWS), SigV4 headers as libcurl sends them
// (the signature itself is checked against moto in test-s3-leaf.sh), anonymous requests,
// and the errors a user needs (wrong secret names the variables to check).
#include "backends/s3_leaf.hpp"

#include <doctest/doctest.h>

#include <cstdio>
#include <string>

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

const std::string object(4096, 'x');

// An S3 stand-in: HEAD and ranged GET of one object, or 403 SignatureDoesNotMatch.
Reply s3_answer(const Received& r, bool deny) {
  if (deny) {
    return Reply{403,
                 {},
                 "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>"
                 "<Message>The request signature we calculated does not match</Message></Error>"};
  }
  if (r.method == "HEAD") return Reply{200, {{"ETag", "\"abc\""}}, object};
  const std::string* range = r.header("range");
  uint64_t start = 0, end = 0;
  if (!range || std::sscanf(range->c_str(), "bytes=%lu-%lu", &start, &end) != 2) {
    return Reply{200, {}, object};
  }
  return Reply{206,
               {{"ETag", "\"abc\""},
                {"Content-Range", fmt::format("bytes {}-{}/{}", start, end, object.size())}},
               object.substr(start, end - start + 1)};
}

backends::S3Options options_for(const HttpTestServer& server, bool credentials) {
  backends::S3Settings s;
  s.region = "eu-west-1";
  s.endpoint = server.url("");
  if (credentials) {
    s.access_key = "AKIDEXAMPLE";
    s.secret_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    s.session_token = "TOKEN123";
  }
  backends::S3Options o;
  o.settings = s;
  o.range.retry.first_delay = std::chrono::milliseconds(1);
  return o;
}

}  // namespace

TEST_CASE("s3 leaf: signed path-style requests with x-amz-content-sha256 and the token") {
  HttpTestServer server([](const Received& r) { return s3_answer(r, false); });
  const DevicePtr d =
      run(backends::open_s3("s3://bucket/dir/disk image.vhd", options_for(server, true)));
  CHECK(d->name() == "s3");
  CHECK(d->size() == object.size());
  CHECK(d->version_tag() == "\"abc\"");
  CHECK_FALSE(d->caps().writable);
  const auto requests = server.requests();
  REQUIRE(requests.size() == 2);
  for (const auto& r : requests) {
    CHECK(r.target == "/bucket/dir/disk%20image.vhd");
    REQUIRE(r.header("authorization") != nullptr);
    const std::string& auth = *r.header("authorization");
    CHECK(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"));
    CHECK(auth.find("/eu-west-1/s3/aws4_request") != std::string::npos);
    CHECK(auth.find("x-amz-content-sha256") != std::string::npos);
    CHECK(auth.find("x-amz-security-token") != std::string::npos);
    CHECK(*r.header("x-amz-content-sha256") ==
          "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    CHECK(*r.header("x-amz-security-token") == "TOKEN123");
    REQUIRE(r.header("x-amz-date") != nullptr);
  }
  // libcurl 7.88 signs every header we send: Range and If-Match too.
  const std::string& get_auth = *requests[1].header("authorization");
  CHECK(get_auth.find("range") != std::string::npos);
  CHECK(get_auth.find("if-match") != std::string::npos);
}

TEST_CASE("s3 leaf: without credentials the requests go unsigned") {
  HttpTestServer server([](const Received& r) { return s3_answer(r, false); });
  const DevicePtr d = run(backends::open_s3("s3://bucket/disk.raw", options_for(server, false)));
  CHECK(d->size() == object.size());
  for (const auto& r : server.requests()) {
    CHECK(r.header("authorization") == nullptr);
    CHECK(r.header("x-amz-content-sha256") == nullptr);
  }
}

TEST_CASE("s3 leaf: a refused signature names the variables to check") {
  HttpTestServer server([](const Received& r) { return s3_answer(r, true); });
  try {
    run(backends::open_s3("s3://bucket/disk.raw", options_for(server, true)));
    FAIL("open succeeded");
  } catch (const Error& e) {
    const std::string what = e.what();
    CHECK(e.code() == std::errc::permission_denied);
    CHECK(what.find("access denied") != std::string::npos);
    CHECK(what.find("AWS_SECRET_ACCESS_KEY") != std::string::npos);
    CHECK(what.find("wJalrXUtnFEMI") == std::string::npos);  // never the secret
  }
}

TEST_CASE("s3 leaf: URLs for AWS and for custom endpoints, and malformed URIs") {
  backends::S3Settings aws;
  aws.region = "eu-central-1";
  CHECK(backends::s3_object_url("s3://b/k/x.vhd", aws) ==
        "https://b.s3.eu-central-1.amazonaws.com/k/x.vhd");
  CHECK(backends::s3_object_url("s3://my.bucket/k", aws) ==
        "https://s3.eu-central-1.amazonaws.com/my.bucket/k");
  backends::S3Settings local;
  local.endpoint = "http://127.0.0.1:9000";
  CHECK(backends::s3_object_url("s3://b/a+b=c", local) == "http://127.0.0.1:9000/b/a%2Bb%3Dc");
  CHECK_THROWS_AS(backends::s3_object_url("s3://bucket", local), Error);
  CHECK_THROWS_AS(backends::s3_object_url("s3:///key", local), Error);
  CHECK_THROWS_AS(backends::s3_object_url("http://b/k", local), Error);
}
