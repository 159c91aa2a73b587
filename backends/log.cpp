#include "backends/log.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>

namespace imagenbd::log {

namespace detail {
std::atomic<int> max_level{static_cast<int>(Level::info)};
std::atomic<bool> control_on{false};
std::atomic<bool> data_on{false};
}  // namespace detail

namespace {

// journald sets JOURNAL_STREAM for services whose stderr goes to the journal.
bool to_journal() {
  static const bool journal = std::getenv("JOURNAL_STREAM") != nullptr;
  return journal;
}

std::string_view level_name(Level level) {
  switch (level) {
    case Level::error: return "error";
    case Level::warning: return "warning";
    case Level::notice: return "notice";
    case Level::info: return "info";
    case Level::debug: return "debug";
  }
  return "?";
}

}  // namespace

void configure(const Settings& settings) {
  int level = static_cast<int>(settings.level);
  if (settings.control_debug || settings.data_debug) level = static_cast<int>(Level::debug);
  detail::max_level.store(level);
  detail::control_on.store(settings.control_debug);
  detail::data_on.store(settings.data_debug);
}

void write(Level level, std::string_view line) {
  std::string out;
  out.reserve(line.size() + 48);
  if (to_journal()) {
    out = fmt::format("<{}>{}\n", static_cast<int>(level), line);
  } else {
    std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
    out = fmt::format("{} imagenbd[{}]: {}: {}\n", stamp, ::getpid(), level_name(level), line);
  }
  // One write(2) per line keeps lines whole when several threads log at once.
  const char* p = out.data();
  std::size_t left = out.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n <= 0) break;
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

std::string printable(std::string_view text, std::size_t limit) {
  std::string out;
  for (char c : text.substr(0, limit)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (text.size() > limit) out += "...";
  return out;
}

}  // namespace imagenbd::log
