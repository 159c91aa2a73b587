// What the image tools (info, create) share: pure text helpers (JSON strings, sizes as
// qemu-img prints them) and a way to run one coroutine to completion from a command.
#pragma once

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

namespace imagenbd::server {

// `text` as a JSON string literal, quotes included: ", \ and control characters escaped
// (\n, \t, \uXXXX); other bytes (UTF-8) pass as they are.
std::string json_string(std::string_view text);

// A byte count as qemu-img prints it: "24 MiB", "1.5 GiB", "512 B", "20.5 KiB" (powers of
// 1024, at most 3 significant digits, trailing zeros dropped).
std::string human_size(uint64_t bytes);

// Runs a coroutine to completion on a private io_context, rethrowing its exception.
template <typename T>
T run_now(boost::asio::awaitable<T> task) {
  boost::asio::io_context ctx;
  std::exception_ptr error;
  std::optional<T> result;
  boost::asio::co_spawn(ctx, std::move(task), [&](std::exception_ptr ep, T value) {
    error = ep;
    if (!ep) result = std::move(value);
  });
  ctx.run();
  if (error) std::rethrow_exception(error);
  return std::move(*result);
}

}  // namespace imagenbd::server
