// Tests for the errno -> NBD error mapping and the printable names (protocol/errors.hpp).
// The mapping follows nbdkit's nbd_errno() and shared/docs/protocol.md §17.
#include "protocol/errors.hpp"

#include <doctest/doctest.h>

#include <cerrno>
#include <climits>
#include <cstdint>
#include <string_view>
#include <utility>

namespace {

using namespace imagenbd::protocol;

// Every (fast_zero, df) combination.
constexpr std::pair<bool, bool> all_flags[] = {
    {false, false}, {true, false}, {false, true}, {true, true}};

constexpr Errno all_errors[] = {Errno::ok,       Errno::perm,   Errno::io,
                                Errno::nomem,    Errno::inval,  Errno::nospc,
                                Errno::overflow, Errno::notsup, Errno::shutdown};

}  // namespace

TEST_CASE("NBD error values are the spec's fixed numbers (§17)") {
  CHECK(static_cast<uint32_t>(Errno::ok) == 0);
  CHECK(static_cast<uint32_t>(Errno::perm) == 1);
  CHECK(static_cast<uint32_t>(Errno::io) == 5);
  CHECK(static_cast<uint32_t>(Errno::nomem) == 12);
  CHECK(static_cast<uint32_t>(Errno::inval) == 22);
  CHECK(static_cast<uint32_t>(Errno::nospc) == 28);
  CHECK(static_cast<uint32_t>(Errno::overflow) == 75);
  CHECK(static_cast<uint32_t>(Errno::notsup) == 95);
  CHECK(static_cast<uint32_t>(Errno::shutdown) == 108);
}

TEST_CASE("to_nbd_error: mappings that do not depend on the request flags") {
  const std::pair<int, Errno> table[] = {
      {0, Errno::ok},
      {EROFS, Errno::perm},
      {EPERM, Errno::perm},
      {EACCES, Errno::perm},
      {EIO, Errno::io},
      {ENOMEM, Errno::nomem},
      {EINVAL, Errno::inval},
      {ENOSPC, Errno::nospc},
      {EFBIG, Errno::nospc},
      {EDQUOT, Errno::nospc},
      {ESHUTDOWN, Errno::shutdown},
      // Anything else is an I/O error.
      {ENOENT, Errno::io},
      {EBADF, Errno::io},
      {EAGAIN, Errno::io},
      {ETIMEDOUT, Errno::io},
      {ECONNRESET, Errno::io},
      {EPIPE, Errno::io},
      {ENXIO, Errno::io},
      {ESTALE, Errno::io},
      {-1, Errno::io},
      {-EIO, Errno::io},
      {9999, Errno::io},
      {INT_MAX, Errno::io},
      {INT_MIN, Errno::io},
  };
  for (const auto& [error_number, expected] : table) {
    for (const auto& [fast_zero, df] : all_flags) {
      CAPTURE(error_number);
      CAPTURE(fast_zero);
      CAPTURE(df);
      CHECK(to_nbd_error(error_number, fast_zero, df) == expected);
    }
  }
  CHECK(to_nbd_error(EROFS) == Errno::perm);  // default arguments
}

TEST_CASE("to_nbd_error: ENOTSUP only for FAST_ZERO, else EINVAL") {
  CHECK(to_nbd_error(ENOTSUP) == Errno::inval);
  CHECK(to_nbd_error(ENOTSUP, false, false) == Errno::inval);
  CHECK(to_nbd_error(ENOTSUP, false, true) == Errno::inval);
  CHECK(to_nbd_error(ENOTSUP, true, false) == Errno::notsup);
  CHECK(to_nbd_error(ENOTSUP, true, true) == Errno::notsup);
  CHECK(to_nbd_error(EOPNOTSUPP, true, false) == Errno::notsup);  // same value on Linux
  CHECK(to_nbd_error(EOPNOTSUPP, false, false) == Errno::inval);
}

TEST_CASE("to_nbd_error: EOVERFLOW only with DF, else EINVAL") {
  CHECK(to_nbd_error(EOVERFLOW) == Errno::inval);
  CHECK(to_nbd_error(EOVERFLOW, false, false) == Errno::inval);
  CHECK(to_nbd_error(EOVERFLOW, true, false) == Errno::inval);
  CHECK(to_nbd_error(EOVERFLOW, false, true) == Errno::overflow);
  CHECK(to_nbd_error(EOVERFLOW, true, true) == Errno::overflow);
}

TEST_CASE("to_errno inverts to_nbd_error") {
  CHECK(to_errno(Errno::ok) == 0);
  CHECK(to_errno(Errno::perm) == EPERM);
  CHECK(to_errno(Errno::io) == EIO);
  CHECK(to_errno(Errno::nomem) == ENOMEM);
  CHECK(to_errno(Errno::inval) == EINVAL);
  CHECK(to_errno(Errno::nospc) == ENOSPC);
  CHECK(to_errno(Errno::overflow) == EOVERFLOW);
  CHECK(to_errno(Errno::notsup) == ENOTSUP);
  CHECK(to_errno(Errno::shutdown) == ESHUTDOWN);
  // Clients treat unknown values as EINVAL (§17).
  CHECK(to_errno(static_cast<Errno>(2)) == EINVAL);
  CHECK(to_errno(static_cast<Errno>(0xffffffff)) == EINVAL);
  for (Errno e : all_errors) {
    CAPTURE(static_cast<uint32_t>(e));
    CHECK(to_nbd_error(to_errno(e), true, true) == e);
  }
}

TEST_CASE("names of options") {
  CHECK(name(Opt::export_name) == "NBD_OPT_EXPORT_NAME");
  CHECK(name(Opt::abort) == "NBD_OPT_ABORT");
  CHECK(name(Opt::list) == "NBD_OPT_LIST");
  CHECK(name(Opt::peek_export) == "NBD_OPT_PEEK_EXPORT");
  CHECK(name(Opt::starttls) == "NBD_OPT_STARTTLS");
  CHECK(name(Opt::info) == "NBD_OPT_INFO");
  CHECK(name(Opt::go) == "NBD_OPT_GO");
  CHECK(name(Opt::structured_reply) == "NBD_OPT_STRUCTURED_REPLY");
  CHECK(name(Opt::list_meta_context) == "NBD_OPT_LIST_META_CONTEXT");
  CHECK(name(Opt::set_meta_context) == "NBD_OPT_SET_META_CONTEXT");
  CHECK(name(Opt::extended_headers) == "NBD_OPT_EXTENDED_HEADERS");
  for (uint32_t v : {0u, 12u, 0xDEADu, 0xffffffffu}) {
    CAPTURE(v);
    CHECK(name(static_cast<Opt>(v)).starts_with("unknown"));
  }
}

TEST_CASE("names of option replies") {
  CHECK(name(Rep::ack) == "NBD_REP_ACK");
  CHECK(name(Rep::server) == "NBD_REP_SERVER");
  CHECK(name(Rep::info) == "NBD_REP_INFO");
  CHECK(name(Rep::meta_context) == "NBD_REP_META_CONTEXT");
  CHECK(name(Rep::err_unsup) == "NBD_REP_ERR_UNSUP");
  CHECK(name(Rep::err_policy) == "NBD_REP_ERR_POLICY");
  CHECK(name(Rep::err_invalid) == "NBD_REP_ERR_INVALID");
  CHECK(name(Rep::err_platform) == "NBD_REP_ERR_PLATFORM");
  CHECK(name(Rep::err_tls_reqd) == "NBD_REP_ERR_TLS_REQD");
  CHECK(name(Rep::err_unknown) == "NBD_REP_ERR_UNKNOWN");
  CHECK(name(Rep::err_shutdown) == "NBD_REP_ERR_SHUTDOWN");
  CHECK(name(Rep::err_block_size_reqd) == "NBD_REP_ERR_BLOCK_SIZE_REQD");
  CHECK(name(Rep::err_too_big) == "NBD_REP_ERR_TOO_BIG");
  // Numbers from §5.
  CHECK(static_cast<uint32_t>(Rep::ack) == 1);
  CHECK(static_cast<uint32_t>(Rep::meta_context) == 4);
  CHECK(static_cast<uint32_t>(Rep::err_unsup) == 0x80000001);
  CHECK(static_cast<uint32_t>(Rep::err_too_big) == 0x80000009);
  for (uint32_t v : {0u, 5u, 0x80000000u, 0x8000000Au}) {
    CAPTURE(v);
    CHECK(name(static_cast<Rep>(v)).starts_with("unknown"));
  }
}

TEST_CASE("names of commands") {
  CHECK(name(Cmd::read) == "NBD_CMD_READ");
  CHECK(name(Cmd::write) == "NBD_CMD_WRITE");
  CHECK(name(Cmd::disc) == "NBD_CMD_DISC");
  CHECK(name(Cmd::flush) == "NBD_CMD_FLUSH");
  CHECK(name(Cmd::trim) == "NBD_CMD_TRIM");
  CHECK(name(Cmd::cache) == "NBD_CMD_CACHE");
  CHECK(name(Cmd::write_zeroes) == "NBD_CMD_WRITE_ZEROES");
  CHECK(name(Cmd::block_status) == "NBD_CMD_BLOCK_STATUS");
  CHECK(name(Cmd::resize) == "NBD_CMD_RESIZE");
  for (uint16_t v : {uint16_t{9}, uint16_t{0x8000}, uint16_t{0xffff}}) {
    CAPTURE(v);
    CHECK(name(static_cast<Cmd>(v)).starts_with("unknown"));
  }
}

TEST_CASE("names of errors") {
  CHECK(name(Errno::ok) == "OK");
  CHECK(name(Errno::perm) == "EPERM");
  CHECK(name(Errno::io) == "EIO");
  CHECK(name(Errno::nomem) == "ENOMEM");
  CHECK(name(Errno::inval) == "EINVAL");
  CHECK(name(Errno::nospc) == "ENOSPC");
  CHECK(name(Errno::overflow) == "EOVERFLOW");
  CHECK(name(Errno::notsup) == "ENOTSUP");
  CHECK(name(Errno::shutdown) == "ESHUTDOWN");
  for (uint32_t v : {2u, 1000u, 0xffffffffu}) {
    CAPTURE(v);
    CHECK(name(static_cast<Errno>(v)).starts_with("unknown"));
  }
}
