// Live snapshots (issue 6 item 4, BlobSeer's CLONE and COMMIT): while an export with an
// overlay keeps serving, its changed blocks (formats/cow.hpp's commit view, one point in
// time) are written into blob storage and a blob snapshot is taken. Two targets:
// - the image under the overlay, when it is writable (this server holds the base blob's
//   lease): the blocks go through the format layer (a dynamic VHD allocates as usual),
//   then a snapshot of the base blob;
// - else ExportSpec::commit_to, a private page blob cloned from the base: made by a
//   server-side Copy Blob of the base snapshot the export serves, the base's URI and
//   snapshot kept in its metadata and checked by every later commit; leased while a
//   commit writes it; opened with the base's image format.
// One commit per export at a time; writes keep flowing during it. Started by the admin
// endpoint (POST /exports/NAME/snapshot), run on a worker executor, state in GET.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

namespace imagenbd::server {

struct Export;

// What GET /exports/NAME/snapshot answers.
struct CommitStatus {
  std::string state = "idle";  // idle, running, done, failed
  uint64_t blocks_total = 0;
  uint64_t blocks_done = 0;
  uint64_t bytes_done = 0;
  std::string snapshot;  // the blob snapshot's timestamp, once done
  std::string target;    // the blob (or file) written, az://ACCOUNT/CONTAINER/BLOB
  std::string error;     // why it failed
  std::string started;   // ISO 8601 UTC, "" before the first commit
  std::string finished;
  bool operator==(const CommitStatus&) const = default;
};

// Pure: one JSON object ("" strings as null), ending with a newline.
std::string commit_status_json(const CommitStatus& status);
// Pure: the fields of a commit_status_json() text (what the snapshot tool reads back);
// nullopt when it is not one.
std::optional<CommitStatus> parse_commit_status(std::string_view json);

// Why an export cannot be committed, as a message saying what to do, or "" when it can:
// no overlay, or no target (a read-only image that is not an Azure blob, or no
// --commit-to).
std::string commit_problem(const Export& e);

// The commits of one server's exports (the admin endpoint owns it).
class Commits {
 public:
  // Starts committing `e` on `executor`: returns the status (running) once the point in
  // time is taken (the overlay's begin_commit); the copy goes on in the background.
  // Throws std::invalid_argument with commit_problem()'s message, CommitBusy, or what
  // begin_commit threw.
  boost::asio::awaitable<CommitStatus> start(std::shared_ptr<const Export> e,
                                             boost::asio::any_io_executor executor);
  // The state of the export's last commit (idle when it never had one).
  CommitStatus status(const Export& e) const;

  struct Job;  // one commit; shared with its coroutine

 private:
  mutable std::mutex mutex_;
  // By export name; a job of an export that a reload replaced is not reported.
  std::map<std::string, std::shared_ptr<Job>> jobs_;
};

// A commit of this export is running already.
class CommitBusy : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace imagenbd::server
