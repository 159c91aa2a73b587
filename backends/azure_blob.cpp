// The Blob service operations (formats.md §3.5, §3.6): one request each, signed afresh
// for every attempt (a retry carries a new x-ms-date), retried when idempotent (§3.9),
// and every status that is not the expected 2xx turned into a BlobError that names the
// blob, the operation and the service's code. Reads trust nothing: a ranged Get Blob must
// answer 206 with exactly the range asked for (formats.md §5, §6).
#include "backends/azure_blob.hpp"

#include <openssl/evp.h>

#include <array>
#include <charconv>
#include <chrono>
#include <functional>
#include <random>

#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/azure_signing.hpp"
#include "backends/http_status.hpp"
#include "backends/log.hpp"
#include "backends/remote_metrics.hpp"

namespace imagenbd::backends::azure {

namespace {

constexpr uint64_t page = 512;
constexpr uint64_t max_put_page = 4u << 20;
// The service gives up on a request after this long (?timeout=); our client waits a
// little longer so that the service's answer, not our timeout, reports a slow request.
constexpr int server_timeout_seconds = 30;

// RFC 3986 percent-encoding of a query value (everything but unreserved characters).
std::string encode_query_value(std::string_view text) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::string range_header(uint64_t offset, uint64_t length) {
  return fmt::format("bytes={}-{}", offset, offset + length - 1);
}

std::string base64(std::span<const unsigned char> data) {
  std::string out(4 * ((data.size() + 2) / 3), '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), data.data(),
                                static_cast<int>(data.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

// base64 of the MD5 of data, for Content-MD5 (the service checks it: 400 Md5Mismatch).
std::string content_md5(std::span<const std::byte> data) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  if (EVP_Digest(data.data(), data.size(), digest.data(), &length, EVP_md5(), nullptr) != 1) {
    fail(std::errc::io_error, "azure: MD5 of {} bytes failed in OpenSSL", data.size());
  }
  return base64(std::span(digest.data(), length));
}

// A random (version 4) GUID: the proposed lease id when the caller has none, so that a
// retried acquire is idempotent (§3.9).
std::string random_guid() {
  std::random_device rd;
  std::array<unsigned char, 16> b{};
  for (auto& c : b) c = static_cast<unsigned char>(rd());
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);
  return fmt::format(
      "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-"
      "{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
      b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
      b[15]);
}

uint64_t parse_u64(const std::string* text) {
  uint64_t value = 0;
  if (!text) return 0;
  auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), value);
  if (ec != std::errc{} || end != text->data() + text->size()) return 0;
  return value;
}

std::string header_or_empty(const http::Response& r, std::string_view name) {
  const std::string* v = r.header(name);
  return v ? *v : std::string();
}

void add(http::Request& r, std::string name, std::string value) {
  r.headers.push_back(http::Header{std::move(name), std::move(value)});
}

// Writes address the base blob; a location with a snapshot is read-only.
void refuse_snapshot_write(const BlobLocation& where) {
  if (!where.snapshot.empty()) {
    fail(std::errc::read_only_file_system, "azure: {}: a snapshot cannot be written",
         where.display());
  }
}

// Lease Blob: a PUT to url (?comp=lease) with the action; the caller adds the action's headers.
http::Request lease_request(std::string url, std::string_view action) {
  http::Request request;
  request.method = "PUT";
  request.url = std::move(url);
  add(request, "x-ms-lease-action", std::string(action));
  return request;
}

// Checks "bytes S-E/TOTAL" against what was asked; returns what is wrong, or "".
std::string check_content_range(const std::string* header, uint64_t offset, uint64_t length,
                                uint64_t expected_size) {
  if (!header) return "no Content-Range header";
  const std::string want_prefix = fmt::format("bytes {}-{}/", offset, offset + length - 1);
  if (!header->starts_with(want_prefix)) {
    return fmt::format("Content-Range '{}' is not the range asked for ({}...)", *header,
                       want_prefix);
  }
  if (expected_size != 0) {
    const std::string total = header->substr(want_prefix.size());
    if (total != std::to_string(expected_size)) {
      return fmt::format("Content-Range '{}': the blob is {} bytes, not {} (did it change size?)",
                         *header, total, expected_size);
    }
  }
  return {};
}

}  // namespace

bool BlobError::lease_lost() const {
  return status() == 412 &&
         (service_code() == "LeaseIdMissing" ||
          service_code() == "LeaseIdMismatchWithBlobOperation" ||
          service_code() == "LeaseNotPresentWithBlobOperation" || service_code() == "LeaseLost");
}

BlobClient::BlobClient(BlobLocation where, Credentials credentials, http::RetryPolicy retry,
                       http::Client& client)
    : where_(std::move(where)),
      credentials_(std::move(credentials)),
      retry_(retry),
      client_(client) {}

std::string BlobClient::blob_url(std::string_view query, bool with_snapshot) const {
  std::string url = where_.url();
  std::string q(query);
  if (with_snapshot && !where_.snapshot.empty()) {
    q += (q.empty() ? "" : "&") + std::string("snapshot=") + encode_query_value(where_.snapshot);
  }
  q += (q.empty() ? "" : "&") + fmt::format("timeout={}", server_timeout_seconds);
  return url + "?" + q;
}

std::string BlobClient::container_url(std::string_view query) const {
  return fmt::format("{}/{}?{}&timeout={}", where_.endpoint, where_.container, query,
                     server_timeout_seconds);
}

asio::awaitable<http::Response> BlobClient::perform(std::string_view operation,
                                                    const http::Request& request, bool idempotent) {
  const std::string what = fmt::format("azure: {}: {}", where_.display(), operation);
  // Each attempt signs a copy: a retried request needs a fresh x-ms-date. Each attempt is
  // counted for the admin endpoint's imagenbd_remote_*{backend="azure"}.
  RemoteCounters& counters = remote_counters(RemoteKind::azure);
  int attempts = 0;
  const std::function<asio::awaitable<http::Response>()> attempt =
      [this, &request, &counters, &attempts]() -> asio::awaitable<http::Response> {
    http::Request signed_request = request;
    sign(signed_request, credentials_, std::chrono::system_clock::now());
    const bool retry = attempts++ > 0;
    const uint64_t sent = request.body.size();
    auto pending = client_.request(std::move(signed_request));  // GCC 12: no temporaries
    try {
      http::Response response = co_await std::move(pending);  // in a co_await expression
      counters.attempted(retry, sent, response.status, response.body_size);
      co_return response;
    } catch (...) {  // no response, or one that could not be taken (a body too long)
      counters.attempted(retry, sent, 0, 0);
      throw;
    }
  };
  http::RetryPolicy policy = retry_;
  if (!idempotent) policy.max_attempts = 1;
  try {
    http::Response response = co_await http::with_retries(policy, what, attempt);
    log::data("{}: {}", what, response.status);
    co_return response;
  } catch (const http::TransportError& e) {
    throw http::TransportError(e.errc(), fmt::format("{}: {}", what, http::redact(e.what())),
                               e.transient());
  }
}

asio::awaitable<http::Response> BlobClient::perform_expecting(std::string_view operation,
                                                              const http::Request& request,
                                                              int expected, bool idempotent) {
  http::Response response = co_await perform(operation, request, idempotent);
  if (response.status != expected) refuse(operation, response);
  co_return response;
}

void BlobClient::refuse(std::string_view operation, const http::Response& response) const {
  const ServiceError parsed = parse_error(response.body);
  std::string code = header_or_empty(response, "x-ms-error-code");
  if (code.empty()) code = parsed.code;
  std::string message = parsed.message;
  if (message.empty() && response.status == 404) message = "not found";
  if (message.empty() && response.status == 403) message = "authorization failed";
  throw BlobError(http::errc_for_status(response.status, code),
                  http::redact(fmt::format("azure: {}: {}: {} {}: {}", where_.display(), operation,
                                           response.status, code, message)),
                  response.status, code);
}

asio::awaitable<BlobProperties> BlobClient::properties() {
  http::Request request;
  request.method = "HEAD";
  request.url = blob_url("", true);
  const http::Response r = co_await perform_expecting("Get Blob Properties", request, 200);
  BlobProperties p;
  p.size = parse_u64(r.header("content-length"));
  p.blob_type = header_or_empty(r, "x-ms-blob-type");
  p.etag = header_or_empty(r, "etag");
  p.last_modified = header_or_empty(r, "last-modified");
  p.lease_state = header_or_empty(r, "x-ms-lease-state");
  p.lease_duration = header_or_empty(r, "x-ms-lease-duration");
  p.sequence_number = parse_u64(r.header("x-ms-blob-sequence-number"));
  p.copy_status = header_or_empty(r, "x-ms-copy-status");
  p.copy_status_description = header_or_empty(r, "x-ms-copy-status-description");
  for (const http::Header& h : r.headers) {
    if (h.name.starts_with("x-ms-meta-")) p.metadata.emplace_back(h.name.substr(10), h.value);
  }
  co_return p;
}

const std::string* BlobProperties::meta(std::string_view name) const {
  for (const auto& [key, value] : metadata) {
    if (key == name) return &value;
  }
  return nullptr;
}

std::string BlobClient::copy_source_url() const {
  std::string url = where_.url();
  std::string query;
  if (!where_.snapshot.empty()) query = "snapshot=" + encode_query_value(where_.snapshot);
  if (!credentials_.sas.empty()) query += (query.empty() ? "" : "&") + credentials_.sas;
  return query.empty() ? url : url + "?" + query;
}

asio::awaitable<void> BlobClient::copy_from(
    const std::string& source_url, const std::vector<std::pair<std::string, std::string>>& metadata,
    std::chrono::milliseconds poll_interval) {
  refuse_snapshot_write(where_);
  http::Request request;
  request.method = "PUT";
  request.url = blob_url("", false);
  add(request, "x-ms-copy-source", source_url);
  for (const auto& [name, value] : metadata) add(request, "x-ms-meta-" + name, value);
  // Idempotent: a repeated copy of the same source gives the same blob.
  const http::Response r = co_await perform_expecting("Copy Blob", request, 202);
  std::string status = header_or_empty(r, "x-ms-copy-status");
  std::string description;
  asio::steady_timer timer(co_await asio::this_coro::executor);
  while (status == "pending") {
    timer.expires_after(poll_interval);
    co_await timer.async_wait(asio::use_awaitable);
    const BlobProperties p = co_await properties();
    status = p.copy_status;
    description = p.copy_status_description;
  }
  if (status != "success") {
    fail(std::errc::io_error, "azure: {}: Copy Blob: the copy ended {} ({})", where_.display(),
         status.empty() ? "without a status" : status, description);
  }
}

asio::awaitable<void> BlobClient::read(uint64_t offset, std::span<std::byte> out,
                                       uint64_t expected_size) {
  if (out.empty()) co_return;
  http::Request request;
  request.url = blob_url("", true);
  add(request, "x-ms-range", range_header(offset, out.size()));
  request.into = out;
  const http::Response r = co_await perform("Get Blob", request, true);
  if (r.status != 206) {
    if (r.status == 200) {
      fail(std::errc::io_error,
           "azure: {}: Get Blob at offset {} length {}: the service answered 200 (the whole "
           "blob) instead of 206 for a range; refusing the data",
           where_.display(), offset, out.size());
    }
    refuse("Get Blob", r);
  }
  const std::string wrong =
      check_content_range(r.header("content-range"), offset, out.size(), expected_size);
  if (!wrong.empty()) {
    fail(std::errc::io_error, "azure: {}: Get Blob at offset {} length {}: {}", where_.display(),
         offset, out.size(), wrong);
  }
  if (r.body_size != out.size()) {
    fail(std::errc::io_error,
         "azure: {}: Get Blob at offset {} length {}: short body ({} bytes received)",
         where_.display(), offset, out.size(), r.body_size);
  }
}

asio::awaitable<void> BlobClient::put_pages(uint64_t offset, std::span<const std::byte> data,
                                            const PagePutOptions& options) {
  // The service enforces these (416/413), Azurite does not (formats.md §3.10): we do.
  if (offset % page != 0 || data.size() % page != 0 || data.empty() || data.size() > max_put_page) {
    fail(std::errc::invalid_argument,
         "azure: {}: Put Page at offset {} length {}: pages must be 512-byte aligned and at "
         "most 4 MiB",
         where_.display(), offset, data.size());
  }
  refuse_snapshot_write(where_);
  http::Request request;
  request.method = "PUT";
  request.url = blob_url("comp=page", false);
  add(request, "x-ms-page-write", "update");
  add(request, "x-ms-range", range_header(offset, data.size()));
  if (options.content_md5) add(request, "Content-MD5", content_md5(data));
  if (!options.lease_id.empty()) add(request, "x-ms-lease-id", options.lease_id);
  request.body = data;
  co_await perform_expecting("Put Page", request, 201);
}

asio::awaitable<void> BlobClient::clear_pages(uint64_t offset, uint64_t length,
                                              const std::string& lease_id) {
  if (offset % page != 0 || length % page != 0 || length == 0) {
    fail(std::errc::invalid_argument,
         "azure: {}: Clear Page at offset {} length {}: pages must be 512-byte aligned",
         where_.display(), offset, length);
  }
  refuse_snapshot_write(where_);
  http::Request request;
  request.method = "PUT";
  request.url = blob_url("comp=page", false);
  add(request, "x-ms-page-write", "clear");
  add(request, "x-ms-range", range_header(offset, length));
  if (!lease_id.empty()) add(request, "x-ms-lease-id", lease_id);
  co_await perform_expecting("Clear Page", request, 201);
}

asio::awaitable<std::vector<PageRange>> BlobClient::page_ranges(uint64_t offset, uint64_t length) {
  std::vector<PageRange> all;
  std::string marker;
  do {
    http::Request request;
    std::string query = "comp=pagelist";
    if (!marker.empty()) query += "&marker=" + encode_query_value(marker);
    request.url = blob_url(query, true);
    if (length != 0) add(request, "x-ms-range", range_header(offset, length));
    const http::Response r = co_await perform_expecting("Get Page Ranges", request, 200);
    PageList list = parse_page_list(r.body);
    all.insert(all.end(), list.ranges.begin(), list.ranges.end());
    marker = std::move(list.next_marker);
  } while (!marker.empty());
  co_return all;
}

asio::awaitable<void> BlobClient::create_page_blob(uint64_t size, bool overwrite) {
  if (size % page != 0) {
    fail(std::errc::invalid_argument,
         "azure: {}: a page blob's size must be a multiple of 512 bytes, not {}", where_.display(),
         size);
  }
  http::Request request;
  request.method = "PUT";
  request.url = blob_url("", false);
  add(request, "x-ms-blob-type", "PageBlob");
  add(request, "x-ms-blob-content-length", std::to_string(size));
  if (!overwrite) add(request, "If-None-Match", "*");
  const http::Response r = co_await perform("Put Blob", request, true);
  if (r.status == 409 && header_or_empty(r, "x-ms-error-code") == "BlobAlreadyExists") {
    throw BlobError(std::errc::file_exists,
                    fmt::format("azure: {}: the blob already exists (--overwrite replaces it)",
                                where_.display()),
                    r.status, "BlobAlreadyExists");
  }
  if (r.status != 201) refuse("Put Blob", r);
}

asio::awaitable<void> BlobClient::put_block(const std::string& block_id,
                                            std::span<const std::byte> data, bool md5) {
  http::Request request;
  request.method = "PUT";
  request.url = blob_url("comp=block&blockid=" + encode_query_value(block_id), false);
  if (md5) add(request, "Content-MD5", content_md5(data));
  request.body = data;
  co_await perform_expecting("Put Block", request, 201);
}

asio::awaitable<void> BlobClient::put_block_list(const std::vector<std::string>& block_ids) {
  // Block ids are base64: nothing in them needs XML escaping.
  std::string xml = R"(<?xml version="1.0" encoding="utf-8"?><BlockList>)";
  for (const auto& id : block_ids) xml += "<Latest>" + id + "</Latest>";
  xml += "</BlockList>";
  http::Request request;
  request.method = "PUT";
  request.url = blob_url("comp=blocklist", false);
  request.body = std::as_bytes(std::span(xml.data(), xml.size()));
  co_await perform_expecting("Put Block List", request, 201);
}

asio::awaitable<std::string> BlobClient::snapshot() {
  if (!where_.snapshot.empty()) {
    fail(std::errc::invalid_argument,
         "azure: {}: is a snapshot already; snapshot the base blob instead", where_.display());
  }
  http::Request request;
  request.method = "PUT";
  request.url = blob_url("comp=snapshot", false);
  // Not idempotent: a retry after a lost answer would leave a second snapshot behind.
  const http::Response r = co_await perform_expecting("Snapshot Blob", request, 201, false);
  std::string timestamp = header_or_empty(r, "x-ms-snapshot");
  if (timestamp.empty()) {
    fail(std::errc::io_error, "azure: {}: Snapshot Blob: no x-ms-snapshot in the answer",
         where_.display());
  }
  co_return timestamp;
}

asio::awaitable<void> BlobClient::remove(bool with_snapshots, const std::string& lease_id) {
  http::Request request;
  request.method = "DELETE";
  request.url = blob_url("", true);
  if (with_snapshots && where_.snapshot.empty()) add(request, "x-ms-delete-snapshots", "include");
  if (!lease_id.empty()) add(request, "x-ms-lease-id", lease_id);
  co_await perform_expecting("Delete Blob", request, 202);
}

asio::awaitable<std::string> BlobClient::lease_acquire(int duration_seconds,
                                                       const std::string& proposed_id) {
  if (duration_seconds != -1 && (duration_seconds < 15 || duration_seconds > 60)) {
    // Never send an acquire without a valid duration (formats.md §3.10).
    fail(std::errc::invalid_argument,
         "azure: {}: lease duration {} s: it must be 15 to 60 seconds, or infinite",
         where_.display(), duration_seconds);
  }
  http::Request request = lease_request(blob_url("comp=lease", false), "acquire");
  add(request, "x-ms-lease-duration", std::to_string(duration_seconds));
  add(request, "x-ms-proposed-lease-id", proposed_id.empty() ? random_guid() : proposed_id);
  const http::Response r = co_await perform_expecting("Lease Blob (acquire)", request, 201);
  std::string id = header_or_empty(r, "x-ms-lease-id");
  if (id.empty()) {
    fail(std::errc::io_error, "azure: {}: Lease Blob (acquire): no x-ms-lease-id in the answer",
         where_.display());
  }
  co_return id;
}

asio::awaitable<void> BlobClient::lease_renew(const std::string& lease_id) {
  http::Request request = lease_request(blob_url("comp=lease", false), "renew");
  add(request, "x-ms-lease-id", lease_id);
  co_await perform_expecting("Lease Blob (renew)", request, 200);
}

asio::awaitable<void> BlobClient::lease_release(const std::string& lease_id) {
  http::Request request = lease_request(blob_url("comp=lease", false), "release");
  add(request, "x-ms-lease-id", lease_id);
  co_await perform_expecting("Lease Blob (release)", request, 200);
}

asio::awaitable<int> BlobClient::lease_break(int break_period_seconds) {
  if (break_period_seconds < 0 || break_period_seconds > 60) {
    fail(std::errc::invalid_argument, "azure: {}: break period {} s: it must be 0 to 60 seconds",
         where_.display(), break_period_seconds);
  }
  http::Request request = lease_request(blob_url("comp=lease", false), "break");
  add(request, "x-ms-lease-break-period", std::to_string(break_period_seconds));
  const http::Response r = co_await perform_expecting("Lease Blob (break)", request, 202);
  co_return static_cast<int>(parse_u64(r.header("x-ms-lease-time")));
}

asio::awaitable<std::vector<BlobItem>> BlobClient::list(const std::string& prefix,
                                                        bool include_snapshots) {
  std::vector<BlobItem> all;
  std::string marker;
  do {
    std::string query = "restype=container&comp=list";
    if (!prefix.empty()) query += "&prefix=" + encode_query_value(prefix);
    if (include_snapshots) query += "&include=snapshots";
    if (!marker.empty()) query += "&marker=" + encode_query_value(marker);
    http::Request request;
    request.url = container_url(query);
    const http::Response r = co_await perform_expecting("List Blobs", request, 200);
    BlobList list = parse_blob_list(r.body);
    for (auto& item : list.blobs) all.push_back(std::move(item));
    marker = std::move(list.next_marker);
  } while (!marker.empty());
  co_return all;
}

asio::awaitable<bool> BlobClient::create_container() {
  http::Request request;
  request.method = "PUT";
  request.url = container_url("restype=container");
  const http::Response r = co_await perform("Create Container", request, true);
  if (r.status == 409 && header_or_empty(r, "x-ms-error-code") == "ContainerAlreadyExists") {
    co_return false;
  }
  if (r.status != 201) refuse("Create Container", r);
  co_return true;
}

asio::awaitable<void> BlobClient::delete_container() {
  http::Request request;
  request.method = "DELETE";
  request.url = container_url("restype=container");
  co_await perform_expecting("Delete Container", request, 202);
}

}  // namespace imagenbd::backends::azure
