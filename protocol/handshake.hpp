// The fixed-newstyle handshake (NBD spec "Option haggling") as a pure state machine:
// bytes in, bytes out, no sockets. The server's session feeds it what the client sent and
// writes out what it produced, until state() says transmission or closed.
//
// Implemented options: EXPORT_NAME, ABORT, LIST, STARTTLS (when TLS is on; the session
// runs the TLS handshake itself, see State::starttls), INFO and GO (INFO_EXPORT, NAME, DESCRIPTION,
// BLOCK_SIZE), STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (base:allocation). Anything
// else gets ERR_UNSUP. Every option payload is consumed even when the option is refused.
// TLS modes follow the spec's "TLS support" section: off = NOTLS, on = the client's choice,
// require = FORCEDTLS (see TlsMode).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/wire.hpp"

namespace imagenbd::protocol {

// What the handshake needs to know about one export. Flags exclude send_df, which the
// handshake adds when structured replies were negotiated.
struct ExportInfo {
  std::string name;  // canonical name
  std::string description;
  uint64_t size = 0;
  uint16_t flags = tx_flag::has_flags;
  uint32_t block_min = 1;
  uint32_t block_preferred = 4096;
  uint32_t block_max = 32u << 20;
  // Non-empty: this client may not use the export (access rules, connection limit); INFO,
  // GO and the meta context options answer NBD_REP_ERR_POLICY with this text, EXPORT_NAME
  // closes.
  std::string refusal;
};

// The server's view of its exports, as the handshake sees them.
class ExportCatalog {
 public:
  virtual ~ExportCatalog() = default;
  // The export a client asks for by name; "" means the default export. nullopt: unknown.
  virtual std::optional<ExportInfo> lookup(std::string_view name) const = 0;
  // Every export, for NBD_OPT_LIST.
  virtual std::vector<ExportInfo> list() const = 0;
};

struct HandshakeLimits {
  // Option rounds before we hang up. Generous, because `nbdinfo --list` spends two per
  // export; slow-loris clients are stopped by the server's handshake deadline instead.
  uint32_t max_options = 1024;
  uint32_t max_option_length = 64u << 10;  // longer payloads are skipped and get ERR_TOO_BIG
  uint32_t max_meta_queries = 128;         // more queries in one option get ERR_TOO_BIG
};

// NBD_OPT_STARTTLS policy. off: STARTTLS is refused. on: TLS is offered, plaintext still
// works. require: before TLS only STARTTLS and ABORT are answered (everything else gets
// NBD_REP_ERR_TLS_REQD, EXPORT_NAME closes) and no export name or size is revealed.
enum class TlsMode { off, on, require };

// What was agreed when the handshake reaches transmission.
struct Negotiated {
  ExportInfo export_info;
  uint16_t transmission_flags = 0;  // exactly as sent to the client
  bool structured_replies = false;
  bool no_zeroes = false;
  // The client asked for NBD_INFO_BLOCK_SIZE in GO, so it must obey the sizes we sent.
  // Clients that did not (EXPORT_NAME, the kernel) get the spec's lenient defaults.
  bool block_size_requested = false;
  std::optional<uint32_t> base_allocation_id;  // set when base:allocation was selected
};

class Handshake {
 public:
  // starttls: the ACK to NBD_OPT_STARTTLS is in `out`; the session sends it, runs the TLS
  // handshake, then calls tls_started() (or closes if TLS failed). feed() consumed nothing
  // after the STARTTLS option: bytes left over arrived before TLS and must be refused.
  enum class State { negotiating, starttls, transmission, closed };

  explicit Handshake(const ExportCatalog& catalog, HandshakeLimits limits = {},
                     TlsMode tls = TlsMode::off);

  // The 18-byte greeting the server sends as soon as a client connects.
  static std::vector<std::byte> greeting();

  // Consumes client bytes and appends any reply bytes to `out`. Returns how many bytes of
  // `in` were consumed: all of them while negotiating; once the state leaves negotiating,
  // the rest belongs to the transmission phase (or is to be dropped, if closed).
  std::size_t feed(std::span<const std::byte> in, std::vector<std::byte>& out);

  // TLS is up: back to negotiating, with every option state agreed before it forgotten
  // (structured replies, meta contexts), as the spec requires. Only valid in starttls;
  // a later STARTTLS gets NBD_REP_ERR_INVALID.
  void tls_started();
  bool tls_active() const { return tls_active_; }

  // From now on every option is answered NBD_REP_ERR_SHUTDOWN (the server is stopping).
  void begin_shutdown() { shutting_down_ = true; }

  State state() const { return state_; }
  // Valid once state() == transmission.
  const Negotiated& negotiated() const { return negotiated_; }
  // Why the handshake closed (protocol violation, ABORT, unknown export...).
  const std::string& close_reason() const { return close_reason_; }
  // Human-readable log of what happened, one entry per option (for control-path debug).
  std::vector<std::string> take_events();

 private:
  enum class Phase { client_flags, option_header, option_payload, option_skip };

  void handle_option(std::vector<std::byte>& out);
  void option_info_or_go(std::vector<std::byte>& out);
  void option_meta_context(std::vector<std::byte>& out, bool set);
  void option_export_name(std::vector<std::byte>& out);
  void option_list(std::vector<std::byte>& out);
  void enter_transmission(const ExportInfo& info, bool block_size_requested);
  void reply(std::vector<std::byte>& out, Rep type, std::span<const std::byte> data = {});
  void reply_error(std::vector<std::byte>& out, Rep type, std::string_view message);
  void close(std::string reason);
  uint16_t transmission_flags(const ExportInfo& info) const;
  bool tls_required() const { return tls_ == TlsMode::require && !tls_active_; }
  void event(std::string text);

  const ExportCatalog& catalog_;
  HandshakeLimits limits_;
  State state_ = State::negotiating;
  Phase phase_ = Phase::client_flags;
  std::vector<std::byte> frame_;  // bytes of the frame being assembled
  uint32_t option_ = 0;
  uint32_t option_length_ = 0;
  uint64_t skip_left_ = 0;
  uint32_t options_seen_ = 0;
  bool fixed_newstyle_ = false;
  bool no_zeroes_ = false;
  bool structured_replies_ = false;
  bool shutting_down_ = false;
  TlsMode tls_ = TlsMode::off;
  bool tls_active_ = false;
  // Meta contexts selected by the last SET_META_CONTEXT and the export it named.
  std::optional<std::string> meta_export_;
  bool meta_base_allocation_ = false;
  Negotiated negotiated_;
  std::string close_reason_;
  std::vector<std::string> events_;
};

// The id we give base:allocation in NBD_REP_META_CONTEXT replies to SET_META_CONTEXT.
inline constexpr uint32_t base_allocation_context_id = 1;

}  // namespace imagenbd::protocol
