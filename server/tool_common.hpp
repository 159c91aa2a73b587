// What the image tools (info, check, create, resize, convert) share: pure text helpers
// (JSON strings, sizes as qemu-img prints them), usage errors, the option parsing of the
// one-image commands, and a way to run one coroutine to completion from a command.
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

#include "formats/open_image.hpp"

namespace imagenbd::server {

// `text` as a JSON string literal, quotes included: ", \ and control characters escaped
// (\n, \t, \uXXXX); other bytes (UTF-8) pass as they are.
std::string json_string(std::string_view text);

// A byte count as qemu-img prints it: "24 MiB", "1.5 GiB", "512 B", "20.5 KiB" (powers of
// 1024, at most 3 significant digits, trailing zeros dropped).
std::string human_size(uint64_t bytes);

// Prints "imagenbd TOOL: MESSAGE" and the --help hint to stderr; returns `status`.
int usage_error(const char* tool, const std::string& message, int status);

// What a one-image command (info, check) takes: -f/--format, --json, --output=human|json,
// -h/--help and exactly one image.
struct ImageCommand {
  formats::Format format = formats::Format::automatic;
  bool json = false;
  std::string path;
};

// Parses `argv` into `command`. Returns nullopt to go on, or the exit status to return now:
// 0 after printing `help` for -h, `usage_status` after a usage error (printed with
// usage_error).
std::optional<int> parse_image_command(int argc, char** argv, const char* tool, const char* help,
                                       int usage_status, ImageCommand& command);

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
