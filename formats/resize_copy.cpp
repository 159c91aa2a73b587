#include "formats/resize_copy.hpp"

#include <algorithm>
#include <span>
#include <vector>

namespace imagenbd::formats {

namespace {

constexpr uint64_t copy_chunk = 4u << 20;  // bytes per read/write

}  // namespace

boost::asio::awaitable<void> copy_bytes(backends::BlockDevice& file, uint64_t from, uint64_t to,
                                        uint64_t length, uint64_t source_end) {
  std::vector<std::byte> buffer(std::min(length, copy_chunk));
  for (uint64_t done = 0; done < length;) {
    const auto n = static_cast<std::size_t>(std::min<uint64_t>(buffer.size(), length - done));
    const std::span<std::byte> piece(buffer.data(), n);
    const uint64_t at = from + done;
    const uint64_t present = at >= source_end ? 0 : std::min<uint64_t>(n, source_end - at);
    if (present < n) {
      std::fill(buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(n), std::byte{0});
    }
    if (present > 0) co_await file.read(at, piece.first(static_cast<std::size_t>(present)));
    co_await file.write(to + done, piece, {});
    done += n;
  }
}

}  // namespace imagenbd::formats
