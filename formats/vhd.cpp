// Opening a VHD (formats.md §1.4): the footer at the end of the file, or, when the last
// sector is damaged, the copy a dynamic disk keeps at offset 0 (then read-only: that is the
// mark of an interrupted allocation, and the file needs repair before it grows again);
// then, for dynamic disks, the dynamic header and the BAT. Every structure passes the
// checks of vhd_layout before a single field is used. Fixed disks are served here; dynamic
// ones by vhd_dynamic.
#include "formats/vhd.hpp"

#include <algorithm>
#include <array>
#include <cassert>
#include <cstring>
#include <optional>
#include <vector>

#include "backends/error.hpp"
#include "backends/log.hpp"
#include "formats/vhd_dynamic.hpp"
#include "formats/vhd_parent.hpp"

namespace imagenbd::formats {

namespace {

using backends::Caps;
using backends::Extent;
using backends::WriteFlags;
using vhd::footer_size;

// A fixed disk: the virtual disk is the first `size` bytes of the file, the footer follows.
class FixedVhd final : public backends::BlockDevice {
 public:
  FixedVhd(DevicePtr child, uint64_t size, bool writable)
      : child_(std::move(child)), size_(size), caps_(child_->caps()) {
    if (!writable) {
      caps_.writable = caps_.fua = caps_.trim = caps_.zero = caps_.fast_zero = false;
    }
  }

  std::string_view name() const override { return "vhd"; }
  std::string describe() const override { return child_->describe(); }
  uint64_t size() const override { return size_; }
  Caps caps() const override { return caps_; }

  asio::awaitable<void> read(uint64_t offset, std::span<std::byte> out) override {
    assert(offset + out.size() <= size_);
    co_await child_->read(offset, out);
  }

  asio::awaitable<void> write(uint64_t offset, std::span<const std::byte> in,
                              WriteFlags flags) override {
    check_writable("write");
    assert(offset + in.size() <= size_);  // so the footer is out of reach
    co_await child_->write(offset, in, flags);
  }

  asio::awaitable<void> flush() override { co_await child_->flush(); }

  asio::awaitable<void> trim(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("trim");
    assert(offset + length <= size_);
    co_await child_->trim(offset, length, flags);
  }

  asio::awaitable<void> zero(uint64_t offset, uint64_t length, WriteFlags flags) override {
    check_writable("zero");
    assert(offset + length <= size_);
    co_await child_->zero(offset, length, flags);
  }

  // The file's own holes (a sparse fixed VHD) show through.
  asio::awaitable<std::vector<Extent>> extents(uint64_t offset, uint64_t length) override {
    assert(offset + length <= size_);
    co_return co_await child_->extents(offset, length);
  }
  bool may_have_holes() const override { return child_->may_have_holes(); }

  asio::awaitable<void> prefetch(uint64_t offset, uint64_t length) override {
    co_await child_->prefetch(offset, length);
  }

 private:
  void check_writable(std::string_view what) const {
    if (!caps_.writable) {
      backends::fail(std::errc::operation_not_permitted, "vhd: {}: {} on a read-only image",
                     describe(), what);
    }
  }

  const DevicePtr child_;
  const uint64_t size_;
  Caps caps_;
};

[[noreturn]] void fail_with(const std::string& path, const vhd::Problem& problem) {
  throw backends::Error(problem.code, fmt::format("vhd: {}: {}", path, problem.message));
}

bool has_cookie(std::span<const std::byte> sector) {
  return std::memcmp(sector.data(), "conectix", 8) == 0;
}

bool is_dynamic_type(uint32_t disk_type) {
  return disk_type == static_cast<uint32_t>(vhd::DiskType::dynamic) ||
         disk_type == static_cast<uint32_t>(vhd::DiskType::differencing);
}

struct FoundFooter {
  vhd::Footer footer;
  std::array<std::byte, footer_size> bytes;
  bool from_copy;       // the end footer is damaged; this is the copy at offset 0
  uint64_t data_limit;  // where data must end: the end footer, or the end of the file
};

// Step 1 of §1.4: the end footer, or the copy at 0 of a dynamic disk, or a clear refusal.
asio::awaitable<FoundFooter> find_footer(backends::BlockDevice& child, const std::string& path) {
  const uint64_t file_size = child.size();
  if (file_size < footer_size) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: the file is {} bytes, shorter than a {}-byte footer (truncated?)",
                   path, file_size, footer_size);
  }
  FoundFooter found{};
  std::array<std::byte, footer_size> head;
  co_await child.read(file_size - footer_size, found.bytes);
  co_await child.read(0, head);
  const auto end = vhd::parse_footer(found.bytes);
  const auto copy = vhd::parse_footer(head);

  if (end.ok()) {
    found.footer = end.value();
    found.from_copy = false;
    found.data_limit = file_size - footer_size;
    if (is_dynamic_type(found.footer.disk_type)) {
      if (!copy.ok()) {
        log::warn(
            "vhd: {}: the footer copy at offset 0 is damaged ({}); using the footer at the "
            "end",
            path, copy.problem().message);
      } else if (head != found.bytes) {
        log::warn(
            "vhd: {}: the footer copy at offset 0 differs from the footer at the end; "
            "using the one at the end",
            path);
      }
    }
    co_return found;
  }
  if (copy.ok() && is_dynamic_type(copy.value().disk_type)) {
    log::warn(
        "vhd: {}: the footer at the end is damaged ({}); using its copy at offset 0. This "
        "is what an interrupted block allocation leaves: the image needs repair, and is "
        "served read-only",
        path, end.problem().message);
    found.footer = copy.value();
    found.bytes = head;
    found.from_copy = true;
    found.data_limit = file_size;
    co_return found;
  }
  if (!has_cookie(found.bytes) && !has_cookie(head)) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: not a VHD: no \"conectix\" footer at the end of the file or at "
                   "offset 0",
                   path);
  }
  if (copy.ok()) {  // a fixed disk has no copy at 0: sector 0 is disk data
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: {}; the footer at offset 0 is a {} disk's, which keeps no copy "
                   "there",
                   path, end.problem().message, vhd::disk_type_name(copy.value().disk_type));
  }
  if (has_cookie(head)) {
    backends::fail(std::errc::invalid_argument, "vhd: {}: {}; footer copy at offset 0: {}", path,
                   end.problem().message, copy.problem().message);
  }
  fail_with(path, end.problem());
}

// The footer of a parent candidate (the end one, or the copy at 0 of a dynamic disk), or
// nullopt when the candidate is no VHD: then the next candidate is tried.
asio::awaitable<std::optional<vhd::Footer>> peek_footer(backends::BlockDevice& candidate) {
  const uint64_t size = candidate.size();
  if (size < footer_size) co_return std::nullopt;
  std::array<std::byte, footer_size> bytes;
  co_await candidate.read(size - footer_size, bytes);
  if (auto end = vhd::parse_footer(bytes); end.ok()) co_return end.value();
  co_await candidate.read(0, bytes);
  if (auto copy = vhd::parse_footer(bytes); copy.ok() && is_dynamic_type(copy.value().disk_type)) {
    co_return copy.value();
  }
  co_return std::nullopt;
}

// The parent of the differencing disk `path` (formats.md §1.8): the first candidate whose
// footer unique id is the header's parent_unique_id, opened read-only with the rest of its
// chain, and as large as the child.
asio::awaitable<DevicePtr> open_parent(backends::BlockDevice& child, const std::string& path,
                                       const vhd::DynamicHeader& header, const vhd::Footer& footer,
                                       uint64_t size, const VhdOptions& options) {
  const ParentChain& chain = options.parents;
  const std::string wanted = header.parent_unique_id.to_string();
  const std::string recorded = vhd::parent_name(header);
  if (!chain.finder) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: differencing VHD needs its parent (unique id {}, name \"{}\"), "
                   "and nothing was given to look for it",
                   path, wanted, recorded);
  }
  if (chain.names.size() >= max_parent_depth) {
    backends::fail(std::errc::invalid_argument,
                   "vhd: {}: the parent chain is deeper than {} images (a loop?): {}", path,
                   max_parent_depth, chain.text(path));
  }
  // The locators' data: check_dynamic_header placed it inside the file.
  std::vector<vhd::DecodedLocator> locators;
  for (uint32_t k = 0; k < header.parent_locators.size(); ++k) {
    const vhd::ParentLocator& l = header.parent_locators[k];
    if (l.platform_code == vhd::platform::none) continue;
    vhd::DecodedLocator d{.index = k, .platform_code = l.platform_code};
    std::vector<std::byte> data(l.data_length);
    if (!data.empty()) co_await child.read(l.data_offset, data);
    auto decoded = vhd::decode_locator_path(l.platform_code, data);
    if (decoded.ok()) {
      d.path = decoded.value();
    } else {
      d.problem = decoded.problem().message;
    }
    locators.push_back(std::move(d));
  }
  std::vector<vhd::ParentCandidate> candidates;
  const bool explicit_parent = chain.names.empty() && !chain.finder->explicit_parent.empty();
  if (explicit_parent) {
    candidates.push_back({chain.finder->explicit_parent, "--parent"});
  } else {
    candidates = vhd::parent_candidates(locators, recorded, path);
  }
  std::vector<std::string> tried;
  for (const auto& l : locators) {
    if (!l.path) tried.push_back(fmt::format("locator {}: {}", l.index, l.problem));
  }
  for (const auto& candidate : candidates) {
    DevicePtr device;
    std::string refusal;
    std::optional<vhd::Footer> parent_footer;
    try {
      device = co_await chain.finder->open(candidate.name);
      if (device) parent_footer = co_await peek_footer(*device);
    } catch (const backends::Error& e) {
      // A locator naming an unreadable file is no reason to stop; an unreadable --parent is.
      if (explicit_parent) throw;
      tried.push_back(fmt::format("{} ({}): {}", candidate.name, candidate.source, e.what()));
      continue;
    }
    if (!device) {
      refusal = "not found";
    } else if (!parent_footer) {
      refusal = "not a VHD";
    } else if (parent_footer->unique_id != header.parent_unique_id) {
      refusal = fmt::format("unique id {}", parent_footer->unique_id.to_string());
    }
    if (!refusal.empty()) {
      if (explicit_parent) {
        backends::fail(refusal == "not found" ? std::errc::no_such_file_or_directory
                                              : std::errc::invalid_argument,
                       "vhd: {}: --parent {} is not its parent: {} (the parent has unique id {})",
                       path, candidate.name, refusal, wanted);
      }
      tried.push_back(fmt::format("{} ({}): {}", candidate.name, candidate.source, refusal));
      continue;
    }
    const std::string parent_path = device->describe();
    const bool loop = parent_path == path || chain.contains(parent_path) ||
                      parent_footer->unique_id == footer.unique_id;
    if (loop) {
      backends::fail(std::errc::invalid_argument, "vhd: {}: parent loop: {} -> {}", path,
                     chain.text(path), parent_path);
    }
    if (parent_footer->timestamp != header.parent_timestamp) {
      log::warn(
          "vhd: {}: parent {} has timestamp {}, the child recorded {}: it may have changed "
          "since the child was made",
          path, parent_path, parent_footer->timestamp, header.parent_timestamp);
    }
    // Named, not a temporary in the co_await expression: GCC 12 destroys such temporaries
    // twice in coroutines.
    VhdOptions parent_options{.read_only = true,
                              .parents = {.finder = chain.finder, .names = chain.names}};
    parent_options.parents.names.push_back(path);
    DevicePtr parent = co_await open_vhd(std::move(device), parent_options);
    if (parent->size() != size) {
      backends::fail(std::errc::invalid_argument,
                     "vhd: {}: its parent {} is {} bytes, the differencing disk {}: they must "
                     "be the same size",
                     path, parent_path, parent->size(), size);
    }
    log::debug("vhd: {}: parent {} ({})", path, parent_path, candidate.source);
    co_return parent;
  }
  std::string list;
  for (const auto& t : tried) list += (list.empty() ? "" : "; ") + t;
  // Deep in a chain, say which image was being served.
  const std::string chain_note =
      chain.names.empty() ? "" : fmt::format(" (chain: {})", chain.text(path));
  backends::fail(std::errc::no_such_file_or_directory,
                 "vhd: {}: parent not found: wanted unique id {} (name \"{}\"); tried: {}{}", path,
                 wanted, recorded, list.empty() ? "nothing (no locator and no name)" : list,
                 chain_note);
}

asio::awaitable<DevicePtr> open_dynamic(DevicePtr child, const std::string& path,
                                        const FoundFooter& found, uint64_t size, bool writable,
                                        const VhdOptions& options) {
  const vhd::Footer& footer = found.footer;
  std::array<std::byte, vhd::header_size> header_bytes;
  co_await child->read(footer.data_offset, header_bytes);
  const auto header = vhd::parse_dynamic_header(header_bytes);
  if (!header.ok()) fail_with(path, header.problem());
  auto layout = vhd::check_dynamic_header(header.value(), footer, found.data_limit);
  if (!layout.ok()) fail_with(path, layout.problem());

  std::vector<std::byte> bat_bytes(layout.value().bat_bytes);
  co_await child->read(layout.value().bat_offset, bat_bytes);
  std::vector<uint32_t> bat = vhd::decode_bat(bat_bytes, layout.value().bat_entries);
  if (auto problem = vhd::check_bat(bat, layout.value())) fail_with(path, *problem);

  const uint64_t file_size = child->size();
  if (writable && file_size % vhd::sector_size != 0) {
    log::warn(
        "vhd: {}: the file size {} is not a multiple of {}, so no block can be added; "
        "serving it read-only",
        path, file_size, vhd::sector_size);
    writable = false;
  }
  uint32_t allocated = 0;
  for (uint32_t entry : bat) allocated += entry != vhd::bat_unused;
  const bool differencing = footer.disk_type == static_cast<uint32_t>(vhd::DiskType::differencing);
  DevicePtr parent;
  if (differencing) {
    parent = co_await open_parent(*child, path, header.value(), footer, size, options);
  }
  log::debug("vhd: {}: {}, {} bytes, {} blocks of {} bytes, {} allocated", path,
             vhd::disk_type_name(footer.disk_type), size, bat.size(), layout.value().block_size,
             allocated);
  co_return vhd::make_dynamic(vhd::DynamicParams{.child = std::move(child),
                                                 .layout = layout.value(),
                                                 .bat = std::move(bat),
                                                 .footer = found.bytes,
                                                 .size = size,
                                                 .writable = writable,
                                                 .parent = std::move(parent)});
}

}  // namespace

asio::awaitable<DevicePtr> open_vhd(DevicePtr child, const VhdOptions& options) {
  const std::string path = child->describe();
  const FoundFooter found = co_await find_footer(*child, path);
  const vhd::Footer& footer = found.footer;
  if (auto problem = vhd::check_footer(footer, found.data_limit)) fail_with(path, *problem);

  const auto type = static_cast<vhd::DiskType>(footer.disk_type);
  const auto size = vhd::virtual_size(footer, options.size);
  if (!size.ok()) fail_with(path, size.problem());
  if (size.value() != footer.current_size) {
    log::info(
        "vhd: {}: virtual size {} from CHS geometry {}/{}/{} (creator \"{}\", size policy "
        "{}); current_size says {}",
        path, size.value(), footer.geometry.cylinders, footer.geometry.heads,
        footer.geometry.sectors_per_track, vhd::fourcc_text(footer.creator_app),
        vhd::size_policy_name(options.size), footer.current_size);
  }
  if (footer.features & vhd::features_temporary) {
    log::warn("vhd: {}: the footer marks this disk as temporary (features 0x{:08x})", path,
              footer.features);
  }
  bool writable = !options.read_only && child->caps().writable && !found.from_copy;

  if (type == vhd::DiskType::fixed) {
    if (found.data_limit != footer.current_size) {
      log::warn(
          "vhd: {}: the file holds {} bytes before its footer, but current_size is {}; "
          "the rest is ignored",
          path, found.data_limit, footer.current_size);
    }
    if (footer.current_size > vhd::max_dynamic_size) {
      log::warn(
          "vhd: {}: {} bytes is more than 2040 GiB: Azure takes such fixed disks, but "
          "qemu and Hyper-V cannot open them",
          path, footer.current_size);
    }
    log::debug("vhd: {}: fixed, {} bytes, creator \"{}\"", path, size.value(),
               vhd::fourcc_text(footer.creator_app));
    co_return std::make_shared<FixedVhd>(std::move(child), size.value(), writable);
  }
  co_return co_await open_dynamic(std::move(child), path, found, size.value(), writable, options);
}

}  // namespace imagenbd::formats
