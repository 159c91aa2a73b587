#include "server/blob_tool_common.hpp"

#include <getopt.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <span>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

#include "formats/vhd_layout.hpp"
#include "server/exports.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

namespace vhd = formats::vhd;
constexpr uint64_t mib = 1 << 20;

[[noreturn]] void usage(const std::string& message) {
  throw std::invalid_argument(message);
}

bool all_zero(const std::byte* p, std::size_t n) {
  return n == 0 || (p[0] == std::byte{0} && std::memcmp(p, p + 1, n - 1) == 0);
}

std::string base64(std::string_view in) {
  static constexpr char table[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const uint32_t v =
        (uint32_t(uint8_t(in[i])) << 16) | (uint32_t(uint8_t(in[i + 1])) << 8) | uint8_t(in[i + 2]);
    out += table[v >> 18];
    out += table[(v >> 12) & 63];
    out += table[(v >> 6) & 63];
    out += table[v & 63];
  }
  if (i < in.size()) {
    uint32_t v = uint32_t(uint8_t(in[i])) << 16;
    if (i + 1 < in.size()) v |= uint32_t(uint8_t(in[i + 1])) << 8;
    out += table[v >> 18];
    out += table[(v >> 12) & 63];
    out += i + 1 < in.size() ? table[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

}  // namespace

std::size_t parse_parallel(std::string_view text) {
  return static_cast<std::size_t>(parse_int_in(text, 1, 256, "--parallel"));
}

uint64_t parse_block_size(std::string_view text) {
  uint64_t n = 0;
  try {
    n = parse_size(text);
  } catch (const std::invalid_argument& e) {
    usage(fmt::format("--block-size: {}", e.what()));
  }
  if (n == 0 || n % page_size != 0 || n > max_put_page) {
    usage(
        fmt::format("--block-size {} is not a multiple of 512 between 512 and 4M (a Put Page "
                    "carries at most 4 MiB of whole pages)",
                    text));
  }
  return n;
}

int parse_int_in(std::string_view text, int low, int high, std::string_view what) {
  int value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value < low || value > high) {
    usage(fmt::format("{} '{}' is not a whole number from {} to {}", what, text, low, high));
  }
  return value;
}

namespace {

// Upload's and download's shared options; each command's own have ids from 1000.
enum : int { opt_parallel = 2000, opt_overwrite, opt_json };

// getopt over the command's own options and the shared ones (--parallel, --overwrite,
// -p/--progress, --json, -h/--help), which it stores in cmd; an own option goes to
// on_own. Stops at --help (cmd.help); otherwise argv[optind...] are the operands.
template <class Command, class OnOwn>
void parse_transfer_options(int argc, char** argv, std::span<const option> own_options,
                            Command& cmd, OnOwn on_own) {
  std::vector<option> long_options(own_options.begin(), own_options.end());
  long_options.insert(long_options.end(),
                      {
                          {"parallel", required_argument, nullptr, opt_parallel},
                          {"overwrite", no_argument, nullptr, opt_overwrite},
                          {"progress", no_argument, nullptr, 'p'},
                          {"json", no_argument, nullptr, opt_json},
                          {"help", no_argument, nullptr, 'h'},
                          {nullptr, 0, nullptr, 0},
                      });
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "ph", long_options.data(), nullptr)) != -1) {
    switch (c) {
      case opt_parallel:
        cmd.parallel = parse_parallel(optarg);
        break;
      case opt_overwrite:
        cmd.overwrite = true;
        break;
      case 'p':
        cmd.progress = true;
        break;
      case opt_json:
        cmd.json = true;
        break;
      case 'h':
        cmd.help = true;
        return;
      case '?':
      case ':':
        usage(fmt::format("unknown or incomplete option '{}'", argv[optind - 1]));
      default:
        on_own(c);
    }
  }
}

}  // namespace

UploadCommand parse_upload(int argc, char** argv) {
  enum : int { opt_block_size = 1000, opt_blob_type };
  static const option own_options[] = {
      {"block-size", required_argument, nullptr, opt_block_size},
      {"blob-type", required_argument, nullptr, opt_blob_type},
  };
  UploadCommand cmd;
  parse_transfer_options(argc, argv, own_options, cmd, [&cmd](int c) {
    if (c == opt_block_size) {
      cmd.block_size = parse_block_size(optarg);
    } else if (std::strcmp(optarg, "page") == 0) {  // opt_blob_type
      cmd.block_blob = false;
    } else if (std::strcmp(optarg, "block") == 0) {
      cmd.block_blob = true;
    } else {
      usage(fmt::format("--blob-type '{}' is not page or block", optarg));
    }
  });
  if (cmd.help) return cmd;
  if (argc - optind != 2) usage("expected FILE and URI");
  cmd.file = argv[optind];
  cmd.uri = argv[optind + 1];
  return cmd;
}

DownloadCommand parse_download(int argc, char** argv) {
  enum : int { opt_snapshot = 1000 };
  static const option own_options[] = {
      {"snapshot", required_argument, nullptr, opt_snapshot},
  };
  DownloadCommand cmd;
  parse_transfer_options(argc, argv, own_options, cmd, [&cmd](int) {  // only opt_snapshot
    if (*optarg == '\0') usage("--snapshot needs the snapshot's timestamp");
    cmd.snapshot = optarg;
  });
  if (cmd.help) return cmd;
  if (argc - optind != 2) usage("expected URI and FILE");
  cmd.uri = argv[optind];
  cmd.file = argv[optind + 1];
  return cmd;
}

std::vector<SectorRun> nonzero_sector_runs(std::span<const std::byte> data, std::size_t max_run) {
  std::vector<SectorRun> runs;
  for (std::size_t at = 0; at < data.size(); at += page_size) {
    const std::size_t n = std::min(page_size, data.size() - at);
    if (all_zero(data.data() + at, n)) continue;
    if (!runs.empty() && runs.back().offset + runs.back().length == at &&
        runs.back().length + n <= max_run) {
      runs.back().length += n;
    } else {
      runs.push_back({at, n});
    }
  }
  return runs;
}

std::optional<std::string> azure_vhd_problem(std::span<const std::byte> head,
                                             std::span<const std::byte> tail, uint64_t file_size) {
  if (tail.size() < vhd::footer_size) return std::nullopt;
  auto footer = vhd::parse_footer(tail.first(vhd::footer_size));
  bool at_end = true;
  if (!footer.ok()) {
    // A dynamic VHD keeps a copy of the footer at 0; a raw image that happens to start with
    // one is not worth a warning, but a dynamic VHD with a torn end footer is.
    if (head.size() < vhd::footer_size) return std::nullopt;
    footer = vhd::parse_footer(head.first(vhd::footer_size));
    if (!footer.ok()) return std::nullopt;
    if (footer.value().disk_type == static_cast<uint32_t>(vhd::DiskType::fixed)) {
      return std::nullopt;
    }
    at_end = false;
  }
  const vhd::Footer& f = footer.value();
  if (f.disk_type != static_cast<uint32_t>(vhd::DiskType::fixed)) {
    return fmt::format("a {} VHD: Azure attaches fixed VHDs only",
                       vhd::disk_type_name(f.disk_type));
  }
  if (f.current_size % mib != 0) {
    return fmt::format("virtual size {} is not a whole MiB", f.current_size);
  }
  if (at_end && f.current_size + vhd::footer_size != file_size) {
    return fmt::format("the file is {} bytes, not the virtual size {} plus the 512-byte footer",
                       file_size, f.current_size);
  }
  return std::nullopt;
}

std::string unaligned_size_message(const std::string& file, uint64_t size) {
  return fmt::format(
      "{}: {} bytes is not a multiple of 512: a page blob holds whole 512-byte pages (for a VHD, "
      "'imagenbd convert --azure IN OUT' makes one Azure accepts; for raw, pad it with truncate "
      "-s)",
      file, size);
}

std::string upload_json(const UploadSummary& s) {
  return fmt::format(
      "{{\"uri\": {}, \"blob_type\": {}, \"size\": {}, \"uploaded_bytes\": {}, "
      "\"skipped_bytes\": {}, \"requests\": {}, \"seconds\": {:.3f}}}\n",
      json_string(s.uri), json_string(s.blob_type), s.size, s.uploaded_bytes, s.skipped_bytes,
      s.requests, s.seconds);
}

std::string download_json(const DownloadSummary& s) {
  return fmt::format(
      "{{\"uri\": {}, \"blob_type\": {}, \"size\": {}, \"downloaded_bytes\": {}, "
      "\"hole_bytes\": {}, \"requests\": {}, \"seconds\": {:.3f}}}\n",
      json_string(s.uri), json_string(s.blob_type), s.size, s.downloaded_bytes, s.hole_bytes,
      s.requests, s.seconds);
}

std::string short_blob_type(std::string_view service_type) {
  if (service_type == "PageBlob") return "page";
  if (service_type == "BlockBlob") return "block";
  if (service_type == "AppendBlob") return "append";
  return std::string(service_type);
}

namespace {

// YYYY-MM-DDThh:mm:ss[.fraction]Z, the form of x-ms-snapshot.
bool is_snapshot_timestamp(std::string_view t) {
  static constexpr std::string_view shape = "dddd-dd-ddTdd:dd:dd";
  if (t.size() < shape.size() + 1 || t.back() != 'Z') return false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const bool ok = shape[i] == 'd' ? (t[i] >= '0' && t[i] <= '9') : t[i] == shape[i];
    if (!ok) return false;
  }
  const std::string_view rest = t.substr(shape.size(), t.size() - shape.size() - 1);
  if (rest.empty()) return true;
  if (rest.size() < 2 || rest[0] != '.') return false;
  return std::all_of(rest.begin() + 1, rest.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

std::pair<std::string, std::string> split_az_snapshot(std::string_view uri) {
  static constexpr std::string_view key = "?snapshot=";
  const std::size_t at = uri.rfind(key);
  if (uri.size() < 5 || uri.substr(0, 5) != "az://" || at == std::string_view::npos) {
    return {std::string(uri), {}};
  }
  const std::string_view timestamp = uri.substr(at + key.size());
  if (!is_snapshot_timestamp(timestamp)) return {std::string(uri), {}};
  return {std::string(uri.substr(0, at)), std::string(timestamp)};
}

std::string block_id(uint64_t index) {
  return base64(fmt::format("inbd{:012}", index));
}

std::string explain_failure(const std::exception& e) {
  std::string text = e.what();
  const auto* blob = dynamic_cast<const backends::azure::BlobError*>(&e);
  if (!blob) return text;
  const std::string& code = blob->service_code();
  if (code == "LeaseIdMissing") {
    text +=
        " (the blob is leased, e.g. by a writable 'imagenbd serve': stop it, or break the "
        "lease with 'imagenbd lease break URI'; rm takes the holder's --lease-id=ID)";
  } else if (code == "LeaseIdMismatchWithBlobOperation" ||
             code == "LeaseIdMismatchWithLeaseOperation") {
    text += " (the lease id does not match the blob's lease)";
  } else if (code == "LeaseAlreadyPresent") {
    text += " (another lease holds the blob: 'imagenbd lease break URI' ends it)";
  } else if (code == "SnapshotsPresent") {
    text += " (use --snapshots to delete the blob with its snapshots)";
  } else if (code == "ContainerNotFound") {
    text += " (no such container: 'imagenbd container create az://ACCOUNT/CONTAINER' makes one)";
  } else if (code == "ContainerAlreadyExists") {
    text += " (nothing to do)";
  } else if (blob->status() == 403) {
    text +=
        " (check AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with "
        "AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, or the SAS in the URI and its "
        "permissions)";
  }
  return text;
}

}  // namespace imagenbd::server
