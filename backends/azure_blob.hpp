// The Blob service REST operations imagenbd uses, one method per operation (formats.md
// §3.5, §3.6): signing, retries of idempotent calls, status checks and error mapping
// happen here, so the page-blob leaf and the blob tools deal only in bytes and leases.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/awaitable.hpp>

#include "backends/azure_credentials.hpp"
#include "backends/azure_xml.hpp"
#include "backends/error.hpp"
#include "backends/http_client.hpp"
#include "backends/retry.hpp"

namespace imagenbd::backends::azure {

namespace asio = boost::asio;

// A request the service refused: the status, its code (x-ms-error-code or the XML
// <Code>) and the message, mapped to an errc by http::errc_for_status. The what() text
// reads "azure: az://a/c/b: Put Page: 412 LeaseIdMissing: There is currently a lease...".
class BlobError : public Error {
 public:
  BlobError(std::errc code, std::string message, long status, std::string service_code)
      : Error(code, std::move(message)), status_(status), service_code_(std::move(service_code)) {}
  long status() const noexcept { return status_; }
  const std::string& service_code() const noexcept { return service_code_; }
  // 412 LeaseIdMissing / LeaseIdMismatchWithBlobOperation / LeaseNotPresentWithBlobOperation
  // / LeaseLost: our lease is gone.
  bool lease_lost() const;

 private:
  long status_;
  std::string service_code_;
};

struct BlobProperties {
  uint64_t size = 0;
  std::string blob_type;  // "PageBlob", "BlockBlob", ...
  std::string etag;
  std::string last_modified;
  std::string lease_state;     // available, leased, expired, breaking, broken
  std::string lease_duration;  // infinite, fixed, ""
  uint64_t sequence_number = 0;
  std::string copy_status;  // x-ms-copy-status of a Copy Blob's destination: pending,
                            // success, aborted, failed; "" for a blob never copied
  std::string copy_status_description;
  // x-ms-meta-NAME headers: (NAME lowercased, value), in the order received.
  std::vector<std::pair<std::string, std::string>> metadata;
  // The value of metadata NAME (lowercase), or nullptr.
  const std::string* meta(std::string_view name) const;
};

struct PagePutOptions {
  std::string lease_id;      // sent as x-ms-lease-id when not empty
  bool content_md5 = false;  // send Content-MD5 (the service verifies it)
};

class BlobClient {
 public:
  // where.snapshot, when set, addresses that snapshot for reads (writes refuse it).
  BlobClient(BlobLocation where, Credentials credentials, http::RetryPolicy retry = {},
             http::Client& client = http::Client::shared());

  const BlobLocation& location() const { return where_; }
  http::Client& client() const { return client_; }
  const http::RetryPolicy& retry_policy() const { return retry_; }
  // The same blob with another retry policy (the lease keeper's renewals must give up
  // before the lease would expire).
  BlobClient with_retry(const http::RetryPolicy& retry) const {
    return BlobClient(where_, credentials_, retry, client_);
  }

  // Get Blob Properties (HEAD).
  asio::awaitable<BlobProperties> properties();
  // Ranged Get Blob into out: checks 206 and Content-Range (start, end, and total ==
  // expected_size when it is not 0), and the body length; any mismatch is EIO.
  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out, uint64_t expected_size = 0);
  // Put Page update: offset and data.size() multiples of 512, data.size() <= 4 MiB.
  asio::awaitable<void> put_pages(uint64_t offset, std::span<const std::byte> data,
                                  const PagePutOptions& options);
  // Put Page clear: offset and length multiples of 512.
  asio::awaitable<void> clear_pages(uint64_t offset, uint64_t length, const std::string& lease_id);
  // Get Page Ranges of [offset, offset+length) (length 0: the whole blob), following
  // NextMarker; ranges as received (use PageMap to merge and clamp).
  asio::awaitable<std::vector<PageRange>> page_ranges(uint64_t offset, uint64_t length);

  // Put Blob creating an empty page blob of `size` bytes (multiple of 512). With
  // overwrite false, an existing blob is an error (If-None-Match: *, 409 -> EEXIST).
  asio::awaitable<void> create_page_blob(uint64_t size, bool overwrite);
  // Put Block (id base64, same length for all blocks of a blob) and Put Block List.
  asio::awaitable<void> put_block(const std::string& block_id, std::span<const std::byte> data,
                                  bool content_md5);
  asio::awaitable<void> put_block_list(const std::vector<std::string>& block_ids);

  // Copy Blob into this blob from source_url (another blob's copy_source_url()), with
  // these metadata (x-ms-meta-NAME: names are C# identifiers, values plain ASCII), then
  // polls Get Blob Properties every poll_interval until the copy is no longer pending
  // (Azurite copies within an account at once; Azure may take minutes). A copy that ends
  // failed or aborted is Error(EIO) with the service's description.
  asio::awaitable<void> copy_from(
      const std::string& source_url,
      const std::vector<std::pair<std::string, std::string>>& metadata,
      std::chrono::milliseconds poll_interval = std::chrono::seconds(1));
  // The URL a Copy Blob reads this blob (or its snapshot) from: with the snapshot and the
  // SAS we sign with, if any (a Shared Key authorises a copy within its own account).
  std::string copy_source_url() const;

  // Snapshot Blob: returns the snapshot's timestamp (x-ms-snapshot). Not retried (a retry
  // after a lost answer would make a second snapshot).
  asio::awaitable<std::string> snapshot();
  // Delete Blob; with_snapshots deletes its snapshots too (x-ms-delete-snapshots: include).
  // Deletes only that snapshot when the location has one.
  asio::awaitable<void> remove(bool with_snapshots, const std::string& lease_id = {});

  // Lease Blob. duration: 15..60 seconds or -1 (infinite); never omitted (formats.md
  // §3.10). Returns the lease id.
  asio::awaitable<std::string> lease_acquire(int duration_seconds, const std::string& proposed_id);
  asio::awaitable<void> lease_renew(const std::string& lease_id);
  asio::awaitable<void> lease_release(const std::string& lease_id);
  // Returns the seconds until the lease is broken (x-ms-lease-time).
  asio::awaitable<int> lease_break(int break_period_seconds);

  // Container level (location().blob is ignored).
  // List Blobs with the prefix, following NextMarker; include_snapshots adds them.
  asio::awaitable<std::vector<BlobItem>> list(const std::string& prefix, bool include_snapshots);
  // Create Container; returns false when it already existed.
  asio::awaitable<bool> create_container();
  asio::awaitable<void> delete_container();

 private:
  // Signs (afresh for every attempt) and sends `request`, retried when `idempotent`; a
  // transport failure that outlasts the retries is rethrown naming the operation.
  asio::awaitable<http::Response> perform(std::string_view operation, const http::Request& request,
                                          bool idempotent);
  // perform(), then refuse() any status but `expected`: what most operations are.
  asio::awaitable<http::Response> perform_expecting(std::string_view operation,
                                                    const http::Request& request, int expected,
                                                    bool idempotent = true);
  // Throws the BlobError for a response with an unexpected status.
  [[noreturn]] void refuse(std::string_view operation, const http::Response& response) const;
  // location().url() with the query parameters (and snapshot= for reads of a snapshot).
  std::string blob_url(std::string_view query, bool with_snapshot) const;
  std::string container_url(std::string_view query) const;

  BlobLocation where_;
  Credentials credentials_;
  http::RetryPolicy retry_;
  http::Client& client_;
};

}  // namespace imagenbd::backends::azure
