// The shared ranged-GET object of the http and s3 leaves (see the header).
#include "backends/http_range.hpp"

#include <algorithm>
#include <cassert>
#include <charconv>
#include <functional>

#include "backends/http_status.hpp"
#include "backends/log.hpp"
#include "backends/parallel.hpp"

namespace imagenbd::backends {

namespace {

constexpr uint64_t probe_length = 512;

uint64_t parse_u64(const std::string* text, bool& ok) {
  uint64_t value = 0;
  ok = false;
  if (!text) return 0;
  auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), value);
  ok = ec == std::errc{} && end == text->data() + text->size();
  return value;
}

std::string header_or_empty(const http::Response& r, std::string_view name) {
  const std::string* v = r.header(name);
  return v ? *v : std::string();
}

// S3's <Code> in an XML error body, "" when there is none.
std::string service_code(const std::string& body) {
  const auto b = body.find("<Code>");
  const auto e = body.find("</Code>");
  if (b == std::string::npos || e == std::string::npos || e < b) return {};
  return body.substr(b + 6, e - b - 6);
}

bool is_redirect(long status) {
  return status == 301 || status == 302 || status == 303 || status == 307 || status == 308;
}

class RangedObject final : public BlockDevice {
 public:
  RangedObject(RangeTarget target, RangeOptions options)
      : target_(std::move(target)),
        options_(options),
        client_(options.client ? *options.client : http::Client::shared()) {
    caps_.writable = false;
    caps_.multi_conn = true;  // nothing to flush: every connection sees the same object
    caps_.block_min = 1;
    caps_.block_preferred = 4096;
    caps_.block_max = 32u << 20;
  }

  std::string_view name() const override { return target_.layer; }
  std::string describe() const override { return target_.display; }
  uint64_t size() const override { return size_; }
  Caps caps() const override { return caps_; }
  std::string version_tag() const override { return etag_.empty() ? last_modified_ : etag_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    assert(offset + out.size() <= size_);
    if (out.empty()) co_return;
    std::vector<Task> tasks;
    for (uint64_t o = 0; o < out.size(); o += options_.read_split) {
      const uint64_t n = std::min<uint64_t>(options_.read_split, out.size() - o);
      std::span<std::byte> piece = out.subspan(o, n);
      const uint64_t at = offset + o;
      tasks.push_back([this, at, piece]() -> asio::awaitable<void> { co_await fetch(at, piece); });
    }
    auto all = run_parallel(std::move(tasks), options_.parallel);
    co_await std::move(all);
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in, WriteFlags) override {
    refuse_write("write", offset, in.size());
    co_return;
  }
  asio::awaitable<void> flush() override { co_return; }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags) override {
    refuse_write("trim", offset, length);
    co_return;
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags) override {
    refuse_write("zero", offset, length);
    co_return;
  }
  // No allocation information over HTTP: all data.
  asio::awaitable<std::vector<Extent>> extents(uint64_t, uint64_t length) override {
    co_return std::vector<Extent>{{length, ExtentKind::data}};
  }
  // The cache above implements prefetch; a leaf has nowhere to keep the bytes.
  asio::awaitable<void> prefetch(uint64_t, uint64_t) override { co_return; }

  // HEAD (following redirects), then a probe GET of the first bytes.
  asio::awaitable<void> open() {
    http::Response head;
    for (int hops = 0;; ++hops) {
      http::Request request = base_request("HEAD");
      head = co_await perform("HEAD", request);
      if (!is_redirect(head.status)) break;
      const std::string* location = head.header("location");
      if (!location || hops >= options_.max_redirects) {
        fail(std::errc::io_error,
             "{}: {}: HEAD answered {} redirect{} ({}); serve the final URL instead", target_.layer,
             target_.display, head.status,
             options_.max_redirects == 0 ? "s are not followed for this kind of object"
                                         : fmt::format(" after {} hops", hops),
             location ? http::redact(*location) : std::string("no Location"));
      }
      target_.url = resolve_location(target_.url, *location);
      target_.display = http::redact(target_.url);
      log::info("{}: redirected to {}", target_.layer, target_.display);
    }
    if (head.status != 200) refuse("HEAD", head);
    bool ok = false;
    size_ = parse_u64(head.header("content-length"), ok);
    if (!ok) {
      fail(std::errc::io_error,
           "{}: {}: HEAD gave no Content-Length: imagenbd cannot serve an object of unknown size",
           target_.layer, target_.display);
    }
    if (size_ == 0) {
      fail(std::errc::invalid_argument, "{}: {}: the object is empty", target_.layer,
           target_.display);
    }
    const std::string accept = header_or_empty(head, "accept-ranges");
    if (accept == "none") ignores_range("HEAD says Accept-Ranges: none");
    etag_ = header_or_empty(head, "etag");
    last_modified_ = header_or_empty(head, "last-modified");
    // Accept-Ranges is advisory (formats.md §5): only a real ranged GET tells.
    std::vector<std::byte> first(std::min(probe_length, size_));
    co_await fetch(0, first);
    log::debug("{}: {}: {} bytes, version {}", target_.layer, target_.display, size_,
               version_tag().empty() ? "unknown" : version_tag());
  }

 private:
  http::Request base_request(std::string method) const {
    http::Request r;
    r.method = std::move(method);
    r.url = target_.url;
    r.headers = target_.headers;
    r.aws_sigv4 = target_.sigv4;
    return r;
  }

  [[noreturn]] void refuse_write(std::string_view what, uint64_t offset, uint64_t length) const {
    fail(std::errc::operation_not_permitted,
         "{}: {}: {} at offset {} length {} refused: {} objects are read-only", target_.layer,
         target_.display, what, offset, length, target_.layer);
  }

  [[noreturn]] void ignores_range(std::string_view why) const {
    fail(std::errc::operation_not_supported,
         "{}: {}: the server ignores Range requests; imagenbd cannot serve it without "
         "downloading it whole ({})",
         target_.layer, target_.display, why);
  }

  [[noreturn]] void refuse(std::string_view operation, const http::Response& r) const {
    const std::string code = service_code(r.body);
    if (r.status == 404) {
      fail(std::errc::no_such_file_or_directory, "{}: {}: {}: not found ({}{})", target_.layer,
           target_.display, operation, r.status, code.empty() ? "" : " " + code);
    }
    if (r.status == 401 || r.status == 403) {
      fail(std::errc::permission_denied, "{}: {}: {}: access denied ({}{}){}", target_.layer,
           target_.display, operation, r.status, code.empty() ? "" : " " + code,
           target_.auth_hint.empty() ? "" : "; " + target_.auth_hint);
    }
    if (r.status == 412) {
      fail(std::errc::io_error,
           "{}: {}: {}: the object changed since it was opened (version {} then); restart the "
           "export to serve the new version",
           target_.layer, target_.display, operation, version_tag());
    }
    fail(http::errc_for_status(r.status, code), "{}: {}: {}: {}{}", target_.layer, target_.display,
         operation, r.status, code.empty() ? "" : " " + code);
  }

  // One request with retries, each attempt counted.
  asio::awaitable<http::Response> perform(std::string_view operation,
                                          const http::Request& request) {
    const std::string what = fmt::format("{}: {}: {}", target_.layer, target_.display, operation);
    RemoteCounters& counters = remote_counters(target_.kind);
    int attempts = 0;
    const std::function<asio::awaitable<http::Response>()> attempt =
        [this, &request, &counters, &attempts]() -> asio::awaitable<http::Response> {
      const bool retry = attempts++ > 0;
      http::Request copy = request;
      auto pending = client_.request(std::move(copy));  // GCC 12: no temporaries
      try {
        http::Response response = co_await std::move(pending);
        counters.attempted(retry, 0, response.status, response.body_size);
        co_return response;
      } catch (...) {
        counters.attempted(retry, 0, 0, 0);
        throw;
      }
    };
    try {
      http::Response response = co_await http::with_retries(options_.retry, what, attempt);
      log::data("{}: {}", what, response.status);
      co_return response;
    } catch (const http::TransportError& e) {
      throw http::TransportError(e.errc(), fmt::format("{}: {}", what, http::redact(e.what())),
                                 e.transient());
    }
  }

  // One ranged GET into out, checked strictly.
  asio::awaitable<void> fetch(uint64_t offset, std::span<std::byte> out) {
    http::Request request = base_request("GET");
    request.headers.push_back(
        {"Range", fmt::format("bytes={}-{}", offset, offset + out.size() - 1)});
    // A weak ETag never matches If-Match (strong comparison): fall back to the date.
    if (!etag_.empty() && !etag_.starts_with("W/")) {
      request.headers.push_back({"If-Match", etag_});
    } else if (!last_modified_.empty()) {
      request.headers.push_back({"If-Unmodified-Since", last_modified_});
    }
    request.into = out;
    request.expect_2xx = 206;
    const std::string operation = fmt::format("GET at offset {} length {}", offset, out.size());
    const http::Response r = co_await perform(operation, request);
    if (r.status == 200) ignores_range(fmt::format("200 instead of 206 for {}", operation));
    if (is_redirect(r.status)) {
      fail(std::errc::io_error,
           "{}: {}: {}: redirected ({}) while serving; serve the final URL instead", target_.layer,
           target_.display, operation, r.status);
    }
    if (r.status != 206) refuse(operation, r);
    const std::string wrong =
        check_content_range(r.header("content-range"), offset, out.size(), size_);
    if (!wrong.empty()) {
      fail(std::errc::io_error, "{}: {}: {}: {}; refusing the data", target_.layer, target_.display,
           operation, wrong);
    }
    if (r.body_size != out.size()) {
      fail(std::errc::io_error, "{}: {}: {}: short body ({} bytes received)", target_.layer,
           target_.display, operation, r.body_size);
    }
  }

  RangeTarget target_;
  const RangeOptions options_;
  http::Client& client_;
  Caps caps_;
  uint64_t size_ = 0;
  std::string etag_;
  std::string last_modified_;
};

}  // namespace

std::string check_content_range(const std::string* header, uint64_t offset, uint64_t length,
                                uint64_t size) {
  if (!header) return "no Content-Range header";
  const std::string want = fmt::format("bytes {}-{}/{}", offset, offset + length - 1, size);
  if (*header == want) return {};
  const std::string prefix = fmt::format("bytes {}-{}/", offset, offset + length - 1);
  if (header->starts_with(prefix)) {
    return fmt::format("Content-Range '{}': the object is {} bytes, not {} (did it change?)",
                       *header, header->substr(prefix.size()), size);
  }
  return fmt::format("Content-Range '{}' is not the range asked for ('{}')", *header, want);
}

std::string resolve_location(const std::string& base, const std::string& location) {
  if (location.find("://") != std::string::npos) return location;
  const auto scheme = base.find("://");
  const auto host_end = base.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  const std::string origin = host_end == std::string::npos ? base : base.substr(0, host_end);
  if (location.starts_with("/")) return origin + location;
  // Relative to the base's directory (its query dropped).
  std::string path = host_end == std::string::npos ? "/" : base.substr(host_end);
  path = path.substr(0, path.find('?'));
  return origin + path.substr(0, path.rfind('/') + 1) + location;
}

asio::awaitable<DevicePtr> open_ranged(RangeTarget target, RangeOptions options) {
  auto object = std::make_shared<RangedObject>(std::move(target), options);
  co_await object->open();
  DevicePtr device = object;
  co_return device;
}

}  // namespace imagenbd::backends
