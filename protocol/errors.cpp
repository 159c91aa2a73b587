#include "protocol/errors.hpp"

#include <cerrno>

namespace imagenbd::protocol {

Errno to_nbd_error(int e, bool fast_zero, bool df) {
  switch (e) {
    case 0:
      return Errno::ok;
    case EROFS:
    case EPERM:
    case EACCES:
      return Errno::perm;
    case EIO:
      return Errno::io;
    case ENOMEM:
      return Errno::nomem;
    case EINVAL:
      return Errno::inval;
    case ENOSPC:
    case EFBIG:
    case EDQUOT:
      return Errno::nospc;
    case EOVERFLOW:
      return df ? Errno::overflow : Errno::inval;
    case ENOTSUP:
      return fast_zero ? Errno::notsup : Errno::inval;
    case ESHUTDOWN:
      return Errno::shutdown;
    default:
      return Errno::io;
  }
}

int to_errno(Errno error) {
  switch (error) {
    case Errno::ok:
      return 0;
    case Errno::perm:
      return EPERM;
    case Errno::io:
      return EIO;
    case Errno::nomem:
      return ENOMEM;
    case Errno::inval:
      return EINVAL;
    case Errno::nospc:
      return ENOSPC;
    case Errno::overflow:
      return EOVERFLOW;
    case Errno::notsup:
      return ENOTSUP;
    case Errno::shutdown:
      return ESHUTDOWN;
  }
  return EINVAL;
}

std::string_view name(Opt option) {
  switch (option) {
    case Opt::export_name:
      return "NBD_OPT_EXPORT_NAME";
    case Opt::abort:
      return "NBD_OPT_ABORT";
    case Opt::list:
      return "NBD_OPT_LIST";
    case Opt::peek_export:
      return "NBD_OPT_PEEK_EXPORT";
    case Opt::starttls:
      return "NBD_OPT_STARTTLS";
    case Opt::info:
      return "NBD_OPT_INFO";
    case Opt::go:
      return "NBD_OPT_GO";
    case Opt::structured_reply:
      return "NBD_OPT_STRUCTURED_REPLY";
    case Opt::list_meta_context:
      return "NBD_OPT_LIST_META_CONTEXT";
    case Opt::set_meta_context:
      return "NBD_OPT_SET_META_CONTEXT";
    case Opt::extended_headers:
      return "NBD_OPT_EXTENDED_HEADERS";
  }
  return "unknown option";
}

std::string_view name(Rep reply) {
  switch (reply) {
    case Rep::ack:
      return "NBD_REP_ACK";
    case Rep::server:
      return "NBD_REP_SERVER";
    case Rep::info:
      return "NBD_REP_INFO";
    case Rep::meta_context:
      return "NBD_REP_META_CONTEXT";
    case Rep::err_unsup:
      return "NBD_REP_ERR_UNSUP";
    case Rep::err_policy:
      return "NBD_REP_ERR_POLICY";
    case Rep::err_invalid:
      return "NBD_REP_ERR_INVALID";
    case Rep::err_platform:
      return "NBD_REP_ERR_PLATFORM";
    case Rep::err_tls_reqd:
      return "NBD_REP_ERR_TLS_REQD";
    case Rep::err_unknown:
      return "NBD_REP_ERR_UNKNOWN";
    case Rep::err_shutdown:
      return "NBD_REP_ERR_SHUTDOWN";
    case Rep::err_block_size_reqd:
      return "NBD_REP_ERR_BLOCK_SIZE_REQD";
    case Rep::err_too_big:
      return "NBD_REP_ERR_TOO_BIG";
  }
  return "unknown reply";
}

std::string_view name(Cmd command) {
  switch (command) {
    case Cmd::read:
      return "NBD_CMD_READ";
    case Cmd::write:
      return "NBD_CMD_WRITE";
    case Cmd::disc:
      return "NBD_CMD_DISC";
    case Cmd::flush:
      return "NBD_CMD_FLUSH";
    case Cmd::trim:
      return "NBD_CMD_TRIM";
    case Cmd::cache:
      return "NBD_CMD_CACHE";
    case Cmd::write_zeroes:
      return "NBD_CMD_WRITE_ZEROES";
    case Cmd::block_status:
      return "NBD_CMD_BLOCK_STATUS";
    case Cmd::resize:
      return "NBD_CMD_RESIZE";
  }
  return "unknown command";
}

std::string_view name(Errno error) {
  switch (error) {
    case Errno::ok:
      return "OK";
    case Errno::perm:
      return "EPERM";
    case Errno::io:
      return "EIO";
    case Errno::nomem:
      return "ENOMEM";
    case Errno::inval:
      return "EINVAL";
    case Errno::nospc:
      return "ENOSPC";
    case Errno::overflow:
      return "EOVERFLOW";
    case Errno::notsup:
      return "ENOTSUP";
    case Errno::shutdown:
      return "ESHUTDOWN";
  }
  return "unknown error";
}

}  // namespace imagenbd::protocol
