#include "server/validate.hpp"

namespace imagenbd::server {

using protocol::Cmd;
using protocol::Errno;
namespace cf = protocol::cmd_flag;
namespace tf = protocol::tx_flag;

Errno validate_request(const protocol::Request& r, const RequestLimits& limits) {
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
      return Errno::ok;
    default:
      return Errno::inval;  // unknown command (RESIZE included: not advertised)
  }
  if (r.flags & ~allowed) return Errno::inval;

  const bool writes = cmd == Cmd::write || cmd == Cmd::trim || cmd == Cmd::write_zeroes;
  if (writes && (tx & tf::read_only)) return Errno::perm;

  switch (cmd) {
    case Cmd::flush:
      if (!(tx & tf::send_flush)) return Errno::inval;
      return (r.offset != 0 || r.length != 0) ? Errno::inval : Errno::ok;
    case Cmd::trim:
      if (!(tx & tf::send_trim)) return Errno::inval;
      break;
    case Cmd::write_zeroes:
      if (!(tx & tf::send_write_zeroes)) return Errno::inval;
      break;
    case Cmd::block_status:
      if (!limits.block_status) return Errno::inval;
      break;
    default:
      break;
  }

  if (r.length == 0) return Errno::inval;
  if (r.offset > limits.size || r.length > limits.size - r.offset) {
    return (cmd == Cmd::write || cmd == Cmd::write_zeroes) ? Errno::nospc : Errno::inval;
  }
  if (limits.block_min > 1 && (r.offset % limits.block_min || r.length % limits.block_min)) {
    return Errno::inval;
  }
  if ((cmd == Cmd::read || cmd == Cmd::write) && r.length > limits.block_max) {
    // With DF the client asked for one unfragmented chunk we cannot send.
    return (cmd == Cmd::read && (r.flags & cf::df)) ? Errno::overflow : Errno::inval;
  }
  return Errno::ok;
}

}  // namespace imagenbd::server
