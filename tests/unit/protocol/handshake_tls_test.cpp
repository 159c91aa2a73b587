// Tests for NBD_OPT_STARTTLS and the TLS modes of the handshake (protocol/handshake.hpp,
// protocol.md §16, the spec's "TLS support"), and for ExportInfo::refusal. Expected bytes
// are written from the spec's numbers, independently of wire.hpp.
#include <doctest/doctest.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/handshake.hpp"
#include "tests/unit/support/handshake_bytes.hpp"

namespace {

using imagenbd::protocol::ExportCatalog;
using imagenbd::protocol::ExportInfo;
using imagenbd::protocol::Handshake;
using imagenbd::protocol::HandshakeLimits;
using imagenbd::protocol::TlsMode;
using State = Handshake::State;
using namespace imagenbd::test;  // handshake_bytes.hpp: spec::, Build, cat, opt, ...

const Bytes fixed = Build().u32(0x3);  // FIXED_NEWSTYLE | NO_ZEROES
const Bytes starttls = opt(spec::opt_starttls);
const Bytes list = opt(spec::opt_list);
const Bytes structured_reply = opt(spec::opt_structured_reply);

// One option reply as parsed back from the server's bytes.
struct Reply {
  uint32_t option = 0;
  uint32_t type = 0;
  std::string data;
};

// Parses `out` as a sequence of option replies; fails the test on anything else.
std::vector<Reply> parse(const Bytes& out) {
  auto be = [&](std::size_t at, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | std::to_integer<uint64_t>(out[at + i]);
    return v;
  };
  std::vector<Reply> replies;
  std::size_t pos = 0;
  while (pos < out.size()) {
    REQUIRE(out.size() - pos >= 20);
    REQUIRE(be(pos, 8) == spec::option_reply_magic);
    Reply r;
    r.option = static_cast<uint32_t>(be(pos + 8, 4));
    r.type = static_cast<uint32_t>(be(pos + 12, 4));
    const auto length = static_cast<std::size_t>(be(pos + 16, 4));
    REQUIRE(out.size() - pos - 20 >= length);
    r.data.assign(reinterpret_cast<const char*>(out.data() + pos + 20), length);
    replies.push_back(std::move(r));
    pos += 20 + length;
  }
  return replies;
}

// (option, reply type) pairs, for compact comparisons.
using Kinds = std::vector<std::pair<uint32_t, uint32_t>>;
Kinds kinds(const std::vector<Reply>& replies) {
  Kinds k;
  for (const auto& r : replies) k.emplace_back(r.option, r.type);
  return k;
}

// Names, descriptions and sizes chosen so that any of them in a plaintext reply is easy
// to spot: the size's bytes spell "SECRETSZ".
constexpr uint64_t secret_size = 0x5345435245545a5a;
ExportInfo make_export(std::string name, std::string description, std::string refusal = "") {
  ExportInfo e;
  e.name = std::move(name);
  e.description = std::move(description);
  e.size = secret_size;
  e.flags = 0x0d6d;
  e.refusal = std::move(refusal);
  return e;
}
const FakeCatalog& catalog() {
  static const FakeCatalog c{
      {make_export("hidden-disk", "confidential description"), make_export("other-disk", "")}};
  return c;
}

bool contains(const Bytes& out, std::string_view needle) {
  const std::string_view text(reinterpret_cast<const char*>(out.data()), out.size());
  return text.find(needle) != std::string_view::npos;
}

// Feeds `in` whole and then byte by byte, checks both give the same output, state and
// consumed count, and returns the whole-feed output.
struct Fed {
  Bytes out;
  std::size_t consumed = 0;
  State state = State::negotiating;
};
Fed feed_checked(const ExportCatalog& c, TlsMode mode, const Bytes& in) {
  Handshake whole(c, {}, mode);
  Fed f;
  f.consumed = whole.feed(in, f.out);
  f.state = whole.state();

  Handshake bytewise(c, {}, mode);
  Bytes out;
  std::size_t consumed = 0;
  for (std::size_t i = 0; i < in.size() && bytewise.state() == State::negotiating; ++i) {
    consumed += bytewise.feed(std::span(in).subspan(i, 1), out);
  }
  CHECK(out == f.out);
  CHECK(consumed == f.consumed);
  CHECK(bytewise.state() == f.state);
  return f;
}

}  // namespace

TEST_CASE("STARTTLS in on mode: ACK, feed() stops right after it") {
  const Bytes after = list;  // the client did not wait for TLS: these bytes are not consumed
  const Bytes in = cat({fixed, starttls, after});
  const Fed f = feed_checked(catalog(), TlsMode::on, in);
  CHECK(f.state == State::starttls);
  CHECK(f.consumed == fixed.size() + starttls.size());
  CHECK(kinds(parse(f.out)) == Kinds{{spec::opt_starttls, spec::rep_ack}});
  CHECK(parse(f.out).front().data.empty());

  // While in starttls nothing more is taken.
  Handshake hs(catalog(), {}, TlsMode::on);
  Bytes out;
  REQUIRE(hs.feed(cat({fixed, starttls}), out) == fixed.size() + starttls.size());
  REQUIRE(hs.state() == State::starttls);
  out.clear();
  CHECK(hs.feed(list, out) == 0);
  CHECK(out.empty());
  CHECK_FALSE(hs.tls_active());
  hs.tls_started();
  CHECK(hs.tls_active());
  CHECK(hs.state() == State::negotiating);
  CHECK(hs.feed(list, out) == list.size());
  CHECK(kinds(parse(out)) == Kinds{{spec::opt_list, spec::rep_server},
                                   {spec::opt_list, spec::rep_server},
                                   {spec::opt_list, spec::rep_ack}});
}

TEST_CASE("STARTTLS refused: with data, when TLS is off, and a second time") {
  for (TlsMode mode : {TlsMode::off, TlsMode::on, TlsMode::require}) {
    INFO("mode ", static_cast<int>(mode));
    const Fed f =
        feed_checked(catalog(), mode, cat({fixed, opt(spec::opt_starttls, Build().str("x"))}));
    CHECK(f.state == State::negotiating);
    CHECK(kinds(parse(f.out)) == Kinds{{spec::opt_starttls, spec::rep_err_invalid}});
  }
  const Fed off = feed_checked(catalog(), TlsMode::off, cat({fixed, starttls, list}));
  CHECK(off.state == State::negotiating);
  CHECK(off.consumed == fixed.size() + starttls.size() + list.size());
  CHECK(parse(off.out).front().type == spec::rep_err_policy);

  for (TlsMode mode : {TlsMode::on, TlsMode::require}) {
    Handshake hs(catalog(), {}, mode);
    Bytes out;
    hs.feed(cat({fixed, starttls}), out);
    REQUIRE(hs.state() == State::starttls);
    hs.tls_started();
    out.clear();
    const Bytes in = cat({starttls, list});
    CHECK(hs.feed(in, out) == in.size());
    CHECK(hs.state() == State::negotiating);
    const auto replies = parse(out);
    REQUIRE(replies.size() == 4);
    CHECK(replies[0].option == spec::opt_starttls);
    CHECK(replies[0].type == spec::rep_err_invalid);
    CHECK(replies[0].data.find("already") != std::string::npos);
    CHECK(replies[3].type == spec::rep_ack);
  }
}

TEST_CASE("tls_started() outside starttls changes nothing") {
  Handshake hs(catalog(), {}, TlsMode::require);
  Bytes out;
  hs.feed(fixed, out);
  hs.tls_started();
  CHECK_FALSE(hs.tls_active());
  hs.feed(list, out);
  CHECK(parse(out).front().type == spec::rep_err_tls_reqd);
}

TEST_CASE("STARTTLS forgets structured replies and meta contexts") {
  for (TlsMode mode : {TlsMode::on, TlsMode::require}) {
    Handshake hs(catalog(), {}, mode);
    Bytes out;
    // What a man in the middle could inject before STARTTLS (CVE-2021-3716). In require
    // mode these are refused anyway; in on mode they are accepted, then forgotten.
    hs.feed(cat({fixed, structured_reply,
                 opt(spec::opt_set_meta_context, meta_request("hidden-disk", {"base:allocation"})),
                 starttls}),
            out);
    REQUIRE(hs.state() == State::starttls);
    hs.tls_started();
    out.clear();
    // Meta contexts need structured replies again.
    const Bytes set_meta =
        opt(spec::opt_set_meta_context, meta_request("hidden-disk", {"base:allocation"}));
    hs.feed(set_meta, out);
    CHECK(kinds(parse(out)) == Kinds{{spec::opt_set_meta_context, spec::rep_err_invalid}});
    out.clear();
    hs.feed(opt(spec::opt_go, info_request("hidden-disk")), out);
    REQUIRE(hs.state() == State::transmission);
    CHECK_FALSE(hs.negotiated().structured_replies);
    CHECK_FALSE(hs.negotiated().base_allocation_id.has_value());
    CHECK((hs.negotiated().transmission_flags & spec::tx_send_df) == 0);
  }
  // Negotiated again after TLS, they count.
  Handshake hs(catalog(), {}, TlsMode::require);
  Bytes out;
  hs.feed(cat({fixed, starttls}), out);
  hs.tls_started();
  hs.feed(cat({structured_reply,
               opt(spec::opt_set_meta_context, meta_request("hidden-disk", {"base:allocation"})),
               opt(spec::opt_go, info_request("hidden-disk"))}),
          out);
  REQUIRE(hs.state() == State::transmission);
  CHECK(hs.negotiated().structured_replies);
  CHECK(hs.negotiated().base_allocation_id.has_value());
}

TEST_CASE("on mode: plaintext clients negotiate as without TLS") {
  const Bytes in = cat({fixed, list, structured_reply,
                        opt(spec::opt_info, info_request("hidden-disk", {spec::info_description})),
                        opt(spec::opt_go, info_request("other-disk"))});
  const Fed on = feed_checked(catalog(), TlsMode::on, in);
  const Fed off = feed_checked(catalog(), TlsMode::off, in);
  CHECK(on.state == State::transmission);
  CHECK(on.out == off.out);
  CHECK(on.consumed == in.size());
  CHECK(contains(on.out, "confidential description"));
}

TEST_CASE("require mode before TLS: only STARTTLS and ABORT, nothing about exports leaks") {
  using namespace spec;
  const Bytes refused = cat({
      list, opt(opt_info, info_request("hidden-disk", {info_name, info_description})),
      opt(opt_go, info_request("", {info_name})), opt(opt_go, info_request("no-such-export")),
      structured_reply, opt(opt_list_meta_context, meta_request("hidden-disk", {})),
      opt(opt_set_meta_context, meta_request("hidden-disk", {"base:allocation"})),
      opt(0xDEAD, Build().str("unknown option payload")),
      opt(11),  // EXTENDED_HEADERS: not implemented, still TLS_REQD
  });
  const Fed f = feed_checked(catalog(), TlsMode::require, cat({fixed, refused, starttls}));
  CHECK(f.state == State::starttls);
  CHECK(f.consumed == fixed.size() + refused.size() + starttls.size());
  const auto replies = parse(f.out);
  REQUIRE(replies.size() == 10);
  const uint32_t options[] = {opt_list,
                              opt_info,
                              opt_go,
                              opt_go,
                              opt_structured_reply,
                              opt_list_meta_context,
                              opt_set_meta_context,
                              0xDEAD,
                              11};
  for (std::size_t i = 0; i < 9; ++i) {
    CHECK(replies[i].option == options[i]);
    CHECK(replies[i].type == rep_err_tls_reqd);
    CHECK(replies[i].data.find("STARTTLS") != std::string::npos);
  }
  CHECK(replies[9].option == opt_starttls);
  CHECK(replies[9].type == rep_ack);
  for (std::string_view secret : {"hidden", "other-disk", "confidential", "SECRETSZ"}) {
    CHECK_MESSAGE(!contains(f.out, secret), secret);
  }
  for (const auto& r : replies) CHECK(r.type != rep_server);
  for (const auto& r : replies) CHECK(r.type != rep_info);
  for (const auto& r : replies) CHECK(r.type != rep_meta_context);
  for (const auto& r : replies) CHECK(r.type != rep_err_unsup);
}

TEST_CASE("require mode before TLS: EXPORT_NAME and non-fixed clients are hung up on") {
  using namespace spec;
  const Fed named =
      feed_checked(catalog(), TlsMode::require,
                   cat({fixed, opt(opt_export_name, Build().str("hidden-disk")), list}));
  CHECK(named.state == State::closed);
  CHECK(named.out.empty());

  Handshake hs(catalog(), {}, TlsMode::require);
  Bytes out;
  hs.feed(cat({fixed, opt(opt_export_name)}), out);
  CHECK(hs.state() == State::closed);
  CHECK(hs.close_reason().find("TLS") != std::string::npos);
  CHECK(out.empty());

  const Fed nonfixed =
      feed_checked(catalog(), TlsMode::require, cat({Build().u32(0), opt(opt_export_name)}));
  CHECK(nonfixed.state == State::closed);
  CHECK(nonfixed.out.empty());

  const Fed aborted = feed_checked(catalog(), TlsMode::require, cat({fixed, opt(opt_abort)}));
  CHECK(aborted.state == State::closed);
  CHECK(kinds(parse(aborted.out)) == Kinds{{opt_abort, rep_ack}});
}

TEST_CASE("require mode before TLS: over-long options get TLS_REQD too") {
  HandshakeLimits limits;
  limits.max_option_length = 16;
  Handshake hs(catalog(), limits, TlsMode::require);
  Bytes out;
  const Bytes in =
      cat({fixed, opt(spec::opt_go, info_request("hidden-disk-with-long-name")), list});
  CHECK(hs.feed(in, out) == in.size());
  CHECK(kinds(parse(out)) ==
        Kinds{{spec::opt_go, spec::rep_err_tls_reqd}, {spec::opt_list, spec::rep_err_tls_reqd}});
}

TEST_CASE("require mode after TLS: everything works and TLS_REQD is never sent") {
  using namespace spec;
  Handshake hs(catalog(), {}, TlsMode::require);
  Bytes out;
  hs.feed(cat({fixed, starttls}), out);
  hs.tls_started();
  out.clear();
  const Bytes in = cat({list, opt(opt_info, info_request("hidden-disk", {info_description})),
                        opt(opt_export_name, Build().str("other-disk"))});
  CHECK(hs.feed(in, out) == in.size());
  CHECK(hs.state() == State::transmission);
  CHECK(hs.negotiated().export_info.name == "other-disk");
  CHECK(contains(out, "confidential description"));
  CHECK_FALSE(contains(out, "STARTTLS"));
}

TEST_CASE("shutting down in require mode: ERR_SHUTDOWN, still nothing leaked") {
  Handshake hs(catalog(), {}, TlsMode::require);
  hs.begin_shutdown();
  Bytes out;
  hs.feed(cat({fixed, list, starttls}), out);
  CHECK(kinds(parse(out)) == Kinds{{spec::opt_list, spec::rep_err_shutdown},
                                   {spec::opt_starttls, spec::rep_err_shutdown}});
  CHECK(hs.state() == State::negotiating);
}

TEST_CASE("ExportInfo::refusal: INFO, GO and meta contexts get ERR_POLICY, EXPORT_NAME closes") {
  using namespace spec;
  const FakeCatalog refusing{{make_export("open", "fine"),
                              make_export("locked", "secret", "client 192.0.2.1 is not allowed")}};
  const Bytes in = cat({fixed, structured_reply, opt(opt_info, info_request("locked")),
                        opt(opt_go, info_request("locked", {info_name})),
                        opt(opt_list_meta_context, meta_request("locked", {})),
                        opt(opt_set_meta_context, meta_request("locked", {"base:allocation"})),
                        opt(opt_go, info_request("open"))});
  const Fed f = feed_checked(refusing, TlsMode::off, in);
  CHECK(f.state == State::transmission);
  const auto replies = parse(f.out);
  REQUIRE(replies.size() >= 5);
  CHECK(kinds(replies).at(0) == std::pair{opt_structured_reply, rep_ack});
  for (std::size_t i = 1; i < 5; ++i) {
    CHECK(replies[i].type == rep_err_policy);
    CHECK(replies[i].data == "client 192.0.2.1 is not allowed");
  }
  CHECK(replies.back().option == opt_go);
  CHECK(replies.back().type == rep_ack);
  CHECK_FALSE(contains(f.out, "secret"));

  Handshake hs(refusing);
  Bytes out;
  hs.feed(cat({fixed, opt(opt_export_name, Build().str("locked"))}), out);
  CHECK(hs.state() == State::closed);
  CHECK(out.empty());
  CHECK(hs.close_reason().find("not allowed") != std::string::npos);
}
