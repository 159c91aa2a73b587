// `imagenbd download URI FILE`: a blob (or one of its snapshots) into a local file. For a
// page blob only the ranges Get Page Ranges lists are read, and the rest of FILE stays a
// hole, so a sparse image comes back sparse. FILE is written as FILE.part, flushed, and
// renamed when complete, so an interrupted download leaves no half file under FILE's name.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <fmt/format.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "backends/page_map.hpp"
#include "backends/parallel.hpp"
#include "server/blob_tool_common.hpp"
#include "server/progress.hpp"
#include "server/tool_blob.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

namespace asio = boost::asio;
namespace azure = backends::azure;

constexpr uint64_t piece_size = 4u << 20;

struct Download {
  const DownloadCommand* cmd = nullptr;
  azure::BlobClient* blob = nullptr;
  std::string part;          // FILE.part
  backends::DevicePtr file;  // FILE.part, opened once its size is set
  std::vector<backends::PageMap::Interval> data;
  std::size_t next_interval = 0;
  uint64_t next_offset = 0;  // absolute, within data[next_interval]
  bool stop = false;
  bool interrupted = false;
  bool part_created = false;
  uint64_t total = 0;
  uint64_t done = 0;
  DownloadSummary summary;
  ProgressBar* progress = nullptr;
};

// Takes the next piece of at most 4 MiB of data, reads it from the blob and writes it to
// FILE.part at the same offset. One buffer and one request per worker.
asio::awaitable<void> download_worker(Download& d) {
  std::vector<std::byte> buffer(piece_size);
  try {
    while (!d.stop && d.next_interval < d.data.size()) {
      const auto& interval = d.data[d.next_interval];
      const uint64_t offset = std::max(d.next_offset, interval.start);
      const uint64_t length = std::min(piece_size, interval.end - offset);
      d.next_offset = offset + length;
      if (d.next_offset >= interval.end) ++d.next_interval;
      const auto piece = std::span(buffer).first(length);
      ++d.summary.requests;
      co_await d.blob->read(offset, piece, d.summary.size);
      co_await d.file->write(offset, piece, {});
      d.summary.downloaded_bytes += length;
      d.done += length;
      d.progress->update(d.done, d.total);
    }
  } catch (...) {
    d.stop = true;
    throw;
  }
}

// FILE.part with the blob's size, all of it a hole for now.
void create_part(Download& d, uint64_t size) {
  const int fd = ::open(d.part.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) backends::fail_errno(errno, d.part);
  d.part_created = true;
  // fsync here too: a blob without data never reaches the file device's flush.
  int rc = ::ftruncate(fd, static_cast<off_t>(size));
  if (rc == 0) rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) backends::fail_errno(error, fmt::format("{}: set the size to {}", d.part, size));
}

asio::awaitable<void> download_async(Download& d) {
  const auto properties = co_await d.blob->properties();
  const uint64_t size = properties.size;
  const bool page = properties.blob_type == "PageBlob";
  d.summary.size = size;
  d.summary.blob_type = short_blob_type(properties.blob_type);
  if (page && size > 0) {
    const auto ranges = co_await d.blob->page_ranges(0, 0);
    backends::PageMap map;
    map.apply(ranges, size);
    d.data = map.intervals();
  } else if (size > 0) {
    d.data.push_back({0, size});
  }
  for (const auto& i : d.data) d.total += i.end - i.start;
  create_part(d, size);
  if (d.data.empty()) co_return;
  d.file = backends::open_file(d.part, {.read_only = false});
  d.progress->update(0, d.total);
  std::vector<backends::Task> tasks;
  for (std::size_t i = 0; i < d.cmd->parallel; ++i) {
    tasks.push_back([&d]() { return download_worker(d); });
  }
  co_await backends::run_parallel(std::move(tasks), d.cmd->parallel);
  if (!d.stop) co_await d.file->flush();
}

// Puts the finished file in place; without --overwrite a FILE that appeared meanwhile wins.
void move_into_place(const std::string& part, const std::string& file, bool overwrite) {
  int rc = 0;
  if (overwrite) {
    rc = ::rename(part.c_str(), file.c_str());
  } else {
    rc = ::renameat2(AT_FDCWD, part.c_str(), AT_FDCWD, file.c_str(), RENAME_NOREPLACE);
    if (rc != 0 && errno == EINVAL) {  // no RENAME_NOREPLACE here: link() refuses too
      rc = ::link(part.c_str(), file.c_str());
      if (rc == 0) ::unlink(part.c_str());
    }
  }
  if (rc != 0) {
    const int error = errno;
    if (error == EEXIST) {
      backends::fail(std::errc::file_exists, "{}: the file exists (use --overwrite to replace it)",
                     file);
    }
    backends::fail_errno(error, fmt::format("rename {} to {}", part, file));
  }
  const std::string dir = std::filesystem::path(file).parent_path().string();
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

int run_download(const DownloadCommand& cmd) {
  const auto started = std::chrono::steady_clock::now();
  auto blob = open_blob_client(cmd.uri, cmd.snapshot);
  const std::string name = blob.location().display();
  if (blob.location().blob.empty()) {
    throw std::invalid_argument(
        fmt::format("{} names no blob (expected az://ACCOUNT/CONTAINER/BLOB)", cmd.uri));
  }
  struct stat st {};
  if (::stat(cmd.file.c_str(), &st) == 0) {
    if (!S_ISREG(st.st_mode)) {
      backends::fail(std::errc::invalid_argument,
                     "{}: not a regular file (download writes regular files only)", cmd.file);
    }
    if (!cmd.overwrite) {
      backends::fail(std::errc::file_exists, "{}: the file exists (use --overwrite to replace it)",
                     cmd.file);
    }
  }

  ProgressBar progress(
      progress_wanted(cmd.progress, ::isatty(STDERR_FILENO) == 1, false, cmd.json));
  Download d;
  d.cmd = &cmd;
  d.blob = &blob;
  d.part = cmd.file + ".part";
  d.progress = &progress;
  d.summary.uri = name;

  asio::io_context ctx(1);
  asio::signal_set signals(ctx, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    d.stop = true;
    d.interrupted = true;
  });
  std::exception_ptr error;
  asio::co_spawn(ctx, download_async(d), [&](std::exception_ptr ep) {
    error = ep;
    signals.cancel();
  });
  ctx.run();
  d.file.reset();  // closes FILE.part

  if (!error && d.interrupted) {
    try {
      backends::fail(std::errc::interrupted, "download {} to {}: interrupted", name, cmd.file);
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (!error) {
    try {
      move_into_place(d.part, cmd.file, cmd.overwrite);
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) {
    progress.abandon();
    if (d.part_created) ::unlink(d.part.c_str());
    std::rethrow_exception(error);
  }
  progress.finish(d.total);
  d.summary.hole_bytes = d.summary.size - d.summary.downloaded_bytes;
  d.summary.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (cmd.json) std::fputs(download_json(d.summary).c_str(), stdout);
  return 0;
}

const char* download_help() {
  return R"(Usage: imagenbd download [--snapshot=TIMESTAMP] [--parallel=N] [--overwrite] [-p]
                         [--json] URI FILE

Download the blob URI (page, block or append blob), or one of its snapshots, into the
new local file FILE, byte for byte.

URI: az://ACCOUNT/CONTAINER/BLOB[?snapshot=T], https://ACCOUNT.blob.core.windows.net/
CONTAINER/BLOB[?SAS], or http://HOST:PORT/ACCOUNT/CONTAINER/BLOB[?SAS] (Azurite);
credentials as for 'imagenbd upload' (see 'imagenbd upload --help').

For a page blob only the ranges that Get Page Ranges lists are read: the rest of FILE
is left as a hole, so a sparse image stays sparse. Reads are 4 MiB ranged Get Blobs,
--parallel of them at once, each checked against the blob's size.

FILE is written as FILE.part, flushed and renamed when complete: after an error or
Ctrl-C nothing is left behind, and an existing FILE (replaced only with --overwrite)
stays as it was.

Options:
      --snapshot=T         download the snapshot with timestamp T (as 'imagenbd ls
                           --snapshots' or 'imagenbd snapshot' print it)
      --parallel=N         requests in flight, 1..256 (default 8)
      --overwrite          replace FILE if it exists (refused otherwise)
  -p, --progress           show a progress bar on stderr (default when stderr is a
                           terminal; never with --json)
      --json               print {"uri", "blob_type", "size", "downloaded_bytes",
                           "hole_bytes", "requests", "seconds"} on stdout
  -h, --help               this text

Exit status: 0 on success, 1 on errors, 2 on usage errors.
)";
}

}  // namespace

int tool_download(int argc, char** argv) {
  DownloadCommand cmd;
  try {
    cmd = parse_download(argc, argv);
  } catch (const std::invalid_argument& e) {
    return usage_error("download", e.what(), 2);
  }
  if (cmd.help) {
    std::fputs(download_help(), stdout);
    return 0;
  }
  try {
    return run_download(cmd);
  } catch (const std::invalid_argument& e) {
    return usage_error("download", e.what(), 2);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", explain_failure(e).c_str());
    return 1;
  }
}

}  // namespace imagenbd::server
