// Tests for the transmission-phase codecs (protocol/transmission.hpp) and the wire
// constants they use. Expected bytes are hand-written from the layouts in
// shared/docs/protocol.md §8 and §11, never produced by the encoders under test.
// Decoders are also run over streams cut at every byte position.
#include "protocol/transmission.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace imagenbd::protocol;
using Bytes = std::vector<std::byte>;

// "25609513 0001" -> bytes; spaces are ignored. No doctest macros: it also runs during
// static initialisation.
Bytes hex(std::string_view text) {
  Bytes out;
  int half = -1;
  for (char c : text) {
    if (c == ' ' || c == '\n') continue;
    int v = (c >= '0' && c <= '9')   ? c - '0'
            : (c >= 'a' && c <= 'f') ? c - 'a' + 10
            : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                     : -1;
    if (v < 0) throw std::invalid_argument("bad hex digit in test data");
    if (half < 0) {
      half = v;
    } else {
      out.push_back(static_cast<std::byte>(half * 16 + v));
      half = -1;
    }
  }
  if (half >= 0) throw std::invalid_argument("odd number of hex digits in test data");
  return out;
}

std::string to_hex(const Bytes& b) {
  static const char digits[] = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < b.size(); ++i) {
    const auto v = std::to_integer<unsigned>(b[i]);
    s += digits[v >> 4];
    s += digits[v & 15];
    if (i % 4 == 3 && i + 1 < b.size()) s += ' ';
  }
  return s;
}

Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

// magic, flags FUA|FAST_ZERO, type WRITE_ZEROES, cookie, offset 2^32+512, length 1 MiB.
const Bytes write_zeroes_request =
    hex("25609513 0011 0006 0102030405060708 0000000100000200 00100000");
// magic, no flags, READ, cookie 0xfedcba9876543210, offset 0, length 4096.
const Bytes read_request = hex("25609513 0000 0000 fedcba9876543210 0000000000000000 00001000");

bool same(const Request& a, const Request& b) {
  return a.flags == b.flags && a.type == b.type && a.cookie == b.cookie && a.offset == b.offset &&
         a.length == b.length;
}

// Decodes a stream of requests fed in pieces cut at `cuts`, the way a session would:
// append, decode while complete frames are buffered.
struct StreamResult {
  std::vector<Request> requests;
  bool bad_magic = false;
  std::size_t leftover = 0;
};
StreamResult decode_stream(const Bytes& stream, const std::vector<std::size_t>& cuts) {
  StreamResult r;
  Bytes buffer;
  std::size_t pos = 0;
  auto feed_to = [&](std::size_t end) {
    buffer.insert(buffer.end(), stream.begin() + static_cast<std::ptrdiff_t>(pos),
                  stream.begin() + static_cast<std::ptrdiff_t>(end));
    pos = end;
    while (!r.bad_magic) {
      const auto d = decode_request(buffer);
      if (d.status == DecodeStatus::need_more) break;
      if (d.status == DecodeStatus::bad_magic) {
        r.bad_magic = true;
        break;
      }
      r.requests.push_back(d.request);
      buffer.erase(buffer.begin(), buffer.begin() + request_size);
    }
  };
  for (auto c : cuts) feed_to(c);
  feed_to(stream.size());
  r.leftover = buffer.size();
  return r;
}

bool same(const StreamResult& a, const StreamResult& b) {
  if (a.requests.size() != b.requests.size() || a.bad_magic != b.bad_magic ||
      a.leftover != b.leftover) {
    return false;
  }
  for (std::size_t i = 0; i < a.requests.size(); ++i) {
    if (!same(a.requests[i], b.requests[i])) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("wire constants match the spec tables") {
  // §1 magics.
  CHECK(nbd_magic == 0x4e42444d41474943ULL);
  CHECK(ihaveopt == 0x49484156454F5054ULL);
  CHECK(option_reply_magic == 0x0003e889045565a9ULL);
  CHECK(request_magic == 0x25609513u);
  CHECK(simple_reply_magic == 0x67446698u);
  CHECK(structured_reply_magic == 0x668e33efu);
  // §8 sizes.
  CHECK(request_size == 28);
  CHECK(simple_reply_size == 16);
  CHECK(structured_reply_header_size == 20);
  CHECK(offset_data_prefix == 28);
  CHECK(offset_hole_size == 32);
  CHECK(none_chunk_size == 20);
  // §7 transmission flags.
  CHECK(tx_flag::has_flags == 0x0001);
  CHECK(tx_flag::read_only == 0x0002);
  CHECK(tx_flag::send_flush == 0x0004);
  CHECK(tx_flag::send_fua == 0x0008);
  CHECK(tx_flag::rotational == 0x0010);
  CHECK(tx_flag::send_trim == 0x0020);
  CHECK(tx_flag::send_write_zeroes == 0x0040);
  CHECK(tx_flag::send_df == 0x0080);
  CHECK(tx_flag::can_multi_conn == 0x0100);
  CHECK(tx_flag::send_resize == 0x0200);
  CHECK(tx_flag::send_cache == 0x0400);
  CHECK(tx_flag::send_fast_zero == 0x0800);
  // §9 commands, §10 command flags.
  CHECK(static_cast<uint16_t>(Cmd::read) == 0);
  CHECK(static_cast<uint16_t>(Cmd::write) == 1);
  CHECK(static_cast<uint16_t>(Cmd::disc) == 2);
  CHECK(static_cast<uint16_t>(Cmd::flush) == 3);
  CHECK(static_cast<uint16_t>(Cmd::trim) == 4);
  CHECK(static_cast<uint16_t>(Cmd::cache) == 5);
  CHECK(static_cast<uint16_t>(Cmd::write_zeroes) == 6);
  CHECK(static_cast<uint16_t>(Cmd::block_status) == 7);
  CHECK(static_cast<uint16_t>(Cmd::resize) == 8);
  CHECK(cmd_flag::fua == 0x0001);
  CHECK(cmd_flag::no_hole == 0x0002);
  CHECK(cmd_flag::df == 0x0004);
  CHECK(cmd_flag::req_one == 0x0008);
  CHECK(cmd_flag::fast_zero == 0x0010);
  // §11 chunk types and flags, §13 base:allocation.
  CHECK(static_cast<uint16_t>(ReplyType::none) == 0);
  CHECK(static_cast<uint16_t>(ReplyType::offset_data) == 1);
  CHECK(static_cast<uint16_t>(ReplyType::offset_hole) == 2);
  CHECK(static_cast<uint16_t>(ReplyType::block_status) == 5);
  CHECK(static_cast<uint16_t>(ReplyType::error) == 0x8001);
  CHECK(static_cast<uint16_t>(ReplyType::error_offset) == 0x8002);
  CHECK(reply_flag::done == 0x0001);
  CHECK(state::hole == 0x1);
  CHECK(state::zero == 0x2);
  CHECK(std::string_view(base_allocation) == "base:allocation");
  CHECK(max_string_length == 4096);
  CHECK(max_extents_per_chunk == (1u << 20));
}

TEST_CASE("decode_request: exact fields from a known byte sequence") {
  const auto d = decode_request(write_zeroes_request);
  REQUIRE(d.status == DecodeStatus::ok);
  CHECK(d.request.flags == (cmd_flag::fua | cmd_flag::fast_zero));
  CHECK(d.request.type == 6);
  CHECK(d.request.command() == Cmd::write_zeroes);
  CHECK(d.request.cookie == 0x0102030405060708ULL);
  CHECK(d.request.offset == 0x0000000100000200ULL);
  CHECK(d.request.length == 0x00100000u);

  // All ones everywhere but the magic; an unknown command number is kept for the server
  // to refuse.
  const auto ones =
      decode_request(hex("25609513 ffff ffff ffffffffffffffff ffffffffffffffff ffffffff"));
  REQUIRE(ones.status == DecodeStatus::ok);
  CHECK(ones.request.flags == 0xffff);
  CHECK(ones.request.type == 0xffff);
  CHECK(ones.request.cookie == ~0ULL);
  CHECK(ones.request.offset == ~0ULL);
  CHECK(ones.request.length == ~0u);
}

TEST_CASE("decode_request: need_more for every prefix shorter than 28 bytes") {
  for (std::size_t n = 0; n < 28; ++n) {
    CAPTURE(n);
    const Bytes prefix(write_zeroes_request.begin(),
                       write_zeroes_request.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK(decode_request(prefix).status == DecodeStatus::need_more);
  }
  CHECK(decode_request(write_zeroes_request).status == DecodeStatus::ok);
}

TEST_CASE("decode_request: bad magic") {
  // Extended-header request, the pre-2.1.116 request magic, the transaction-log marker,
  // the reply magics and a byte-swapped magic.
  for (const char* magic :
       {"21e41c71", "12560953", "25609514", "67446698", "668e33ef", "13956025", "00000000"}) {
    CAPTURE(magic);
    const Bytes frame =
        cat({hex(magic), hex("0000 0000 0000000000000001 0000000000000000 00000200")});
    REQUIRE(frame.size() == 28);
    CHECK(decode_request(frame).status == DecodeStatus::bad_magic);
  }
}

TEST_CASE("decode_request: two back-to-back requests, and extra bytes are not read") {
  const Bytes two = cat({write_zeroes_request, read_request});
  const auto first = decode_request(two);
  REQUIRE(first.status == DecodeStatus::ok);
  CHECK(first.request.command() == Cmd::write_zeroes);
  CHECK(first.request.cookie == 0x0102030405060708ULL);
  const auto second = decode_request(std::span(two).subspan(request_size));
  REQUIRE(second.status == DecodeStatus::ok);
  CHECK(second.request.command() == Cmd::read);
  CHECK(second.request.flags == 0);
  CHECK(second.request.cookie == 0xfedcba9876543210ULL);
  CHECK(second.request.offset == 0);
  CHECK(second.request.length == 4096);
  CHECK(decode_request(std::span(two).subspan(2 * request_size)).status == DecodeStatus::need_more);
}

TEST_CASE("decode_request: a stream split at every byte decodes the same") {
  // Two requests, then half of a third with a bad magic at the start of the next frame.
  const Bytes stream = cat({write_zeroes_request, read_request, read_request,
                            hex("26609513 0000 0000 0000000000000000 00000000")});
  const StreamResult whole = decode_stream(stream, {});
  REQUIRE(whole.requests.size() == 3);
  CHECK_FALSE(whole.bad_magic);  // only 20 bytes of the bad frame: still need_more
  CHECK(whole.leftover == 20);

  for (std::size_t k = 0; k <= stream.size(); ++k) {
    CAPTURE(k);
    CHECK(same(decode_stream(stream, {k}), whole));
  }
  // One byte at a time.
  std::vector<std::size_t> every_byte;
  for (std::size_t i = 1; i < stream.size(); ++i) every_byte.push_back(i);
  const StreamResult bytewise = decode_stream(stream, every_byte);
  CHECK(same(bytewise, whole));

  // Completing the bad frame reports bad_magic.
  const Bytes completed = cat({stream, hex("00000000 00000000")});
  const StreamResult bad = decode_stream(completed, {});
  CHECK(bad.requests.size() == 3);
  CHECK(bad.bad_magic);
}

TEST_CASE("encode_request: the spec layout, and decode(encode(r)) == r") {
  Request r;
  r.flags = cmd_flag::fua | cmd_flag::fast_zero;
  r.type = static_cast<uint16_t>(Cmd::write_zeroes);
  r.cookie = 0x0102030405060708ULL;
  r.offset = 0x0000000100000200ULL;
  r.length = 0x00100000;
  Bytes out(request_size);
  encode_request(out.data(), r);
  CHECK(to_hex(out) == to_hex(write_zeroes_request));

  const Request samples[] = {
      {0, 0, 0, 0, 0},
      {0xffff, 0xffff, ~0ULL, ~0ULL, ~0u},
      {cmd_flag::df, static_cast<uint16_t>(Cmd::read), 0x8000000000000001ULL, 1ULL << 40, 65536},
      {cmd_flag::req_one, static_cast<uint16_t>(Cmd::block_status), 7, 512, 0xfffffe00},
      {0, static_cast<uint16_t>(Cmd::disc), 42, 0, 0},
      {0, 0x1234, 0x0102030405060708ULL, 0x1112131415161718ULL, 0x21222324},
  };
  for (const auto& s : samples) {
    Bytes frame(request_size);
    encode_request(frame.data(), s);
    const auto d = decode_request(frame);
    REQUIRE(d.status == DecodeStatus::ok);
    CHECK(same(d.request, s));
  }
}

TEST_CASE("encode_simple_reply") {
  Bytes out(simple_reply_size);
  encode_simple_reply(out.data(), Errno::nospc, 0xdeadbeefcafebabeULL);
  CHECK(to_hex(out) == to_hex(hex("67446698 0000001c deadbeefcafebabe")));
  encode_simple_reply(out.data(), Errno::ok, 1);
  CHECK(to_hex(out) == to_hex(hex("67446698 00000000 0000000000000001")));
  encode_simple_reply(out.data(), Errno::shutdown, ~0ULL);
  CHECK(to_hex(out) == to_hex(hex("67446698 0000006c ffffffffffffffff")));
}

TEST_CASE("encode_chunk_header") {
  Bytes out(structured_reply_header_size);
  encode_chunk_header(out.data(), reply_flag::done, ReplyType::offset_hole, 0x0102030405060708ULL,
                      12);
  CHECK(to_hex(out) == to_hex(hex("668e33ef 0001 0002 0102030405060708 0000000c")));
  encode_chunk_header(out.data(), 0, ReplyType::error_offset, 0, 0xffffffff);
  CHECK(to_hex(out) == to_hex(hex("668e33ef 0000 8002 0000000000000000 ffffffff")));
}

TEST_CASE("OFFSET_DATA prefix: header with length 8 + data, then the offset") {
  Bytes out(offset_data_prefix);
  encode_offset_data_prefix(out.data(), 0, 0x1122334455667788ULL, 0x1000, 512);
  CHECK(to_hex(out) ==
        to_hex(hex("668e33ef 0000 0001 1122334455667788 00000208 0000000000001000")));
  encode_offset_data_prefix(out.data(), reply_flag::done, 5, 0xfffffffffffff000ULL, 1);
  CHECK(to_hex(out) ==
        to_hex(hex("668e33ef 0001 0001 0000000000000005 00000009 fffffffffffff000")));
}

TEST_CASE("OFFSET_HOLE: length 12, offset and hole size") {
  Bytes out(offset_hole_size);
  encode_offset_hole(out.data(), reply_flag::done, 0x1122334455667788ULL, 0x2000, 0x10000);
  CHECK(to_hex(out) ==
        to_hex(hex("668e33ef 0001 0002 1122334455667788 0000000c 0000000000002000 00010000")));
}

TEST_CASE("NONE: DONE set, length 0") {
  Bytes out(none_chunk_size);
  encode_none(out.data(), 0x1122334455667788ULL);
  CHECK(to_hex(out) == to_hex(hex("668e33ef 0001 0000 1122334455667788 00000000")));
}

TEST_CASE("BLOCK_STATUS: context id and n extents, appended") {
  const StatusExtent extents[] = {
      {0x1000, 0}, {0x3000, state::hole | state::zero}, {0x200, state::zero}};
  Bytes out = hex("aabb");  // earlier bytes in the buffer are kept
  append_block_status(out, reply_flag::done, 0x1122334455667788ULL, 1, extents);
  CHECK(to_hex(out) == to_hex(hex("aabb"
                                  "668e33ef 0001 0005 1122334455667788 0000001c"
                                  "00000001"
                                  "00001000 00000000"
                                  "00003000 00000003"
                                  "00000200 00000002")));

  const StatusExtent one[] = {{0xfffffe00, state::hole}};
  Bytes single;
  append_block_status(single, 0, 9, 0x01020304, one);
  CHECK(to_hex(single) == to_hex(hex("668e33ef 0000 0005 0000000000000009 0000000c"
                                     "01020304 fffffe00 00000001")));
}

TEST_CASE("BLOCK_STATUS at the 2^20-extent cap: length 4 + 8 * 2^20 (protocol.md §11, §23)") {
  const std::vector<StatusExtent> extents(max_extents_per_chunk, StatusExtent{512, state::zero});
  Bytes out;
  append_block_status(out, reply_flag::done, 1, 1, extents);
  REQUIRE(out.size() == 20 + 4 + 8 * (std::size_t{1} << 20));
  CHECK(to_hex(Bytes(out.begin(), out.begin() + 32)) ==
        to_hex(hex("668e33ef 0001 0005 0000000000000001 00800004 00000001 00000200 00000002")));
  CHECK(to_hex(Bytes(out.end() - 8, out.end())) == to_hex(hex("00000200 00000002")));
}

TEST_CASE("ERROR: u32 error, u16 message length, message") {
  Bytes out;
  append_error(out, reply_flag::done, 0x1122334455667788ULL, Errno::io, "bad");
  CHECK(to_hex(out) ==
        to_hex(hex("668e33ef 0001 8001 1122334455667788 00000009 00000005 0003 626164")));

  Bytes empty;
  append_error(empty, reply_flag::done, 1, Errno::inval, "");
  CHECK(to_hex(empty) == to_hex(hex("668e33ef 0001 8001 0000000000000001 00000006 00000016 0000")));

  // Appending keeps what was there.
  Bytes two = hex("01");
  append_error(two, 0, 2, Errno::perm, "x");
  CHECK(to_hex(two) ==
        to_hex(hex("01 668e33ef 0000 8001 0000000000000002 00000007 00000001 0001 78")));
}

TEST_CASE("ERROR_OFFSET: error, message, then the u64 offset") {
  Bytes out;
  append_error_offset(out, reply_flag::done, 0x1122334455667788ULL, Errno::inval, "x", 0x1234);
  CHECK(to_hex(out) == to_hex(hex("668e33ef 0001 8002 1122334455667788 0000000f"
                                  "00000016 0001 78 0000000000001234")));
  Bytes no_message;
  append_error_offset(no_message, 0, 3, Errno::io, "", ~0ULL);
  CHECK(to_hex(no_message) == to_hex(hex("668e33ef 0000 8002 0000000000000003 0000000e"
                                         "00000005 0000 ffffffffffffffff")));
}

TEST_CASE("error messages are cut at 4096 bytes") {
  const std::string exact(4096, 'm');
  const std::string longer = exact + "overflow";

  SUBCASE("ERROR") {
    for (const std::string* message : {&exact, &longer}) {
      Bytes out;
      append_error(out, reply_flag::done, 7, Errno::io, *message);
      const Bytes head = hex("668e33ef 0001 8001 0000000000000007 00001006 00000005 1000");
      REQUIRE(out.size() == head.size() + 4096);
      CHECK(to_hex(Bytes(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(head.size()))) ==
            to_hex(head));
      CHECK(std::string_view(reinterpret_cast<const char*>(out.data()) + head.size(), 4096) ==
            exact);
    }
  }
  SUBCASE("ERROR_OFFSET") {
    for (const std::string* message : {&exact, &longer}) {
      Bytes out;
      append_error_offset(out, reply_flag::done, 7, Errno::io, *message, 0x4000);
      const Bytes head = hex("668e33ef 0001 8002 0000000000000007 0000100e 00000005 1000");
      REQUIRE(out.size() == head.size() + 4096 + 8);
      CHECK(to_hex(Bytes(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(head.size()))) ==
            to_hex(head));
      CHECK(std::string_view(reinterpret_cast<const char*>(out.data()) + head.size(), 4096) ==
            exact);
      CHECK(to_hex(Bytes(out.end() - 8, out.end())) == to_hex(hex("0000000000004000")));
    }
  }
}

TEST_CASE("error messages are cut on a UTF-8 character boundary") {
  // 'a' + 2048 x U+00E9: 4097 bytes; byte 4096 would end on a lead byte.
  std::string message = "a";
  for (int i = 0; i < 2048; ++i) message += "\xc3\xa9";
  const std::string kept = message.substr(0, 4095);
  {
    Bytes out;
    append_error(out, reply_flag::done, 7, Errno::io, message);
    const Bytes head = hex("668e33ef 0001 8001 0000000000000007 00001005 00000005 0fff");
    REQUIRE(out.size() == head.size() + 4095);
    CHECK(to_hex(Bytes(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(head.size()))) ==
          to_hex(head));
    CHECK(std::string_view(reinterpret_cast<const char*>(out.data()) + head.size(), 4095) == kept);
  }
  {
    Bytes out;
    append_error_offset(out, 0, 7, Errno::io, message, 0x4000);
    const Bytes head = hex("668e33ef 0000 8002 0000000000000007 0000100d 00000005 0fff");
    REQUIRE(out.size() == head.size() + 4095 + 8);
    CHECK(to_hex(Bytes(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(head.size()))) ==
          to_hex(head));
    CHECK(std::string_view(reinterpret_cast<const char*>(out.data()) + head.size(), 4095) == kept);
    CHECK(to_hex(Bytes(out.end() - 8, out.end())) == to_hex(hex("0000000000004000")));
  }
  // 3- and 4-byte characters at every alignment: the kept length is 4096 minus the bytes
  // of the character that would have been split.
  for (const std::string character : {"\xe2\x82\xac", "\xf0\x9d\x84\x9e"}) {
    for (std::size_t skew = 0; skew < character.size(); ++skew) {
      std::string text(skew, 'a');
      while (text.size() <= 4096) text += character;
      const std::size_t expected = 4096 - (4096 - skew) % character.size();
      Bytes out;
      append_error(out, 0, 1, Errno::io, text);
      CAPTURE(character.size());
      CAPTURE(skew);
      REQUIRE(out.size() == 26 + expected);
      CHECK(std::to_integer<std::size_t>(out[24]) * 256 + std::to_integer<std::size_t>(out[25]) ==
            expected);
      CHECK(std::string_view(reinterpret_cast<const char*>(out.data()) + 26, expected) ==
            std::string_view(text).substr(0, expected));
    }
  }
}

TEST_CASE("decode_reply_header: simple reply") {
  const Bytes frame = hex("67446698 0000001c deadbeefcafebabe ffff");  // 2 extra bytes
  const auto d = decode_reply_header(frame);
  REQUIRE(d.status == DecodeStatus::ok);
  CHECK_FALSE(d.structured);
  CHECK(d.simple.error == Errno::nospc);
  CHECK(d.simple.cookie == 0xdeadbeefcafebabeULL);
  CHECK(d.consumed == 16);
  for (std::size_t n = 0; n < 16; ++n) {
    CAPTURE(n);
    CHECK(decode_reply_header(std::span(frame).first(n)).status == DecodeStatus::need_more);
  }
  // An error number we do not know is passed through.
  const auto odd = decode_reply_header(hex("67446698 12345678 0000000000000001"));
  REQUIRE(odd.status == DecodeStatus::ok);
  CHECK(static_cast<uint32_t>(odd.simple.error) == 0x12345678u);
}

TEST_CASE("decode_reply_header: structured chunk header") {
  const Bytes frame = hex("668e33ef 0001 8002 1122334455667788 0000000f 00000016");
  const auto d = decode_reply_header(frame);
  REQUIRE(d.status == DecodeStatus::ok);
  CHECK(d.structured);
  CHECK(d.chunk.flags == reply_flag::done);
  CHECK(d.chunk.type == 0x8002);
  CHECK(d.chunk.cookie == 0x1122334455667788ULL);
  CHECK(d.chunk.length == 15);
  CHECK(d.consumed == 20);
  for (std::size_t n = 0; n < 20; ++n) {
    CAPTURE(n);
    CHECK(decode_reply_header(std::span(frame).first(n)).status == DecodeStatus::need_more);
  }
}

TEST_CASE("decode_reply_header: bad magic") {
  // Extended reply chunk, the reserved pre-2.1.116 reply magic, a request magic,
  // byte-swapped simple magic.
  for (const char* magic : {"6e8a278c", "96744668", "25609513", "98664467", "00000000"}) {
    CAPTURE(magic);
    const Bytes frame = cat({hex(magic), hex("0000 0000 0000000000000001 00000000")});
    CHECK(decode_reply_header(frame).status == DecodeStatus::bad_magic);
    CHECK(decode_reply_header(std::span(frame).first(4)).status == DecodeStatus::bad_magic);
  }
}

TEST_CASE("decode_reply_header: a reply stream split at every byte decodes the same") {
  // Simple reply, OFFSET_DATA (4 data bytes), OFFSET_HOLE, NONE, simple reply.
  const Bytes stream =
      hex("67446698 00000000 0000000000000001"
          "668e33ef 0000 0001 0000000000000002 0000000c 0000000000000000 61626364"
          "668e33ef 0000 0002 0000000000000002 0000000c 0000000000000004 00000200"
          "668e33ef 0001 0000 0000000000000002 00000000"
          "67446698 00000005 0000000000000003");
  // Header fields as text, one line per reply; payloads skipped by length.
  auto decode = [&](const std::vector<std::size_t>& cuts) {
    std::string log;
    Bytes buffer;
    std::size_t pos = 0, skip = 0;
    auto feed_to = [&](std::size_t end) {
      buffer.insert(buffer.end(), stream.begin() + static_cast<std::ptrdiff_t>(pos),
                    stream.begin() + static_cast<std::ptrdiff_t>(end));
      pos = end;
      for (;;) {
        if (skip > 0) {
          const std::size_t n = std::min(skip, buffer.size());
          buffer.erase(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(n));
          skip -= n;
          if (skip > 0) break;
        }
        const auto d = decode_reply_header(buffer);
        if (d.status != DecodeStatus::ok) {
          if (d.status == DecodeStatus::bad_magic) log += "bad magic;";
          break;
        }
        if (d.structured) {
          log += "chunk " + std::to_string(d.chunk.flags) + " " + std::to_string(d.chunk.type) +
                 " " + std::to_string(d.chunk.cookie) + " " + std::to_string(d.chunk.length) + ";";
          skip = d.chunk.length;
        } else {
          log += "simple " + std::to_string(static_cast<uint32_t>(d.simple.error)) + " " +
                 std::to_string(d.simple.cookie) + ";";
        }
        buffer.erase(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(d.consumed));
      }
    };
    for (auto c : cuts) feed_to(c);
    feed_to(stream.size());
    return log + " left " + std::to_string(buffer.size());
  };
  const std::string whole = decode({});
  CHECK(whole == "simple 0 1;chunk 0 1 2 12;chunk 0 2 2 12;chunk 1 0 2 0;simple 5 3; left 0");
  for (std::size_t k = 0; k <= stream.size(); ++k) {
    CAPTURE(k);
    CHECK(decode({k}) == whole);
  }
  std::vector<std::size_t> every_byte;
  for (std::size_t i = 1; i < stream.size(); ++i) every_byte.push_back(i);
  CHECK(decode(every_byte) == whole);
}
