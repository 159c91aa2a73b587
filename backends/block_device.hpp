// The one interface every layer implements: leaves (file, memory, blob stores),
// filters (cache, readahead, retry) and formats (raw, vhd, vdi, cow).
// See shared/docs/design.md "One interface, three roles".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/awaitable.hpp>

#include "backends/error.hpp"

#ifndef BOOST_ASIO_HAS_CO_AWAIT
#error "imagenbd needs C++20 coroutine support in Boost.Asio (BOOST_ASIO_HAS_CO_AWAIT)"
#endif

namespace imagenbd::backends {

namespace asio = boost::asio;

// What a layer can do. Computed once when the layer is opened and fixed afterwards.
struct Caps {
  bool writable = false;    // write/trim/zero allowed
  bool flush = false;       // flush() makes every acknowledged write durable
  bool fua = false;         // WriteFlags::fua makes that one write durable before returning
  bool trim = false;        // trim() may release space (it is always safe to call)
  bool zero = false;        // zero() is cheaper than writing zeroes (it always works)
  bool fast_zero = false;   // zero() with WriteFlags::fast can succeed without writing data
  bool extents = false;     // extents() reports real allocation, not just "all data"
  bool cache = false;       // prefetch() does something useful
  bool multi_conn = false;  // one flush() covers writes made through every connection
  uint32_t block_min = 1;   // smallest addressable unit and alignment (power of two)
  uint32_t block_preferred = 4096;
  uint32_t block_max = 32u << 20;  // largest read/write payload
};

struct WriteFlags {
  bool fua = false;      // durable before returning
  bool no_hole = false;  // zero(): keep the range allocated
  bool fast = false;     // zero(): fail with ENOTSUP rather than write zeroes slowly
};

enum class ExtentKind : uint8_t {
  data,  // allocated, contents unknown
  zero,  // allocated, reads as zeroes
  hole,  // not allocated, reads as zeroes
};

struct Extent {
  uint64_t length;
  ExtentKind kind;
  bool operator==(const Extent&) const = default;
};

// A virtual disk or byte store.
//
// Contract for every method:
// - offset and length are in bytes; the caller (server/ validates client requests once)
//   guarantees offset + length <= size(), length > 0, and length <= caps().block_max for
//   read/write. Layers may assert these.
// - Methods may be called concurrently, from any thread, on the same object. Implementations
//   protect their own state.
// - Failures throw backends::Error carrying an errc (EIO, ENOSPC, EPERM, ENOTSUP, ...) and a
//   message naming the layer and the object.
class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  // Short layer name for logs ("file", "raw", "vhd").
  virtual std::string_view name() const = 0;
  // The object this layer serves (path, URL with secrets removed), for logs and errors.
  virtual std::string describe() const = 0;
  virtual uint64_t size() const = 0;
  virtual Caps caps() const = 0;

  virtual asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) = 0;
  virtual asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                                      WriteFlags flags) = 0;
  // Makes every write that has returned durable.
  virtual asio::awaitable<void> flush() = 0;
  // Hint that the range is no longer needed; contents afterwards are unspecified.
  virtual asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) = 0;
  // The range reads back as zeroes afterwards.
  virtual asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) = 0;
  // Allocation of the range starting at offset: contiguous extents, at least one, covering
  // at most length bytes (fewer is allowed; callers ask again for the rest).
  virtual asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) = 0;
  // Whether extents() may report anything but data now; false lets a caller skip asking
  // (a fully allocated file: the session asks before every structured read). A hint read
  // without a lock: a range that became a hole a moment ago may still be called data,
  // which is always a true enough answer (data may read as zeroes).
  virtual bool may_have_holes() const { return caps().extents; }
  // Hint that the range will be read soon (NBD_CMD_CACHE, readahead).
  virtual asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) = 0;

  // Changes size() to new_size; bytes added at the end read as zeroes. For leaves that
  // hold an image file: a dynamic VHD or VDI appends blocks through it. Durable with the
  // next flush(). May run concurrently with I/O below min(old, new size); I/O beyond the
  // old size waits until it has returned. Layers that cannot resize keep this default,
  // which throws ENOTSUP.
  virtual asio::awaitable<void> resize(uint64_t new_size);
  // Grows to new_size with `tail` as the last tail.size() bytes, the bytes between the old
  // end and the tail reading as zeroes. Leaves that can do it in one step (a file: one
  // write past the end) do, so a crash of the process leaves the old size or the new size
  // with its tail, never a longer file without it: a VHD keeps its footer last this way.
  // The default resizes, then writes. Same concurrency rules as resize().
  virtual asio::awaitable<void> grow(uint64_t new_size, std::span<const std::byte> tail);

  // What identifies this version of the bytes a leaf serves, for caches that must notice a
  // changed remote object: an ETag, a Last-Modified date, a blob snapshot id. "" means
  // unknown (a cache then trusts only size and name). Formats do not forward it.
  virtual std::string version_tag() const { return {}; }

  // Gives back what the device holds outside this process (a blob lease) at a clean stop,
  // after the last flush; no I/O follows. Called on the leaf by whoever opened it (an
  // export), not forwarded by formats. The default has nothing to give back.
  virtual asio::awaitable<void> close();
};

inline asio::awaitable<void> BlockDevice::resize(uint64_t new_size) {
  fail(std::errc::operation_not_supported, "{}: {}: cannot change the size (to {} bytes)", name(),
       describe(), new_size);
  co_return;
}

inline asio::awaitable<void> BlockDevice::grow(uint64_t new_size, std::span<const std::byte> tail) {
  co_await resize(new_size);
  co_await write(new_size - tail.size(), tail, {});
}

inline asio::awaitable<void> BlockDevice::close() {
  co_return;
}

using DevicePtr = std::shared_ptr<BlockDevice>;

}  // namespace imagenbd::backends
