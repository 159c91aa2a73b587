// Client frames for the handshake tests (handshake_test, handshake_tls_test): the spec's
// numbers spelled out independently of wire.hpp (protocol.md §1-§6, §16), big-endian byte
// building by hand, the option frames, and a catalog of fixed exports.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

#include "protocol/handshake.hpp"

namespace imagenbd::test {

using Bytes = std::vector<std::byte>;

// Spec numbers, so that the constants in wire.hpp are checked too.
namespace spec {
constexpr uint64_t nbdmagic = 0x4e42444d41474943;
constexpr uint64_t ihaveopt = 0x49484156454F5054;
constexpr uint64_t option_reply_magic = 0x0003e889045565a9;

constexpr uint32_t c_fixed_newstyle = 0x1;
constexpr uint32_t c_no_zeroes = 0x2;

constexpr uint32_t opt_export_name = 1;
constexpr uint32_t opt_abort = 2;
constexpr uint32_t opt_list = 3;
constexpr uint32_t opt_peek_export = 4;
constexpr uint32_t opt_starttls = 5;
constexpr uint32_t opt_info = 6;
constexpr uint32_t opt_go = 7;
constexpr uint32_t opt_structured_reply = 8;
constexpr uint32_t opt_list_meta_context = 9;
constexpr uint32_t opt_set_meta_context = 10;
constexpr uint32_t opt_extended_headers = 11;

constexpr uint32_t rep_ack = 1;
constexpr uint32_t rep_server = 2;
constexpr uint32_t rep_info = 3;
constexpr uint32_t rep_meta_context = 4;
constexpr uint32_t rep_err_unsup = 0x80000001;
constexpr uint32_t rep_err_policy = 0x80000002;
constexpr uint32_t rep_err_invalid = 0x80000003;
constexpr uint32_t rep_err_tls_reqd = 0x80000005;
constexpr uint32_t rep_err_unknown = 0x80000006;
constexpr uint32_t rep_err_shutdown = 0x80000007;
constexpr uint32_t rep_err_too_big = 0x80000009;

constexpr uint16_t info_export = 0;
constexpr uint16_t info_name = 1;
constexpr uint16_t info_description = 2;
constexpr uint16_t info_block_size = 3;

constexpr uint16_t tx_send_df = 0x0080;
}  // namespace spec

class Build {
 public:
  Build& u16(uint16_t v) { return be(v, 2); }
  Build& u32(uint32_t v) { return be(v, 4); }
  Build& u64(uint64_t v) { return be(v, 8); }
  Build& str(std::string_view s) {
    for (char c : s) bytes_.push_back(static_cast<std::byte>(c));
    return *this;
  }
  Build& zeroes(std::size_t n) {
    bytes_.resize(bytes_.size() + n, std::byte{0});
    return *this;
  }
  Build& raw(const Bytes& b) {
    bytes_.insert(bytes_.end(), b.begin(), b.end());
    return *this;
  }
  operator Bytes() const { return bytes_; }  // NOLINT: implicit on purpose

 private:
  Build& be(uint64_t v, int n) {
    for (int i = n - 1; i >= 0; --i) bytes_.push_back(static_cast<std::byte>(v >> (8 * i)));
    return *this;
  }
  Bytes bytes_;
};

inline Bytes cat(std::initializer_list<Bytes> parts) {
  Bytes all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

// An option frame (§4): IHAVEOPT, option, payload length, payload.
inline Bytes opt(uint32_t option, const Bytes& payload = {}) {
  return Build()
      .u64(spec::ihaveopt)
      .u32(option)
      .u32(static_cast<uint32_t>(payload.size()))
      .raw(payload);
}
// INFO/GO payload: u32 name length + name + u16 n + n x u16 info type.
inline Bytes info_request(std::string_view name, std::initializer_list<uint16_t> types = {}) {
  Build b;
  b.u32(static_cast<uint32_t>(name.size())).str(name).u16(static_cast<uint16_t>(types.size()));
  for (auto t : types) b.u16(t);
  return b;
}
// Meta context payload: u32 name length + name + u32 n + n x (u32 length + query).
inline Bytes meta_request(std::string_view name, std::initializer_list<std::string_view> queries) {
  Build b;
  b.u32(static_cast<uint32_t>(name.size())).str(name).u32(static_cast<uint32_t>(queries.size()));
  for (auto q : queries) b.u32(static_cast<uint32_t>(q.size())).str(q);
  return b;
}

// A catalog of fixed exports; the empty name is the first one.
class FakeCatalog final : public protocol::ExportCatalog {
 public:
  explicit FakeCatalog(std::vector<protocol::ExportInfo> exports) : exports_(std::move(exports)) {}
  std::optional<protocol::ExportInfo> lookup(std::string_view name) const override {
    if (name.empty()) return exports_.front();
    for (const auto& e : exports_) {
      if (e.name == name) return e;
    }
    return std::nullopt;
  }
  std::vector<protocol::ExportInfo> list() const override { return exports_; }

 private:
  std::vector<protocol::ExportInfo> exports_;
};

}  // namespace imagenbd::test
