// The Azure page blob leaf: a BlockDevice over one page blob (or one of its snapshots).
// Reads by ranged Get Blob (large ones split into parallel ranges, holes known from Get
// Page Ranges skipped), writes by Put Page (<= 4 MiB, 512-aligned; unaligned edges by
// read-modify-write under a lock), trim/zero by Clear Page, extents from Get Page Ranges.
// Every acknowledged Put Page is durable, so flush() has nothing left to do.
//
// A writable device holds a blob lease (the hpcpack single-writer model): acquired at
// open (a lease held by someone else is an error, unless `force` breaks it), renewed in
// the background, sent with every write, released by close(). Once the lease is lost,
// every write fails with EIO and the log says why; it is never silently re-taken.
#pragma once

#include <optional>
#include <string>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>

#include "backends/azure_credentials.hpp"
#include "backends/block_device.hpp"
#include "backends/retry.hpp"

namespace imagenbd::backends {

struct AzurePageBlobOptions {
  bool read_only = false;
  // Serve a snapshot read-only: "" = the live blob, "new" = take a snapshot now and serve
  // it, else the timestamp of an existing snapshot. (A ?snapshot= in the URI works too.)
  std::string snapshot;
  bool force = false;                 // break a lease held by someone else, then take it
  int lease_duration = 60;            // seconds, 15..60; renewed every duration/3
  std::string lease_id;               // proposed lease id; "" = a random one
  std::size_t parallel = 8;           // ranges in flight for one large read or write
  std::size_t read_split = 8u << 20;  // reads larger than this are split into ranges
  http::RetryPolicy retry;
  // Where to sign from: null = the environment (credentials_from_environment); a config
  // file's `credentials = "env:VAR" | "file:PATH"` fills it.
  std::optional<azure::Credentials> credentials;
};

// Opens the blob at uri (see azure_credentials.hpp for the forms; credentials from the
// environment, options.credentials, or the URI's SAS). Checks that it is a page blob. Throws Error
// naming the blob and what to do (wrong type, not found, lease held by another writer: "use --force
// to break it or --snapshot to serve a read-only snapshot").
asio::awaitable<DevicePtr> open_azure_page_blob(std::string uri, AzurePageBlobOptions options);

}  // namespace imagenbd::backends
