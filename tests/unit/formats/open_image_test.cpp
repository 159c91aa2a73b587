// Format names, probing on crafted bytes, and open_image over the memory leaf.
#include "formats/open_image.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "backends/error.hpp"
#include "backends/memory.hpp"
#include "formats/vdi_layout.hpp"
#include "tests/unit/support/device_helpers.hpp"
#include "tests/unit/support/faulty_device.hpp"
#include "tests/unit/support/run.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::formats;
using imagenbd::test::bytes;
using imagenbd::test::error_of;
using imagenbd::test::FaultyDevice;
using imagenbd::test::run;
using namespace std::literals;

namespace {

constexpr uint64_t MiB = 1 << 20;

void put_vdi_signature(std::span<std::byte> at) {
  at[0] = std::byte{0x7f};
  at[1] = std::byte{0x10};
  at[2] = std::byte{0xda};
  at[3] = std::byte{0xbe};
}

}  // namespace

TEST_CASE("parse_format and format_name") {
  for (Format f : {Format::automatic, Format::raw, Format::vhd, Format::vdi}) {
    CHECK(parse_format(format_name(f)) == f);
  }
  CHECK(parse_format("vpc") == Format::vhd);  // qemu's name
  CHECK_THROWS_WITH_AS(parse_format("qcow2"), "unknown image format 'qcow2' (known: raw, vhd, vdi)",
                       std::invalid_argument);
  CHECK_THROWS_AS(parse_format("RAW"), std::invalid_argument);
  CHECK_THROWS_AS(parse_format(""), std::invalid_argument);
}

TEST_CASE("probe_format on crafted buffers") {
  std::vector<std::byte> head(512), tail(512);
  CHECK(probe_format(head, tail) == Format::raw);
  CHECK(probe_format({}, {}) == Format::raw);

  SUBCASE("VHD footer at the end (fixed disk)") {
    std::memcpy(tail.data(), "conectix", 8);
    CHECK(probe_format(head, tail) == Format::vhd);
    // A longer tail: only its last 512 bytes count.
    std::vector<std::byte> longer(1024);
    std::memcpy(longer.data() + 512, "conectix", 8);
    CHECK(probe_format(head, longer) == Format::vhd);
    std::memcpy(longer.data(), "conectix", 8);
    longer[512] = std::byte{'C'};
    CHECK(probe_format(head, longer) == Format::raw);
    // Not at the footer's start: raw.
    std::vector<std::byte> shifted(512);
    std::memcpy(shifted.data() + 1, "conectix", 8);
    CHECK(probe_format(head, shifted) == Format::raw);
    // A tail shorter than a footer cannot hold one.
    CHECK(probe_format(head, std::span(tail).first(511)) == Format::raw);
  }
  SUBCASE("VHD footer copy at 0 (dynamic disk)") {
    std::memcpy(head.data(), "conectix", 8);
    CHECK(probe_format(head, tail) == Format::vhd);
    CHECK(probe_format(std::span(head).first(8), {}) == Format::vhd);
    CHECK(probe_format(std::span(head).first(7), {}) == Format::raw);
    head[7] = std::byte{'X'};
    CHECK(probe_format(head, tail) == Format::raw);
  }
  SUBCASE("VDI signature at 0x40, little-endian") {
    put_vdi_signature(std::span(head).subspan(0x40));
    CHECK(probe_format(head, tail) == Format::vdi);
    CHECK(probe_format(std::span(head).first(0x44), {}) == Format::vdi);
    CHECK(probe_format(std::span(head).first(0x43), {}) == Format::raw);
    std::reverse(head.begin() + 0x40, head.begin() + 0x44);  // big-endian: not VDI
    CHECK(probe_format(head, tail) == Format::raw);
  }
}

TEST_CASE("open_image: a plain image opens as probed raw") {
  auto child = open_memory(MiB, "plain.img");
  run(child->write(0, bytes("\xeb\x63\x90 some boot code"), {}));
  auto image = run(open_image(child, {}));
  CHECK(image->name() == "raw");
  CHECK(image->describe() == "plain.img");
  CHECK(image->size() == MiB);
  CHECK(image->caps().writable);
  // Probed, so the guard is on.
  CHECK(error_of([&] { run(image->write(MiB - 512, bytes("conectix"), {})); }).errc() ==
        std::errc::operation_not_permitted);
  run(image->write(4096, bytes("conectix"), {}));
}

TEST_CASE("open_image: a VHD is probed and opened by the VHD layer, which checks it") {
  // Just a cookie: probed as VHD, refused with the structure and field that are wrong.
  auto child = open_memory(MiB, "/images/disk.vhd");
  run(child->write(MiB - 512, bytes("conectix\0\0\0\2\0\1\0\0"sv), {}));
  Error e = error_of([&] { run(open_image(child, {})); });
  CHECK(e.errc() == std::errc::invalid_argument);
  CHECK(std::string(e.what()).starts_with("vhd: /images/disk.vhd: footer: checksum mismatch"));
  e = error_of([&] { run(open_image(child, {.format = Format::vhd})); });
  CHECK(std::string(e.what()).starts_with("vhd: /images/disk.vhd: footer: checksum mismatch"));

  // Named raw: served as bytes, and the user may write a footer.
  auto image = run(open_image(child, {.format = Format::raw}));
  CHECK(image->name() == "raw");
  run(image->write(0, bytes("conectix"), {}));
  // (Well-formed VHDs: tests/unit/formats/vhd_test.cpp.)
}

TEST_CASE("open_image: a VDI is probed and opened, a broken one is refused by the VDI layer") {
  // A dynamic 4 MiB image: header, a block map of 4 free entries, no data.
  auto child = open_memory(1024, "disk.vdi");
  std::vector<std::byte> image(1024);
  vdi::encode_header(vdi::new_header(4 * MiB, vdi::ImageType::dynamic, Uuid{{1}}, Uuid{{2}}),
                     image);
  std::memset(image.data() + 512, 0xff, 16);
  run(child->write(0, image, {}));
  for (Format f : {Format::automatic, Format::vdi}) {
    auto disk = run(open_image(child, {.format = f}));
    CHECK(disk->name() == "vdi");
    CHECK(disk->size() == 4 * MiB);
    CHECK(disk->caps().writable);
  }
  CHECK(!run(open_image(child, {.read_only = true}))->caps().writable);

  // Just the signature: probed as VDI, refused with the field that is wrong.
  std::vector<std::byte> header(512);
  std::memcpy(header.data(), "<<< Oracle VM VirtualBox Disk Image >>>\n", 40);
  put_vdi_signature(std::span(header).subspan(0x40));
  run(child->write(0, header, {}));
  const Error e = error_of([&] { run(open_image(child, {})); });
  CHECK(e.errc() == std::errc::operation_not_supported);
  CHECK(std::string(e.what()) == "vdi: disk.vdi: header: version 0.0 is not supported (only 1.1)");
}

TEST_CASE("open_image: images smaller than 512 bytes, and empty ones") {
  auto empty = run(open_image(open_memory(0), {}));
  CHECK(empty->size() == 0);
  CHECK(empty->name() == "raw");

  auto tiny = open_memory(100);
  run(tiny->write(10, bytes("conectix"), {}));  // not at a probe position
  CHECK(run(open_image(tiny, {}))->size() == 100);
  run(tiny->write(0, bytes("conectix"), {}));
  CHECK(std::string(error_of([&] { run(open_image(tiny, {})); }).what()) ==
        "vhd: memory: the file is 100 bytes, shorter than a 512-byte footer (truncated?)");
}

TEST_CASE("open_image: read_only reaches the raw layer") {
  auto image = run(open_image(open_memory(MiB), {.read_only = true}));
  CHECK(!image->caps().writable);
  CHECK(error_of([&] { run(image->write(0, bytes("x"), {})); }).errc() ==
        std::errc::operation_not_permitted);
}

TEST_CASE("open_image: a failing probe read fails the open with the child's error") {
  for (int call = 1; call <= 2; ++call) {
    CAPTURE(call);
    auto faulty = std::make_shared<FaultyDevice>(open_memory(MiB), call, std::errc::io_error);
    CHECK(error_of([&] { run(open_image(faulty, {})); }).errc() == std::errc::io_error);
  }
}
