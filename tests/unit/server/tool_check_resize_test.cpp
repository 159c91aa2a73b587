// The pure parts of check and resize: qemu-img check's exit statuses for a report, its
// text and the --json shape, the field named by a codec's message, and relative sizes.
#include <doctest/doctest.h>

#include <stdexcept>
#include <string>

#include "formats/check_report.hpp"
#include "server/tool_check.hpp"
#include "server/tool_resize.hpp"

using imagenbd::formats::CheckReport;
using imagenbd::formats::problem_field;
using namespace imagenbd::server;

TEST_CASE("check_status follows qemu-img check") {
  CheckReport r;
  r.format = "vhd";
  CHECK(check_status(r) == 0);
  r.warning("footer", "features", "footer: features mark the disk as temporary");
  CHECK(check_status(r) == 0);
  r.leaked_bytes = 512;
  CHECK(check_status(r) == 3);
  r.error("BAT", "entry 4", "BAT entry 4 points past the end of the file");
  CHECK(check_status(r) == 2);
  CheckReport raw;
  raw.format = "raw";
  CHECK(check_status(raw) == 63);
}

TEST_CASE("check_text and check_json") {
  CheckReport r;
  r.format = "vdi";
  r.total_blocks = 10;
  r.allocated_blocks = 2;
  CHECK(check_text(r) == "No errors were found on the image.\n2/10 = 20.00% allocated\n");
  r.error("block map", "entries 0 and 5", "block map entries 0 and 5 point at the same block (0)");
  r.leaked_bytes = 1048576;
  const std::string text = check_text(r);
  CHECK(text.find("ERROR block map entries 0 and 5") == 0);
  CHECK(text.find("\n1 errors were found on the image.\n") != std::string::npos);
  CHECK(text.find("\n1048576 leaked bytes were found on the image.\n") != std::string::npos);
  CHECK(text.find("No errors") == std::string::npos);
  const std::string json = check_json("a \"b\".vdi", r);
  CHECK(json.find("\"filename\": \"a \\\"b\\\".vdi\"") != std::string::npos);
  CHECK(json.find("{\"structure\": \"block map\", \"field\": \"entries 0 and 5\", \"message\": ") !=
        std::string::npos);
  CHECK(json.find("\"warnings\": []") != std::string::npos);
  CHECK(json.find("\"leaked_bytes\": 1048576") != std::string::npos);
  CHECK(json.find("\"complete\": true") != std::string::npos);
}

TEST_CASE("problem_field: the field a codec's message names") {
  CHECK(problem_field("footer: checksum mismatch (stored 0x1, computed 0x2)") == "checksum");
  CHECK(problem_field("footer: current_size 1001 is not a multiple of 512") == "current_size");
  CHECK(problem_field("dynamic header: table_offset 0x600 with 6 entries") == "table_offset");
  CHECK(problem_field("header: block count 5 does not match") == "block count");
  CHECK(problem_field("header: allocated block count 9 is larger") == "allocated block count");
  CHECK(problem_field("footer: cookie \"xx\" is not \"conectix\"") == "cookie");
}

TEST_CASE("parse_new_size: absolute and relative sizes") {
  CHECK(parse_new_size("1G", 5) == (uint64_t{1} << 30));
  CHECK(parse_new_size("+1M", 1024) == 1024 + (1 << 20));
  CHECK(parse_new_size("-1M", 3 << 20) == (2 << 20));
  CHECK_THROWS_AS(parse_new_size("-4M", 3 << 20), std::invalid_argument);
  CHECK_THROWS_AS(parse_new_size("+x", 0), std::invalid_argument);
}
