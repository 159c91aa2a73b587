// A UUID held in RFC 4122 byte order, the order of its text form. VHD stores UUIDs this
// way; VDI stores them in Microsoft GUID layout (the first three fields little-endian), and
// vdi_layout converts at the boundary, so code above the codecs sees one order only
// (shared/docs/formats.md §2.3).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include <fmt/format.h>

namespace imagenbd::formats {

struct Uuid {
  std::array<uint8_t, 16> bytes{};  // RFC 4122 order: bytes[6] holds the version nibble

  bool is_nil() const {
    for (uint8_t b : bytes)
      if (b != 0) return false;
    return true;
  }
  bool operator==(const Uuid&) const = default;

  // "5d8fa14e-93e0-4f7e-8b5c-b9edc26b1ae7"
  std::string to_string() const {
    const auto& b = bytes;
    return fmt::format(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-"
        "{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15]);
  }

  // A random (version 4, RFC 4122 variant) UUID made of 16 random bytes from the caller.
  static Uuid random_v4(std::array<uint8_t, 16> random) {
    random[6] = static_cast<uint8_t>((random[6] & 0x0f) | 0x40);
    random[8] = static_cast<uint8_t>((random[8] & 0x3f) | 0x80);
    return Uuid{random};
  }
};

}  // namespace imagenbd::formats
