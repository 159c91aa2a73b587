// Boot-profile record and replay (issue 6 item 2; BlobSeer's adaptive prefetching for mass
// VM deployment): the order in which an image's chunks are first read after it is opened
// is recorded into a small profile file, kept per image and version; the next time that
// image is opened (on this node or another that has the file), the chunks are prefetched
// in that order in the background, so a boot-like read pattern finds its data already
// fetched. A filter over the cache (reads pass through; prefetch() goes to the cache).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "backends/block_device.hpp"

namespace imagenbd::backends {

struct BootProfileOptions {
  std::string path;                  // the profile file; created when absent
  uint32_t chunk_size = 1u << 20;    // the unit recorded and prefetched (the cache's chunk)
  std::chrono::seconds window{120};  // record the first reads for this long after open ...
  uint32_t max_chunks = 65536;       // ... or up to this many chunks
  unsigned replay_width = 4;         // prefetches of the replay in flight at once
};

// Stacks the filter on `below` (a cache). If options.path holds a profile recorded for the
// same image (below's describe(), size() and version_tag()) and chunk size, replays it in
// the background; otherwise records a new one and saves it (atomically: write, fsync,
// rename) when the window ends, every few seconds while recording, and at close() and
// flush(). A damaged or foreign profile is replaced with a log line saying why.
// @throws Error (EINVAL) for bad options.
// @par Thread Safety: the device may be used from any thread concurrently.
DevicePtr open_boot_profile(DevicePtr below, const BootProfileOptions& options);

}  // namespace imagenbd::backends
