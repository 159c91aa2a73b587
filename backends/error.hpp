// The error type of the data path: an errc (the shared error language between layers,
// mapped to NBD errors in one place, protocol/errors.hpp) plus a human message that names
// the layer, the object and the numbers involved.
#pragma once

#include <string>
#include <system_error>
#include <utility>

#include <fmt/format.h>

namespace imagenbd::backends {

class Error : public std::system_error {
 public:
  Error(std::errc code, std::string message)
      : std::system_error(std::make_error_code(code)), message_(std::move(message)) {}
  const char* what() const noexcept override { return message_.c_str(); }
  std::errc errc() const noexcept { return static_cast<std::errc>(code().value()); }

 private:
  std::string message_;
};

template <typename... Args>
[[noreturn]] void fail(std::errc code, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(code, fmt::format(format, std::forward<Args>(args)...));
}

// Throws Error(errno) for a failed system call: "<what>: <strerror>".
[[noreturn]] void fail_errno(int error_number, std::string_view what);

}  // namespace imagenbd::backends
