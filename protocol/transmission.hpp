// Transmission-phase codecs: the compact 28-byte request, the 16-byte simple reply and
// structured reply chunks (NBD spec "Transmission phase", "Structured reply chunk message
// types"). Decoders read from a span and report need_more; encoders append to or fill a
// caller-owned buffer. Nothing here knows about exports: range checks live in server/.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "protocol/wire.hpp"

namespace imagenbd::protocol {

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;  // a Cmd value, or an unknown number the server must refuse
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;

  Cmd command() const { return static_cast<Cmd>(type); }
};

enum class DecodeStatus { ok, need_more, bad_magic };

struct RequestDecode {
  DecodeStatus status;
  Request request;  // valid when status == ok; request_size bytes were consumed
};

RequestDecode decode_request(std::span<const std::byte> in);
// Fills exactly request_size bytes (used by tests and clients).
void encode_request(std::byte* out, const Request& request);

// Simple reply: 16 bytes.
void encode_simple_reply(std::byte* out, Errno error, uint64_t cookie);

// Structured reply chunk header: 20 bytes.
void encode_chunk_header(std::byte* out, uint16_t flags, ReplyType type, uint64_t cookie,
                         uint32_t payload_length);

// Sizes of the fixed parts of the chunks below (header included).
inline constexpr std::size_t offset_data_prefix = structured_reply_header_size + 8;
inline constexpr std::size_t offset_hole_size = structured_reply_header_size + 12;
inline constexpr std::size_t none_chunk_size = structured_reply_header_size;

// OFFSET_DATA: header + u64 offset; the data_length bytes of data follow separately
// (so they can be sent from the buffer they were read into).
void encode_offset_data_prefix(std::byte* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                               uint32_t data_length);
void encode_offset_hole(std::byte* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                        uint32_t hole_length);
void encode_none(std::byte* out, uint64_t cookie);  // NONE with DONE set

struct StatusExtent {
  uint32_t length;
  uint32_t flags;  // state::hole | state::zero
};
// BLOCK_STATUS chunk for one context; extents must be non-empty.
void append_block_status(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                         uint32_t context_id, std::span<const StatusExtent> extents);
// ERROR chunk (message cut to max_string_length bytes).
void append_error(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie, Errno error,
                  std::string_view message);
// ERROR_OFFSET chunk.
void append_error_offset(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie, Errno error,
                         std::string_view message, uint64_t offset);

// Reply decoders, for clients and tests.
struct SimpleReply {
  Errno error;
  uint64_t cookie;
};
struct ChunkHeader {
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint32_t length;
};
struct ReplyDecode {
  DecodeStatus status;
  bool structured = false;
  SimpleReply simple{};
  ChunkHeader chunk{};
  std::size_t consumed = 0;
};
// Decodes either reply header (16-byte simple or 20-byte chunk header) by its magic.
ReplyDecode decode_reply_header(std::span<const std::byte> in);

}  // namespace imagenbd::protocol
