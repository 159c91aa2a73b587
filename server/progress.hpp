// A progress bar for long tool runs (convert), drawn on stderr the way qemu-img -p does:
// one line rewritten in place with '\r', redrawn at most every 100 ms (and when the whole
// percentage changes), ended with a newline. Only drawn when asked for (-p) or when stderr
// is a terminal, and never in quiet or --json mode, so scripts and logs stay clean.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace imagenbd::server {

// Pure: one line of exactly `width` columns (at least 40 are used):
// " 42% [===========>                ] 420 MiB / 1000 MiB  120 MiB/s"
// The rate is left out when bytes_per_second is 0; total 0 counts as done.
std::string progress_line(uint64_t done, uint64_t total, std::size_t width,
                          uint64_t bytes_per_second = 0);

// Pure: whether a command draws progress: -p or a terminal on stderr, but never when quiet
// or printing JSON.
bool progress_wanted(bool flag, bool stderr_is_tty, bool quiet, bool json);

// Pure: redraw now? Always for the first draw and when the whole percentage moved,
// otherwise at most every `interval`.
bool progress_redraw_due(std::chrono::steady_clock::duration since_last_draw, int last_percent,
                         int percent, std::chrono::steady_clock::duration interval);

// The bar itself. Not thread-safe: call it from one thread (convert's io_context).
class ProgressBar {
 public:
  // enabled false: every call does nothing. fd: where to draw (stderr).
  explicit ProgressBar(bool enabled, int fd = 2);
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void update(uint64_t done, uint64_t total);
  // Draws 100% (total of total) and ends the line.
  void finish(uint64_t total);
  // Ends the line where it is, so that an error message starts on a fresh line.
  void abandon();

 private:
  void draw(uint64_t done, uint64_t total);

  bool enabled_;
  int fd_;
  std::size_t width_ = 80;
  bool drawn_ = false;
  int last_percent_ = -1;
  uint64_t last_done_ = 0;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
};

}  // namespace imagenbd::server
