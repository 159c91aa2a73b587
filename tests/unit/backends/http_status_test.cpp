// HTTP status -> errno, transient statuses, and redaction of secrets from log text.
#include "backends/http_status.hpp"

#include <doctest/doctest.h>

#include <string>

namespace http = imagenbd::backends::http;

TEST_CASE("http status maps to the errno of each documented class") {
  CHECK(http::errc_for_status(400, "") == std::errc::invalid_argument);
  CHECK(http::errc_for_status(416, "InvalidRange") == std::errc::invalid_argument);
  CHECK(http::errc_for_status(401, "") == std::errc::permission_denied);
  CHECK(http::errc_for_status(403, "AuthenticationFailed") == std::errc::permission_denied);
  CHECK(http::errc_for_status(404, "BlobNotFound") == std::errc::no_such_file_or_directory);
  CHECK(http::errc_for_status(409, "LeaseAlreadyPresent") == std::errc::device_or_resource_busy);
  CHECK(http::errc_for_status(412, "LeaseLost") == std::errc::device_or_resource_busy);
  CHECK(http::errc_for_status(409, "BlobAlreadyExists") == std::errc::file_exists);
  CHECK(http::errc_for_status(413, "") == std::errc::file_too_large);
  CHECK(http::errc_for_status(507, "") == std::errc::no_space_on_device);
  CHECK(http::errc_for_status(503, "ServerBusy") == std::errc::io_error);
  CHECK(http::errc_for_status(408, "") == std::errc::io_error);
  CHECK(http::errc_for_status(418, "") == std::errc::io_error);
}

TEST_CASE("http transient statuses and service codes") {
  for (long status : {408L, 429L, 500L, 502L, 503L, 504L}) CHECK(http::is_transient(status, ""));
  for (long status : {200L, 400L, 403L, 404L, 409L, 412L, 416L, 501L}) {
    CHECK_FALSE(http::is_transient(status, ""));
  }
  CHECK(http::is_transient(403, "ServerBusy"));
  CHECK(http::is_transient(400, "OperationTimedOut"));
  CHECK(http::is_transient(400, "InternalError"));
  CHECK_FALSE(http::is_transient(409, "LeaseAlreadyPresent"));
}

TEST_CASE("redact removes the SAS signature from a URL and keeps the rest") {
  CHECK(http::redact(
            "https://a.blob.core.windows.net/c/b?sv=2021-08-06&sr=b&sig=abc%2Bdef%3D&se=x") ==
        "https://a.blob.core.windows.net/c/b?sv=2021-08-06&sr=b&sig=REDACTED&se=x");
  CHECK(http::redact("GET /c/b?sig=abc failed") == "GET /c/b?sig=REDACTED failed");
  CHECK(http::redact("url?SIG=xyz") == "url?SIG=REDACTED");
  // Only a whole parameter name: "xsig=" and "signature" in a path are not secrets.
  CHECK(http::redact("/c/xsig=1") == "/c/xsig=1");
  CHECK(http::redact("no secrets here") == "no secrets here");
  CHECK(http::redact("") == "");
}

TEST_CASE("redact removes Shared Key and Bearer Authorization values") {
  CHECK(http::redact("Authorization: SharedKey devstoreaccount1:rQdvs8C8eJz93gJZ+/=") ==
        "Authorization: SharedKey devstoreaccount1:REDACTED");
  CHECK(http::redact("sent SharedKey acct:SIG= then") == "sent SharedKey acct:REDACTED then");
  CHECK(http::redact("SharedKeyLite acct:SIG") == "SharedKeyLite acct:REDACTED");
  CHECK(http::redact("Authorization: Bearer eyJ0eXAi.eyJhdWQ.sig") ==
        "Authorization: Bearer REDACTED");
  CHECK(http::redact("the SharedKey scheme") == "the SharedKey scheme");  // no credential
}

TEST_CASE("redact removes AccountKey and SharedAccessSignature from connection strings") {
  CHECK(
      http::redact("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=Eby8vdM0"
                   "2xNOcq==;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;") ==
      "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=REDACTED;"
      "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;");
  CHECK(http::redact("BlobEndpoint=https://a.blob.core.windows.net/;SharedAccessSignature=sv=2021"
                     "&sp=r&sig=abc") ==
        "BlobEndpoint=https://a.blob.core.windows.net/;SharedAccessSignature=REDACTED");
  CHECK(http::redact("AccountKey=abc") == "AccountKey=REDACTED");
}

TEST_CASE("redact removes AWS signature, credential and token parameters") {
  CHECK(
      http::redact("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
                   "AKIA%2F20130524&X-Amz-Signature=aeee&X-Amz-Security-Token=tok&x-id=1") ==
      "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
      "&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED&x-id=1");
  CHECK(http::redact("Authorization: AWS4-HMAC-SHA256 Credential=AKIA/20130524/us-east-1/s3/"
                     "aws4_request, SignedHeaders=host;range, Signature=fe5f80f77d") ==
        "Authorization: AWS4-HMAC-SHA256 Credential=REDACTED, SignedHeaders=host;range, "
        "Signature=REDACTED");
}
