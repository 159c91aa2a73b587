// The copy-on-write overlay's commit view (live snapshots): begin_commit() captures the
// blocks changed since the last successful commit at one point in time, writes into
// captured blocks during the commit do not change what read_commit() returns, a failed
// commit is retried by the next one, and a reopened overlay counts every block as changed.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>  // before asio: Boost 1.74's awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/cow.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::copy_of;
using imagenbd::test::error_of;
using imagenbd::test::read;
using imagenbd::test::run;

namespace {

constexpr uint32_t bs = 4096;
constexpr uint64_t blocks = 16;
constexpr uint64_t disk = blocks * bs;

struct Stack {
  DevicePtr lower = open_memory(disk, "lower");
  DevicePtr file = open_memory(0, "overlay.cow");
  std::shared_ptr<CowDevice> cow;

  Stack() {
    std::vector<std::byte> all(disk);
    for (uint64_t i = 0; i < all.size(); ++i) all[i] = std::byte((i * 3 + 1) & 0xff);
    run(lower->write(0, all, {}));
    run(create_cow(*file, disk, {.block_size = bs, .identity = "lower"}));
    cow = open(file);
  }
  std::shared_ptr<CowDevice> open(DevicePtr f) {
    auto device = run(open_cow(lower, f, {.identity = "lower"}));
    auto c = std::dynamic_pointer_cast<CowDevice>(device);
    REQUIRE(c);
    return c;
  }
  std::vector<std::byte> committed(uint64_t index, bool* zero = nullptr) {
    std::vector<std::byte> out(cow->block_bytes(index));
    const bool z = run(cow->read_commit(index, out));
    if (zero) *zero = z;
    return out;
  }
};

std::vector<std::byte> filled(std::size_t n, int value) {
  return std::vector<std::byte>(n, std::byte(value));
}

void write(BlockDevice& d, uint64_t offset, const std::vector<std::byte>& data) {
  run(d.write(offset, data, {}));
}

}  // namespace

TEST_CASE("cow commit: a new overlay has nothing to commit, written blocks are captured") {
  Stack s;
  CHECK(run(s.cow->begin_commit()).empty());
  run(s.cow->end_commit(true));
  write(*s.cow, 3 * bs, filled(bs, 0x33));
  write(*s.cow, 5 * bs + 100, filled(10, 0x55));  // partial: completed from the lower disk
  run(s.cow->zero(9 * bs, bs, {}));
  const auto captured = run(s.cow->begin_commit());
  CHECK(captured == std::vector<uint64_t>{3, 5, 9});
  CHECK(s.committed(3) == filled(bs, 0x33));
  CHECK(s.committed(5) == read(*s.cow, 5 * bs, bs));
  bool zero = false;
  CHECK(s.committed(9, &zero) == filled(bs, 0));
  CHECK(zero);
  run(s.cow->end_commit(true));
  // Committed: nothing left for the next one.
  CHECK(run(s.cow->begin_commit()).empty());
  run(s.cow->end_commit(true));
}

TEST_CASE("cow commit: writes into captured blocks during the commit keep the view") {
  Stack s;
  write(*s.cow, 2 * bs, filled(bs, 0x22));
  write(*s.cow, 4 * bs, filled(bs, 0x44));
  write(*s.cow, 6 * bs, filled(bs, 0x66));
  run(s.cow->flush());
  const auto captured = run(s.cow->begin_commit());
  REQUIRE(captured == std::vector<uint64_t>{2, 4, 6});
  // In place would change the captured data: a partial write, a whole one, a partial
  // zero, a whole zero (trim), and a second write into a block already copied.
  write(*s.cow, 2 * bs + 10, filled(5, 0xaa));
  write(*s.cow, 4 * bs, filled(bs, 0xbb));
  run(s.cow->zero(6 * bs + 100, 100, {}));
  run(s.cow->trim(4 * bs, bs, {}));
  write(*s.cow, 2 * bs + 20, filled(5, 0xcc));
  // A block written for the first time during the commit is not in it.
  write(*s.cow, 8 * bs, filled(bs, 0x88));
  // A flush (which gives up replaced blocks) must not free the captured data.
  run(s.cow->flush());
  write(*s.cow, 10 * bs, filled(3 * bs, 0x10));  // new allocations after the flush
  run(s.cow->flush());
  CHECK(s.committed(2) == filled(bs, 0x22));
  CHECK(s.committed(4) == filled(bs, 0x44));
  CHECK(s.committed(6) == filled(bs, 0x66));
  // The export shows the new data.
  auto expect2 = filled(bs, 0x22);
  std::fill_n(expect2.begin() + 10, 5, std::byte{0xaa});
  std::fill_n(expect2.begin() + 20, 5, std::byte{0xcc});
  CHECK(read(*s.cow, 2 * bs, bs) == expect2);
  CHECK(read(*s.cow, 4 * bs, bs) == filled(bs, 0));
  auto expect6 = filled(bs, 0x66);
  std::fill_n(expect6.begin() + 100, 100, std::byte{0});
  CHECK(read(*s.cow, 6 * bs, bs) == expect6);
  run(s.cow->end_commit(true));
  // The next commit has what changed during this one.
  const auto next = run(s.cow->begin_commit());
  CHECK(next == std::vector<uint64_t>{2, 4, 6, 8, 10, 11, 12});
  CHECK(s.committed(2) == expect2);
  run(s.cow->end_commit(true));
  // The replaced captured blocks were given up and are reused after a flush; the data of
  // the live blocks stays intact, also after reopening.
  run(s.cow->flush());
  write(*s.cow, 13 * bs, filled(3 * bs, 0x13));
  run(s.cow->flush());
  CHECK(read(*s.cow, 2 * bs, bs) == expect2);
  CHECK(read(*s.cow, 6 * bs, bs) == expect6);
  CHECK(read(*s.cow, 8 * bs, bs) == filled(bs, 0x88));
  auto reopened = s.open(copy_of(*s.file));
  CHECK(read(*reopened, 2 * bs, bs) == expect2);
  CHECK(read(*reopened, 13 * bs, 3 * bs) == filled(3 * bs, 0x13));
  CHECK(read(*reopened, 10 * bs, 3 * bs) == filled(3 * bs, 0x10));
}

TEST_CASE("cow commit: a failed commit is retried by the next one") {
  Stack s;
  write(*s.cow, 1 * bs, filled(bs, 0x11));
  write(*s.cow, 7 * bs, filled(bs, 0x77));
  REQUIRE(run(s.cow->begin_commit()) == std::vector<uint64_t>{1, 7});
  write(*s.cow, 7 * bs, filled(bs, 0x78));
  write(*s.cow, 12 * bs, filled(bs, 0xcc));
  run(s.cow->end_commit(false));
  const auto retry = run(s.cow->begin_commit());
  CHECK(retry == std::vector<uint64_t>{1, 7, 12});
  CHECK(s.committed(1) == filled(bs, 0x11));
  CHECK(s.committed(7) == filled(bs, 0x78));
  run(s.cow->end_commit(true));
  CHECK(run(s.cow->begin_commit()).empty());
  run(s.cow->end_commit(true));
}

TEST_CASE("cow commit: one commit at a time") {
  Stack s;
  run(s.cow->begin_commit());
  CHECK(error_of([&] { run(s.cow->begin_commit()); }).errc() == std::errc::device_or_resource_busy);
  run(s.cow->end_commit(true));
  CHECK_NOTHROW(run(s.cow->begin_commit()));
  run(s.cow->end_commit(true));
}

TEST_CASE("cow commit: after a restart every block held counts as changed") {
  Stack s;
  write(*s.cow, 0, filled(bs, 0x01));
  run(s.cow->zero(5 * bs, bs, {}));
  run(s.cow->flush());
  run(s.cow->begin_commit());
  run(s.cow->end_commit(true));
  write(*s.cow, 14 * bs, filled(bs, 0x0e));  // not flushed: lost at the restart
  auto again = s.open(copy_of(*s.file));
  s.cow = again;
  CHECK(run(s.cow->begin_commit()) == std::vector<uint64_t>{0, 5});
  CHECK(s.committed(0) == filled(bs, 0x01));
  run(s.cow->end_commit(true));
}

TEST_CASE("cow commit: writes racing begin_commit land wholly before or after it") {
  // Many concurrent writers on one io_context, each writing its sequence number over a
  // whole block, one block each; begin_commit in the middle. Every block is either in the
  // commit with the value it had at the commit point, or not in it and unwritten then.
  Stack s;
  boost::asio::io_context context;
  constexpr int rounds = 40;
  std::vector<int> last_before(blocks, -1);  // the last value acknowledged before begin
  std::vector<int> first_after(blocks, -1);  // the first value issued after begin returned
  std::vector<int> issued(blocks, -1);
  bool begun = false, finished = false;
  uint64_t acknowledged = 0;
  std::vector<uint64_t> captured;
  std::vector<std::vector<std::byte>> view(blocks);
  std::exception_ptr error;
  for (uint64_t b = 0; b < blocks; ++b) {
    boost::asio::co_spawn(
        context,
        [&, b]() -> boost::asio::awaitable<void> {
          for (int v = 0; v < rounds; ++v) {
            if (begun && first_after[b] < 0) first_after[b] = v;
            issued[b] = v;
            const auto data = filled(bs, v + 1);
            co_await s.cow->write(b * bs, data, {});
            if (!begun) last_before[b] = v;
            ++acknowledged;
          }
        },
        [&](std::exception_ptr e) {
          if (e) error = e;
        });
  }
  boost::asio::co_spawn(
      context,
      [&]() -> boost::asio::awaitable<void> {
        // Begin half-way through the writes.
        while (acknowledged < blocks * rounds / 2)
          co_await boost::asio::post(context, boost::asio::use_awaitable);
        captured = co_await s.cow->begin_commit();
        begun = true;
        for (uint64_t b : captured) {
          view[b].resize(bs);
          co_await s.cow->read_commit(b, view[b]);
        }
        co_await s.cow->end_commit(true);
        finished = true;
      },
      [&](std::exception_ptr e) {
        if (e) error = e;
      });
  context.run();
  if (error) std::rethrow_exception(error);
  REQUIRE(finished);
  for (uint64_t b = 0; b < blocks; ++b) {
    INFO("block " << b);
    const bool in = std::find(captured.begin(), captured.end(), b) != captured.end();
    if (last_before[b] >= 0) CHECK(in);
    if (!in) continue;
    const int value = std::to_integer<int>(view[b][0]) - 1;
    CHECK(view[b] == filled(bs, value + 1));  // never a mix of two writes
    CHECK(value >= last_before[b]);
    if (first_after[b] >= 0) CHECK(value < first_after[b]);
  }
  // Something raced: some writes were acknowledged before the commit, some after.
  CHECK(std::any_of(last_before.begin(), last_before.end(), [](int v) { return v >= 0; }));
  CHECK(std::any_of(first_after.begin(), first_after.end(), [](int v) { return v > 0; }));
}
