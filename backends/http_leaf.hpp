// The HTTP(S) leaf: a read-only BlockDevice over one URL served by any web server that
// honours Range (nginx, a CDN, a pre-signed S3 URL). See http_range.hpp for what is
// checked; writes need a copy-on-write overlay above it.
#pragma once

#include <string>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>

#include "backends/block_device.hpp"
#include "backends/http_range.hpp"

namespace imagenbd::backends {

struct HttpOptions {
  RangeOptions range;
};

// Opens url (http:// or https://). Throws Error naming the URL (query redacted): not
// found, access denied, empty object, a server that ignores Range.
asio::awaitable<DevicePtr> open_http(std::string url, HttpOptions options);

}  // namespace imagenbd::backends
