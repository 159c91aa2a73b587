// The HTTP(S) leaf (see the header): the URL as given, no signing.
#include "backends/http_leaf.hpp"

#include "backends/http_status.hpp"

namespace imagenbd::backends {

asio::awaitable<DevicePtr> open_http(std::string url, HttpOptions options) {
  if (!url.starts_with("http://") && !url.starts_with("https://")) {
    fail(std::errc::invalid_argument, "http: '{}' is not an http:// or https:// URL",
         http::redact(url));
  }
  RangeTarget target;
  target.layer = "http";
  target.kind = RemoteKind::http;
  target.display = http::redact(url);
  target.url = std::move(url);
  auto opened = open_ranged(std::move(target), options.range);
  co_return co_await std::move(opened);
}

}  // namespace imagenbd::backends
