// parse_serve from a list of arguments, for the `serve` command-line tests (cli_test,
// cli_azure_test, config_test).
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "server/cli.hpp"

namespace imagenbd::test {

// parse_serve of `serve ARGS...`.
inline server::ServeCommand parse_serve_args(std::vector<std::string> args) {
  args.insert(args.begin(), "serve");
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  return server::parse_serve(static_cast<int>(args.size()), argv.data());
}
inline server::ServeCommand parse_serve_args(std::initializer_list<const char*> args) {
  return parse_serve_args(std::vector<std::string>(args.begin(), args.end()));
}

// The UsageError's message for `serve ARGS...`, or "no error".
inline std::string serve_usage_error(std::initializer_list<const char*> args) {
  try {
    parse_serve_args(args);
  } catch (const server::UsageError& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace imagenbd::test
