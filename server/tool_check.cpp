// `imagenbd check`: see tool_check.hpp.
#include "server/tool_check.hpp"

#include <array>
#include <cstdio>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "backends/log.hpp"
#include "formats/vdi_check.hpp"
#include "formats/vhd_check.hpp"
#include "server/local_parents.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

namespace asio = boost::asio;

asio::awaitable<formats::CheckReport> check(std::string path, formats::Format format) {
  backends::DevicePtr file = backends::open_file(path, {.read_only = true});
  if (format == formats::Format::automatic) format = co_await formats::probe_device(*file);
  const formats::ParentFinder finder = local_parent_finder();
  formats::CheckOptions options;
  options.parents.finder = &finder;
  if (format == formats::Format::vhd) co_return co_await formats::check_vhd(file, options);
  if (format == formats::Format::vdi) co_return co_await formats::check_vdi(file, options);
  formats::CheckReport raw;
  raw.format = "raw";
  co_return raw;
}

std::string issues_json(const std::vector<formats::CheckIssue>& issues) {
  if (issues.empty()) return "[]";
  std::string out = "[\n";
  for (std::size_t i = 0; i < issues.size(); ++i) {
    const auto& x = issues[i];
    out += fmt::format("    {{\"structure\": {}, \"field\": {}, \"message\": {}}}{}\n",
                       json_string(x.structure), json_string(x.field), json_string(x.message),
                       i + 1 < issues.size() ? "," : "");
  }
  return out + "  ]";
}

}  // namespace

formats::CheckReport run_check(const std::string& path, formats::Format format) {
  return run_now(check(path, format));
}

int check_status(const formats::CheckReport& report) {
  if (report.format == "raw") return check_unsupported;
  if (!report.errors.empty()) return check_corrupt;
  if (report.leaked_bytes > 0) return check_leaks;
  return check_clean;
}

std::string check_text(const formats::CheckReport& r) {
  std::string out;
  for (const auto& e : r.errors) out += "ERROR " + e.message + "\n";
  for (const auto& w : r.warnings) out += "Warning: " + w.message + "\n";
  for (const auto& n : r.notes) out += "Note: " + n.message + "\n";
  if (!r.complete) out += "The check stopped early: later structures depend on this one.\n";
  if (r.errors.empty() && r.leaked_bytes == 0) {
    out += "No errors were found on the image.\n";
  }
  if (!r.errors.empty()) {
    out += fmt::format(
        "\n{} errors were found on the image.\nData may be corrupted, or further writes to the "
        "image may corrupt it.\n",
        r.errors.size());
  }
  if (r.leaked_bytes > 0) {
    out += fmt::format(
        "\n{} leaked bytes were found on the image.\nThis means waste of disk space, but no "
        "harm to data.\n",
        r.leaked_bytes);
  }
  if (r.total_blocks > 0) {
    out += fmt::format(
        "{}/{} = {:.2f}% allocated\n", r.allocated_blocks, r.total_blocks,
        100.0 * static_cast<double>(r.allocated_blocks) / static_cast<double>(r.total_blocks));
  }
  return out;
}

std::string check_json(const std::string& filename, const formats::CheckReport& r) {
  return fmt::format(
      "{{\n  \"filename\": {},\n  \"format\": {},\n  \"errors\": {},\n  \"warnings\": {},\n"
      "  \"notes\": {},\n  \"allocated_blocks\": {},\n  \"total_blocks\": {},\n"
      "  \"leaked_bytes\": {},\n  \"complete\": {}\n}}\n",
      json_string(filename), json_string(r.format), issues_json(r.errors), issues_json(r.warnings),
      issues_json(r.notes), r.allocated_blocks, r.total_blocks, r.leaked_bytes, r.complete);
}

const char* check_help() {
  return R"(Usage: imagenbd check [-f FMT] [--json] IMAGE

Check the structure of a VHD or VDI image and report every problem found, not just the
first one (which is all 'imagenbd serve' names when it refuses an image). Nothing is
written to the image.

VHD: both footers (checksum, which copy is damaged, fields that differ), every footer
field, the dynamic header, every BAT entry (inside the file, not overlapping metadata or
each other), that each block's bitmap is readable (all-zero bitmaps are noted), leaked
space, and the parent link of a differencing disk.
VDI: the header fields, every block map entry (inside the image and the file, no block
shared), the allocated block count against the map, leaked blocks and bytes past the
last block, and the parent link of a differencing image.

Options:
  -f, --format=FMT   raw, vhd (or vpc), vdi; default: probe
      --json         machine-readable output: {"filename", "format", "errors",
                     "warnings", "notes" (each a list of {"structure", "field",
                     "message"}), "allocated_blocks", "total_blocks", "leaked_bytes",
                     "complete"}
      --output=FMT   human (default) or json, as in qemu-img
  -h, --help         this text

Exit status (qemu-img check's):
  0   no errors were found (warnings and notes do not count)
  1   the check could not run (unreadable file, usage error)
  2   errors were found: data may be corrupted, or writes may corrupt it
  3   only leaked space was found: a waste of disk space, no harm to data
  63  the format has nothing to check (raw)
)";
}

int tool_check(int argc, char** argv) {
  ImageCommand command;
  // qemu-img check: 1 for anything that stops the check, usage errors included.
  if (auto status = parse_image_command(argc, argv, "check", check_help(), check_failed, command)) {
    return *status;
  }
  const std::string& path = command.path;
  const bool json = command.json;
  // open_vhd/open_vdi (the last step of a check) log what they tolerate; the report says it.
  log::configure({.level = log::Level::error});
  formats::CheckReport report;
  try {
    report = run_check(path, command.format);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "imagenbd: %s\n", e.what());
    return check_failed;
  }
  if (report.format == "raw") {
    std::fprintf(stderr, "imagenbd: %s: raw images have no structure to check\n", path.c_str());
    return check_unsupported;
  }
  std::fputs((json ? check_json(path, report) : check_text(report)).c_str(), stdout);
  return check_status(report);
}

}  // namespace imagenbd::server
