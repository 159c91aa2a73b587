// `imagenbd resize`: see tool_resize.hpp. The image is opened as serve opens it first (a
// damaged image is refused with serve's message), closed, resized through its file, and
// opened again to prove the result.
#include "server/tool_resize.hpp"

#include <getopt.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "backends/log.hpp"
#include "formats/open_image.hpp"
#include "formats/vdi_resize.hpp"
#include "formats/vhd_resize.hpp"
#include "server/exports.hpp"
#include "server/local_parents.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

namespace asio = boost::asio;

struct Request {
  std::string path;
  formats::Format format = formats::Format::automatic;
  std::string size_text;
  bool shrink = false;
};

struct Outcome {
  std::string format;
  formats::ResizeResult result;
};

formats::Uuid random_uuid() {
  std::random_device random;
  std::array<uint8_t, 16> bytes{};
  for (std::size_t i = 0; i < bytes.size(); i += 4) {
    const uint32_t r = random();
    for (std::size_t k = 0; k < 4; ++k) bytes[i + k] = static_cast<uint8_t>(r >> (8 * k));
  }
  return formats::Uuid::random_v4(bytes);
}

asio::awaitable<Outcome> resize(Request r) {
  backends::DevicePtr file = backends::open_file(r.path, {});
  const formats::ParentFinder finder = local_parent_finder();
  std::string format;
  uint64_t current = 0;
  {
    auto image = co_await formats::open_image(
        file, {.format = r.format, .read_only = true, .parents = {.finder = &finder}});
    format = std::string(image->name());
    current = image->size();
  }
  const uint64_t new_size = parse_new_size(r.size_text, current);
  Outcome out;
  out.format = format;
  formats::ResizeOptions options{
      .new_size = new_size, .shrink = r.shrink, .modify_uuid = random_uuid()};
  if (format == "vhd") {
    out.result = co_await formats::resize_vhd(*file, options);
  } else if (format == "vdi") {
    out.result = co_await formats::resize_vdi(*file, options);
  } else {
    out.result.old_size = current;
    out.result.new_size = new_size;
    if (new_size < current && !r.shrink) {
      backends::fail(std::errc::invalid_argument,
                     "raw: {}: {} bytes is smaller than the current {} bytes; shrinking cuts the "
                     "disk and needs --shrink",
                     r.path, new_size, current);
    }
    if (new_size != current) {
      co_await file->resize(new_size);
      co_await file->flush();
    }
    if (new_size < current) {
      out.result.warnings.push_back(fmt::format(
          "the {} bytes past the new end ({} bytes) are cut off", current - new_size, new_size));
    }
  }
  // The result must open as serve opens it, at the new size.
  auto image = co_await formats::open_image(
      file,
      {.format = formats::parse_format(format), .read_only = true, .parents = {.finder = &finder}});
  if (image->size() != new_size) {
    backends::fail(std::errc::io_error,
                   "{}: {}: resized, but the image now opens with {} bytes instead of {}", format,
                   r.path, image->size(), new_size);
  }
  co_return out;
}

}  // namespace

uint64_t parse_new_size(std::string_view text, uint64_t current) {
  if (text.starts_with('+')) {
    const uint64_t delta = parse_size(text.substr(1));
    if (delta > UINT64_MAX - current) {
      throw std::invalid_argument(fmt::format("size '{}' is too large", text));
    }
    return current + delta;
  }
  if (text.starts_with('-')) {
    const uint64_t delta = parse_size(text.substr(1));
    if (delta > current) {
      throw std::invalid_argument(fmt::format(
          "size '{}' would make the image smaller than 0 bytes (it has {})", text, current));
    }
    return current - delta;
  }
  return parse_size(text);
}

const char* resize_help() {
  return R"(Usage: imagenbd resize [-f FMT] [--shrink] [--json] IMAGE [+|-]SIZE

Change the virtual size of a closed image to SIZE bytes, or by +SIZE / -SIZE (suffixes
K, M, G, T are powers of 1024; VHD and VDI sizes must be multiples of 512). New space
reads as zeroes. No server or other program may have the image open meanwhile.

Formats:
  raw    the file is truncated to SIZE
  vhd    fixed: the footer moves to the new end (the old one is zeroed).
         dynamic: current_size, the geometry (as 'imagenbd create' chooses it) and the
         BAT; when the BAT needs more room than there is before the first block, the
         blocks in its way are copied to the end of the file first. At most 2040 GiB.
         Both footers are written last. Differencing disks are refused.
  vdi    static: new blocks are allocated (the file grows); dynamic: new free entries.
         When the block map needs more room than there is before the data, the first
         blocks are copied to the end of the file and the map moves into their space.
         uuidModify changes. Differencing images are refused.

Shrinking needs --shrink. Dynamic VHD and VDI images refuse it while a block past the new
end is allocated (the message names the first one); fixed VHD, static VDI and raw images
lose the data past the new end (a warning says how much).

Every step is ordered so that a crash leaves a readable image (at worst with leaked
space that 'imagenbd check' reports); a fixed VHD grows its file and writes its new
footer in one write.

Options:
  -f, --format=FMT   raw, vhd (or vpc), vdi; default: probe
      --shrink       allow a smaller size
      --json         print {"filename", "format", "old_size", "new_size",
                     "relocated_blocks", "warnings"}
  -h, --help         this text

Exit status: 0 on success, 1 on errors, 2 on usage errors.
)";
}

int tool_resize(int argc, char** argv) {
  enum : int { opt_json = 1000, opt_shrink };
  static const option long_options[] = {
      {"format", required_argument, nullptr, 'f'},
      {"shrink", no_argument, nullptr, opt_shrink},
      {"json", no_argument, nullptr, opt_json},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0},
  };
  auto usage = [](const std::string& message) { return usage_error("resize", message, 2); };
  Request r;
  bool json = false;
  // The size comes last and may start with '-': take it before getopt sees it (qemu-img
  // resize does the same).
  std::vector<char*> args(argv, argv + argc);
  if (argc >= 2 && argv[argc - 1][0] == '-' && argv[argc - 1][1] >= '0' &&
      argv[argc - 1][1] <= '9') {
    r.size_text = argv[argc - 1];
    args.pop_back();
  }
  const int n = static_cast<int>(args.size());
  args.push_back(nullptr);
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(n, args.data(), "f:h", long_options, nullptr)) != -1) {
    switch (c) {
      case 'f':
        try {
          r.format = formats::parse_format(optarg);
        } catch (const std::invalid_argument& e) {
          return usage(e.what());
        }
        break;
      case opt_shrink:
        r.shrink = true;
        break;
      case opt_json:
        json = true;
        break;
      case 'h':
        std::fputs(resize_help(), stdout);
        return 0;
      default:
        return usage(fmt::format("unknown or incomplete option '{}'", args[optind - 1]));
    }
  }
  const int want = r.size_text.empty() ? 2 : 1;
  if (n - optind != want) return usage("expected IMAGE and SIZE");
  r.path = args[optind];
  if (r.size_text.empty()) r.size_text = args[optind + 1];
  try {
    (void)parse_new_size(r.size_text, UINT64_MAX / 2);  // syntax only; the value comes later
  } catch (const std::invalid_argument& e) {
    return usage(e.what());
  }
  log::configure({.level = log::Level::warning});  // open_image's info lines are noise here
  try {
    const Outcome out = run_now(resize(r));
    for (const auto& w : out.result.warnings) {
      std::fprintf(stderr, "imagenbd: warning: %s\n", w.c_str());
    }
    if (json) {
      std::string warnings = "[";
      for (std::size_t i = 0; i < out.result.warnings.size(); ++i) {
        warnings += (i ? ", " : "") + json_string(out.result.warnings[i]);
      }
      warnings += "]";
      std::fputs(fmt::format("{{\n  \"filename\": {},\n  \"format\": {},\n  \"old_size\": {},\n"
                             "  \"new_size\": {},\n  \"relocated_blocks\": {},\n"
                             "  \"warnings\": {}\n}}\n",
                             json_string(r.path), json_string(out.format), out.result.old_size,
                             out.result.new_size, out.result.relocated_blocks, warnings)
                     .c_str(),
                 stdout);
    } else {
      std::puts("Image resized.");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace imagenbd::server
