// The pure parts of `imagenbd convert`: argument parsing (qemu-img's spellings, --azure
// and what it refuses), the output size (512 rounding, Azure's whole MiB), the zero
// detection that keeps outputs sparse, and the --json summary.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "server/tool_convert.hpp"

using imagenbd::formats::Format;
using namespace imagenbd::server;

namespace {

constexpr uint64_t mib = 1 << 20;

ConvertCommand parse(std::vector<std::string> args) {
  args.insert(args.begin(), "convert");
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  return parse_convert(static_cast<int>(args.size()), argv.data());
}

std::string parse_error(std::vector<std::string> args) {
  try {
    parse(std::move(args));
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(accepted)";
}

}  // namespace

TEST_CASE("convert parses formats, subformats and flags") {
  const auto c = parse({"-f", "raw", "-O", "vpc", "--subformat", "fixed", "-p", "--json", "--force",
                        "in.img", "out.vhd"});
  CHECK(c.in_format == Format::raw);
  CHECK(c.out_format == Format::vhd);
  CHECK(c.subformat == "fixed");
  CHECK(c.progress);
  CHECK(c.json);
  CHECK(c.force);
  CHECK_FALSE(c.quiet);
  CHECK_FALSE(c.azure);
  CHECK(c.in == "in.img");
  CHECK(c.out == "out.vhd");

  const auto d = parse({"-O", "vdi", "--block-size", "1M", "-q", "a", "b"});
  CHECK(d.in_format == Format::automatic);
  CHECK(d.subformat.empty());
  CHECK(d.block_size == mib);
  CHECK(d.quiet);
  CHECK(parse({"--help"}).help);
}

TEST_CASE("convert takes qemu-img's -o list") {
  const auto c = parse({"-O", "vpc", "-o", "subformat=fixed,force_size=on", "a", "b"});
  CHECK(c.subformat == "fixed");
  const auto d = parse({"-O", "vhd", "-o", "block_size=512K", "a", "b"});
  CHECK(d.block_size == 512 * 1024);
  CHECK(parse({"-O", "vdi", "-o", "static", "a", "b"}).subformat == "static");
  CHECK(
      parse_error({"-O", "vhd", "-o", "compat=1.1", "a", "b"}).find("unknown -o option 'compat'") !=
      std::string::npos);
  CHECK(parse_error({"-O", "vhd", "-o", "force_size=maybe", "a", "b"}).find("force_size") !=
        std::string::npos);
}

TEST_CASE("--azure means a fixed VHD and refuses anything else") {
  const auto c = parse({"--azure", "in.img", "out.vhd"});
  CHECK(c.azure);
  CHECK(c.out_format == Format::vhd);
  CHECK(c.subformat == "fixed");
  CHECK(parse({"--azure", "-O", "vpc", "-o", "subformat=fixed", "a", "b"}).azure);
  CHECK(parse_error({"--azure", "-O", "vdi", "a", "b"}).find("-O must be vhd") !=
        std::string::npos);
  CHECK(parse_error({"--azure", "--subformat", "dynamic", "a", "b"}).find("must be fixed") !=
        std::string::npos);
  CHECK(parse_error({"--azure", "--block-size", "2M", "a", "b"}).find("no block size") !=
        std::string::npos);
}

TEST_CASE("convert refuses incomplete or contradictory commands") {
  CHECK(parse_error({"a", "b"}).find("needs an output format") != std::string::npos);
  CHECK(parse_error({"-O", "qcow2", "a", "b"}).find("unknown image format 'qcow2'") !=
        std::string::npos);
  CHECK(parse_error({"-O", "auto", "a", "b"}).find("needs an output format") != std::string::npos);
  CHECK(parse_error({"-O", "raw", "a"}) == "expected IN and OUT");
  CHECK(parse_error({"-O", "raw", "a", "b", "c"}) == "expected IN and OUT");
  CHECK(parse_error({"-O", "raw", "same", "same"}).find("same file") != std::string::npos);
  CHECK(parse_error({"-O", "raw", "--subformat", "fixed", "a", "b"}) ==
        "raw images have no subformat");
  CHECK(
      parse_error({"-O", "vhd", "--subformat", "static", "a", "b"}).find("not fixed or dynamic") !=
      std::string::npos);
  CHECK(
      parse_error({"-O", "vdi", "--subformat", "fixed", "a", "b"}).find("not static or dynamic") !=
      std::string::npos);
  CHECK(parse_error({"-O", "raw", "--block-size", "1M", "a", "b"}) ==
        "raw images have no block size");
  CHECK(parse_error({"-O", "vhd", "--block-size", "0", "a", "b"}).find("invalid block size") !=
        std::string::npos);
  CHECK(parse_error({"-O", "vhd", "--bogus", "a", "b"}).find("'--bogus'") != std::string::npos);
}

TEST_CASE("output size: raw as is, 512 for VHD and VDI, whole MiB for Azure") {
  CHECK(convert_output_size(1000, Format::raw, false).size == 1000);
  CHECK(convert_output_size(1000, Format::raw, false).notes.empty());
  const auto v = convert_output_size(5 * mib + 100, Format::vdi, false);
  CHECK(v.size == 5 * mib + 512);
  REQUIRE(v.notes.size() == 1);
  CHECK(v.notes[0].find("rounded up to 5243392 for vdi") != std::string::npos);
  CHECK(convert_output_size(5 * mib + 1536, Format::vhd, false).size == 5 * mib + 1536);
  CHECK(convert_output_size(5 * mib + 1536, Format::vhd, false).notes.empty());

  // Azure: from what to what, both in bytes and in human units.
  const auto a = convert_output_size(30 * mib + 512, Format::vhd, true);
  CHECK(a.size == 31 * mib);
  REQUIRE(a.notes.size() == 1);
  CHECK(a.notes[0].find("virtual size 31457792") != std::string::npos);
  CHECK(a.notes[0].find("rounded up to 32505856 (31 MiB)") != std::string::npos);
  CHECK(convert_output_size(64 * mib, Format::vhd, true).size == 64 * mib);
  CHECK(convert_output_size(64 * mib, Format::vhd, true).notes.empty());
  CHECK(convert_output_size(mib - 1, Format::vhd, true).size == mib);
  // Small disks are made, with a word about managed disks' 20 MiB minimum.
  const auto small = convert_output_size(10 * mib, Format::vhd, true);
  CHECK(small.size == 10 * mib);
  REQUIRE(small.notes.size() == 1);
  CHECK(small.notes[0].find("below 20 MiB") != std::string::npos);
}

TEST_CASE("nonzero_runs finds the data worth writing, per granule") {
  std::vector<std::byte> buf(64 * 1024);
  CHECK(nonzero_runs(buf, 4096).empty());
  buf[0] = std::byte{1};
  buf[4096 * 3 + 17] = std::byte{2};
  buf[4096 * 4] = std::byte{3};
  buf[buf.size() - 1] = std::byte{4};
  const auto runs = nonzero_runs(buf, 4096);
  REQUIRE(runs.size() == 3);
  CHECK(runs[0] == std::pair<std::size_t, std::size_t>{0, 4096});
  CHECK(runs[1] == std::pair<std::size_t, std::size_t>{3 * 4096, 2 * 4096});  // merged
  CHECK(runs[2] == std::pair<std::size_t, std::size_t>{15 * 4096, 4096});
  // A short last granule, and data in its last byte only.
  std::vector<std::byte> odd(4096 + 100);
  odd.back() = std::byte{9};
  const auto tail = nonzero_runs(odd, 4096);
  REQUIRE(tail.size() == 1);
  CHECK(tail[0] == std::pair<std::size_t, std::size_t>{4096, 100});
  CHECK(nonzero_runs(std::span<const std::byte>{}, 4096).empty());
}

TEST_CASE("convert --json summary has every field") {
  ConvertSummary s;
  s.input = "in \"x\".img";
  s.output = "out.vhd";
  s.input_format = "raw";
  s.output_format = "vhd";
  s.output_subformat = "fixed";
  s.input_size = 100;
  s.virtual_size = mib;
  s.file_size = mib + 512;
  s.bytes_read = 4096;
  s.bytes_written = 512;
  s.bytes_zero = 3584;
  s.bytes_holes = 7;
  s.seconds = 1.5;
  const std::string j = convert_json(s);
  CHECK(j.find("\"input\": \"in \\\"x\\\".img\",") != std::string::npos);
  CHECK(j.find("\"output_subformat\": \"fixed\",") != std::string::npos);
  CHECK(j.find("\"file_size\": 1049088,") != std::string::npos);
  CHECK(j.find("\"bytes_zero\": 3584,") != std::string::npos);
  CHECK(j.find("\"bytes_holes\": 7,") != std::string::npos);
  CHECK(j.find("\"seconds\": 1.500\n}\n") != std::string::npos);
}
