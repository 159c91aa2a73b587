// `imagenbd upload FILE URI`: a local image into a page blob (or, with --blob-type=block, a
// block blob). Page blobs get only the file's data: holes (SEEK_DATA) are never read, and
// 512-byte sectors that read as zeroes are not sent, since a fresh page blob reads as
// zeroes (hpcpack's upload did the same). Each worker holds one --block-size buffer and
// has at most one request in flight, so memory stays at parallel x block-size whatever
// the file's size.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <fmt/format.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "backends/parallel.hpp"
#include "server/blob_tool_common.hpp"
#include "server/progress.hpp"
#include "server/tool_blob.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

namespace asio = boost::asio;
namespace azure = backends::azure;

// Azure's limit on the blocks of one block blob.
constexpr uint64_t max_blocks = 50000;

struct Span {
  uint64_t offset;
  uint64_t length;
};

// The upload's shared state. Everything runs on one single-threaded io_context (the HTTP
// client and the file's blocking pool resume us there), so plain fields need no locks.
struct Upload {
  const UploadCommand* cmd = nullptr;
  backends::DevicePtr file;
  azure::BlobClient* blob = nullptr;
  std::vector<Span> data;  // the file's data extents, 512-aligned, merged
  std::size_t next_extent = 0;
  uint64_t next_offset = 0;  // within data[next_extent]
  uint64_t next_block = 0;   // block blobs: the next block index
  uint64_t blocks = 0;
  bool stop = false;
  bool interrupted = false;
  bool created = false;  // the blob has been created or replaced: a failure leaves it partial
  uint64_t total = 0;    // bytes to read
  uint64_t done = 0;
  UploadSummary summary;
  ProgressBar* progress = nullptr;

  // The next piece of at most block_size bytes of data, or nullopt when none is left.
  std::optional<Span> next_piece() {
    while (next_extent < data.size()) {
      const Span& e = data[next_extent];
      if (next_offset >= e.length) {
        ++next_extent;
        next_offset = 0;
        continue;
      }
      const Span piece{e.offset + next_offset, std::min(cmd->block_size, e.length - next_offset)};
      next_offset += piece.length;
      return piece;
    }
    return std::nullopt;
  }
};

// The file's data extents, widened to whole 512-byte sectors (SEEK_DATA boundaries are
// filesystem blocks, but a file on an odd filesystem may say otherwise) and merged.
asio::awaitable<std::vector<Span>> data_extents(backends::BlockDevice& file) {
  std::vector<Span> out;
  const uint64_t size = file.size();
  uint64_t offset = 0;
  while (offset < size) {
    const auto extents = co_await file.extents(offset, size - offset);
    if (extents.empty()) {
      backends::fail(std::errc::io_error, "{}: {}: no extents at offset {}", file.name(),
                     file.describe(), offset);
    }
    for (const auto& e : extents) {
      const uint64_t length = std::min(e.length, size - offset);
      if (e.kind == backends::ExtentKind::data) {
        const uint64_t start = offset / page_size * page_size;
        const uint64_t end =
            std::min(size, (offset + length + page_size - 1) / page_size * page_size);
        if (!out.empty() && out.back().offset + out.back().length >= start) {
          out.back().length = std::max(out.back().length, end - out.back().offset);
        } else {
          out.push_back({start, end - start});
        }
      }
      offset += length;
      if (offset >= size) break;
    }
  }
  co_return out;
}

// Reads pieces and sends their non-zero sector runs, one Put Page at a time.
asio::awaitable<void> page_worker(Upload& u) {
  std::vector<std::byte> buffer(u.cmd->block_size);
  azure::PagePutOptions options;
  options.content_md5 = true;
  try {
    while (!u.stop) {
      const auto piece = u.next_piece();
      if (!piece) break;
      const auto data = std::span(buffer).first(piece->length);
      co_await u.file->read(piece->offset, data);
      for (const auto& run : nonzero_sector_runs(data, u.cmd->block_size)) {
        if (u.stop) break;
        ++u.summary.requests;
        co_await u.blob->put_pages(piece->offset + run.offset, data.subspan(run.offset, run.length),
                                   options);
        u.summary.uploaded_bytes += run.length;
      }
      u.done += piece->length;
      u.progress->update(u.done, u.total);
    }
  } catch (...) {
    u.stop = true;
    throw;
  }
}

// Reads block after block and sends each whole (block blobs have no holes to skip).
asio::awaitable<void> block_worker(Upload& u) {
  std::vector<std::byte> buffer(u.cmd->block_size);
  const uint64_t size = u.file->size();
  try {
    while (!u.stop && u.next_block < u.blocks) {
      const uint64_t index = u.next_block++;
      const uint64_t offset = index * u.cmd->block_size;
      const auto data = std::span(buffer).first(std::min(u.cmd->block_size, size - offset));
      co_await u.file->read(offset, data);
      if (u.stop) break;
      ++u.summary.requests;
      const std::string id = block_id(index);
      co_await u.blob->put_block(id, data, true);
      u.summary.uploaded_bytes += data.size();
      u.done += data.size();
      u.progress->update(u.done, u.total);
    }
  } catch (...) {
    u.stop = true;
    throw;
  }
}

// Creates the container unless it is there. A SAS for one blob may not create containers
// (403): then the blob's own calls say what is wrong.
asio::awaitable<void> ensure_container(azure::BlobClient& blob) {
  try {
    co_await blob.create_container();
  } catch (const azure::BlobError& e) {
    if (e.status() != 403) throw;
  }
}

asio::awaitable<void> run_workers(Upload& u, bool page) {
  std::vector<backends::Task> tasks;
  for (std::size_t i = 0; i < u.cmd->parallel; ++i) {
    tasks.push_back([&u, page]() { return page ? page_worker(u) : block_worker(u); });
  }
  co_await backends::run_parallel(std::move(tasks), u.cmd->parallel);
}

asio::awaitable<void> upload_page_blob(Upload& u) {
  const std::string name = u.blob->location().display();
  co_await ensure_container(*u.blob);
  try {
    co_await u.blob->create_page_blob(u.file->size(), u.cmd->overwrite);
  } catch (const backends::Error& e) {
    if (e.errc() == std::errc::file_exists) {
      backends::fail(std::errc::file_exists, "{}: the blob exists (use --overwrite to replace it)",
                     name);
    }
    throw;
  }
  u.created = true;
  u.data = co_await data_extents(*u.file);
  for (const auto& e : u.data) u.total += e.length;
  u.progress->update(0, u.total);
  co_await run_workers(u, true);
}

asio::awaitable<void> upload_block_blob(Upload& u) {
  const std::string name = u.blob->location().display();
  const uint64_t size = u.file->size();
  u.blocks = (size + u.cmd->block_size - 1) / u.cmd->block_size;
  if (u.blocks > max_blocks) {
    backends::fail(std::errc::file_too_large,
                   "{}: {} bytes need {} blocks of {}, more than the 50000 a block blob may have "
                   "(use a page blob)",
                   u.cmd->file, size, u.blocks, u.cmd->block_size);
  }
  co_await ensure_container(*u.blob);
  if (!u.cmd->overwrite) {
    // Put Block List replaces whatever is there, so ask first.
    bool exists = true;
    try {
      co_await u.blob->properties();
    } catch (const backends::Error& e) {
      if (e.errc() != std::errc::no_such_file_or_directory) throw;
      exists = false;
    }
    if (exists) {
      backends::fail(std::errc::file_exists, "{}: the blob exists (use --overwrite to replace it)",
                     name);
    }
  }
  u.total = size;
  u.created = true;  // from here on a failure leaves uncommitted blocks, nothing else
  u.progress->update(0, u.total);
  co_await run_workers(u, false);
  if (u.stop) co_return;
  std::vector<std::string> ids;
  ids.reserve(u.blocks);
  for (uint64_t i = 0; i < u.blocks; ++i) ids.push_back(block_id(i));
  co_await u.blob->put_block_list(ids);
}

asio::awaitable<void> upload_async(Upload& u) {
  if (u.cmd->block_blob) {
    co_await upload_block_blob(u);
  } else {
    co_await upload_page_blob(u);
  }
}

// Reads the head and tail of a would-be VHD for azure_vhd_problem.
asio::awaitable<std::optional<std::string>> vhd_problem(backends::BlockDevice& file) {
  const uint64_t size = file.size();
  if (size < page_size) co_return std::nullopt;
  std::vector<std::byte> head(page_size), tail(page_size);
  co_await file.read(0, head);
  co_await file.read(size - page_size, tail);
  co_return azure_vhd_problem(head, tail, size);
}

int run_upload(const UploadCommand& cmd) {
  const auto started = std::chrono::steady_clock::now();
  auto blob = open_blob_client(cmd.uri);
  const std::string name = blob.location().display();
  if (blob.location().blob.empty()) {
    throw std::invalid_argument(
        fmt::format("{} names no blob (expected az://ACCOUNT/CONTAINER/BLOB)", cmd.uri));
  }
  if (!blob.location().snapshot.empty()) {
    backends::fail(std::errc::read_only_file_system,
                   "{}: a snapshot is read-only (upload to the blob, without ?snapshot=)", name);
  }
  auto file = backends::open_file(cmd.file, {.read_only = true});
  const uint64_t size = file->size();
  if (!cmd.block_blob) {
    if (size % page_size != 0) {
      backends::fail(std::errc::invalid_argument, "{}", unaligned_size_message(cmd.file, size));
    }
    if (const auto problem = run_now(vhd_problem(*file))) {
      std::fprintf(stderr,
                   "imagenbd: warning: %s: Azure will not attach this VHD (%s); make one it will "
                   "with 'imagenbd convert --azure %s OUT.vhd'\n",
                   cmd.file.c_str(), problem->c_str(), cmd.file.c_str());
    }
  }

  ProgressBar progress(
      progress_wanted(cmd.progress, ::isatty(STDERR_FILENO) == 1, false, cmd.json));
  Upload u;
  u.cmd = &cmd;
  u.file = file;
  u.blob = &blob;
  u.progress = &progress;
  u.summary.uri = name;
  u.summary.blob_type = cmd.block_blob ? "block" : "page";
  u.summary.size = size;

  asio::io_context ctx(1);
  asio::signal_set signals(ctx, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    u.stop = true;
    u.interrupted = true;
  });
  std::exception_ptr error;
  asio::co_spawn(ctx, upload_async(u), [&](std::exception_ptr ep) {
    error = ep;
    signals.cancel();
  });
  ctx.run();

  if (error || u.interrupted) progress.abandon();
  const std::string partial =
      cmd.block_blob ? std::string("nothing was committed: the blob is as it was")
                     : fmt::format(
                           "the blob is partial ({} of {} data bytes sent): upload again with "
                           "--overwrite",
                           u.summary.uploaded_bytes, u.total);
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      if (!u.created) throw;
      backends::fail(std::errc::io_error, "{} ({})", explain_failure(e), partial);
    }
  }
  if (u.interrupted) {
    backends::fail(std::errc::interrupted, "upload {} to {}: interrupted; {}", cmd.file, name,
                   partial);
  }
  progress.finish(u.total);
  u.summary.skipped_bytes = size - u.summary.uploaded_bytes;
  u.summary.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (cmd.json) std::fputs(upload_json(u.summary).c_str(), stdout);
  return 0;
}

const char* upload_help() {
  return R"(Usage: imagenbd upload [--block-size=SIZE] [--blob-type=page|block] [--parallel=N]
                       [--overwrite] [-p] [--json] FILE URI

Upload the local file FILE (any image: raw, VHD, VDI) into the blob URI, byte for byte.

URI: az://ACCOUNT/CONTAINER/BLOB, https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS],
or http://HOST:PORT/ACCOUNT/CONTAINER/BLOB[?SAS] (Azurite). Credentials come from the URI's
SAS, else from AZURE_STORAGE_CONNECTION_STRING (Azurite: UseDevelopmentStorage=true, or a
string with BlobEndpoint=http://127.0.0.1:PORT/devstoreaccount1), else from
AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN.

A page blob (the default; what 'imagenbd serve' serves) is created with FILE's size,
which must be a multiple of 512. Only data is sent: holes of FILE are not read, and
512-byte sectors that read as zeroes are skipped (a new page blob reads as zeroes);
each Put Page carries at most --block-size bytes and a Content-MD5 the service checks.
A VHD that Azure would not attach as a disk (dynamic, differencing, or a virtual size
that is not a whole MiB) is uploaded with a warning: 'imagenbd convert --azure' makes
one it will. The container is created when it is missing.

--blob-type=block uploads a block blob (plain files, any size up to 50000 blocks):
every byte, in Put Blocks of --block-size, committed by one Put Block List at the end.

Options:
      --block-size=SIZE    bytes per Put Page / Put Block: a multiple of 512, at most
                           and by default 4M
      --blob-type=TYPE     page (default) or block
      --parallel=N         requests in flight, 1..256 (default 8)
      --overwrite          replace an existing blob (refused otherwise)
  -p, --progress           show a progress bar on stderr (default when stderr is a
                           terminal; never with --json)
      --json               print {"uri", "blob_type", "size", "uploaded_bytes",
                           "skipped_bytes", "requests", "seconds"} on stdout
  -h, --help               this text

After an error or Ctrl-C a page blob is left partial (say so, and upload again with
--overwrite); a block blob is left as it was. Exit status: 0 on success, 1 on errors,
2 on usage errors.
)";
}

}  // namespace

int tool_upload(int argc, char** argv) {
  UploadCommand cmd;
  try {
    cmd = parse_upload(argc, argv);
  } catch (const std::invalid_argument& e) {
    return usage_error("upload", e.what(), 2);
  }
  if (cmd.help) {
    std::fputs(upload_help(), stdout);
    return 0;
  }
  try {
    return run_upload(cmd);
  } catch (const std::invalid_argument& e) {
    return usage_error("upload", e.what(), 2);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", explain_failure(e).c_str());
    return 1;
  }
}

}  // namespace imagenbd::server
