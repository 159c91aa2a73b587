// The Azure page blob leaf (see the header). The page map (which 512-byte pages hold
// data, from Get Page Ranges) is loaded lazily, one 1 GiB window at a time, and kept up
// to date by our own Put/Clear Page calls. It is exact only when nobody else can write:
// a snapshot, or a live blob while we hold its lease. A read-only view of a live blob
// asks the service every time instead (extents) and reads without skipping holes.
// Version tag (for the cache): a snapshot's id, which never changes; else the ETag seen at
// open, which our own Put/Clear Page calls change: flush() after any of them asks the
// service for the new one (Get Blob Properties), so a cache saved after our flush is
// valid at the next start.
#include "backends/azure_page_blob.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "backends/async_mutex.hpp"
#include "backends/azure_blob.hpp"
#include "backends/azure_credentials.hpp"
#include "backends/azure_lease.hpp"
#include "backends/log.hpp"
#include "backends/page_map.hpp"
#include "backends/parallel.hpp"

namespace imagenbd::backends {

namespace {

using azure::BlobClient;
using azure::BlobError;

constexpr uint64_t page = 512;
constexpr uint64_t max_put_page = 4u << 20;
constexpr uint64_t window = 1ull << 30;       // page map loaded per 1 GiB
constexpr uint64_t coalesce_gap = 64u << 10;  // read across holes smaller than this
constexpr uint64_t max_clear = 1ull << 30;    // one Clear Page request at most

uint64_t round_down(uint64_t x) {
  return x / page * page;
}
uint64_t round_up(uint64_t x) {
  return (x + page - 1) / page * page;
}

class AzurePageBlob final : public BlockDevice {
 public:
  AzurePageBlob(BlobClient blob, uint64_t size, bool writable, bool snapshot, std::string etag,
                std::unique_ptr<azure::LeaseKeeper> lease, AzurePageBlobOptions options)
      : etag_(std::move(etag)),
        blob_(std::move(blob)),
        size_(size),
        writable_(writable),
        snapshot_(snapshot),
        lease_(std::move(lease)),
        options_(std::move(options)),
        loaded_((size + window - 1) / window) {
    caps_.writable = writable;
    // Every acknowledged Put Page is durable (formats.md §3.5).
    caps_.flush = caps_.fua = true;
    caps_.trim = caps_.zero = caps_.fast_zero = writable;
    caps_.extents = true;
    caps_.multi_conn = true;
    caps_.block_min = 512;
    caps_.block_preferred = 4096;
    caps_.block_max = 32u << 20;
  }

  std::string_view name() const override { return "azure"; }
  std::string describe() const override { return blob_.location().display(); }
  uint64_t size() const override { return size_; }
  Caps caps() const override { return caps_; }
  std::string version_tag() const override {
    if (snapshot_) return "snapshot " + blob_.location().snapshot;
    std::lock_guard lock(etag_mutex_);
    return etag_;
  }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    assert(offset + out.size() <= size_);
    if (out.empty()) co_return;
    const uint64_t end = offset + out.size();
    // The ranges to fetch: all of it, or (with an exact map) the data, holes zero-filled.
    std::vector<PageMap::Interval> fetch;
    if (map_exact()) {
      co_await load_map(offset, end);
      std::vector<PageMap::Interval> data;
      {
        std::lock_guard lock(map_mutex_);
        data = map_.data_in(offset, end);
      }
      for (const auto& d : data) {
        if (!fetch.empty() && d.start - fetch.back().end < coalesce_gap) {
          fetch.back().end = d.end;
        } else {
          fetch.push_back(d);
        }
      }
      uint64_t pos = offset;
      for (const auto& f : fetch) {
        std::memset(out.data() + (pos - offset), 0, f.start - pos);
        pos = f.end;
      }
      std::memset(out.data() + (pos - offset), 0, end - pos);
    } else {
      fetch.push_back({offset, end});
    }
    std::vector<Task> tasks;
    for (const auto& f : fetch) {
      for (uint64_t o = f.start; o < f.end; o += options_.read_split) {
        const uint64_t n = std::min<uint64_t>(options_.read_split, f.end - o);
        std::span<std::byte> piece = out.subspan(o - offset, n);
        tasks.push_back(
            [this, o, piece]() -> asio::awaitable<void> { co_await blob_.read(o, piece, size_); });
      }
    }
    auto all = run_parallel(std::move(tasks), options_.parallel);
    co_await std::move(all);
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in, WriteFlags) override {
    check_writable("write", offset, in.size());
    assert(offset + in.size() <= size_);
    if (in.empty()) co_return;
    const uint64_t end = offset + in.size();
    const uint64_t mid_start = round_up(offset);
    const uint64_t mid_end = std::max(mid_start, round_down(end));
    // The aligned middle: Put Pages of <= 4 MiB side by side.
    if (mid_end > mid_start) {
      std::vector<Task> tasks;
      for (uint64_t o = mid_start; o < mid_end; o += max_put_page) {
        const uint64_t n = std::min<uint64_t>(max_put_page, mid_end - o);
        std::span<const std::byte> piece = in.subspan(o - offset, n);
        tasks.push_back(
            [this, o, piece]() -> asio::awaitable<void> { co_await put_pages(o, piece); });
      }
      auto all = run_parallel(std::move(tasks), options_.parallel);
      co_await std::move(all);
    }
    // Unaligned edges: read-modify-write of their page, one at a time, so that two
    // writes into the same page cannot lose each other's bytes.
    if (offset % page != 0 || end % page != 0) {
      auto guard = co_await rmw_mutex_.scoped();
      const uint64_t head_page = round_down(offset);
      if (offset % page != 0) {
        co_await patch_page(head_page, offset, in.first(std::min(end, head_page + page) - offset));
      }
      const uint64_t tail_page = round_down(end);
      if (end % page != 0 && (offset % page == 0 || tail_page != head_page)) {
        const uint64_t from = std::max(offset, tail_page);
        co_await patch_page(tail_page, from, in.subspan(from - offset));
      }
    }
  }

  // Every acknowledged Put Page was durable already; with the lease lost, those writes
  // still were, so there is nothing to report either. After writes, the new ETag is
  // fetched for version_tag(): the count is reset first, so a write that ends during the
  // request makes the next flush ask again. A failed request leaves the old tag (a cache
  // saved with it is discarded at the next start) and fails nothing.
  asio::awaitable<void> flush() override {
    if (changes_.exchange(0) == 0) co_return;
    std::string etag, problem;
    try {
      etag = (co_await blob_.properties()).etag;
    } catch (const std::exception& e) {
      problem = e.what();
    }
    if (!problem.empty()) {
      changes_.fetch_add(1);
      log::warn("azure: {}: could not learn the ETag after our writes: {}", describe(), problem);
      co_return;
    }
    std::lock_guard lock(etag_mutex_);
    etag_ = std::move(etag);
  }

  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags) override {
    check_writable("trim", offset, length);
    // Only whole pages can be cleared; trim may leave the edges as they are.
    const uint64_t start = round_up(offset);
    const uint64_t stop = round_down(offset + length);
    if (stop > start) co_await clear(start, stop - start);
  }

  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("zero", offset, length);
    const uint64_t end = offset + length;
    uint64_t start = round_up(offset);
    uint64_t stop = std::max(start, round_down(end));
    if (flags.no_hole) {
      // Clear Page deallocates; keeping the pages allocated means writing zeroes.
      if (flags.fast) {
        fail(std::errc::operation_not_supported,
             "azure: {}: fast zero that keeps the pages allocated is not supported", describe());
      }
      start = stop = offset;  // all of it by writes below
    }
    if (stop > start) co_await clear(start, stop - start);
    // The edges (or everything, for no_hole) are written as zeroes.
    static const std::vector<std::byte> zeroes(max_put_page);
    auto write_zeroes = [this](uint64_t from, uint64_t to) -> asio::awaitable<void> {
      for (uint64_t o = from; o < to;) {
        const uint64_t n = std::min<uint64_t>(to - o, max_put_page);
        co_await write(o, std::span(zeroes.data(), n), {});
        o += n;
      }
    };
    if (stop > start) {
      co_await write_zeroes(offset, start);
      co_await write_zeroes(stop, end);
    } else {
      co_await write_zeroes(offset, end);
    }
  }

  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    assert(offset + length <= size_);
    // At most to the end of offset's window: callers ask again for the rest.
    const uint64_t end = std::min(offset + length, (offset / window + 1) * window);
    if (map_exact()) {
      co_await load_map(offset, end);
      std::lock_guard lock(map_mutex_);
      co_return map_.extents(offset, end - offset);
    }
    // A live blob someone else may write: ask every time.
    const uint64_t q0 = round_down(offset);
    const uint64_t q1 = std::min(size_, round_up(end));
    const std::vector<azure::PageRange> ranges = co_await blob_.page_ranges(q0, q1 - q0);
    PageMap fresh;
    fresh.apply(ranges, size_);
    co_return fresh.extents(offset, end - offset);
  }

  asio::awaitable<void> prefetch(uint64_t, uint64_t) override { co_return; }

  asio::awaitable<void> close() override {
    if (lease_) co_await lease_->release();
  }

 private:
  // Whether nobody else can write: a snapshot, or a live blob while we hold its lease.
  bool map_exact() const { return snapshot_ || (lease_ && !lease_->lost()); }

  void check_writable(std::string_view what, uint64_t offset, uint64_t length) const {
    if (!writable_) {
      fail(std::errc::operation_not_permitted, "azure: {}: {} on a read-only export", describe(),
           what);
    }
    if (lease_ && lease_->lost()) {
      fail(std::errc::io_error,
           "azure: {}: {} at offset {} length {} refused: the blob lease was lost (restart the "
           "server to take it again)",
           describe(), what, offset, length);
    }
  }

  // A refusal because of the lease: the lease is gone for good (formats.md §3.6).
  [[noreturn]] void lease_refused(const BlobError& e, std::string_view what, uint64_t offset,
                                  uint64_t length) {
    if (lease_) lease_->mark_lost(e.service_code());
    fail(std::errc::io_error,
         "azure: {}: {} at offset {} length {} failed: the blob lease was "
         "lost ({})",
         describe(), what, offset, length, e.what());
  }

  asio::awaitable<void> put_pages(uint64_t offset, std::span<const std::byte> data) {
    azure::PagePutOptions options;
    if (lease_) options.lease_id = lease_->id();
    // Counted before and after: a Put Page the service applies changes the ETag whether
    // or not we see its answer.
    changes_.fetch_add(1);
    Counted after(changes_);
    for (int attempt = 0;; ++attempt) {
      std::optional<BlobError> refused;
      try {
        co_await blob_.put_pages(offset, data, options);
        break;
      } catch (const BlobError& e) {
        if (!e.lease_lost()) throw;
        refused = e;
      }
      if (attempt > 0 || !co_await reclaim(*refused))
        lease_refused(*refused, "write", offset, data.size());
    }
    std::lock_guard lock(map_mutex_);
    map_.add(offset, offset + data.size());
  }

  asio::awaitable<void> clear(uint64_t offset, uint64_t length) {
    const std::string lease_id = lease_ ? lease_->id() : std::string();
    changes_.fetch_add(1);
    Counted after(changes_);
    for (uint64_t o = offset; o < offset + length; o += max_clear) {
      const uint64_t n = std::min(max_clear, offset + length - o);
      for (int attempt = 0;; ++attempt) {
        std::optional<BlobError> refused;
        try {
          co_await blob_.clear_pages(o, n, lease_id);
          break;
        } catch (const BlobError& e) {
          if (!e.lease_lost()) throw;
          refused = e;
        }
        if (attempt > 0 || !co_await reclaim(*refused)) lease_refused(*refused, "clear", o, n);
      }
      std::lock_guard lock(map_mutex_);
      map_.remove(o, o + n);
    }
  }

  // A write refused because the blob has no lease any more (Azurite's code for it is
  // LeaseNotPresentWithBlobOperation, Azure's documentation also names LeaseLost): ours
  // expired, as renewals failed for a whole duration, or Azurite restarted (it expires
  // every lease then). If nobody leased the blob since, renewing makes it ours again and
  // the write is sent again; the page map is reloaded, as a writer without a lease may
  // have written meanwhile. Any other lease refusal (another writer's lease) is final.
  asio::awaitable<bool> reclaim(const BlobError& refused) {
    if (!lease_ || (refused.service_code() != "LeaseNotPresentWithBlobOperation" &&
                    refused.service_code() != "LeaseLost")) {
      co_return false;
    }
    if (!co_await lease_->reclaim()) co_return false;
    std::lock_guard lock(map_mutex_);
    map_.clear();
    for (auto& w : loaded_) w.store(false, std::memory_order_release);
    co_return true;
  }

  // Read-modify-write of one page: bytes [from, from + data.size()) replaced. The caller
  // holds rmw_mutex_.
  asio::awaitable<void> patch_page(uint64_t page_offset, uint64_t from,
                                   std::span<const std::byte> data) {
    assert(from >= page_offset && from + data.size() <= page_offset + page);
    std::array<std::byte, page> buffer{};
    co_await read(page_offset, buffer);
    std::memcpy(buffer.data() + (from - page_offset), data.data(), data.size());
    co_await put_pages(page_offset, buffer);
  }

  // Loads the page map windows that [offset, end) touches and that are not loaded yet.
  // Two readers may load the same window at once: applying it twice does no harm, and
  // our own writes meanwhile are in the map already (apply only adds).
  asio::awaitable<void> load_map(uint64_t offset, uint64_t end) {
    for (uint64_t w = offset / window; w * window < end; ++w) {
      if (loaded_[w].load(std::memory_order_acquire)) continue;
      const uint64_t w_start = w * window;
      const uint64_t w_len = std::min(window, size_ - w_start);
      const std::vector<azure::PageRange> ranges = co_await blob_.page_ranges(w_start, w_len);
      std::size_t odd = 0;
      {
        std::lock_guard lock(map_mutex_);
        if (loaded_[w].load(std::memory_order_relaxed)) continue;
        odd = map_.apply(ranges, size_);
        loaded_[w].store(true, std::memory_order_release);
      }
      if (odd) {
        log::warn(
            "azure: {}: Get Page Ranges listed {} ranges past the end of the blob or not "
            "512-byte aligned (clamped)",
            describe(), odd);
      }
    }
  }

  // Adds one to the count of changes when it goes out of scope (however the call ends).
  struct Counted {
    explicit Counted(std::atomic<uint64_t>& n) : n_(n) {}
    ~Counted() { n_.fetch_add(1); }
    std::atomic<uint64_t>& n_;
  };

  mutable std::mutex etag_mutex_;
  std::string etag_;                  // under etag_mutex_
  std::atomic<uint64_t> changes_{0};  // Put/Clear Page calls since the last ETag learned
  BlobClient blob_;
  const uint64_t size_;
  const bool writable_;
  const bool snapshot_;
  std::unique_ptr<azure::LeaseKeeper> lease_;
  const AzurePageBlobOptions options_;
  Caps caps_;
  std::mutex map_mutex_;
  PageMap map_;
  std::vector<std::atomic<bool>> loaded_;  // per window
  AsyncMutex rmw_mutex_;
};

// properties() with the messages a user needs: not found, no permission.
asio::awaitable<azure::BlobProperties> blob_properties(BlobClient& blob) {
  const std::string display = blob.location().display();
  long status = 0;
  std::string what;
  try {
    co_return co_await blob.properties();
  } catch (const BlobError& e) {
    status = e.status();
    what = e.what();
    if (status != 404 && status != 403) throw;
  }
  if (status == 404) {
    if (!blob.location().snapshot.empty()) {
      azure::BlobLocation base = blob.location();
      base.snapshot.clear();
      fail(std::errc::no_such_file_or_directory, "azure: {}: no snapshot {} of {}", display,
           blob.location().snapshot, base.display());
    }
    fail(std::errc::no_such_file_or_directory, "azure: {}: blob not found", display);
  }
  fail(std::errc::permission_denied,
       "azure: {}: access denied ({}); check the credentials in AZURE_STORAGE_CONNECTION_STRING, "
       "or AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, or the "
       "URI's SAS",
       display, what);
}

// Checks that the blob can be served: a page blob, whole pages.
void check_servable(const BlobClient& blob, const azure::BlobProperties& p) {
  const std::string display = blob.location().display();
  if (p.blob_type != "PageBlob") {
    fail(std::errc::invalid_argument,
         "azure: {}: is a {} blob: only page blobs can be served; upload images with "
         "'imagenbd upload'",
         display, p.blob_type == "BlockBlob" ? "block" : p.blob_type);
  }
  if (p.size % page != 0) {
    fail(std::errc::invalid_argument,
         "azure: {}: size {} is not a multiple of 512 bytes (not a valid page blob)", display,
         p.size);
  }
}

}  // namespace

asio::awaitable<DevicePtr> open_azure_page_blob(std::string uri, AzurePageBlobOptions options) {
  const azure::Credentials env =
      options.credentials ? *options.credentials : azure::credentials_from_environment();
  azure::BlobLocation where = azure::parse_blob_uri(uri, env);
  const azure::Credentials credentials = azure::credentials_for(where, env);
  if (!options.snapshot.empty() && !where.snapshot.empty() && options.snapshot != where.snapshot) {
    fail(std::errc::invalid_argument, "azure: {}: --snapshot={} contradicts the URI's snapshot={}",
         where.display(), options.snapshot, where.snapshot);
  }
  if (options.snapshot == "new") {
    where.snapshot.clear();
    BlobClient base(where, credentials, options.retry);
    check_servable(base, co_await blob_properties(base));
    where.snapshot = co_await base.snapshot();
    log::info("azure: {}: serving new snapshot {}", base.location().display(), where.snapshot);
  } else if (!options.snapshot.empty()) {
    where.snapshot = options.snapshot;
  }
  const bool snapshot = !where.snapshot.empty();
  BlobClient blob(where, credentials, options.retry);
  const azure::BlobProperties props = co_await blob_properties(blob);
  check_servable(blob, props);

  const bool writable = !options.read_only && !snapshot;
  std::unique_ptr<azure::LeaseKeeper> lease;
  if (writable) {
    std::string refused;
    try {
      lease = co_await azure::LeaseKeeper::acquire(blob, options.lease_duration, options.lease_id,
                                                   options.force);
    } catch (const BlobError& e) {
      if (e.status() != 403) throw;
      refused = e.what();
    }
    if (!refused.empty()) {
      fail(std::errc::permission_denied,
           "{} (a writable export takes the blob's lease: serve it read-only with -r, or with "
           "credentials that may write, such as a SAS with 'w')",
           refused);
    }
  } else if (!snapshot) {
    log::warn(
        "azure: {}: serving the live blob read-only without a lease: another writer may "
        "change it underneath (use --snapshot for a stable image)",
        blob.location().display());
  }
  log::debug("azure: {}: {} bytes, {}", blob.location().display(), props.size,
             snapshot   ? "snapshot, read-only"
             : writable ? "writable, leased"
                        : "read-only");
  DevicePtr device = std::make_shared<AzurePageBlob>(
      std::move(blob), props.size, writable, snapshot, props.etag, std::move(lease), options);
  co_return device;
}

}  // namespace imagenbd::backends
