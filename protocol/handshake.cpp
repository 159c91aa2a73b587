#include "protocol/handshake.hpp"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "protocol/endian.hpp"
#include "protocol/errors.hpp"

namespace imagenbd::protocol {

namespace {

std::string_view as_text(std::span<const std::byte> bytes) {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

// Reads length-prefixed fields of an option payload, never past its end.
class PayloadReader {
 public:
  explicit PayloadReader(std::span<const std::byte> data) : data_(data) {}
  bool u16(uint16_t& v) {
    if (left() < 2) return false;
    v = load_be16(data_.data() + pos_);
    pos_ += 2;
    return true;
  }
  bool u32(uint32_t& v) {
    if (left() < 4) return false;
    v = load_be32(data_.data() + pos_);
    pos_ += 4;
    return true;
  }
  bool bytes(std::size_t n, std::string_view& v) {
    if (left() < n) return false;
    v = as_text(data_.subspan(pos_, n));
    pos_ += n;
    return true;
  }
  std::size_t left() const { return data_.size() - pos_; }

 private:
  std::span<const std::byte> data_;
  std::size_t pos_ = 0;
};

// Length of the valid UTF-8 sequence starting at text[i], or 0 (RFC 3629: no overlongs,
// surrogates or code points past U+10FFFF).
std::size_t utf8_length(std::string_view text, std::size_t i) {
  auto at = [&](std::size_t k) { return static_cast<unsigned char>(text[i + k]); };
  const unsigned c = at(0);
  std::size_t length = 0;
  unsigned low = 0x80, high = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    length = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    length = 3;
    if (c == 0xE0) low = 0xA0;
    if (c == 0xED) high = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    length = 4;
    if (c == 0xF0) low = 0x90;
    if (c == 0xF4) high = 0x8F;
  } else {
    return 0;
  }
  if (text.size() - i < length || at(1) < low || at(1) > high) return 0;
  for (std::size_t k = 2; k < length; ++k) {
    if ((at(k) & 0xC0) != 0x80) return 0;
  }
  return length;
}

// Error messages are NBD strings (UTF-8, no NUL, at most 4096 bytes) but often quote what
// the client sent: control characters and invalid UTF-8 become '?', and the cut at 4096
// bytes never splits a character.
std::string message_string(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = utf8_length(text, i);
    const bool control = length == 1 && (static_cast<unsigned char>(text[i]) < 0x20 ||
                                         static_cast<unsigned char>(text[i]) == 0x7F);
    const std::string_view piece = length == 0 || control ? "?" : text.substr(i, length);
    if (out.size() + piece.size() > max_string_length) break;
    out += piece;
    i += length == 0 ? 1 : length;
  }
  return out;
}

constexpr std::string_view tls_required_message = "TLS is required: send NBD_OPT_STARTTLS first";

std::string hex(uint32_t value) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%x", value);
  return buf;
}

}  // namespace

Handshake::Handshake(const ExportCatalog& catalog, HandshakeLimits limits, TlsMode tls)
    : catalog_(catalog), limits_(limits), tls_(tls) {}

// Everything agreed before STARTTLS could have been injected by a man in the middle
// (nbdkit CVE-2021-3716), so it is forgotten. The client flags are not options: they stay.
void Handshake::tls_started() {
  if (state_ != State::starttls) return;
  tls_active_ = true;
  structured_replies_ = false;
  meta_export_.reset();
  meta_base_allocation_ = false;
  phase_ = Phase::option_header;
  state_ = State::negotiating;
  event("TLS started: option state reset");
}

std::vector<std::byte> Handshake::greeting() {
  std::vector<std::byte> out;
  out.reserve(greeting_size);
  put_be64(out, nbd_magic);
  put_be64(out, ihaveopt);
  put_be16(out, handshake_flag::fixed_newstyle | handshake_flag::no_zeroes);
  return out;
}

std::vector<std::string> Handshake::take_events() {
  return std::exchange(events_, {});
}

// Events and close reasons quote client bytes and end up in logs: sanitised like messages,
// so a newline in an export name cannot forge a log line.
void Handshake::event(std::string text) {
  if (events_.size() < 1024) events_.push_back(message_string(text));
}

void Handshake::close(std::string reason) {
  state_ = State::closed;
  close_reason_ = message_string(reason);
}

std::size_t Handshake::feed(std::span<const std::byte> in, std::vector<std::byte>& out) {
  std::size_t used = 0;
  while (state_ == State::negotiating && used < in.size()) {
    auto rest = in.subspan(used);
    if (phase_ == Phase::option_skip) {
      auto n = static_cast<std::size_t>(std::min<uint64_t>(skip_left_, rest.size()));
      skip_left_ -= n;
      used += n;
      if (skip_left_ == 0) {
        const auto opt = static_cast<Opt>(option_);
        if (tls_required() && opt != Opt::starttls && opt != Opt::abort) {
          reply_error(out, Rep::err_tls_reqd, tls_required_message);
        } else {
          reply_error(out, Rep::err_too_big,
                      "option payload of " + std::to_string(option_length_) +
                          " bytes exceeds the limit of " +
                          std::to_string(limits_.max_option_length));
        }
        phase_ = Phase::option_header;
      }
      continue;
    }
    std::size_t want = 0;
    switch (phase_) {
      case Phase::client_flags:
        want = 4;
        break;
      case Phase::option_header:
        want = option_header_size;
        break;
      case Phase::option_payload:
        want = option_length_;
        break;
      case Phase::option_skip:
        break;
    }
    auto n = std::min(want - frame_.size(), rest.size());
    frame_.insert(frame_.end(), rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(n));
    used += n;
    if (frame_.size() < want) break;

    switch (phase_) {
      case Phase::client_flags: {
        uint32_t flags = load_be32(frame_.data());
        frame_.clear();
        const uint32_t known = client_flag::fixed_newstyle | client_flag::no_zeroes;
        if (flags & ~known) {
          close("client sent unknown client flags " + hex(flags));
          break;
        }
        fixed_newstyle_ = (flags & client_flag::fixed_newstyle) != 0;
        no_zeroes_ = (flags & client_flag::no_zeroes) != 0;
        phase_ = Phase::option_header;
        break;
      }
      case Phase::option_header: {
        uint64_t magic = load_be64(frame_.data());
        option_ = load_be32(frame_.data() + 8);
        option_length_ = load_be32(frame_.data() + 12);
        frame_.clear();
        if (magic != ihaveopt) {
          close("client sent an option without the IHAVEOPT magic");
          break;
        }
        if (++options_seen_ > limits_.max_options) {
          close("client sent too many options (limit " + std::to_string(limits_.max_options) + ")");
          break;
        }
        if (option_length_ > limits_.max_option_length) {
          // Skip the payload without buffering it, then refuse the option. EXPORT_NAME
          // cannot be refused, and a non-fixed client does not understand replies.
          if (static_cast<Opt>(option_) == Opt::export_name || !fixed_newstyle_) {
            close("client sent an over-long option");
            break;
          }
          skip_left_ = option_length_;
          phase_ = Phase::option_skip;
          break;
        }
        phase_ = Phase::option_payload;
        if (option_length_ != 0) break;
        [[fallthrough]];
      }
      case Phase::option_payload:
        handle_option(out);
        frame_.clear();
        if (state_ == State::negotiating) phase_ = Phase::option_header;
        break;
      case Phase::option_skip:
        break;
    }
  }
  return used;
}

void Handshake::reply(std::vector<std::byte>& out, Rep type, std::span<const std::byte> data) {
  put_be64(out, option_reply_magic);
  put_be32(out, option_);
  put_be32(out, static_cast<uint32_t>(type));
  put_be32(out, static_cast<uint32_t>(data.size()));
  out.insert(out.end(), data.begin(), data.end());
}

void Handshake::reply_error(std::vector<std::byte>& out, Rep type, std::string_view message) {
  const std::string text = message_string(message);
  reply(out, type, std::as_bytes(std::span(text.data(), text.size())));
  event(std::string(name(static_cast<Opt>(option_))) + " -> " + std::string(name(type)) + ": " +
        text);
}

uint16_t Handshake::transmission_flags(const ExportInfo& info) const {
  uint16_t flags = static_cast<uint16_t>(info.flags | tx_flag::has_flags);
  flags &= static_cast<uint16_t>(~tx_flag::send_df);
  if (structured_replies_) flags |= tx_flag::send_df;
  return flags;
}

void Handshake::handle_option(std::vector<std::byte>& out) {
  const auto opt = static_cast<Opt>(option_);
  const std::span<const std::byte> payload(frame_);

  if (!fixed_newstyle_) {
    // Old (non-fixed) newstyle: EXPORT_NAME is the only option; anything else hangs up.
    // Such clients cannot do TLS, so with TLS required they are hung up on too.
    if (tls_required()) {
      close("non-fixed-newstyle client cannot start TLS, which this server requires");
    } else if (opt == Opt::export_name) {
      option_export_name(out);
    } else {
      close("non-fixed-newstyle client sent option " + std::to_string(option_));
    }
    return;
  }
  if (shutting_down_ && opt != Opt::abort) {
    if (opt == Opt::export_name) {
      close("server is shutting down");
    } else {
      reply_error(out, Rep::err_shutdown, "server is shutting down");
    }
    return;
  }

  // FORCEDTLS (spec "TLS support"): before TLS only STARTTLS and ABORT are answered, so
  // nothing about the exports leaks to a plaintext client.
  if (tls_required() && opt != Opt::starttls && opt != Opt::abort) {
    if (opt == Opt::export_name) {
      close("NBD_OPT_EXPORT_NAME before TLS, which this server requires");
    } else {
      reply_error(out, Rep::err_tls_reqd, tls_required_message);
    }
    return;
  }

  switch (opt) {
    case Opt::export_name:
      option_export_name(out);
      return;
    case Opt::abort:
      // Clients may close without reading the ACK; the session ignores send errors here.
      reply(out, Rep::ack);
      event("NBD_OPT_ABORT");
      close("client sent NBD_OPT_ABORT");
      return;
    case Opt::list:
      if (!payload.empty()) {
        reply_error(out, Rep::err_invalid, "NBD_OPT_LIST takes no data");
        return;
      }
      option_list(out);
      return;
    case Opt::starttls:
      if (!payload.empty()) {
        reply_error(out, Rep::err_invalid, "NBD_OPT_STARTTLS takes no data");
        return;
      }
      if (tls_ == TlsMode::off) {
        reply_error(out, Rep::err_policy, "TLS is not enabled on this server");
      } else if (tls_active_) {
        reply_error(out, Rep::err_invalid, "TLS is already active");
      } else {
        // feed() stops right after this option: whatever the client sent behind it
        // arrived before the TLS handshake, and the session refuses it.
        reply(out, Rep::ack);
        event("NBD_OPT_STARTTLS -> ACK");
        state_ = State::starttls;
      }
      return;
    case Opt::info:
    case Opt::go:
      option_info_or_go(out);
      return;
    case Opt::structured_reply:
      if (!payload.empty()) {
        reply_error(out, Rep::err_invalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
        return;
      }
      structured_replies_ = true;
      reply(out, Rep::ack);
      event("NBD_OPT_STRUCTURED_REPLY -> ACK");
      return;
    case Opt::list_meta_context:
      option_meta_context(out, false);
      return;
    case Opt::set_meta_context:
      option_meta_context(out, true);
      return;
    default:
      reply_error(out, Rep::err_unsup, "option " + std::to_string(option_) + " is not supported");
      return;
  }
}

void Handshake::option_export_name(std::vector<std::byte>& out) {
  // EXPORT_NAME cannot report errors: an unknown export means a hard disconnect.
  if (frame_.size() > max_string_length) {
    close("NBD_OPT_EXPORT_NAME: export name longer than 4096 bytes");
    return;
  }
  std::string name_asked(as_text(frame_));
  auto info = catalog_.lookup(name_asked);
  if (!info) {
    close("NBD_OPT_EXPORT_NAME: unknown export '" + name_asked + "'");
    return;
  }
  if (!info->refusal.empty()) {
    close("NBD_OPT_EXPORT_NAME: export '" + name_asked + "' refused: " + info->refusal);
    return;
  }
  enter_transmission(*info, false);
  put_be64(out, info->size);
  put_be16(out, negotiated_.transmission_flags);
  if (!no_zeroes_) out.resize(out.size() + export_name_padding, std::byte{0});
  event("NBD_OPT_EXPORT_NAME '" + name_asked + "'");
}

void Handshake::enter_transmission(const ExportInfo& info, bool block_size_requested) {
  negotiated_.export_info = info;
  negotiated_.block_size_requested = block_size_requested;
  negotiated_.transmission_flags = transmission_flags(info);
  negotiated_.structured_replies = structured_replies_;
  negotiated_.no_zeroes = no_zeroes_;
  // base:allocation counts only if the last SET_META_CONTEXT named this same export.
  if (meta_base_allocation_ && meta_export_) {
    auto meta_info = catalog_.lookup(*meta_export_);
    if (meta_info && meta_info->name == info.name) {
      negotiated_.base_allocation_id = base_allocation_context_id;
    }
  }
  state_ = State::transmission;
}

void Handshake::option_list(std::vector<std::byte>& out) {
  for (const auto& info : catalog_.list()) {
    std::vector<std::byte> data;
    put_be32(data, static_cast<uint32_t>(info.name.size()));
    put_bytes(data, info.name.data(), info.name.size());
    auto desc = std::string_view(info.description).substr(0, max_string_length);
    put_bytes(data, desc.data(), desc.size());
    reply(out, Rep::server, data);
  }
  reply(out, Rep::ack);
  event("NBD_OPT_LIST -> ACK");
}

void Handshake::option_info_or_go(std::vector<std::byte>& out) {
  const bool go = static_cast<Opt>(option_) == Opt::go;
  PayloadReader in{std::span<const std::byte>(frame_)};
  uint32_t name_length = 0;
  std::string_view name_asked;
  uint16_t count = 0;
  if (!in.u32(name_length) || name_length > max_string_length ||
      !in.bytes(name_length, name_asked) || !in.u16(count) || in.left() != count * 2u) {
    reply_error(out, Rep::err_invalid, "malformed NBD_OPT_INFO/GO payload");
    return;
  }
  bool want_name = false, want_description = false, want_block_size = false;
  for (uint16_t i = 0; i < count; ++i) {
    uint16_t type = 0;
    in.u16(type);
    switch (static_cast<Info>(type)) {
      case Info::name:
        want_name = true;
        break;
      case Info::description:
        want_description = true;
        break;
      case Info::block_size:
        want_block_size = true;
        break;  // always sent; see below
      default:
        break;  // EXPORT is always sent; unknown types are ignored
    }
  }
  auto info = catalog_.lookup(name_asked);
  if (!info) {
    reply_error(out, Rep::err_unknown, "unknown export '" + std::string(name_asked) + "'");
    return;
  }
  if (!info->refusal.empty()) {
    reply_error(out, Rep::err_policy, info->refusal);
    return;
  }
  const uint16_t flags = transmission_flags(*info);

  std::vector<std::byte> data;
  put_be16(data, static_cast<uint16_t>(Info::export_));
  put_be64(data, info->size);
  put_be16(data, flags);
  reply(out, Rep::info, data);
  if (want_name) {
    data.clear();
    put_be16(data, static_cast<uint16_t>(Info::name));
    put_bytes(data, info->name.data(), std::min<std::size_t>(info->name.size(), max_string_length));
    reply(out, Rep::info, data);
  }
  if (want_description && !info->description.empty()) {
    data.clear();
    put_be16(data, static_cast<uint16_t>(Info::description));
    put_bytes(data, info->description.data(),
              std::min<std::size_t>(info->description.size(), max_string_length));
    reply(out, Rep::info, data);
  }
  // Block sizes are always volunteered: clients that did not ask ignore them, and the
  // kernel never asks, so constraints are enforced per request anyway.
  data.clear();
  put_be16(data, static_cast<uint16_t>(Info::block_size));
  put_be32(data, info->block_min);
  put_be32(data, info->block_preferred);
  put_be32(data, info->block_max);
  reply(out, Rep::info, data);
  reply(out, Rep::ack);
  event(std::string(go ? "NBD_OPT_GO" : "NBD_OPT_INFO") + " '" + std::string(name_asked) +
        "' -> ACK");

  if (go) enter_transmission(*info, want_block_size);
}

void Handshake::option_meta_context(std::vector<std::byte>& out, bool set) {
  if (set) {
    // Every SET replaces the previous selection, even when it fails.
    meta_export_.reset();
    meta_base_allocation_ = false;
  }
  if (!structured_replies_) {
    reply_error(out, Rep::err_invalid, "negotiate structured replies before meta contexts");
    return;
  }
  PayloadReader in{std::span<const std::byte>(frame_)};
  uint32_t name_length = 0, queries = 0;
  std::string_view name_asked;
  if (!in.u32(name_length) || name_length > max_string_length ||
      !in.bytes(name_length, name_asked) || !in.u32(queries)) {
    reply_error(out, Rep::err_invalid, "malformed meta context payload");
    return;
  }
  if (queries > limits_.max_meta_queries) {
    reply_error(out, Rep::err_too_big, "too many meta context queries");
    return;
  }
  bool selected = false;
  bool list_all = queries == 0 && !set;
  for (uint32_t i = 0; i < queries; ++i) {
    uint32_t length = 0;
    std::string_view query;
    if (!in.u32(length) || length > max_string_length || !in.bytes(length, query)) {
      reply_error(out, Rep::err_invalid, "malformed meta context query");
      return;
    }
    if (query == protocol::base_allocation) selected = true;
    // "base:" lists every base context in LIST and selects nothing in SET.
    if (!set && query == "base:") selected = true;
  }
  if (in.left() != 0) {
    reply_error(out, Rep::err_invalid, "trailing bytes after meta context queries");
    return;
  }
  auto info = catalog_.lookup(name_asked);
  if (!info) {
    reply_error(out, Rep::err_unknown, "unknown export '" + std::string(name_asked) + "'");
    return;
  }
  if (!info->refusal.empty()) {
    reply_error(out, Rep::err_policy, info->refusal);
    return;
  }
  if (selected || list_all) {
    std::vector<std::byte> data;
    put_be32(data, set ? base_allocation_context_id : 0);
    put_bytes(data, protocol::base_allocation, sizeof protocol::base_allocation - 1);
    reply(out, Rep::meta_context, data);
  }
  if (set) {
    meta_export_ = std::string(name_asked);
    meta_base_allocation_ = selected;
  }
  reply(out, Rep::ack);
  event(std::string(set ? "NBD_OPT_SET_META_CONTEXT" : "NBD_OPT_LIST_META_CONTEXT") + " '" +
        std::string(name_asked) + "'" + (selected || list_all ? " base:allocation" : "") +
        " -> ACK");
}

}  // namespace imagenbd::protocol
