// `imagenbd stats`: asks a running server's admin endpoint for its metrics and exports and
// prints them for people (a table) or tools (--json, --prometheus).
#pragma once

namespace imagenbd::server {

int tool_stats(int argc, char** argv);

}  // namespace imagenbd::server
