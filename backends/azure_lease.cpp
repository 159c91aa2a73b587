// The lease keeper: acquire (breaking another writer's lease only when forced), renew in
// the background every third of the duration, release at a clean stop. The renewal
// coroutine runs on the HTTP client's network thread and shares only State with the
// keeper, so the device that owns the keeper can be destroyed at any time: the coroutine
// notices `stopped` and ends.
#include "backends/azure_lease.hpp"

#include <algorithm>
#include <chrono>
#include <exception>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/log.hpp"

namespace imagenbd::backends::azure {

namespace {

using std::chrono::seconds;
using std::chrono::steady_clock;

// 4xx answers describe state a retry will not change (a broken lease, a deleted blob,
// an expired SAS): the lease is gone. 408, 429 and 5xx may pass.
bool transient_status(long status) {
  return status == 408 || status == 429 || status >= 500;
}

}  // namespace

struct LeaseKeeper::State {
  State(BlobClient b, std::string lease_id, int duration)
      : blob(std::move(b)),
        id(std::move(lease_id)),
        duration_seconds(duration),
        timer(blob.client().executor()) {}

  void mark_lost(std::string_view reason) {
    if (lost.exchange(true)) return;
    log::error(
        "azure: {}: lease lost ({}): writes now fail with EIO; restart the server to take the "
        "lease again",
        blob.location().display(), reason);
  }

  BlobClient blob;  // with a retry deadline shorter than the renewal interval
  const std::string id;
  const int duration_seconds;
  std::atomic<bool> lost{false};
  std::atomic<bool> stopped{false};
  std::atomic<bool> released{false};
  asio::steady_timer timer;  // used on the network thread only
};

namespace {

asio::awaitable<void> renew_loop(std::shared_ptr<LeaseKeeper::State> s) {
  const auto duration = seconds(s->duration_seconds);
  const auto interval = duration / 3;
  auto last_renewed = steady_clock::now();
  auto wait = std::chrono::duration_cast<steady_clock::duration>(interval);
  for (;;) {
    // stop() sets `stopped` before it posts the cancel to this thread: checked here, the
    // cancel cannot slip in between this test and the wait.
    if (s->stopped) co_return;
    s->timer.expires_after(wait);
    boost::system::error_code ec;
    co_await s->timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (s->stopped || s->lost) co_return;
    std::string failure;
    bool final = false;
    try {
      co_await s->blob.lease_renew(s->id);
      last_renewed = steady_clock::now();
      wait = std::chrono::duration_cast<steady_clock::duration>(interval);
      log::debug("azure: {}: lease renewed", s->blob.location().display());
      continue;
    } catch (const BlobError& e) {
      failure = e.what();
      final = !transient_status(e.status());
    } catch (const std::exception& e) {
      failure = e.what();
    }
    if (s->stopped) co_return;  // a renewal that raced with release()
    if (final) {
      s->mark_lost(failure);
      co_return;
    }
    const auto since = steady_clock::now() - last_renewed;
    if (since >= duration) {
      s->mark_lost(fmt::format("not renewed for {} s: {}",
                               std::chrono::duration_cast<seconds>(since).count(), failure));
      co_return;
    }
    log::warn("azure: {}: lease renewal failed, trying again in 1 s: {}",
              s->blob.location().display(), failure);
    wait = std::chrono::duration_cast<steady_clock::duration>(seconds(1));
  }
}

}  // namespace

asio::awaitable<std::unique_ptr<LeaseKeeper>> LeaseKeeper::acquire(const BlobClient& blob,
                                                                   int duration_seconds,
                                                                   std::string proposed_id,
                                                                   bool force) {
  const std::string display = blob.location().display();
  if (duration_seconds < 15 || duration_seconds > 60) {
    fail(std::errc::invalid_argument, "azure: {}: lease duration {} s: it must be 15 to 60 seconds",
         display, duration_seconds);
  }
  BlobClient client = blob;
  std::string id;
  bool busy = false;
  try {
    id = co_await client.lease_acquire(duration_seconds, proposed_id);
  } catch (const BlobError& e) {
    if (e.status() != 409) throw;
    busy = true;
  }
  if (busy) {
    std::string state = "leased";
    try {
      state = (co_await client.properties()).lease_state;
    } catch (const Error&) {
    }
    if (!force) {
      fail(std::errc::device_or_resource_busy,
           "azure: {}: the blob is leased by another writer (lease state: {}); use --force to "
           "break its lease and take over, or --snapshot to serve a read-only snapshot",
           display, state);
    }
    log::warn(
        "azure: {}: breaking the lease of another writer (--force; lease state: {}): "
        "its writes will fail from now on",
        display, state);
    co_await client.lease_break(0);
    id = co_await client.lease_acquire(duration_seconds, proposed_id);
  }
  log::info("azure: {}: lease {} acquired for {} s, renewed every {} s", display, id,
            duration_seconds, duration_seconds / 3);

  http::RetryPolicy renew_policy = blob.retry_policy();
  renew_policy.deadline = std::min<std::chrono::milliseconds>(
      renew_policy.deadline, std::chrono::milliseconds(duration_seconds * 1000 / 3));
  auto state = std::make_shared<State>(blob.with_retry(renew_policy), id, duration_seconds);
  asio::co_spawn(state->timer.get_executor(), renew_loop(state), [display](std::exception_ptr ep) {
    if (!ep) return;
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      log::error("azure: {}: lease renewal stopped: {}", display, e.what());
    }
  });
  co_return std::unique_ptr<LeaseKeeper>(new LeaseKeeper(std::move(state)));
}

LeaseKeeper::~LeaseKeeper() {
  stop();
}

const std::string& LeaseKeeper::id() const {
  return state_->id;
}

bool LeaseKeeper::lost() const {
  return state_->lost;
}

void LeaseKeeper::mark_lost(std::string_view reason) {
  state_->mark_lost(reason);
}

void LeaseKeeper::stop() {
  if (state_->stopped.exchange(true)) return;
  asio::post(state_->timer.get_executor(), [s = state_] { s->timer.cancel(); });
}

asio::awaitable<bool> LeaseKeeper::reclaim() {
  if (state_->lost || state_->stopped) co_return false;
  std::string failure;
  try {
    co_await state_->blob.lease_renew(state_->id);
    log::warn("azure: {}: our lease had expired; renewed it (nobody had leased the blob since)",
              state_->blob.location().display());
    co_return true;
  } catch (const BlobError& e) {
    if (transient_status(e.status())) throw;
    failure = e.what();
  }
  state_->mark_lost(failure);
  co_return false;
}

asio::awaitable<void> LeaseKeeper::release() {
  stop();
  if (state_->lost || state_->released.exchange(true)) co_return;
  co_await state_->blob.lease_release(state_->id);
  log::info("azure: {}: lease released", state_->blob.location().display());
}

}  // namespace imagenbd::backends::azure
