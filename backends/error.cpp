#include "backends/error.hpp"

#include <cstring>

namespace imagenbd::backends {

void fail_errno(int error_number, std::string_view what) {
  throw Error(static_cast<std::errc>(error_number),
              fmt::format("{}: {}", what, std::strerror(error_number)));
}

}  // namespace imagenbd::backends
