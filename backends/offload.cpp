#include "backends/offload.hpp"

#include <atomic>

namespace imagenbd::backends {

namespace {
std::atomic<unsigned> pool_threads{16};
}

void set_blocking_threads(unsigned count) {
  if (count > 0) pool_threads.store(count);
}

asio::thread_pool& blocking_pool() {
  static asio::thread_pool pool(pool_threads.load());
  return pool;
}

}  // namespace imagenbd::backends
