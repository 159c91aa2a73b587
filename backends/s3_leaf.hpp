// The S3 leaf: a read-only BlockDevice over one object, s3://BUCKET/KEY, read by ranged
// GETs (http_range.hpp) signed with SigV4 by libcurl (formats.md §4.2, §4.3). Settings come
// from the standard AWS environment variables; without credentials the requests go
// unsigned (public buckets). A custom endpoint (an S3-compatible store) is addressed
// path-style, AWS itself virtual-hosted (path-style for bucket names with dots). S3
// objects cannot be written in place (§4.4): writes need a copy-on-write overlay above.
#pragma once

#include <optional>
#include <string>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>

#include "backends/block_device.hpp"
#include "backends/http_range.hpp"

namespace imagenbd::backends {

struct S3Settings {
  std::string region = "us-east-1";  // AWS_REGION, else AWS_DEFAULT_REGION
  std::string access_key;            // AWS_ACCESS_KEY_ID; "" = anonymous
  std::string secret_key;            // AWS_SECRET_ACCESS_KEY
  std::string session_token;         // AWS_SESSION_TOKEN (x-amz-security-token)
  std::string endpoint;              // AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL; "" = AWS
};

S3Settings s3_settings_from_environment();

struct S3Options {
  RangeOptions range;
  std::optional<S3Settings> settings;  // null: s3_settings_from_environment()
};

// The URL of s3://BUCKET/KEY under these settings (key percent-encoded, '/' kept).
std::string s3_object_url(const std::string& uri, const S3Settings& settings);

// Opens s3://BUCKET/KEY. Throws Error naming the object: a malformed URI, not found, access
// denied (naming the variables to check), a server that ignores Range.
asio::awaitable<DevicePtr> open_s3(std::string uri, S3Options options);

}  // namespace imagenbd::backends
