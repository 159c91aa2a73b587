// render_prometheus: the text exposition format (HELP/TYPE once per family, escaped label
// values, cumulative histogram buckets with +Inf, _sum and _count) and the counters behind
// it; the stats tool's parser and quantile estimate read it back.
#include "server/metrics.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "backends/memory.hpp"
#include "backends/remote_metrics.hpp"
#include "server/exports.hpp"
#include "server/tool_stats.hpp"

using imagenbd::protocol::Cmd;
using imagenbd::protocol::Errno;
using namespace imagenbd::server;
using namespace std::chrono_literals;

namespace {

std::shared_ptr<Export> make_export(std::string name, uint64_t size = 1 << 20) {
  auto e = std::make_shared<Export>();
  e->name = std::move(name);
  e->device = imagenbd::backends::open_memory(size);
  e->leaf = e->device;
  return e;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

bool has_line(const std::string& text, const std::string& line) {
  for (const auto& l : lines_of(text)) {
    if (l == line) return true;
  }
  return false;
}

}  // namespace

TEST_CASE("label values escape backslash, double quote and newline") {
  CHECK(escape_label_value("plain") == "plain");
  CHECK(escape_label_value("a\\b") == "a\\\\b");
  CHECK(escape_label_value("say \"hi\"") == "say \\\"hi\\\"");
  CHECK(escape_label_value("two\nlines") == "two\\nlines");
  CHECK(escape_label_value("") == "");
}

TEST_CASE("command and errno labels follow the protocol values") {
  CHECK(command_label(static_cast<std::size_t>(Cmd::read)) == "read");
  CHECK(command_label(static_cast<std::size_t>(Cmd::write)) == "write");
  CHECK(command_label(static_cast<std::size_t>(Cmd::disc)) == "disc");
  CHECK(command_label(static_cast<std::size_t>(Cmd::write_zeroes)) == "write_zeroes");
  CHECK(command_label(static_cast<std::size_t>(Cmd::block_status)) == "block_status");
  CHECK(errno_label(0) == "EPERM");
  CHECK(errno_label(3) == "EINVAL");
  CHECK(errno_label(counted_errnos.size()) == "other");
}

TEST_CASE("every family has one HELP and one TYPE line, before its samples") {
  ExportRegistry registry;
  registry.add(make_export("a"));
  registry.add(make_export("b"));
  ServerMetrics server;
  const std::string text = render_prometheus(server, registry);
  std::map<std::string, std::string> types;
  std::set<std::string> helps;
  for (const auto& line : lines_of(text)) {
    REQUIRE_FALSE(line.empty());
    if (line.starts_with("# HELP ")) {
      const std::string name = line.substr(7, line.find(' ', 7) - 7);
      CHECK_MESSAGE(helps.insert(name).second, "two HELP lines for ", name);
      continue;
    }
    if (line.starts_with("# TYPE ")) {
      std::istringstream in(line.substr(7));
      std::string name, type;
      in >> name >> type;
      CHECK_MESSAGE(types.emplace(name, type).second, "two TYPE lines for ", name);
      CHECK(helps.contains(name));
      continue;
    }
    // A sample: its family (the name, less a histogram suffix) was declared before.
    std::string name = line.substr(0, line.find_first_of("{ "));
    if (!types.contains(name)) {
      for (const char* suffix : {"_bucket", "_sum", "_count"}) {
        if (name.ends_with(suffix)) name.resize(name.size() - std::strlen(suffix));
      }
    }
    CHECK_MESSAGE(types.contains(name), "sample before its TYPE: ", line);
    CHECK(name.starts_with("imagenbd_"));
  }
  CHECK(types["imagenbd_connections"] == "gauge");
  CHECK(types["imagenbd_connections_accepted_total"] == "counter");
  CHECK(types["imagenbd_exports"] == "gauge");
  CHECK(types["imagenbd_export_requests_total"] == "counter");
  CHECK(types["imagenbd_export_in_flight"] == "gauge");
  CHECK(types["imagenbd_export_request_duration_seconds"] == "histogram");
  CHECK(types["imagenbd_remote_requests_total"] == "counter");
  CHECK(has_line(text, "imagenbd_exports 2"));
  CHECK(has_line(text, "imagenbd_export_size_bytes{export=\"b\"} 1048576"));
  CHECK(
      has_line(text, "imagenbd_export_info{export=\"b\",format=\"memory\",read_only=\"false\"} 1"));
  CHECK(text.find("imagenbd_build_info{version=\"") != std::string::npos);
}

TEST_CASE("server counters are rendered as they stand") {
  ExportRegistry registry;
  ServerMetrics server;
  server.connections = 3;
  server.connections_total = 10;
  server.connections_refused = 2;
  server.handshake_timeouts = 1;
  server.reloads = 4;
  server.reload_failures = 1;
  const std::string text = render_prometheus(server, registry);
  CHECK(has_line(text, "imagenbd_connections 3"));
  CHECK(has_line(text, "imagenbd_connections_accepted_total 10"));
  CHECK(has_line(text, "imagenbd_connections_refused_total 2"));
  CHECK(has_line(text, "imagenbd_handshake_timeouts_total 1"));
  CHECK(has_line(text, "imagenbd_handshake_failures_total 0"));
  CHECK(has_line(text, "imagenbd_reloads_total 4"));
  CHECK(has_line(text, "imagenbd_reload_failures_total 1"));
  CHECK(has_line(text, "imagenbd_exports 0"));
}

TEST_CASE("export counters: requests, bytes, errors, connections") {
  ExportRegistry registry;
  auto e = make_export("disk");
  registry.add(e);
  ExportMetrics& m = *e->metrics;
  m.connection_opened();
  m.connection_opened();
  m.connection_closed();
  for (int i = 0; i < 3; ++i) {
    m.request_started();
    m.request_finished(Cmd::write, 65536, Errno::ok, 1ms);
  }
  m.request_started();
  m.request_finished(Cmd::read, 0, Errno::io, 1ms);  // a failed read moved nothing
  m.request_refused(Cmd::read, Errno::inval);
  m.request_refused(Cmd::trim, Errno::perm);
  m.request_started();  // one still in flight
  const std::string text = render_prometheus(ServerMetrics{}, registry);
  CHECK(has_line(text, "imagenbd_export_connections{export=\"disk\"} 1"));
  CHECK(has_line(text, "imagenbd_export_connections_total{export=\"disk\"} 2"));
  CHECK(has_line(text, "imagenbd_export_in_flight{export=\"disk\"} 1"));
  CHECK(has_line(text, "imagenbd_export_requests_total{export=\"disk\",command=\"write\"} 3"));
  CHECK(has_line(text, "imagenbd_export_requests_total{export=\"disk\",command=\"read\"} 2"));
  CHECK(has_line(text, "imagenbd_export_requests_total{export=\"disk\",command=\"trim\"} 1"));
  CHECK(has_line(text, "imagenbd_export_requests_total{export=\"disk\",command=\"flush\"} 0"));
  CHECK(has_line(text, "imagenbd_export_bytes_total{export=\"disk\",command=\"write\"} 196608"));
  CHECK(has_line(text, "imagenbd_export_bytes_total{export=\"disk\",command=\"read\"} 0"));
  CHECK(has_line(text, "imagenbd_export_errors_total{export=\"disk\",errno=\"EINVAL\"} 1"));
  CHECK(has_line(text, "imagenbd_export_errors_total{export=\"disk\",errno=\"EIO\"} 1"));
  CHECK(has_line(text, "imagenbd_export_errors_total{export=\"disk\",errno=\"EPERM\"} 1"));
  CHECK(has_line(text, "imagenbd_export_errors_total{export=\"disk\",errno=\"other\"} 0"));
  // bytes_total exists for read and write only.
  CHECK(text.find("imagenbd_export_bytes_total{export=\"disk\",command=\"trim\"}") ==
        std::string::npos);
}

TEST_CASE("an errno outside the counted ones counts as other") {
  ExportMetrics m;
  m.request_refused(Cmd::read, static_cast<Errno>(999));
  CHECK(m.errors[counted_errnos.size()].load() == 1);
}

TEST_CASE("histogram buckets are cumulative and end with +Inf, _sum and _count") {
  ExportRegistry registry;
  auto e = make_export("disk");
  registry.add(e);
  ExportMetrics& m = *e->metrics;
  for (auto latency : {std::chrono::nanoseconds(300us), std::chrono::nanoseconds(300us),
                       std::chrono::nanoseconds(3ms), std::chrono::nanoseconds(5s)}) {
    m.request_started();
    m.request_finished(Cmd::read, 4096, Errno::ok, latency);
  }
  const std::string text = render_prometheus(ServerMetrics{}, registry);
  const std::string p = "imagenbd_export_request_duration_seconds";
  const std::string l = "{export=\"disk\",command=\"read\"";
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"0.0001\"} 0"));
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"0.00025\"} 0"));
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"0.0005\"} 2"));
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"0.001\"} 2"));
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"0.0025\"} 2"));
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"0.005\"} 3"));
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"2.5\"} 3"));
  CHECK(has_line(text, p + "_bucket" + l + ",le=\"+Inf\"} 4"));
  CHECK(has_line(text, p + "_count" + l + "} 4"));
  CHECK(has_line(text, p + "_count{export=\"disk\",command=\"write\"} 0"));
  // disc is never timed: no histogram for it.
  CHECK(text.find(p + "_count{export=\"disk\",command=\"disc\"}") == std::string::npos);

  // _sum in seconds: 0.0003 + 0.0003 + 0.003 + 5.
  const auto samples = parse_prometheus(text);
  bool found = false;
  for (const auto& s : samples) {
    if (s.name == p + "_sum" && *s.label("command") == "read") {
      CHECK(s.value == doctest::Approx(5.0036));
      found = true;
    }
  }
  CHECK(found);
}

TEST_CASE("export names are escaped in labels") {
  ExportRegistry registry;
  registry.add(make_export("we\"ird\\name\nx"));
  const std::string text = render_prometheus(ServerMetrics{}, registry);
  CHECK(has_line(text, "imagenbd_export_connections{export=\"we\\\"ird\\\\name\\nx\"} 0"));
  // And the stats tool's parser reads the name back.
  bool found = false;
  for (const auto& s : parse_prometheus(text)) {
    if (s.name == "imagenbd_export_connections") {
      CHECK(*s.label("export") == "we\"ird\\name\nx");
      found = true;
    }
  }
  CHECK(found);
}

TEST_CASE("only the exports asked for are rendered, server lines always") {
  ExportRegistry registry;
  registry.add(make_export("a"));
  registry.add(make_export("b"));
  const std::vector<std::string> only = {"b"};
  const std::string text = render_prometheus(ServerMetrics{}, registry, only);
  CHECK(text.find("export=\"a\"") == std::string::npos);
  CHECK(has_line(text, "imagenbd_export_connections{export=\"b\"} 0"));
  CHECK(has_line(text, "imagenbd_exports 2"));
}

TEST_CASE("remote counters are rendered per backend and count attempts") {
  using imagenbd::backends::RemoteKind;
  auto& azure = imagenbd::backends::remote_counters(RemoteKind::azure);
  const uint64_t requests = azure.requests, retries = azure.retries, errors = azure.errors;
  const uint64_t fetched = azure.bytes_fetched, sent = azure.bytes_sent;
  azure.attempted(false, 512, 201, 0);
  azure.attempted(false, 0, 503, 100);
  azure.attempted(true, 0, 206, 4096);
  azure.attempted(true, 0, 0, 0);  // no response
  CHECK(azure.requests == requests + 4);
  CHECK(azure.retries == retries + 2);
  CHECK(azure.errors == errors + 2);
  CHECK(azure.bytes_fetched == fetched + 4196);
  CHECK(azure.bytes_sent == sent + 512);
  ExportRegistry registry;
  const std::string text = render_prometheus(ServerMetrics{}, registry);
  CHECK(has_line(text, "imagenbd_remote_requests_total{backend=\"azure\"} " +
                           std::to_string(azure.requests.load())));
  CHECK(has_line(text, "imagenbd_remote_retries_total{backend=\"azure\"} " +
                           std::to_string(azure.retries.load())));
  CHECK(has_line(text, "imagenbd_remote_bytes_sent_total{backend=\"azure\"} " +
                           std::to_string(azure.bytes_sent.load())));
}

TEST_CASE("parse_prometheus reads names, labels and values and skips comments") {
  const auto samples = parse_prometheus(
      "# HELP x y\n# TYPE x counter\nx 3\ny{a=\"1\",b=\"q\\\"\"} 2.5\n\nz{le=\"+Inf\"} +Inf\n"
      "broken{a=\"1\" 4\nw 7 1700000000\n");
  REQUIRE(samples.size() == 4);
  CHECK(samples[0].name == "x");
  CHECK(samples[0].value == 3);
  CHECK(samples[1].name == "y");
  CHECK(*samples[1].label("a") == "1");
  CHECK(*samples[1].label("b") == "q\"");
  CHECK(samples[1].value == 2.5);
  CHECK(samples[1].label("c") == nullptr);
  CHECK(std::isinf(samples[2].value));
  CHECK(samples[3].name == "w");
  CHECK(samples[3].value == 7);
}

TEST_CASE("histogram_quantile interpolates inside the bucket, like Prometheus") {
  const double inf = std::numeric_limits<double>::infinity();
  // 10 observations: 4 <= 0.001, 6 more <= 0.01.
  const std::vector<std::pair<double, double>> b = {{0.001, 4}, {0.01, 10}, {inf, 10}};
  CHECK(*histogram_quantile(0.2, b) == doctest::Approx(0.0005));
  CHECK(*histogram_quantile(0.5, b) == doctest::Approx(0.001 + 0.009 * (1.0 / 6)));
  CHECK(*histogram_quantile(1.0, b) == doctest::Approx(0.01));
  bool beyond = true;
  CHECK(histogram_quantile(0.5, {{0.001, 0}, {inf, 0}}, &beyond) == std::nullopt);
  // Everything in +Inf: all we know is "more than the last bound".
  CHECK(*histogram_quantile(0.99, {{0.001, 0}, {2.5, 1}, {inf, 100}}, &beyond) == 2.5);
  CHECK(beyond);
  CHECK(*histogram_quantile(0.005, {{0.001, 0}, {2.5, 1}, {inf, 100}}, &beyond) ==
        doctest::Approx(0.001 + 2.499 * 0.5));
  CHECK_FALSE(beyond);
}

TEST_CASE("the stats table shows each export's connections, commands, latency and errors") {
  ExportRegistry registry;
  auto e = make_export("disk");
  registry.add(e);
  registry.add(make_export("idle", 4096));
  ExportMetrics& m = *e->metrics;
  m.connection_opened();
  for (int i = 0; i < 3; ++i) {
    m.request_started();
    m.request_finished(Cmd::write, 65536, Errno::ok, 300us);
  }
  m.request_refused(Cmd::read, Errno::inval);
  const std::string table = stats_table(render_prometheus(ServerMetrics{}, registry));
  INFO(table);
  CHECK(table.find("export 'disk' (memory, read-write): 1 connection(s) open (1 since start, 0 "
                   "refused), 0 in "
                   "flight, 1 MiB (1048576 bytes)") != std::string::npos);
  CHECK(table.find("COMMAND") != std::string::npos);
  // write: 3 requests, 196608 bytes, all in (0.00025, 0.0005]: p50 at the middle.
  const auto write = table.find("  write ");
  REQUIRE(write != std::string::npos);
  const std::string row = table.substr(write, table.find('\n', write) - write);
  CHECK(row.find(" 3 ") != std::string::npos);
  CHECK(row.find("196608") != std::string::npos);
  CHECK(row.find("375 us") != std::string::npos);
  // read: refused only, so no latency.
  CHECK(table.find("  read ") != std::string::npos);
  CHECK(table.find("errors: EINVAL 1") != std::string::npos);
  CHECK(table.find("export 'idle'") != std::string::npos);
  CHECK(table.find("(no requests yet)") != std::string::npos);
  CHECK(table.find("errors: none") != std::string::npos);
  CHECK(stats_table("") == "no exports\n");
}
