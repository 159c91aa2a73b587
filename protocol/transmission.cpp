#include "protocol/transmission.hpp"

#include <algorithm>

#include "protocol/endian.hpp"

namespace imagenbd::protocol {

RequestDecode decode_request(std::span<const std::byte> in) {
  if (in.size() < request_size) return {DecodeStatus::need_more, {}};
  const std::byte* p = in.data();
  if (load_be32(p) != request_magic) return {DecodeStatus::bad_magic, {}};
  Request r;
  r.flags = load_be16(p + 4);
  r.type = load_be16(p + 6);
  r.cookie = load_be64(p + 8);
  r.offset = load_be64(p + 16);
  r.length = load_be32(p + 24);
  return {DecodeStatus::ok, r};
}

void encode_request(std::byte* out, const Request& r) {
  store_be32(out, request_magic);
  store_be16(out + 4, r.flags);
  store_be16(out + 6, r.type);
  store_be64(out + 8, r.cookie);
  store_be64(out + 16, r.offset);
  store_be32(out + 24, r.length);
}

void encode_simple_reply(std::byte* out, Errno error, uint64_t cookie) {
  store_be32(out, simple_reply_magic);
  store_be32(out + 4, static_cast<uint32_t>(error));
  store_be64(out + 8, cookie);
}

void encode_chunk_header(std::byte* out, uint16_t flags, ReplyType type, uint64_t cookie,
                         uint32_t payload_length) {
  store_be32(out, structured_reply_magic);
  store_be16(out + 4, flags);
  store_be16(out + 6, static_cast<uint16_t>(type));
  store_be64(out + 8, cookie);
  store_be32(out + 16, payload_length);
}

void encode_offset_data_prefix(std::byte* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                               uint32_t data_length) {
  encode_chunk_header(out, flags, ReplyType::offset_data, cookie, data_length + 8);
  store_be64(out + structured_reply_header_size, offset);
}

void encode_offset_hole(std::byte* out, uint16_t flags, uint64_t cookie, uint64_t offset,
                        uint32_t hole_length) {
  encode_chunk_header(out, flags, ReplyType::offset_hole, cookie, 12);
  store_be64(out + structured_reply_header_size, offset);
  store_be32(out + structured_reply_header_size + 8, hole_length);
}

void encode_none(std::byte* out, uint64_t cookie) {
  encode_chunk_header(out, reply_flag::done, ReplyType::none, cookie, 0);
}

void append_block_status(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie,
                         uint32_t context_id, std::span<const StatusExtent> extents) {
  const auto length = static_cast<uint32_t>(4 + 8 * extents.size());
  const std::size_t start = out.size();
  out.resize(start + structured_reply_header_size + length);
  std::byte* p = out.data() + start;
  encode_chunk_header(p, flags, ReplyType::block_status, cookie, length);
  p += structured_reply_header_size;
  store_be32(p, context_id);
  p += 4;
  for (const auto& e : extents) {
    store_be32(p, e.length);
    store_be32(p + 4, e.flags);
    p += 8;
  }
}

namespace {
void append_error_chunk(std::vector<std::byte>& out, uint16_t flags, ReplyType type,
                        uint64_t cookie, Errno error, std::string_view message,
                        const uint64_t* offset) {
  // Messages are UTF-8 strings: cut before a continuation byte, never inside a character.
  if (message.size() > max_string_length) {
    std::size_t n = max_string_length;
    while (n > 0 && (static_cast<unsigned char>(message[n]) & 0xC0) == 0x80) --n;
    message = message.substr(0, n);
  }
  const auto length = static_cast<uint32_t>(6 + message.size() + (offset ? 8 : 0));
  const std::size_t start = out.size();
  out.resize(start + structured_reply_header_size);
  encode_chunk_header(out.data() + start, flags, type, cookie, length);
  put_be32(out, static_cast<uint32_t>(error));
  put_be16(out, static_cast<uint16_t>(message.size()));
  put_bytes(out, message.data(), message.size());
  if (offset) put_be64(out, *offset);
}
}  // namespace

void append_error(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie, Errno error,
                  std::string_view message) {
  append_error_chunk(out, flags, ReplyType::error, cookie, error, message, nullptr);
}

void append_error_offset(std::vector<std::byte>& out, uint16_t flags, uint64_t cookie, Errno error,
                         std::string_view message, uint64_t offset) {
  append_error_chunk(out, flags, ReplyType::error_offset, cookie, error, message, &offset);
}

ReplyDecode decode_reply_header(std::span<const std::byte> in) {
  ReplyDecode d{DecodeStatus::need_more};
  if (in.size() < 4) return d;
  const uint32_t magic = load_be32(in.data());
  if (magic == simple_reply_magic) {
    if (in.size() < simple_reply_size) return d;
    d.status = DecodeStatus::ok;
    d.simple = {static_cast<Errno>(load_be32(in.data() + 4)), load_be64(in.data() + 8)};
    d.consumed = simple_reply_size;
    return d;
  }
  if (magic == structured_reply_magic) {
    if (in.size() < structured_reply_header_size) return d;
    d.status = DecodeStatus::ok;
    d.structured = true;
    d.chunk = {load_be16(in.data() + 4), load_be16(in.data() + 6), load_be64(in.data() + 8),
               load_be32(in.data() + 16)};
    d.consumed = structured_reply_header_size;
    return d;
  }
  d.status = DecodeStatus::bad_magic;
  return d;
}

}  // namespace imagenbd::protocol
