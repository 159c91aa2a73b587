// The configuration file: TOML read with tomlplusplus, every key checked (unknown keys and
// wrong types are errors naming file:line, with a "did you mean" for near misses), values
// checked by the command line's own parsers, paths resolved against the file's directory,
// then merged under the command line (see config.hpp). `imagenbd check-config` is in
// tool_check_config.cpp, reloading in reload.cpp.
#include "server/config.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <vector>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "server/admin.hpp"

namespace imagenbd::server {

namespace {

namespace fs = std::filesystem;

struct Context {
  std::string file;  // as given: messages name it so
  fs::path dir;      // absolute: relative paths in the file start here
};

std::string_view type_name(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a floating-point number";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::table:
      return "a table";
    default:
      return "a date or time";
  }
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// " (did you mean 'read-only'?)" for a near miss, else the list of known keys.
std::string key_hint(std::string_view key, std::span<const std::string_view> known) {
  std::string_view best;
  std::size_t best_distance = SIZE_MAX;
  for (auto k : known) {
    const std::size_t d = edit_distance(key, k);
    if (d < best_distance) best_distance = d, best = k;
  }
  if (best_distance <= std::max<std::size_t>(2, key.size() / 3)) {
    return fmt::format(" (did you mean '{}'?)", best);
  }
  return fmt::format(" (known: {})", fmt::join(known, ", "));
}

// One table of the file ([server], one [[export]], ...): typed getters that fail with the
// file, the line and the key.
class Section {
 public:
  Section(const Context& ctx, const toml::table& table, std::string scope,
          std::span<const std::string_view> known)
      : ctx_(ctx), table_(table), scope_(std::move(scope)) {
    for (auto&& [key, node] : table) {
      if (std::find(known.begin(), known.end(), key.str()) != known.end()) continue;
      fail_at(key.source(),
              fmt::format("unknown key '{}'{}", key.str(), key_hint(key.str(), known)));
    }
  }

  const toml::node* get(std::string_view key) const { return table_.get(key); }

  [[noreturn]] void fail_at(const toml::source_region& where, std::string_view message) const {
    throw ConfigError(fmt::format("{}:{}: {}: {}", ctx_.file, where.begin.line, scope_, message));
  }
  [[noreturn]] void fail(const toml::node& node, std::string_view key,
                         std::string_view message) const {
    fail_at(node.source(), fmt::format("{}: {}", key, message));
  }
  [[noreturn]] void fail_here(std::string_view message) const { fail_at(table_.source(), message); }
  [[noreturn]] void wrong_type(const toml::node& node, std::string_view key,
                               std::string_view wanted) const {
    fail(node, key, fmt::format("expected {}, not {}", wanted, type_name(node)));
  }

  std::optional<std::string> string(std::string_view key) const {
    const toml::node* node = get(key);
    if (!node) return std::nullopt;
    if (!node->is_string()) wrong_type(*node, key, "a string (in quotes)");
    return node->as_string()->get();
  }
  std::optional<bool> boolean(std::string_view key) const {
    const toml::node* node = get(key);
    if (!node) return std::nullopt;
    if (!node->is_boolean()) wrong_type(*node, key, "a boolean (true or false, no quotes)");
    return node->as_boolean()->get();
  }
  std::optional<int64_t> integer(std::string_view key, int64_t low, int64_t high) const {
    const toml::node* node = get(key);
    if (!node) return std::nullopt;
    if (!node->is_integer()) wrong_type(*node, key, "an integer (no quotes)");
    const int64_t value = node->as_integer()->get();
    if (value < low || value > high) {
      fail(*node, key, fmt::format("{} is out of range (expected {} to {})", value, low, high));
    }
    return value;
  }
  // An array of strings; a single string is taken as an array of one.
  struct Item {
    std::string value;
    const toml::node* node;
  };
  std::optional<std::vector<Item>> strings(std::string_view key) const {
    const toml::node* node = get(key);
    if (!node) return std::nullopt;
    std::vector<Item> out;
    if (node->is_string()) {
      out.push_back({node->as_string()->get(), node});
      return out;
    }
    if (!node->is_array()) wrong_type(*node, key, "an array of strings ([\"...\", \"...\"])");
    for (const toml::node& item : *node->as_array()) {
      if (!item.is_string()) wrong_type(item, key, "an array of strings, with every item a string");
      out.push_back({item.as_string()->get(), &item});
    }
    return out;
  }

 private:
  const Context& ctx_;
  const toml::table& table_;
  std::string scope_;
};

// A path from the file: relative ones start at the file's directory.
std::string resolve(const Context& ctx, const std::string& path) {
  if (path.empty() || fs::path(path).is_absolute()) return path;
  return (ctx.dir / path).lexically_normal().string();
}

bool is_url(std::string_view image) {
  return image.find("://") != std::string_view::npos;
}

std::string resolve_image(const Context& ctx, const std::string& image) {
  if (image.starts_with("memory:") || is_url(image)) return image;
  if (image.starts_with("file:")) return "file:" + resolve(ctx, image.substr(5));
  return resolve(ctx, image);
}

constexpr std::string_view top_keys[] = {"server", "admin", "tls", "export"};
constexpr std::string_view server_keys[] = {
    "listen",       "threads",  "blocking-threads", "max-connections", "handshake-timeout",
    "idle-timeout", "pid-file", "log-level"};
constexpr std::string_view admin_keys[] = {"listen"};
constexpr std::string_view tls_keys[] = {"mode", "certificates", "psk-file", "verify-peer"};
constexpr std::string_view export_keys[] = {"name",
                                            "image",
                                            "description",
                                            "format",
                                            "read-only",
                                            "parent",
                                            "vhd-size",
                                            "snapshot",
                                            "force",
                                            "lease-duration",
                                            "retry-deadline",
                                            "credentials",
                                            "allow",
                                            "allow-identities",
                                            "max-connections",
                                            "overlay",
                                            "cache",
                                            "cache-size",
                                            "cache-chunk",
                                            "readahead",
                                            "boot-profile",
                                            "commit-to"};

// What the file says; nullopt: not set there.
struct FileSettings {
  std::optional<ListenSpec> listen;
  std::optional<unsigned> threads, blocking_threads, max_clients;
  std::optional<std::chrono::seconds> handshake_timeout, idle_timeout;
  std::optional<std::string> pid_file;
  std::optional<log::Settings> log;
  std::optional<std::string> admin;
  std::optional<TlsSettings> tls;
  std::vector<ExportSpec> exports;
  std::vector<std::string> export_places;  // "FILE:LINE" of each [[export]]
};

// "127.0.0.1:10809", "[::1]:10809", ":10809" or "*:10809" (every address), "unix:PATH".
ListenSpec parse_listen(const Context& ctx, const Section& s,
                        const std::vector<Section::Item>& items) {
  ListenSpec spec;
  spec.tcp = false;
  bool every_address = false;
  std::optional<uint16_t> port;
  for (const auto& [text, node] : items) {
    if (text.starts_with("unix:")) {
      if (text.size() == 5) s.fail(*node, "listen", "'unix:' needs a socket path");
      spec.unix_paths.push_back(resolve(ctx, text.substr(5)));
      continue;
    }
    std::string host, port_text;
    if (text.starts_with('[')) {
      const auto close = text.find("]:");
      if (close == std::string::npos) {
        s.fail(*node, "listen", "'" + text + "': an IPv6 address is written [ADDRESS]:PORT");
      }
      host = text.substr(1, close - 1);
      port_text = text.substr(close + 2);
    } else {
      const auto colon = text.rfind(':');
      if (colon == std::string::npos) {
        s.fail(
            *node, "listen",
            "'" + text + "' is not HOST:PORT, [IPv6]:PORT or unix:PATH (e.g. \"127.0.0.1:10809\")");
      }
      host = text.substr(0, colon);
      port_text = text.substr(colon + 1);
    }
    unsigned value = 0;
    auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), value);
    if (ec != std::errc{} || end != port_text.data() + port_text.size() || value == 0 ||
        value > 65535) {
      s.fail(*node, "listen", "'" + text + "': the port must be a number from 1 to 65535");
    }
    // One port for every TCP address: the listeners share ListenSpec::port.
    if (port && *port != value) {
      s.fail(*node, "listen",
             fmt::format("'{}': every TCP address must use the same port ({} here, {} before)",
                         text, value, *port));
    }
    port = static_cast<uint16_t>(value);
    spec.tcp = true;
    if (host.empty() || host == "*") {
      every_address = true;
    } else {
      spec.bind_addresses.push_back(host);
    }
  }
  if (port) spec.port = *port;
  if (every_address) spec.bind_addresses.clear();
  return spec;
}

void parse_server(const Context& ctx, const toml::table& table, FileSettings& out) {
  const Section s(ctx, table, "[server]", server_keys);
  if (auto items = s.strings("listen")) {
    if (items->empty())
      s.fail(*s.get("listen"), "listen", "is empty (leave it out for the default)");
    out.listen = parse_listen(ctx, s, *items);
  }
  if (auto v = s.integer("threads", 0, 1024)) out.threads = static_cast<unsigned>(*v);
  if (auto v = s.integer("blocking-threads", 0, 4096))
    out.blocking_threads = static_cast<unsigned>(*v);
  if (auto v = s.integer("max-connections", 0, 1 << 20))
    out.max_clients = static_cast<unsigned>(*v);
  // 0 would not mean "never": the deadline would pass at once and drop every client.
  if (auto v = s.integer("handshake-timeout", 1, 86400))
    out.handshake_timeout = std::chrono::seconds(*v);
  if (auto v = s.integer("idle-timeout", 0, 86400 * 7)) out.idle_timeout = std::chrono::seconds(*v);
  if (auto v = s.string("pid-file")) out.pid_file = resolve(ctx, *v);
  if (auto v = s.string("log-level")) {
    log::Settings settings;
    if (*v == "warning") {
      settings.level = log::Level::warning;
    } else if (*v == "debug") {
      settings.control_debug = true;
    } else if (*v == "trace") {
      settings.control_debug = settings.data_debug = true;
    } else if (*v != "info") {
      s.fail(*s.get("log-level"), "log-level",
             "'" + *v + "' is not a log level (known: warning, info, debug, trace)");
    }
    out.log = settings;
  }
}

void parse_admin(const Context& ctx, const toml::table& table, FileSettings& out) {
  const Section s(ctx, table, "[admin]", admin_keys);
  if (auto v = s.string("listen")) {
    out.admin = v->starts_with("unix:") ? "unix:" + resolve(ctx, v->substr(5)) : *v;
    // Checked here as the server checks it, so check-config does not pass a file that
    // serve refuses at start.
    AdminAddress where;
    try {
      where = parse_admin_address(*out.admin);
    } catch (const std::invalid_argument& e) {
      s.fail(*s.get("listen"), "listen", e.what());
    }
    if (!where.is_unix() && !where.address.is_loopback()) {
      s.fail(*s.get("listen"), "listen",
             "'" + *v +
                 "' is not a loopback address; the admin endpoint has no authentication "
                 "(use unix:PATH, 127.0.0.1:PORT or [::1]:PORT)");
    }
  }
}

void parse_tls(const Context& ctx, const toml::table& table, FileSettings& out) {
  const Section s(ctx, table, "[tls]", tls_keys);
  TlsSettings tls;
  const auto mode = s.string("mode");
  if (mode) {
    if (*mode == "off") {
      tls.mode = protocol::TlsMode::off;
    } else if (*mode == "on") {
      tls.mode = protocol::TlsMode::on;
    } else if (*mode == "require") {
      tls.mode = protocol::TlsMode::require;
    } else {
      s.fail(*s.get("mode"), "mode", "'" + *mode + "' is not a TLS mode (known: off, on, require)");
    }
  }
  tls.certificates_dir = resolve(ctx, s.string("certificates").value_or(""));
  tls.psk_file = resolve(ctx, s.string("psk-file").value_or(""));
  tls.verify_peer = s.boolean("verify-peer").value_or(false);
  // As on the command line: credentials alone turn TLS on.
  const bool credentials = !tls.certificates_dir.empty() || !tls.psk_file.empty();
  if (!mode && credentials) tls.mode = protocol::TlsMode::on;
  if (tls.mode != protocol::TlsMode::off) {
    if (!credentials) {
      s.fail_here("mode = \"" + *mode + "\" needs certificates = \"DIR\" or psk-file = \"FILE\"");
    }
    if (!tls.certificates_dir.empty() && !tls.psk_file.empty()) {
      s.fail_here("certificates and psk-file cannot be used together: choose one");
    }
  } else if (credentials || tls.verify_peer) {
    s.fail_here("mode = \"off\" cannot go with certificates, psk-file or verify-peer");
  }
  if (tls.verify_peer && tls.certificates_dir.empty()) {
    s.fail_here("verify-peer needs certificates = \"DIR\" (with DIR/ca-cert.pem)");
  }
  out.tls = tls;
}

ExportSpec parse_export(const Context& ctx, const toml::table& table, std::size_t number) {
  // Messages name the export when it has a name ("export 'disk': ...").
  std::string scope = fmt::format("export #{}", number);
  if (auto name = table["name"].value<std::string>()) scope = fmt::format("export '{}'", *name);
  const Section s(ctx, table, scope, export_keys);
  ExportSpec spec;
  const auto name = s.string("name");
  if (!name) s.fail_here("'name' is missing (every export needs one; \"\" is the default export)");
  spec.name = *name;
  if (spec.name.size() > 4096) s.fail(*s.get("name"), "name", "is longer than 4096 bytes");
  const auto image = s.string("image");
  if (!image || image->empty()) {
    s.fail_here("'image' is missing (a path, file:PATH, memory:SIZE or an Azure blob URI)");
  }
  spec.image = resolve_image(ctx, *image);
  if (spec.image.starts_with("memory:")) {
    try {
      parse_size(std::string_view(spec.image).substr(7));
    } catch (const std::invalid_argument& e) {
      s.fail(*s.get("image"), "image", e.what());
    }
  }
  spec.description = s.string("description").value_or("");
  if (auto format = s.string("format")) {
    try {
      spec.format = formats::parse_format(*format);
    } catch (const std::invalid_argument& e) {
      s.fail(*s.get("format"), "format", e.what());
    }
  }
  const bool read_only = s.boolean("read-only").value_or(false);
  spec.parent = resolve(ctx, s.string("parent").value_or(""));
  if (auto policy = s.string("vhd-size")) {
    if (*policy == "auto") {
      spec.vhd_size = formats::vhd::SizePolicy::automatic;
    } else if (*policy == "current_size") {
      spec.vhd_size = formats::vhd::SizePolicy::current_size;
    } else if (*policy == "chs") {
      spec.vhd_size = formats::vhd::SizePolicy::chs;
    } else {
      s.fail(*s.get("vhd-size"), "vhd-size",
             "'" + *policy + "' is not a size policy (known: auto, current_size, chs)");
    }
  }
  spec.snapshot = s.string("snapshot").value_or("");
  spec.force = s.boolean("force").value_or(false);
  spec.lease_duration = static_cast<int>(s.integer("lease-duration", 15, 60).value_or(60));
  spec.retry_deadline = static_cast<int>(s.integer("retry-deadline", 0, 86400).value_or(60));
  // Azure-only settings on a local image are mistakes (open_export refuses them too).
  const bool remote = is_url(spec.image);
  for (std::string_view key : {"snapshot", "force", "credentials"}) {
    const toml::node* node = s.get(key);
    if (node && !remote && !(key == "snapshot" && spec.snapshot.empty()) &&
        !(key == "force" && !spec.force)) {
      s.fail(*node, key, "applies to Azure blob images only (az://, https://...)");
    }
  }
  if (auto credentials = s.string("credentials")) {
    const toml::node& node = *s.get("credentials");
    if (credentials->starts_with("env:")) {
      const std::string variable = credentials->substr(4);
      if (variable.empty()) s.fail(node, "credentials", "'env:' needs a variable name");
      const char* value = std::getenv(variable.c_str());
      if (!value || !*value) {
        s.fail(node, "credentials",
               "the environment variable '" + variable +
                   "' is not set (set it in the service's environment, e.g. systemd's "
                   "EnvironmentFile=)");
      }
      spec.credentials = *credentials;
    } else if (credentials->starts_with("file:") && credentials->size() > 5) {
      // Read at open, so a rotated secret is picked up by the next open.
      spec.credentials = "file:" + resolve(ctx, credentials->substr(5));
    } else {
      s.fail(node, "credentials", "credentials must be env:VAR or file:PATH (never inline)");
    }
  }
  spec.overlay = resolve(ctx, s.string("overlay").value_or(""));
  spec.cache = resolve(ctx, s.string("cache").value_or(""));
  for (const std::string_view key : {"cache-size", "cache-chunk"}) {
    const auto text = s.string(key);
    if (!text) continue;
    uint64_t bytes = 0;
    try {
      bytes = parse_size(*text);
    } catch (const std::invalid_argument& e) {
      s.fail(*s.get(key), key, e.what());
    }
    if (key == "cache-size") {
      spec.cache_size = bytes;
    } else {
      spec.cache_chunk = static_cast<uint32_t>(std::min<uint64_t>(bytes, UINT32_MAX));
    }
  }
  spec.readahead = s.boolean("readahead").value_or(true);
  spec.boot_profile = resolve(ctx, s.string("boot-profile").value_or(""));
  spec.commit_to = s.string("commit-to").value_or("");
  // A snapshot cannot be written, except through an overlay.
  spec.read_only = read_only || (!spec.snapshot.empty() && spec.overlay.empty());
  if (auto problem = remote_options_problem(spec); !problem.empty()) {
    // The flags' names become the file's keys.
    for (auto at = problem.find("--"); at != std::string::npos; at = problem.find("--", at)) {
      problem.erase(at, 2);
    }
    const char* keys[] = {"boot-profile", "cache-size", "cache-chunk",
                          "commit-to",    "read-only",  "overlay"};
    const toml::node* node = nullptr;
    for (const char* key : keys) {
      if (!node && problem.starts_with(key)) node = s.get(key);
    }
    if (node) s.fail_at(node->source(), problem);
    s.fail_here(problem);
  }
  if (spec.force && spec.read_only) {
    s.fail(*s.get("force"), "force",
           std::string("takes over a writer's lease: it cannot go with ") +
               (read_only ? "read-only" : "snapshot"));
  }
  if (auto items = s.strings("allow")) {
    for (const auto& [text, node] : *items) {
      try {
        spec.access.allow.push_back(Cidr::parse(text));
      } catch (const std::exception& e) {
        s.fail(*node, "allow", e.what());
      }
    }
  }
  if (auto items = s.strings("allow-identities")) {
    for (const auto& [text, node] : *items) {
      if (text.empty()) s.fail(*node, "allow-identities", "an identity cannot be empty");
      spec.access.tls_identities.push_back(text);
    }
  }
  spec.access.max_connections =
      static_cast<unsigned>(s.integer("max-connections", 0, 1 << 20).value_or(0));
  return spec;
}

FileSettings read_file(const std::string& file) {
  Context ctx{file, fs::absolute(fs::path(file)).parent_path()};
  {
    std::ifstream probe(file);
    if (!probe) throw ConfigError(fmt::format("cannot read {}: {}", file, std::strerror(errno)));
  }
  toml::table root;
  try {
    root = toml::parse_file(file);
  } catch (const toml::parse_error& e) {
    throw ConfigError(
        fmt::format("{}:{}: not valid TOML: {}", file, e.source().begin.line, e.description()));
  }
  FileSettings out;
  for (auto&& [key, node] : root) {
    const std::string_view k = key.str();
    const auto line = key.source().begin.line;
    if (std::find(std::begin(top_keys), std::end(top_keys), k) == std::end(top_keys)) {
      // A [server] or [[export]] key written above the first table lands here.
      std::string where;
      if (std::find(std::begin(server_keys), std::end(server_keys), k) != std::end(server_keys))
        where = " (it belongs under [server])";
      else if (std::find(std::begin(export_keys), std::end(export_keys), k) !=
               std::end(export_keys))
        where = " (it belongs in an [[export]] table)";
      else
        where = key_hint(k, top_keys);
      throw ConfigError(fmt::format("{}:{}: unknown key '{}'{}", file, line, k, where));
    }
    if (k == "export") {
      if (!node.is_array_of_tables()) {
        throw ConfigError(
            fmt::format("{}:{}: export: write each export as an [[export]] table (double brackets)",
                        file, line));
      }
      continue;
    }
    if (!node.is_table()) {
      throw ConfigError(fmt::format("{}:{}: {}: expected a table ([{}]), not {}", file, line, k, k,
                                    type_name(node)));
    }
    if (k == "server") parse_server(ctx, *node.as_table(), out);
    if (k == "admin") parse_admin(ctx, *node.as_table(), out);
    if (k == "tls") parse_tls(ctx, *node.as_table(), out);
  }
  if (const toml::array* exports = root["export"].as_array()) {
    std::size_t number = 0;
    for (const toml::node& node : *exports) {
      const toml::table& table = *node.as_table();
      ExportSpec spec = parse_export(ctx, table, ++number);
      const std::string place = fmt::format("{}:{}", file, table.source().begin.line);
      for (std::size_t i = 0; i < out.exports.size(); ++i) {
        if (out.exports[i].name == spec.name) {
          throw ConfigError(fmt::format("{}: export name '{}' is used twice (also at {})", place,
                                        spec.name, out.export_places[i]));
        }
        // Two copy-on-write layers over one file would allocate the same blocks.
        if (!spec.overlay.empty() && out.exports[i].overlay == spec.overlay) {
          throw ConfigError(fmt::format(
              "{}: export '{}': overlay {} is also the overlay of export '{}' (at {}); each "
              "export needs its own overlay file",
              place, spec.name, spec.overlay, out.exports[i].name, out.export_places[i]));
        }
      }
      out.exports.push_back(std::move(spec));
      out.export_places.push_back(place);
    }
  }
  return out;
}

bool default_listen(const ListenSpec& l) {
  const ListenSpec d;
  return l.bind_addresses.empty() && l.port == d.port && l.tcp == d.tcp && l.unix_paths.empty();
}

bool default_log(const log::Settings& s) {
  return s.level == log::Level::info && !s.control_debug && !s.data_debug;
}

}  // namespace

void apply_config_file(ServeCommand& cmd) {
  auto command_line = std::make_shared<ServeCommand>(cmd);
  command_line->command_line.reset();
  FileSettings f = read_file(cmd.config_file);

  // The file fills what the command line left at its default.
  const ServerOptions defaults;
  ServerOptions& s = cmd.server;
  if (f.listen && default_listen(s.listen)) s.listen = *f.listen;
  if (f.threads && s.threads == defaults.threads) s.threads = *f.threads;
  if (f.blocking_threads && cmd.blocking_threads == 0) cmd.blocking_threads = *f.blocking_threads;
  if (f.max_clients && s.max_clients == defaults.max_clients) s.max_clients = *f.max_clients;
  if (f.handshake_timeout && s.session.handshake_timeout == defaults.session.handshake_timeout) {
    s.session.handshake_timeout = *f.handshake_timeout;
  }
  if (f.idle_timeout && s.session.idle_timeout == defaults.session.idle_timeout) {
    s.session.idle_timeout = *f.idle_timeout;
  }
  if (f.pid_file && s.pid_file.empty()) s.pid_file = *f.pid_file;
  if (f.log && default_log(cmd.log)) cmd.log = *f.log;
  if (f.admin && s.admin.listen.empty()) s.admin.listen = *f.admin;
  if (f.tls && !cmd.tls_flags_given) s.tls = *f.tls;

  // The file's exports first: its first one is the default export.
  std::vector<ExportSpec> exports = std::move(f.exports);
  for (auto& spec : cmd.exports) {
    for (std::size_t i = 0; i < f.export_places.size(); ++i) {
      if (exports[i].name == spec.name) {
        throw ConfigError(
            fmt::format("export name '{}' is used twice: in {} and on the command line", spec.name,
                        f.export_places[i]));
      }
    }
    for (std::size_t i = 0; i < f.export_places.size(); ++i) {
      if (!spec.overlay.empty() && exports[i].overlay == spec.overlay) {
        throw ConfigError(
            fmt::format("overlay {} is used twice: by export '{}' in {} and on the command line",
                        spec.overlay, exports[i].name, f.export_places[i]));
      }
    }
    exports.push_back(std::move(spec));
  }
  if (exports.empty()) {
    throw ConfigError(cmd.config_file +
                      ": no exports: add [[export]] tables (name, image), or images on the "
                      "command line");
  }
  for (std::size_t i = 0; i < exports.size(); ++i) {
    if (!exports[i].access.tls_identities.empty() && s.tls.mode == protocol::TlsMode::off) {
      const std::string place =
          i < f.export_places.size() ? f.export_places[i] : std::string("the command line");
      throw ConfigError(fmt::format(
          "{}: export '{}': allow-identities needs TLS ([tls] mode = \"on\" or \"require\", "
          "with certificates or psk-file)",
          place, exports[i].name));
    }
    // Without verify-peer no client certificate is asked for: nobody would match.
    if (!exports[i].access.tls_identities.empty() && !s.tls.certificates_dir.empty() &&
        !s.tls.verify_peer) {
      const std::string place =
          i < f.export_places.size() ? f.export_places[i] : std::string("the command line");
      throw ConfigError(fmt::format(
          "{}: export '{}': allow-identities with X.509 certificates needs [tls] verify-peer = "
          "true (without it clients send no certificate, so none has an identity)",
          place, exports[i].name));
    }
  }
  cmd.exports = std::move(exports);
  cmd.command_line = std::move(command_line);
}

namespace {

bool is_local_image(std::string_view image) {
  return !image.starts_with("memory:") && !is_url(image);
}

void check_readable(const std::string& file, const std::string& what, const std::string& path,
                    int mode) {
  if (::access(path.c_str(), mode) != 0) {
    throw ConfigError(fmt::format("{}: {}: {}: {}", file, what, path, std::strerror(errno)));
  }
}

// A file the server writes and creates when missing (an overlay, a cache, a boot
// profile): read-write if it exists, else its directory must let us create it.
void check_writable(const std::string& file, const std::string& what, const std::string& path) {
  if (::access(path.c_str(), F_OK) == 0) return check_readable(file, what, path, R_OK | W_OK);
  const fs::path dir = fs::path(path).parent_path();
  check_readable(file, what + " (its directory, to create it)", dir.empty() ? "." : dir.string(),
                 W_OK | X_OK);
}

}  // namespace

void check_config_files(const ServeCommand& cmd) {
  for (const auto& spec : cmd.exports) {
    const std::string what = fmt::format("export '{}'", spec.name);
    if (is_local_image(spec.image)) {
      std::string path = spec.image.starts_with("file:") ? spec.image.substr(5) : spec.image;
      // Under an overlay the image is only read.
      const bool written = !spec.read_only && spec.overlay.empty();
      check_readable(cmd.config_file, what, path, written ? R_OK | W_OK : R_OK);
    }
    if (!spec.overlay.empty()) check_writable(cmd.config_file, what + ": overlay", spec.overlay);
    if (!spec.cache.empty()) check_writable(cmd.config_file, what + ": cache", spec.cache);
    if (!spec.boot_profile.empty()) {
      check_writable(cmd.config_file, what + ": boot-profile", spec.boot_profile);
    }
    if (!spec.parent.empty()) check_readable(cmd.config_file, what + ": parent", spec.parent, R_OK);
    if (spec.credentials.starts_with("file:")) {
      check_readable(cmd.config_file, what + ": credentials", spec.credentials.substr(5), R_OK);
    }
  }
  const TlsSettings& tls = cmd.server.tls;
  if (!tls.certificates_dir.empty()) {
    for (const char* name : {"server-cert.pem", "server-key.pem"}) {
      check_readable(cmd.config_file, "[tls] certificates",
                     (fs::path(tls.certificates_dir) / name).string(), R_OK);
    }
    if (tls.verify_peer) {
      check_readable(cmd.config_file, "[tls] certificates (verify-peer)",
                     (fs::path(tls.certificates_dir) / "ca-cert.pem").string(), R_OK);
    }
  }
  if (!tls.psk_file.empty()) check_readable(cmd.config_file, "[tls] psk-file", tls.psk_file, R_OK);
}

}  // namespace imagenbd::server
