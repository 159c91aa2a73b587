// The cache filter: a persistent on-disk copy of a remote leaf's bytes (issue 6 item 1).
// A sparse local file holds fetched chunks; a present bitmap, saved in PATH.meta with the
// remote's identity (describe, size, version tag, chunk size), says which. Over a writable
// remote it writes through (a leased Azure blob, which live snapshots commit into); over a
// read-only one the cow overlay sits above it for writes. Cf. nbdkit filters/cache, without
// its global lock.
#pragma once

#include <cstdint>
#include <string>

#include "backends/block_device.hpp"

namespace imagenbd::backends {

struct CacheOptions {
  std::string path;  // the local cache file (sparse, the remote's size); metadata in PATH.meta
  uint32_t chunk_size =
      0;  // 0: the remote's block_preferred if >= 64 KiB, else 1 MiB; a power of two
  uint64_t max_bytes = 0;  // size cap of the cached bytes; 0: the remote's size (no eviction)
  uint64_t max_fetch = 16u << 20;  // adjacent missing chunks fetched in one remote read, up to this
  unsigned prefetch_width = 4;     // background prefetches at a time; more wait (64, then dropped)
  uint32_t save_every_chunks = 64;  // save the bitmap after this many new chunks ...
  uint32_t save_every_seconds = 5;  // ... or when a chunk arrives this long after the last save
};

// The chunk size a cache over `remote` with these options uses: options.chunk_size, or
// the remote's block_preferred if it is a power of two >= 64 KiB, else 1 MiB.
// @throws Error (EINVAL) for a chunk size that is not a power of two >= 4096.
uint32_t cache_chunk_size(const BlockDevice& remote, const CacheOptions& options);

// Opens (or creates) the cache at options.path over `remote`. If PATH.meta was saved for
// another identity (the remote changed: size or version tag; or the chunk size changed), or
// cannot be read, the cache is discarded with a log line saying why and starts empty.
// A process-wide registry shares one cache object per path: opening the same path over a
// remote of the same identity returns the existing object; another identity is refused
// (EBUSY). Another process holding the path is refused too (flock).
// The result: size and caps of the remote (cache = true); read() serves present chunks from
// the local file and fetches missing ones (whole chunks; concurrent misses on a chunk fetch
// it once); prefetch() fetches in the background; extents() answers held chunks as data
// and, over a read-only remote, asks the remote once per 64 MiB window and remembers the
// answer (the remote is trusted not to change while the cache is open, like its bytes);
// flush() and close() flush the remote (if writable) and save the bitmap with the remote's
// version tag as it reports it then.
// Writes, trims and zeroes go to the remote when it is writable (else EPERM): the chunks
// they touch wait for fetches of them in flight and are updated locally when the write
// covers them whole or they were present (zeroes punched), dropped otherwise (trims always):
// no read that starts after a write returned sees older bytes. A leaf whose version tag our
// own writes change (Azure's ETag) must report the new one after its flush(), or the next
// start discards the cache (safe, but cold).
// @throws Error for bad options or a local file that cannot be opened.
// @par Thread Safety: the device may be used from any thread concurrently.
DevicePtr open_cache(DevicePtr remote, const CacheOptions& options);

// Fetches the chunks of [offset, offset + length) that are neither present nor in flight
// and returns when they are stored (a failure is logged, never thrown). Unlike prefetch(),
// which returns at once and drops hints when 64 wait already, it waits and drops nothing:
// for background work that paces itself (the boot-profile replay). Not counted as hits or
// misses. A device that is not from open_cache gets a prefetch() hint instead.
asio::awaitable<void> fill_cache(DevicePtr device, uint64_t offset, uint64_t length);

}  // namespace imagenbd::backends
