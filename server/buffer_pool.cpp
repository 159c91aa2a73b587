#include "server/buffer_pool.hpp"

#include <array>
#include <bit>
#include <new>
#include <vector>

namespace imagenbd::server {

namespace {

constexpr unsigned min_class = 12;  // 4 KiB
constexpr unsigned max_class = 26;  // 64 MiB; larger buffers are not kept
constexpr std::align_val_t alignment{4096};

// Free buffers each thread keeps, in bytes. Enough for the deepest common queues (nbdcopy:
// 64 x 256 KiB per connection; qemu-img convert: 2 MiB requests, several in flight):
// a buffer given back to the system must be faulted in and zeroed by the kernel again,
// which cost nbdcopy a third of its throughput when the pool kept too few.
constexpr std::size_t keep_bytes = 48u << 20;

struct FreeLists {
  std::array<std::vector<std::byte*>, max_class + 1> lists;
  std::size_t bytes = 0;
  ~FreeLists() {
    for (auto& list : lists) {
      for (auto* p : list) ::operator delete[](p, alignment);
    }
  }
};

FreeLists& free_lists() {
  thread_local FreeLists lists;
  return lists;
}

}  // namespace

Buffer::Buffer(std::size_t size) : size_(size) {
  if (size == 0) return;
  size_class_ = std::max<unsigned>(min_class, std::bit_width(size - 1));
  if (size_class_ <= max_class) {
    auto& list = free_lists().lists[size_class_];
    if (!list.empty()) {
      data_ = list.back();
      list.pop_back();
      free_lists().bytes -= std::size_t{1} << size_class_;
      return;
    }
  }
  data_ = static_cast<std::byte*>(::operator new[](std::size_t{1} << size_class_, alignment));
}

void Buffer::release() noexcept {
  if (!data_) return;
  const std::size_t capacity = std::size_t{1} << size_class_;
  auto& pool = free_lists();
  if (size_class_ <= max_class && pool.bytes + capacity <= keep_bytes) {
    try {
      pool.lists[size_class_].push_back(data_);
      pool.bytes += capacity;
      data_ = nullptr;
      return;
    } catch (...) {
    }
  }
  ::operator delete[](data_, alignment);
  data_ = nullptr;
}

}  // namespace imagenbd::server
