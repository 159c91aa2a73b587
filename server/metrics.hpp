// Counters the admin endpoint exports in Prometheus text format. Everything is a relaxed
// atomic: sessions on every worker thread update them on the data path without locks, and
// a scrape reads a consistent-enough snapshot.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "protocol/wire.hpp"

namespace imagenbd::server {

// Latency histogram buckets, in seconds (upper bounds; +Inf is implicit).
inline constexpr std::array<double, 12> latency_buckets = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5};

// Commands we count, in protocol::Cmd order (read..block_status).
inline constexpr std::size_t counted_commands = 8;
// Errnos we count: protocol::Errno values, by index in counted_errnos.
inline constexpr std::array<protocol::Errno, 8> counted_errnos = {
    protocol::Errno::perm,   protocol::Errno::io,      protocol::Errno::nomem,
    protocol::Errno::inval,  protocol::Errno::nospc,   protocol::Errno::overflow,
    protocol::Errno::notsup, protocol::Errno::shutdown};

struct CommandMetrics {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes{0};  // payload bytes read or written (0 for the others)
  std::array<std::atomic<uint64_t>, latency_buckets.size() + 1> latency{};  // last: +Inf
  std::atomic<uint64_t> latency_sum_ns{0};
};

// One export's counters. Kept by the Export, so an export that survives a reload keeps
// them.
class ExportMetrics {
 public:
  void connection_opened() {
    connections.fetch_add(1, std::memory_order_relaxed);
    connections_total.fetch_add(1, std::memory_order_relaxed);
  }
  void connection_closed() { connections.fetch_sub(1, std::memory_order_relaxed); }
  void request_started() { in_flight.fetch_add(1, std::memory_order_relaxed); }
  // A request finished (also refused ones): counts it, its bytes, its error, its latency.
  void request_finished(protocol::Cmd command, uint64_t bytes, protocol::Errno result,
                        std::chrono::nanoseconds latency);
  // For requests refused before they started (no request_started() call).
  void request_refused(protocol::Cmd command, protocol::Errno result);
  // NBD_CMD_DISC: counted, never timed (the connection ends with it).
  void disconnect_requested() {
    commands[static_cast<std::size_t>(protocol::Cmd::disc)].requests.fetch_add(
        1, std::memory_order_relaxed);
  }

  std::atomic<int64_t> connections{0};           // open now
  std::atomic<uint64_t> connections_total{0};    // ever opened
  std::atomic<uint64_t> connections_refused{0};  // refused by access rules or limits
  std::atomic<int64_t> in_flight{0};
  std::array<CommandMetrics, counted_commands> commands{};
  std::array<std::atomic<uint64_t>, counted_errnos.size() + 1> errors{};  // last: other

 private:
  void count_error(protocol::Errno result);
};

// Server-wide counters (not tied to one export).
struct ServerMetrics {
  std::atomic<int64_t> connections{0};           // open now, in any phase
  std::atomic<uint64_t> connections_total{0};    // accepted
  std::atomic<uint64_t> connections_refused{0};  // over --shared / max total
  std::atomic<uint64_t> handshake_timeouts{0};
  std::atomic<uint64_t> handshake_failures{0};  // closed before transmission (incl. TLS)
  std::atomic<uint64_t> idle_timeouts{0};
  std::atomic<uint64_t> tls_handshakes{0};
  std::atomic<uint64_t> reloads{0};
  std::atomic<uint64_t> reload_failures{0};
};

// The label values of the counted commands, by protocol::Cmd value ("read", "write",
// "disc", ...), and of the counted errnos, by index in ExportMetrics::errors ("EPERM", ...,
// "other").
std::string_view command_label(std::size_t command);
std::string_view errno_label(std::size_t index);

// A label value escaped for the text exposition format: backslash, double quote and
// newline become \\, \" and \n.
std::string escape_label_value(std::string_view value);

// The Prometheus text exposition (version 0.0.4) of `server` and each export (only those
// named in `only`, when it is not empty), plus the remote-storage counters of backends/
// (backends/remote_metrics.hpp). Every family has its HELP and TYPE lines; histograms are
// cumulative with le="+Inf", _sum (seconds) and _count.
class ExportRegistry;
std::string render_prometheus(const ServerMetrics& server, const ExportRegistry& exports,
                              std::span<const std::string> only = {});

}  // namespace imagenbd::server
