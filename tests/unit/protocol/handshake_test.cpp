// Tests for the fixed-newstyle handshake state machine (protocol/handshake.hpp).
// Each transcript is client bytes in, exact server bytes out, and the final state. The
// expected bytes are written from the spec's numbers (shared/docs/protocol.md §2-§6, §13),
// not from wire.hpp, so the constants are checked too. check_transcript() also feeds every
// transcript one byte at a time and split in two at every byte position, and requires
// output and state identical to a single feed. Error replies are matched by option and
// type; their messages only have to be well formed.
#include "protocol/handshake.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tests/unit/support/handshake_bytes.hpp"

namespace {

using imagenbd::protocol::ExportCatalog;
using imagenbd::protocol::ExportInfo;
using imagenbd::protocol::Handshake;
using imagenbd::protocol::HandshakeLimits;
using State = Handshake::State;
using namespace imagenbd::test;  // handshake_bytes.hpp: spec::, Build, cat, opt, ...

// ---------------------------------------------------------------------------------------
// Byte helpers beyond tests/unit/support/handshake_bytes.hpp (Build, cat, opt, the spec's
// numbers).

Bytes repeat(const Bytes& b, std::size_t times) {
  Bytes all;
  for (std::size_t i = 0; i < times; ++i) all.insert(all.end(), b.begin(), b.end());
  return all;
}

std::string hex(std::span<const std::byte> b, std::size_t limit = 48) {
  std::string s;
  char buf[4];
  for (std::size_t i = 0; i < b.size() && i < limit; ++i) {
    std::snprintf(buf, sizeof buf, "%02x", std::to_integer<unsigned>(b[i]));
    s += buf;
    if (i % 4 == 3) s += ' ';
  }
  if (b.size() > limit) s += "... (" + std::to_string(b.size()) + " bytes)";
  return s;
}

// Client frames (§2, §3, §4).
Bytes client_flags(uint32_t flags) {
  return Build().u32(flags);
}
Bytes opt_header(uint32_t option, uint32_t length, uint64_t magic = spec::ihaveopt) {
  return Build().u64(magic).u32(option).u32(length);
}
Bytes opt_text(uint32_t option, std::string_view text) {
  return opt(option, Build().str(text));
}

// Server frames (§3, §5, §6).
Bytes rep(uint32_t option, uint32_t type, const Bytes& data = {}) {
  return Build()
      .u64(spec::option_reply_magic)
      .u32(option)
      .u32(type)
      .u32(static_cast<uint32_t>(data.size()))
      .raw(data);
}
Bytes ack(uint32_t option) {
  return rep(option, spec::rep_ack);
}
Bytes server_reply(std::string_view name, std::string_view description) {
  return rep(spec::opt_list, spec::rep_server,
             Build().u32(static_cast<uint32_t>(name.size())).str(name).str(description));
}
Bytes rep_info_export(uint32_t option, uint64_t size, uint16_t flags) {
  return rep(option, spec::rep_info, Build().u16(spec::info_export).u64(size).u16(flags));
}
Bytes rep_info_name(uint32_t option, std::string_view name) {
  return rep(option, spec::rep_info, Build().u16(spec::info_name).str(name));
}
Bytes rep_info_description(uint32_t option, std::string_view text) {
  return rep(option, spec::rep_info, Build().u16(spec::info_description).str(text));
}
Bytes rep_info_block_size(uint32_t option, uint32_t min, uint32_t preferred, uint32_t max) {
  return rep(option, spec::rep_info,
             Build().u16(spec::info_block_size).u32(min).u32(preferred).u32(max));
}
Bytes rep_meta(uint32_t option, uint32_t id, std::string_view name) {
  return rep(option, spec::rep_meta_context, Build().u32(id).str(name));
}
// EXPORT_NAME's reply: u64 size + u16 flags + 124 zero bytes unless C_NO_ZEROES.
Bytes export_name_reply(uint64_t size, uint16_t flags, bool padded) {
  return Build().u64(size).u16(flags).zeroes(padded ? 124 : 0);
}

// A compact request that follows the handshake; it belongs to the transmission phase.
Bytes a_request() {
  return Build().u32(0x25609513).u16(0).u16(0).u64(0x1122334455667788).u64(0).u32(512);
}

// ---------------------------------------------------------------------------------------
// The catalog: "disk0" (default, has a description) and "ro" (read-only, no description).

constexpr uint64_t disk0_size = 1ull << 30;
constexpr uint16_t disk0_flags =
    0x0d6d;  // HAS_FLAGS FLUSH FUA TRIM ZEROES MULTI_CONN CACHE FAST_ZERO
constexpr uint16_t disk0_flags_df = 0x0ded;  // ... plus SEND_DF (bit 7) after STRUCTURED_REPLY
constexpr uint64_t ro_size = 12345;
constexpr uint16_t ro_flags = 0x0007;  // HAS_FLAGS READ_ONLY FLUSH
constexpr uint16_t ro_flags_df = 0x0087;
constexpr uint32_t max_payload = 32u << 20;
const std::string long_name(4096, 'x');  // the longest legal export name

ExportInfo make_export(std::string name, std::string description, uint64_t size, uint16_t flags,
                       uint32_t block_min) {
  ExportInfo e;
  e.name = std::move(name);
  e.description = std::move(description);
  e.size = size;
  e.flags = flags;
  e.block_min = block_min;
  e.block_preferred = 4096;
  e.block_max = max_payload;
  return e;
}

const ExportCatalog& standard_catalog() {
  static const FakeCatalog catalog{
      {make_export("disk0", "first disk", disk0_size, disk0_flags, 512),
       make_export("ro", "", ro_size, ro_flags, 1)}};
  return catalog;
}
const ExportCatalog& long_name_catalog() {
  static const FakeCatalog catalog{
      {make_export("disk0", "first disk", disk0_size, disk0_flags, 512),
       make_export("ro", "", ro_size, ro_flags, 1), make_export(long_name, "", 4096, 0x0001, 1)}};
  return catalog;
}

// Reply sequences used as "the handshake is still in sync" probes.
Bytes list_replies() {
  return cat({server_reply("disk0", "first disk"), server_reply("ro", ""), ack(spec::opt_list)});
}
// INFO/GO for an export with no info requests: EXPORT and BLOCK_SIZE are always sent.
Bytes plain_disk0(uint32_t option, bool df) {
  return cat({rep_info_export(option, disk0_size, df ? disk0_flags_df : disk0_flags),
              rep_info_block_size(option, 512, 4096, max_payload), ack(option)});
}
Bytes plain_ro(uint32_t option, bool df) {
  return cat({rep_info_export(option, ro_size, df ? ro_flags_df : ro_flags),
              rep_info_block_size(option, 1, 4096, max_payload), ack(option)});
}
const Bytes go_disk0 = opt(spec::opt_go, info_request("disk0", {}));
const Bytes go_ro = opt(spec::opt_go, info_request("ro", {}));
const Bytes structured_reply = opt(spec::opt_structured_reply);
const Bytes list = opt(spec::opt_list);
const Bytes fixed = client_flags(spec::c_fixed_newstyle | spec::c_no_zeroes);

// ---------------------------------------------------------------------------------------
// Transcripts.

// One expected server frame: exact bytes, or an error reply whose message text is free.
struct Expect {
  Expect(Bytes b) : exact(std::move(b)) {}     // NOLINT: implicit on purpose
  Expect(const Build& b) : exact(Bytes(b)) {}  // NOLINT: implicit on purpose
  Expect(uint32_t option_, uint32_t type_) : error(true), option(option_), type(type_) {}
  Bytes exact;
  bool error = false;
  uint32_t option = 0;
  uint32_t type = 0;
};
Expect err(uint32_t option, uint32_t type) {
  return {option, type};
}

struct Summary {
  std::string export_name;
  uint64_t size = 0;
  uint16_t flags = 0;
  bool structured_replies = false;
  bool no_zeroes = false;
  std::optional<uint32_t> base_allocation_id;
  bool operator==(const Summary&) const = default;
};

struct Transcript {
  std::string name;
  Bytes input;                   // everything the client sends after the greeting
  std::vector<Expect> expected;  // everything the server sends after the greeting
  State state = State::negotiating;
  std::size_t unconsumed = 0;  // input bytes left over once the state left negotiating
  std::optional<Summary> negotiated = std::nullopt;  // checked when given
  const ExportCatalog* catalog = &standard_catalog();
  HandshakeLimits limits = {};
  bool shutting_down = false;  // begin_shutdown() before the first byte
};

struct Outcome {
  Bytes out;
  std::size_t consumed = 0;
  State state = State::negotiating;
  std::string close_reason;
  std::optional<Summary> negotiated;
  bool feed_contract_ok = true;  // feed() consumed everything while negotiating
  bool operator==(const Outcome&) const = default;
};

std::string state_name(State s) {
  switch (s) {
    case State::negotiating:
      return "negotiating";
    case State::starttls:
      return "starttls";
    case State::transmission:
      return "transmission";
    case State::closed:
      return "closed";
  }
  return "?";
}

std::string describe(const std::optional<Summary>& s) {
  if (!s) return "none";
  return "export '" + s->export_name.substr(0, 16) + "' size " + std::to_string(s->size) +
         " flags " + std::to_string(s->flags) + " structured " +
         std::to_string(s->structured_replies) + " no_zeroes " + std::to_string(s->no_zeroes) +
         " base:allocation " +
         (s->base_allocation_id ? std::to_string(*s->base_allocation_id) : "none");
}

// Feeds t.input cut at the given positions (ascending); an empty list is a single feed.
Outcome run(const Transcript& t, std::span<const std::size_t> cuts) {
  Handshake hs(*t.catalog, t.limits);
  if (t.shutting_down) hs.begin_shutdown();
  Outcome o;
  std::size_t pos = 0;
  auto feed_to = [&](std::size_t end) {
    if (hs.state() == State::negotiating) {
      const std::span<const std::byte> piece(t.input.data() + pos, end - pos);
      const std::size_t n = hs.feed(piece, o.out);
      if (n > piece.size() || (n < piece.size() && hs.state() == State::negotiating)) {
        o.feed_contract_ok = false;
      }
      o.consumed += n;
    }
    pos = end;
  };
  for (auto cut : cuts) feed_to(cut);
  feed_to(t.input.size());
  o.state = hs.state();
  o.close_reason = hs.close_reason();
  if (o.state == State::transmission) {
    const auto& n = hs.negotiated();
    o.negotiated = Summary{n.export_info.name,   n.export_info.size, n.transmission_flags,
                           n.structured_replies, n.no_zeroes,        n.base_allocation_id};
  }
  return o;
}

std::string difference(const Outcome& want, const Outcome& got) {
  if (want.out != got.out) {
    std::size_t i = 0;
    while (i < want.out.size() && i < got.out.size() && want.out[i] == got.out[i]) ++i;
    return "output differs at byte " + std::to_string(i) + ": want " +
           hex(std::span(want.out).subspan(i)) + ", got " + hex(std::span(got.out).subspan(i));
  }
  if (want.consumed != got.consumed) {
    return "consumed " + std::to_string(got.consumed) + " instead of " +
           std::to_string(want.consumed);
  }
  if (want.state != got.state) return "state " + state_name(got.state);
  if (want.close_reason != got.close_reason) return "close reason '" + got.close_reason + "'";
  if (want.negotiated != got.negotiated) return "negotiated " + describe(got.negotiated);
  if (want.feed_contract_ok != got.feed_contract_ok) return "feed() left bytes while negotiating";
  return "";
}

// Empty when `text` is a valid NBD string for a human (protocol.md preamble: UTF-8, no
// NUL, at most 4096 bytes; we also reject other control characters), else why not.
std::string bad_string(std::span<const std::byte> text) {
  if (text.size() > 4096) return "longer than 4096 bytes";
  for (std::size_t i = 0; i < text.size();) {
    auto at = [&](std::size_t k) { return std::to_integer<unsigned>(text[i + k]); };
    const unsigned c = at(0);
    if (c < 0x20 || c == 0x7f) return "has control byte " + std::to_string(c);
    std::size_t len = 1;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80) {
      len = 1;
    } else if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;  // overlong
      if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;  // overlong
      if (c == 0xf4) hi = 0x8f;  // past U+10FFFF
    } else {
      return "is not UTF-8 (byte " + std::to_string(i) + ")";
    }
    if (text.size() - i < len) return "ends inside a UTF-8 sequence";
    for (std::size_t k = 1; k < len; ++k) {
      const unsigned b = at(k);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xbf)) {
        return "is not UTF-8 (byte " + std::to_string(i + k) + ")";
      }
    }
    i += len;
  }
  return "";
}

// Empty when `out` is exactly the expected frames, else what went wrong first.
std::string mismatch(const Bytes& out, const std::vector<Expect>& expected) {
  std::size_t pos = 0;
  auto be = [&](std::size_t at, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | std::to_integer<uint64_t>(out[at + i]);
    return v;
  };
  for (std::size_t i = 0; i < expected.size(); ++i) {
    const auto& e = expected[i];
    const auto rest = std::span(out).subspan(pos);
    const std::string where = "frame " + std::to_string(i) + " at byte " + std::to_string(pos);
    if (!e.error) {
      if (rest.size() < e.exact.size() ||
          !std::equal(e.exact.begin(), e.exact.end(), rest.begin())) {
        return where + ": want " + hex(e.exact) + ", got " + hex(rest);
      }
      pos += e.exact.size();
      continue;
    }
    if (rest.size() < 20) return where + ": want an error reply, got " + hex(rest);
    const uint64_t magic = be(pos, 8);
    const auto option = static_cast<uint32_t>(be(pos + 8, 4));
    const auto type = static_cast<uint32_t>(be(pos + 12, 4));
    const auto length = static_cast<uint32_t>(be(pos + 16, 4));
    if (magic != spec::option_reply_magic || option != e.option || type != e.type) {
      return where + ": want error reply option " + std::to_string(e.option) + " type " +
             std::to_string(e.type) + ", got " + hex(rest);
    }
    if (length > 4096 || rest.size() - 20 < length) {
      return where + ": bad error message length " + std::to_string(length);
    }
    const std::string bad = bad_string(rest.subspan(20, length));
    if (!bad.empty())
      return where + ": error message " + bad + ": " + hex(rest.subspan(20, length), 4200);
    pos += 20 + length;
  }
  if (pos != out.size()) {
    return "unexpected output after byte " + std::to_string(pos) + ": " +
           hex(std::span(out).subspan(pos));
  }
  return "";
}

// The one checker for every transcript: the exact expected output and state from a
// single feed, then the same outcome from every way of cutting the input.
void check_transcript(const Transcript& t) {
  INFO("transcript: ", t.name);
  const Outcome whole = run(t, {});
  CHECK(whole.feed_contract_ok);
  CHECK(mismatch(whole.out, t.expected) == "");
  CHECK(state_name(whole.state) == state_name(t.state));
  CHECK(whole.consumed == t.input.size() - t.unconsumed);
  if (whole.state == State::closed) CHECK_FALSE(whole.close_reason.empty());
  if (t.negotiated) CHECK(describe(whole.negotiated) == describe(t.negotiated));

  const std::size_t n = t.input.size();
  std::vector<std::size_t> every_byte;
  for (std::size_t i = 1; i < n; ++i) every_byte.push_back(i);
  const Outcome bytewise = run(t, every_byte);
  CHECK_MESSAGE(bytewise == whole, "one byte at a time: ", difference(whole, bytewise));

  std::string first_bad_split;
  for (std::size_t k = 0; k <= n && first_bad_split.empty(); ++k) {
    const std::size_t cut[] = {k};
    const Outcome split = run(t, cut);
    if (!(split == whole)) {
      first_bad_split = "split at byte " + std::to_string(k) + ": " + difference(whole, split);
    }
  }
  CHECK_MESSAGE(first_bad_split.empty(), first_bad_split);
}

void check_all(const std::vector<Transcript>& transcripts) {
  for (const auto& t : transcripts) check_transcript(t);
}

}  // namespace

// ---------------------------------------------------------------------------------------

TEST_CASE("greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES") {
  const Bytes want = Build().u64(spec::nbdmagic).u64(spec::ihaveopt).u16(0x0003);
  CHECK(hex(Handshake::greeting()) == hex(want));
  CHECK(Handshake::greeting().size() == 18);
  CHECK(hex(want) == "4e42444d 41474943 49484156 454f5054 0003");
}

TEST_CASE("client flags") {
  check_all({
      {.name = "unknown client flag bit 2 closes before any option",
       .input = cat({client_flags(0x4), list}),
       .expected = {},
       .state = State::closed,
       .unconsumed = list.size()},
      {.name = "unknown client flag bit 31 closes",
       .input = cat({client_flags(0x80000003), list}),
       .expected = {},
       .state = State::closed,
       .unconsumed = list.size()},
      {.name = "C_FIXED_NEWSTYLE|C_NO_ZEROES accepted",
       .input = cat({fixed, list}),
       .expected = {list_replies()}},
      {.name = "EXPORT_NAME reply padded with 124 zeroes without C_NO_ZEROES",
       .input = cat({client_flags(spec::c_fixed_newstyle), opt_text(spec::opt_export_name, "disk0"),
                     a_request()}),
       .expected = {export_name_reply(disk0_size, disk0_flags, true)},
       .state = State::transmission,
       .unconsumed = 28,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags, false, false, std::nullopt}},
      {.name = "EXPORT_NAME reply unpadded with C_NO_ZEROES",
       .input = cat({fixed, opt_text(spec::opt_export_name, "disk0"), a_request()}),
       .expected = {export_name_reply(disk0_size, disk0_flags, false)},
       .state = State::transmission,
       .unconsumed = 28,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags, false, true, std::nullopt}},
  });
}

TEST_CASE("NBD_OPT_EXPORT_NAME") {
  check_all({
      {.name = "known export",
       .input = cat({fixed, opt_text(spec::opt_export_name, "ro")}),
       .expected = {export_name_reply(ro_size, ro_flags, false)},
       .state = State::transmission,
       .negotiated = Summary{"ro", ro_size, ro_flags, false, true, std::nullopt}},
      {.name = "empty name is the default export",
       .input = cat({fixed, opt_text(spec::opt_export_name, "")}),
       .expected = {export_name_reply(disk0_size, disk0_flags, false)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags, false, true, std::nullopt}},
      {.name = "unknown export closes (EXPORT_NAME cannot report errors)",
       .input = cat({fixed, opt_text(spec::opt_export_name, "nope"), list}),
       .expected = {},
       .state = State::closed,
       .unconsumed = list.size()},
      {.name = "after LIST and INFO",
       .input = cat({fixed, list, opt(spec::opt_info, info_request("ro", {})),
                     opt_text(spec::opt_export_name, "disk0"), a_request()}),
       .expected = {list_replies(), plain_ro(spec::opt_info, false),
                    export_name_reply(disk0_size, disk0_flags, false)},
       .state = State::transmission,
       .unconsumed = 28},
      {.name = "after STRUCTURED_REPLY the flags carry SEND_DF",
       .input = cat({client_flags(spec::c_fixed_newstyle), structured_reply,
                     opt_text(spec::opt_export_name, "disk0")}),
       .expected = {ack(spec::opt_structured_reply),
                    export_name_reply(disk0_size, disk0_flags_df, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, false, std::nullopt}},
      {.name = "4096-byte name accepted",
       .input = cat({fixed, opt_text(spec::opt_export_name, long_name)}),
       .expected = {export_name_reply(4096, 0x0001, false)},
       .state = State::transmission,
       .negotiated = Summary{long_name, 4096, 0x0001, false, true, std::nullopt},
       .catalog = &long_name_catalog()},
      {.name = "4097-byte name closes",
       .input = cat({fixed, opt_text(spec::opt_export_name, long_name + "x")}),
       .expected = {},
       .state = State::closed,
       .catalog = &long_name_catalog()},
  });
}

TEST_CASE("non-fixed newstyle client: EXPORT_NAME only") {
  const Bytes old = client_flags(0);
  check_all({
      {.name = "EXPORT_NAME works, padded",
       .input = cat({old, opt_text(spec::opt_export_name, "disk0"), a_request()}),
       .expected = {export_name_reply(disk0_size, disk0_flags, true)},
       .state = State::transmission,
       .unconsumed = 28,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags, false, false, std::nullopt}},
      {.name = "EXPORT_NAME with C_NO_ZEROES alone, unpadded",
       .input = cat({client_flags(spec::c_no_zeroes), opt_text(spec::opt_export_name, "ro")}),
       .expected = {export_name_reply(ro_size, ro_flags, false)},
       .state = State::transmission,
       .negotiated = Summary{"ro", ro_size, ro_flags, false, true, std::nullopt}},
      {.name = "LIST closes", .input = cat({old, list}), .expected = {}, .state = State::closed},
      {.name = "GO closes", .input = cat({old, go_disk0}), .expected = {}, .state = State::closed},
      {.name = "ABORT closes without a reply",
       .input = cat({old, opt(spec::opt_abort)}),
       .expected = {},
       .state = State::closed},
      {.name = "STRUCTURED_REPLY closes",
       .input = cat({old, structured_reply, go_disk0}),
       .expected = {},
       .state = State::closed,
       .unconsumed = go_disk0.size()},
      {.name = "unknown option closes",
       .input = cat({old, opt_text(0xDEAD, "junk")}),
       .expected = {},
       .state = State::closed},
      {.name = "over-long option closes at its header",
       .input = cat({old, opt_header(spec::opt_info, 40), Bytes(40)}),
       .expected = {},
       .state = State::closed,
       .unconsumed = 40,
       .limits = {.max_option_length = 32}},
  });
}

TEST_CASE("NBD_OPT_ABORT") {
  check_all({
      {.name = "ACK then closed",
       .input = cat({fixed, opt(spec::opt_abort)}),
       .expected = {ack(spec::opt_abort)},
       .state = State::closed},
      {.name = "data is ignored",
       .input = cat({fixed, opt_text(spec::opt_abort, "junk")}),
       .expected = {ack(spec::opt_abort)},
       .state = State::closed},
      {.name = "bytes after ABORT are not consumed",
       .input = cat({fixed, list, opt(spec::opt_abort), list}),
       .expected = {list_replies(), ack(spec::opt_abort)},
       .state = State::closed,
       .unconsumed = list.size()},
  });
}

TEST_CASE("NBD_OPT_LIST") {
  check_all({
      {.name = "SERVER with name and description per export, then ACK",
       .input = cat({fixed, list}),
       // clang-format off
       .expected = {Build()
                        .u64(spec::option_reply_magic).u32(3).u32(2).u32(4 + 5 + 10)
                        .u32(5).str("disk0").str("first disk")
                        .u64(spec::option_reply_magic).u32(3).u32(2).u32(4 + 2)
                        .u32(2).str("ro")
                        .u64(spec::option_reply_magic).u32(3).u32(1).u32(0)}},
      // clang-format on
      {.name = "with data: ERR_INVALID, then in sync",
       .input = cat({fixed, opt_text(spec::opt_list, "disk0"), list}),
       .expected = {err(spec::opt_list, spec::rep_err_invalid), list_replies()}},
      {.name = "repeated",
       .input = cat({fixed, list, list, list}),
       .expected = {list_replies(), list_replies(), list_replies()}},
  });
}

TEST_CASE("NBD_OPT_STARTTLS is refused: no TLS") {
  check_all({
      {.name = "ERR_POLICY",
       .input = cat({fixed, opt(spec::opt_starttls), list}),
       .expected = {err(spec::opt_starttls, spec::rep_err_policy), list_replies()}},
      {.name = "with data: ERR_INVALID",
       .input = cat({fixed, opt_text(spec::opt_starttls, "xy"), list}),
       .expected = {err(spec::opt_starttls, spec::rep_err_invalid), list_replies()}},
      // Only a successful STARTTLS forgets earlier negotiation (protocol.md §16, §23).
      {.name = "a refused STARTTLS keeps structured replies and meta contexts",
       .input = cat({fixed, structured_reply,
                     opt(spec::opt_set_meta_context, meta_request("disk0", {"base:allocation"})),
                     opt(spec::opt_starttls), go_disk0}),
       .expected = {ack(spec::opt_structured_reply),
                    rep_meta(spec::opt_set_meta_context, 1, "base:allocation"),
                    ack(spec::opt_set_meta_context), err(spec::opt_starttls, spec::rep_err_policy),
                    plain_disk0(spec::opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true, 1u}},
  });
}

TEST_CASE("NBD_OPT_INFO and NBD_OPT_GO") {
  using namespace spec;
  check_all({
      {.name = "INFO stays negotiating, GO enters transmission, with the same answers",
       .input = cat(
           {fixed,
            opt(opt_info, info_request("disk0", {info_name, info_description, info_block_size})),
            opt(opt_go, info_request("disk0", {info_name, info_description, info_block_size})),
            a_request()}),
       .expected = {rep_info_export(opt_info, disk0_size, disk0_flags),
                    rep_info_name(opt_info, "disk0"), rep_info_description(opt_info, "first disk"),
                    rep_info_block_size(opt_info, 512, 4096, max_payload), ack(opt_info),
                    rep_info_export(opt_go, disk0_size, disk0_flags),
                    rep_info_name(opt_go, "disk0"), rep_info_description(opt_go, "first disk"),
                    rep_info_block_size(opt_go, 512, 4096, max_payload), ack(opt_go)},
       .state = State::transmission,
       .unconsumed = 28,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags, false, true, std::nullopt}},
      {.name = "INFO alone stays negotiating",
       .input = cat({fixed, opt(opt_info, info_request("ro", {})), list}),
       .expected = {plain_ro(opt_info, false), list_replies()}},
      {.name = "GO with zero info requests (the kernel's nbd-client)",
       .input = cat({fixed, go_disk0}),
       // clang-format off
       .expected = {Build()
                        .u64(option_reply_magic).u32(7).u32(3).u32(12)
                        .u16(0).u64(disk0_size).u16(disk0_flags)
                        .u64(option_reply_magic).u32(7).u32(3).u32(14)
                        .u16(3).u32(512).u32(4096).u32(max_payload)
                        .u64(option_reply_magic).u32(7).u32(1).u32(0)},
       // clang-format on
       .state = State::transmission},
      {.name = "GO for the default export names the canonical export",
       .input = cat({fixed, opt(opt_go, info_request("", {info_name}))}),
       .expected = {rep_info_export(opt_go, disk0_size, disk0_flags),
                    rep_info_name(opt_go, "disk0"),
                    rep_info_block_size(opt_go, 512, 4096, max_payload), ack(opt_go)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags, false, true, std::nullopt}},
      {.name = "read-only export; an empty description is not sent",
       .input = cat({fixed, opt(opt_go, info_request("ro", {info_description, info_name}))}),
       .expected = {rep_info_export(opt_go, ro_size, ro_flags), rep_info_name(opt_go, "ro"),
                    rep_info_block_size(opt_go, 1, 4096, max_payload), ack(opt_go)},
       .state = State::transmission,
       .negotiated = Summary{"ro", ro_size, ro_flags, false, true, std::nullopt}},
      {.name = "duplicated info requests are answered once",
       .input = cat({fixed, opt(opt_info, info_request("disk0", {info_name, info_block_size,
                                                                 info_name, info_export,
                                                                 info_description, info_description,
                                                                 info_export, info_block_size}))}),
       .expected = {rep_info_export(opt_info, disk0_size, disk0_flags),
                    rep_info_name(opt_info, "disk0"), rep_info_description(opt_info, "first disk"),
                    rep_info_block_size(opt_info, 512, 4096, max_payload), ack(opt_info)}},
      {.name = "unknown info types are ignored",
       .input = cat({fixed, opt(opt_info, info_request("disk0", {4, 0x7fff, 0x8000, 0xffff})),
                     opt(opt_info, info_request("disk0", {0xffff, info_name, 4}))}),
       .expected = {plain_disk0(opt_info, false),
                    rep_info_export(opt_info, disk0_size, disk0_flags),
                    rep_info_name(opt_info, "disk0"),
                    rep_info_block_size(opt_info, 512, 4096, max_payload), ack(opt_info)}},
      {.name = "4096-byte export name accepted by INFO and GO",
       .input = cat({fixed, opt(opt_info, info_request(long_name, {info_name})),
                     opt(opt_go, info_request(long_name, {}))}),
       .expected = {rep_info_export(opt_info, 4096, 0x0001), rep_info_name(opt_info, long_name),
                    rep_info_block_size(opt_info, 1, 4096, max_payload), ack(opt_info),
                    rep_info_export(opt_go, 4096, 0x0001),
                    rep_info_block_size(opt_go, 1, 4096, max_payload), ack(opt_go)},
       .state = State::transmission,
       .catalog = &long_name_catalog()},
      {.name = "4097-byte export name: ERR_INVALID, then in sync",
       .input = cat({fixed, opt(opt_info, info_request(long_name + "x", {})),
                     opt(opt_go, info_request(long_name + "x", {info_name})), go_ro}),
       .expected = {err(opt_info, rep_err_invalid), err(opt_go, rep_err_invalid),
                    plain_ro(opt_go, false)},
       .state = State::transmission,
       .catalog = &long_name_catalog()},
      {.name = "unknown export: ERR_UNKNOWN, then in sync",
       .input = cat({fixed, opt(opt_info, info_request("nope", {info_name})),
                     opt(opt_go, info_request("DISK0", {})), go_disk0}),
       .expected = {err(opt_info, rep_err_unknown), err(opt_go, rep_err_unknown),
                    plain_disk0(opt_go, false)},
       .state = State::transmission},
  });
}

TEST_CASE("malformed NBD_OPT_INFO/GO payloads: ERR_INVALID, payload consumed, still in sync") {
  using namespace spec;
  const std::vector<std::pair<const char*, Bytes>> bad = {
      {"empty", {}},
      {"3 bytes", Build().u16(0).str("d")},
      {"name length past the end", Build().u32(10).str("disk0").u16(0)},
      {"name length 2^31", Build().u32(0x80000000).str("disk0").u16(0)},
      {"name length 2^32-1", Build().u32(0xffffffff).str("disk0").u16(0)},
      {"no request count", Build().u32(5).str("disk0")},
      {"half a request count", Build().u32(5).str("disk0").zeroes(1)},
      {"count 2, one request", Build().u32(5).str("disk0").u16(2).u16(info_name)},
      {"count 1, three bytes", Build().u32(5).str("disk0").u16(1).u16(info_name).str("z")},
      {"count 0, trailing byte", Build().u32(5).str("disk0").u16(0).str("z")},
      {"count 0, trailing request", Build().u32(5).str("disk0").u16(0).u16(info_name)},
      {"name longer than 4096", Build().u32(4097).str(long_name + "x").u16(0)},
  };
  std::vector<Transcript> transcripts;
  for (uint32_t option : {opt_info, opt_go}) {
    for (const auto& [what, payload] : bad) {
      transcripts.push_back(
          {.name = std::string(option == opt_go ? "GO: " : "INFO: ") + what,
           .input = cat({fixed, opt(option, payload), go_ro}),
           .expected = {err(option, rep_err_invalid), plain_ro(opt_go, false)},
           .state = State::transmission,
           .negotiated = Summary{"ro", ro_size, ro_flags, false, true, std::nullopt}});
    }
  }
  check_all(transcripts);
}

TEST_CASE("unknown options: ERR_UNSUP with the payload consumed") {
  using namespace spec;
  std::vector<Transcript> transcripts;
  const std::vector<std::pair<uint32_t, Bytes>> unknown = {
      {opt_peek_export, info_request("disk0", {})},  // withdrawn
      {opt_extended_headers, {}},                    // not implemented
      {0xDEAD, Build().str("hello")},
      {0, {}},
      {12, Build().u32(0)},
      {0x80000001, Build().str("x")},
      {0xffffffff, Build().zeroes(100)},
  };
  Bytes all_input = fixed;
  std::vector<Expect> all_expected;
  for (const auto& [option, payload] : unknown) {
    transcripts.push_back({.name = "option " + std::to_string(option),
                           .input = cat({fixed, opt(option, payload), list}),
                           .expected = {err(option, rep_err_unsup), list_replies()}});
    all_input = cat({all_input, opt(option, payload)});
    all_expected.push_back(err(option, rep_err_unsup));
  }
  all_input = cat({all_input, go_disk0});
  all_expected.push_back(plain_disk0(opt_go, false));
  transcripts.push_back({.name = "all of them in a row, then GO",
                         .input = all_input,
                         .expected = all_expected,
                         .state = State::transmission});
  check_all(transcripts);
}

TEST_CASE("NBD_OPT_STRUCTURED_REPLY") {
  using namespace spec;
  check_all({
      {.name = "ACK; GO flags then carry SEND_DF",
       .input = cat({fixed, opt(opt_info, info_request("disk0", {})), structured_reply,
                     opt(opt_info, info_request("disk0", {})), go_disk0}),
       .expected = {plain_disk0(opt_info, false), ack(opt_structured_reply),
                    plain_disk0(opt_info, true), plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true, std::nullopt}},
      {.name = "read-only export gets SEND_DF too",
       .input = cat({fixed, structured_reply, go_ro}),
       .expected = {ack(opt_structured_reply), plain_ro(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"ro", ro_size, ro_flags_df, true, true, std::nullopt}},
      {.name = "with data: ERR_INVALID and structured replies stay off",
       .input = cat({fixed, opt_text(opt_structured_reply, "x"), go_disk0}),
       .expected = {err(opt_structured_reply, rep_err_invalid), plain_disk0(opt_go, false)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags, false, true, std::nullopt}},
  });
}

TEST_CASE("meta contexts before structured replies: ERR_INVALID") {
  using namespace spec;
  check_all({
      {.name = "LIST_META_CONTEXT and SET_META_CONTEXT refused, then allowed after SR",
       .input = cat(
           {fixed, opt(opt_list_meta_context, meta_request("disk0", {"base:allocation"})),
            opt(opt_set_meta_context, meta_request("disk0", {"base:allocation"})), structured_reply,
            opt(opt_list_meta_context, meta_request("disk0", {"base:allocation"})), go_disk0}),
       .expected = {err(opt_list_meta_context, rep_err_invalid),
                    err(opt_set_meta_context, rep_err_invalid), ack(opt_structured_reply),
                    rep_meta(opt_list_meta_context, 0, "base:allocation"),
                    ack(opt_list_meta_context), plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true, std::nullopt}},
      {.name = "a refused SET selects nothing",
       .input = cat({fixed, opt(opt_set_meta_context, meta_request("disk0", {"base:allocation"})),
                     structured_reply, go_disk0}),
       .expected = {err(opt_set_meta_context, rep_err_invalid), ack(opt_structured_reply),
                    plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true, std::nullopt}},
  });
}

TEST_CASE("NBD_OPT_LIST_META_CONTEXT") {
  using namespace spec;
  const Bytes sr = cat({fixed, structured_reply});
  const Bytes listed =
      cat({ack(opt_structured_reply), rep_meta(opt_list_meta_context, 0, "base:allocation"),
           ack(opt_list_meta_context)});
  auto list_meta = [](std::string_view name, std::initializer_list<std::string_view> queries) {
    return opt(opt_list_meta_context, meta_request(name, queries));
  };
  check_all({
      {.name = "0 queries lists base:allocation with id 0",
       .input = cat({sr, list_meta("disk0", {})}),
       // clang-format off
       .expected = {Build()
                        .raw(ack(opt_structured_reply))
                        .u64(option_reply_magic).u32(9).u32(4).u32(4 + 15)
                        .u32(0).str("base:allocation")
                        .u64(option_reply_magic).u32(9).u32(1).u32(0)}},
      // clang-format on
      {.name = "query base:allocation",
       .input = cat({sr, list_meta("disk0", {"base:allocation"})}),
       .expected = {listed}},
      {.name = "query base: lists every base context",
       .input = cat({sr, list_meta("ro", {"base:"})}),
       .expected = {listed}},
      {.name = "the default export",
       .input = cat({sr, list_meta("", {"base:allocation"})}),
       .expected = {listed}},
      {.name = "overlapping queries list the context once",
       .input = cat({sr, list_meta("disk0", {"base:allocation", "base:", "base:allocation"})}),
       .expected = {listed}},
      {.name = "unknown namespaces and base: leaves are ignored",
       .input = cat({sr, list_meta("disk0", {"qemu:dirty-bitmap:b0", "base:nope", "x-foo:bar",
                                             "base", "base:allocation:"})}),
       .expected = {ack(opt_structured_reply), ack(opt_list_meta_context)}},
      {.name = "unknown export: ERR_UNKNOWN",
       .input = cat({sr, list_meta("nope", {}), list}),
       .expected = {ack(opt_structured_reply), err(opt_list_meta_context, rep_err_unknown),
                    list_replies()}},
      {.name = "LIST selects nothing",
       .input = cat({sr, list_meta("disk0", {"base:allocation"}), go_disk0}),
       .expected = {listed, plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true, std::nullopt}},
  });
}

TEST_CASE("NBD_OPT_SET_META_CONTEXT") {
  using namespace spec;
  const Bytes sr = cat({fixed, structured_reply});
  auto set = [](std::string_view name, std::initializer_list<std::string_view> queries) {
    return opt(opt_set_meta_context, meta_request(name, queries));
  };
  const Bytes selected =
      cat({rep_meta(opt_set_meta_context, 1, "base:allocation"), ack(opt_set_meta_context)});
  const Bytes none = ack(opt_set_meta_context);
  const Bytes sr_ack = ack(opt_structured_reply);
  const Summary on{"disk0", disk0_size, disk0_flags_df, true, true, 1u};
  const Summary off{"disk0", disk0_size, disk0_flags_df, true, true, std::nullopt};
  check_all({
      {.name = "base:allocation, then GO of the same export",
       .input = cat({sr, set("disk0", {"base:allocation"}), go_disk0}),
       // clang-format off
       .expected = {Build()
                        .raw(sr_ack)
                        .u64(option_reply_magic).u32(10).u32(4).u32(4 + 15)
                        .u32(1).str("base:allocation")
                        .u64(option_reply_magic).u32(10).u32(1).u32(0)
                        .raw(plain_disk0(opt_go, true))},
       // clang-format on
       .state = State::transmission,
       .negotiated = on},
      {.name = "then EXPORT_NAME of the same export",
       .input = cat({sr, set("disk0", {"base:allocation"}), opt_text(opt_export_name, "disk0")}),
       .expected = {sr_ack, selected, export_name_reply(disk0_size, disk0_flags_df, false)},
       .state = State::transmission,
       .negotiated = on},
      {.name = "SET on the default export, GO by its canonical name",
       .input = cat({sr, set("", {"base:allocation"}), go_disk0}),
       .expected = {sr_ack, selected, plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = on},
      {.name = "INFO in between keeps the selection",
       .input = cat({sr, set("disk0", {"base:allocation"}), opt(opt_info, info_request("ro", {})),
                     go_disk0}),
       .expected = {sr_ack, selected, plain_ro(opt_info, true), plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = on},
      {.name = "unknown queries next to base:allocation are ignored",
       .input = cat(
           {sr, set("disk0", {"qemu:allocation-depth", "base:allocation", "base:x"}), go_disk0}),
       .expected = {sr_ack, selected, plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = on},
      {.name = "a later SET of another export, then GO of that one",
       .input =
           cat({sr, set("ro", {"base:allocation"}), set("disk0", {"base:allocation"}), go_disk0}),
       .expected = {sr_ack, selected, selected, plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = on},
      {.name = "GO of a different export: not selected",
       .input = cat({sr, set("disk0", {"base:allocation"}), go_ro}),
       .expected = {sr_ack, selected, plain_ro(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"ro", ro_size, ro_flags_df, true, true, std::nullopt}},
      {.name = "base: selects nothing in SET",
       .input = cat({sr, set("disk0", {"base:"}), go_disk0}),
       .expected = {sr_ack, none, plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = off},
      {.name = "0 queries select nothing",
       .input = cat({sr, set("disk0", {}), go_disk0}),
       .expected = {sr_ack, none, plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = off},
      {.name = "replaced by a SET selecting nothing",
       .input = cat({sr, set("disk0", {"base:allocation"}), set("disk0", {"base:"}), go_disk0}),
       .expected = {sr_ack, selected, none, plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = off},
      {.name = "replaced by a SET failing with ERR_UNKNOWN",
       .input =
           cat({sr, set("disk0", {"base:allocation"}), set("nope", {"base:allocation"}), go_disk0}),
       .expected = {sr_ack, selected, err(opt_set_meta_context, rep_err_unknown),
                    plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = off},
      {.name = "replaced by a malformed SET",
       .input = cat({sr, set("disk0", {"base:allocation"}),
                     opt(opt_set_meta_context, Build().u32(5).str("disk0")), go_disk0}),
       .expected = {sr_ack, selected, err(opt_set_meta_context, rep_err_invalid),
                    plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = off},
      {.name = "a failing GO in between does not matter",
       .input = cat({sr, set("disk0", {"base:allocation"}), opt(opt_go, info_request("nope", {})),
                     go_disk0}),
       .expected = {sr_ack, selected, err(opt_go, rep_err_unknown), plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = on},
  });
}

TEST_CASE("malformed meta context payloads: ERR_INVALID, payload consumed, still in sync") {
  using namespace spec;
  const std::vector<std::pair<const char*, Bytes>> bad = {
      {"empty", {}},
      {"3 bytes", Build().u16(0).str("d")},
      {"name length past the end", Build().u32(10).str("disk0").u32(0)},
      {"name length 2^32-1", Build().u32(0xffffffff).str("disk0").u32(0)},
      {"no query count", Build().u32(5).str("disk0")},
      {"half a query count", Build().u32(5).str("disk0").u16(0)},
      {"count 1, no query", Build().u32(5).str("disk0").u32(1)},
      {"count 1, half a query length", Build().u32(5).str("disk0").u32(1).u16(0)},
      {"query length past the end", Build().u32(5).str("disk0").u32(1).u32(15).str("base:alloc")},
      {"query length 2^32-1", Build().u32(5).str("disk0").u32(1).u32(0xffffffff).str("base:")},
      {"count 2, one query", Build().u32(5).str("disk0").u32(2).u32(5).str("base:")},
      {"trailing byte after the queries", Build().u32(5).str("disk0").u32(1).u32(5).str("base:z")},
      {"count 0, trailing bytes", Build().u32(5).str("disk0").u32(0).u32(0)},
      {"name longer than 4096", Build().u32(4097).str(long_name + "x").u32(0)},
      {"query longer than 4096",
       Build().u32(5).str("disk0").u32(1).u32(4097).str("base:").str(long_name.substr(0, 4092))},
  };
  std::vector<Transcript> transcripts;
  const Bytes select = opt(opt_set_meta_context, meta_request("disk0", {"base:allocation"}));
  const Bytes selected =
      cat({rep_meta(opt_set_meta_context, 1, "base:allocation"), ack(opt_set_meta_context)});
  for (uint32_t option : {opt_list_meta_context, opt_set_meta_context}) {
    for (const auto& [what, payload] : bad) {
      // A failed SET drops the earlier selection; a failed LIST leaves it alone.
      const bool kept = option == opt_list_meta_context;
      transcripts.push_back(
          {.name = std::string(option == opt_set_meta_context ? "SET: " : "LIST: ") + what,
           .input = cat({fixed, structured_reply, select, opt(option, payload), go_disk0}),
           .expected = {ack(opt_structured_reply), selected, err(option, rep_err_invalid),
                        plain_disk0(opt_go, true)},
           .state = State::transmission,
           .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true,
                                 kept ? std::optional<uint32_t>(1) : std::nullopt}});
    }
  }
  check_all(transcripts);
}

TEST_CASE("too many meta context queries: ERR_TOO_BIG") {
  using namespace spec;
  auto queries = [](uint32_t n, uint32_t claimed) {
    Build b;
    b.u32(5).str("disk0").u32(claimed);
    for (uint32_t i = 0; i < n; ++i) b.u32(15).str("base:allocation");
    return Bytes(b);
  };
  const Bytes sr = cat({fixed, structured_reply});
  const Bytes sr_ack = ack(opt_structured_reply);
  check_all({
      {.name = "128 queries (the default limit) are fine",
       .input = cat({sr, opt(opt_set_meta_context, queries(128, 128)), go_disk0}),
       .expected = {sr_ack, rep_meta(opt_set_meta_context, 1, "base:allocation"),
                    ack(opt_set_meta_context), plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true, 1u}},
      {.name = "129 queries",
       .input = cat({sr, opt(opt_set_meta_context, queries(129, 129)),
                     opt(opt_list_meta_context, queries(129, 129)), go_disk0}),
       .expected = {sr_ack, err(opt_set_meta_context, rep_err_too_big),
                    err(opt_list_meta_context, rep_err_too_big), plain_disk0(opt_go, true)},
       .state = State::transmission,
       .negotiated = Summary{"disk0", disk0_size, disk0_flags_df, true, true, std::nullopt}},
      {.name = "a count of 2^32-1 with no queries",
       .input = cat({sr, opt(opt_list_meta_context, queries(0, 0xffffffff)), list}),
       .expected = {sr_ack, err(opt_list_meta_context, rep_err_too_big), list_replies()}},
      {.name = "a configured limit of 2",
       .input = cat({sr, opt(opt_list_meta_context, queries(2, 2)),
                     opt(opt_list_meta_context, queries(3, 3)), list}),
       .expected = {sr_ack, rep_meta(opt_list_meta_context, 0, "base:allocation"),
                    ack(opt_list_meta_context), err(opt_list_meta_context, rep_err_too_big),
                    list_replies()},
       .limits = {.max_meta_queries = 2}},
  });
}

TEST_CASE("over-long option payloads are skipped and answered ERR_TOO_BIG") {
  using namespace spec;
  const HandshakeLimits small{.max_option_length = 32};
  // A valid 32-byte INFO payload: 4 + 2 ("ro") + 2 + 12 x 2.
  const Bytes info32 = info_request("ro", {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1});
  REQUIRE(info32.size() == 32);
  check_all({
      {.name = "exactly the limit is processed",
       .input = cat({fixed, opt(opt_info, info32)}),
       .expected = {rep_info_export(opt_info, ro_size, ro_flags), rep_info_name(opt_info, "ro"),
                    rep_info_block_size(opt_info, 1, 4096, max_payload), ack(opt_info)},
       .limits = small},
      {.name = "one byte over: ERR_TOO_BIG, then GO works",
       .input = cat({fixed, opt(opt_info, cat({info32, Build().u16(1)})), go_ro}),
       .expected = {err(opt_info, rep_err_too_big), plain_ro(opt_go, false)},
       .state = State::transmission,
       .limits = small},
      {.name = "over-long payload that looks like options is not parsed",
       .input = cat({fixed, opt(0xDEAD, repeat(opt(opt_abort), 4)), list}),
       .expected = {err(0xDEAD, rep_err_too_big), list_replies()},
       .limits = small},
      {.name = "over-long GO does not enter transmission",
       .input = cat({fixed, opt(opt_go, info_request(std::string(40, 'd'), {})), list}),
       .expected = {err(opt_go, rep_err_too_big), list_replies()},
       .limits = small},
      {.name = "over-long EXPORT_NAME closes at its header",
       .input = cat({fixed, opt_header(opt_export_name, 33), Bytes(33)}),
       .expected = {},
       .state = State::closed,
       .unconsumed = 33,
       .limits = small},
  });
}

TEST_CASE("a 4 GiB option payload is skipped without buffering it") {
  Handshake hs(standard_catalog());
  Bytes out;
  const Bytes head = cat({fixed, opt_header(spec::opt_info, 0xffffffff)});
  CHECK(hs.feed(head, out) == head.size());
  CHECK(out.empty());
  // Skipping never touches the bytes, so one zeroed MiB fed 4096 times costs nothing;
  // buffering them would need 4 GiB.
  static const Bytes mib(1u << 20);
  uint64_t left = 0xffffffff;
  std::size_t short_feeds = 0, early_replies = 0;
  while (left > 0) {
    const auto n = static_cast<std::size_t>(std::min<uint64_t>(left, mib.size()));
    if (hs.feed(std::span(mib.data(), n), out) != n) ++short_feeds;
    left -= n;
    if (left > 0 && !out.empty()) ++early_replies;
  }
  CHECK(short_feeds == 0);
  CHECK(early_replies == 0);
  CHECK(mismatch(out, {err(spec::opt_info, spec::rep_err_too_big)}) == "");
  out.clear();
  CHECK(hs.feed(go_ro, out) == go_ro.size());
  CHECK(mismatch(out, {plain_ro(spec::opt_go, false)}) == "");
  CHECK(hs.state() == State::transmission);
}

TEST_CASE("option rounds are bounded") {
  using namespace spec;
  const Bytes unknown = opt(0xDEAD);
  std::vector<Expect> refused(256, err(0xDEAD, rep_err_unsup));
  check_all({
      {.name = "max_options 3: the fourth option closes",
       .input = cat({fixed, list, list, list, list, list}),
       .expected = {list_replies(), list_replies(), list_replies()},
       .state = State::closed,
       .unconsumed = list.size(),
       .limits = {.max_options = 3}},
      {.name = "max_options 3: even ABORT is not answered past the limit",
       .input = cat({fixed, list, list, list, opt(opt_abort)}),
       .expected = {list_replies(), list_replies(), list_replies()},
       .state = State::closed,
       .limits = {.max_options = 3}},
      {.name = "max_options 3: the third option may be GO",
       .input = cat({fixed, list, list, go_disk0}),
       .expected = {list_replies(), list_replies(), plain_disk0(opt_go, false)},
       .state = State::transmission,
       .limits = {.max_options = 3}},
      {.name = "max_options 256: 256 options answered, the 257th closes",
       .input = cat({fixed, repeat(unknown, 256), go_disk0}),
       .expected = refused,
       .state = State::closed,
       .unconsumed = go_disk0.size() - 16,
       .limits = {.max_options = 256}},
  });
}

TEST_CASE("the default option limit lets nbdinfo --list walk hundreds of exports") {
  // nbdinfo --list spends two options (INFO, LIST_META_CONTEXT) per export.
  using namespace spec;
  Handshake hs(standard_catalog());
  Bytes input = cat({fixed, opt(opt_structured_reply)});
  for (int i = 0; i < 800; ++i) input.insert(input.end(), list.begin(), list.end());
  input.insert(input.end(), go_disk0.begin(), go_disk0.end());
  Bytes out;
  CHECK(hs.feed(input, out) == input.size());
  CHECK(hs.state() == State::transmission);
}

TEST_CASE("bad IHAVEOPT magic closes") {
  using namespace spec;
  const Bytes bad_magic = cat({opt_header(opt_list, 0, 0x49484156454F5055), list});
  check_all({
      {.name = "first option",
       .input = cat({fixed, bad_magic}),
       .expected = {},
       .state = State::closed,
       .unconsumed = list.size()},
      {.name = "after a good option; the payload is not read",
       .input = cat({fixed, list, opt_header(opt_go, 9, 0), info_request("disk0", {})}),
       .expected = {list_replies()},
       .state = State::closed,
       .unconsumed = 11},
      {.name = "the option reply magic is not IHAVEOPT",
       .input = cat({fixed, opt_header(opt_list, 0, option_reply_magic)}),
       .expected = {},
       .state = State::closed},
  });
}

TEST_CASE("shutting down: options get ERR_SHUTDOWN") {
  using namespace spec;
  check_all({
      {.name = "every option refused, ABORT still acknowledged",
       .input = cat({fixed, list, go_disk0, opt(opt_info, info_request("ro", {})), structured_reply,
                     opt(opt_set_meta_context, meta_request("disk0", {})), opt_text(0xDEAD, "x"),
                     opt(opt_starttls), opt(opt_abort)}),
       .expected = {err(opt_list, rep_err_shutdown), err(opt_go, rep_err_shutdown),
                    err(opt_info, rep_err_shutdown), err(opt_structured_reply, rep_err_shutdown),
                    err(opt_set_meta_context, rep_err_shutdown), err(0xDEAD, rep_err_shutdown),
                    err(opt_starttls, rep_err_shutdown), ack(opt_abort)},
       .state = State::closed,
       .shutting_down = true},
      {.name = "EXPORT_NAME closes",
       .input = cat({fixed, opt_text(opt_export_name, "disk0")}),
       .expected = {},
       .state = State::closed,
       .shutting_down = true},
  });
}

TEST_CASE("begin_shutdown() in the middle of the handshake") {
  Handshake hs(standard_catalog());
  Bytes out;
  const Bytes first = cat({fixed, list});
  CHECK(hs.feed(first, out) == first.size());
  CHECK(mismatch(out, {list_replies()}) == "");
  out.clear();
  hs.begin_shutdown();
  CHECK(hs.feed(go_disk0, out) == go_disk0.size());
  CHECK(hs.state() == State::negotiating);
  const Bytes abort = opt(spec::opt_abort);
  CHECK(hs.feed(abort, out) == abort.size());
  CHECK(mismatch(out, {err(spec::opt_go, spec::rep_err_shutdown), ack(spec::opt_abort)}) == "");
  CHECK(hs.state() == State::closed);
}

namespace {
struct Reply {
  uint32_t option;
  uint32_t type;
  Bytes data;
};
std::vector<Reply> parse_replies(const Bytes& out) {
  std::vector<Reply> replies;
  std::size_t pos = 0;
  auto be = [&](std::size_t at, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | std::to_integer<uint64_t>(out.at(at + i));
    return v;
  };
  while (pos < out.size()) {
    REQUIRE(be(pos, 8) == spec::option_reply_magic);
    Reply r{static_cast<uint32_t>(be(pos + 8, 4)), static_cast<uint32_t>(be(pos + 12, 4)), {}};
    const auto length = static_cast<std::size_t>(be(pos + 16, 4));
    REQUIRE(out.size() - pos - 20 >= length);
    r.data.assign(out.begin() + static_cast<std::ptrdiff_t>(pos + 20),
                  out.begin() + static_cast<std::ptrdiff_t>(pos + 20 + length));
    replies.push_back(std::move(r));
    pos += 20 + length;
  }
  return replies;
}
}  // namespace

TEST_CASE("INFO and GO agree on size and flags (protocol.md §23)") {
  using namespace spec;
  for (const char* name : {"disk0", "", "ro"}) {
    for (bool sr : {false, true}) {
      INFO("export '", name, "' structured replies ", sr);
      Handshake hs(standard_catalog());
      Bytes out;
      const Bytes request = info_request(name, {info_name, info_description, info_block_size});
      Bytes prefix = sr ? cat({fixed, structured_reply}) : fixed;
      hs.feed(prefix, out);
      out.clear();
      hs.feed(opt(opt_info, request), out);
      const auto info_replies = parse_replies(out);
      out.clear();
      hs.feed(opt(opt_go, request), out);
      const auto go_replies = parse_replies(out);
      REQUIRE(hs.state() == State::transmission);
      REQUIRE(info_replies.size() == go_replies.size());
      REQUIRE(info_replies.size() >= 3);
      for (std::size_t i = 0; i < info_replies.size(); ++i) {
        CHECK(info_replies[i].option == opt_info);
        CHECK(go_replies[i].option == opt_go);
        CHECK(info_replies[i].type == go_replies[i].type);
        CHECK(info_replies[i].data == go_replies[i].data);
      }
      // The first reply is NBD_INFO_EXPORT, and negotiated() holds what it said.
      const auto& e = go_replies.front();
      REQUIRE(e.type == rep_info);
      REQUIRE(e.data.size() == 12);
      Bytes expected_export = Build()
                                  .u16(info_export)
                                  .u64(hs.negotiated().export_info.size)
                                  .u16(hs.negotiated().transmission_flags);
      CHECK(e.data == expected_export);
      CHECK(go_replies.back().type == rep_ack);
      CHECK(go_replies.back().data.empty());
    }
  }
}

TEST_CASE("events and close reasons are recorded") {
  Handshake hs(standard_catalog());
  Bytes out;
  const Bytes in = cat({fixed, list, opt_text(0xDEAD, "x"), opt(spec::opt_abort)});
  CHECK(hs.feed(in, out) == in.size());
  CHECK(hs.state() == State::closed);
  CHECK(hs.close_reason().find("ABORT") != std::string::npos);
  const auto events = hs.take_events();
  CHECK(events.size() == 3);
  CHECK(hs.take_events().empty());
}

namespace {
// Remembers every name the handshake looked up.
class RecordingCatalog final : public ExportCatalog {
 public:
  std::optional<ExportInfo> lookup(std::string_view name) const override {
    asked.emplace_back(name);
    return long_name_catalog().lookup(name);
  }
  std::vector<ExportInfo> list() const override { return long_name_catalog().list(); }
  mutable std::vector<std::string> asked;
};
}  // namespace

TEST_CASE("names longer than 4096 bytes never reach the catalog") {
  using namespace spec;
  const std::string too_long = long_name + "x";
  for (const Bytes& option :
       {opt_text(opt_export_name, too_long), opt(opt_info, info_request(too_long, {})),
        opt(opt_go, info_request(too_long, {})),
        opt(opt_set_meta_context, meta_request(too_long, {"base:allocation"}))}) {
    RecordingCatalog catalog;
    Handshake hs(catalog);
    Bytes out;
    const Bytes in = cat({fixed, structured_reply, option});
    CHECK(hs.feed(in, out) == in.size());
    CHECK(catalog.asked.empty());
  }
  RecordingCatalog catalog;
  Handshake hs(catalog);
  Bytes out;
  const Bytes in = cat({fixed, opt_text(opt_export_name, long_name)});
  CHECK(hs.feed(in, out) == in.size());
  CHECK(hs.state() == State::transmission);
  REQUIRE(catalog.asked.size() == 1);
  CHECK(catalog.asked.front() == long_name);
}

TEST_CASE("error messages stay valid NBD strings whatever names the client sends") {
  using namespace spec;
  const std::vector<std::string> names = {
      std::string("a\0b", 3),  // NUL
      "two\nlines",            // control characters
      "tab\there\x7f",
      "\xff\xfe",                                       // not UTF-8
      "cut \xc3",                                       // truncated sequence
      "\xe0\x80\x80",                                   // overlong
      "\xed\xa0\x80",                                   // surrogate
      "\xf4\x90\x80\x80",                               // past U+10FFFF
      "disque-\xc3\xa9-\xe2\x82\xac-\xf0\x9d\x84\x9e",  // valid UTF-8, unknown
  };
  std::vector<Transcript> transcripts;
  for (const auto& name : names) {
    transcripts.push_back(
        {.name = "unknown export " + hex(Bytes(Build().str(name))),
         .input = cat({fixed, opt(opt_info, info_request(name, {})),
                       opt(opt_go, info_request(name, {info_name})), structured_reply,
                       opt(opt_list_meta_context, meta_request(name, {})),
                       opt(opt_set_meta_context, meta_request(name, {"base:allocation"})), go_ro}),
         .expected = {err(opt_info, rep_err_unknown), err(opt_go, rep_err_unknown),
                      ack(opt_structured_reply), err(opt_list_meta_context, rep_err_unknown),
                      err(opt_set_meta_context, rep_err_unknown), plain_ro(opt_go, true)},
         .state = State::transmission});
  }
  // Names of up to 4096 bytes of 2-, 3- and 4-byte characters, at every alignment, so that
  // cutting "unknown export '<name>'" to 4096 bytes would land inside a character.
  for (const std::string character : {"\xc3\xa9", "\xe2\x82\xac", "\xf0\x9d\x84\x9e"}) {
    for (std::size_t skew = 0; skew < character.size(); ++skew) {
      std::string name(skew, 'a');
      while (name.size() + character.size() <= 4096) name += character;
      transcripts.push_back({.name = std::to_string(character.size()) + "-byte characters, skew " +
                                     std::to_string(skew),
                             .input = cat({fixed, opt(opt_info, info_request(name, {})), go_ro}),
                             .expected = {err(opt_info, rep_err_unknown), plain_ro(opt_go, false)},
                             .state = State::transmission});
    }
  }
  check_all(transcripts);
}

TEST_CASE("feed() takes nothing once the handshake has ended") {
  Handshake done(standard_catalog());
  Bytes out;
  const Bytes go = cat({fixed, go_ro});
  CHECK(done.feed(go, out) == go.size());
  REQUIRE(done.state() == State::transmission);
  const Bytes before = out;
  CHECK(done.feed(a_request(), out) == 0);
  CHECK(done.feed(list, out) == 0);
  CHECK(out == before);
  CHECK(done.state() == State::transmission);

  Handshake closed(standard_catalog());
  out.clear();
  const Bytes abort = cat({fixed, opt(spec::opt_abort)});
  CHECK(closed.feed(abort, out) == abort.size());
  REQUIRE(closed.state() == State::closed);
  out.clear();
  CHECK(closed.feed(list, out) == 0);
  CHECK(out.empty());
  CHECK(closed.state() == State::closed);
}
