// Process-wide counters of the requests the remote leaves send to their storage services,
// per kind of service ("azure", "s3", "http"). Relaxed atomics: requests on every thread
// count without locks; the admin endpoint reads them.
// Knows nothing of NBD: it counts HTTP requests, not the NBD requests that caused them.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace imagenbd::backends {

enum class RemoteKind : std::size_t { azure, s3, http, count_ };

struct RemoteCounters {
  std::atomic<uint64_t> requests{0};       // HTTP requests sent, every attempt of a retry
  std::atomic<uint64_t> retries{0};        // of those, the ones that repeated an attempt
  std::atomic<uint64_t> errors{0};         // attempts with no response or a status >= 400
  std::atomic<uint64_t> bytes_fetched{0};  // response body bytes received
  std::atomic<uint64_t> bytes_sent{0};     // request body bytes sent

  // One attempt of a request and how it ended (status 0: no response at all).
  void attempted(bool retry, uint64_t sent, long status, uint64_t fetched) {
    requests.fetch_add(1, std::memory_order_relaxed);
    if (retry) retries.fetch_add(1, std::memory_order_relaxed);
    if (status == 0 || status >= 400) errors.fetch_add(1, std::memory_order_relaxed);
    bytes_sent.fetch_add(sent, std::memory_order_relaxed);
    bytes_fetched.fetch_add(fetched, std::memory_order_relaxed);
  }
};

inline constexpr std::size_t remote_kind_count = static_cast<std::size_t>(RemoteKind::count_);

// The label value of a kind: "azure", "s3", "http".
std::string_view remote_kind_name(RemoteKind kind);

// The counters of one kind of remote storage; lives as long as the process.
RemoteCounters& remote_counters(RemoteKind kind);

// The persistent cache filter (backends/cache), summed over every cache in the process.
// Counted in chunks (a read of 3 missing chunks is 3 misses) except bytes_fetched.
struct CacheCounters {
  std::atomic<uint64_t> hits{0};           // chunks a read served from the local file
  std::atomic<uint64_t> misses{0};         // chunks a read had to wait for the remote
  std::atomic<uint64_t> evictions{0};      // chunks evicted (holes punched) for the size cap
  std::atomic<uint64_t> bytes_fetched{0};  // bytes the caches read from their remotes
};

// The process's cache counters; live as long as the process.
CacheCounters& cache_counters();

}  // namespace imagenbd::backends
