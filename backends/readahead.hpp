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
  uint64_t max_window = 8u << 20;   // doubling stops here
  unsigned streams = 16;            // sequential runs tracked at once (least recent dropped)
};

// Stacks the filter on `below`. Everything but read() and prefetch() passes through;
// caps are below's.
// @throws Error (EINVAL) for bad options.
// @par Thread Safety: the device may be used from any thread concurrently.
DevicePtr open_readahead(DevicePtr below, const ReadaheadOptions& options);

}  // namespace imagenbd::backends
