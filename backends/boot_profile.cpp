// Boot-profile record and replay (see boot_profile.hpp).
// Recording: each read() marks its chunks in a bitmap under a mutex (never held across an
// await) and appends the ones seen for the first time; the recording ends when the window
// has passed (checked on the next read) or max_chunks are recorded. Saves run on the
// blocking pool, posted by the read that finds one due, so no client read waits for the
// profile file; flush(), close() and the destructor save too (the last one is the "saved"
// line).
// Replay: replay_width worker coroutines take the next run of adjacent chunks from the
// list and await fill_cache() for it; each holds only a weak_ptr to the filter between
// runs, so destroying the export stops the replay after the runs in flight. Runs are short
// (max_replay_run chunks) so a client read that needs a chunk of a run in flight waits for
// a small fetch, not a long one.
#include "backends/boot_profile.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <utility>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>

#include "backends/cache.hpp"
#include "backends/error.hpp"
#include "backends/log.hpp"
#include "backends/offload.hpp"

namespace imagenbd::backends {

namespace {

constexpr auto relaxed = std::memory_order_relaxed;
constexpr char magic[8] = {'i', 'm', 'g', 'n', 'b', 'd', 'b', 'p'};
constexpr uint32_t format_version = 1;
constexpr std::size_t fixed_header = 48;        // magic .. chunk count
constexpr uint64_t max_file_bytes = 64u << 20;  // a profile is a few KiB to a MiB
constexpr uint64_t max_replay_run = 4;          // adjacent chunks fetched in one go

constexpr std::array<uint32_t, 256> crc_table = [] {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
    t[i] = c;
  }
  return t;
}();

uint32_t crc32(std::span<const std::byte> bytes) {
  uint32_t c = 0xffffffffu;
  for (auto b : bytes) c = crc_table[(c ^ static_cast<uint8_t>(b)) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

void put(std::vector<std::byte>& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(std::byte(static_cast<uint8_t>(v >> (8 * i))));
}

uint64_t get(std::span<const std::byte> in, std::size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(static_cast<uint8_t>(in[at + i])) << (8 * i);
  return v;
}

uint64_t chunk_count(uint64_t size, uint32_t chunk) {
  return (size + chunk - 1) / chunk;
}

std::string errno_text(int e) {
  return std::generic_category().message(e);
}

// Why `saved` is not the profile of `now` (an empty chunk list), in words; "" if it is.
std::string profile_change(const BootProfile& saved, const BootProfile& now) {
  if (saved.describe != now.describe)
    return fmt::format("it was recorded for {}, not {}", log::printable(saved.describe, 80),
                       now.describe);
  if (saved.size != now.size)
    return fmt::format("the image's size changed from {} to {} bytes", saved.size, now.size);
  if (saved.version_tag != now.version_tag)
    return fmt::format("the image's version tag changed from \"{}\" to \"{}\"",
                       log::printable(saved.version_tag, 80), now.version_tag);
  if (saved.chunk_size != now.chunk_size)
    return fmt::format("its chunk size is {} bytes, not {}", saved.chunk_size, now.chunk_size);
  return {};
}

class BootProfileFilter final : public BlockDevice,
                                public std::enable_shared_from_this<BootProfileFilter> {
 public:
  BootProfileFilter(DevicePtr below, const BootProfileOptions& o, BootProfile identity)
      : below_(std::move(below)),
        options_(o),
        path_(o.path),
        identity_(std::move(identity)),
        chunks_(chunk_count(identity_.size, identity_.chunk_size)),
        seen_((chunks_ + 63) / 64, 0),
        opened_(std::chrono::steady_clock::now()),
        last_save_(opened_) {}

  ~BootProfileFilter() override {
    {
      std::lock_guard lock(mutex_);
      if (recording_.exchange(false) && end_reason_.empty()) end_reason_ = "at close";
    }
    save_now();
  }

  std::string_view name() const override { return "boot-profile"; }
  std::string describe() const override { return below_->describe(); }
  uint64_t size() const override { return below_->size(); }
  Caps caps() const override { return below_->caps(); }
  std::string version_tag() const override { return below_->version_tag(); }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    if (recording_.load(relaxed) && !out.empty() && record(offset, out.size())) {
      // Off the read's path: the pool writes the file while this read goes on.
      asio::post(blocking_pool(), [self = shared_from_this()] { self->save_now(); });
    }
    co_await below_->read(offset, out);
  }

  // Not recorded: a prefetch from above is a guess (readahead) or a client's hint.
  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    co_await below_->prefetch(offset, length);
  }

  asio::awaitable<void> flush() override {
    co_await below_->flush();
    if (dirty()) {
      auto op = offload([this] { save_now(); });
      co_await std::move(op);
    }
  }

  // Ends the recording and saves it.
  asio::awaitable<void> close() override {
    {
      std::lock_guard lock(mutex_);
      if (recording_.exchange(false) && end_reason_.empty()) end_reason_ = "at close";
    }
    if (dirty()) {
      auto op = offload([this] { save_now(); });
      co_await std::move(op);
    }
    co_await below_->close();
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    co_await below_->write(offset, in, flags);
  }
  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    co_await below_->trim(offset, length, flags);
  }
  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    co_await below_->zero(offset, length, flags);
  }
  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    co_return co_await below_->extents(offset, length);
  }
  asio::awaitable<void> resize(uint64_t new_size) override { co_await below_->resize(new_size); }
  asio::awaitable<void> grow(uint64_t new_size, std::span<const std::byte> tail) override {
    co_await below_->grow(new_size, tail);
  }

  void start_recording() { recording_.store(true); }

  // Starts the replay of `chunks` on `ex`: replay_width workers over runs of adjacent
  // chunks. Called once, right after construction.
  void start_replay(const std::vector<uint64_t>& chunks, asio::any_io_executor ex) {
    replaying_ = true;
    replay_chunks_ = chunks.size();
    for (std::size_t i = 0; i < chunks.size();) {
      std::size_t n = 1;
      while (i + n < chunks.size() && n < max_replay_run && chunks[i + n] == chunks[i] + n) ++n;
      runs_.push_back({chunks[i], n});
      i += n;
    }
    replay_start_ = std::chrono::steady_clock::now();
    const unsigned width = std::max<unsigned>(1, options_.replay_width);
    workers_.store(width);
    for (unsigned w = 0; w < width; ++w) {
      asio::co_spawn(ex, replay_worker(weak_from_this()), [path = path_](std::exception_ptr e) {
        if (!e) return;
        try {
          std::rethrow_exception(e);
        } catch (const std::exception& x) {
          log::warn("boot profile: {}: replay stopped: {}", path, x.what());
        }
      });
    }
  }

  BootProfileStats stats() const {
    BootProfileStats s;
    s.replaying = replaying_;
    {
      std::lock_guard lock(mutex_);
      s.recorded = order_.size();
    }
    s.replay_chunks = replay_chunks_;
    s.replayed = replayed_.load(relaxed);
    s.replay_done = replay_done_.load();
    s.saves = saves_.load(relaxed);
    return s;
  }

 private:
  struct Run {
    uint64_t first;
    uint64_t count;
  };

  bool dirty() const {
    std::lock_guard lock(mutex_);
    return dirty_;
  }

  // Records the chunks of a read; whether a save is due now (the caller posts it).
  bool record(uint64_t offset, uint64_t length) {
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard lock(mutex_);
    if (!recording_.load(relaxed)) return false;
    if (now - opened_ >= options_.window) {
      end_reason_ = fmt::format("after the {} s window", options_.window.count());
    } else {
      const uint64_t last = std::min(chunks_ - 1, (offset + length - 1) / identity_.chunk_size);
      for (uint64_t c = offset / identity_.chunk_size; c <= last; ++c) {
        uint64_t& word = seen_[c / 64];
        const uint64_t bit = uint64_t{1} << (c % 64);
        if (word & bit) continue;
        word |= bit;
        order_.push_back(c);
        dirty_ = true;
        if (order_.size() >= options_.max_chunks) {
          end_reason_ = fmt::format("at {} chunks", order_.size());
          break;
        }
      }
    }
    if (!end_reason_.empty()) {
      recording_.store(false);
      return true;  // the final save (with its log line), even if nothing is new
    }
    if (!dirty_ || now - last_save_ < options_.save_every) return false;
    last_save_ = now;  // one save posted per period
    return true;
  }

  // Writes the profile as recorded so far (write, fsync, rename); blocking. Never throws.
  void save_now() {
    std::lock_guard save_lock(save_mutex_);
    BootProfile p = identity_;
    bool final_save = false;
    std::string reason;
    {
      std::lock_guard lock(mutex_);
      if (!dirty_ && !(final_pending() && !final_logged_)) return;
      p.chunks = order_;
      dirty_ = false;
      last_save_ = std::chrono::steady_clock::now();
      if (final_pending() && !final_logged_) {
        final_save = true;
        final_logged_ = true;
        reason = end_reason_;
      }
    }
    if (p.chunks.empty()) return;  // nothing read: a replay of nothing would never record
    try {
      write_file(encode_boot_profile(p));
      saves_.fetch_add(1, relaxed);
      if (final_save)
        log::info("boot profile: {}: recording saved {}: {} chunks of {} bytes", path_, reason,
                  p.chunks.size(), p.chunk_size);
      else
        log::debug("boot profile: {}: saved {} chunks so far", path_, p.chunks.size());
    } catch (const std::exception& e) {
      log::warn("boot profile: {}: could not save the profile: {}", path_, e.what());
      std::lock_guard lock(mutex_);
      dirty_ = true;
      if (final_save) final_logged_ = false;
    }
  }

  bool final_pending() const { return !recording_.load() && !end_reason_.empty(); }

  void write_file(const std::vector<std::byte>& bytes) {
    const std::string tmp = path_ + ".tmp";
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) fail_errno(errno, fmt::format("creating {}", tmp));
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t put = ::write(fd, bytes.data() + done, bytes.size() - done);
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) {
        const int e = errno;
        ::close(fd);
        fail_errno(e, fmt::format("writing {}", tmp));
      }
      done += static_cast<std::size_t>(put);
    }
    if (::fsync(fd) != 0) {
      const int e = errno;
      ::close(fd);
      fail_errno(e, fmt::format("fsync {}", tmp));
    }
    ::close(fd);
    if (::rename(tmp.c_str(), path_.c_str()) != 0)
      fail_errno(errno, fmt::format("renaming {} to {}", tmp, path_));
  }

  static asio::awaitable<void> replay_worker(std::weak_ptr<BootProfileFilter> weak) {
    for (;;) {
      DevicePtr below;
      Run run{};
      uint64_t chunk = 0;
      {
        auto self = weak.lock();
        if (!self) co_return;  // the export is gone: stop
        const std::size_t i = self->next_run_.fetch_add(1, relaxed);
        if (i >= self->runs_.size()) {
          self->worker_done();
          co_return;
        }
        run = self->runs_[i];
        below = self->below_;
        chunk = self->identity_.chunk_size;
      }
      const uint64_t offset = run.first * chunk;
      const uint64_t length = std::min(below->size(), (run.first + run.count) * chunk) - offset;
      auto fill = fill_cache(below, offset, length);
      co_await std::move(fill);
      if (auto self = weak.lock()) self->replayed_.fetch_add(run.count, relaxed);
    }
  }

  void worker_done() {
    if (workers_.fetch_sub(1) != 1) return;
    replay_done_.store(true);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - replay_start_)
                        .count();
    log::info("boot profile: {}: replay done: {} chunks in {} ms", path_, replayed_.load(), ms);
  }

  DevicePtr below_;
  const BootProfileOptions options_;
  const std::string path_;
  const BootProfile identity_;  // what a matching profile must say (no chunks)
  const uint64_t chunks_;

  // Recording.
  std::atomic<bool> recording_{false};
  mutable std::mutex mutex_;  // everything below up to save_mutex_
  std::vector<uint64_t> seen_;
  std::vector<uint64_t> order_;
  bool dirty_ = false;
  std::string end_reason_;  // why the recording ended ("" while it goes on)
  bool final_logged_ = false;
  const std::chrono::steady_clock::time_point opened_;
  std::chrono::steady_clock::time_point last_save_;
  std::mutex save_mutex_;  // one file write at a time
  std::atomic<uint64_t> saves_{0};

  // Replay (runs_ is fixed before the workers start).
  bool replaying_ = false;
  uint64_t replay_chunks_ = 0;
  std::vector<Run> runs_;
  std::atomic<std::size_t> next_run_{0};
  std::atomic<unsigned> workers_{0};
  std::atomic<uint64_t> replayed_{0};
  std::atomic<bool> replay_done_{false};
  std::chrono::steady_clock::time_point replay_start_;
};

// The profile at `path`: found and no problem, found with why it cannot be used, or not
// found at all.
struct Loaded {
  bool found = false;
  std::string problem;
  BootProfile profile;
};

Loaded load_profile(const std::string& path) {
  Loaded l;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno != ENOENT) {
      l.found = true;
      l.problem = fmt::format("cannot open it: {}", errno_text(errno));
    }
    return l;
  }
  l.found = true;
  struct stat st {};
  std::vector<std::byte> bytes;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
      static_cast<uint64_t>(st.st_size) > max_file_bytes) {
    l.problem = "it is not a regular file of a profile's size";
  } else {
    bytes.resize(static_cast<std::size_t>(st.st_size));
    if (::pread(fd, bytes.data(), bytes.size(), 0) != static_cast<ssize_t>(bytes.size()))
      l.problem = "it cannot be read";
  }
  ::close(fd);
  if (l.problem.empty()) {
    auto d = decode_boot_profile(bytes);
    if (d.ok)
      l.profile = std::move(d.profile);
    else
      l.problem = "it is damaged: " + d.problem;
  }
  return l;
}

}  // namespace

std::vector<std::byte> encode_boot_profile(const BootProfile& p) {
  const int width = p.chunk_size && chunk_count(p.size, p.chunk_size) > 0xffffffffu ? 8 : 4;
  std::vector<std::byte> out;
  out.reserve(fixed_header + p.describe.size() + p.version_tag.size() + p.chunks.size() * width +
              4);
  for (char c : magic) out.push_back(std::byte(static_cast<uint8_t>(c)));
  put(out, format_version, 4);
  put(out, p.chunk_size, 4);
  put(out, p.size, 8);
  put(out, p.describe.size(), 4);
  put(out, p.version_tag.size(), 4);
  put(out, static_cast<uint64_t>(width), 4);
  put(out, 0, 4);
  put(out, p.chunks.size(), 8);
  for (char c : p.describe) out.push_back(std::byte(static_cast<uint8_t>(c)));
  for (char c : p.version_tag) out.push_back(std::byte(static_cast<uint8_t>(c)));
  for (auto c : p.chunks) put(out, c, width);
  put(out, crc32(out), 4);
  return out;
}

DecodedBootProfile decode_boot_profile(std::span<const std::byte> in) {
  DecodedBootProfile d;
  auto bad = [&](std::string why) {
    d.problem = std::move(why);
    return d;
  };
  if (in.size() < fixed_header + 4) return bad(fmt::format("{} bytes is too short", in.size()));
  if (std::memcmp(in.data(), magic, sizeof magic) != 0) return bad("not a boot profile (magic)");
  const uint32_t stored = static_cast<uint32_t>(get(in, in.size() - 4, 4));
  if (crc32(in.first(in.size() - 4)) != stored) return bad("checksum mismatch");
  if (const auto v = get(in, 8, 4); v != format_version)
    return bad(fmt::format("version {}, not {}", v, format_version));
  auto& p = d.profile;
  p.chunk_size = static_cast<uint32_t>(get(in, 12, 4));
  p.size = get(in, 16, 8);
  const uint64_t describe_len = get(in, 24, 4);
  const uint64_t tag_len = get(in, 28, 4);
  const uint64_t width = get(in, 32, 4);
  const uint64_t count = get(in, 40, 8);
  if (p.chunk_size < 512 || !std::has_single_bit(p.chunk_size))
    return bad(fmt::format("chunk size {} is not a power of two >= 512", p.chunk_size));
  if (width != 4 && width != 8) return bad(fmt::format("index width {}", width));
  const uint64_t body = in.size() - 4 - fixed_header;
  if (describe_len + tag_len > body || count > (body - describe_len - tag_len) / width ||
      describe_len + tag_len + count * width != body)
    return bad("lengths do not add up to the file's size");
  std::size_t at = fixed_header;
  p.describe.assign(reinterpret_cast<const char*>(in.data() + at), describe_len);
  at += describe_len;
  p.version_tag.assign(reinterpret_cast<const char*>(in.data() + at), tag_len);
  at += tag_len;
  const uint64_t chunks = chunk_count(p.size, p.chunk_size);
  p.chunks.reserve(count);
  for (uint64_t i = 0; i < count; ++i, at += width) {
    const uint64_t c = get(in, at, static_cast<int>(width));
    if (c >= chunks) return bad(fmt::format("chunk {} past the end ({} chunks)", c, chunks));
    p.chunks.push_back(c);
  }
  d.ok = true;
  return d;
}

DevicePtr open_boot_profile(DevicePtr below, const BootProfileOptions& options) {
  if (options.path.empty())
    fail(std::errc::invalid_argument, "boot profile: {}: no profile file given", below->describe());
  if (options.chunk_size < 512 || !std::has_single_bit(options.chunk_size))
    fail(std::errc::invalid_argument,
         "boot profile: {}: chunk size {} is not a power of two of at least 512 bytes",
         options.path, options.chunk_size);
  if (options.max_chunks == 0 || options.replay_width == 0)
    fail(std::errc::invalid_argument,
         "boot profile: {}: max_chunks and replay_width must be at least 1", options.path);
  if (below->size() == 0)
    fail(std::errc::invalid_argument, "boot profile: {}: the image {} is empty", options.path,
         below->describe());
  BootProfile identity{
      below->describe(), below->size(), below->version_tag(), options.chunk_size, {}};
  auto loaded = load_profile(options.path);
  if (loaded.found && loaded.problem.empty())
    loaded.problem = profile_change(loaded.profile, identity);
  auto filter = std::make_shared<BootProfileFilter>(std::move(below), options, identity);
  if (loaded.found && loaded.problem.empty()) {
    log::info("boot profile: {}: replaying {} chunks of {} ({} in flight)", options.path,
              loaded.profile.chunks.size(), identity.describe, options.replay_width);
    asio::any_io_executor ex = options.executor;
    if (!ex) ex = blocking_pool().get_executor();
    filter->start_replay(loaded.profile.chunks, ex);
  } else {
    if (loaded.found)
      log::info("boot profile: {}: replacing the profile ({}); recording the first reads of {}",
                options.path, loaded.problem, identity.describe);
    else
      log::info("boot profile: {}: recording the first reads of {} (for {} s or {} chunks)",
                options.path, identity.describe, options.window.count(), options.max_chunks);
    filter->start_recording();
  }
  return filter;
}

BootProfileStats boot_profile_stats(const BlockDevice& device) {
  if (const auto* f = dynamic_cast<const BootProfileFilter*>(&device)) return f->stats();
  return {};
}

}  // namespace imagenbd::backends
