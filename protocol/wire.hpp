// NBD wire constants, named and numbered as in the NBD protocol specification
// (NetworkBlockDevice/nbd doc/proto.md; our digest is shared/docs/protocol.md).
// Everything on the wire is big-endian; see endian.hpp for load/store helpers.
#pragma once

#include <cstdint>

namespace imagenbd::protocol {

// §1 Magic numbers.
inline constexpr uint64_t nbd_magic = 0x4e42444d41474943ULL;           // "NBDMAGIC"
inline constexpr uint64_t ihaveopt = 0x49484156454F5054ULL;            // "IHAVEOPT"
inline constexpr uint64_t option_reply_magic = 0x0003e889045565a9ULL;  // fixed newstyle replies
inline constexpr uint32_t request_magic = 0x25609513;                  // compact 28-byte request
inline constexpr uint32_t simple_reply_magic = 0x67446698;
inline constexpr uint32_t structured_reply_magic = 0x668e33ef;

// Sizes of fixed-length frames.
inline constexpr std::size_t greeting_size = 18;       // NBDMAGIC + IHAVEOPT + u16 flags
inline constexpr std::size_t option_header_size = 16;  // IHAVEOPT + u32 option + u32 length
inline constexpr std::size_t option_reply_header_size = 20;
inline constexpr std::size_t request_size = 28;
inline constexpr std::size_t simple_reply_size = 16;
inline constexpr std::size_t structured_reply_header_size = 20;
inline constexpr std::size_t export_name_padding = 124;  // zeroes after the EXPORT_NAME reply

// §2 Handshake flags (server -> client, u16) and client flags (u32).
namespace handshake_flag {
inline constexpr uint16_t fixed_newstyle = 1u << 0;
inline constexpr uint16_t no_zeroes = 1u << 1;
}  // namespace handshake_flag
namespace client_flag {
inline constexpr uint32_t fixed_newstyle = 1u << 0;
inline constexpr uint32_t no_zeroes = 1u << 1;
}  // namespace client_flag

// §4 Options.
enum class Opt : uint32_t {
  export_name = 1,
  abort = 2,
  list = 3,
  peek_export = 4,  // withdrawn; treated as unknown
  starttls = 5,
  info = 6,
  go = 7,
  structured_reply = 8,
  list_meta_context = 9,
  set_meta_context = 10,
  extended_headers = 11,  // experimental; not implemented (answered ERR_UNSUP)
};

// §5 Option reply types. Errors have bit 31 set.
enum class Rep : uint32_t {
  ack = 1,
  server = 2,
  info = 3,
  meta_context = 4,
  err_unsup = 0x80000001,
  err_policy = 0x80000002,
  err_invalid = 0x80000003,
  err_platform = 0x80000004,
  err_tls_reqd = 0x80000005,
  err_unknown = 0x80000006,
  err_shutdown = 0x80000007,
  err_block_size_reqd = 0x80000008,
  err_too_big = 0x80000009,
};

// §6 Information types inside NBD_REP_INFO.
enum class Info : uint16_t {
  export_ = 0,
  name = 1,
  description = 2,
  block_size = 3,
};

// §7 Transmission flags (u16).
namespace tx_flag {
inline constexpr uint16_t has_flags = 1u << 0;
inline constexpr uint16_t read_only = 1u << 1;
inline constexpr uint16_t send_flush = 1u << 2;
inline constexpr uint16_t send_fua = 1u << 3;
inline constexpr uint16_t rotational = 1u << 4;
inline constexpr uint16_t send_trim = 1u << 5;
inline constexpr uint16_t send_write_zeroes = 1u << 6;
inline constexpr uint16_t send_df = 1u << 7;
inline constexpr uint16_t can_multi_conn = 1u << 8;
inline constexpr uint16_t send_resize = 1u << 9;
inline constexpr uint16_t send_cache = 1u << 10;
inline constexpr uint16_t send_fast_zero = 1u << 11;
}  // namespace tx_flag

// §9 Commands.
enum class Cmd : uint16_t {
  read = 0,
  write = 1,
  disc = 2,
  flush = 3,
  trim = 4,
  cache = 5,
  write_zeroes = 6,
  block_status = 7,
  resize = 8,  // experimental; not implemented (EINVAL)
};

// §10 Command flags (u16).
namespace cmd_flag {
inline constexpr uint16_t fua = 1u << 0;
inline constexpr uint16_t no_hole = 1u << 1;
inline constexpr uint16_t df = 1u << 2;
inline constexpr uint16_t req_one = 1u << 3;
inline constexpr uint16_t fast_zero = 1u << 4;
}  // namespace cmd_flag

// §11 Structured reply chunk types and flags.
enum class ReplyType : uint16_t {
  none = 0,
  offset_data = 1,
  offset_hole = 2,
  block_status = 5,
  error = 0x8001,
  error_offset = 0x8002,
};
namespace reply_flag {
inline constexpr uint16_t done = 1u << 0;
}  // namespace reply_flag

// §13 base:allocation status flags.
namespace state {
inline constexpr uint32_t hole = 1u << 0;
inline constexpr uint32_t zero = 1u << 1;
}  // namespace state
inline constexpr char base_allocation[] = "base:allocation";

// §17 Error values carried in replies (fixed protocol numbers).
enum class Errno : uint32_t {
  ok = 0,
  perm = 1,
  io = 5,
  nomem = 12,
  inval = 22,
  nospc = 28,
  overflow = 75,
  notsup = 95,
  shutdown = 108,
};

// Limits we enforce on the wire.
inline constexpr uint32_t max_string_length = 4096;          // names, queries, messages
inline constexpr uint32_t max_extents_per_chunk = 1u << 20;  // §11 block status cap

}  // namespace imagenbd::protocol
