// The TOML configuration file (`serve --config FILE`, `check-config FILE`): listeners,
// TLS, the admin endpoint, limits, and any number of exports with their storage, policy
// and access rules. Secrets are never inline: they are named by environment variable or
// file. SIGHUP and the admin endpoint's /reload re-read it (server/reload.cpp).
//
// Merging with the command line: a [server], [tls] or [admin] setting from the file is
// used only where the command line left the built-in default (so `--threads=4` beats
// `threads = 8`, but `--threads=0` cannot undo it: 0 is the default). [tls] is taken as a
// whole or not at all: any TLS flag on the command line wins over the whole section. The
// file's exports come first (its first export is the default one), then the images on the
// command line; a name used twice is an error.
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
// over the file's; the file's exports come before the command line's. Keeps the command
// line as it was in cmd.command_line (for reloads). Throws ConfigError.
void apply_config_file(ServeCommand& cmd);

// What check-config checks beyond apply_config_file, without opening any image: local
// image and parent files exist and can be read (and written, for writable exports), TLS
// certificate/key/PSK files exist, `credentials = "file:PATH"` files can be read. Throws
// ConfigError naming the export and the file.
void check_config_files(const ServeCommand& cmd);

// Re-reads the file `cmd` was loaded from (with the same command line on top) and makes
// the running server match it: exports whose spec is unchanged are kept with their
// connections; new and changed ones are opened; removed ones take no new connections and
// are closed once their last connection ends. Returns a summary ("2 added, 1 removed, 0
// changed, 3 unchanged"); throws (and changes nothing) if the file is invalid or an export
// cannot be opened. Settings that need a restart (listeners, TLS, threads, limits) are
// logged as such; log-level is applied at once.
std::string reload_config(Server& server, const ServeCommand& cmd);

// Exports that a reload removed or replaced are "retired": they stay open while a
// connection uses them. Each reload flushes and closes (gives back blob leases of) the
// retired exports nobody uses any more; at exit main() closes the rest with this.
void close_retired_exports();

// `imagenbd check-config FILE`: validates a file without serving; exit 0 if valid.
int tool_check_config(int argc, char** argv);

}  // namespace imagenbd::server
