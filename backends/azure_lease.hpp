// The single writer's blob lease (formats.md §3.6, the hpcpack model): acquired with a
// finite duration, renewed every third of it by a coroutine on the HTTP client's network
// thread (so it outlives the io_context that opened the device), released at a clean
// stop. A lease that could not be renewed, or was broken by another writer, is lost for
// good: the owner's writes fail with EIO from then on; it is never silently re-taken.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/awaitable.hpp>

#include "backends/azure_blob.hpp"

namespace imagenbd::backends::azure {

class LeaseKeeper {
 public:
  // Takes the lease on blob's blob for duration_seconds (15..60) with proposed_id (a
  // random one when ""). A lease held by someone else is Error(device_or_resource_busy),
  // unless force: then that lease is broken at once and taken (with a warning).
  static asio::awaitable<std::unique_ptr<LeaseKeeper>> acquire(const BlobClient& blob,
                                                               int duration_seconds,
                                                               std::string proposed_id, bool force);
  ~LeaseKeeper();  // stops the renewals (the lease then expires by itself)
  LeaseKeeper(const LeaseKeeper&) = delete;
  LeaseKeeper& operator=(const LeaseKeeper&) = delete;

  // The lease id, for x-ms-lease-id on every write.
  const std::string& id() const;
  // True once the lease is gone (renewal failed, or a write was refused for the lease).
  bool lost() const;
  // Records that the lease is gone; logs why, once.
  void mark_lost(std::string_view reason);
  // After a write was refused with LeaseNotPresentWithBlobOperation (our lease expired:
  // renewals failed for a whole duration, or an emulator restarted): renews it now, which
  // the service allows only if nobody else has leased the blob since (formats.md §3.6).
  // Returns true when the lease is ours again; false (and marks it lost) when it is not.
  // A transient failure is thrown (the write fails, the lease is not given up).
  asio::awaitable<bool> reclaim();
  // Stops the renewals and releases the lease (unless it was lost). Idempotent.
  asio::awaitable<void> release();

  struct State;  // shared with the renewal coroutine

 private:
  explicit LeaseKeeper(std::shared_ptr<State> state) : state_(std::move(state)) {}
  void stop();
  std::shared_ptr<State> state_;
};

}  // namespace imagenbd::backends::azure
