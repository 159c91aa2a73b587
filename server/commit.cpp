// Live snapshots: see commit.hpp. The point in time is taken before the admin endpoint
// answers the POST (begin_commit, a short pause of the overlay's block operations); the
// copy, the flush and the snapshot run afterwards on a worker executor while the export
// keeps serving. A failure anywhere gives the captured blocks back to the overlay, so the
// next commit writes them again.
#include "server/commit.hpp"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <ctime>
#include <vector>

#include <fmt/format.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/azure_blob.hpp"
#include "backends/azure_credentials.hpp"
#include "backends/azure_page_blob.hpp"
#include "backends/error.hpp"
#include "backends/log.hpp"
#include "formats/cow.hpp"
#include "formats/open_image.hpp"
#include "server/blob_tool_common.hpp"
#include "server/exports.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace asio = boost::asio;
namespace azure = backends::azure;
using backends::fail;

namespace {

constexpr std::size_t parallel_blocks = 8;  // captured blocks copied at a time
// Metadata of a clone: the base it was copied from (checked by every later commit).
constexpr const char* meta_base = "imagenbd_base";
constexpr const char* meta_base_snapshot = "imagenbd_base_snapshot";

std::string now_iso8601() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return text;
}

std::string optional_json(const std::string& text) {
  return text.empty() ? std::string("null") : json_string(text);
}

// Reads a JSON string literal at text[i] (the opening quote); returns its value, or
// nullopt. Handles the escapes json_string() writes.
std::optional<std::string> read_json_string(std::string_view text, std::size_t& i) {
  if (i >= text.size() || text[i] != '"') return std::nullopt;
  std::string out;
  for (++i; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '"') {
      ++i;
      return out;
    }
    if (c != '\\') {
      out += c;
      continue;
    }
    if (++i >= text.size()) return std::nullopt;
    switch (text[i]) {
      case 'n':
        out += '\n';
        break;
      case 't':
        out += '\t';
        break;
      case 'r':
        out += '\r';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'u': {
        unsigned value = 0;
        if (i + 4 >= text.size()) return std::nullopt;
        std::from_chars(text.data() + i + 1, text.data() + i + 5, value, 16);
        out += static_cast<char>(value);  // json_string escapes only control characters
        i += 4;
        break;
      }
      default:
        out += text[i];
    }
  }
  return std::nullopt;
}

// The parts of the base image a commit needs: where its blob is, with the credentials the
// export uses.
struct BaseBlob {
  azure::BlobLocation where;
  azure::Credentials credentials;
  std::optional<azure::Credentials> given;  // the export's config credentials, if any
};

BaseBlob base_blob(const Export& e) {
  BaseBlob b;
  if (!e.spec.credentials.empty()) b.given = resolve_credentials(e.spec.credentials);
  const azure::Credentials env = b.given ? *b.given : azure::credentials_from_environment();
  const auto split = split_az_snapshot(e.spec.image);
  b.where = azure::parse_blob_uri(split.first, env);
  // The snapshot the leaf serves ("new" was resolved at open): its display ends in @T.
  const std::string shown = e.leaf->describe();
  const auto at = shown.rfind('@');
  b.where.snapshot = at == std::string::npos ? std::string() : shown.substr(at + 1);
  b.credentials = azure::credentials_for(b.where, env);
  return b;
}

bool azure_base(const Export& e) {
  return e.leaf && e.leaf->name() == "azure";
}

// Where the blocks go, open for one commit.
struct Target {
  backends::DevicePtr device;                  // writes go here (a format layer)
  backends::DevicePtr leaf_to_close;           // the clone's leaf (gives its lease back)
  std::shared_ptr<azure::BlobClient> to_snap;  // snapshotted at the end; none for a file
  std::string name;
};

// The clone for --commit-to: made by Copy Blob of the base snapshot when missing, else
// checked to be a clone of this base; opened leased, with the base's image format.
asio::awaitable<Target> open_clone(const Export& e) {
  BaseBlob base = base_blob(e);
  const azure::Credentials env = base.given ? *base.given : azure::credentials_from_environment();
  const auto split = split_az_snapshot(e.spec.commit_to);
  azure::BlobLocation where = azure::parse_blob_uri(split.first, env);
  if (!split.second.empty() || !where.snapshot.empty()) {
    fail(std::errc::invalid_argument,
         "commit: --commit-to={}: a snapshot cannot be written (name the blob, without "
         "?snapshot=)",
         e.spec.commit_to);
  }
  if (where.endpoint == base.where.endpoint && where.account == base.where.account &&
      where.container == base.where.container && where.blob == base.where.blob) {
    fail(std::errc::invalid_argument,
         "commit: --commit-to names the base image {} itself; give a new blob name (it is "
         "made as a copy of the base)",
         where.display());
  }
  azure::BlobClient clone(where, azure::credentials_for(where, env));
  // The base's name without a snapshot, and the snapshot the clone starts from.
  azure::BlobLocation base_name = base.where;
  base_name.snapshot.clear();
  std::optional<azure::BlobProperties> props;
  try {
    props = co_await clone.properties();
  } catch (const azure::BlobError& x) {
    if (x.status() != 404) throw;
  }
  if (!props) {
    if (base.where.snapshot.empty()) {
      // A live base we do not lease: copy a snapshot of it, never bytes that may change.
      azure::BlobClient live(base_name, base.credentials);
      base.where.snapshot = co_await live.snapshot();
    }
    const azure::BlobClient source(base.where, base.credentials);
    log::info("commit: {}: cloning {} into {} (Copy Blob)", e.name, base.where.display(),
              where.display());
    const std::vector<std::pair<std::string, std::string>> metadata = {
        {meta_base, base_name.display()}, {meta_base_snapshot, base.where.snapshot}};
    const std::string source_url = source.copy_source_url();
    co_await clone.copy_from(source_url, metadata);
  } else {
    const std::string* from = props->meta(meta_base);
    const std::string* from_snapshot = props->meta(meta_base_snapshot);
    const std::string was = from ? *from + (from_snapshot ? "@" + *from_snapshot : "") : "";
    const bool same =
        from && *from == base_name.display() &&
        (base.where.snapshot.empty() || (from_snapshot && *from_snapshot == base.where.snapshot));
    if (!same) {
      fail(std::errc::invalid_argument,
           "commit: --commit-to={}: the blob exists and was not cloned from {} (it was {}); "
           "name a new blob, or remove this one",
           where.display(), base.where.display(),
           was.empty() ? "not made by imagenbd" : "cloned from " + was);
    }
  }
  backends::AzurePageBlobOptions options;
  options.lease_duration = e.spec.lease_duration;
  options.retry.deadline = std::chrono::seconds(e.spec.retry_deadline);
  options.credentials = base.given;
  backends::DevicePtr leaf = co_await backends::open_azure_page_blob(split.first, options);
  Target t;
  t.leaf_to_close = leaf;
  t.name = where.display();
  std::exception_ptr error;
  try {
    const formats::Format format = formats::parse_format(e.lower->name());
    t.device = co_await formats::open_image(leaf, {.format = format, .read_only = false});
    if (t.device->size() != e.lower->size()) {
      fail(std::errc::invalid_argument,
           "commit: {}: the clone's disk is {} bytes, the base's {}: not a clone of it", t.name,
           t.device->size(), e.lower->size());
    }
  } catch (...) {
    error = std::current_exception();
  }
  if (error) {
    co_await leaf->close();
    std::rethrow_exception(error);
  }
  t.to_snap = std::make_shared<azure::BlobClient>(std::move(clone));
  co_return t;
}

asio::awaitable<Target> open_target(const Export& e) {
  if (e.lower->caps().writable) {
    // We hold the base blob's lease (or a local image is writable): commit into it.
    Target t;
    t.device = e.lower;
    t.name = e.leaf ? e.leaf->describe() : e.lower->describe();
    if (azure_base(e)) {
      BaseBlob base = base_blob(e);
      t.to_snap = std::make_shared<azure::BlobClient>(base.where, base.credentials);
    }
    co_return t;
  }
  co_return co_await open_clone(e);
}

}  // namespace

std::string commit_status_json(const CommitStatus& s) {
  return fmt::format(
      "{{\"state\":{},\"blocks_total\":{},\"blocks_done\":{},\"bytes_done\":{},"
      "\"snapshot\":{},\"target\":{},\"error\":{},\"started\":{},\"finished\":{}}}\n",
      json_string(s.state), s.blocks_total, s.blocks_done, s.bytes_done, optional_json(s.snapshot),
      optional_json(s.target), optional_json(s.error), optional_json(s.started),
      optional_json(s.finished));
}

std::optional<CommitStatus> parse_commit_status(std::string_view json) {
  CommitStatus s;
  std::size_t i = json.find('{');
  if (i == std::string_view::npos) return std::nullopt;
  ++i;
  bool has_state = false;
  const auto skip = [&] {
    while (i < json.size() && (json[i] == ' ' || json[i] == '\n' || json[i] == '\t')) ++i;
  };
  for (;;) {
    skip();
    if (i < json.size() && json[i] == '}') break;
    const auto key = read_json_string(json, i);
    skip();
    if (!key || i >= json.size() || json[i] != ':') return std::nullopt;
    ++i;
    skip();
    std::string text;
    uint64_t number = 0;
    if (i < json.size() && json[i] == '"') {
      const auto value = read_json_string(json, i);
      if (!value) return std::nullopt;
      text = *value;
    } else if (json.substr(i).starts_with("null")) {
      i += 4;
    } else {
      const auto [end, ec] = std::from_chars(json.data() + i, json.data() + json.size(), number);
      if (ec != std::errc()) return std::nullopt;
      i = static_cast<std::size_t>(end - json.data());
    }
    if (*key == "state") {
      s.state = text;
      has_state = true;
    }
    if (*key == "blocks_total") s.blocks_total = number;
    if (*key == "blocks_done") s.blocks_done = number;
    if (*key == "bytes_done") s.bytes_done = number;
    if (*key == "snapshot") s.snapshot = text;
    if (*key == "target") s.target = text;
    if (*key == "error") s.error = text;
    if (*key == "started") s.started = text;
    if (*key == "finished") s.finished = text;
    skip();
    if (i < json.size() && json[i] == ',') {
      ++i;
      continue;
    }
    if (i < json.size() && json[i] == '}') break;
    return std::nullopt;
  }
  if (!has_state) return std::nullopt;
  return s;
}

std::string commit_problem(const Export& e) {
  if (!e.overlay || !std::dynamic_pointer_cast<formats::CowDevice>(e.overlay) || !e.lower) {
    return fmt::format(
        "export '{}' has no overlay: a live snapshot commits an overlay's writes (serve it "
        "with --overlay=FILE)",
        e.name);
  }
  if (e.lower->caps().writable) return {};
  if (e.spec.commit_to.empty()) {
    return fmt::format(
        "export '{}': the image under the overlay is read-only here (served with --snapshot "
        "or -r, or not a blob whose lease this server holds), so there is nowhere to commit: "
        "give --commit-to=az://ACCOUNT/CONTAINER/BLOB (a private blob cloned from the base)",
        e.name);
  }
  if (!azure_base(e)) {
    return fmt::format(
        "export '{}': --commit-to clones an Azure page blob, and {} is not one (a {} image "
        "cannot be copied server-side); serve a writable local image to commit into it",
        e.name, e.leaf ? e.leaf->describe() : e.spec.image, e.leaf ? e.leaf->name() : "local");
  }
  return {};
}

struct Commits::Job {
  std::weak_ptr<const Export> export_;
  mutable std::mutex mutex;
  CommitStatus status;  // under mutex, but for the counters below
  std::atomic<uint64_t> blocks_done{0};
  std::atomic<uint64_t> bytes_done{0};
  std::atomic<bool> running{false};

  CommitStatus snapshot_of() const {
    std::lock_guard lock(mutex);
    CommitStatus s = status;
    s.blocks_done = blocks_done.load();
    s.bytes_done = bytes_done.load();
    return s;
  }
};

namespace {

// Copies the captured blocks, parallel_blocks at a time; each worker takes the next index.
asio::awaitable<void> copy_blocks(formats::CowDevice& cow, backends::BlockDevice& target,
                                  const std::vector<uint64_t>& blocks,
                                  std::atomic<uint64_t>& blocks_done,
                                  std::atomic<uint64_t>& bytes_done) {
  std::atomic<std::size_t> next{0};
  auto worker = [&]() -> asio::awaitable<void> {
    std::vector<std::byte> buffer;
    for (std::size_t k = next++; k < blocks.size(); k = next++) {
      const uint64_t index = blocks[k];
      buffer.resize(cow.block_bytes(index));
      const bool zero = co_await cow.read_commit(index, buffer);
      const uint64_t offset = index * cow.block_size();
      if (zero)
        co_await target.zero(offset, buffer.size(), {});
      else
        co_await target.write(offset, buffer, {});
      bytes_done += buffer.size();
      ++blocks_done;
    }
  };
  const auto executor = co_await asio::this_coro::executor;
  const std::size_t n = std::min(parallel_blocks, blocks.size());
  std::vector<std::exception_ptr> errors(n);
  std::atomic<std::size_t> left{n};
  // Run the workers together; wait for all of them (none may outlive the buffers here).
  asio::steady_timer done(executor, asio::steady_timer::time_point::max());
  for (std::size_t w = 0; w < n; ++w) {
    asio::co_spawn(executor, worker(), [&, w](std::exception_ptr ep) {
      errors[w] = ep;
      if (--left == 0) done.cancel();
    });
  }
  if (n > 0) {
    boost::system::error_code ignored;
    co_await done.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
  }
  for (auto& ep : errors) {
    if (ep) std::rethrow_exception(ep);
  }
}

}  // namespace

namespace {

// The rest of a commit, after begin_commit(): open the target, copy, flush, snapshot; the
// overlay's commit ends in every case (a failure keeps the blocks for the next one).
asio::awaitable<void> finish(std::shared_ptr<Commits::Job> job, std::shared_ptr<const Export> e,
                             std::shared_ptr<formats::CowDevice> cow,
                             std::vector<uint64_t> blocks) {
  Target t;
  std::exception_ptr error;
  try {
    t = co_await open_target(*e);
    {
      std::lock_guard lock(job->mutex);
      job->status.target = t.name;
    }
    co_await copy_blocks(*cow, *t.device, blocks, job->blocks_done, job->bytes_done);
    co_await t.device->flush();
    if (t.to_snap) {
      const std::string snapshot = co_await t.to_snap->snapshot();
      std::lock_guard lock(job->mutex);
      job->status.snapshot = snapshot;
    }
  } catch (...) {
    error = std::current_exception();
  }
  co_await cow->end_commit(!error);
  if (t.leaf_to_close) {
    try {
      co_await t.leaf_to_close->close();  // the clone's lease
    } catch (const std::exception& x) {
      log::warn("commit: {}: giving back the lease of {}: {}", e->name, t.name, x.what());
    }
  }
  if (error) std::rethrow_exception(error);
}

// The point in time: the overlay's captured blocks.
asio::awaitable<std::vector<uint64_t>> begin(std::shared_ptr<formats::CowDevice> cow) {
  co_return co_await cow->begin_commit();
}

}  // namespace

asio::awaitable<CommitStatus> Commits::start(std::shared_ptr<const Export> e,
                                             asio::any_io_executor executor) {
  if (const std::string problem = commit_problem(*e); !problem.empty())
    throw std::invalid_argument(problem);
  auto cow = std::dynamic_pointer_cast<formats::CowDevice>(e->overlay);
  auto job = std::make_shared<Job>();
  job->export_ = e;
  job->status.state = "running";
  job->status.started = now_iso8601();
  job->status.target = e->lower->caps().writable ? e->leaf->describe() : e->spec.commit_to;
  {
    std::lock_guard lock(mutex_);
    auto& slot = jobs_[e->name];
    if (slot && slot->running.load() && slot->export_.lock() == e)
      throw CommitBusy(fmt::format(
          "export '{}': a snapshot is being committed already ({} of "
          "{} blocks); wait for it (GET /exports/{}/snapshot)",
          e->name, slot->blocks_done.load(), slot->snapshot_of().blocks_total, e->name));
    job->running = true;
    slot = job;
  }
  std::vector<uint64_t> blocks;
  try {
    blocks = co_await asio::co_spawn(executor, begin(cow), asio::use_awaitable);
  } catch (const std::exception& x) {
    std::lock_guard lock(job->mutex);
    job->status.state = "failed";
    job->status.error = x.what();
    job->status.finished = now_iso8601();
    job->running = false;
    throw;
  }
  uint64_t bytes = 0;
  for (uint64_t index : blocks) bytes += cow->block_bytes(index);
  {
    std::lock_guard lock(job->mutex);
    job->status.blocks_total = blocks.size();
  }
  log::info("commit: {}: committing {} blocks ({} bytes) of the overlay into {}", e->name,
            blocks.size(), bytes, job->status.target);
  const auto begun = std::chrono::steady_clock::now();
  asio::co_spawn(
      executor, finish(job, e, cow, std::move(blocks)),
      [job, name = e->name, begun](std::exception_ptr ep) {
        const double seconds =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - begun).count();
        std::lock_guard lock(job->mutex);
        job->status.finished = now_iso8601();
        if (ep) {
          try {
            std::rethrow_exception(ep);
          } catch (const std::exception& x) {
            job->status.error = x.what();
          }
          job->status.state = "failed";
          log::error("commit: {}: failed after {:.1f} s, its blocks go with the next commit: {}",
                     name, seconds, job->status.error);
        } else {
          job->status.state = "done";
          const double mb = static_cast<double>(job->bytes_done.load()) / 1e6;
          log::info("commit: {}: snapshot {} of {}: {} blocks, {} bytes in {:.2f} s ({:.1f} MB/s)",
                    name,
                    job->status.snapshot.empty() ? "(none: not a blob)" : job->status.snapshot,
                    job->status.target, job->blocks_done.load(), job->bytes_done.load(), seconds,
                    seconds > 0 ? mb / seconds : 0.0);
        }
        job->running = false;
      });
  co_return job->snapshot_of();
}

CommitStatus Commits::status(const Export& e) const {
  std::lock_guard lock(mutex_);
  const auto it = jobs_.find(e.name);
  if (it == jobs_.end() || it->second->export_.lock().get() != &e) return {};
  return it->second->snapshot_of();
}

}  // namespace imagenbd::server
