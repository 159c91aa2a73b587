// validate_request: every refusal the server makes before a request reaches a layer.
#include "server/validate.hpp"

#include <doctest/doctest.h>

using imagenbd::protocol::Cmd;
using imagenbd::protocol::Errno;
using imagenbd::protocol::Request;
using imagenbd::server::RequestLimits;
using imagenbd::server::validate_request;
namespace cf = imagenbd::protocol::cmd_flag;
namespace tf = imagenbd::protocol::tx_flag;

namespace {

constexpr uint16_t writable_flags = tf::has_flags | tf::send_flush | tf::send_fua | tf::send_trim |
                                    tf::send_write_zeroes | tf::send_df | tf::send_cache |
                                    tf::send_fast_zero | tf::can_multi_conn;

RequestLimits limits(uint16_t flags = writable_flags) {
  return {.size = 1 << 20,
          .tx_flags = flags,
          .block_min = 1,
          .block_max = 1 << 16,
          .block_status = true};
}

Request req(Cmd cmd, uint64_t offset, uint32_t length, uint16_t flags = 0) {
  return {.flags = flags,
          .type = static_cast<uint16_t>(cmd),
          .cookie = 7,
          .offset = offset,
          .length = length};
}

}  // namespace

TEST_CASE("valid requests pass") {
  CHECK(validate_request(req(Cmd::read, 0, 4096), limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::read, (1 << 20) - 1, 1), limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::write, 512, 512, cf::fua), limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::flush, 0, 0), limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::trim, 0, 1 << 20), limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::write_zeroes, 0, 1 << 20, cf::no_hole | cf::fast_zero),
                         limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::block_status, 0, 1 << 20, cf::req_one), limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::cache, 0, 1 << 20), limits()) == Errno::ok);
  CHECK(validate_request(req(Cmd::read, 0, 4096, cf::df), limits()) == Errno::ok);
  // Effect lengths of trim/zero/cache may exceed the maximum payload.
  CHECK(limits().block_max < (1u << 20));
}

TEST_CASE("past the end: EINVAL for reads, ENOSPC for writes") {
  CHECK(validate_request(req(Cmd::read, 1 << 20, 1), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::read, (1 << 20) - 1, 2), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::trim, 1, 1 << 20), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::cache, 1 << 20, 512), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::block_status, 1 << 21, 512), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::write, 1 << 20, 1), limits()) == Errno::nospc);
  CHECK(validate_request(req(Cmd::write_zeroes, 4096, 1 << 20), limits()) == Errno::nospc);
  // 64-bit overflow of offset + length must not wrap into range.
  CHECK(validate_request(req(Cmd::read, UINT64_MAX - 10, 4096), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::write, UINT64_MAX, 1), limits()) == Errno::nospc);
}

TEST_CASE("zero length and oversized payloads") {
  for (Cmd c :
       {Cmd::read, Cmd::write, Cmd::trim, Cmd::write_zeroes, Cmd::cache, Cmd::block_status}) {
    CHECK(validate_request(req(c, 0, 0), limits()) == Errno::inval);
  }
  CHECK(validate_request(req(Cmd::read, 0, (1 << 16) + 1), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::read, 0, (1 << 16) + 1, cf::df), limits()) == Errno::overflow);
  CHECK(validate_request(req(Cmd::write, 0, (1 << 16) + 1), limits()) == Errno::inval);
}

TEST_CASE("unknown commands and flags") {
  Request r = req(Cmd::read, 0, 512);
  r.type = 8;  // RESIZE: not advertised
  CHECK(validate_request(r, limits()) == Errno::inval);
  r.type = 0xffff;
  CHECK(validate_request(r, limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::read, 0, 512, 1u << 15), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::read, 0, 512, cf::req_one), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::write, 0, 512, cf::no_hole), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::write, 0, 512, cf::df), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::trim, 0, 512, cf::fast_zero), limits()) == Errno::inval);
  // DF needs SEND_DF (structured replies), FAST_ZERO needs SEND_FAST_ZERO, FUA needs SEND_FUA.
  CHECK(validate_request(req(Cmd::read, 0, 512, cf::df), limits(writable_flags & ~tf::send_df)) ==
        Errno::inval);
  CHECK(validate_request(req(Cmd::write_zeroes, 0, 512, cf::fast_zero),
                         limits(writable_flags & ~tf::send_fast_zero)) == Errno::inval);
  CHECK(validate_request(req(Cmd::write, 0, 512, cf::fua),
                         limits(writable_flags & ~tf::send_fua)) == Errno::inval);
  // FUA is accepted on any command once advertised (qemu-io sets it everywhere).
  CHECK(validate_request(req(Cmd::read, 0, 512, cf::fua), limits()) == Errno::ok);
}

TEST_CASE("commands that were not advertised") {
  CHECK(validate_request(req(Cmd::flush, 0, 0), limits(writable_flags & ~tf::send_flush)) ==
        Errno::inval);
  CHECK(validate_request(req(Cmd::trim, 0, 512), limits(writable_flags & ~tf::send_trim)) ==
        Errno::inval);
  CHECK(validate_request(req(Cmd::write_zeroes, 0, 512),
                         limits(writable_flags & ~tf::send_write_zeroes)) == Errno::inval);
  auto no_context = limits();
  no_context.block_status = false;
  CHECK(validate_request(req(Cmd::block_status, 0, 512), no_context) == Errno::inval);
  CHECK(validate_request(req(Cmd::flush, 0, 512), limits()) == Errno::inval);
  CHECK(validate_request(req(Cmd::flush, 512, 0), limits()) == Errno::inval);
}

TEST_CASE("read-only exports refuse writes with EPERM") {
  const uint16_t ro = tf::has_flags | tf::read_only | tf::send_flush | tf::send_cache;
  CHECK(validate_request(req(Cmd::write, 0, 512), limits(ro)) == Errno::perm);
  CHECK(validate_request(req(Cmd::trim, 0, 512), limits(ro)) == Errno::perm);
  CHECK(validate_request(req(Cmd::write_zeroes, 0, 512), limits(ro)) == Errno::perm);
  CHECK(validate_request(req(Cmd::read, 0, 512), limits(ro)) == Errno::ok);
  CHECK(validate_request(req(Cmd::flush, 0, 0), limits(ro)) == Errno::ok);
}

TEST_CASE("alignment is enforced when the export needs it") {
  auto l = limits();
  l.block_min = 512;
  CHECK(validate_request(req(Cmd::read, 512, 1024), l) == Errno::ok);
  CHECK(validate_request(req(Cmd::read, 100, 512), l) == Errno::inval);
  CHECK(validate_request(req(Cmd::write, 0, 100), l) == Errno::inval);
}

TEST_CASE("DISC is always accepted") {
  CHECK(validate_request(req(Cmd::disc, 12345, 99, 0xffff), limits()) == Errno::ok);
}

TEST_CASE("every refusal says why, acceptance says nothing") {
  CHECK(validate_request(req(Cmd::read, 0, 512), limits()).reason.empty());
  const Request refused[] = {req(Cmd::read, 1 << 20, 1), req(Cmd::write, 0, 0),
                             req(Cmd::read, 0, 512, cf::req_one),
                             req(Cmd::read, 0, (1 << 16) + 1, cf::df), req(Cmd::flush, 1, 0)};
  for (const auto& r : refused) {
    auto v = validate_request(r, limits());
    CHECK(v.error != Errno::ok);
    CHECK_FALSE(v.reason.empty());
  }
  CHECK(validate_request(req(Cmd::write, 1 << 20, 1), limits()).reason.find("past the end") !=
        std::string_view::npos);
}
