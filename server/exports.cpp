#include "server/exports.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include "backends/azure_credentials.hpp"
#include "backends/azure_page_blob.hpp"
#include "backends/boot_profile.hpp"
#include "backends/cache.hpp"
#include "backends/file.hpp"
#include "backends/http_leaf.hpp"
#include "backends/log.hpp"
#include "backends/memory.hpp"
#include "backends/readahead.hpp"
#include "backends/s3_leaf.hpp"
#include "formats/cow.hpp"
#include "server/blob_tool_common.hpp"
#include "server/local_parents.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace tf = protocol::tx_flag;

protocol::ExportInfo Export::info() const {
  const backends::Caps caps = device->caps();
  protocol::ExportInfo info;
  info.name = name;
  info.description = description;
  info.size = device->size();
  uint16_t flags = tf::has_flags | tf::send_cache;
  if (!caps.writable) flags |= tf::read_only;
  if (caps.flush) flags |= tf::send_flush;
  if (caps.writable) {
    if (caps.fua || caps.flush) flags |= tf::send_fua;
    if (caps.trim) flags |= tf::send_trim;
    flags |= tf::send_write_zeroes;  // zero() always works (emulated if need be)
    if (caps.fast_zero) flags |= tf::send_fast_zero;
  }
  if (caps.multi_conn) flags |= tf::can_multi_conn;
  info.flags = flags;
  info.block_min = caps.block_min;
  info.block_preferred = caps.block_preferred;
  info.block_max = caps.block_max;
  return info;
}

uint64_t parse_size(std::string_view text) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  std::string_view suffix(end, static_cast<std::size_t>(text.data() + text.size() - end));
  unsigned shift = 0;
  if (suffix == "K" || suffix == "k" || suffix == "KiB")
    shift = 10;
  else if (suffix == "M" || suffix == "MiB")
    shift = 20;
  else if (suffix == "G" || suffix == "GiB")
    shift = 30;
  else if (suffix == "T" || suffix == "TiB")
    shift = 40;
  else if (!suffix.empty())
    ec = std::errc::invalid_argument;
  if (ec != std::errc{} || end == text.data() || (shift && value > (UINT64_MAX >> shift))) {
    throw std::invalid_argument("invalid size '" + std::string(text) +
                                "' (expected a number of bytes, optionally with K, M, G or T)");
  }
  return value << shift;
}

backends::azure::Credentials resolve_credentials(std::string_view reference) {
  std::string text, source;
  if (reference.starts_with("env:")) {
    const std::string variable(reference.substr(4));
    const char* value = variable.empty() ? nullptr : std::getenv(variable.c_str());
    if (!value || !*value) {
      throw std::invalid_argument("credentials: the environment variable '" + variable +
                                  "' is not set (credentials = \"env:" + variable + "\")");
    }
    text = value;
    source = "the environment variable " + variable;
  } else if (reference.starts_with("file:")) {
    const std::string path(reference.substr(5));
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      throw std::invalid_argument("credentials: cannot read " + path + ": " + std::strerror(errno));
    }
    std::ostringstream content;
    content << in.rdbuf();
    text = content.str();
    // Editors and `echo` end files with a newline; it is not part of the secret.
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
    if (text.empty()) throw std::invalid_argument("credentials: " + path + " is empty");
    source = path;
  } else {
    throw std::invalid_argument("credentials must be env:VAR or file:PATH (never inline)");
  }
  std::string_view t = text;
  while (!t.empty() && (t.front() == ' ' || t.front() == '\t')) t.remove_prefix(1);
  // A SAS token has no ';' and is signed; everything else is a connection string.
  if (t.starts_with('?') ||
      (t.find(';') == std::string_view::npos && t.find("sig=") != std::string_view::npos)) {
    if (t.starts_with('?')) t.remove_prefix(1);
    backends::azure::Credentials c;
    c.sas = std::string(t);
    return c;
  }
  try {
    return backends::azure::parse_connection_string(t);
  } catch (const std::exception& e) {
    throw std::invalid_argument(std::string(e.what()) + " (in " + source + ")");
  }
}

namespace {

// A URL with a SAS (sv= and sig= in its query) is an Azure blob on any host: that is how
// an emulator's path-style URL (http://127.0.0.1:10000/ACCOUNT/CONTAINER/BLOB?sv=...) is
// served without a connection string naming its endpoint.
bool is_sas_url(std::string_view image) {
  if (!image.starts_with("http://") && !image.starts_with("https://")) return false;
  const auto q = image.find('?');
  if (q == std::string_view::npos) return false;
  const std::string query = "&" + std::string(image.substr(q + 1));
  return query.find("&sv=") != std::string::npos && query.find("&sig=") != std::string::npos;
}

// The filters between the leaf and the format: cache, boot profile, readahead.
backends::DevicePtr stack_cache(const ExportSpec& spec, backends::DevicePtr leaf) {
  if (spec.cache.empty()) return leaf;
  backends::CacheOptions cache_options;
  cache_options.path = spec.cache;
  cache_options.chunk_size = spec.cache_chunk;
  cache_options.max_bytes = spec.cache_size;
  const uint32_t chunk = backends::cache_chunk_size(*leaf, cache_options);
  backends::DevicePtr device = backends::open_cache(leaf, cache_options);
  if (!spec.boot_profile.empty()) {
    backends::BootProfileOptions profile;
    profile.path = spec.boot_profile;
    profile.chunk_size = chunk;
    device = backends::open_boot_profile(device, profile);
  }
  if (spec.readahead) {
    backends::ReadaheadOptions readahead;
    readahead.min_window = std::max<uint64_t>(readahead.min_window, chunk);
    readahead.max_window = std::max<uint64_t>(readahead.max_window, chunk);
    device = backends::open_readahead(device, readahead);
  }
  return device;
}

// An flock on an overlay file, so that a second imagenbd (or qemu-nbd-like tool that
// locks) cannot open it beside us: two writers would allocate the same blocks. Within this
// process one lock per file is shared by the exports that open it (a reload reopening a
// changed export while the old instance is still alive); the reload refuses to do that
// while the old one has clients (server/reload.cpp).
class OverlayLock {
 public:
  explicit OverlayLock(int fd) : fd_(fd) {}
  ~OverlayLock() { ::close(fd_); }
  OverlayLock(const OverlayLock&) = delete;
  OverlayLock& operator=(const OverlayLock&) = delete;

 private:
  int fd_;
};

std::mutex overlay_locks_mutex;
std::map<std::pair<dev_t, ino_t>, std::weak_ptr<OverlayLock>> overlay_locks;

// Opens (creating it 0600: it holds the disk's written data) and locks the overlay file.
// Returns the lock and whether the file is empty.
std::pair<std::shared_ptr<OverlayLock>, bool> lock_overlay(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) {
    throw std::invalid_argument("--overlay: cannot open or create " + path + ": " +
                                std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw std::invalid_argument("--overlay: " + path + " is not a regular file");
  }
  std::lock_guard guard(overlay_locks_mutex);
  if (auto held = overlay_locks[{st.st_dev, st.st_ino}].lock()) {
    ::close(fd);
    return {held, st.st_size == 0};
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int e = errno;
    ::close(fd);
    throw std::invalid_argument(
        "--overlay: " + path + " is in use by another process (" +
        (e == EWOULDBLOCK ? std::string("locked") : std::strerror(e)) +
        "): two servers writing one overlay would corrupt it; stop the other one first");
  }
  auto lock = std::make_shared<OverlayLock>(fd);
  overlay_locks[{st.st_dev, st.st_ino}] = lock;
  return {lock, st.st_size == 0};
}

// Opens the overlay file, making a new overlay in it when it is missing or empty.
boost::asio::awaitable<backends::DevicePtr> open_overlay(const ExportSpec& spec,
                                                         backends::DevicePtr lower,
                                                         std::string identity,
                                                         std::shared_ptr<void>& hold) {
  auto [lock, empty] = lock_overlay(spec.overlay);
  hold = lock;
  backends::DevicePtr file = backends::open_file(spec.overlay, {.read_only = false});
  if (empty) {
    formats::CowCreateOptions create{.identity = identity};
    co_await formats::create_cow(*file, lower->size(), create);
    log::info("overlay: {}: new overlay over {}", spec.overlay, identity);
  }
  formats::CowOptions options{.identity = std::move(identity)};
  co_return co_await formats::open_cow(lower, file, std::move(options));
}

}  // namespace

std::string remote_options_problem(const ExportSpec& spec) {
  if (spec.cache.empty()) {
    if (!spec.boot_profile.empty()) return "--boot-profile needs --cache=PATH";
    if (spec.cache_size != 0) return "--cache-size needs --cache=PATH";
    if (spec.cache_chunk != 0) return "--cache-chunk needs --cache=PATH";
  }
  if (spec.overlay.empty() && !spec.commit_to.empty()) {
    return "--commit-to needs --overlay=FILE (live snapshots commit an overlay's writes)";
  }
  if (!spec.overlay.empty() && spec.read_only && spec.snapshot.empty()) {
    return "--read-only with --overlay: the overlay would never be written (serve the image "
           "read-only without --overlay, or drop --read-only)";
  }
  if (!spec.overlay.empty() && (spec.overlay == spec.cache || spec.overlay == spec.image)) {
    return "--overlay must name a file of its own, not the image or the cache";
  }
  return {};
}

boost::asio::awaitable<std::shared_ptr<Export>> open_export(const ExportSpec& spec) {
  if (auto problem = remote_options_problem(spec); !problem.empty()) {
    throw std::invalid_argument("export '" + spec.name + "': " + problem);
  }
  const bool overlay = !spec.overlay.empty();
  backends::DevicePtr leaf;
  std::string_view image = spec.image;
  // A config file may name the credentials; otherwise they come from the environment.
  std::optional<backends::azure::Credentials> given;
  if (!spec.credentials.empty()) given = resolve_credentials(spec.credentials);
  const bool azure =
      !image.starts_with("file:") && !image.starts_with("memory:") &&
      (backends::azure::is_azure_uri(
           image, given ? *given : backends::azure::credentials_from_environment()) ||
       is_sas_url(image));
  if (!azure && given) {
    throw std::invalid_argument("'" + spec.image + "': credentials apply to Azure blob URIs only");
  }
  if (!azure && (!spec.snapshot.empty() || spec.force)) {
    throw std::invalid_argument("'" + spec.image + "': " + (spec.force ? "--force" : "--snapshot") +
                                " applies to Azure blob URIs only");
  }
  if (azure) {
    // parse_blob_uri takes az:// URIs literally; cli.md promises "?snapshot=T" there too.
    const std::pair<std::string, std::string> split = split_az_snapshot(spec.image);
    const std::string& uri = split.first;
    const std::string& uri_snapshot = split.second;
    if (!uri_snapshot.empty() && !spec.snapshot.empty() && spec.snapshot != uri_snapshot) {
      throw std::invalid_argument("'" + spec.image + "': --snapshot" +
                                  (spec.snapshot == "new" ? "" : "=" + spec.snapshot) +
                                  " contradicts the URI's snapshot " + uri_snapshot);
    }
    backends::AzurePageBlobOptions options;
    options.read_only = spec.read_only || (overlay && !spec.snapshot.empty());
    options.snapshot = uri_snapshot.empty() ? spec.snapshot : uri_snapshot;
    options.force = spec.force;
    options.lease_duration = spec.lease_duration;
    options.retry.deadline = std::chrono::seconds(spec.retry_deadline);
    options.credentials = given;
    leaf = co_await backends::open_azure_page_blob(uri, options);
  } else if (image.starts_with("s3://") || image.starts_with("http://") ||
             image.starts_with("https://")) {
    // Read-only leaves (writes need an overlay): the export is read-only whatever -r says.
    backends::RangeOptions range;
    range.retry.deadline = std::chrono::seconds(spec.retry_deadline);
    if (image.starts_with("s3://")) {
      backends::S3Options options{.range = range};  // GCC 12: named, not a temporary
      leaf = co_await backends::open_s3(spec.image, options);
    } else {
      backends::HttpOptions options{.range = range};
      leaf = co_await backends::open_http(spec.image, options);
    }
    if (!spec.read_only && !overlay) {
      log::info(
          "{}: {}: serving read-only ({} objects cannot be written; --overlay=FILE "
          "keeps writes locally)",
          leaf->name(), leaf->describe(), leaf->name());
    }
  } else if (image.starts_with("memory:")) {
    leaf = backends::open_memory(parse_size(image.substr(7)), spec.image);
  } else {
    if (image.starts_with("file:")) image.remove_prefix(5);
    // Under an overlay a local image is only read.
    leaf = backends::open_file(std::string(image), {.read_only = spec.read_only || overlay});
  }
  auto e = std::make_shared<Export>();
  e->name = spec.name;
  e->description = spec.description;
  e->access = spec.access;
  e->spec = spec;
  e->leaf = leaf;
  backends::DevicePtr below = stack_cache(spec, leaf);
  // Under an overlay the image is written only by live snapshots, and only when this
  // server holds the base blob's lease (a writable Azure leaf); else it is opened read-only.
  const bool image_writable =
      !spec.read_only && below->caps().writable && (!overlay || (azure && spec.snapshot.empty()));
  // Parents are opened now, once per export; the finder is not needed afterwards.
  const formats::ParentFinder parents = local_parent_finder(spec.parent);
  e->device = co_await formats::open_image(below, {.format = spec.format,
                                                   .read_only = !image_writable,
                                                   .vhd_size = spec.vhd_size,
                                                   .parents = {.finder = &parents}});
  if (overlay) {
    // The overlay is tied to the image it was made over: its name and, unless its
    // changes are ours (we hold the lease and commit into it), its version.
    std::string identity = leaf->describe();
    if (!image_writable && !leaf->version_tag().empty()) identity += " @ " + leaf->version_tag();
    e->lower = e->device;
    e->device = co_await open_overlay(spec, e->lower, std::move(identity), e->overlay_lock);
    e->overlay = e->device;
  }
  co_return e;
}

void ExportRegistry::add(std::shared_ptr<const Export> e) {
  for (const auto& existing : exports_) {
    if (existing->name == e->name) {
      throw std::invalid_argument("export name '" + e->name + "' is used twice");
    }
  }
  exports_.push_back(std::move(e));
}

void final_flush(const Export& e) {
  const backends::Caps caps = e.device->caps();
  if (!caps.writable || !caps.flush) return;
  run_now([](backends::DevicePtr d) -> boost::asio::awaitable<int> {
    co_await d->flush();
    co_return 0;
  }(e.device));
}

void close_leaf(const Export& e) {
  if (!e.leaf) return;
  run_now([](backends::DevicePtr d) -> boost::asio::awaitable<int> {
    co_await d->close();
    co_return 0;
  }(e.leaf));
}

std::shared_ptr<const Export> ExportRegistry::find(std::string_view name) const {
  for (const auto& e : exports_) {
    if (e->name == name) return e;
  }
  // The empty name asks for the default export: the first one.
  if (name.empty() && !exports_.empty()) return exports_.front();
  return nullptr;
}

std::optional<protocol::ExportInfo> ExportRegistry::lookup(std::string_view name) const {
  auto e = find(name);
  if (!e) return std::nullopt;
  return e->info();
}

std::vector<protocol::ExportInfo> ExportRegistry::list() const {
  std::vector<protocol::ExportInfo> out;
  out.reserve(exports_.size());
  for (const auto& e : exports_) out.push_back(e->info());
  return out;
}

}  // namespace imagenbd::server
