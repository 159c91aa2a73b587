// Runs one coroutine to completion on a local io_context and returns its result, rethrowing
// whatever it threw (style.md 3.8). For unit tests only.
#pragma once

#include <exception>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

namespace imagenbd::test {

namespace asio = boost::asio;

template <class T>
T run(asio::awaitable<T> work) {
  asio::io_context context;
  std::exception_ptr error;
  bool done = false;
  if constexpr (std::is_void_v<T>) {
    asio::co_spawn(context, std::move(work), [&](std::exception_ptr e) {
      error = e;
      done = true;
    });
    context.run();
    if (error) std::rethrow_exception(error);
    if (!done) throw std::logic_error("run(): the coroutine did not complete");
  } else {
    std::optional<T> result;
    asio::co_spawn(context, std::move(work), [&](std::exception_ptr e, T value) {
      error = e;
      if (!e) result.emplace(std::move(value));
      done = true;
    });
    context.run();
    if (error) std::rethrow_exception(error);
    if (!done) throw std::logic_error("run(): the coroutine did not complete");
    return std::move(*result);
  }
}

}  // namespace imagenbd::test
