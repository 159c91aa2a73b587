// Shared Key and SAS signatures for the Blob service (formats.md §3.3, §3.4): HMAC-SHA256
// with OpenSSL. Pure functions, checked against the test vectors in formats.md.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "backends/azure_credentials.hpp"
#include "backends/http_client.hpp"

namespace imagenbd::backends::azure {

inline constexpr std::string_view api_version = "2021-08-06";

// "Sat, 21 Nov 2026 05:00:00 GMT"
std::string rfc1123_date(std::chrono::system_clock::time_point when);

// The Shared Key string-to-sign of a request whose headers are final (x-ms-date and
// x-ms-version included). The path and query are taken from request.url as sent.
std::string string_to_sign(const http::Request& request, std::string_view account);

// base64(HMAC-SHA256(base64-decode(key), text)). Throws Error(invalid_argument) when the
// key is not base64.
std::string hmac_sha256_base64(std::string_view key_base64, std::string_view text);

// Makes a request ready to send: sets x-ms-date (from `now`, replacing an earlier one) and
// x-ms-version (unless present), then adds "Authorization: SharedKey ..." when
// credentials.key is set (it wins over a SAS), else appends credentials.sas to the URL
// (once: a URL that already has sig= is left alone, so re-signing a retry is safe).
void sign(http::Request& request, const Credentials& credentials,
          std::chrono::system_clock::time_point now);

// A service SAS for one blob (sr=b) or a container (blob ""), sv=2021-08-06: returns the
// query string ("sv=...&sr=b&sp=r&se=...&sig=...", sig URL-encoded). expiry is ISO 8601
// ("2099-01-01T00:00:00Z"). For Copy Blob sources and for tests.
std::string make_service_sas(const Credentials& credentials, std::string_view container,
                             std::string_view blob, std::string_view permissions,
                             std::string_view expiry, std::string_view snapshot = {});

// An account SAS for the Blob service (ss=b), sv=2021-08-06: "sv=...&ss=b&srt=sco&sp=...&
// se=...&sig=...". resource_types from "s", "c", "o". For tests and SAS URLs.
std::string make_account_sas(const Credentials& credentials, std::string_view permissions,
                             std::string_view resource_types, std::string_view expiry);

}  // namespace imagenbd::backends::azure
