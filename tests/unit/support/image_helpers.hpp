// Test data shared by the format tests: UUIDs made from a seed and recognisable byte
// patterns.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "formats/uuid.hpp"

namespace imagenbd::test {

// The UUID whose 16 bytes are seed, seed + 1, ... (not a valid version-4 UUID).
inline formats::Uuid uuid(uint8_t seed) {
  formats::Uuid u;
  for (std::size_t i = 0; i < 16; ++i) u.bytes[i] = static_cast<uint8_t>(seed + i);
  return u;
}

// The same bytes made into a version-4 UUID (Uuid::random_v4).
inline formats::Uuid uuid_v4(uint8_t seed) {
  std::array<uint8_t, 16> b{};
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(seed + i);
  return formats::Uuid::random_v4(b);
}

// n bytes seed + 7i + i/512: every 512-byte sector differs from its neighbours.
inline std::vector<std::byte> pattern(std::size_t n, uint8_t seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>(seed + i * 7 + (i >> 9));
  return v;
}

// n odd (so never zero) bytes (7i + seed + 1) | 1.
inline std::vector<std::byte> odd_pattern(std::size_t n, int seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = std::byte(static_cast<uint8_t>(i * 7 + seed + 1) | 1);
  return v;
}

inline bool all_zero(const std::vector<std::byte>& v) {
  return std::all_of(v.begin(), v.end(), [](std::byte b) { return b == std::byte{0}; });
}

}  // namespace imagenbd::test
