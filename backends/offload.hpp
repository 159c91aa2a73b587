// Runs blocking work (pread, fdatasync, fallocate) on a shared thread pool and resumes the
// awaiting coroutine on its own executor. Asio 1.18 has no file objects, so this is how
// leaves keep the event loops free. Exceptions thrown by the work are rethrown in the caller.
#pragma once

#include <exception>
#include <type_traits>
#include <utility>

#include <boost/asio/async_result.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace imagenbd::backends {

namespace asio = boost::asio;

// The process-wide pool for blocking calls. Sized once, on first use, from
// set_blocking_threads() (default: 16 threads, enough to keep a disk queue busy).
asio::thread_pool& blocking_pool();
void set_blocking_threads(unsigned count);

template <typename Fn>
auto offload(Fn fn) {
  using Result = std::invoke_result_t<Fn&>;
  if constexpr (std::is_void_v<Result>) {
    return asio::async_initiate<const asio::use_awaitable_t<>&, void(std::exception_ptr)>(
        [fn = std::move(fn)](auto handler) mutable {
          auto ex = asio::get_associated_executor(handler);
          asio::post(blocking_pool(), [fn = std::move(fn), handler = std::move(handler),
                                       ex]() mutable {
            std::exception_ptr error;
            try {
              fn();
            } catch (...) {
              error = std::current_exception();
            }
            asio::dispatch(ex, [handler = std::move(handler), error]() mutable {
              std::move(handler)(error);
            });
          });
        },
        asio::use_awaitable);
  } else {
    return asio::async_initiate<const asio::use_awaitable_t<>&,
                                void(std::exception_ptr, Result)>(
        [fn = std::move(fn)](auto handler) mutable {
          auto ex = asio::get_associated_executor(handler);
          asio::post(blocking_pool(), [fn = std::move(fn), handler = std::move(handler),
                                       ex]() mutable {
            std::exception_ptr error;
            Result result{};
            try {
              result = fn();
            } catch (...) {
              error = std::current_exception();
            }
            asio::dispatch(ex, [handler = std::move(handler), error,
                                result = std::move(result)]() mutable {
              std::move(handler)(error, std::move(result));
            });
          });
        },
        asio::use_awaitable);
  }
}

}  // namespace imagenbd::backends
