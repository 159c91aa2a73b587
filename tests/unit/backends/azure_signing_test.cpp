// Shared Key and SAS signatures against the test vectors of formats.md §3.3/§3.4 (all
// accepted by Azurite), plus the canonicalisation rules the vectors do not reach.
#include "backends/azure_signing.hpp"

#include <doctest/doctest.h>

#include <array>
#include <chrono>

#include "backends/azure_credentials.hpp"
#include "backends/error.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::backends::azure;

namespace {

const std::string date = "Sat, 21 Nov 2026 05:00:00 GMT";
const std::string blob_url = "http://127.0.0.1:10000/devstoreaccount1/vectors/disk.vhd";

http::Request vector_request(std::string method, std::string query) {
  http::Request r;
  r.method = std::move(method);
  r.url = blob_url + "?" + query;
  r.headers.push_back({"x-ms-date", date});
  r.headers.push_back({"x-ms-version", "2021-08-06"});
  return r;
}

Credentials dev() {
  Credentials c;
  c.account = std::string(dev_account);
  c.key = std::string(dev_key);
  c.blob_endpoint = "http://127.0.0.1:10000/devstoreaccount1";
  return c;
}

std::chrono::system_clock::time_point vector_time() {
  // 2026-11-21 05:00:00 UTC
  return std::chrono::sys_days{std::chrono::year{2026} / 11 / 21} + std::chrono::hours{5};
}

}  // namespace

TEST_CASE("azure signing: rfc1123_date is English GMT") {
  CHECK(rfc1123_date(vector_time()) == date);
  CHECK(rfc1123_date(std::chrono::sys_days{std::chrono::year{2000} / 1 / 2} +
                     std::chrono::seconds{3}) == "Sun, 02 Jan 2000 00:00:03 GMT");
}

TEST_CASE("azure signing: Put Page vector (string-to-sign and signature)") {
  std::array<std::byte, 512> body{};
  auto r = vector_request("PUT", "comp=page");
  r.headers.push_back({"x-ms-page-write", "update"});
  r.headers.push_back({"x-ms-range", "bytes=0-511"});
  r.body = body;
  auto s = string_to_sign(r, "devstoreaccount1");
  CHECK(
      s ==
      "PUT\n\n\n512\n\n\n\n\n\n\n\n\nx-ms-date:Sat, 21 Nov 2026 05:00:00 "
      "GMT\nx-ms-page-write:update\n"
      "x-ms-range:bytes=0-511\nx-ms-version:2021-08-06\n/devstoreaccount1/devstoreaccount1/vectors/"
      "disk.vhd\ncomp:page");
  CHECK(hmac_sha256_base64(dev_key, s) == "rQdvs8C8eJz93gJZJiidgPNoIcH4TrY3j6sW6sNR1tk=");
}

TEST_CASE("azure signing: Get Page Ranges vector") {
  auto r = vector_request("GET", "comp=pagelist");
  auto s = string_to_sign(r, "devstoreaccount1");
  CHECK(s ==
        "GET\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:Sat, 21 Nov 2026 05:00:00 "
        "GMT\nx-ms-version:2021-08-06\n"
        "/devstoreaccount1/devstoreaccount1/vectors/disk.vhd\ncomp:pagelist");
  CHECK(hmac_sha256_base64(dev_key, s) == "FBj6bWI7P4W0MGh7WrYmUdoFHjvXlR1KdNn3G/dsong=");
}

TEST_CASE("azure signing: lease acquire vector, through sign()") {
  http::Request r;
  r.method = "PUT";
  r.url = blob_url + "?comp=lease";
  // Mixed-case names: canonicalisation lowercases and sorts them.
  r.headers.push_back({"X-MS-Proposed-Lease-Id", "3f2504e0-4f89-41d3-9a0c-0305e82c3301"});
  r.headers.push_back({"x-ms-lease-duration", "-1"});
  r.headers.push_back({"x-ms-lease-action", "acquire"});
  sign(r, dev(), vector_time());
  CHECK(string_to_sign(r, "devstoreaccount1") ==
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:Sat, 21 Nov 2026 05:00:00 "
        "GMT\nx-ms-lease-action:acquire\n"
        "x-ms-lease-duration:-1\nx-ms-proposed-lease-id:3f2504e0-4f89-41d3-9a0c-0305e82c3301\n"
        "x-ms-version:2021-08-06\n/devstoreaccount1/devstoreaccount1/vectors/disk.vhd\ncomp:lease");
  const std::string* auth = nullptr;
  for (const auto& h : r.headers)
    if (h.name == "Authorization") auth = &h.value;
  REQUIRE(auth != nullptr);
  CHECK(*auth == "SharedKey devstoreaccount1:6H2UsbCU3Dv4+OaYEtm3iwAKkmlUy64WqmMCW9n3OBs=");
  CHECK(r.url == blob_url + "?comp=lease");  // no SAS appended

  SUBCASE("signing again (a retry) replaces date and signature instead of adding more") {
    sign(r, dev(), vector_time() + std::chrono::seconds{1});
    int dates = 0, auths = 0, versions = 0;
    for (const auto& h : r.headers) {
      dates += h.name == "x-ms-date";
      auths += h.name == "Authorization";
      versions += h.name == "x-ms-version";
    }
    CHECK(dates == 1);
    CHECK(auths == 1);
    CHECK(versions == 1);
  }
}

TEST_CASE("azure signing: service and account SAS vectors") {
  auto service = make_service_sas(dev(), "vectors", "disk.vhd", "r", "2099-01-01T00:00:00Z");
  CHECK(
      service ==
      "sv=2021-08-06&sr=b&sp=r&se=2099-01-01T00:00:00Z&sig=%2BaovTT7tEv5pITJPQuSvuE5xS1pObDstAcaP%"
      "2FXUAcC8%3D");
  auto account = make_account_sas(dev(), "rwdlacup", "sco", "2099-01-01T00:00:00Z");
  CHECK(account ==
        "sv=2021-08-06&ss=b&srt=sco&sp=rwdlacup&se=2099-01-01T00:00:00Z&sig="
        "Itu9D2J7K2gGkdHRoXFRyUvH8%2FrRHYecthDTOVQiBGE%3D");
}

TEST_CASE("azure signing: a SAS is appended with ? or &, and only once") {
  Credentials c;
  c.account = "acct";
  c.sas = "sv=2021-08-06&sp=r&sig=abc%3D";
  http::Request r;
  r.url = "https://acct.blob.core.windows.net/c/b";
  sign(r, c, vector_time());
  CHECK(r.url == "https://acct.blob.core.windows.net/c/b?sv=2021-08-06&sp=r&sig=abc%3D");
  sign(r, c, vector_time());
  CHECK(r.url == "https://acct.blob.core.windows.net/c/b?sv=2021-08-06&sp=r&sig=abc%3D");
  http::Request q;
  q.url = "https://acct.blob.core.windows.net/c/b?comp=pagelist";
  sign(q, c, vector_time());
  CHECK(q.url ==
        "https://acct.blob.core.windows.net/c/b?comp=pagelist&sv=2021-08-06&sp=r&sig=abc%3D");
  for (const auto& h : q.headers) CHECK(h.name != "Authorization");
}

TEST_CASE("azure signing: the canonical path is the encoded one sent, like the URL") {
  BlobLocation where;
  where.endpoint = "http://127.0.0.1:10000/devstoreaccount1";
  where.account = "devstoreaccount1";
  where.container = "vectors";
  where.blob = "dir/my disk\xC3\xBC.vhd";  // a space and 'ü'
  http::Request r;
  r.method = "HEAD";
  r.url = where.url();
  CHECK(r.url == "http://127.0.0.1:10000/devstoreaccount1/vectors/dir/my%20disk%C3%BC.vhd");
  r.headers.push_back({"x-ms-date", date});
  auto s = string_to_sign(r, "devstoreaccount1");
  CHECK(s.ends_with("\n/devstoreaccount1/devstoreaccount1/vectors/dir/my%20disk%C3%BC.vhd"));
}

TEST_CASE("azure signing: query parameters decoded, sorted, repeated ones joined") {
  http::Request r;
  r.url =
      "https://a.blob.core.windows.net/c?restype=container&comp=list&include=snapshots&Include="
      "metadata&prefix=a%2Fb%20c&marker=";
  auto s = string_to_sign(r, "a");
  CHECK(s.ends_with(
      "\n/a/c\ncomp:list\ninclude:metadata,snapshots\nmarker:\nprefix:a/b c\nrestype:container"));
}

TEST_CASE("azure signing: x-ms- header values folded, standard headers by name") {
  http::Request r;
  r.method = "PUT";
  r.url = "https://a.blob.core.windows.net/c/b";
  r.headers.push_back({"x-ms-meta-note", "  two   words\tand  more  "});
  r.headers.push_back({"content-type", "application/octet-stream"});
  r.headers.push_back({"If-Match", "\"0x8D\""});
  r.headers.push_back({"range", "bytes=0-1"});
  r.headers.push_back({"Date", "Sun, 22 Nov 2026 05:00:00 GMT"});
  r.headers.push_back({"Content-Length", "0"});
  auto s = string_to_sign(r, "a");
  CHECK(s ==
        "PUT\n\n\n\n\napplication/octet-stream\nSun, 22 Nov 2026 05:00:00 "
        "GMT\n\n\"0x8D\"\n\n\nbytes=0-1\n"
        "x-ms-meta-note:two words and more\n/a/c/b");
  SUBCASE("Date is left out once x-ms-date is there") {
    r.headers.push_back({"x-ms-date", date});
    CHECK(string_to_sign(r, "a").find("Sun, 22 Nov") == std::string::npos);
  }
}

TEST_CASE("azure signing: a key that is not base64 is refused") {
  for (std::string_view bad : {"", "abc", "ab=c", "a*bc", "====", "YWJj\n"}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(hmac_sha256_base64(bad, "x"), Error);
  }
  // Padding is not key material: "YWI=" is the two bytes "ab" (openssl dgst -hmac agrees).
  CHECK(hmac_sha256_base64("YWI=", "x") == "z9hzWZzZiQnGK2UR7a4EhBT9uF5OsE+P2C5pJw9D45c=");
}
