// What the blob tools (upload, download, ls, rm, snapshot, lease, container) share: their
// option structs and parsers, the zero-sector split of an upload, the "would Azure attach
// this VHD" check, the --json summaries, and the hints added to the service's errors. All
// pure (no I/O) except open_blob_client and explain_failure, so the unit tests link without
// the HTTP stack.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "backends/azure_blob.hpp"

namespace imagenbd::server {

inline constexpr uint64_t max_put_page = 4u << 20;  // Put Page body limit (formats.md §3.8)
inline constexpr std::size_t page_size = 512;

// `imagenbd upload [OPTIONS] FILE URI`.
struct UploadCommand {
  std::string file, uri;
  uint64_t block_size = max_put_page;  // --block-size: multiple of 512, at most 4 MiB
  bool block_blob = false;             // --blob-type=block
  std::size_t parallel = 8;            // --parallel: requests in flight
  bool overwrite = false;
  bool progress = false;  // -p
  bool json = false;
  bool help = false;
};

// `imagenbd download [OPTIONS] URI FILE`.
struct DownloadCommand {
  std::string uri, file;
  std::string snapshot;  // --snapshot=T
  std::size_t parallel = 8;
  bool overwrite = false;
  bool progress = false;
  bool json = false;
  bool help = false;
};

// Pure: argv[0] is the command name. @throws std::invalid_argument with the usage message.
UploadCommand parse_upload(int argc, char** argv);
DownloadCommand parse_download(int argc, char** argv);

// Pure: "--parallel" values 1..256. @throws std::invalid_argument.
std::size_t parse_parallel(std::string_view text);
// Pure: a Put Page / Put Block size: a multiple of 512, 512..4 MiB, with K/M suffixes.
// @throws std::invalid_argument.
uint64_t parse_block_size(std::string_view text);
// Pure: a whole number in [low, high]; `what` names the option in the message.
// @throws std::invalid_argument.
int parse_int_in(std::string_view text, int low, int high, std::string_view what);

// Pure: the runs (offset, length) of `data` made of 512-byte sectors that are not all
// zeroes, adjacent ones merged, each at most max_run bytes (a multiple of 512). A short
// last sector counts as a sector. These are the Put Pages of one piece of an upload.
struct SectorRun {
  std::size_t offset;
  std::size_t length;
  bool operator==(const SectorRun&) const = default;
};
std::vector<SectorRun> nonzero_sector_runs(std::span<const std::byte> data, std::size_t max_run);

// Pure: why Azure would not attach the file as a VM disk, or nullopt when it would or when
// the file is no VHD at all. `tail` is the file's last 512 bytes, `head` its first 512 (a
// dynamic VHD whose end footer is damaged is still recognised by the copy at 0).
// Azure wants a fixed VHD whose virtual size is a whole MiB and whose file is exactly
// that size plus the 512-byte footer (formats.md §1.12).
std::optional<std::string> azure_vhd_problem(std::span<const std::byte> head,
                                             std::span<const std::byte> tail, uint64_t file_size);

// Pure: the message for a page blob of a size that is not a multiple of 512.
std::string unaligned_size_message(const std::string& file, uint64_t size);

// What upload and download did, for --json (cli.md).
struct UploadSummary {
  std::string uri;
  std::string blob_type;  // "page" or "block"
  uint64_t size = 0;
  uint64_t uploaded_bytes = 0;
  uint64_t skipped_bytes = 0;
  uint64_t requests = 0;  // Put Page / Put Block calls
  double seconds = 0;
};
struct DownloadSummary {
  std::string uri;
  std::string blob_type;
  uint64_t size = 0;
  uint64_t downloaded_bytes = 0;
  uint64_t hole_bytes = 0;
  uint64_t requests = 0;  // ranged Get Blob calls
  double seconds = 0;
};
// Pure: one JSON object each, ending with a newline.
std::string upload_json(const UploadSummary& s);
std::string download_json(const DownloadSummary& s);

// Pure: "PageBlob" -> "page", "BlockBlob" -> "block", "AppendBlob" -> "append"; others as
// they are.
std::string short_blob_type(std::string_view service_type);

// Pure: the Put Block id of block `index`: base64 of a fixed-width text, so all ids of a
// blob have the same length as the service requires.
std::string block_id(uint64_t index);

// Pure: an az:// URI ending in "?snapshot=T" with T a snapshot timestamp
// (2026-11-21T04:55:55.2300000Z) split into the URI without it and T, as cli.md promises;
// anything else (other URI forms, which parse_blob_uri splits itself, or a blob name that
// merely contains '?') comes back unchanged with an empty T. parse_blob_uri takes az://
// URIs literally, so the tools strip the suffix before calling it.
std::pair<std::string, std::string> split_az_snapshot(std::string_view uri);

// The client for the URI (credentials from the environment or the URI's SAS), snapshot
// set when `snapshot` is not empty. @throws backends::Error naming what is wrong.
backends::azure::BlobClient open_blob_client(const std::string& uri,
                                             const std::string& snapshot = {});

// The message for a failed command: the error's own text plus, for the service's usual
// refusals, what to do (--overwrite, --snapshots, --lease-id, credentials). Never contains
// a secret (BlobError texts use display()).
std::string explain_failure(const std::exception& e);

}  // namespace imagenbd::server
