// Runs coroutines side by side from one coroutine (Boost 1.74 has no parallel_group):
// at most `width` at a time, on the caller's executor; waits for all of them, then
// rethrows the first exception, if any.
#pragma once

#include <cstddef>
#include <functional>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/awaitable.hpp>

namespace imagenbd::backends {

namespace asio = boost::asio;

using Task = std::function<asio::awaitable<void>()>;

asio::awaitable<void> run_parallel(std::vector<Task> tasks, std::size_t width);

}  // namespace imagenbd::backends
