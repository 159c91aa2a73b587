#include "formats/check_report.hpp"

#include <array>
#include <cctype>
#include <sstream>
#include <string_view>

#include "backends/error.hpp"

namespace imagenbd::formats {

std::string problem_field(const std::string& message) {
  std::string_view rest = message;
  const auto colon = rest.find(": ");
  if (colon != std::string_view::npos) rest.remove_prefix(colon + 2);
  static constexpr std::array<std::string_view, 22> stops{
      "is",      "are",     "does",  "has",      "have",   "lies",     "lie",     "extends",
      "with",    "without", "gives", "mismatch", "points", "overlaps", "overlap", "runs",
      "differs", "cannot",  "marks", "of",       "at",     "and"};
  std::istringstream words{std::string(rest)};
  std::string word, field;
  while (words >> word) {
    const unsigned char first = static_cast<unsigned char>(word[0]);
    if (std::isdigit(first) || first == '"' || first == '(' || first == '\'') break;
    bool stop = false;
    for (auto s : stops) stop = stop || word == s;
    if (stop) break;
    if (!field.empty()) field += ' ';
    field += word;
  }
  return field;
}

boost::asio::awaitable<void> check_open(boost::asio::awaitable<backends::DevicePtr> open,
                                        bool differencing, CheckReport& report) {
  const std::size_t errors_before = report.errors.size();
  std::string failure;
  std::errc code{};
  try {
    co_await std::move(open);
  } catch (const backends::Error& e) {
    failure = e.what();
    code = e.errc();
  }
  if (failure.empty()) co_return;
  if (code == std::errc::operation_not_supported) {
    if (differencing) {
      report.warning("parent", "link", "parent link not checked: " + failure);
    } else {
      report.warning("image", "", "imagenbd does not serve this image: " + failure);
    }
  } else if (differencing && errors_before == 0) {
    report.error("parent", "link", failure);
  } else if (errors_before == 0) {
    report.error("image", problem_field(failure), failure);
  }
}

}  // namespace imagenbd::formats
