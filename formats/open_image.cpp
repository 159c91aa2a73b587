// Format probing and opening. Magic numbers: VHD footer cookie "conectix" (VHD spec
// "Hard Disk Footer Format"; fixed disks have it only at EOF, dynamic ones also at 0);
// VDI pre-header signature 0xBEDA107F, little-endian, at 0x40 (qemu block/vdi.c).
// Probing errs on the side of "not raw": a false positive asks for --format=raw, while a
// false negative would let a guest-written header change the format on the next open.
#include "formats/open_image.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/log.hpp"
#include "formats/raw.hpp"
#include "formats/vdi.hpp"
#include "formats/vhd.hpp"

namespace imagenbd::formats {

namespace {

constexpr std::size_t vhd_footer_size = 512;
constexpr char vhd_cookie[8] = {'c', 'o', 'n', 'e', 'c', 't', 'i', 'x'};
constexpr std::size_t vdi_signature_offset = 0x40;
constexpr uint32_t vdi_signature = 0xBEDA107F;
constexpr uint64_t probe_bytes = 512;  // read at each end of the image

bool has_vhd_cookie(std::span<const std::byte> at) {
  return at.size() >= sizeof vhd_cookie &&
         std::memcmp(at.data(), vhd_cookie, sizeof vhd_cookie) == 0;
}

uint32_t load_le32(const std::byte* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

std::string_view upper_name(Format format) {
  return format == Format::vhd ? "VHD" : "VDI";
}

}  // namespace

Format parse_format(std::string_view name) {
  if (name == "raw") return Format::raw;
  if (name == "vhd" || name == "vpc") return Format::vhd;
  if (name == "vdi") return Format::vdi;
  if (name == "auto") return Format::automatic;
  throw std::invalid_argument(
      fmt::format("unknown image format '{}' (known: raw, vhd, vdi)", name));
}

std::string_view format_name(Format format) {
  switch (format) {
    case Format::automatic:
      return "auto";
    case Format::raw:
      return "raw";
    case Format::vhd:
      return "vhd";
    case Format::vdi:
      return "vdi";
  }
  return "?";
}

Format probe_format(std::span<const std::byte> head, std::span<const std::byte> tail) {
  if (head.size() >= vdi_signature_offset + 4 &&
      load_le32(head.data() + vdi_signature_offset) == vdi_signature) {
    return Format::vdi;
  }
  if (tail.size() >= vhd_footer_size && has_vhd_cookie(tail.last(vhd_footer_size))) {
    return Format::vhd;
  }
  if (has_vhd_cookie(head)) return Format::vhd;
  return Format::raw;
}

asio::awaitable<Format> probe_device(backends::BlockDevice& child) {
  // Images shorter than 512 bytes are read whole, as head and as tail.
  const uint64_t size = child.size();
  const std::size_t length = static_cast<std::size_t>(std::min(size, probe_bytes));
  std::vector<std::byte> head(length), tail(length);
  if (length > 0) {
    co_await child.read(0, head);
    co_await child.read(size - length, tail);
  }
  co_return probe_format(head, tail);
}

asio::awaitable<DevicePtr> open_image(DevicePtr child, ImageOptions options) {
  Format format = options.format;
  const bool probed = format == Format::automatic;
  if (probed) {
    format = co_await probe_device(*child);
    log::debug("open_image: {}: probed format {}", child->describe(), format_name(format));
  }
  if (format == Format::raw) {
    co_return open_raw(std::move(child),
                       RawOptions{.read_only = options.read_only, .probed = probed});
  }
  if (format == Format::vhd) {
    // Named, not a temporary inside co_await: GCC 12 destroys such temporaries twice when
    // they hold a non-empty vector (the parent chain below the top image).
    const VhdOptions vhd_options{
        .read_only = options.read_only, .size = options.vhd_size, .parents = options.parents};
    co_return co_await open_vhd(std::move(child), vhd_options);
  }
  if (format == Format::vdi) {
    const VdiOptions vdi_options{.read_only = options.read_only, .parents = options.parents};
    co_return co_await open_vdi(std::move(child), vdi_options);
  }
  if (probed) {
    backends::fail(std::errc::operation_not_supported,
                   "{}: image is {}; {} support is not built yet (use --format=raw to serve the "
                   "bytes as they are)",
                   child->describe(), upper_name(format), upper_name(format));
  }
  backends::fail(
      std::errc::operation_not_supported,
      "{}: {} support is not built yet (use --format=raw to serve the bytes as they are)",
      child->describe(), upper_name(format));
}

}  // namespace imagenbd::formats
