// The progress bar as pure functions: its line for done/total/width, when it is drawn at
// all, and when it is redrawn.
#include <doctest/doctest.h>

#include <chrono>
#include <string>

#include "server/progress.hpp"

using namespace imagenbd::server;
using namespace std::chrono_literals;

TEST_CASE("progress_line fills exactly the width it is given") {
  constexpr uint64_t mib = 1 << 20;
  for (std::size_t width : {40u, 79u, 120u}) {
    for (uint64_t done : {uint64_t{0}, 1 * mib, 50 * mib, 99 * mib, 100 * mib}) {
      const std::string line = progress_line(done, 100 * mib, width);
      CHECK(line.size() == width);
      CHECK(line.find('[') == 5);
    }
  }
  CHECK(progress_line(10, 100, 20).size() == 40);  // narrower asks get the minimum
}

TEST_CASE("progress_line shows the percentage, the bar and the sizes") {
  constexpr uint64_t mib = 1 << 20;
  const std::string half = progress_line(50 * mib, 100 * mib, 60);
  CHECK(half.starts_with(" 50% [===="));
  CHECK(half.find("] 50 MiB / 100 MiB") != std::string::npos);
  const std::string bar = half.substr(6, half.find(']') - 6);
  const auto filled = bar.find('>');
  CHECK(filled == bar.size() / 2);

  const std::string none = progress_line(0, 100 * mib, 60);
  CHECK(none.starts_with("  0% [>"));
  const std::string all = progress_line(100 * mib, 100 * mib, 60);
  CHECK(all.starts_with("100% [===="));
  CHECK(all.find('>') == std::string::npos);
  CHECK(all.find(" ]") == std::string::npos);
  // Not finished is never 100%, however close.
  CHECK(progress_line((uint64_t{1} << 60) - 1, uint64_t{1} << 60, 60).starts_with(" 99%"));
  // Nothing to copy counts as done; done past total is clamped.
  CHECK(progress_line(0, 0, 60).starts_with("100%"));
  CHECK(progress_line(200, 100, 60).starts_with("100%"));
  CHECK(progress_line(mib, 2 * mib, 80, 120 * mib).find("  120 MiB/s") != std::string::npos);
}

TEST_CASE("progress is drawn on a terminal or with -p, never quiet or with --json") {
  CHECK(progress_wanted(true, false, false, false));
  CHECK(progress_wanted(false, true, false, false));
  CHECK_FALSE(progress_wanted(false, false, false, false));
  CHECK_FALSE(progress_wanted(true, true, true, false));
  CHECK_FALSE(progress_wanted(true, true, false, true));
}

TEST_CASE("redraws are rate-limited unless the percentage moves") {
  CHECK(progress_redraw_due(0ms, -1, 0, 100ms));  // the first draw
  CHECK_FALSE(progress_redraw_due(10ms, 5, 5, 100ms));
  CHECK(progress_redraw_due(10ms, 5, 6, 100ms));
  CHECK(progress_redraw_due(100ms, 5, 5, 100ms));
}
