#include "server/metrics.hpp"

#include <algorithm>
#include <iterator>
#include <vector>

#include <fmt/format.h>

#include "backends/remote_metrics.hpp"
#include "imagenbd_version.hpp"
#include "protocol/errors.hpp"
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

std::string_view command_label(std::size_t command) {
  static constexpr std::array<std::string_view, counted_commands> labels = {
      "read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status"};
  return command < labels.size() ? labels[command] : "other";
}

std::string_view errno_label(std::size_t index) {
  return index < counted_errnos.size() ? protocol::name(counted_errnos[index]) : "other";
}

std::string escape_label_value(std::string_view value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
  return out;
}

namespace {

// Appends families to the exposition text: one HELP and TYPE header per family, then its
// samples.
class Exposition {
 public:
  void family(std::string_view name, std::string_view type, std::string_view help) {
    fmt::format_to(std::back_inserter(text_), "# HELP imagenbd_{} {}\n# TYPE imagenbd_{} {}\n",
                   name, help, name, type);
  }
  // `labels` is "" or already formatted: export="disk",command="read".
  template <typename T>
  void sample(std::string_view name, std::string_view labels, T value) {
    if (labels.empty()) {
      fmt::format_to(std::back_inserter(text_), "imagenbd_{} {}\n", name, value);
    } else {
      fmt::format_to(std::back_inserter(text_), "imagenbd_{}{{{}}} {}\n", name, labels, value);
    }
  }
  std::string take() { return std::move(text_); }

 private:
  std::string text_;
};

uint64_t load(const std::atomic<uint64_t>& a) {
  return a.load(std::memory_order_relaxed);
}
int64_t load(const std::atomic<int64_t>& a) {
  return a.load(std::memory_order_relaxed);
}

std::string export_label(const Export& e) {
  return fmt::format("export=\"{}\"", escape_label_value(e.name));
}

}  // namespace

std::string render_prometheus(const ServerMetrics& server, const ExportRegistry& registry,
                              std::span<const std::string> only) {
  Exposition out;
  out.family("build_info", "gauge", "Always 1; the version of the running server.");
  out.sample("build_info", fmt::format("version=\"{}\"", escape_label_value(IMAGENBD_VERSION)), 1);

  struct Counter {
    std::string_view name;
    const std::atomic<uint64_t>& value;
    std::string_view help;
  };
  out.family("connections", "gauge", "Client connections open now, in any phase.");
  out.sample("connections", "", load(server.connections));
  const Counter server_counters[] = {
      {"connections_accepted_total", server.connections_total, "Client connections accepted."},
      {"connections_refused_total", server.connections_refused,
       "Client connections refused over the server-wide limit."},
      {"handshake_timeouts_total", server.handshake_timeouts,
       "Connections closed because the handshake did not finish in time."},
      {"handshake_failures_total", server.handshake_failures,
       "Connections that ended before transmission (failed options, TLS errors)."},
      {"idle_timeouts_total", server.idle_timeouts, "Connections closed after the idle timeout."},
      {"tls_handshakes_total", server.tls_handshakes, "TLS handshakes completed."},
      {"reloads_total", server.reloads, "Configuration reloads that succeeded."},
      {"reload_failures_total", server.reload_failures,
       "Configuration reloads that failed (the previous configuration stayed)."},
  };
  for (const auto& c : server_counters) {
    out.family(c.name, "counter", c.help);
    out.sample(c.name, "", load(c.value));
  }

  std::vector<const Export*> exports;
  for (const auto& e : registry.all()) {
    if (only.empty() || std::find(only.begin(), only.end(), e->name) != only.end()) {
      exports.push_back(e.get());
    }
  }
  out.family("exports", "gauge", "Exports served.");
  out.sample("exports", "", registry.all().size());

  // Per export: one family at a time, every export inside it (the format wants a family's
  // samples together).
  out.family("export_connections", "gauge", "Client connections to the export open now.");
  for (const Export* e : exports) {
    out.sample("export_connections", export_label(*e), load(e->metrics->connections));
  }
  out.family("export_connections_total", "counter", "Client connections to the export.");
  for (const Export* e : exports) {
    out.sample("export_connections_total", export_label(*e), load(e->metrics->connections_total));
  }
  out.family("export_connections_refused_total", "counter",
             "Client connections to the export refused by its access rules or limits.");
  for (const Export* e : exports) {
    out.sample("export_connections_refused_total", export_label(*e),
               load(e->metrics->connections_refused));
  }
  out.family("export_in_flight", "gauge", "Requests being handled now.");
  for (const Export* e : exports) {
    out.sample("export_in_flight", export_label(*e), load(e->metrics->in_flight));
  }
  out.family("export_size_bytes", "gauge", "Size of the export, in bytes.");
  for (const Export* e : exports) {
    out.sample("export_size_bytes", export_label(*e), e->device->size());
  }
  out.family("export_info", "gauge", "Always 1; the export's format and whether it is read-only.");
  for (const Export* e : exports) {
    out.sample("export_info",
               fmt::format("{},format=\"{}\",read_only=\"{}\"", export_label(*e),
                           escape_label_value(e->device->name()),
                           e->device->caps().writable ? "false" : "true"),
               1);
  }
  out.family("export_requests_total", "counter",
             "Requests by command, including those refused (errors_total counts their errors).");
  for (const Export* e : exports) {
    for (std::size_t c = 0; c < counted_commands; ++c) {
      out.sample("export_requests_total",
                 fmt::format("{},command=\"{}\"", export_label(*e), command_label(c)),
                 load(e->metrics->commands[c].requests));
    }
  }
  out.family("export_bytes_total", "counter",
             "Payload bytes read or written by successful requests.");
  for (const Export* e : exports) {
    for (const auto command : {protocol::Cmd::read, protocol::Cmd::write}) {
      const auto c = static_cast<std::size_t>(command);
      out.sample("export_bytes_total",
                 fmt::format("{},command=\"{}\"", export_label(*e), command_label(c)),
                 load(e->metrics->commands[c].bytes));
    }
  }
  out.family("export_errors_total", "counter", "Requests answered with an error, by NBD errno.");
  for (const Export* e : exports) {
    for (std::size_t i = 0; i < e->metrics->errors.size(); ++i) {
      out.sample("export_errors_total",
                 fmt::format("{},errno=\"{}\"", export_label(*e), errno_label(i)),
                 load(e->metrics->errors[i]));
    }
  }
  out.family("export_request_duration_seconds", "histogram",
             "Time from a request's arrival to its reply being queued, for requests that were "
             "handled (not those refused before).");
  for (const Export* e : exports) {
    for (std::size_t c = 0; c < counted_commands; ++c) {
      if (c == static_cast<std::size_t>(protocol::Cmd::disc)) continue;  // never timed
      const CommandMetrics& m = e->metrics->commands[c];
      const std::string labels =
          fmt::format("{},command=\"{}\"", export_label(*e), command_label(c));
      uint64_t cumulative = 0;
      for (std::size_t b = 0; b < latency_buckets.size(); ++b) {
        cumulative += load(m.latency[b]);
        out.sample("export_request_duration_seconds_bucket",
                   fmt::format("{},le=\"{}\"", labels, latency_buckets[b]), cumulative);
      }
      cumulative += load(m.latency[latency_buckets.size()]);
      out.sample("export_request_duration_seconds_bucket", labels + ",le=\"+Inf\"", cumulative);
      out.sample("export_request_duration_seconds_sum", labels,
                 static_cast<double>(load(m.latency_sum_ns)) / 1e9);
      out.sample("export_request_duration_seconds_count", labels, cumulative);
    }
  }

  // Remote storage, whatever the exports: the counters are process-wide.
  struct Remote {
    std::string_view name;
    std::atomic<uint64_t> backends::RemoteCounters::*value;
    std::string_view help;
  };
  const Remote remote_counters[] = {
      {"remote_requests_total", &backends::RemoteCounters::requests,
       "HTTP requests sent to remote storage, each attempt of a retry counted."},
      {"remote_retries_total", &backends::RemoteCounters::retries,
       "HTTP requests that were retries of a failed attempt."},
      {"remote_errors_total", &backends::RemoteCounters::errors,
       "HTTP requests that got no response or an error status (400 and above)."},
      {"remote_bytes_fetched_total", &backends::RemoteCounters::bytes_fetched,
       "Response body bytes received from remote storage."},
      {"remote_bytes_sent_total", &backends::RemoteCounters::bytes_sent,
       "Request body bytes sent to remote storage."},
  };
  for (const auto& r : remote_counters) {
    out.family(r.name, "counter", r.help);
    for (std::size_t k = 0; k < backends::remote_kind_count; ++k) {
      const auto kind = static_cast<backends::RemoteKind>(k);
      out.sample(r.name, fmt::format("backend=\"{}\"", backends::remote_kind_name(kind)),
                 load(backends::remote_counters(kind).*r.value));
    }
  }

  // The persistent caches (--cache), summed over every cache in the process.
  struct Cache {
    std::string_view name;
    std::atomic<uint64_t> backends::CacheCounters::*value;
    std::string_view help;
  };
  const Cache cache_counters[] = {
      {"cache_hits_total", &backends::CacheCounters::hits,
       "Chunks reads found in the local cache."},
      {"cache_misses_total", &backends::CacheCounters::misses,
       "Chunks reads had to wait for from remote storage (remote waits)."},
      {"cache_evictions_total", &backends::CacheCounters::evictions,
       "Chunks evicted from the local cache to keep it under its size cap."},
      {"cache_bytes_fetched_total", &backends::CacheCounters::bytes_fetched,
       "Bytes the caches fetched from remote storage, prefetches included."},
  };
  for (const auto& c : cache_counters) {
    out.family(c.name, "counter", c.help);
    out.sample(c.name, "", load(backends::cache_counters().*c.value));
  }
  return out.take();
}

}  // namespace imagenbd::server
