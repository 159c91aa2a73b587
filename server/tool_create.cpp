// `imagenbd create`: see tool_create.hpp. The layouts come from the formats' codecs
// (vhd_layout, vdi_layout); the new file is checked by opening it as `serve` would, and
// removed when that fails.
#include "server/tool_create.hpp"

#include <fcntl.h>
#include <getopt.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <memory>
#include <random>
#include <stdexcept>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "formats/vdi_layout.hpp"
#include "formats/vhd_parent.hpp"
#include "server/exports.hpp"
#include "server/local_parents.hpp"
#include "server/tool_common.hpp"
#include "server/tool_info.hpp"

namespace imagenbd::server {

namespace {

namespace vhd = formats::vhd;
namespace vdi = formats::vdi;

[[noreturn]] void invalid(const std::string& message) {
  throw std::invalid_argument(message);
}

bool is_power_of_two(uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}

uint64_t round_up(uint64_t v, uint64_t to) {
  return (v + to - 1) / to * to;
}

void check_block_size(uint32_t block_size, uint32_t max, std::string_view format) {
  if (!is_power_of_two(block_size) || block_size < 512 || block_size > max) {
    invalid(fmt::format("{} block size {} is not a power of two from 512 to {}", format, block_size,
                        max));
  }
}

// A differencing VHD's parent fields and locators (formats.md §1.8): W2ku and MacX hold the
// parent's absolute path, W2ru its path relative to the new file's directory (what keeps
// working when a directory of images moves), the header's name its file name (what libvhdi
// looks for next to the child). Locator data follows the BAT, each in whole sectors, its
// data_space in bytes as Microsoft's tools write it. Returns where the data ends.
uint64_t plan_vhd_parent(const CreateRequest& r, vhd::DynamicHeader& header, uint64_t at,
                         CreatePlan& plan) {
  const ParentImage& parent = *r.parent;
  header.parent_unique_id = parent.uuid;
  header.parent_timestamp = parent.vhd_timestamp;
  const auto name = vhd::encode_parent_name(vhd::base_name(parent.absolute_path));
  if (!name.ok()) invalid(fmt::format("--parent {}: {}", parent.path, name.problem().message));
  header.parent_unicode_name = name.value();
  const std::filesystem::path child_dir = std::filesystem::path(r.path).parent_path();
  const std::string relative =
      std::filesystem::path(parent.absolute_path).lexically_relative(child_dir).generic_string();
  std::vector<std::pair<uint32_t, std::string>> locators{
      {vhd::platform::w2ku, parent.absolute_path}};
  if (!relative.empty() && !r.path.empty()) locators.emplace_back(vhd::platform::w2ru, relative);
  locators.emplace_back(vhd::platform::macx, parent.absolute_path);
  for (std::size_t k = 0; k < locators.size(); ++k) {
    const auto& [code, path] = locators[k];
    auto data = vhd::encode_locator_path(code, path);
    if (!data.ok()) invalid(fmt::format("--parent {}: {}", parent.path, data.problem().message));
    const uint64_t space = round_up(std::max<uint64_t>(data.value().size(), 1), vhd::sector_size);
    header.parent_locators[k] =
        vhd::ParentLocator{.platform_code = code,
                           .data_space = static_cast<uint32_t>(space),
                           .data_length = static_cast<uint32_t>(data.value().size()),
                           .reserved = 0,
                           .data_offset = at};
    plan.writes.emplace_back(at, std::move(data.value()));
    at += space;
  }
  return at;
}

void plan_vhd(const CreateRequest& r, const CreateIds& ids, CreatePlan& plan) {
  std::string sub = r.subformat.empty() ? "dynamic" : r.subformat;
  if (r.parent) {
    if (sub != "dynamic" && sub != "differencing") {
      invalid(
          fmt::format("vhd subformat '{}' cannot have a parent (--parent makes a "
                      "differencing image)",
                      sub));
    }
    if (r.parent->format != formats::Format::vhd) {
      invalid(fmt::format("--parent {} is a {} image; a vhd image needs a vhd parent",
                          r.parent->path, formats::format_name(r.parent->format)));
    }
    if (r.size != r.parent->size) {
      invalid(
          fmt::format("size {} differs from the parent's {} ({}): a differencing image "
                      "has its parent's size",
                      r.size, r.parent->size, r.parent->path));
    }
    sub = "differencing";
  } else if (sub != "fixed" && sub != "dynamic") {
    invalid(fmt::format("vhd subformat '{}' is not fixed or dynamic", sub));
  }
  if (r.size == 0 || r.size % vhd::sector_size != 0) {
    invalid(fmt::format("vhd size {} is not a positive multiple of 512", r.size));
  }
  if (r.size > vhd::max_dynamic_size) {
    invalid(
        fmt::format("vhd size {} is larger than 2040 GiB ({} bytes), the limit of qemu "
                    "and Hyper-V",
                    r.size, vhd::max_dynamic_size));
  }
  vhd::Footer footer;
  footer.timestamp = ids.vhd_timestamp;
  footer.creator_app = vhd_creator_app;
  footer.original_size = footer.current_size = r.size;
  footer.geometry = vhd::geometry_to_record(r.size);
  footer.unique_id = ids.uuid;
  plan.subformat = sub;
  if (sub == "fixed") {
    if (r.block_size) invalid("--block-size applies to dynamic vhd images only");
    footer.disk_type = static_cast<uint32_t>(vhd::DiskType::fixed);
    footer.data_offset = vhd::fixed_data_offset;
    const auto bytes = vhd::encode_footer(footer);
    plan.file_size = r.size + vhd::footer_size;
    plan.writes.emplace_back(r.size, std::vector<std::byte>(bytes.begin(), bytes.end()));
    return;
  }
  // A differencing image takes its parent's block size unless told otherwise (§1.8).
  const uint32_t block_size = r.block_size                       ? r.block_size
                              : r.parent && r.parent->block_size ? r.parent->block_size
                                                                 : vhd::default_block_size;
  check_block_size(block_size, vhd::max_block_size, "vhd");
  if (block_size < 4096) {
    // qemu 7.2 sizes the sector bitmap as block_size / 4096 rounded up to a sector: none.
    plan.warnings.push_back(fmt::format(
        "block size {} is below 4096: libvhdi and imagenbd read it, qemu misplaces the data "
        "of such blocks",
        block_size));
  }
  plan.block_size = block_size;
  const uint64_t entries = (r.size + block_size - 1) / block_size;
  // qemu's layout: footer copy, dynamic header, BAT, footer.
  const uint64_t header_offset = vhd::footer_size;
  const uint64_t bat_offset = header_offset + vhd::header_size;
  const uint64_t bat_bytes = round_up(entries * 4, vhd::sector_size);
  footer.disk_type =
      static_cast<uint32_t>(r.parent ? vhd::DiskType::differencing : vhd::DiskType::dynamic);
  footer.data_offset = header_offset;
  vhd::DynamicHeader header;
  header.table_offset = bat_offset;
  header.max_table_entries = static_cast<uint32_t>(entries);
  header.block_size = block_size;
  const uint64_t data_end =
      r.parent ? plan_vhd_parent(r, header, bat_offset + bat_bytes, plan) : bat_offset + bat_bytes;
  const auto footer_bytes = vhd::encode_footer(footer);
  const auto header_bytes = vhd::encode_dynamic_header(header);
  const std::vector<uint32_t> bat(entries, vhd::bat_unused);
  plan.file_size = data_end + vhd::footer_size;
  plan.writes.emplace_back(0, std::vector<std::byte>(footer_bytes.begin(), footer_bytes.end()));
  plan.writes.emplace_back(header_offset,
                           std::vector<std::byte>(header_bytes.begin(), header_bytes.end()));
  plan.writes.emplace_back(bat_offset, vhd::encode_bat(bat, bat_bytes));
  plan.writes.emplace_back(data_end,
                           std::vector<std::byte>(footer_bytes.begin(), footer_bytes.end()));
}

void plan_vdi(const CreateRequest& r, const CreateIds& ids, CreatePlan& plan) {
  std::string sub = r.subformat.empty() ? "dynamic" : r.subformat;
  uint64_t size = r.size;
  uint32_t block_size = r.block_size ? r.block_size : vdi::default_block_size;
  if (r.parent) {
    // A differencing image (formats.md §2.7): dynamic layout, its parent's size and block
    // size, uuidLinkage/uuidParentModify = the parent's uuidCreate/uuidModify.
    const ParentImage& parent = *r.parent;
    if (sub != "dynamic" && sub != "differencing") {
      invalid(fmt::format(
          "vdi subformat '{}' cannot have a parent (--parent makes a differencing image)", sub));
    }
    if (parent.format != formats::Format::vdi) {
      invalid(fmt::format("--parent {} is a {} image; a vdi image needs a vdi parent", parent.path,
                          formats::format_name(parent.format)));
    }
    if (size == 0) size = parent.size;
    if (size != parent.size) {
      invalid(fmt::format(
          "size {} differs from the parent's {} ({}): a differencing image has its parent's size",
          size, parent.size, parent.path));
    }
    if (parent.block_size != 0) {
      if (r.block_size && r.block_size != parent.block_size) {
        invalid(fmt::format("block size {} differs from the parent's {} ({})", r.block_size,
                            parent.block_size, parent.path));
      }
      block_size = parent.block_size;
    }
    sub = "differencing";
  } else if (sub != "static" && sub != "dynamic") {
    invalid(fmt::format("vdi subformat '{}' is not static or dynamic", sub));
  }
  if (size == 0 || size % vdi::sector_size != 0) {
    invalid(fmt::format("vdi size {} is not a positive multiple of 512", size));
  }
  check_block_size(block_size, vdi::max_block_size, "vdi");
  if (block_size != vdi::default_block_size) {
    plan.warnings.push_back(fmt::format(
        "block size {} is not 1048576: VirtualBox reads it, qemu refuses it", block_size));
  }
  if ((size + block_size - 1) / block_size > vdi::max_blocks) {
    invalid(fmt::format("vdi size {} needs more than {} blocks of {} bytes", size, vdi::max_blocks,
                        block_size));
  }
  const auto type = r.parent          ? vdi::ImageType::differencing
                    : sub == "static" ? vdi::ImageType::fixed
                                      : vdi::ImageType::dynamic;
  vdi::Header header = vdi::new_header(size, type, ids.uuid, ids.modify_uuid, block_size);
  if (r.parent) {
    header.uuid_linkage = r.parent->uuid;
    header.uuid_parent_modify = r.parent->modify_uuid;
  }
  std::vector<std::byte> first(vdi::header_bytes);
  vdi::encode_header(header, first);
  plan.subformat = sub;
  plan.block_size = block_size;
  plan.file_size = header.data_offset;
  if (type == vdi::ImageType::fixed) {
    plan.file_size += uint64_t{header.blocks} * block_size;
  }
  plan.writes.emplace_back(0, std::move(first));
  plan.writes.emplace_back(header.blocks_offset, vdi::encode_block_map(vdi::new_block_map(header)));
}

}  // namespace

formats::Uuid random_uuid() {
  std::random_device random;
  std::array<uint8_t, 16> bytes{};
  for (std::size_t i = 0; i < bytes.size(); i += 4) {
    const uint32_t r = random();
    for (std::size_t k = 0; k < 4; ++k) bytes[i + k] = static_cast<uint8_t>(r >> (8 * k));
  }
  return formats::Uuid::random_v4(bytes);
}

// Writes the plan to path: O_EXCL unless force (then the old contents go).
void write_plan(const std::string& path, const CreatePlan& plan, bool force) {
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (force ? O_TRUNC : O_EXCL);
  const int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) {
    const int error = errno;
    if (error == EEXIST) {
      backends::fail(std::errc::file_exists, "{}: the file exists (use --force to overwrite it)",
                     path);
    }
    backends::fail_errno(error, path);
  }
  auto fail_closing = [&](std::string_view what) {
    const int error = errno;
    ::close(fd);
    ::unlink(path.c_str());
    backends::fail_errno(error, fmt::format("{}: {}", path, what));
  };
  if (::ftruncate(fd, static_cast<off_t>(plan.file_size)) != 0) fail_closing("ftruncate");
  for (const auto& [offset, bytes] : plan.writes) {
    const ssize_t n = ::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset));
    if (n < 0) fail_closing("write");
    if (static_cast<std::size_t>(n) != bytes.size()) {
      errno = EIO;
      fail_closing("short write");
    }
  }
  if (::fsync(fd) != 0) fail_closing("fsync");
  if (::close(fd) != 0) {
    const int error = errno;
    ::unlink(path.c_str());
    backends::fail_errno(error, path);
  }
}

namespace {

// create --parent: opens the parent as serve would (read-only, with its own parents), then
// reads the ids a child records with the formats' codecs.
boost::asio::awaitable<ParentImage> read_parent_async(std::string path) {
  ParentImage parent;
  parent.path = path;
  std::unique_ptr<char, decltype(&std::free)> real(::realpath(path.c_str(), nullptr), &std::free);
  if (!real) backends::fail_errno(errno, "--parent " + path);
  parent.absolute_path = real.get();
  auto file = backends::open_file(parent.absolute_path, {.read_only = true});
  const formats::ParentFinder finder = local_parent_finder();
  const formats::ImageOptions options{.read_only = true, .parents = {.finder = &finder}};
  auto device = co_await formats::open_image(file, options);
  parent.format = formats::parse_format(device->name());
  parent.size = device->size();
  if (parent.format == formats::Format::vhd) {
    std::array<std::byte, vhd::footer_size> bytes{};
    co_await file->read(file->size() - vhd::footer_size, bytes);
    auto footer = vhd::parse_footer(bytes);
    if (!footer.ok()) {  // open_vhd accepted it: the copy at 0 is the one
      co_await file->read(0, bytes);
      footer = vhd::parse_footer(bytes);
    }
    if (!footer.ok())
      backends::fail(std::errc::invalid_argument, "vhd: {}: {}", path, footer.problem().message);
    parent.uuid = footer.value().unique_id;
    parent.vhd_timestamp = footer.value().timestamp;
    if (footer.value().disk_type != static_cast<uint32_t>(vhd::DiskType::fixed)) {
      std::array<std::byte, vhd::header_size> hb{};
      co_await file->read(footer.value().data_offset, hb);
      const auto header = vhd::parse_dynamic_header(hb);
      if (header.ok()) parent.block_size = header.value().block_size;
    }
  } else if (parent.format == formats::Format::vdi) {
    std::array<std::byte, vdi::header_bytes> hb{};
    co_await file->read(0, hb);
    const vdi::Header h = vdi::decode_header(hb);
    parent.uuid = h.uuid_create;
    parent.modify_uuid = h.uuid_modify;
    parent.block_size = h.block_size;
  }
  co_return parent;
}

}  // namespace

ParentImage read_parent(const std::string& path) {
  return run_now(read_parent_async(path));
}

CreatePlan plan_image(const CreateRequest& request, const CreateIds& ids) {
  CreatePlan plan;
  switch (request.format) {
    case formats::Format::raw:
      if (!request.subformat.empty()) invalid("raw images have no subformat");
      if (request.block_size) invalid("raw images have no block size");
      plan.file_size = request.size;
      break;
    case formats::Format::vhd:
      plan_vhd(request, ids, plan);
      break;
    case formats::Format::vdi:
      plan_vdi(request, ids, plan);
      break;
    case formats::Format::automatic:
      invalid("create needs a format: -f raw, vhd or vdi");
  }
  return plan;
}

const char* create_help() {
  return R"(Usage: imagenbd create -f FMT [--subformat S] [--block-size N] [--force] [--json] FILE SIZE
       imagenbd create -f FMT --parent PARENT [--block-size N] [--force] [--json] FILE [SIZE]

Create an empty disk image of exactly SIZE bytes (suffixes K, M, G, T are powers of
1024; VHD and VDI sizes must be multiples of 512). With --parent, create a differencing
image of PARENT (an image of the same format, which is opened and checked first): it
reads as PARENT until written, and SIZE, which defaults to PARENT's, must equal it.

Formats:
  raw    a sparse file of SIZE bytes
  vhd    (or vpc) --subformat dynamic (default; --block-size, default 2M) or fixed.
         At most 2040 GiB. The footer's creator app is "inbd"; current_size is SIZE, and
         the CHS geometry is SIZE's own when SIZE is CHS-exact, else 65535/16/255, so
         that qemu (every version), Hyper-V, libvhdi and imagenbd all see SIZE.
         With --parent: a differencing VHD (block size from the parent unless given)
         recording the parent's unique id and timestamp, its file name in the header,
         and locators W2ru (path relative to FILE's directory), W2ku and MacX (absolute
         path). imagenbd and libvhdi read it; qemu cannot (it ignores the parent).
  vdi    --subformat dynamic (default) or static; --block-size default 1M (qemu reads
         no other). Laid out as qemu does: block map at 0x200, data after it.

Options:
  -f, --format=FMT       raw, vhd (or vpc), vdi (required)
  -o, --subformat=S      see above
      --block-size=N     block size in bytes (suffixes allowed); a power of two
      --parent=PARENT    a differencing image of PARENT (same format)
      --force            overwrite FILE if it exists (refused otherwise)
      --json             print what was created, as 'imagenbd info --json' does
  -h, --help             this text

The new image is opened as 'imagenbd serve' would before create reports success; it is
removed if that fails. Exit status: 0 on success, 1 on errors, 2 on usage errors.
)";
}

int tool_create(int argc, char** argv) {
  enum : int { opt_json = 1000, opt_force, opt_block_size, opt_parent };
  static const option long_options[] = {
      {"format", required_argument, nullptr, 'f'},
      {"subformat", required_argument, nullptr, 'o'},
      {"block-size", required_argument, nullptr, opt_block_size},
      {"force", no_argument, nullptr, opt_force},
      {"parent", required_argument, nullptr, opt_parent},
      {"json", no_argument, nullptr, opt_json},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0},
  };
  auto usage = [](const std::string& message) { return usage_error("create", message, 2); };
  CreateRequest request;
  bool have_format = false, force = false, json = false;
  std::string parent_path;
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "f:o:h", long_options, nullptr)) != -1) {
    try {
      switch (c) {
        case 'f':
          request.format = formats::parse_format(optarg);
          have_format = request.format != formats::Format::automatic;
          if (!have_format) return usage("create needs a format: -f raw, vhd or vdi");
          break;
        case 'o': {
          std::string_view s = optarg;
          if (s.starts_with("subformat=")) s.remove_prefix(10);  // qemu-img's -o spelling
          request.subformat = s;
          break;
        }
        case opt_block_size: {
          const uint64_t n = parse_size(optarg);
          if (n == 0 || n > UINT32_MAX) {
            return usage(fmt::format("invalid block size '{}'", optarg));
          }
          request.block_size = static_cast<uint32_t>(n);
          break;
        }
        case opt_force:
          force = true;
          break;
        case opt_parent:
          parent_path = optarg;
          if (parent_path.empty()) return usage("--parent needs a file");
          break;
        case opt_json:
          json = true;
          break;
        case 'h':
          std::fputs(create_help(), stdout);
          return 0;
        default:
          return usage(fmt::format("unknown or incomplete option '{}'", argv[optind - 1]));
      }
    } catch (const std::invalid_argument& e) {
      return usage(e.what());
    }
  }
  if (!have_format) return usage("create needs a format: -f raw, vhd or vdi");
  const int operands = argc - optind;
  if (parent_path.empty() ? operands != 2 : operands != 1 && operands != 2) {
    return usage(parent_path.empty() ? "expected FILE and SIZE" : "expected FILE [SIZE]");
  }
  const std::string path = argv[optind];
  if (operands == 2) {
    try {
      request.size = parse_size(argv[optind + 1]);
    } catch (const std::invalid_argument& e) {
      return usage(e.what());
    }
  }
  try {
    if (!parent_path.empty()) {
      request.parent = read_parent(parent_path);
      if (operands == 1) request.size = request.parent->size;
      // Relative locators are computed from the new file's real directory.
      const auto absolute = std::filesystem::absolute(path);
      request.path =
          (std::filesystem::weakly_canonical(absolute.parent_path()) / absolute.filename())
              .string();
    }
    CreateIds ids{.uuid = random_uuid(),
                  .modify_uuid = random_uuid(),
                  .vhd_timestamp = static_cast<uint32_t>(std::time(nullptr) - 946684800)};
    const CreatePlan plan = plan_image(request, ids);
    for (const auto& w : plan.warnings) std::fprintf(stderr, "imagenbd: warning: %s\n", w.c_str());
    write_plan(path, plan, force);
    ImageInfo info;
    try {
      info = gather_info(path, request.format);
    } catch (const std::exception& e) {
      ::unlink(path.c_str());
      throw std::runtime_error(
          fmt::format("{}: the new image does not open ({}); removed it", path, e.what()));
    }
    if (json) {
      std::fputs(info_json(info).c_str(), stdout);
    } else {
      std::string line = fmt::format("Formatting '{}', fmt={}", path, info.format);
      if (!plan.subformat.empty()) line += " subformat=" + plan.subformat;
      line += fmt::format(" size={}", info.virtual_size);
      if (plan.block_size) line += fmt::format(" block_size={}", plan.block_size);
      std::puts(line.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace imagenbd::server
