// Payload buffers for requests and replies, recycled through per-thread free lists so the
// data path does not allocate per request. Buffers are 4 KiB-aligned (ready for O_DIRECT)
// and uninitialised. A Buffer may be released on any thread; it joins that thread's list.
#pragma once

#include <cstddef>
#include <span>
#include <utility>

namespace imagenbd::server {

class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t size);  // takes from the pool or allocates
  Buffer(Buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)),
        size_class_(other.size_class_) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
      size_class_ = other.size_class_;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }

  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::span<std::byte> span() const { return {data_, size_}; }

 private:
  void release() noexcept;

  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  unsigned size_class_ = 0;  // capacity is 1 << size_class_
};

}  // namespace imagenbd::server
