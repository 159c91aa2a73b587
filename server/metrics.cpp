#include "server/metrics.hpp"

#include "server/exports.hpp"

namespace imagenbd::server {

namespace {

std::size_t bucket_of(std::chrono::nanoseconds latency) {
  const double seconds = std::chrono::duration<double>(latency).count();
  for (std::size_t i = 0; i < latency_buckets.size(); ++i) {
    if (seconds <= latency_buckets[i]) return i;
  }
  return latency_buckets.size();
}

}  // namespace

void ExportMetrics::count_error(protocol::Errno result) {
  if (result == protocol::Errno::ok) return;
  std::size_t i = 0;
  while (i < counted_errnos.size() && counted_errnos[i] != result) ++i;
  errors[i].fetch_add(1, std::memory_order_relaxed);
}

void ExportMetrics::request_finished(protocol::Cmd command, uint64_t bytes, protocol::Errno result,
                                     std::chrono::nanoseconds latency) {
  in_flight.fetch_sub(1, std::memory_order_relaxed);
  const auto c = static_cast<std::size_t>(command);
  if (c < commands.size()) {
    auto& m = commands[c];
    m.requests.fetch_add(1, std::memory_order_relaxed);
    m.bytes.fetch_add(bytes, std::memory_order_relaxed);
    m.latency[bucket_of(latency)].fetch_add(1, std::memory_order_relaxed);
    m.latency_sum_ns.fetch_add(static_cast<uint64_t>(latency.count()), std::memory_order_relaxed);
  }
  count_error(result);
}

void ExportMetrics::request_refused(protocol::Cmd command, protocol::Errno result) {
  const auto c = static_cast<std::size_t>(command);
  if (c < commands.size()) commands[c].requests.fetch_add(1, std::memory_order_relaxed);
  count_error(result);
}

// Placeholder until the admin endpoint lands.
std::string render_prometheus(const ServerMetrics&, const ExportRegistry&) {
  return {};
}

}  // namespace imagenbd::server
