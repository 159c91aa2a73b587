// The raw format over the memory leaf: forwarding, the read-only mask, the probed-raw guard.
#include "formats/raw.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "backends/error.hpp"
#include "backends/file.hpp"
#include "backends/memory.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/faulty_device.hpp"
#include "tests/unit/support/run.hpp"
#include "tests/unit/support/temp_dir.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::bytes;
using imagenbd::test::error_of;
using imagenbd::test::FaultyDevice;
using imagenbd::test::read;
using imagenbd::test::run;
using imagenbd::test::TempDir;
using namespace std::literals;

namespace {

constexpr uint64_t MiB = 1 << 20;

const auto vdi_signature =
    std::vector<std::byte>{std::byte{0x7f}, std::byte{0x10}, std::byte{0xda}, std::byte{0xbe}};

}  // namespace

TEST_CASE("raw: forwards everything to its child") {
  auto child = open_memory(4 * MiB, "disk.img");
  auto raw = open_raw(child, {});
  CHECK(raw->name() == "raw");
  CHECK(raw->describe() == "disk.img");
  CHECK(raw->size() == 4 * MiB);
  const Caps c = raw->caps();
  CHECK((c.writable && c.fua && c.trim && c.zero && c.fast_zero && c.extents && c.multi_conn));

  const auto data = bytes("hello, raw world");
  run(raw->write(MiB + 3, data, {}));
  CHECK(read(*child, MiB + 3, data.size()) == data);
  CHECK(read(*raw, MiB + 3, data.size()) == data);
  CHECK(run(raw->extents(0, 4 * MiB)) == run(child->extents(0, 4 * MiB)));
  run(raw->zero(MiB, MiB, {}));
  CHECK(read(*child, MiB + 3, data.size()) == std::vector<std::byte>(data.size()));
  run(raw->trim(0, MiB, {}));
  run(raw->flush());
  run(raw->prefetch(0, MiB));
  CHECK(run(raw->extents(0, 4 * MiB)) == std::vector<Extent>{{4 * MiB, ExtentKind::hole}});
}

// The session skips the extents walk before a structured read when the stack says no
// holes are possible: raw must pass its child's answer up, not the default (caps).
TEST_CASE("raw: may_have_holes is its child's") {
  TempDir dir("raw");
  const std::string path = dir.file("full.img");
  {
    std::ofstream f(path, std::ios::binary);
    const std::string block(MiB, 'x');
    f.write(block.data(), static_cast<std::streamsize>(block.size()));
  }
  auto raw = open_raw(open_file(path, {}), {});
  CHECK(raw->caps().extents);
  CHECK_FALSE(raw->may_have_holes());  // fully allocated
  run(raw->trim(0, 64 << 10, {}));
  CHECK(raw->may_have_holes());
}

TEST_CASE("raw: child errors come through unchanged") {
  auto raw = open_raw(
      std::make_shared<FaultyDevice>(open_memory(MiB), 2, std::errc::no_space_on_device), {});
  run(raw->write(0, bytes("ok"), {}));  // call 1
  const Error e = error_of([&] { run(raw->write(0, bytes("full"), {})); });
  CHECK(e.errc() == std::errc::no_space_on_device);
  CHECK(std::string(e.what()).find("injected failure of call 2 (write)") != std::string::npos);
}

TEST_CASE("raw: read_only masks the write caps and refuses writes with EPERM") {
  auto child = open_memory(MiB, "ro.img");
  run(child->write(0, bytes("data"), {}));
  auto raw = open_raw(child, {.read_only = true, .probed = true});
  const Caps c = raw->caps();
  CHECK(!c.writable);
  CHECK(!c.fua);
  CHECK(!c.trim);
  CHECK(!c.zero);
  CHECK(!c.fast_zero);
  CHECK((c.flush && c.extents && c.cache && c.multi_conn));
  for (auto op : {0, 1, 2}) {
    const Error e = error_of([&] {
      if (op == 0) run(raw->write(0, bytes("x"), {}));
      if (op == 1) run(raw->trim(0, 10, {}));
      if (op == 2) run(raw->zero(0, 10, {}));
    });
    CHECK(e.errc() == std::errc::operation_not_permitted);
    CHECK(std::string(e.what()).find("raw: ro.img: ") == 0);
  }
  CHECK(read(*raw, 0, 4) == bytes("data"));
}

TEST_CASE("raw: probed and writable refuses writes that would make it probe as VHD or VDI") {
  auto child = open_memory(MiB, "guest.img");
  auto raw = open_raw(child, {.probed = true});
  const uint64_t last = MiB - 512;

  Error e = error_of([&] { run(raw->write(0, bytes("conectix"), {})); });
  CHECK(e.errc() == std::errc::operation_not_permitted);
  CHECK(std::string(e.what()) ==
        "raw: guest.img: refusing a write that would make the image look like VHD (format was "
        "probed; use --format=raw)");
  CHECK(read(*child, 0, 8) == std::vector<std::byte>(8));  // nothing written

  // The footer position at size - 512, inside a bigger write too.
  std::vector<std::byte> footer(4096);
  std::memcpy(footer.data() + 4096 - 512, "conectix", 8);
  CHECK(error_of([&] { run(raw->write(MiB - 4096, footer, {})); }).errc() ==
        std::errc::operation_not_permitted);

  // VDI signature at 0x40, little-endian.
  e = error_of([&] { run(raw->write(0x40, vdi_signature, {})); });
  CHECK(std::string(e.what()).find("look like VDI") != std::string::npos);

  // Built up from two partial writes: the second completes the magic and is refused.
  run(raw->write(0, bytes("cone"), {}));
  CHECK(error_of([&] { run(raw->write(4, bytes("ctix"), {})); }).errc() ==
        std::errc::operation_not_permitted);
  CHECK(read(*child, 0, 8) == bytes("cone\0\0\0\0"sv));

  // Ordinary writes pass, including to block 0, the last sector and near the magics.
  run(raw->write(0, bytes("\xeb\x63\x90MBR boot sector"), {}));
  run(raw->write(4, bytes("ctix"), {}));  // "\xeb\x63\x90Mctix" is not a cookie
  run(raw->write(last + 1, bytes("conectix"), {}));
  run(raw->write(last, bytes("Conectix"), {}));
  run(raw->write(0x41, vdi_signature, {}));
  run(raw->write(MiB / 2, bytes("conectix"), {}));
  CHECK(read(*child, last, 8) == bytes("Conectix"));
  CHECK(read(*child, MiB / 2, 8) == bytes("conectix"));

  // zero over the magic area is fine: it can only remove a magic.
  run(raw->zero(0, 512, {}));
}

TEST_CASE("raw: the guard is off when the user named the format") {
  auto child = open_memory(MiB);
  auto raw = open_raw(child, {.probed = false});
  run(raw->write(0, bytes("conectix"), {}));
  run(raw->write(0x40, vdi_signature, {}));
  CHECK(read(*child, 0, 8) == bytes("conectix"));
}

TEST_CASE("raw: the guard works on images smaller than the probe window") {
  auto child = open_memory(100);
  auto raw = open_raw(child, {.probed = true});
  CHECK(error_of([&] { run(raw->write(0, bytes("conectix"), {})); }).errc() ==
        std::errc::operation_not_permitted);
  run(raw->write(50, bytes("conectix"), {}));
  CHECK(read(*child, 50, 8) == bytes("conectix"));
}
