#include "server/listener.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "backends/log.hpp"

namespace imagenbd::server {

namespace {

using generic = asio::generic::stream_protocol;
using tcp = asio::ip::tcp;

std::string label_of(const tcp::endpoint& ep) {
  return ep.address().is_v6() ? "[" + ep.address().to_string() + "]:" + std::to_string(ep.port())
                              : ep.address().to_string() + ":" + std::to_string(ep.port());
}

std::unique_ptr<Listener> bind_tcp(asio::io_context& ctx, const tcp::endpoint& ep) {
  generic::endpoint gep(ep);
  auto l = std::unique_ptr<Listener>(
      new Listener{asio::basic_socket_acceptor<generic>(ctx), label_of(ep), true, {}});
  boost::system::error_code ec;
  l->acceptor.open(gep.protocol(), ec);
  if (ec) throw boost::system::system_error(ec, "cannot create a socket for " + l->label);
  l->acceptor.set_option(asio::socket_base::reuse_address(true));
  // Separate IPv4 and IPv6 sockets, as nbdkit does: one never shadows the other.
  if (ep.address().is_v6()) l->acceptor.set_option(asio::ip::v6_only(true), ec);
  l->acceptor.bind(gep, ec);
  if (ec == asio::error::address_in_use) {
    throw std::runtime_error("cannot listen on " + l->label +
                             ": the address is already in use (another NBD server? pick "
                             "another port with --port)");
  }
  if (ec) throw std::runtime_error("cannot listen on " + l->label + ": " + ec.message());
  l->acceptor.listen(asio::socket_base::max_listen_connections);
  return l;
}

std::unique_ptr<Listener> bind_unix(asio::io_context& ctx, const std::string& path) {
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    throw std::runtime_error("Unix socket path is too long: " + path);
  }
  // A socket file left by a crashed server is replaced; a live one is not.
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      throw std::runtime_error("cannot listen on " + path +
                               ": the file exists and is not a socket");
    }
    asio::local::stream_protocol::socket probe(ctx);
    boost::system::error_code ec;
    probe.connect(asio::local::stream_protocol::endpoint(path), ec);
    if (!ec) {
      throw std::runtime_error("cannot listen on " + path +
                               ": another server is already listening there");
    }
    ::unlink(path.c_str());
  }
  generic::endpoint gep(asio::local::stream_protocol::endpoint{path});
  auto l = std::unique_ptr<Listener>(
      new Listener{asio::basic_socket_acceptor<generic>(ctx), "unix:" + path, false, path});
  boost::system::error_code ec;
  l->acceptor.open(gep.protocol(), ec);
  if (!ec) l->acceptor.bind(gep, ec);
  if (ec) throw std::runtime_error("cannot listen on " + path + ": " + ec.message());
  l->acceptor.listen(asio::socket_base::max_listen_connections);
  return l;
}

}  // namespace

std::vector<std::unique_ptr<Listener>> open_listeners(asio::io_context& ctx,
                                                      const ListenSpec& spec) {
  std::vector<std::unique_ptr<Listener>> out;
  for (const auto& path : spec.unix_paths) out.push_back(bind_unix(ctx, path));
  if (!spec.tcp) return out;
  if (spec.bind_addresses.empty()) {
    out.push_back(bind_tcp(ctx, tcp::endpoint(asio::ip::address_v4::any(), spec.port)));
    try {
      out.push_back(bind_tcp(ctx, tcp::endpoint(asio::ip::address_v6::any(), spec.port)));
    } catch (const std::exception& e) {
      log::debug("no IPv6 listener: {}", e.what());  // hosts without IPv6
    }
    return out;
  }
  tcp::resolver resolver(ctx);
  for (const auto& address : spec.bind_addresses) {
    boost::system::error_code ec;
    auto results = resolver.resolve(address, std::to_string(spec.port),
                                    tcp::resolver::passive | tcp::resolver::numeric_service, ec);
    if (ec)
      throw std::runtime_error("cannot resolve bind address '" + address + "': " + ec.message());
    for (const auto& r : results) out.push_back(bind_tcp(ctx, r.endpoint()));
  }
  return out;
}

std::vector<std::unique_ptr<Listener>> adopt_activated_listeners(asio::io_context& ctx) {
  std::vector<std::unique_ptr<Listener>> out;
  const char* pid = std::getenv("LISTEN_PID");
  const char* fds = std::getenv("LISTEN_FDS");
  if (!pid || !fds || std::strtol(pid, nullptr, 10) != ::getpid()) return out;
  const long count = std::strtol(fds, nullptr, 10);
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  ::unsetenv("LISTEN_FDNAMES");
  constexpr int first_fd = 3;  // SD_LISTEN_FDS_START
  for (int fd = first_fd; fd < first_fd + count; ++fd) {
    sockaddr_storage addr{};
    socklen_t length = sizeof addr;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) < 0) {
      throw std::runtime_error("socket activation: fd " + std::to_string(fd) +
                               " is not a socket (LISTEN_FDS=" + fds + ")");
    }
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    const int family = addr.ss_family;
    const bool tcp = family == AF_INET || family == AF_INET6;
    const generic protocol(family, tcp ? IPPROTO_TCP : 0);
    std::string label = "fd " + std::to_string(fd);
    if (tcp) {
      tcp::endpoint ep;
      std::memcpy(ep.data(), &addr, std::min<std::size_t>(length, ep.capacity()));
      label += " (" + label_of(ep) + ")";
    } else if (family == AF_UNIX) {
      const auto* un = reinterpret_cast<const sockaddr_un*>(&addr);
      label += std::string(" (unix:") + un->sun_path + ")";
    }
    auto l = std::unique_ptr<Listener>(
        new Listener{asio::basic_socket_acceptor<generic>(ctx), "systemd " + label, tcp, {}});
    boost::system::error_code ec;
    l->acceptor.assign(protocol, fd, ec);
    if (ec)
      throw std::runtime_error("socket activation: cannot use fd " + std::to_string(fd) + ": " +
                               ec.message());
    out.push_back(std::move(l));
  }
  return out;
}

void close_listener(Listener& l) {
  boost::system::error_code ec;
  l.acceptor.close(ec);
  if (!l.unix_path.empty()) ::unlink(l.unix_path.c_str());
}

}  // namespace imagenbd::server
