// tool_download: written by its owner
#include "server/tool_blob.hpp"
namespace imagenbd::server {
int tool_download(int, char**) { return 1; }
}  // namespace imagenbd::server
