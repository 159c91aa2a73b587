#include "server/validate.hpp"

namespace imagenbd::server {

using protocol::Cmd;
using protocol::Errno;
namespace cf = protocol::cmd_flag;
namespace tf = protocol::tx_flag;

Verdict validate_request(const protocol::Request& r, const RequestLimits& limits) {
  const uint16_t tx = limits.tx_flags;
  const Cmd cmd = r.command();

  // Which flags this command accepts. FUA is accepted on every command once SEND_FUA was
  // advertised: some clients (qemu-io in writethrough mode) set it on everything.
  uint16_t allowed = (tx & tf::send_fua) ? cf::fua : 0;
  switch (cmd) {
    case Cmd::read:
      if (tx & tf::send_df) allowed |= cf::df;
      break;
    case Cmd::write_zeroes:
      allowed |= cf::no_hole;
      if (tx & tf::send_fast_zero) allowed |= cf::fast_zero;
      break;
    case Cmd::block_status:
      allowed |= cf::req_one;
      break;
    case Cmd::write:
    case Cmd::flush:
    case Cmd::trim:
    case Cmd::cache:
      break;
    case Cmd::disc:
      return {};
    default:
      return {Errno::inval, "unknown command"};  // RESIZE included: not advertised
  }
  if (r.flags & ~allowed) return {Errno::inval, "command flags not valid for this command"};

  const bool writes = cmd == Cmd::write || cmd == Cmd::trim || cmd == Cmd::write_zeroes;
  if (writes && (tx & tf::read_only)) return {Errno::perm, "the export is read-only"};

  switch (cmd) {
    case Cmd::flush:
      if (!(tx & tf::send_flush)) return {Errno::inval, "flush was not advertised"};
      if (r.offset != 0 || r.length != 0) return {Errno::inval, "flush needs offset and length 0"};
      return {};
    case Cmd::trim:
      if (!(tx & tf::send_trim)) return {Errno::inval, "trim was not advertised"};
      break;
    case Cmd::write_zeroes:
      if (!(tx & tf::send_write_zeroes)) return {Errno::inval, "write zeroes was not advertised"};
      break;
    case Cmd::block_status:
      if (!limits.block_status) {
        return {Errno::inval, "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)"};
      }
      break;
    default:
      break;
  }

  if (r.length == 0) return {Errno::inval, "zero-length request"};
  if (r.offset > limits.size || r.length > limits.size - r.offset) {
    return {(cmd == Cmd::write || cmd == Cmd::write_zeroes) ? Errno::nospc : Errno::inval,
            "offset + length is past the end of the export"};
  }
  if (limits.block_min > 1 && (r.offset % limits.block_min || r.length % limits.block_min)) {
    return {Errno::inval, "offset or length is not a multiple of the minimum block size"};
  }
  if ((cmd == Cmd::read || cmd == Cmd::write) && r.length > limits.block_max) {
    // With DF the client asked for one unfragmented chunk we cannot send.
    return {(cmd == Cmd::read && (r.flags & cf::df)) ? Errno::overflow : Errno::inval,
            "length exceeds the maximum payload"};
  }
  return {};
}

}  // namespace imagenbd::server
