// Boot-profile record and replay (issue 6 item 2; BlobSeer's adaptive prefetching for mass
// VM deployment): the order in which an image's chunks are first read after it is opened
// is recorded into a small profile file, kept per image and version; the next time that
// image is opened (on this node or another that has the file), the chunks are prefetched
// in that order in the background, so a boot-like read pattern finds its data already
// fetched. A filter over the cache (reads pass through; prefetch() goes to the cache).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <boost/asio/any_io_executor.hpp>

#include "backends/block_device.hpp"

namespace imagenbd::backends {

struct BootProfileOptions {
  std::string path;                    // the profile file; created when absent
  uint32_t chunk_size = 1u << 20;      // the unit recorded and prefetched (the cache's chunk)
  std::chrono::seconds window{120};    // record the first reads for this long after open ...
  uint32_t max_chunks = 65536;         // ... or up to this many chunks
  unsigned replay_width = 4;           // prefetches of the replay in flight at once
  std::chrono::seconds save_every{5};  // while recording, save this often (on a read)
  // Where the replay runs. Default: the blocking pool's executor, which outlives the
  // short-lived io_context an export is opened on (server/exports.cpp's run_now).
  asio::any_io_executor executor;
};

// Stacks the filter on `below` (a cache). If options.path holds a profile recorded for the
// same image (below's describe(), size() and version_tag()) and chunk size, replays it in
// the background; otherwise records a new one and saves it (atomically: write, fsync,
// rename) when the window ends, every few seconds while recording, and at close() and
// flush(), and when the device is destroyed. A damaged or foreign profile is replaced with
// a log line saying why. Only read() is recorded: a prefetch() from above (readahead's
// guesses, NBD_CMD_CACHE) is not the boot's order. The replay fetches runs of adjacent
// chunks of the list with fill_cache() (backends/cache.hpp), replay_width at a time, and
// stops when the device is destroyed. An empty recording is never saved.
// @throws Error (EINVAL) for bad options.
// @par Thread Safety: the device may be used from any thread concurrently.
DevicePtr open_boot_profile(DevicePtr below, const BootProfileOptions& options);

// What a boot-profile filter did so far (for tests and logs).
struct BootProfileStats {
  bool replaying = false;      // the profile matched at open
  uint64_t recorded = 0;       // chunks recorded so far
  uint64_t replay_chunks = 0;  // chunks in the replayed profile
  uint64_t replayed = 0;       // of those, the ones the replay has fetched (or found present)
  bool replay_done = false;    // the replay walked the whole list (or stopped)
  uint64_t saves = 0;          // profile files written
};
// The stats of a device from open_boot_profile (zeroes for any other device).
BootProfileStats boot_profile_stats(const BlockDevice& device);

// The profile file's contents. Layout (little-endian; a local file read back by the same
// kind of machine): "imgnbdbp", u32 version (1), u32 chunk size, u64 image size, u32
// describe length, u32 version-tag length, u32 index width (4 or 8), u32 reserved (0), u64
// chunk count, describe bytes, version-tag bytes, the chunk indexes, then a CRC-32 (IEEE)
// of everything before it. The codec does no I/O and never throws.
struct BootProfile {
  std::string describe;          // the image's describe() (below's)
  uint64_t size = 0;             // the image's size()
  std::string version_tag;       // the image's version_tag()
  uint32_t chunk_size = 0;       // bytes per recorded chunk
  std::vector<uint64_t> chunks;  // chunk indexes in the order they were first read
};
std::vector<std::byte> encode_boot_profile(const BootProfile& profile);

struct DecodedBootProfile {
  bool ok = false;
  std::string problem;  // when !ok: what is wrong ("checksum mismatch", "chunk 9 past the end")
  BootProfile profile;
};
DecodedBootProfile decode_boot_profile(std::span<const std::byte> bytes);

}  // namespace imagenbd::backends
