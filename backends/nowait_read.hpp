// Reading from the page cache without blocking (preadv2 with RWF_NOWAIT), shared by the
// file leaf and the cache filter: both serve warm reads on the event loop's thread and send
// only what the page cache does not hold to the blocking pool.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>

namespace imagenbd::backends {

// Reads what the page cache holds of [offset, offset + out.size()) of fd without blocking;
// returns the bytes read, maybe fewer than asked or 0 (EAGAIN, or a real error that the
// caller's blocking read then reports). `supported` is read first and set to false for
// good when the kernel or file system refuses RWF_NOWAIT (tmpfs, old kernels).
std::size_t read_nowait(int fd, uint64_t offset, std::span<std::byte> out,
                        std::atomic<bool>& supported);

}  // namespace imagenbd::backends
