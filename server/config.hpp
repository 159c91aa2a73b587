// The TOML configuration file (`serve --config FILE`, `check-config FILE`): listeners,
// TLS, the admin endpoint, limits, and any number of exports with their storage, layers,
// policy and access rules. Secrets are never inline: they are named by environment
// variable or file. SIGHUP and the admin endpoint's /reload re-read it.
#pragma once

#include <stdexcept>
#include <string>

#include "server/cli.hpp"

namespace imagenbd::server {

class Server;

// What is wrong with a configuration file: the message names the file, the key (with its
// line) and what to do.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Reads cmd.config_file and merges it into cmd: settings given on the command line win
// over the file's; the file's exports come before the command line's. Throws ConfigError.
void apply_config_file(ServeCommand& cmd);

// Re-reads the file `cmd` was loaded from (with the same command line on top) and makes
// the running server match it: exports whose spec is unchanged are kept with their
// connections; new and changed ones are opened; removed ones take no new connections and
// are closed once their last connection ends. Returns a summary ("2 added, 1 removed, 3
// unchanged"); throws (and changes nothing) if the file is invalid or an export cannot be
// opened. Settings that need a restart (listeners, TLS) are logged as such.
std::string reload_config(Server& server, const ServeCommand& cmd);

// `imagenbd check-config FILE`: validates a file without serving; exit 0 if valid.
int tool_check_config(int argc, char** argv);

}  // namespace imagenbd::server
