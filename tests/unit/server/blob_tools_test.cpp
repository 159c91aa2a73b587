// The pure parts of the blob tools: upload's and download's option parsing (the 512 and
// 4 MiB rules of --block-size), the split of a piece into Put Pages of non-zero sectors,
// the "would Azure attach this VHD" check, block ids, the --json summaries and the hints
// added to the service's refusals.
#include <doctest/doctest.h>

#include <array>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "formats/vhd_layout.hpp"
#include "server/blob_tool_common.hpp"

using namespace imagenbd::server;
namespace vhd = imagenbd::formats::vhd;
namespace azure = imagenbd::backends::azure;

namespace {

constexpr uint64_t mib = 1 << 20;

std::vector<char*> argv_of(std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  return argv;
}

UploadCommand upload(std::vector<std::string> args) {
  args.insert(args.begin(), "upload");
  auto argv = argv_of(args);
  return parse_upload(static_cast<int>(args.size()), argv.data());
}

DownloadCommand download(std::vector<std::string> args) {
  args.insert(args.begin(), "download");
  auto argv = argv_of(args);
  return parse_download(static_cast<int>(args.size()), argv.data());
}

template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(accepted)";
}

std::array<std::byte, 512> footer_bytes(vhd::DiskType type, uint64_t size) {
  vhd::Footer f;
  f.disk_type = static_cast<uint32_t>(type);
  f.current_size = size;
  f.original_size = size;
  f.data_offset = type == vhd::DiskType::fixed ? vhd::fixed_data_offset : 512;
  return vhd::encode_footer(f);
}

}  // namespace

TEST_CASE("upload parses its options and takes 4M, 8 requests and page blobs by default") {
  const auto d = upload({"disk.img", "az://a/c/disk.img"});
  CHECK(d.block_size == 4 * mib);
  CHECK(d.parallel == 8);
  CHECK_FALSE(d.block_blob);
  CHECK_FALSE(d.overwrite);
  CHECK_FALSE(d.json);
  CHECK(d.file == "disk.img");
  CHECK(d.uri == "az://a/c/disk.img");

  const auto c = upload({"--block-size=64K", "--blob-type=block", "--parallel", "3", "--overwrite",
                         "-p", "--json", "f", "u"});
  CHECK(c.block_size == 64 * 1024);
  CHECK(c.block_blob);
  CHECK(c.parallel == 3);
  CHECK(c.overwrite);
  CHECK(c.progress);
  CHECK(c.json);
  CHECK(upload({"--help"}).help);
}

TEST_CASE("upload refuses block sizes that are not whole pages up to 4 MiB") {
  CHECK(error_of([] { upload({"--block-size=1000", "f", "u"}); }).find("512") != std::string::npos);
  CHECK(error_of([] { upload({"--block-size=8M", "f", "u"}); }).find("4M") != std::string::npos);
  CHECK(error_of([] { upload({"--block-size=0", "f", "u"}); }) != "(accepted)");
  CHECK(error_of([] { upload({"--block-size=lots", "f", "u"}); }) != "(accepted)");
  CHECK(upload({"--block-size=512", "f", "u"}).block_size == 512);
  CHECK(upload({"--block-size=4M", "f", "u"}).block_size == 4 * mib);
  CHECK(error_of([] {
          upload({"--blob-type=append", "f", "u"});
        }).find("append") != std::string::npos);
  CHECK(error_of([] { upload({"--parallel=0", "f", "u"}); }) != "(accepted)");
  CHECK(error_of([] { upload({"--parallel=2x", "f", "u"}); }) != "(accepted)");
  CHECK(error_of([] { upload({"f"}); }).find("FILE and URI") != std::string::npos);
  CHECK(error_of([] {
          upload({"--frobnicate", "f", "u"});
        }).find("--frobnicate") != std::string::npos);
}

TEST_CASE("download parses its options") {
  const auto d = download({"--snapshot=2026-11-21T04:55:55.2300000Z", "--parallel=16",
                           "--overwrite", "--json", "az://a/c/b", "out.img"});
  CHECK(d.snapshot == "2026-11-21T04:55:55.2300000Z");
  CHECK(d.parallel == 16);
  CHECK(d.overwrite);
  CHECK(d.json);
  CHECK(d.uri == "az://a/c/b");
  CHECK(d.file == "out.img");
  CHECK(error_of([] { download({"--snapshot=", "u", "f"}); }) != "(accepted)");
  CHECK(error_of([] { download({"u"}); }).find("URI and FILE") != std::string::npos);
  CHECK(error_of([] { download({"--parallel=300", "u", "f"}); }) != "(accepted)");
}

TEST_CASE("parse_int_in takes whole numbers in range only") {
  CHECK(parse_int_in("15", 15, 60, "--duration") == 15);
  CHECK(parse_int_in("60", 15, 60, "--duration") == 60);
  for (const char* bad : {"10", "61", "", "abc", "20s", "-1"}) {
    CHECK(error_of([&] { parse_int_in(bad, 15, 60, "--duration"); }).find("--duration") !=
          std::string::npos);
  }
}

TEST_CASE("nonzero_sector_runs skips zero sectors and merges the rest up to max_run") {
  std::vector<std::byte> data(8 * 512);
  CHECK(nonzero_sector_runs(data, 4 * mib).empty());

  data[0] = std::byte{1};              // sector 0
  data[2 * 512 + 511] = std::byte{2};  // sector 2, last byte
  data[3 * 512] = std::byte{3};        // sector 3
  data[7 * 512 + 100] = std::byte{4};  // sector 7
  CHECK(nonzero_sector_runs(data, 4 * mib) ==
        std::vector<SectorRun>{{0, 512}, {1024, 1024}, {3584, 512}});
  // A run longer than max_run is cut.
  std::vector<std::byte> full(6 * 512, std::byte{9});
  CHECK(nonzero_sector_runs(full, 2048) == std::vector<SectorRun>{{0, 2048}, {2048, 1024}});
  // A short last sector still counts (block blobs of any size never get here, but the
  // split must not lose bytes).
  std::vector<std::byte> tail(512 + 10);
  tail[515] = std::byte{1};
  CHECK(nonzero_sector_runs(tail, 4 * mib) == std::vector<SectorRun>{{512, 10}});
}

TEST_CASE("azure_vhd_problem accepts a fixed whole-MiB VHD and names what else is wrong") {
  const std::array<std::byte, 512> zeros{};
  // Fixed, 6 MiB, file = 6 MiB + 512: what Azure attaches.
  const auto ok = footer_bytes(vhd::DiskType::fixed, 6 * mib);
  CHECK_FALSE(azure_vhd_problem(zeros, ok, 6 * mib + 512).has_value());
  // Fixed, not a whole MiB.
  const auto odd = footer_bytes(vhd::DiskType::fixed, 5 * mib + 1536);
  const auto odd_problem = azure_vhd_problem(zeros, odd, 5 * mib + 2048);
  REQUIRE(odd_problem.has_value());
  CHECK(odd_problem->find("whole MiB") != std::string::npos);
  // Fixed, whole MiB, but the file is longer than the data plus the footer.
  const auto long_problem = azure_vhd_problem(zeros, ok, 7 * mib + 512);
  REQUIRE(long_problem.has_value());
  CHECK(long_problem->find("footer") != std::string::npos);
  // Dynamic and differencing.
  const auto dyn = footer_bytes(vhd::DiskType::dynamic, 8 * mib);
  const auto dyn_problem = azure_vhd_problem(dyn, dyn, 3 * 512 + 512 + 512);
  REQUIRE(dyn_problem.has_value());
  CHECK(dyn_problem->find("dynamic") != std::string::npos);
  const auto diff = footer_bytes(vhd::DiskType::differencing, 8 * mib);
  CHECK(azure_vhd_problem(diff, diff, 4096)->find("differencing") != std::string::npos);
  // A dynamic VHD whose end footer is torn: the copy at 0 still tells.
  CHECK(azure_vhd_problem(dyn, zeros, 4096).has_value());
  // Raw images: nothing to say, whatever their size.
  std::array<std::byte, 512> noise{};
  for (std::size_t i = 0; i < noise.size(); ++i) noise[i] = std::byte(i * 7 + 1);
  CHECK_FALSE(azure_vhd_problem(noise, noise, 3 * mib).has_value());
  CHECK_FALSE(azure_vhd_problem(zeros, zeros, 512).has_value());
  // A footer with a bad checksum is not a VHD footer.
  auto bad = ok;
  bad[100] ^= std::byte{1};
  CHECK_FALSE(azure_vhd_problem(zeros, bad, 6 * mib + 512).has_value());
}

TEST_CASE("the refusal of an unaligned page blob says why and what to do") {
  const std::string m = unaligned_size_message("disk.raw", 1000);
  CHECK(m.find("disk.raw: 1000 bytes is not a multiple of 512") == 0);
  CHECK(m.find("imagenbd convert --azure") != std::string::npos);
  CHECK(m.find("truncate -s") != std::string::npos);
}

TEST_CASE("block ids have one length and differ") {
  const std::string a = block_id(0), b = block_id(1), c = block_id(49999);
  CHECK(a.size() == b.size());
  CHECK(a.size() == c.size());
  CHECK(a != b);
  CHECK(b != c);
  CHECK(a == "aW5iZDAwMDAwMDAwMDAwMA==");  // base64("inbd000000000000")
}

TEST_CASE("upload and download --json carry the contract's fields") {
  UploadSummary u{.uri = "az://a/c/\"b\"",
                  .blob_type = "page",
                  .size = 64 * mib,
                  .uploaded_bytes = 3 * mib,
                  .skipped_bytes = 61 * mib,
                  .requests = 3,
                  .seconds = 1.25};
  CHECK(upload_json(u) ==
        "{\"uri\": \"az://a/c/\\\"b\\\"\", \"blob_type\": \"page\", \"size\": 67108864, "
        "\"uploaded_bytes\": 3145728, \"skipped_bytes\": 63963136, \"requests\": 3, "
        "\"seconds\": 1.250}\n");
  DownloadSummary d{.uri = "az://a/c/b",
                    .blob_type = "page",
                    .size = 2048,
                    .downloaded_bytes = 512,
                    .hole_bytes = 1536,
                    .requests = 1,
                    .seconds = 0};
  CHECK(download_json(d) ==
        "{\"uri\": \"az://a/c/b\", \"blob_type\": \"page\", \"size\": 2048, "
        "\"downloaded_bytes\": 512, \"hole_bytes\": 1536, \"requests\": 1, \"seconds\": 0.000}\n");
  CHECK(short_blob_type("PageBlob") == "page");
  CHECK(short_blob_type("BlockBlob") == "block");
  CHECK(short_blob_type("AppendBlob") == "append");
  CHECK(short_blob_type("Other") == "Other");
}

TEST_CASE("explain_failure adds what to do to the service's refusals") {
  const azure::BlobError leased(std::errc::device_or_resource_busy,
                                "azure: az://a/c/b: Delete Blob: 412 LeaseIdMissing: leased", 412,
                                "LeaseIdMissing");
  CHECK(explain_failure(leased).find("--lease-id") != std::string::npos);
  const azure::BlobError snaps(std::errc::device_or_resource_busy,
                               "azure: az://a/c/b: Delete Blob: 409 SnapshotsPresent", 409,
                               "SnapshotsPresent");
  CHECK(explain_failure(snaps).find("--snapshots") != std::string::npos);
  const azure::BlobError denied(std::errc::permission_denied, "azure: az://a/c/b: 403", 403,
                                "AuthorizationFailure");
  CHECK(explain_failure(denied).find("AZURE_STORAGE_CONNECTION_STRING") != std::string::npos);
  const std::runtime_error plain("file: x: No such file or directory");
  CHECK(explain_failure(plain) == "file: x: No such file or directory");
}

TEST_CASE("split_az_snapshot takes a timestamp suffix off az:// URIs only") {
  using P = std::pair<std::string, std::string>;
  CHECK(split_az_snapshot("az://a/c/disk.vhd?snapshot=2026-11-21T04:55:55.2300000Z") ==
        P{"az://a/c/disk.vhd", "2026-11-21T04:55:55.2300000Z"});
  CHECK(split_az_snapshot("az://a/c/d?snapshot=2026-11-21T04:55:55Z") ==
        P{"az://a/c/d", "2026-11-21T04:55:55Z"});
  // Not a timestamp: a blob whose name holds '?' stays whole.
  CHECK(split_az_snapshot("az://a/c/what?snapshot=yes") == P{"az://a/c/what?snapshot=yes", ""});
  CHECK(split_az_snapshot("az://a/c/d?snapshot=2026-11-21T04:55:55.Z") ==
        P{"az://a/c/d?snapshot=2026-11-21T04:55:55.Z", ""});
  CHECK(split_az_snapshot("az://a/c/d") == P{"az://a/c/d", ""});
  // Other forms are split by parse_blob_uri, with their SAS.
  const std::string http = "http://127.0.0.1:10000/a/c/d?snapshot=2026-11-21T04:55:55.2300000Z";
  CHECK(split_az_snapshot(http) == P{http, ""});
}
