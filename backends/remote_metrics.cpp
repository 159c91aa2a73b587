#include "backends/remote_metrics.hpp"

namespace imagenbd::backends {

namespace {

std::array<RemoteCounters, remote_kind_count> counters;
CacheCounters cache;

}  // namespace

std::string_view remote_kind_name(RemoteKind kind) {
  switch (kind) {
    case RemoteKind::azure:
      return "azure";
    case RemoteKind::s3:
      return "s3";
    case RemoteKind::http:
      return "http";
    case RemoteKind::count_:
      break;
  }
  return "unknown";
}

RemoteCounters& remote_counters(RemoteKind kind) {
  return counters[static_cast<std::size_t>(kind)];
}

CacheCounters& cache_counters() {
  return cache;
}

}  // namespace imagenbd::backends
