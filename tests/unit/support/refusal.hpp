// The check the damaged-image tests (vhd_damaged_test, vdi_damaged_test) make of each
// image a format must refuse.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <system_error>

#include <doctest/doctest.h>

#include "backends/block_device.hpp"
#include "backends/error.hpp"
#include "tests/unit/support/bounds_checked_device.hpp"

namespace imagenbd::test {

// Calls open(child), which must throw backends::Error with `code` and a message that starts
// with `prefix` ("vhd: disk.vhd: "), contains `fragment` and is not yet in `seen` (each
// case must have its own message; it is added). No read of child may exceed `read_limit`.
template <typename Open>
void check_refused(const char* what, const std::shared_ptr<BoundsChecked>& child, std::errc code,
                   std::string_view fragment, std::string_view prefix, uint64_t read_limit,
                   std::set<std::string>& seen, Open open) {
  INFO("case: ", std::string(what));
  std::string message;
  try {
    open(child);
    FAIL_CHECK("opened, but must be refused with \"", fragment, "\"");
    return;
  } catch (const backends::Error& e) {
    message = e.what();
    CHECK_MESSAGE(e.errc() == code, message);
  } catch (const std::exception& e) {
    FAIL_CHECK("threw something else than backends::Error: ", e.what());
    return;
  }
  CHECK_MESSAGE(message.starts_with(prefix), message);
  CHECK_MESSAGE(message.find(fragment) != std::string::npos, message, " lacks ", fragment);
  CHECK_MESSAGE(seen.insert(message).second, "a second case refused with: ", message);
  CHECK(child->largest_read() <= read_limit);
}

}  // namespace imagenbd::test
