// `imagenbd check-config [--json] FILE`: everything `serve --config FILE` would check
// before opening the images (apply_config_file), plus that the files it names can be
// read (check_config_files). Exit 0 valid, 1 invalid, 2 usage error.
#include <getopt.h>

#include <cstdio>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "server/config.hpp"
#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

const char* check_config_help() {
  return R"help(Usage: imagenbd check-config [--json] FILE

Check an imagenbd configuration file (TOML) without serving it: its syntax, every key
and value, and that the local image files, parents, TLS certificates or PSK file and
credential files it names exist and can be read. No image is opened and no blob is
contacted.

Prints "FILE: OK, N exports (NAMES)" and exits 0, or prints what is wrong (FILE:LINE,
the key, what to do) and exits 1. Exit status 2: a usage error.

Options:
      --json      print {"file":..., "valid":true|false, "exports":[{"name", "image"}]}
                  (or "error") instead
  -h, --help      print this help and exit

Example:
  imagenbd check-config /etc/imagenbd/imagenbd.toml
)help";
}

}  // namespace

int tool_check_config(int argc, char** argv) {
  enum : int { opt_json = 1000 };
  static const option long_options[] = {
      {"json", no_argument, nullptr, opt_json},
      {"help", no_argument, nullptr, 'h'},
      {nullptr, 0, nullptr, 0},
  };
  bool json = false;
  ::optind = 0;
  ::opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "h", long_options, nullptr)) != -1) {
    switch (c) {
      case opt_json:
        json = true;
        break;
      case 'h':
        std::fputs(check_config_help(), stdout);
        return 0;
      default:
        return usage_error("check-config", std::string("unknown option ") + argv[::optind - 1], 2);
    }
  }
  if (argc - ::optind != 1) {
    return usage_error(
        "check-config",
        argc == ::optind ? "no configuration file given" : "one configuration file at a time", 2);
  }
  ServeCommand cmd;
  cmd.config_file = argv[::optind];
  try {
    apply_config_file(cmd);
    check_config_files(cmd);
  } catch (const std::exception& e) {
    if (json) {
      std::printf("{\"file\":%s,\"valid\":false,\"error\":%s}\n",
                  json_string(cmd.config_file).c_str(), json_string(e.what()).c_str());
    } else {
      std::fprintf(stderr, "imagenbd check-config: %s\n", e.what());
    }
    return 1;
  }
  if (json) {
    std::string exports;
    for (const auto& spec : cmd.exports) {
      if (!exports.empty()) exports += ',';
      exports += fmt::format("{{\"name\":{},\"image\":{}}}", json_string(spec.name),
                             json_string(spec.image));
    }
    std::printf("{\"file\":%s,\"valid\":true,\"exports\":[%s]}\n",
                json_string(cmd.config_file).c_str(), exports.c_str());
    return 0;
  }
  std::vector<std::string> names;
  for (const auto& spec : cmd.exports) names.push_back(spec.name.empty() ? "\"\"" : spec.name);
  std::printf("%s: OK, %zu export%s (%s)\n", cmd.config_file.c_str(), cmd.exports.size(),
              cmd.exports.size() == 1 ? "" : "s",
              fmt::format("{}", fmt::join(names, ", ")).c_str());
  return 0;
}

}  // namespace imagenbd::server
