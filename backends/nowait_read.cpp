// See nowait_read.hpp.
#include "backends/nowait_read.hpp"

#include <sys/uio.h>

#include <cerrno>

namespace imagenbd::backends {

std::size_t read_nowait(int fd, uint64_t offset, std::span<std::byte> out,
                        std::atomic<bool>& supported) {
  if (!supported.load(std::memory_order_relaxed)) return 0;
  iovec iov{out.data(), out.size()};
  for (;;) {
    const ssize_t n = ::preadv2(fd, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
    if (n >= 0) return static_cast<std::size_t>(n);
    if (errno == EINTR) continue;
    // ENOTSUP == EOPNOTSUPP on Linux; ENOSYS comes from kernels without the call.
    if (errno == EOPNOTSUPP || errno == ENOSYS) supported.store(false, std::memory_order_relaxed);
    return 0;
  }
}

}  // namespace imagenbd::backends
