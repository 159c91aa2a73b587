// The readahead filter (issue 6 item 2): watches the reads that pass through it, finds
// sequential runs (several at once: one per stream, found by where each run's next read
// should start, like the kernel's readahead), grows a stream's window from min_window to
// max_window while the run continues and drops it back on random access, and asks the
// layer below (a cache) to prefetch() the window ahead of the run. The read that triggered
// it is never delayed: prefetches are hints the cache runs in the background.
// Cf. nbdkit filters/readahead, which keeps one global window for all clients.
#pragma once

#include <cstdint>

#include "backends/block_device.hpp"

namespace imagenbd::backends {

struct ReadaheadOptions {
  uint64_t min_window = 64u << 10;  // the first prefetch of a new run
  uint64_t max_window = 16u << 20;  // doubling stops here
  unsigned streams = 16;            // sequential runs tracked at once (least recent dropped)
  // Prefetched ranges start and end on multiples of this (the cache's chunk, so a prefetch
  // never claims the chunk the triggering read is fetching). 0: the largest power of two
  // <= min_window, at least below's block_preferred (over a cache, pass min_window >= its
  // chunk, or the chunk here).
  uint32_t align = 0;
};

// What a readahead filter did so far (for tests and logs).
struct ReadaheadStats {
  uint64_t prefetches = 0;       // prefetch() calls it sent below (not NBD_CMD_CACHE's)
  uint64_t prefetch_bytes = 0;   // the bytes they asked for
  uint64_t streams_started = 0;  // reads that continued no stream (random or first reads)
};

// Stacks the filter on `below`. Everything but read() and prefetch() passes through;
// caps are below's. A prefetch() from above (NBD_CMD_CACHE) goes straight to below.
// @throws Error (EINVAL) for bad options.
// @par Thread Safety: the device may be used from any thread concurrently.
DevicePtr open_readahead(DevicePtr below, const ReadaheadOptions& options);

// The stats of a device from open_readahead (zeroes for any other device).
ReadaheadStats readahead_stats(const BlockDevice& device);

}  // namespace imagenbd::backends
