// A persistent copy-on-write overlay over a read-only lower disk (issue 6 item 3): writes,
// trims and zeroes go to a local overlay file, reads of what was never written here go to
// the lower disk. The codec of the file is formats/cow_layout.hpp.
//
// The file: a 4 KiB header (magic, version, virtual size, block size — default 64 KiB, a
// power of two from 4 KiB to 2 MiB — and the identity of the lower disk: its size and a
// caller-given string such as the image URI and its version tag, refused on mismatch with
// a message saying which changed), a block map of one uint64 per block (0: absent, read the
// lower; 1: zero; else the offset of the block's data in the file), then data blocks,
// appended. The file is sparse: only written blocks take space.
//
// Rules that make it crash safe (after SIGKILL or power loss every flushed write is present,
// and no block ever reads data that was not written to it):
// - A new block's data is written in full (a partial write is completed from the lower disk
//   or zeroes: read-modify-write) into space no map entry on disk points at, and only then
//   published in the in-memory map.
// - Map entries reach the file only in flush(): flush the file (the data of every published
//   block is durable), write the changed map entries, flush the file again. So an entry on
//   disk never points at data that is not durable, whatever order the file system persists
//   unflushed writes in. Writes acknowledged since the last flush may be lost; nothing else.
// - A block given up (whole-block trim or zero of a data block) is reused only after the
//   flush that wrote its new entry: until then the map on disk may still point at it. Its
//   space is punched then. Reopening reuses blocks no entry points at (a crash's leftovers).
// - FUA: the write, then flush(). Writes into a block that already has data go in place.
//
// Concurrency: one object serves every connection (multi_conn is honest: one flush covers
// all). Each block is guarded by one of a striped table of AsyncMutex (reads too, so a
// block's space cannot be given up and reused under a read); allocation, the dirty list and
// flush have their own small locks, never held across another block's I/O. No global lock
// on the data path. Trim behaves as zero (whole blocks marked zero, partial ones zeroed).
//
// Commits (live snapshots, server/commit.hpp): begin_commit() captures, at one point in
// time, the blocks changed since the last successful commit with their map entries, and
// starts a new generation; blocks written from then on belong to the next commit. A write
// into a captured data block does not go in place: the block is copied (the base of the
// read-modify-write) into new space and published there, and the captured data stays
// where it was, reserved until end_commit() gives it up the usual way (reused only after
// the flush that wrote the new entry). So read_commit() returns each captured block as it
// was at begin_commit() while writes keep flowing. A failed commit puts its blocks back
// into the changed set. The changed set lives in memory only: after a restart every block
// the overlay holds counts as changed (committing a block twice is harmless). The commit
// changes nothing in the file format and nothing of the crash-safety rules above.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "backends/block_device.hpp"
#include "formats/cow_layout.hpp"

namespace imagenbd::formats {

using backends::DevicePtr;
namespace asio = boost::asio;

struct CowOptions {
  // What the lower disk is (its URI, version tag); must equal what the overlay was made
  // with.
  std::string identity;
};

struct CowCreateOptions {
  uint32_t block_size = cow::default_block_size;
  std::string identity;
};

// The overlay's device, with the commit view (open_cow returns one of these).
class CowDevice : public backends::BlockDevice {
 public:
  // Starts a commit: returns the indexes (ascending) of the blocks changed since the last
  // successful commit, captured atomically with respect to writes (it waits for the block
  // operations in progress, a short pause: no new one starts meanwhile).
  // @throws backends::Error EBUSY while another commit of this overlay is running.
  virtual asio::awaitable<std::vector<uint64_t>> begin_commit() = 0;
  // Block `index` (one begin_commit() returned) as it was at begin_commit(): out.size()
  // must be block_bytes(index). Returns true when the block reads as zeroes (a trimmed
  // or zeroed block; out is zero-filled), so a commit can zero it instead of writing it.
  virtual asio::awaitable<bool> read_commit(uint64_t index, std::span<std::byte> out) = 0;
  // Ends the commit: on success its blocks are committed; on failure they go back into
  // the changed set for the next commit. Captured data that writes replaced is given up.
  virtual asio::awaitable<void> end_commit(bool success) = 0;
  // The overlay's block size, and the bytes of block `index` (the last may be short).
  virtual uint32_t block_size() const = 0;
  virtual uint32_t block_bytes(uint64_t index) const = 0;
};

// Writes a new overlay for a lower disk of lower_size bytes into overlay_file, which must be
// empty and writable, and flushes it.
// @throws backends::Error: EINVAL for a bad block size or identity, EEXIST when the file is
// not empty, or the file's errors.
asio::awaitable<void> create_cow(backends::BlockDevice& overlay_file, uint64_t lower_size,
                                 const CowCreateOptions& options);

// Opens the overlay in overlay_file over lower (never written to). Reads the header and the
// whole map and checks them.
// @throws backends::Error naming the file and the field: EINVAL for a damaged file (a map
// entry past the end of the file, unaligned or shared) or another lower disk (its size or
// identity changed), ENOTSUP for another version, EROFS for a read-only overlay file.
// @par Thread Safety: the device may be used from any thread concurrently; it is a
// CowDevice (std::dynamic_pointer_cast for the commit view).
asio::awaitable<DevicePtr> open_cow(DevicePtr lower, DevicePtr overlay_file, CowOptions options);

}  // namespace imagenbd::formats
