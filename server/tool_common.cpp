#include "server/tool_common.hpp"

#include <getopt.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include <fmt/format.h>

namespace imagenbd::server {

std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += fmt::format("\\u{:04x}", static_cast<unsigned>(static_cast<unsigned char>(c)));
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

std::string human_size(uint64_t bytes) {
  static constexpr std::array<const char*, 7> units{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  std::size_t unit = 0;
  while (unit + 1 < units.size() && bytes >= (uint64_t{1} << (10 * (unit + 1)))) ++unit;
  if (unit == 0) return fmt::format("{} B", bytes);
  const uint64_t scale = uint64_t{1} << (10 * unit);
  if (bytes % scale == 0) return fmt::format("{} {}", bytes / scale, units[unit]);
  const double value = static_cast<double>(bytes) / static_cast<double>(scale);
  // 3 significant digits, as qemu's size_to_str does ("1.5 GiB", "20.5 KiB", "127 GiB").
  std::string text = fmt::format("{:.3g}", value);
  if (text.find('e') != std::string::npos) text = fmt::format("{:.0f}", value);
  return fmt::format("{} {}", text, units[unit]);
}

int usage_error(const char* tool, const std::string& message, int status) {
  std::fprintf(stderr, "imagenbd %s: %s\nTry 'imagenbd %s --help' for more information.\n", tool,
               message.c_str(), tool);
  return status;
}

std::optional<int> parse_image_command(int argc, char** argv, const char* tool, const char* help,
                                       int usage_status, ImageCommand& command) {
  enum : int { opt_json = 1000, opt_output };
  static const option long_options[] = {
      {"format", required_argument, nullptr, 'f'},
      {"json", no_argument, nullptr, opt_json},
      {"output", required_argument, nullptr, opt_output},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0},
  };
  auto usage = [&](const std::string& message) { return usage_error(tool, message, usage_status); };
  optind = 0;
  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "f:h", long_options, nullptr)) != -1) {
    switch (c) {
      case 'f':
        try {
          command.format = formats::parse_format(optarg);
        } catch (const std::invalid_argument& e) {
          return usage(e.what());
        }
        break;
      case opt_json:
        command.json = true;
        break;
      case opt_output:
        if (std::strcmp(optarg, "json") == 0) {
          command.json = true;
        } else if (std::strcmp(optarg, "human") == 0) {
          command.json = false;
        } else {
          return usage(fmt::format("invalid --output '{}' (human or json)", optarg));
        }
        break;
      case 'h':
        std::fputs(help, stdout);
        return 0;
      default:
        return usage(fmt::format("unknown or incomplete option '{}'", argv[optind - 1]));
    }
  }
  if (optind + 1 != argc) {
    return usage(optind == argc ? "no image given" : "exactly one image expected");
  }
  command.path = argv[optind];
  return std::nullopt;
}

}  // namespace imagenbd::server
