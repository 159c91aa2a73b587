// The read-only object over ranged HTTP GETs that the http and s3 leaves share
// (formats.md §4.1, §5): HEAD for the size and the version (ETag, else Last-Modified), a
// probe GET of the first bytes at open, then every read as ranged GETs of at most
// read_split bytes, side by side. Nothing is trusted: each answer must be 206 with exactly
// the Content-Range asked for and that many body bytes; a 200 (a server that ignores
// Range) is refused before its body is downloaded. Every GET carries If-Match (or
// If-Unmodified-Since) so a replaced object fails with "changed" instead of mixing
// versions. Redirects are followed at open only (HEAD, up to max_redirects hops, the Range
// header untouched as we send it ourselves); reads go to the final URL and a redirect
// during reads is an error. Transient faults are retried with http::RetryPolicy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/awaitable.hpp>

#include "backends/block_device.hpp"
#include "backends/http_client.hpp"
#include "backends/remote_metrics.hpp"
#include "backends/retry.hpp"

namespace imagenbd::backends {

// What to fetch and how to sign it; the leaves fill it.
struct RangeTarget {
  std::string layer;                   // "http" or "s3": log prefix and name()
  RemoteKind kind = RemoteKind::http;  // which counters
  std::string url;                     // full, percent-encoded
  std::string display;                 // for logs and errors (no secrets)
  std::vector<http::Header> headers;   // sent with every request (S3: x-amz-*)
  std::optional<http::AwsSigV4> sigv4;
  std::string auth_hint;  // appended to 401/403 errors: what to check
};

struct RangeOptions {
  std::size_t parallel = 8;           // ranged GETs in flight for one read
  std::size_t read_split = 4u << 20;  // largest ranged GET
  int max_redirects = 5;              // followed at open; 0 = none
  http::RetryPolicy retry;
  http::Client* client = nullptr;  // null: http::Client::shared()
};

// Opens the object: HEAD, then a probe GET of its first bytes. Throws Error naming the
// object: not found (ENOENT), access denied (EACCES, with auth_hint), empty, Range ignored
// ("... ignores Range requests; imagenbd cannot serve it without downloading it whole").
asio::awaitable<DevicePtr> open_ranged(RangeTarget target, RangeOptions options);

// Checks a Content-Range header against the range asked for and the object's size;
// returns what is wrong, or "" (pure, for the tests).
std::string check_content_range(const std::string* header, uint64_t offset, uint64_t length,
                                uint64_t size);

// Location resolved against the URL it came from: absolute, host-absolute or relative.
std::string resolve_location(const std::string& base, const std::string& location);

}  // namespace imagenbd::backends
