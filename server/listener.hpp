// Listening sockets: TCP on every address a --bind name resolves to (IPv4 and IPv6), and
// Unix sockets. Binding errors become messages that say what to do.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/basic_socket_acceptor.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/io_context.hpp>

namespace imagenbd::server {

namespace asio = boost::asio;

struct ListenSpec {
  std::vector<std::string> bind_addresses;  // empty: every address (0.0.0.0 and ::)
  uint16_t port = 10809;
  bool tcp = true;
  std::vector<std::string> unix_paths;
};

struct Listener {
  asio::basic_socket_acceptor<asio::generic::stream_protocol> acceptor;
  std::string label;  // "127.0.0.1:10809", "unix:/run/x.sock"
  bool tcp;
  std::string unix_path;  // removed when the listener closes
};

// Binds every listener or throws std::runtime_error naming the address that failed.
std::vector<std::unique_ptr<Listener>> open_listeners(asio::io_context& context,
                                                      const ListenSpec& spec);
// Systemd socket activation (sd_listen_fds(3), as nbdkit's socket-activation.c does): when
// LISTEN_PID is our pid, the LISTEN_FDS sockets from fd 3 on are already bound and
// listening; serve on them instead of binding our own. Returns an empty vector when the
// process was not socket-activated. Clears the variables so children do not inherit them.
std::vector<std::unique_ptr<Listener>> adopt_activated_listeners(asio::io_context& context);

// Closes the acceptor and removes a Unix socket file.
void close_listener(Listener& listener);

}  // namespace imagenbd::server
