// Logging: one line per event on stderr. Under systemd (JOURNAL_STREAM set) each line
// starts with a <N> syslog priority prefix, which journald reads; on a terminal the line
// carries a timestamp and the level instead. Two debug switches, as in nbdkit: control
// path (open, handshake, config) and data path (one line per request).
#pragma once

#include <atomic>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace imagenbd::log {

enum class Level : int { error = 3, warning = 4, notice = 5, info = 6, debug = 7 };

struct Settings {
  Level level = Level::info;  // lines above this priority are dropped
  bool control_debug = false;
  bool data_debug = false;
};

void configure(const Settings& settings);
void write(Level level, std::string_view line);

// Text from outside (a name a client sent, a value in a server's response) made safe to
// quote in a log line or an error message: printable ASCII, '?' for any other byte, at
// most `limit` characters and then "...".
std::string printable(std::string_view text, std::size_t limit);

namespace detail {
extern std::atomic<int> max_level;
extern std::atomic<bool> control_on;
extern std::atomic<bool> data_on;
}  // namespace detail

inline bool enabled(Level level) {
  return static_cast<int>(level) <= detail::max_level.load(std::memory_order_relaxed);
}
inline bool control_enabled() { return detail::control_on.load(std::memory_order_relaxed); }
inline bool data_enabled() { return detail::data_on.load(std::memory_order_relaxed); }

template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... a) {
  if (enabled(Level::error)) write(Level::error, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... a) {
  if (enabled(Level::warning)) write(Level::warning, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void notice(fmt::format_string<Args...> f, Args&&... a) {
  if (enabled(Level::notice)) write(Level::notice, fmt::format(f, std::forward<Args>(a)...));
}
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... a) {
  if (enabled(Level::info)) write(Level::info, fmt::format(f, std::forward<Args>(a)...));
}
// Control-path debugging: handshakes, opens, configuration.
template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... a) {
  if (control_enabled()) write(Level::debug, fmt::format(f, std::forward<Args>(a)...));
}
// Data-path debugging: one line per request. Check data_enabled() first on hot paths
// when building the arguments costs something.
template <typename... Args>
void data(fmt::format_string<Args...> f, Args&&... a) {
  if (data_enabled()) write(Level::debug, fmt::format(f, std::forward<Args>(a)...));
}

}  // namespace imagenbd::log
