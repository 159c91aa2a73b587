// Cache bitmap and metadata codec (see cache_map.hpp).
#include "backends/cache_map.hpp"

#include <bit>
#include <cstring>

#include <fmt/format.h>

namespace imagenbd::backends {

namespace {

constexpr auto relaxed = std::memory_order_relaxed;
constexpr char magic[8] = {'i', 'm', 'g', 'n', 'b', 'd', 'c', '1'};
// Refuse absurd lengths before allocating: a damaged file must not cost gigabytes.
constexpr uint32_t max_text = 64 << 10;

uint64_t fnv1a(std::span<const std::byte> bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (auto b : bytes) {
    h ^= static_cast<uint8_t>(b);
    h *= 0x100000001b3ull;
  }
  return h;
}

template <typename T>
void put(std::vector<std::byte>& out, T value) {
  const auto* p = reinterpret_cast<const std::byte*>(&value);
  out.insert(out.end(), p, p + sizeof value);
}

void put_text(std::vector<std::byte>& out, const std::string& s) {
  put<uint32_t>(out, static_cast<uint32_t>(s.size()));
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  out.insert(out.end(), p, p + s.size());
}

// Reads from the front of a span; any read past the end sets `short_`.
struct Reader {
  std::span<const std::byte> in;
  bool short_ = false;
  template <typename T>
  T get() {
    T value{};
    if (in.size() < sizeof value) {
      short_ = true;
      return value;
    }
    std::memcpy(&value, in.data(), sizeof value);
    in = in.subspan(sizeof value);
    return value;
  }
  std::string text() {
    const auto n = get<uint32_t>();
    if (short_ || n > max_text || n > in.size()) {
      short_ = true;
      return {};
    }
    std::string s(reinterpret_cast<const char*>(in.data()), n);
    in = in.subspan(n);
    return s;
  }
};

}  // namespace

std::string identity_change(const CacheIdentity& saved, const CacheIdentity& now) {
  if (saved.describe != now.describe)
    return fmt::format("remote changed from \"{}\" to \"{}\"", saved.describe, now.describe);
  if (saved.size != now.size)
    return fmt::format("remote size changed from {} to {} bytes", saved.size, now.size);
  if (saved.version_tag != now.version_tag)
    return fmt::format("remote version tag changed from \"{}\" to \"{}\"", saved.version_tag,
                       now.version_tag);
  if (saved.chunk_size != now.chunk_size)
    return fmt::format("chunk size changed from {} to {} bytes", saved.chunk_size, now.chunk_size);
  return {};
}

CacheMap::CacheMap(uint64_t chunks)
    : chunks_(chunks),
      words_(static_cast<std::size_t>((chunks + 63) / 64)),
      present_(std::make_unique<std::atomic<uint64_t>[]>(words_)),
      access_(std::make_unique<std::atomic<uint64_t>[]>(words_)) {
  for (std::size_t i = 0; i < words_; ++i) {
    present_[i].store(0, relaxed);
    access_[i].store(0, relaxed);
  }
}

bool CacheMap::present(uint64_t chunk) const {
  // acquire: pairs with set_present's release, so the chunk's data write happened before.
  return present_[chunk / 64].load(std::memory_order_acquire) & (1ull << (chunk % 64));
}

bool CacheMap::set_present(uint64_t chunk) {
  const uint64_t bit = 1ull << (chunk % 64);
  return !(present_[chunk / 64].fetch_or(bit, std::memory_order_acq_rel) & bit);
}

bool CacheMap::clear_present(uint64_t chunk) {
  const uint64_t bit = 1ull << (chunk % 64);
  return present_[chunk / 64].fetch_and(~bit, std::memory_order_acq_rel) & bit;
}

void CacheMap::touch(uint64_t chunk) {
  const uint64_t bit = 1ull << (chunk % 64);
  auto& word = access_[chunk / 64];
  if (!(word.load(relaxed) & bit)) word.fetch_or(bit, relaxed);
}

bool CacheMap::take_access(uint64_t chunk) {
  const uint64_t bit = 1ull << (chunk % 64);
  auto& word = access_[chunk / 64];
  if (!(word.load(relaxed) & bit)) return false;
  return word.fetch_and(~bit, relaxed) & bit;
}

uint64_t CacheMap::count_present() const {
  uint64_t n = 0;
  for (std::size_t i = 0; i < words_; ++i) n += std::popcount(present_[i].load(relaxed));
  return n;
}

std::vector<uint64_t> CacheMap::snapshot() const {
  std::vector<uint64_t> out(words_);
  for (std::size_t i = 0; i < words_; ++i) out[i] = present_[i].load(std::memory_order_acquire);
  return out;
}

void CacheMap::load(std::span<const uint64_t> words) {
  for (std::size_t i = 0; i < words_ && i < words.size(); ++i) {
    uint64_t w = words[i];
    if (i == words_ - 1 && chunks_ % 64) w &= (1ull << (chunks_ % 64)) - 1;
    present_[i].store(w, relaxed);
  }
}

std::vector<std::byte> encode_cache_meta(const CacheIdentity& identity,
                                         std::span<const uint64_t> words) {
  std::vector<std::byte> out;
  out.insert(out.end(), reinterpret_cast<const std::byte*>(magic),
             reinterpret_cast<const std::byte*>(magic) + sizeof magic);
  put<uint32_t>(out, identity.chunk_size);
  put<uint64_t>(out, identity.size);
  put_text(out, identity.describe);
  put_text(out, identity.version_tag);
  put<uint64_t>(out, words.size());
  for (auto w : words) put<uint64_t>(out, w);
  put<uint64_t>(out, fnv1a(out));
  return out;
}

DecodedCacheMeta decode_cache_meta(std::span<const std::byte> bytes) {
  DecodedCacheMeta d;
  if (bytes.size() < sizeof magic + 8) {
    d.problem = fmt::format("too short ({} bytes)", bytes.size());
    return d;
  }
  if (std::memcmp(bytes.data(), magic, sizeof magic) != 0) {
    d.problem = "not a cache metadata file (bad magic)";
    return d;
  }
  const auto body = bytes.first(bytes.size() - 8);
  uint64_t sum = 0;
  std::memcpy(&sum, bytes.data() + body.size(), 8);
  if (sum != fnv1a(body)) {
    d.problem = "checksum mismatch (truncated or damaged)";
    return d;
  }
  Reader r{body.subspan(sizeof magic)};
  d.identity.chunk_size = r.get<uint32_t>();
  d.identity.size = r.get<uint64_t>();
  d.identity.describe = r.text();
  d.identity.version_tag = r.text();
  const auto n = r.get<uint64_t>();
  if (r.short_ || n != r.in.size() / 8 || r.in.size() % 8) {
    d.problem = "inconsistent lengths";
    return d;
  }
  d.words.resize(static_cast<std::size_t>(n));
  for (auto& w : d.words) w = r.get<uint64_t>();
  d.ok = true;
  return d;
}

}  // namespace imagenbd::backends
