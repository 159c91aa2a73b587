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

// How many free buffers each thread keeps per size class: many small ones (QD 128 of
// 4 KiB requests), few big ones (a 32 MiB buffer is expensive to keep idle).
constexpr std::size_t keep(unsigned size_class) {
  return size_class <= 16 ? 128 : size_class <= 20 ? 16 : 2;
}

struct FreeLists {
  std::array<std::vector<std::byte*>, max_class + 1> lists;
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
      return;
    }
  }
  data_ = static_cast<std::byte*>(::operator new[](std::size_t{1} << size_class_, alignment));
}

void Buffer::release() noexcept {
  if (!data_) return;
  if (size_class_ <= max_class) {
    auto& list = free_lists().lists[size_class_];
    if (list.size() < keep(size_class_)) {
      try {
        list.push_back(data_);
        data_ = nullptr;
        return;
      } catch (...) {
      }
    }
  }
  ::operator delete[](data_, alignment);
  data_ = nullptr;
}

}  // namespace imagenbd::server
