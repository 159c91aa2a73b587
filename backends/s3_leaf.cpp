// The S3 leaf (see the header): URI and environment to a signed RangeTarget.
#include "backends/s3_leaf.hpp"

#include "backends/percent_encode.hpp"

#include <cstdlib>

#include <fmt/format.h>

namespace imagenbd::backends {

namespace {

// SHA-256 of an empty body: S3 requires x-amz-content-sha256 on every SigV4 request and
// libcurl 7.88 does not add it (formats.md §4.3).
constexpr const char* empty_sha256 =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

struct BucketKey {
  std::string bucket;
  std::string key;
};

BucketKey parse_uri(const std::string& uri) {
  if (!uri.starts_with("s3://")) {
    fail(std::errc::invalid_argument, "s3: '{}' is not an s3://BUCKET/KEY URI", uri);
  }
  const std::string rest = uri.substr(5);
  const auto slash = rest.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 1 == rest.size()) {
    fail(std::errc::invalid_argument, "s3: '{}': expected s3://BUCKET/KEY", uri);
  }
  return {rest.substr(0, slash), rest.substr(slash + 1)};
}

}  // namespace

S3Settings s3_settings_from_environment() {
  S3Settings s;
  if (!env("AWS_REGION").empty()) {
    s.region = env("AWS_REGION");
  } else if (!env("AWS_DEFAULT_REGION").empty()) {
    s.region = env("AWS_DEFAULT_REGION");
  }
  s.access_key = env("AWS_ACCESS_KEY_ID");
  s.secret_key = env("AWS_SECRET_ACCESS_KEY");
  s.session_token = env("AWS_SESSION_TOKEN");
  s.endpoint = env("AWS_ENDPOINT_URL_S3");
  if (s.endpoint.empty()) s.endpoint = env("AWS_ENDPOINT_URL");
  while (s.endpoint.ends_with("/")) s.endpoint.pop_back();
  return s;
}

std::string s3_object_url(const std::string& uri, const S3Settings& settings) {
  const BucketKey where = parse_uri(uri);
  // AWS's URI encoding of a key: '/' kept (libcurl 7.88 signs the path verbatim, so it must
  // be encoded already).
  const std::string key = percent_encode(where.key, "/");
  if (!settings.endpoint.empty()) {
    return fmt::format("{}/{}/{}", settings.endpoint, where.bucket, key);
  }
  // Dotted bucket names do not match the *.s3 TLS certificate: path style for them.
  if (where.bucket.find('.') != std::string::npos) {
    return fmt::format("https://s3.{}.amazonaws.com/{}/{}", settings.region, where.bucket, key);
  }
  return fmt::format("https://{}.s3.{}.amazonaws.com/{}", where.bucket, settings.region, key);
}

asio::awaitable<DevicePtr> open_s3(std::string uri, S3Options options) {
  const S3Settings s = options.settings ? *options.settings : s3_settings_from_environment();
  RangeTarget target;
  target.layer = "s3";
  target.kind = RemoteKind::s3;
  target.url = s3_object_url(uri, s);
  target.display = uri;
  if (!s.access_key.empty()) {
    if (s.secret_key.empty()) {
      fail(std::errc::invalid_argument,
           "s3: {}: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not", uri);
    }
    target.sigv4 =
        http::AwsSigV4{fmt::format("aws:amz:{}:s3", s.region), s.access_key, s.secret_key};
    target.headers.push_back({"x-amz-content-sha256", empty_sha256});
    if (!s.session_token.empty()) {
      target.headers.push_back({"x-amz-security-token", s.session_token});
    }
    target.auth_hint = fmt::format(
        "check AWS_ACCESS_KEY_ID ({}) and AWS_SECRET_ACCESS_KEY{}, and AWS_REGION ({})",
        s.access_key, s.session_token.empty() ? "" : " and AWS_SESSION_TOKEN", s.region);
  } else {
    target.auth_hint =
        "no credentials were given (anonymous access): set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY";
  }
  // A redirect from S3 means another region or endpoint; a signed request must not
  // follow it to another host.
  options.range.max_redirects = 0;
  auto opened = open_ranged(std::move(target), options.range);
  co_return co_await std::move(opened);
}

}  // namespace imagenbd::backends
