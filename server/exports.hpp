// Exports: a name, a layer stack and a policy. The stack is built once per export and
// shared by all its connections, so flushes and caches are common and multi-conn honest.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>

#include "backends/azure_credentials.hpp"
#include "backends/block_device.hpp"
#include "formats/open_image.hpp"
#include "formats/vhd_layout.hpp"
#include "protocol/handshake.hpp"
#include "server/access.hpp"
#include "server/metrics.hpp"

namespace imagenbd::server {

// What the command line or a config file says about one export. Two equal specs describe
// the same export: a reload keeps an export whose spec did not change.
struct ExportSpec {
  std::string name;
  std::string description;
  std::string image;  // a path, file:PATH, memory:SIZE, or an Azure blob URI
  formats::Format format = formats::Format::automatic;
  bool read_only = false;
  std::string parent;  // --parent: a differencing image's parent, or "" to find it
  formats::vhd::SizePolicy vhd_size = formats::vhd::SizePolicy::automatic;
  // Azure blob images (az://, https://ACCOUNT.blob.core.windows.net/..., Azurite URLs).
  std::string snapshot;     // --snapshot: "" = the live blob, "new", or a timestamp
  bool force = false;       // --force: break another writer's lease
  int lease_duration = 60;  // --lease-duration, seconds (15..60)
  int retry_deadline = 60;  // --retry-deadline, seconds
  // Where the Azure connection string (or SAS token) comes from: "env:VAR" or "file:PATH"
  // (read at open; config files only); "" = the AZURE_STORAGE_* environment as usual.
  std::string credentials;
  AccessRules access;  // --allow, --allow-identity, --max-connections
  // Remote images (issue 6): a local copy-on-write overlay, a persistent cache with
  // readahead and a boot profile, and where live snapshots are committed.
  std::string overlay;       // --overlay FILE: writes stay in this file ("" = none)
  std::string cache;         // --cache PATH: persistent cache of the leaf's bytes
  uint64_t cache_size = 0;   // --cache-size: cap of the cached bytes (0 = the image's size)
  uint32_t cache_chunk = 0;  // --cache-chunk: 0 = the leaf's preferred request, >= 64 KiB
  bool readahead = true;     // --readahead=off: no adaptive prefetch (needs --cache)
  std::string boot_profile;  // --boot-profile FILE: record / replay the first reads
  std::string commit_to;     // --commit-to URI: the private blob live snapshots go to
                             // when this server holds no lease on the base blob
  bool operator==(const ExportSpec&) const = default;
};

struct Export {
  std::string name;
  std::string description;
  backends::DevicePtr device;
  // The bottom of the stack, closed at a clean stop (gives back a blob lease).
  backends::DevicePtr leaf;
  // With --overlay: the copy-on-write layer (== device) and the image under it (the format
  // layer, writable only when the base can take commits: a blob whose lease we hold).
  backends::DevicePtr overlay;
  backends::DevicePtr lower;
  std::shared_ptr<void> overlay_lock;  // the overlay file's flock, while the export lives
  AccessRules access;
  ExportSpec spec;  // what it was opened from
  std::shared_ptr<ExportMetrics> metrics = std::make_shared<ExportMetrics>();

  // Transmission flags and block sizes, derived from the stack's capabilities: we only
  // advertise what the stack really does.
  protocol::ExportInfo info() const;
};

// What is wrong with the remote-image settings of a spec taken together (a boot profile
// without a cache, --commit-to without an overlay, ...), as a message naming the
// command-line flags, or "" when nothing is.
std::string remote_options_problem(const ExportSpec& spec);

// Opens the image and builds the layer stack for one export: the leaf, then the cache,
// boot profile and readahead filters (with spec.cache), the format layer, and the
// copy-on-write overlay (with spec.overlay).
boost::asio::awaitable<std::shared_ptr<Export>> open_export(const ExportSpec& spec);

// The last flush of an export that is let go (at a stop, or removed by a reload), when
// its stack is writable and can flush; runs to completion here, outside any io_context.
// Throws what the flush throws.
void final_flush(const Export& e);

// Gives back what the export holds outside the process (closes its leaf: a blob lease),
// after the final flush; runs to completion here. Nothing to do without a leaf. Throws
// what the close throws.
void close_leaf(const Export& e);

// The Azure credentials an ExportSpec::credentials reference names: "env:VAR" (the
// variable must be set) or "file:PATH" (read now, trailing newline dropped). The text is
// a connection string ("AccountName=...;AccountKey=..." or "UseDevelopmentStorage=true")
// or a SAS token ("sv=...&sig=...", a leading '?' allowed). Throws std::invalid_argument
// naming the variable or file (never the secret).
backends::azure::Credentials resolve_credentials(std::string_view reference);

// Parses "64M", "1G", "4096" (suffixes K, M, G, T are powers of 1024). Throws
// std::invalid_argument with a message naming the text.
uint64_t parse_size(std::string_view text);

// The exports of a running server. The first export added is the default one, served to
// clients that ask for the empty name.
class ExportRegistry : public protocol::ExportCatalog {
 public:
  void add(std::shared_ptr<const Export> e);  // throws std::invalid_argument on a duplicate
  std::shared_ptr<const Export> find(std::string_view name) const;
  const std::vector<std::shared_ptr<const Export>>& all() const { return exports_; }

  std::optional<protocol::ExportInfo> lookup(std::string_view name) const override;
  std::vector<protocol::ExportInfo> list() const override;

 private:
  std::vector<std::shared_ptr<const Export>> exports_;
};

}  // namespace imagenbd::server
