// `imagenbd info`: see tool_info.hpp. Validation is open_image's (so info and serve never
// disagree about an image); the details come from vhd_layout / vdi_layout.
#include "server/tool_info.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cstdio>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "formats/vdi_layout.hpp"
#include "server/local_parents.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

namespace asio = boost::asio;
namespace vhd = formats::vhd;
namespace vdi = formats::vdi;

[[noreturn]] void fail_problem(const std::string& layer, const std::string& path,
                               const formats::Problem& problem) {
  throw backends::Error(problem.code, fmt::format("{}: {}: {}", layer, path, problem.message));
}

asio::awaitable<void> gather_vhd(backends::BlockDevice& file, ImageInfo& info) {
  const std::string path = info.filename;
  const uint64_t size = file.size();
  std::array<std::byte, vhd::footer_size> end{}, head{};
  co_await file.read(size - vhd::footer_size, end);
  co_await file.read(0, head);
  VhdInfo v;
  auto parsed = vhd::parse_footer(end);
  if (!parsed.ok()) {  // open_image accepted it: the copy at 0 is what serve uses
    parsed = vhd::parse_footer(head);
    v.footer_copy_used = true;
    if (!parsed.ok()) fail_problem("vhd", path, parsed.problem());
  }
  const vhd::Footer& f = parsed.value();
  v.subformat = vhd::disk_type_name(f.disk_type);
  v.creator_app = vhd::fourcc_text(f.creator_app);
  v.creator_version = f.creator_version;
  v.creator_host_os = vhd::fourcc_text(std::array<char, 4>{
      static_cast<char>(f.creator_host_os >> 24), static_cast<char>(f.creator_host_os >> 16),
      static_cast<char>(f.creator_host_os >> 8), static_cast<char>(f.creator_host_os)});
  v.timestamp = f.timestamp;
  v.current_size = f.current_size;
  v.original_size = f.original_size;
  v.geometry = f.geometry;
  v.chs_size = vhd::geometry_bytes(f.geometry);
  v.uuid = f.unique_id.to_string();
  v.qemu72_size = qemu72_virtual_size(f);
  const auto served = vhd::virtual_size(f, vhd::SizePolicy::automatic);
  if (!served.ok()) fail_problem("vhd", path, served.problem());
  v.size_source = served.value() == f.current_size ? "current_size" : "chs";
  if (info.virtual_size == 0) info.virtual_size = served.value();

  if (f.disk_type != static_cast<uint32_t>(vhd::DiskType::fixed)) {
    const uint64_t data_limit = v.footer_copy_used ? size : size - vhd::footer_size;
    std::array<std::byte, vhd::header_size> hb{};
    co_await file.read(f.data_offset, hb);
    const auto header = vhd::parse_dynamic_header(hb);
    if (!header.ok()) fail_problem("vhd", path, header.problem());
    const auto layout = vhd::check_dynamic_header(header.value(), f, data_limit);
    if (!layout.ok()) fail_problem("vhd", path, layout.problem());
    const auto& l = layout.value();
    std::vector<std::byte> bat_bytes(l.bat_bytes);
    co_await file.read(l.bat_offset, bat_bytes);
    const auto bat = vhd::decode_bat(bat_bytes, l.bat_entries);
    v.block_size = l.block_size;
    v.blocks_total = l.bat_entries;
    for (uint32_t entry : bat) v.blocks_allocated += entry != vhd::bat_unused;
    if (f.disk_type == static_cast<uint32_t>(vhd::DiskType::differencing)) {
      v.parent_name = utf16be_to_utf8(header.value().parent_unicode_name);
      v.parent_uuid = header.value().parent_unique_id.to_string();
    }
  }
  info.vhd = std::move(v);
}

asio::awaitable<void> gather_vdi(backends::BlockDevice& file, ImageInfo& info) {
  const uint64_t size = file.size();
  if (auto problem = vdi::check_file_size(size)) fail_problem("vdi", info.filename, *problem);
  std::array<std::byte, vdi::header_bytes> hb{};
  co_await file.read(0, hb);
  const vdi::Header h = vdi::decode_header(hb);
  const auto layout = vdi::check_header(h, size);
  if (!layout.ok()) fail_problem("vdi", info.filename, layout.problem());
  const auto& l = layout.value();
  std::vector<std::byte> map_bytes(uint64_t{l.blocks} * 4);
  co_await file.read(l.blocks_offset, map_bytes);
  const auto entries = vdi::decode_block_map(map_bytes);
  const auto use = vdi::check_block_map(l, entries, size);
  if (!use.ok()) fail_problem("vdi", info.filename, use.problem());
  VdiInfo v;
  v.subformat = vdi::type_name(h.image_type);
  v.version = fmt::format("{}.{}", h.version >> 16, h.version & 0xffff);
  v.header_size = h.header_size;
  v.comment = h.comment;
  v.block_size = h.block_size;
  v.blocks_total = h.blocks;
  v.blocks_allocated = h.blocks_allocated;
  v.blocks_used = use.value().used;
  v.uuid = h.uuid_create.to_string();
  v.modify_uuid = h.uuid_modify.to_string();
  v.parent_uuid = h.uuid_linkage.to_string();
  v.parent_modify_uuid = h.uuid_parent_modify.to_string();
  if (info.virtual_size == 0) info.virtual_size = l.disk_size;
  info.vdi = std::move(v);
}

// What identifies an image in a chain: its format, its id and its parent's id (nil when
// it has none), read with the codecs; nullopt for files that are neither VHD nor VDI.
struct Identity {
  std::string format;
  formats::Uuid uuid;
  formats::Uuid parent;
};

asio::awaitable<std::optional<Identity>> identity_of(backends::BlockDevice& file) {
  const uint64_t size = file.size();
  const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(size, 512));
  std::array<std::byte, 512> head{}, tail{};
  if (n == 0) co_return std::nullopt;
  co_await file.read(0, std::span(head).first(n));
  co_await file.read(size - n, std::span(tail).first(n));
  const auto format = formats::probe_format(std::span(head).first(n), std::span(tail).first(n));
  if (format == formats::Format::vhd) {
    auto footer = vhd::parse_footer(tail);
    if (!footer.ok()) footer = vhd::parse_footer(head);
    if (!footer.ok()) co_return std::nullopt;
    Identity id{"vhd", footer.value().unique_id, {}};
    if (footer.value().disk_type == static_cast<uint32_t>(vhd::DiskType::differencing)) {
      std::array<std::byte, vhd::header_size> hb{};
      if (footer.value().data_offset > size || size - footer.value().data_offset < hb.size()) {
        co_return id;
      }
      co_await file.read(footer.value().data_offset, hb);
      const auto header = vhd::parse_dynamic_header(hb);
      if (header.ok()) id.parent = header.value().parent_unique_id;
    }
    co_return id;
  }
  if (format == formats::Format::vdi && size >= vdi::header_bytes) {
    std::array<std::byte, vdi::header_bytes> hb{};
    co_await file.read(0, hb);
    const vdi::Header h = vdi::decode_header(hb);
    co_return Identity{"vdi", h.uuid_create, h.uuid_linkage};
  }
  co_return std::nullopt;
}

// The parent chain of the image `top`, among the images the finder opened while serve's
// open resolved it: from each image, the opened one whose id is its parent id.
asio::awaitable<std::vector<ParentInfo>> parent_chain(backends::BlockDevice& top,
                                                      const std::vector<std::string>& opened) {
  std::vector<std::pair<std::string, Identity>> known;
  for (const auto& name : opened) {
    if (std::any_of(known.begin(), known.end(), [&](const auto& k) { return k.first == name; })) {
      continue;
    }
    auto file = backends::open_file(name, {.read_only = true});
    if (auto id = co_await identity_of(*file)) known.emplace_back(name, *id);
  }
  std::vector<ParentInfo> chain;
  auto current = co_await identity_of(top);
  while (current && !current->parent.is_nil() && chain.size() < formats::max_parent_depth) {
    const auto next = std::find_if(known.begin(), known.end(),
                                   [&](const auto& k) { return k.second.uuid == current->parent; });
    if (next == known.end()) break;
    chain.push_back(ParentInfo{next->first, next->second.format, next->second.uuid.to_string()});
    current = next->second;
  }
  co_return chain;
}

asio::awaitable<ImageInfo> gather(std::string path, formats::Format format) {
  ImageInfo info;
  info.filename = path;
  auto file = backends::open_file(path, {.read_only = true});
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    info.file_size = static_cast<uint64_t>(st.st_size);
    info.allocated_bytes = static_cast<uint64_t>(st.st_blocks) * 512;
  }
  if (!S_ISREG(st.st_mode)) info.file_size = file->size();
  std::string refusal;
  // serve's finder, noting every store it opens: the chain is read from those afterwards.
  formats::ParentFinder finder = local_parent_finder();
  std::vector<std::string> opened;
  finder.open = [&opened, open = finder.open](
                    const std::string& name) -> asio::awaitable<backends::DevicePtr> {
    auto device = co_await open(name);
    if (device) opened.push_back(device->describe());
    co_return device;
  };
  try {
    const formats::ImageOptions options{
        .format = format, .read_only = true, .parents = {.finder = &finder}};
    auto device = co_await formats::open_image(file, options);
    info.format = device->name();
    info.virtual_size = device->size();
  } catch (const backends::Error& e) {
    // A valid image serve cannot serve (not supported yet, or its parent is missing):
    // still worth describing.
    if (e.errc() != std::errc::operation_not_supported &&
        e.errc() != std::errc::no_such_file_or_directory) {
      throw;
    }
    refusal = e.what();
  }
  info.parents = co_await parent_chain(*file, opened);
  if (!refusal.empty()) {
    info.not_served = refusal;
    if (format == formats::Format::automatic) format = co_await formats::probe_device(*file);
    info.format = formats::format_name(format);
  }
  if (info.format == "vhd") co_await gather_vhd(*file, info);
  if (info.format == "vdi") co_await gather_vdi(*file, info);
  co_return info;
}

std::string json_uint_field(std::string_view key, uint64_t value) {
  return fmt::format("{}: {}", json_string(key), value);
}
std::string json_str_field(std::string_view key, std::string_view value) {
  return fmt::format("{}: {}", json_string(key), json_string(value));
}

std::string join(const std::vector<std::string>& fields, std::string_view indent) {
  std::string out;
  for (std::size_t i = 0; i < fields.size(); ++i) {
    out += fmt::format("{}{}{}\n", indent, fields[i], i + 1 < fields.size() ? "," : "");
  }
  return out;
}

std::string version_text(uint32_t v) {
  return fmt::format("{}.{}", v >> 16, v & 0xffff);
}

}  // namespace

uint64_t qemu72_virtual_size(const vhd::Footer& f) {
  static constexpr std::array<std::array<char, 4>, 5> current_size_creators{{
      {'w', 'i', 'n', ' '},
      {'q', 'e', 'm', '2'},
      {'d', '2', 'v', ' '},
      {'C', 'T', 'X', 'S'},
      {'t', 'a', 'p', '\0'},
  }};
  if (f.geometry == vhd::max_geometry) return f.current_size;
  for (const auto& app : current_size_creators) {
    if (f.creator_app == app) return f.current_size;
  }
  return vhd::geometry_bytes(f.geometry);
}

std::string utf16be_to_utf8(std::span<const std::byte> bytes) {
  std::string out;
  auto unit = [&](std::size_t i) {
    return static_cast<uint32_t>(static_cast<uint8_t>(bytes[i]) << 8 |
                                 static_cast<uint8_t>(bytes[i + 1]));
  };
  for (std::size_t i = 0; i + 1 < bytes.size(); i += 2) {
    uint32_t c = unit(i);
    if (c == 0) break;
    if (c >= 0xD800 && c < 0xDC00 && i + 3 < bytes.size()) {
      const uint32_t low = unit(i + 2);
      if (low >= 0xDC00 && low < 0xE000) {
        c = 0x10000 + ((c - 0xD800) << 10) + (low - 0xDC00);
        i += 2;
      }
    }
    if (c >= 0xD800 && c < 0xE000) c = 0xFFFD;  // a lone surrogate
    vhd::append_utf8(out, c);
  }
  return out;
}

ImageInfo gather_info(const std::string& path, formats::Format format) {
  return run_now(gather(path, format));
}

std::string info_json(const ImageInfo& info) {
  std::vector<std::string> top{
      json_str_field("filename", info.filename),
      json_str_field("format", info.format),
      json_uint_field("virtual_size", info.virtual_size),
      json_uint_field("file_size", info.file_size),
      json_uint_field("allocated_bytes", info.allocated_bytes),
  };
  if (!info.not_served.empty()) top.push_back(json_str_field("not_served", info.not_served));
  if (const auto& v = info.vhd) {
    std::vector<std::string> f{
        json_str_field("subformat", v->subformat),
        json_str_field("creator_app", v->creator_app),
        json_str_field("creator_version", version_text(v->creator_version)),
        json_str_field("creator_host_os", v->creator_host_os),
        json_uint_field("timestamp", v->timestamp),
        json_uint_field("current_size", v->current_size),
        json_uint_field("original_size", v->original_size),
        fmt::format("\"geometry\": {{\"cylinders\": {}, \"heads\": {}, \"sectors\": {}}}",
                    v->geometry.cylinders, v->geometry.heads, v->geometry.sectors_per_track),
        json_uint_field("chs_size", v->chs_size),
        json_str_field("size_source", v->size_source),
        json_uint_field("qemu72_size", v->qemu72_size),
        json_str_field("uuid", v->uuid),
        fmt::format("\"footer_copy_used\": {}", v->footer_copy_used),
    };
    if (v->subformat != "fixed") {
      f.push_back(json_uint_field("block_size", v->block_size));
      f.push_back(json_uint_field("blocks_total", v->blocks_total));
      f.push_back(json_uint_field("blocks_allocated", v->blocks_allocated));
    }
    if (v->subformat == "differencing") {
      f.push_back(json_str_field("parent_name", v->parent_name));
      f.push_back(json_str_field("parent_uuid", v->parent_uuid));
    }
    top.push_back("\"vhd\": {\n" + join(f, "    ") + "  }");
  }
  if (const auto& v = info.vdi) {
    std::vector<std::string> f{
        json_str_field("subformat", v->subformat),
        json_str_field("version", v->version),
        json_uint_field("header_size", v->header_size),
        json_str_field("comment", v->comment),
        json_uint_field("block_size", v->block_size),
        json_uint_field("blocks_total", v->blocks_total),
        json_uint_field("blocks_allocated", v->blocks_allocated),
        json_uint_field("blocks_used", v->blocks_used),
        json_str_field("uuid", v->uuid),
        json_str_field("modify_uuid", v->modify_uuid),
        json_str_field("parent_uuid", v->parent_uuid),
        json_str_field("parent_modify_uuid", v->parent_modify_uuid),
    };
    top.push_back("\"vdi\": {\n" + join(f, "    ") + "  }");
  }
  if (!info.parents.empty()) {
    std::string list = "\"parents\": [\n";
    for (std::size_t i = 0; i < info.parents.size(); ++i) {
      const ParentInfo& p = info.parents[i];
      list += fmt::format("    {{{}, {}, {}}}{}\n", json_str_field("filename", p.filename),
                          json_str_field("format", p.format), json_str_field("uuid", p.uuid),
                          i + 1 < info.parents.size() ? "," : "");
    }
    top.push_back(list + "  ]");
  }
  return "{\n" + join(top, "  ") + "}\n";
}

std::string info_text(const ImageInfo& info) {
  std::string out;
  auto line = [&](std::string_view key, const std::string& value) {
    out += fmt::format("{}: {}\n", key, value);
  };
  auto sub = [&](std::string_view key, const std::string& value) {
    out += fmt::format("    {}: {}\n", key, value);
  };
  auto sized = [](uint64_t bytes) {
    return fmt::format("{} ({} bytes)", human_size(bytes), bytes);
  };
  line("image", info.filename);
  line("file format", info.format);
  line("virtual size", sized(info.virtual_size));
  line("file size", sized(info.file_size));
  line("disk size", human_size(info.allocated_bytes));
  if (const auto& v = info.vhd) {
    if (v->subformat != "fixed") line("cluster_size", std::to_string(v->block_size));
  }
  if (const auto& v = info.vdi) line("cluster_size", std::to_string(v->block_size));
  if (!info.not_served.empty()) line("not served", info.not_served);
  if (info.vhd || info.vdi) out += "Format specific information:\n";
  if (const auto& v = info.vhd) {
    sub("subformat", v->subformat);
    sub("creator app", fmt::format("\"{}\" version {} on \"{}\"", v->creator_app,
                                   version_text(v->creator_version), v->creator_host_os));
    sub("geometry", fmt::format("{}/{}/{} (C/H/S)", v->geometry.cylinders, v->geometry.heads,
                                v->geometry.sectors_per_track));
    sub("current size", std::to_string(v->current_size));
    sub("CHS size",
        v->geometry == vhd::max_geometry
            ? fmt::format("{} (maximum geometry: it means \"see current size\")", v->chs_size)
            : std::to_string(v->chs_size));
    sub("size from", v->size_source);
    if (v->qemu72_size != info.virtual_size) {
      sub("qemu <= 9 size",
          fmt::format("{} (differs: use force_size_calc=current_size)", v->qemu72_size));
    }
    sub("uuid", v->uuid);
    if (v->footer_copy_used) sub("footer", "damaged; the copy at offset 0 was read");
    if (v->subformat != "fixed") {
      sub("blocks", fmt::format("{} allocated of {}", v->blocks_allocated, v->blocks_total));
    }
    if (v->subformat == "differencing") {
      sub("parent name", v->parent_name);
      sub("parent uuid", v->parent_uuid);
    }
  }
  if (const auto& v = info.vdi) {
    sub("subformat", v->subformat);
    sub("version", v->version);
    sub("blocks", fmt::format("{} allocated of {} ({} in use by the block map)",
                              v->blocks_allocated, v->blocks_total, v->blocks_used));
    sub("uuid", v->uuid);
    sub("modify uuid", v->modify_uuid);
    if (v->subformat == "differencing" || v->parent_uuid != formats::Uuid{}.to_string()) {
      sub("parent uuid", v->parent_uuid);
      sub("parent modify uuid", v->parent_modify_uuid);
    }
    if (!v->comment.empty()) sub("comment", json_string(v->comment));
  }
  if (!info.parents.empty()) {
    out += "parent chain:\n";
    for (std::size_t i = 0; i < info.parents.size(); ++i) {
      const ParentInfo& p = info.parents[i];
      out += fmt::format("    {}: {} ({}, uuid {})\n", i + 1, p.filename, p.format, p.uuid);
    }
  }
  return out;
}

const char* info_help() {
  return R"(Usage: imagenbd info [-f FMT] [--json] IMAGE

Show what a disk image is: its format (probed like 'imagenbd serve' does unless -f
names it), virtual size, file size and allocated bytes, and per format: for VHD the
subformat, creator, geometry, current_size and CHS size (and which one is served),
block size and allocated blocks, UUID and the parent of a differencing disk; for VDI
the type, version, block size, blocks allocated and total, and the UUIDs (parent UUIDs
of a differencing image). For differencing images, the parent chain serve resolves
(nearest parent first: file, format, UUID); an image whose parent cannot be found is
still described, with serve's message, which lists every name tried.

Options:
  -f, --format=FMT   raw, vhd (or vpc), vdi; default: probe
      --json         machine-readable output (snake_case keys; see --output)
      --output=FMT   human (default) or json, as in qemu-img
  -h, --help         this text

Exit status: 0 on success, 1 if the image cannot be read or is damaged (the message is
the one 'serve' gives), 2 on usage errors.
)";
}

int tool_info(int argc, char** argv) {
  ImageCommand command;
  if (auto status = parse_image_command(argc, argv, "info", info_help(), 2, command)) {
    return *status;
  }
  try {
    const ImageInfo info = gather_info(command.path, command.format);
    std::fputs((command.json ? info_json(info) : info_text(info)).c_str(), stdout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace imagenbd::server
