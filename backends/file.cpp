// The file leaf. Reads and buffered writes first try the page cache inline with RWF_NOWAIT,
// so a cache hit costs no thread hop; page-aligned buffered writes also run inline while
// they stay fast (see write()); whatever may block (the rest of a read, FUA writes,
// fdatasync, fallocate, lseek, fadvise) runs on the blocking pool (backends/offload.hpp).
// One fd serves every connection, so one fdatasync covers them all (multi-conn).
// The size changes only through resize() (ftruncate; image formats that append blocks).
// Limits: no O_DIRECT.
#include "backends/file.hpp"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mount.h>  // BLKGETSIZE64
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <limits>
#include <system_error>

#include "backends/error.hpp"
#include "backends/log.hpp"
#include "backends/nowait_read.hpp"
#include "backends/offload.hpp"

namespace imagenbd::backends {

namespace {

constexpr std::size_t max_extents = 1024;    // per extents() call; callers ask again
constexpr std::size_t zero_chunk = 1 << 20;  // zeroes written per pwrite when all else fails
constexpr auto relaxed = std::memory_order_relaxed;
// An inline write slower than this was throttled or blocked: pause inline writes.
constexpr auto inline_write_slow = std::chrono::microseconds(500);
constexpr auto inline_write_pause = std::chrono::milliseconds(100);

// ENOTSUP == EOPNOTSUPP on Linux; ENOSYS comes from kernels without the call.
bool unsupported(int e) {
  return e == EOPNOTSUPP || e == ENOSYS;
}

std::string errno_text(int e) {
  return std::generic_category().message(e);
}

class File final : public BlockDevice {
 public:
  File(std::string path, int fd, uint64_t size, bool read_only, bool block_device,
       bool may_have_holes)
      : path_(std::move(path)),
        fd_(fd),
        size_(size),
        read_only_(read_only),
        block_device_(block_device),
        may_have_holes_(may_have_holes) {
    caps_.writable = !read_only;
    caps_.flush = true;
    caps_.fua = caps_.trim = caps_.zero = caps_.fast_zero = !read_only;
    caps_.extents = !block_device;  // a block device is all data
    caps_.cache = true;
    caps_.multi_conn = true;
    caps_.block_min = 1;
    caps_.block_preferred = 4096;
    caps_.block_max = 32u << 20;
  }
  ~File() override { ::close(fd_); }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  std::string_view name() const override { return "file"; }
  std::string describe() const override { return path_; }
  uint64_t size() const override { return size_.load(relaxed); }
  Caps caps() const override { return caps_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    assert(offset + out.size() <= size());
    const std::size_t done = read_nowait(fd_, offset, out, nowait_reads_);
    if (done < out.size()) {
      co_await offload([this, offset, out, done] { read_rest(offset, out, done); });
    }
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    check_writable("write");
    assert(offset + in.size() <= size());
    if (flags.fua) {
      co_await offload([this, offset, in] { write_rest(offset, in, 0, RWF_DSYNC); });
      co_return;
    }
    const std::size_t done = write_nowait(offset, in);
    if (done == in.size()) co_return;
    if (done == 0 && write_inline(offset, in)) co_return;
    co_await offload([this, offset, in, done] { write_rest(offset, in, done, 0); });
  }

  asio::awaitable<void> flush() override {
    co_await offload([this] { sync(); });
  }

  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("trim");
    assert(offset + length <= size());
    co_await offload([this, offset, length, flags] {
      // Unsupported punching leaves the data as it is, which trim allows.
      punch_hole(offset, length);
      if (flags.fua) sync();
    });
  }

  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("zero");
    assert(offset + length <= size());
    // Answer a fast zero we already know we cannot do without a thread hop.
    if (flags.fast && !can_zero_range_.load(relaxed) &&
        (flags.no_hole || !can_punch_.load(relaxed))) {
      fail_fast_zero(flags);
    }
    co_await offload([this, offset, length, flags] {
      const bool done =
          (!flags.no_hole && punch_hole(offset, length)) || zero_range(offset, length);
      if (!done) {
        if (flags.fast) fail_fast_zero(flags);
        write_zeroes(offset, length);
      }
      if (flags.fua) sync();
    });
  }

  bool may_have_holes() const override { return !block_device_ && may_have_holes_.load(relaxed); }

  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    assert(offset + length <= size());
    if (!may_have_holes()) {
      std::vector<Extent> all{Extent{length, ExtentKind::data}};
      co_return all;
    }
    co_return co_await offload([this, offset, length] { return seek_extents(offset, length); });
  }

  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    co_await offload([this, offset, length] {
      const int e = ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(length),
                                    POSIX_FADV_WILLNEED);
      if (e != 0) fail_sys(e, fmt::format("posix_fadvise at offset {} length {}", offset, length));
    });
  }

  asio::awaitable<void> resize(uint64_t new_size) override {
    check_resizable(new_size);
    co_await offload([this, new_size] {
      while (::ftruncate(fd_, static_cast<off_t>(new_size)) < 0) {
        if (errno != EINTR) fail_sys(errno, fmt::format("ftruncate to {} bytes", new_size));
      }
      // Growing leaves a hole at the end; SEEK_HOLE must be asked from now on.
      if (new_size > size()) may_have_holes_.store(true, relaxed);
      size_.store(new_size, relaxed);
    });
  }

  // One pwrite past the end extends the file and writes the tail together.
  asio::awaitable<void> grow(uint64_t new_size, std::span<const std::byte> tail) override {
    check_resizable(new_size);
    assert(new_size >= size() && tail.size() <= new_size);
    co_await offload([this, new_size, tail] {
      write_rest(new_size - tail.size(), tail, 0, 0);
      may_have_holes_.store(true, relaxed);
      size_.store(new_size, relaxed);
    });
  }

 private:
  [[noreturn]] void fail_sys(int e, std::string_view what) const {
    throw Error(static_cast<std::errc>(e),
                fmt::format("file: {}: {}: {}", path_, what, errno_text(e)));
  }

  void check_resizable(uint64_t new_size) const {
    check_writable("resize");
    if (block_device_) {
      fail(std::errc::no_space_on_device,
           "file: {}: a block device cannot change its size ({} to {} bytes)", path_, size(),
           new_size);
    }
    if (new_size > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
      fail(std::errc::file_too_large, "file: {}: cannot resize to {} bytes", path_, new_size);
    }
  }

  void check_writable(std::string_view what) const {
    if (read_only_)
      fail(std::errc::operation_not_permitted, "file: {}: {} on a read-only file", path_, what);
  }

  [[noreturn]] void fail_fast_zero(WriteFlags flags) const {
    fail(std::errc::operation_not_supported,
         "file: {}: fast zero is not supported here (fallocate {} not supported)", path_,
         flags.no_hole ? "ZERO_RANGE" : "PUNCH_HOLE and ZERO_RANGE");
  }

  // Whether the page cache holds the byte at `offset` (a one-byte RWF_NOWAIT read).
  bool page_cached(uint64_t offset) {
    std::byte b{};
    return read_nowait(fd_, offset, {&b, 1}, nowait_reads_) == 1;
  }

  // Reads out[done..] with blocking preads. Running into EOF is an error: the size was
  // fixed at open, so the file has shrunk under us.
  void read_rest(uint64_t offset, std::span<std::byte> out, std::size_t done) const {
    while (done < out.size()) {
      const ssize_t n =
          ::pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        fail_sys(errno,
                 fmt::format("read at offset {} length {}", offset + done, out.size() - done));
      }
      if (n == 0) {
        fail(std::errc::io_error,
             "file: {}: short read at offset {}: wanted {} bytes, got {} (end of file; was it "
             "truncated?)",
             path_, offset, out.size(), done);
      }
      done += static_cast<std::size_t>(n);
    }
  }

  // Writes into the page cache without blocking; returns the bytes written, maybe 0.
  std::size_t write_nowait(uint64_t offset, std::span<const std::byte> in) {
    if (!nowait_writes_.load(relaxed)) return 0;
    iovec iov{const_cast<std::byte*>(in.data()), in.size()};
    for (;;) {
      const ssize_t n = ::pwritev2(fd_, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
      if (n >= 0) return static_cast<std::size_t>(n);
      if (errno == EINTR) continue;
      // ext4 refuses buffered RWF_NOWAIT writes with EOPNOTSUPP: stop asking.
      if (unsupported(errno)) nowait_writes_.store(false, relaxed);
      return 0;
    }
  }

  // File systems without buffered RWF_NOWAIT writes (ext4) would send every write through
  // the pool, and the two thread hops cost more than the write (measured: 4 KiB random
  // writes at QD32 went from ~30k to ~75k IOPS inline). A buffered write blocks only to
  // read a partial page that is not cached, or when writeback throttles dirty pages. So a
  // write of whole pages, or of cached partial ones, runs inline on the caller's thread,
  // unless an inline write was slow recently (throttling): then the pool takes writes for
  // a while, and this thread stays free for the other connections it serves.
  bool write_inline(uint64_t offset, std::span<const std::byte> in) {
    constexpr uint64_t page = 4096;
    const uint64_t end = offset + in.size();
    // A write that covers its pages only in part must read the rest of them first: inline
    // only when the page cache holds both edge pages (images whose blocks start off a page
    // boundary, like qemu's dynamic VHD at 512 and VDI at 1536 bytes into a page, write
    // every guest page this way).
    if ((offset % page != 0 && !page_cached(offset)) || (end % page != 0 && !page_cached(end - 1)))
      return false;
    using clock = std::chrono::steady_clock;
    const clock::time_point start = clock::now();
    if (start.time_since_epoch().count() < inline_writes_paused_until_.load(relaxed)) {
      return false;
    }
    write_rest(offset, in, 0, 0);
    const clock::duration took = clock::now() - start;
    if (took > inline_write_slow) {
      inline_writes_paused_until_.store(
          (start + took + inline_write_pause).time_since_epoch().count(), relaxed);
      log::debug("file: {}: a write took {} us inline; using the thread pool for a while", path_,
                 std::chrono::duration_cast<std::chrono::microseconds>(took).count());
    }
    return true;
  }

  // Writes in[done..] with blocking pwritev2 calls, each with rwf (0 or RWF_DSYNC).
  void write_rest(uint64_t offset, std::span<const std::byte> in, std::size_t done, int rwf) {
    bool sync_after = false;
    while (done < in.size()) {
      iovec iov{const_cast<std::byte*>(in.data() + done), in.size() - done};
      const ssize_t n = ::pwritev2(fd_, &iov, 1, static_cast<off_t>(offset + done), rwf);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (rwf != 0 && unsupported(errno)) {  // kernels before 4.7: no per-write DSYNC
          rwf = 0;
          sync_after = true;
          continue;
        }
        fail_sys(errno,
                 fmt::format("write at offset {} length {}", offset + done, in.size() - done));
      }
      done += static_cast<std::size_t>(n);
    }
    if (sync_after) sync();
  }

  void sync() const {
    while (::fdatasync(fd_) < 0) {
      if (errno != EINTR) fail_sys(errno, "fdatasync");
    }
  }

  // fallocate(mode) over the range. Returns false when the file system or device cannot do
  // it (remembered in `supported`, so we stop asking); throws on real errors.
  bool try_fallocate(int mode, std::atomic<bool>& supported, std::string_view what, uint64_t offset,
                     uint64_t length) {
    if (!supported.load(relaxed)) return false;
    while (::fallocate(fd_, mode, static_cast<off_t>(offset), static_cast<off_t>(length)) < 0) {
      if (errno == EINTR) continue;
      if (unsupported(errno)) {
        supported.store(false, relaxed);
        return false;
      }
      // Block devices want sector-aligned ranges; this one range falls back (as in nbdkit).
      if (errno == EINVAL && block_device_) return false;
      fail_sys(errno, fmt::format("fallocate {} at offset {} length {}", what, offset, length));
    }
    // Punched or zeroed ranges may be reported as holes by SEEK_HOLE (unwritten extents).
    may_have_holes_.store(true, relaxed);
    return true;
  }

  bool punch_hole(uint64_t offset, uint64_t length) {
    return try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, can_punch_, "PUNCH_HOLE",
                         offset, length);
  }

  bool zero_range(uint64_t offset, uint64_t length) {
    return try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, can_zero_range_, "ZERO_RANGE",
                         offset, length);
  }

  void write_zeroes(uint64_t offset, uint64_t length) {
    static const std::byte zeroes[zero_chunk]{};  // in .bss: costs nothing until read
    for (uint64_t done = 0; done < length;) {
      const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(length - done, zero_chunk));
      write_rest(offset + done, std::span(zeroes, n), 0, 0);
      done += n;
    }
  }

  std::vector<Extent> seek_extents(uint64_t offset, uint64_t length) const {
    std::vector<Extent> out;
    auto add = [&out](uint64_t n, ExtentKind kind) {
      if (!out.empty() && out.back().kind == kind) {
        out.back().length += n;
      } else {
        out.push_back(Extent{n, kind});
      }
    };
    const uint64_t end = offset + length;
    uint64_t pos = offset;
    while (pos < end && out.size() < max_extents) {
      const off_t data = ::lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
      if (data < 0) {
        if (errno != ENXIO) fail_sys(errno, fmt::format("lseek SEEK_DATA at offset {}", pos));
        add(end - pos, ExtentKind::hole);  // no data from pos to EOF
        break;
      }
      if (static_cast<uint64_t>(data) > pos) {
        const uint64_t stop = std::min<uint64_t>(static_cast<uint64_t>(data), end);
        add(stop - pos, ExtentKind::hole);
        pos = stop;
        continue;
      }
      const off_t hole = ::lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
      if (hole < 0) fail_sys(errno, fmt::format("lseek SEEK_HOLE at offset {}", pos));
      const uint64_t stop = std::min<uint64_t>(static_cast<uint64_t>(hole), end);
      if (stop <= pos) continue;  // punched between the two calls: ask again
      add(stop - pos, ExtentKind::data);
      pos = stop;
    }
    return out;
  }

  const std::string path_;
  const int fd_;
  std::atomic<uint64_t> size_;
  const bool read_only_;
  const bool block_device_;
  Caps caps_;
  std::atomic<bool> may_have_holes_;  // false: fully allocated, extents() needs no syscall
  std::atomic<bool> nowait_reads_{true};
  std::atomic<bool> nowait_writes_{true};
  std::atomic<std::chrono::steady_clock::rep> inline_writes_paused_until_{0};
  std::atomic<bool> can_punch_{true};
  std::atomic<bool> can_zero_range_{true};
};

// Closes the fd unless released, so failed opens leak nothing.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

DevicePtr open_file(const std::string& path, const FileOptions& options) {
  // O_NONBLOCK so that a FIFO named by mistake cannot hang the open; cleared below.
  const int mode = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK;
  FdGuard fd{::open(path.c_str(), mode)};
  if (fd.fd < 0) {
    const int e = errno;
    if (e == EISDIR) {
      fail(std::errc::is_a_directory, "file: {}: is a directory, not an image file or block device",
           path);
    }
    if (!options.read_only && (e == EACCES || e == EPERM || e == EROFS)) {
      throw Error(
          static_cast<std::errc>(e),
          fmt::format("file: {}: {} (use --read-only to serve it read-only)", path, errno_text(e)));
    }
    throw Error(static_cast<std::errc>(e), fmt::format("file: {}: {}", path, errno_text(e)));
  }

  struct stat st {};
  if (::fstat(fd.fd, &st) < 0) fail_errno(errno, fmt::format("file: {}: fstat", path));
  if (S_ISDIR(st.st_mode)) {
    fail(std::errc::is_a_directory, "file: {}: is a directory, not an image file or block device",
         path);
  }
  const bool block_device = S_ISBLK(st.st_mode);
  if (!block_device && !S_ISREG(st.st_mode)) {
    fail(std::errc::invalid_argument, "file: {}: not a regular file or a block device", path);
  }
  const int fl = ::fcntl(fd.fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd.fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
    fail_errno(errno, fmt::format("file: {}: fcntl", path));
  }

  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (block_device && ::ioctl(fd.fd, BLKGETSIZE64, &size) < 0) {
    fail_errno(errno, fmt::format("file: {}: ioctl BLKGETSIZE64", path));
  }
  // A fully allocated file has no holes to report until we punch one.
  const bool may_have_holes = !block_device && static_cast<uint64_t>(st.st_blocks) * 512 < size;

  log::debug("file: {}: opened{}, {} bytes{}", path, options.read_only ? " read-only" : "", size,
             block_device ? ", block device" : "");
  auto device =
      std::make_shared<File>(path, fd.fd, size, options.read_only, block_device, may_have_holes);
  fd.fd = -1;  // owned by the device now
  return device;
}

}  // namespace imagenbd::backends
