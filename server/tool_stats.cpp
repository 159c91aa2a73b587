#include "server/tool_stats.hpp"

#include <cstdio>

namespace imagenbd::server {

// Placeholder until the admin endpoint lands.
int tool_stats(int, char**) {
  std::fputs("imagenbd stats: the admin endpoint is not built yet\n", stderr);
  return 1;
}

}  // namespace imagenbd::server
