// Tells the service manager how the server is doing (sd_notify(3) protocol): one datagram
// of "KEY=VALUE" lines to the Unix socket $NOTIFY_SOCKET (a path, or "@name" for the
// abstract namespace). Without NOTIFY_SOCKET nothing is sent. Written here rather than
// linking libsystemd: the protocol is one sendto() and is documented as stable.
#pragma once

#include <string_view>

namespace imagenbd::server {

// Sends `state` ("READY=1\nSTATUS=..."), best effort: a manager that is gone is logged at
// debug level, never an error. Thread-safe.
void notify_service_manager(std::string_view state);

}  // namespace imagenbd::server
