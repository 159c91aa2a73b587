// The cache filter's bookkeeping: which chunks of the remote object are in the local file
// (the present bitmap) and which were read lately (access bits for the clock / second-chance
// eviction), both lock-free atomics so that cache hits take no lock; and the codec of the
// metadata file (PATH.meta) that keeps the present bitmap across restarts together with the
// remote's identity. The codec does no I/O and never throws.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace imagenbd::backends {

// What the cached bytes are a copy of. Two identities that differ mean the cache is stale.
struct CacheIdentity {
  std::string describe;     // the remote's describe()
  uint64_t size = 0;        // the remote's size()
  std::string version_tag;  // the remote's version_tag() ("" if unknown)
  uint32_t chunk_size = 0;  // bytes per bit of the bitmap
  bool operator==(const CacheIdentity&) const = default;
};

// Why `saved` may not be used for `now`, in words for a log line ("version tag changed from
// \"1\" to \"2\""); "" if they are the same.
std::string identity_change(const CacheIdentity& saved, const CacheIdentity& now);

// One present bit and one access bit per chunk.
// @par Thread Safety: every method may be called concurrently.
class CacheMap {
 public:
  explicit CacheMap(uint64_t chunks);

  uint64_t chunks() const { return chunks_; }
  bool present(uint64_t chunk) const;
  // Set/clear the present bit; returns whether it changed.
  bool set_present(uint64_t chunk);
  bool clear_present(uint64_t chunk);
  // Marks the chunk as read lately (cheap: only writes when the bit is not set yet).
  void touch(uint64_t chunk);
  // Clears the access bit; returns whether it was set (the clock's second chance).
  bool take_access(uint64_t chunk);
  uint64_t count_present() const;

  // The present bitmap as 64-bit words, chunk i in bit i % 64 of word i / 64.
  std::vector<uint64_t> snapshot() const;
  // Replaces the present bitmap (words.size() must be the word count); bits past the last
  // chunk are ignored.
  void load(std::span<const uint64_t> words);
  std::size_t word_count() const { return words_; }

 private:
  uint64_t chunks_;
  std::size_t words_;
  std::unique_ptr<std::atomic<uint64_t>[]> present_;
  std::unique_ptr<std::atomic<uint64_t>[]> access_;
};

// The metadata file: magic "imgnbdc1", the identity, the bitmap, and an FNV-1a 64 checksum
// of all that, little-endian (the file is local, read back by the same kind of machine).
std::vector<std::byte> encode_cache_meta(const CacheIdentity& identity,
                                         std::span<const uint64_t> words);

struct DecodedCacheMeta {
  bool ok = false;
  std::string problem;  // when !ok: what is wrong with the bytes ("checksum mismatch")
  CacheIdentity identity;
  std::vector<uint64_t> words;
};
DecodedCacheMeta decode_cache_meta(std::span<const std::byte> bytes);

}  // namespace imagenbd::backends
