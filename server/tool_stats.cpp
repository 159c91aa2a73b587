// `imagenbd stats`: see tool_stats.hpp. One keep-alive HTTP/1.1 connection to the admin
// endpoint (Beast over a Unix or TCP socket), 10 s for everything; the server filters by
// export (?export=NAME), so an unknown name is the server's 404.
#include "server/tool_stats.hpp"

#include <getopt.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <stdexcept>

#include <fmt/format.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "server/admin.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using generic = asio::generic::stream_protocol;

constexpr auto deadline = std::chrono::seconds(10);

const char* stats_help() {
  return R"(Usage: imagenbd stats --admin=ADDR [--json | --prometheus] [EXPORT]...

Show a running server's connections, requests, bytes, errors and latencies, read from
its admin endpoint (imagenbd serve --admin=ADDR, or [admin] listen in the config file).
With EXPORT names, only those exports ("" is the default export); an unknown name is an
error.

The table has one block per export: its format and mode, open connections (and all
since the start, and those refused), requests in flight, the size; then per command that was used: requests,
payload bytes, and the 50th and 99th percentile latency estimated from the histogram
("<100 us" inside the first bucket, ">2.5 s" beyond the last); then the errors by NBD
errno.

Options:
  -a, --admin=ADDR   the admin endpoint: unix:PATH, 127.0.0.1:PORT or [::1]:PORT
      --json         print the server's /exports document: {"exports": [{"name",
                     "description", "image", "format", "size", "read_only",
                     "connections", "connections_total", "connections_refused",
                     "in_flight", "access": {"allow", "allow_identities",
                     "max_connections"}}]}
      --prometheus   print the server's /metrics text (Prometheus format)
  -h, --help         this text

Exit status: 0 on success, 1 when the server cannot be reached or answers an error,
2 on usage errors.
)";
}

// RFC 3986 percent-encoding of a query value.
std::string encode_query_value(std::string_view text) {
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("%{:02X}", c);
    }
  }
  return out;
}

// The message of a {"error": "..."} answer, or the body as it is.
std::string error_message(const std::string& body) {
  const std::string key = "{\"error\":\"";
  if (!body.starts_with(key)) return body;
  std::string out;
  for (std::size_t i = key.size(); i < body.size() && body[i] != '"'; ++i) {
    if (body[i] == '\\' && i + 1 < body.size()) {
      ++i;
      out += body[i] == 'n' ? '\n' : body[i];
    } else {
      out += body[i];
    }
  }
  return out;
}

struct Answer {
  unsigned status = 0;
  std::string body;
};

class AdminClient {
 public:
  AdminClient(asio::io_context& context, AdminAddress where)
      : where_(std::move(where)), socket_(context), timer_(context) {}

  asio::awaitable<void> connect() {
    // The whole conversation has one deadline: a server that stops answering is given up.
    timer_.expires_after(deadline);
    timer_.async_wait([this](boost::system::error_code ec) {
      if (ec) return;
      timed_out_ = true;
      socket_.close(ec);
    });
    const generic::endpoint endpoint =
        where_.is_unix() ? generic::endpoint(asio::local::stream_protocol::endpoint(where_.path))
                         : generic::endpoint(asio::ip::tcp::endpoint(where_.address, where_.port));
    try {
      co_await socket_.async_connect(endpoint, asio::use_awaitable);
    } catch (const boost::system::system_error& e) {
      throw std::runtime_error(fmt::format(
          "cannot connect to the admin endpoint {}: {} (is the server running with --admin={}?)",
          where_.to_string(), timed_out_ ? "timed out" : e.code().message(), where_.to_string()));
    }
  }

  asio::awaitable<Answer> get(std::string target) {
    http::request<http::empty_body> request(http::verb::get, target, 11);
    request.set(http::field::host, where_.is_unix() ? "localhost" : where_.to_string());
    request.set(http::field::user_agent, "imagenbd-stats");
    http::response_parser<http::string_body> parser;
    parser.body_limit(256u << 20);
    try {
      co_await http::async_write(socket_, request, asio::use_awaitable);
      co_await http::async_read(socket_, buffer_, parser, asio::use_awaitable);
    } catch (const boost::system::system_error& e) {
      throw std::runtime_error(
          fmt::format("admin endpoint {}: GET {}: {}", where_.to_string(), target,
                      timed_out_ ? "no answer within 10 s" : e.code().message()));
    }
    co_return Answer{parser.get().result_int(), std::move(parser.get().body())};
  }

  void close() {
    boost::system::error_code ignored;
    timer_.cancel();
    socket_.close(ignored);
  }

 private:
  AdminAddress where_;
  generic::socket socket_;
  asio::steady_timer timer_;
  beast::flat_buffer buffer_;
  bool timed_out_ = false;
};

enum class Output { table, json, prometheus };

asio::awaitable<std::string> fetch(asio::io_context& context, AdminAddress where, Output output,
                                   std::vector<std::string> exports) {
  AdminClient client(context, where);
  co_await client.connect();
  std::string query;
  for (const auto& name : exports) {
    query += (query.empty() ? "?" : "&") + ("export=" + encode_query_value(name));
  }
  const std::string target = (output == Output::json ? "/exports" : "/metrics") + query;
  const Answer answer = co_await client.get(target);
  client.close();
  if (answer.status != 200) {
    throw std::runtime_error(fmt::format("admin endpoint {}: GET {}: {} {}", where.to_string(),
                                         target, answer.status, error_message(answer.body)));
  }
  co_return output == Output::table ? stats_table(answer.body) : answer.body;
}

// "%.3g" without trailing zeros, in a unit that keeps it readable.
std::string format_seconds(double seconds) {
  if (seconds < 1e-3) return fmt::format("{:.3g} us", seconds * 1e6);
  if (seconds < 1) return fmt::format("{:.3g} ms", seconds * 1e3);
  return fmt::format("{:.3g} s", seconds);
}

std::string parse_label_value(std::string_view& text) {
  std::string out;
  while (!text.empty() && text.front() != '"') {
    if (text.front() == '\\' && text.size() > 1) {
      text.remove_prefix(1);
      out += text.front() == 'n' ? '\n' : text.front();
    } else {
      out += text.front();
    }
    text.remove_prefix(1);
  }
  if (!text.empty()) text.remove_prefix(1);  // the closing quote
  return out;
}

}  // namespace

const std::string* PrometheusSample::label(std::string_view key) const {
  for (const auto& [k, v] : labels) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::vector<PrometheusSample> parse_prometheus(std::string_view text) {
  std::vector<PrometheusSample> out;
  while (!text.empty()) {
    const auto newline = text.find('\n');
    std::string_view line = text.substr(0, newline);
    text.remove_prefix(newline == std::string_view::npos ? text.size() : newline + 1);
    if (line.empty() || line.front() == '#') continue;
    PrometheusSample s;
    const auto name_end = line.find_first_of("{ ");
    if (name_end == std::string_view::npos) continue;
    s.name = line.substr(0, name_end);
    line.remove_prefix(name_end);
    bool ok = true;
    if (line.front() == '{') {
      line.remove_prefix(1);
      while (!line.empty() && line.front() != '}') {
        const auto eq = line.find("=\"");
        if (eq == std::string_view::npos) {
          ok = false;
          break;
        }
        std::string key(line.substr(0, eq));
        line.remove_prefix(eq + 2);
        std::string value = parse_label_value(line);
        s.labels.emplace_back(std::move(key), std::move(value));
        if (!line.empty() && line.front() == ',') line.remove_prefix(1);
      }
      if (line.empty()) ok = false;
      if (ok) line.remove_prefix(1);  // }
    }
    while (!line.empty() && line.front() == ' ') line.remove_prefix(1);
    const std::string value(line.substr(0, line.find(' ')));  // a timestamp may follow
    if (!ok || value.empty()) continue;
    if (value == "+Inf") {
      s.value = std::numeric_limits<double>::infinity();
    } else {
      char* end = nullptr;
      s.value = std::strtod(value.c_str(), &end);
      if (end != value.c_str() + value.size()) continue;
    }
    out.push_back(std::move(s));
  }
  return out;
}

std::optional<double> histogram_quantile(double q,
                                         const std::vector<std::pair<double, double>>& buckets,
                                         bool* beyond) {
  if (beyond) *beyond = false;
  if (buckets.empty()) return std::nullopt;
  const double total = buckets.back().second;
  if (total <= 0) return std::nullopt;
  const double rank = q * total;
  double lower = 0;
  double below = 0;
  for (std::size_t i = 0; i < buckets.size(); ++i) {
    const auto [upper, cumulative] = buckets[i];
    if (cumulative >= rank && cumulative > below) {
      if (std::isinf(upper)) {
        if (beyond) *beyond = true;
        return lower;  // the last finite bound: all we know is "more than this"
      }
      return lower + (upper - lower) * (rank - below) / (cumulative - below);
    }
    lower = upper;
    below = cumulative;
  }
  return lower;
}

std::string stats_table(std::string_view metrics_text) {
  const std::vector<PrometheusSample> samples = parse_prometheus(metrics_text);
  struct CommandStats {
    double requests = 0;
    double bytes = 0;
    std::vector<std::pair<double, double>> buckets;
  };
  struct ExportStats {
    double connections = 0, connections_total = 0, refused = 0, in_flight = 0, size = 0;
    std::string kind;                              // "raw, read-write", from imagenbd_export_info
    std::map<std::string, CommandStats> commands;  // by command label
    std::vector<std::pair<std::string, double>> errors;
  };
  std::vector<std::string> order;  // as the server lists them
  std::map<std::string, ExportStats> exports;
  for (const auto& s : samples) {
    const std::string* name = s.label("export");
    if (!name) continue;
    if (!exports.contains(*name)) order.push_back(*name);
    ExportStats& e = exports[*name];
    const std::string* command = s.label("command");
    if (s.name == "imagenbd_export_connections") e.connections = s.value;
    if (s.name == "imagenbd_export_connections_total") e.connections_total = s.value;
    if (s.name == "imagenbd_export_connections_refused_total") e.refused = s.value;
    if (s.name == "imagenbd_export_in_flight") e.in_flight = s.value;
    if (s.name == "imagenbd_export_size_bytes") e.size = s.value;
    if (s.name == "imagenbd_export_info" && s.label("format") && s.label("read_only")) {
      e.kind = fmt::format(" ({}, {})", *s.label("format"),
                           *s.label("read_only") == "true" ? "read-only" : "read-write");
    }
    if (s.name == "imagenbd_export_errors_total" && s.label("errno") && s.value > 0) {
      e.errors.emplace_back(*s.label("errno"), s.value);
    }
    if (!command) continue;
    if (s.name == "imagenbd_export_requests_total") e.commands[*command].requests = s.value;
    if (s.name == "imagenbd_export_bytes_total") e.commands[*command].bytes = s.value;
    if (s.name == "imagenbd_export_request_duration_seconds_bucket" && s.label("le")) {
      const std::string& le = *s.label("le");
      const double bound =
          le == "+Inf" ? std::numeric_limits<double>::infinity() : std::strtod(le.c_str(), nullptr);
      e.commands[*command].buckets.emplace_back(bound, s.value);
    }
  }

  // Counts travel as doubles in the text format; print them as the integers they are.
  const auto count = [](double value) { return static_cast<uint64_t>(std::max(value, 0.0)); };
  // Commands in protocol order, not alphabetical.
  static constexpr std::string_view command_order[] = {
      "read", "write", "flush", "trim", "write_zeroes", "cache", "block_status", "disc"};
  const auto latency = [](const CommandStats& c, double q) -> std::string {
    bool beyond = false;
    const auto value = histogram_quantile(q, c.buckets, &beyond);
    if (!value) return "-";
    // Inside the first bucket the estimate says nothing but "at most its bound".
    if (*value <= c.buckets.front().first) return "<" + format_seconds(c.buckets.front().first);
    return (beyond ? ">" : "") + format_seconds(*value);
  };
  std::string out;
  for (const auto& name : order) {
    const ExportStats& e = exports[name];
    fmt::format_to(std::back_inserter(out),
                   "export '{}'{}: {} connection(s) open ({} since start, {} refused), {} in "
                   "flight, {} ({} bytes)\n",
                   name, e.kind, count(e.connections), count(e.connections_total), count(e.refused),
                   count(e.in_flight), human_size(count(e.size)), count(e.size));
    fmt::format_to(std::back_inserter(out), "  {:<14} {:>10} {:>14} {:>10} {:>10}\n", "COMMAND",
                   "REQUESTS", "BYTES", "P50", "P99");
    bool any = false;
    for (const auto command : command_order) {
      const auto it = e.commands.find(std::string(command));
      if (it == e.commands.end() || it->second.requests <= 0) continue;
      const CommandStats& c = it->second;
      const bool moves_data = command == "read" || command == "write";
      fmt::format_to(std::back_inserter(out), "  {:<14} {:>10} {:>14} {:>10} {:>10}\n", command,
                     count(c.requests), moves_data ? fmt::format("{}", count(c.bytes)) : "-",
                     latency(c, 0.5), latency(c, 0.99));
      any = true;
    }
    if (!any) out += "  (no requests yet)\n";
    std::string errors;
    for (const auto& [errno_name, n] : e.errors) {
      errors += fmt::format("{}{} {}", errors.empty() ? "" : ", ", errno_name, count(n));
    }
    out += "  errors: " + (errors.empty() ? std::string("none") : errors) + "\n";
  }
  if (order.empty()) out = "no exports\n";
  return out;
}

int tool_stats(int argc, char** argv) {
  enum : int { opt_json = 1000, opt_prometheus };
  static const option long_options[] = {
      {"admin", required_argument, nullptr, 'a'},
      {"json", no_argument, nullptr, opt_json},
      {"prometheus", no_argument, nullptr, opt_prometheus},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0},
  };
  auto usage = [](const std::string& message) { return usage_error("stats", message, 2); };
  std::string admin;
  Output output = Output::table;
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "a:h", long_options, nullptr)) != -1) {
    switch (c) {
      case 'a':
        admin = optarg;
        break;
      case opt_json:
      case opt_prometheus: {
        const Output wanted = c == opt_json ? Output::json : Output::prometheus;
        if (output != Output::table && output != wanted) {
          return usage("--json and --prometheus exclude each other");
        }
        output = wanted;
        break;
      }
      case 'h':
        std::fputs(stats_help(), stdout);
        return 0;
      default:
        return usage(fmt::format("unknown or incomplete option '{}'", argv[optind - 1]));
    }
  }
  if (admin.empty()) return usage("--admin=ADDR is required (the server's --admin address)");
  AdminAddress where;
  try {
    where = parse_admin_address(admin);
  } catch (const std::invalid_argument& e) {
    return usage(e.what());
  }
  std::vector<std::string> exports(argv + optind, argv + argc);
  try {
    asio::io_context context;
    std::exception_ptr error;
    std::string text;
    asio::co_spawn(context, fetch(context, where, output, exports),
                   [&](std::exception_ptr ep, std::string result) {
                     error = ep;
                     text = std::move(result);
                   });
    context.run();
    if (error) std::rethrow_exception(error);
    std::fputs(text.c_str(), stdout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd stats: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace imagenbd::server
