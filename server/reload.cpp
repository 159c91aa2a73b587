// Reloading the configuration file (SIGHUP, the admin endpoint's POST /reload), on the
// server's main thread through Server::reload(). All or nothing: the new exports are all
// opened before the registry is swapped, and if one fails the ones just opened are closed
// again and the running configuration stays.
//
// Exports are compared by their whole ExportSpec: an unchanged one is the same Export
// object in the new registry, so its connections, its stack (caches, leases) and its
// metrics carry on. A removed or changed export is "retired": new clients no longer see
// it (they get NBD_REP_ERR_UNKNOWN, or the new export of that name), connected clients
// keep using it through their own shared_ptr, and it is flushed and closed (a blob lease
// given back) at the first reload after nothing else holds it, or at exit
// (close_retired_exports, called by main()).
//
// A changed writable Azure export of the same blob cannot be reopened while the retiring
// one still holds the blob's lease, and taking the lease away (close old first) would fail
// the writes of its connected clients. Such a reload is refused with a message saying to
// remove the export in one reload and add it back in the next.
#include <algorithm>
#include <mutex>
#include <vector>

#include <fmt/format.h>

#include "backends/log.hpp"
#include "server/config.hpp"
#include "server/server.hpp"
#include "server/tls.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

std::mutex retired_mutex;
std::vector<std::shared_ptr<const Export>> retired;  // under retired_mutex

void flush_and_close(const Export& e) {
  try {
    final_flush(e);
  } catch (const std::exception& ex) {
    log::error("export '{}' (removed by a reload): final flush failed: {}", e.name, ex.what());
  }
  try {
    close_leaf(e);
  } catch (const std::exception& ex) {
    log::warn("export '{}' (removed by a reload): {}", e.name, ex.what());
  }
}

// Closes the retired exports that only this list holds (all of them at exit); returns how
// many are still in use.
std::size_t sweep_retired(bool all) {
  std::lock_guard lock(retired_mutex);
  std::erase_if(retired, [all](const std::shared_ptr<const Export>& e) {
    if (!all && e.use_count() > 1) return false;
    flush_and_close(*e);
    log::info("export '{}' (removed by a reload): closed, no connection uses it any more", e->name);
    return true;
  });
  return retired.size();
}

// A writable Azure leaf holds its blob's lease until it is closed.
bool holds_lease(const Export& e) {
  return e.leaf && e.leaf->name() == "azure" && e.leaf->caps().writable;
}

// An export that will still write to its local image after this reload, whatever the
// reload does: a running one with clients connected, or a retired one still in use.
// Opening the same image again beside it would make two independent writable stacks, each
// with its own view of the image's metadata (a VHD's block table and end of file, a VDI's
// block map): they would allocate the same blocks and overwrite each other's tables. Raw
// images keep no such state; memory: images are never shared; a blob's lease guards
// Azure (above).
std::shared_ptr<const Export> local_writer_of(const ExportRegistry& current,
                                              const ExportSpec& spec) {
  const auto writes = [&](const Export& e) {
    // Two copy-on-write layers over one overlay file would allocate the same blocks too.
    if (!spec.overlay.empty() && e.spec.overlay == spec.overlay) return true;
    return e.spec.image == spec.image && e.leaf && e.leaf->name() == "file" &&
           e.device->caps().writable && e.device->name() != "raw";
  };
  for (const auto& e : current.all()) {
    if (!(e->spec == spec) && writes(*e) &&
        e->metrics->connections.load(std::memory_order_relaxed) > 0) {
      return e;
    }
  }
  std::lock_guard lock(retired_mutex);
  for (const auto& e : retired) {
    if (writes(*e)) return e;  // still in use: sweep_retired() closed the others
  }
  return nullptr;
}

bool same_listen(const ListenSpec& a, const ListenSpec& b) {
  return a.bind_addresses == b.bind_addresses && a.port == b.port && a.tcp == b.tcp &&
         a.unix_paths == b.unix_paths;
}

// Server settings are fixed when the server starts: say which changes wait for a restart.
void log_restart_needed(const ServeCommand& running, const ServeCommand& fresh) {
  const ServerOptions& a = running.server;
  const ServerOptions& b = fresh.server;
  std::vector<std::string_view> changed;
  if (!same_listen(a.listen, b.listen)) changed.push_back("[server] listen");
  if (a.threads != b.threads) changed.push_back("[server] threads");
  if (running.blocking_threads != fresh.blocking_threads) {
    changed.push_back("[server] blocking-threads");
  }
  if (a.max_clients != b.max_clients) changed.push_back("[server] max-connections");
  if (a.session.handshake_timeout != b.session.handshake_timeout) {
    changed.push_back("[server] handshake-timeout");
  }
  if (a.session.idle_timeout != b.session.idle_timeout) changed.push_back("[server] idle-timeout");
  if (a.pid_file != b.pid_file) changed.push_back("[server] pid-file");
  if (!(a.admin == b.admin)) changed.push_back("[admin]");
  if (!(a.tls == b.tls)) changed.push_back("[tls]");
  if (!changed.empty()) {
    log::warn("configuration: {} changed: this needs a restart (not applied by a reload)",
              fmt::join(changed, ", "));
  }
}

std::shared_ptr<const Export> find_exact(const ExportRegistry& registry, std::string_view name) {
  for (const auto& e : registry.all()) {
    if (e->name == name) return e;
  }
  return nullptr;
}

}  // namespace

std::string reload_config(Server& server, const ServeCommand& cmd) {
  ServeCommand fresh = cmd.command_line ? *cmd.command_line : cmd;
  fresh.config_file = cmd.config_file;
  apply_config_file(fresh);  // throws ConfigError: nothing changed yet
  log_restart_needed(cmd, fresh);
  // Same TLS settings: the files are read again (certificates, keys or PSK file replaced in
  // place). A file that no longer loads fails the reload, and the running ones stay.
  std::shared_ptr<boost::asio::ssl::context> tls;
  if (cmd.server.tls.mode != protocol::TlsMode::off && fresh.server.tls == cmd.server.tls) {
    try {
      tls = make_tls_context(fresh.server.tls);
    } catch (const std::exception& e) {
      throw ConfigError(fmt::format("[tls]: {}; the running credentials stay", e.what()));
    }
  }

  // Give back what retired exports hold (leases) before opening, so that an export removed
  // by the previous reload can come back in this one.
  sweep_retired(false);

  std::shared_ptr<const ExportRegistry> current = server.exports();
  for (const auto& spec : fresh.exports) {
    auto old = find_exact(*current, spec.name);
    if (old && !(old->spec == spec) && holds_lease(*old) && !spec.read_only &&
        old->spec.image == spec.image) {
      throw ConfigError(fmt::format(
          "export '{}': its settings changed, but the running export holds the blob's lease "
          "for its connected clients; to change it, remove the export and reload, then add it "
          "back and reload again once its clients have left (or restart imagenbd)",
          spec.name));
    }
    if (old && old->spec == spec) continue;  // kept as it is
    if (auto writer = local_writer_of(*current, spec)) {
      throw ConfigError(fmt::format(
          "export '{}': {} is still written by the clients of the running export '{}'; "
          "opening it a second time now would give the image two writers that corrupt its "
          "block table; reload again once those clients have disconnected (or restart "
          "imagenbd)",
          spec.name,
          !spec.overlay.empty() && writer->spec.overlay == spec.overlay ? spec.overlay : spec.image,
          writer->name));
    }
  }

  std::vector<std::shared_ptr<const Export>> next;
  std::vector<std::shared_ptr<Export>> opened;
  unsigned added = 0, changed = 0, unchanged = 0;
  try {
    for (const auto& spec : fresh.exports) {
      auto old = find_exact(*current, spec.name);
      if (old && old->spec == spec) {
        next.push_back(old);
        ++unchanged;
        continue;
      }
      std::shared_ptr<Export> e;
      try {
        e = run_now(open_export(spec));
      } catch (const std::exception& ex) {
        throw ConfigError(fmt::format("export '{}': {}", spec.name, ex.what()));
      }
      opened.push_back(e);
      next.push_back(e);
      const auto info = e->info();
      log::info("export '{}': {} ({}, {} bytes{}){}", e->name, e->device->describe(),
                e->device->name(), info.size,
                (info.flags & protocol::tx_flag::read_only) ? ", read-only" : "",
                old ? ": changed; connected clients keep the previous one" : ": added");
      ++(old ? changed : added);
    }
  } catch (...) {
    for (const auto& e : opened) flush_and_close(*e);
    throw;
  }

  auto registry = std::make_shared<ExportRegistry>();
  for (const auto& e : next) registry->add(e);  // names are unique (apply_config_file)
  unsigned removed = 0;
  {
    std::lock_guard lock(retired_mutex);
    for (const auto& e : current->all()) {
      if (std::find(next.begin(), next.end(), e) != next.end()) continue;
      if (!find_exact(*registry, e->name)) {
        ++removed;
        log::info("export '{}': removed; it takes no new connections", e->name);
      }
      retired.push_back(e);
    }
  }
  server.set_exports(registry);
  current.reset();
  if (tls) {
    server.set_tls_context(std::move(tls));
    log::info("TLS: credentials read again; new connections use them");
  }

  // The log level applies at once (the other [server] settings wait for a restart).
  // Always set, not only when it differs from the start: `cmd` is the configuration the
  // server started with, so a level changed by one reload and changed back by the next
  // would otherwise stay at the first reload's.
  log::configure(fresh.log);
  // Retired exports whose last client left already (or that never had one) close now.
  if (const std::size_t busy = sweep_retired(false)) {
    log::info(
        "{} export(s) removed or replaced by a reload are still in use; they are closed "
        "at a later reload or at exit",
        busy);
  }
  return fmt::format("{} added, {} removed, {} changed, {} unchanged", added, removed, changed,
                     unchanged);
}

void close_retired_exports() {
  sweep_retired(true);
}

}  // namespace imagenbd::server
