// What the pure on-disk codecs (vhd_layout, vdi_layout) return: a value, or a Problem that
// names the structure, the field and the numbers. Codecs never throw or log (they are
// fuzzable); the format layer turns a Problem into backends::Error with the file's name.
#pragma once

#include <string>
#include <system_error>
#include <utility>
#include <variant>

namespace imagenbd::formats {

struct Problem {
  std::errc code = std::errc::invalid_argument;
  std::string message;
};

template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Problem problem) : v_(std::move(problem)) {}
  bool ok() const { return v_.index() == 0; }
  const T& value() const { return std::get<0>(v_); }
  const Problem& problem() const { return std::get<1>(v_); }

 private:
  std::variant<T, Problem> v_;
};

}  // namespace imagenbd::formats
