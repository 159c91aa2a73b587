// The progress bar: see progress.hpp.
#include "server/progress.hpp"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>

#include <fmt/format.h>

#include "server/tool_common.hpp"

namespace imagenbd::server {

namespace {

constexpr std::size_t min_width = 40;
constexpr std::size_t max_width = 120;
constexpr auto redraw_interval = std::chrono::milliseconds(100);

// floor(done * scale / total), below scale until done reaches total (doubles are not exact
// for sizes past 2^53 bytes; the clamp keeps "100%" for the end).
uint64_t scaled(uint64_t done, uint64_t total, uint64_t scale) {
  const auto v = static_cast<uint64_t>(static_cast<double>(done) * static_cast<double>(scale) /
                                       static_cast<double>(total));
  return std::min(v, scale - 1);
}

int percent_of(uint64_t done, uint64_t total) {
  if (total == 0 || done >= total) return 100;
  return static_cast<int>(scaled(done, total, 100));
}

void write_all(int fd, const std::string& text) {
  std::size_t at = 0;
  while (at < text.size()) {
    const ssize_t n = ::write(fd, text.data() + at, text.size() - at);
    if (n <= 0) return;  // progress is best effort: a closed stderr must not fail the copy
    at += static_cast<std::size_t>(n);
  }
}

}  // namespace

std::string progress_line(uint64_t done, uint64_t total, std::size_t width,
                          uint64_t bytes_per_second) {
  width = std::max(width, min_width);
  done = std::min(done, total);
  const int percent = percent_of(done, total);
  const std::string head = fmt::format("{:>3}% [", percent);
  std::string tail = fmt::format("] {} / {}", human_size(done), human_size(total));
  if (bytes_per_second) tail += fmt::format("  {}/s", human_size(bytes_per_second));
  // The bar takes what is left, at least 10 columns (narrow terminals get a longer line).
  const std::size_t bar = std::max<std::size_t>(
      10, width > head.size() + tail.size() ? width - head.size() - tail.size() : 0);
  const std::size_t filled = total == 0      ? bar
                             : done >= total ? bar
                                             : static_cast<std::size_t>(scaled(done, total, bar));
  std::string line = head;
  line.append(filled, '=');
  if (filled < bar) {
    line += '>';
    line.append(bar - filled - 1, ' ');
  }
  line += tail;
  if (line.size() < width) line.append(width - line.size(), ' ');
  return line;
}

bool progress_wanted(bool flag, bool stderr_is_tty, bool quiet, bool json) {
  return (flag || stderr_is_tty) && !quiet && !json;
}

bool progress_redraw_due(std::chrono::steady_clock::duration since_last_draw, int last_percent,
                         int percent, std::chrono::steady_clock::duration interval) {
  return last_percent < 0 || percent != last_percent || since_last_draw >= interval;
}

ProgressBar::ProgressBar(bool enabled, int fd)
    : enabled_(enabled), fd_(fd), start_(std::chrono::steady_clock::now()) {
  if (!enabled_) return;
  winsize ws{};
  // One column short of the terminal: a line that fills it would wrap on some terminals.
  if (::ioctl(fd_, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1) {
    width_ = std::min<std::size_t>(ws.ws_col - 1, max_width);
  }
}

void ProgressBar::draw(uint64_t done, uint64_t total) {
  const auto now = std::chrono::steady_clock::now();
  const double seconds = std::chrono::duration<double>(now - start_).count();
  const uint64_t rate = seconds >= 0.5 ? static_cast<uint64_t>(done / seconds) : 0;
  write_all(fd_, "\r" + progress_line(done, total, width_, rate));
  drawn_ = true;
  last_draw_ = now;
  last_percent_ = percent_of(done, total);
  last_done_ = done;
}

void ProgressBar::update(uint64_t done, uint64_t total) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (progress_redraw_due(now - last_draw_, last_percent_, percent_of(done, total),
                          redraw_interval)) {
    draw(done, total);
  }
}

void ProgressBar::finish(uint64_t total) {
  if (!enabled_) return;
  if (!drawn_ || last_done_ != total) draw(total, total);
  write_all(fd_, "\n");
  enabled_ = false;
}

void ProgressBar::abandon() {
  if (!enabled_) return;
  if (drawn_) write_all(fd_, "\n");
  enabled_ = false;
}

}  // namespace imagenbd::server
