#include "server/config.hpp"

#include <cstdio>

namespace imagenbd::server {

// Placeholders until the configuration file lands.
void apply_config_file(ServeCommand& cmd) {
  throw ConfigError(cmd.config_file + ": configuration files are not supported yet");
}

std::string reload_config(Server&, const ServeCommand& cmd) {
  throw ConfigError(cmd.config_file + ": configuration files are not supported yet");
}

int tool_check_config(int, char**) {
  std::fputs("imagenbd check-config: configuration files are not supported yet\n", stderr);
  return 1;
}

}  // namespace imagenbd::server
