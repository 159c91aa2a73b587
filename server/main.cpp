// imagenbd: serve disk images over NBD. Subcommands: serve (the default), the image tools
// info and create (server/tool_*.cpp), and --help / --version.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include "backends/log.hpp"
#include "backends/offload.hpp"
#include "imagenbd_version.hpp"
#include "server/cli.hpp"
#include "server/config.hpp"
#include "server/exports.hpp"
#include "server/server.hpp"
#include "server/tool_blob.hpp"
#include "server/tool_check.hpp"
#include "server/tool_common.hpp"
#include "server/tool_convert.hpp"
#include "server/tool_create.hpp"
#include "server/tool_info.hpp"
#include "server/tool_resize.hpp"
#include "server/tool_stats.hpp"

namespace {

using namespace imagenbd;

void print_main_help() {
  std::fputs(R"(Usage: imagenbd COMMAND [OPTIONS]...
       imagenbd [OPTIONS] [NAME=]IMAGE...     (same as 'imagenbd serve')

Commands:
  serve      serve disk images over NBD (the default; its options follow)
  info       show an image's format, sizes and metadata ('imagenbd info --help')
  create     create an empty raw, VHD or VDI image ('imagenbd create --help')
  convert    copy an image into another format: raw, VHD, VDI, Azure's fixed VHD
             ('imagenbd convert --help')
  check      check an image's structure, like qemu-img check ('imagenbd check --help')
  resize     change an image's virtual size ('imagenbd resize --help')

Blob storage commands (Azure; 'imagenbd COMMAND --help' for each):
  upload     upload an image into a page blob, skipping zeroes
  download   download a blob into a local file, leaving holes sparse
  ls         list the blobs of a container
  rm         delete a blob or one of its snapshots
  snapshot   take a read-only snapshot of a blob
  lease      acquire, renew, release or break a blob's lease
  container  create or delete a container

Operations:
  check-config  validate a configuration file ('imagenbd check-config --help')
  stats         show a running server's metrics and exports through its admin
                endpoint ('imagenbd stats --help')

)",
             stdout);
  std::fputs(server::serve_help(), stdout);
}

// Gives back what the exports hold outside the process (blob leases), last, once nothing
// will be written any more; also when start-up failed after some exports were opened, so
// that an immediate restart is not refused by our own lease.
void close_leaves(const server::ExportRegistry& registry) {
  for (const auto& e : registry.all()) {
    try {
      server::close_leaf(*e);
    } catch (const std::exception& ex) {
      log::warn("export '{}': {}", e->name, ex.what());
    }
  }
}

int serve(int argc, char** argv) {
  server::ServeCommand cmd;
  try {
    cmd = server::parse_serve(argc, argv);
  } catch (const server::UsageError& e) {
    std::fprintf(stderr, "imagenbd: %s\nTry 'imagenbd serve --help' for more information.\n",
                 e.what());
    return 2;
  }
  if (cmd.help) {
    std::fputs(server::serve_help(), stdout);
    return 0;
  }
  if (cmd.version) {
    std::printf("imagenbd %s\n", IMAGENBD_VERSION);
    return 0;
  }
  if (!cmd.config_file.empty()) {
    try {
      server::apply_config_file(cmd);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "imagenbd: %s\n", e.what());
      return 2;
    }
  }
  log::configure(cmd.log);
  // Stop and reload signals wait until the server can handle them (Server::run unblocks them);
  // threads started from here on (the blocking pool, the workers) inherit the block.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGHUP);  // else a reload signal during start-up would kill us
  ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  if (cmd.blocking_threads) backends::set_blocking_threads(cmd.blocking_threads);

  auto registry = std::make_shared<server::ExportRegistry>();
  try {
    for (const auto& spec : cmd.exports) {
      auto e = server::run_now(server::open_export(spec));
      const auto info = e->info();
      log::info("export '{}': {} ({}, {} bytes{})", e->name, e->device->describe(),
                e->device->name(), info.size,
                (info.flags & protocol::tx_flag::read_only) ? ", read-only" : "");
      registry->add(std::move(e));
    }
    server::Server srv(cmd.server, registry);
    if (!cmd.config_file.empty()) {
      srv.set_reload_handler([&srv, &cmd] { return server::reload_config(srv, cmd); });
    }
    // The server holds the exports from here on: a reload replaces them, and the exports
    // it removes are closed once nothing holds them (this pointer would, until exit).
    registry.reset();
    try {
      srv.run();
    } catch (...) {
      registry = std::const_pointer_cast<server::ExportRegistry>(srv.exports());
      throw;
    }
    // After reloads, the exports served at the end are what is flushed and closed below.
    registry = std::const_pointer_cast<server::ExportRegistry>(srv.exports());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", e.what());
    server::close_retired_exports();
    close_leaves(*registry);
    return 1;
  }
  // Every connection flushed what it wrote; flush once more for writes of clients that
  // were cut off by the stop timeout.
  // A failed flush still lets the others flush and every lease go back (holding a lease
  // would not make the lost writes durable); the exit status reports it.
  bool flushed = true;
  for (const auto& e : registry->all()) {
    try {
      server::final_flush(*e);
    } catch (const std::exception& ex) {
      log::error("export '{}': final flush failed: {}", e->name, ex.what());
      flushed = false;
    }
  }
  server::close_retired_exports();  // exports a reload removed, still open at the stop
  close_leaves(*registry);
  log::info("stopped{}", flushed ? "" : ", with failed flushes (see above)");
  return flushed ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2) {
    std::string_view first = argv[1];
    if (first == "serve") return serve(argc - 1, argv + 1);
    if (first == "info") return server::tool_info(argc - 1, argv + 1);
    if (first == "create") return server::tool_create(argc - 1, argv + 1);
    if (first == "convert") return server::tool_convert(argc - 1, argv + 1);
    if (first == "check") return server::tool_check(argc - 1, argv + 1);
    if (first == "resize") return server::tool_resize(argc - 1, argv + 1);
    if (first == "upload") return server::tool_upload(argc - 1, argv + 1);
    if (first == "download") return server::tool_download(argc - 1, argv + 1);
    if (first == "ls") return server::tool_ls(argc - 1, argv + 1);
    if (first == "rm") return server::tool_rm(argc - 1, argv + 1);
    if (first == "snapshot") return server::tool_snapshot(argc - 1, argv + 1);
    if (first == "lease") return server::tool_lease(argc - 1, argv + 1);
    if (first == "container") return server::tool_container(argc - 1, argv + 1);
    if (first == "check-config") return server::tool_check_config(argc - 1, argv + 1);
    if (first == "stats") return server::tool_stats(argc - 1, argv + 1);
    if (first == "-h" || first == "--help" || first == "help") {
      print_main_help();
      return 0;
    }
    if (first == "-V" || first == "--version") {
      std::printf("imagenbd %s\n", IMAGENBD_VERSION);
      return 0;
    }
    if (!first.starts_with("-") && first.find_first_of("/.=:") == std::string_view::npos &&
        first != "serve") {
      // A bare word that is not a file is most likely a mistyped command.
      if (!std::fopen(argv[1], "r")) {
        std::fprintf(stderr,
                     "imagenbd: unknown command '%s'\nTry 'imagenbd --help' for more "
                     "information.\n",
                     argv[1]);
        return 2;
      }
    }
  } else {
    std::fputs("imagenbd: no command or image given\nTry 'imagenbd --help' for more information.\n",
               stderr);
    return 2;
  }
  return serve(argc, argv);
}
