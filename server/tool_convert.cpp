// `imagenbd convert`: see tool_convert.hpp. One implementation for every pair of formats:
// IN is opened as serve opens it (differencing images flattened through their parents),
// OUT is planned by create's plan_image and opened through the same format layers, and the
// copy only moves data through the BlockDevice interface. OUT is written under a temporary
// name next to it and renamed at the end, so a failed or interrupted conversion leaves no
// half-written image behind (and an existing OUT replaced with --force survives a failure).
#include "server/tool_convert.hpp"

#include <fcntl.h>
#include <getopt.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <optional>
#include <random>
#include <stdexcept>

#include <fmt/format.h>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "formats/vdi_layout.hpp"
#include "formats/vhd_layout.hpp"
#include "server/exports.hpp"
#include "server/local_parents.hpp"
#include "server/progress.hpp"
#include "server/tool_common.hpp"
#include "server/tool_create.hpp"

namespace imagenbd::server {

namespace {

namespace asio = boost::asio;
namespace vhd = formats::vhd;
namespace vdi = formats::vdi;
using formats::Format;

constexpr uint64_t mib = 1 << 20;
constexpr uint64_t azure_min_size = 20 * mib;  // managed-disk uploads (formats.md §1.12)
constexpr std::size_t zero_granule = 4096;     // qemu-img convert's default -S
constexpr uint64_t max_chunk = 4 * mib;        // whole VHD (2 MiB) and VDI (1 MiB) blocks
constexpr int copy_workers = 4;

[[noreturn]] void usage_error(const std::string& message) {
  throw std::invalid_argument(message);
}

uint64_t round_up(uint64_t v, uint64_t to) {
  return (v + to - 1) / to * to;
}

bool all_zero(const std::byte* p, std::size_t n) {
  return n == 0 || (p[0] == std::byte{0} && std::memcmp(p, p + 1, n - 1) == 0);
}

void check_subformat(Format format, const std::string& sub) {
  if (sub.empty()) return;
  if (format == Format::raw) usage_error("raw images have no subformat");
  if (format == Format::vhd && sub != "fixed" && sub != "dynamic") {
    usage_error(fmt::format("vhd subformat '{}' is not fixed or dynamic", sub));
  }
  if (format == Format::vdi && sub != "static" && sub != "dynamic") {
    usage_error(fmt::format("vdi subformat '{}' is not static or dynamic", sub));
  }
}

uint32_t parse_block_size(std::string_view text) {
  const uint64_t n = parse_size(text);
  if (n == 0 || n > UINT32_MAX) usage_error(fmt::format("invalid block size '{}'", text));
  return static_cast<uint32_t>(n);
}

// qemu-img's -o spelling: "subformat=fixed,force_size=on". A bare word is a subformat.
void parse_o_options(std::string_view list, ConvertCommand& cmd) {
  while (!list.empty()) {
    const std::size_t comma = list.find(',');
    const std::string_view item = list.substr(0, comma);
    list = comma == std::string_view::npos ? std::string_view{} : list.substr(comma + 1);
    const std::size_t eq = item.find('=');
    const std::string_view key = item.substr(0, eq);
    const std::string_view value = eq == std::string_view::npos ? "" : item.substr(eq + 1);
    if (eq == std::string_view::npos) {
      cmd.subformat = item;
    } else if (key == "subformat") {
      cmd.subformat = value;
    } else if (key == "block_size") {
      cmd.block_size = parse_block_size(value);
    } else if (key == "force_size") {
      // imagenbd always stores the exact size (formats.md §1.10): qemu's force_size=on.
      if (value != "on" && value != "off") {
        usage_error(fmt::format("-o force_size takes on or off, not '{}'", value));
      }
    } else {
      usage_error(
          fmt::format("unknown -o option '{}' (known: subformat, block_size, force_size)", key));
    }
  }
}

// What is being converted: the opened devices and the copy's shared state. Every coroutine
// runs on one single-threaded io_context, so plain fields need no locks.
struct Job {
  uint64_t offset;
  uint64_t length;
};

struct CopyState {
  backends::DevicePtr in, out;
  std::vector<Job> jobs;
  std::size_t next = 0;
  std::size_t chunk = 0;
  int running = 0;
  bool* stop = nullptr;  // set by a failure or by SIGINT/SIGTERM
  std::exception_ptr error;
  uint64_t total = 0;  // data bytes to read
  uint64_t done = 0;
  ConvertSummary* summary = nullptr;
  ProgressBar* progress = nullptr;
  asio::steady_timer* idle = nullptr;  // fires when the last worker ends
};

// Takes jobs until none are left: reads a chunk of IN's data and writes its non-zero parts.
asio::awaitable<void> copy_worker(CopyState& s) {
  std::vector<std::byte> buffer(s.chunk);
  try {
    while (!*s.stop && s.next < s.jobs.size()) {
      const Job job = s.jobs[s.next++];
      const auto data = std::span(buffer).first(job.length);
      co_await s.in->read(job.offset, data);
      for (const auto& [at, length] : nonzero_runs(data, zero_granule)) {
        co_await s.out->write(job.offset + at, data.subspan(at, length), {});
        s.summary->bytes_written += length;
      }
      s.summary->bytes_read += job.length;
      s.done += job.length;
      s.progress->update(s.done, s.total);
    }
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
    *s.stop = true;
  }
  // min() also completes a wait that starts later, unlike cancel().
  if (--s.running == 0) s.idle->expires_at(std::chrono::steady_clock::time_point::min());
}

// IN's data extents cut into chunk-aligned jobs; holes and zero extents are only counted.
asio::awaitable<void> plan_jobs(CopyState& s) {
  const uint64_t size = s.in->size();
  uint64_t offset = 0;
  while (offset < size && !*s.stop) {
    const auto extents = co_await s.in->extents(offset, size - offset);
    if (extents.empty()) {
      backends::fail(std::errc::io_error, "{}: {}: no extents at offset {}", s.in->name(),
                     s.in->describe(), offset);
    }
    for (const auto& e : extents) {
      const uint64_t length = std::min(e.length, size - offset);
      if (e.kind != backends::ExtentKind::data) {
        s.summary->bytes_holes += length;
      } else {
        for (uint64_t at = offset; at < offset + length;) {
          const uint64_t end = std::min(offset + length, (at / s.chunk + 1) * s.chunk);
          s.jobs.push_back({at, end - at});
          at = end;
        }
        s.total += length;
      }
      offset += length;
      if (offset >= size) break;
    }
  }
}

// IN's UUID, read with the formats' codecs once open_image has accepted IN; nothing for raw
// images (and nil UUIDs are not kept). A VDI's modify UUID is not kept: the first write
// into OUT changes it anyway, as VirtualBox does.
asio::awaitable<std::optional<formats::Uuid>> read_ids(backends::BlockDevice& file, Format format) {
  formats::Uuid uuid;
  if (format == Format::vhd) {
    std::array<std::byte, vhd::footer_size> bytes{};
    co_await file.read(file.size() - vhd::footer_size, bytes);
    auto footer = vhd::parse_footer(bytes);
    if (!footer.ok()) {  // open_vhd accepted the image: the copy at 0 is the one it used
      co_await file.read(0, bytes);
      footer = vhd::parse_footer(bytes);
    }
    if (!footer.ok()) co_return std::nullopt;
    uuid = footer.value().unique_id;
  } else if (format == Format::vdi) {
    std::array<std::byte, vdi::header_bytes> bytes{};
    co_await file.read(0, bytes);
    uuid = vdi::decode_header(bytes).uuid_create;
  }
  if (uuid.is_nil()) co_return std::nullopt;
  co_return uuid;
}

struct Conversion {
  const ConvertCommand* cmd = nullptr;
  std::string temp;  // OUT's temporary name
  bool temp_created = false;
  ConvertSummary summary;
  ProgressBar* progress = nullptr;
  bool stop = false;
  bool interrupted = false;
};

asio::awaitable<void> convert_async(Conversion& c) {
  const ConvertCommand& cmd = *c.cmd;
  const auto started = std::chrono::steady_clock::now();
  auto in_file = backends::open_file(cmd.in, {.read_only = true});
  const formats::ParentFinder finder = local_parent_finder();
  auto in = co_await formats::open_image(
      in_file, {.format = cmd.in_format, .read_only = true, .parents = {.finder = &finder}});
  const Format in_format = formats::parse_format(in->name());
  ConvertSummary& summary = c.summary;
  summary.input = cmd.in;
  summary.output = cmd.out;
  summary.input_format = formats::format_name(in_format);
  summary.output_format = formats::format_name(cmd.out_format);
  summary.input_size = in->size();

  const OutputSize out_size = convert_output_size(in->size(), cmd.out_format, cmd.azure);
  if (!cmd.quiet) {
    for (const auto& note : out_size.notes) {
      std::fprintf(stderr, "imagenbd: convert: %s: %s\n", cmd.in.c_str(), note.c_str());
    }
  }
  // Identity survives a change of format: the image is the same disk (formats.md §2.3;
  // the codecs put each UUID in its format's byte order).
  CreateIds ids{.uuid = random_uuid(),
                .modify_uuid = random_uuid(),
                .vhd_timestamp = static_cast<uint32_t>(std::time(nullptr) - 946684800)};
  if (const auto kept = co_await read_ids(*in_file, in_format)) ids.uuid = *kept;
  CreateRequest request;
  request.format = cmd.out_format;
  request.subformat = cmd.subformat;
  request.block_size = cmd.block_size;
  request.size = out_size.size;
  request.path = cmd.out;
  const CreatePlan plan = plan_image(request, ids);
  if (!cmd.quiet) {
    for (const auto& w : plan.warnings) std::fprintf(stderr, "imagenbd: warning: %s\n", w.c_str());
  }
  summary.output_subformat = plan.subformat;
  if (cmd.out_format != Format::raw) summary.uuid = ids.uuid.to_string();
  try {
    write_plan(c.temp, plan, false);
  } catch (const backends::Error& e) {
    backends::fail(e.errc(), "cannot write {}: {}", cmd.out, e.what());
  }
  c.temp_created = true;
  auto out_file = backends::open_file(c.temp, {.read_only = false});
  auto out = co_await formats::open_image(out_file, {.format = cmd.out_format, .read_only = false});
  summary.virtual_size = out->size();
  if (out->size() < in->size()) {  // convert_output_size never shrinks; keep it that way
    backends::fail(std::errc::no_space_on_device, "{}: {} bytes are fewer than {}'s {}", cmd.out,
                   out->size(), cmd.in, in->size());
  }

  asio::steady_timer idle(co_await asio::this_coro::executor,
                          std::chrono::steady_clock::time_point::max());
  CopyState s;
  s.in = in;
  s.out = out;
  s.chunk = static_cast<std::size_t>(
      std::min({max_chunk, uint64_t{in->caps().block_max}, uint64_t{out->caps().block_max}}));
  s.stop = &c.stop;
  s.summary = &summary;
  s.progress = c.progress;
  s.idle = &idle;
  co_await plan_jobs(s);
  c.progress->update(0, s.total);
  if (!s.jobs.empty()) {
    const auto executor = co_await asio::this_coro::executor;
    s.running = static_cast<int>(std::min<std::size_t>(copy_workers, s.jobs.size()));
    for (int i = s.running; i > 0; --i) asio::co_spawn(executor, copy_worker(s), asio::detached);
    boost::system::error_code ec;
    co_await idle.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
  if (s.error) std::rethrow_exception(s.error);
  if (c.interrupted) {
    backends::fail(std::errc::interrupted, "convert {} to {}: interrupted", cmd.in, cmd.out);
  }
  co_await out->flush();
  c.progress->finish(s.total);
  summary.bytes_zero = summary.bytes_read - summary.bytes_written;
  summary.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

// A name next to OUT for writing it: ".NAME.imagenbd-XXXXXXXX".
std::string temp_name(const std::string& out) {
  const std::filesystem::path p(out);
  std::random_device random;
  return (p.parent_path() / fmt::format(".{}.imagenbd-{:08x}", p.filename().string(), random()))
      .string();
}

// Puts the finished image in place; without --force an OUT that appeared meanwhile wins.
void move_into_place(const std::string& temp, const std::string& out, bool force) {
  int rc = 0;
  if (force) {
    rc = ::rename(temp.c_str(), out.c_str());
  } else {
    rc = ::renameat2(AT_FDCWD, temp.c_str(), AT_FDCWD, out.c_str(), RENAME_NOREPLACE);
    if (rc != 0 && errno == EINVAL) {  // no RENAME_NOREPLACE here: link() refuses too
      rc = ::link(temp.c_str(), out.c_str());
      if (rc == 0) ::unlink(temp.c_str());
    }
  }
  if (rc != 0) {
    const int error = errno;
    if (error == EEXIST) {
      backends::fail(std::errc::file_exists, "{}: the file exists (use --force to overwrite it)",
                     out);
    }
    backends::fail_errno(error, fmt::format("rename {} to {}", temp, out));
  }
  // The rename is durable once the directory is.
  const std::string dir = std::filesystem::path(out).parent_path().string();
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

int run_convert(const ConvertCommand& cmd) {
  struct stat in_st {
  }, out_st{};
  if (::stat(cmd.in.c_str(), &in_st) != 0) backends::fail_errno(errno, cmd.in);
  if (::stat(cmd.out.c_str(), &out_st) == 0) {
    if (out_st.st_dev == in_st.st_dev && out_st.st_ino == in_st.st_ino) {
      backends::fail(std::errc::invalid_argument, "{} and {} are the same file", cmd.in, cmd.out);
    }
    if (!S_ISREG(out_st.st_mode)) {
      backends::fail(std::errc::invalid_argument,
                     "{}: not a regular file (convert writes new image files only)", cmd.out);
    }
    if (!cmd.force) {
      backends::fail(std::errc::file_exists, "{}: the file exists (use --force to overwrite it)",
                     cmd.out);
    }
  }

  Conversion c;
  c.cmd = &cmd;
  c.temp = temp_name(cmd.out);
  ProgressBar progress(
      progress_wanted(cmd.progress, ::isatty(STDERR_FILENO) == 1, cmd.quiet, cmd.json));
  c.progress = &progress;

  asio::io_context ctx(1);
  asio::signal_set signals(ctx, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code& ec, int) {
    if (ec) return;
    c.stop = true;
    c.interrupted = true;
  });
  std::exception_ptr error;
  asio::co_spawn(ctx, convert_async(c), [&](std::exception_ptr ep) {
    error = ep;
    signals.cancel();
  });
  ctx.run();

  if (!error) {
    try {
      move_into_place(c.temp, cmd.out, cmd.force);
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) {
    progress.abandon();
    if (c.temp_created) ::unlink(c.temp.c_str());
    std::rethrow_exception(error);
  }
  struct stat st {};
  if (::stat(cmd.out.c_str(), &st) == 0) c.summary.file_size = static_cast<uint64_t>(st.st_size);
  if (cmd.json) std::fputs(convert_json(c.summary).c_str(), stdout);
  return 0;
}

}  // namespace

ConvertCommand parse_convert(int argc, char** argv) {
  enum : int { opt_json = 1000, opt_force, opt_block_size, opt_azure, opt_subformat };
  static const option long_options[] = {
      {"format", required_argument, nullptr, 'f'},
      {"output-format", required_argument, nullptr, 'O'},
      {"options", required_argument, nullptr, 'o'},
      {"subformat", required_argument, nullptr, opt_subformat},
      {"block-size", required_argument, nullptr, opt_block_size},
      {"azure", no_argument, nullptr, opt_azure},
      {"progress", no_argument, nullptr, 'p'},
      {"quiet", no_argument, nullptr, 'q'},
      {"force", no_argument, nullptr, opt_force},
      {"json", no_argument, nullptr, opt_json},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0},
  };
  ConvertCommand cmd;
  bool have_out_format = false;
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "f:O:o:pqh", long_options, nullptr)) != -1) {
    switch (c) {
      case 'f':
        cmd.in_format = formats::parse_format(optarg);
        break;
      case 'O':
        cmd.out_format = formats::parse_format(optarg);
        if (cmd.out_format == Format::automatic) {
          usage_error("-O needs an output format: raw, vhd (or vpc) or vdi");
        }
        have_out_format = true;
        break;
      case 'o':
        parse_o_options(optarg, cmd);
        break;
      case opt_subformat:
        cmd.subformat = optarg;
        break;
      case opt_block_size:
        cmd.block_size = parse_block_size(optarg);
        break;
      case opt_azure:
        cmd.azure = true;
        break;
      case 'p':
        cmd.progress = true;
        break;
      case 'q':
        cmd.quiet = true;
        break;
      case opt_force:
        cmd.force = true;
        break;
      case opt_json:
        cmd.json = true;
        break;
      case 'h':
        cmd.help = true;
        return cmd;
      default:
        usage_error(fmt::format("unknown or incomplete option '{}'", argv[optind - 1]));
    }
  }
  if (cmd.azure) {
    if (have_out_format && cmd.out_format != Format::vhd) {
      usage_error("--azure makes a fixed VHD: -O must be vhd (or vpc)");
    }
    if (!cmd.subformat.empty() && cmd.subformat != "fixed") {
      usage_error("--azure makes a fixed VHD: --subformat must be fixed");
    }
    if (cmd.block_size) usage_error("--azure makes a fixed VHD, which has no block size");
    cmd.out_format = Format::vhd;
    cmd.subformat = "fixed";
    have_out_format = true;
  }
  if (!have_out_format) usage_error("convert needs an output format: -O raw, vhd or vdi");
  check_subformat(cmd.out_format, cmd.subformat);
  if (cmd.block_size && cmd.out_format == Format::raw) usage_error("raw images have no block size");
  if (argc - optind != 2) usage_error("expected IN and OUT");
  cmd.in = argv[optind];
  cmd.out = argv[optind + 1];
  if (cmd.in == cmd.out) usage_error(fmt::format("IN and OUT are the same file ({})", cmd.in));
  return cmd;
}

OutputSize convert_output_size(uint64_t in_size, Format out_format, bool azure) {
  OutputSize r{.size = in_size, .notes = {}};
  if (out_format == Format::raw || in_size == 0) return r;
  if (azure) {
    r.size = round_up(in_size, mib);
    if (r.size != in_size) {
      r.notes.push_back(fmt::format(
          "virtual size {} ({}) is not a whole MiB, as Azure requires: rounded up to {} ({}); "
          "the {} bytes added read as zeroes",
          in_size, human_size(in_size), r.size, human_size(r.size), r.size - in_size));
    }
    if (r.size < azure_min_size) {
      r.notes.push_back(
          fmt::format("{} is below 20 MiB, the smallest managed disk Azure accepts (page blobs "
                      "take it)",
                      human_size(r.size)));
    }
    return r;
  }
  r.size = round_up(in_size, 512);
  if (r.size != in_size) {
    r.notes.push_back(fmt::format(
        "virtual size {} is not a multiple of 512: rounded up to {} for {}; the {} bytes "
        "added read as zeroes",
        in_size, r.size, formats::format_name(out_format), r.size - in_size));
  }
  return r;
}

std::vector<std::pair<std::size_t, std::size_t>> nonzero_runs(std::span<const std::byte> data,
                                                              std::size_t granule) {
  std::vector<std::pair<std::size_t, std::size_t>> runs;
  for (std::size_t at = 0; at < data.size(); at += granule) {
    const std::size_t n = std::min(granule, data.size() - at);
    if (all_zero(data.data() + at, n)) continue;
    if (!runs.empty() && runs.back().first + runs.back().second == at) {
      runs.back().second += n;
    } else {
      runs.emplace_back(at, n);
    }
  }
  return runs;
}

std::string convert_json(const ConvertSummary& s) {
  std::string out = "{\n";
  auto str = [&](std::string_view key, std::string_view value) {
    out += fmt::format("  {}: {},\n", json_string(key), json_string(value));
  };
  auto num = [&](std::string_view key, uint64_t value) {
    out += fmt::format("  {}: {},\n", json_string(key), value);
  };
  str("input", s.input);
  str("input_format", s.input_format);
  num("input_size", s.input_size);
  str("output", s.output);
  str("output_format", s.output_format);
  str("output_subformat", s.output_subformat);
  num("virtual_size", s.virtual_size);
  num("file_size", s.file_size);
  str("uuid", s.uuid);
  num("bytes_read", s.bytes_read);
  num("bytes_written", s.bytes_written);
  num("bytes_zero", s.bytes_zero);
  num("bytes_holes", s.bytes_holes);
  out += fmt::format("  \"seconds\": {:.3f}\n}}\n", s.seconds);
  return out;
}

const char* convert_help() {
  return R"(Usage: imagenbd convert [-f FMT] -O FMT [--subformat S] [--block-size N] [--azure]
                        [-p] [-q] [--json] [--force] IN OUT

Copy the virtual disk IN into a new image OUT: raw, VHD and VDI in every direction.
IN is opened as 'imagenbd serve' opens it (its format probed unless -f names it;
a differencing image is read through its parents, so OUT is flat). Only data is
copied: holes and zero extents of IN, and 4 KiB pieces that read as zeroes, are
skipped, so a sparse IN gives a sparse OUT of any subformat.

OUT is made as 'imagenbd create' makes it (see 'imagenbd create --help': creator
app "inbd", a geometry every reader agrees on, qemu's VDI layout) with IN's virtual
size, rounded up to a multiple of 512 for VHD and VDI (with a message). A VHD or VDI
OUT keeps IN's UUID when IN is a VHD or VDI (the same disk in another format;
VDI stores it in GUID byte order); raw inputs give a random one.

--azure makes what Azure takes for a VM disk or a page blob (the one-command form
of 'dd' + 'VBoxManage convertfromraw --format VHD --variant Fixed'): a fixed VHD
whose virtual size is a whole number of MiB, so OUT is N MiB + 512 bytes. A size
that is not a whole MiB is rounded up, with a message saying from what to what.

Options:
  -f, --format=FMT         IN's format: raw, vhd (or vpc), vdi; default: probe
  -O, --output-format=FMT  OUT's format: raw, vhd (or vpc), vdi (required unless --azure)
      --subformat=S        vhd: dynamic (default) or fixed; vdi: dynamic (default) or static
      --block-size=N       dynamic VHD / VDI block size (default 2M / 1M)
  -o, --options=LIST       qemu-img's spelling: subformat=S, block_size=N, force_size=on
                           (imagenbd always stores the exact size)
      --azure              fixed VHD, whole MiB (implies -O vhd --subformat fixed)
  -p, --progress           show a progress bar on stderr (default when stderr is a
                           terminal; never with -q or --json)
  -q, --quiet              no progress and no notes; errors only
      --json               print a summary: formats, sizes, bytes read, written, skipped
                           as zeroes and as holes, seconds
      --force              replace OUT if it exists (refused otherwise)
  -h, --help               this text

OUT is written under a temporary name next to it and renamed when complete and
flushed: after an error or SIGINT nothing is left behind, and an OUT replaced with
--force stays as it was. IN and OUT must differ. Exit status: 0 on success, 1 on
errors, 2 on usage errors.
)";
}

int tool_convert(int argc, char** argv) {
  ConvertCommand cmd;
  try {
    cmd = parse_convert(argc, argv);
  } catch (const std::invalid_argument& e) {
    return usage_error("convert", e.what(), 2);
  }
  if (cmd.help) {
    std::fputs(convert_help(), stdout);
    return 0;
  }
  try {
    return run_convert(cmd);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", e.what());
    return 1;
  }
}

}  // namespace imagenbd::server
