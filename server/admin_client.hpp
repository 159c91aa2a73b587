// A client of the admin endpoint for the tools (imagenbd snapshot --admin): one HTTP/1.1
// request per connection over a Unix or TCP socket (Beast), with one deadline for the
// whole exchange, so a server that stops answering is given up with a clear message.
#pragma once

#include <chrono>
#include <string>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>

#include "server/admin.hpp"

namespace imagenbd::server {

struct AdminAnswer {
  unsigned status = 0;
  std::string body;
};

// Sends `method` ("GET", "POST") `target` to the endpoint and returns the answer (any
// status). Throws std::runtime_error naming the endpoint when it cannot be reached or
// does not answer within `deadline`.
boost::asio::awaitable<AdminAnswer> admin_request(
    AdminAddress where, std::string method, std::string target,
    std::chrono::milliseconds deadline = std::chrono::seconds(30));

// Pure: the message of a {"error": "..."} answer, or the body as it is (trimmed).
std::string admin_error_message(std::string_view body);

}  // namespace imagenbd::server
