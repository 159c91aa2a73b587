// Command-line parsing for `imagenbd serve`, with flags a qemu-nbd user can guess.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/log.hpp"
#include "server/exports.hpp"
#include "server/server.hpp"

namespace imagenbd::server {

// A mistake on the command line: the message says what is wrong and what to do.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ServeCommand {
  bool help = false;
  bool version = false;
  ServerOptions server;
  std::vector<ExportSpec> exports;
  log::Settings log;
  unsigned blocking_threads = 0;  // 0: default
  std::string config_file;        // --config
  // Some --tls* flag was given: the command line's TLS settings then win over the config
  // file's [tls] as a whole (even --tls=off, which equals the default).
  bool tls_flags_given = false;
  // Set by apply_config_file: the command line as parsed, before the file was merged in;
  // a reload merges the re-read file into it again.
  std::shared_ptr<const ServeCommand> command_line;
};

// argv[0] is the program or subcommand name; throws UsageError.
ServeCommand parse_serve(int argc, char** argv);
const char* serve_help();

}  // namespace imagenbd::server
