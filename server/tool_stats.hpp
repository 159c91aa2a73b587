// `imagenbd stats`: asks a running server's admin endpoint for its metrics and exports and
// prints them for people (a table) or tools (--json, --prometheus). The text parsing and
// the table are pure functions, tested without a server.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace imagenbd::server {

int tool_stats(int argc, char** argv);

// One sample line of the Prometheus text format: name{labels} value.
struct PrometheusSample {
  std::string name;
  std::vector<std::pair<std::string, std::string>> labels;  // unescaped values
  double value = 0;
  // The value of a label, or nullptr.
  const std::string* label(std::string_view key) const;
};

// The samples of an exposition; comments, blank and malformed lines are skipped.
std::vector<PrometheusSample> parse_prometheus(std::string_view text);

// The q-quantile (0..1) of a histogram given as (upper bound, cumulative count) pairs in
// order, the last bound being +Inf, interpolated linearly inside a bucket as Prometheus's
// histogram_quantile() does. nullopt without observations; the last finite bound when the
// quantile lies in the +Inf bucket (`beyond` is then set).
std::optional<double> histogram_quantile(double q,
                                         const std::vector<std::pair<double, double>>& buckets,
                                         bool* beyond = nullptr);

// The table `imagenbd stats` prints from a /metrics text: per export its connections,
// in-flight requests and size, then per command with requests its count, bytes and
// p50/p99 latency, then its errors by errno.
std::string stats_table(std::string_view metrics_text);

}  // namespace imagenbd::server
