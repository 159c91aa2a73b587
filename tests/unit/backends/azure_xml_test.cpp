// The XML bodies: canned Get Page Ranges answers (paging and diffs, which Azurite does not
// produce), errors, and a List Blobs body as Azurite 3.37.0 sends it.
#include "backends/azure_xml.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "backends/error.hpp"

using namespace imagenbd::backends;
using namespace imagenbd::backends::azure;

namespace {

std::string io_error_of(std::string_view xml, bool pages = true) {
  try {
    if (pages)
      parse_page_list(xml);
    else
      parse_blob_list(xml);
  } catch (const Error& e) {
    CHECK(e.errc() == std::errc::io_error);
    return e.what();
  }
  FAIL("no error thrown");
  return {};
}

}  // namespace

TEST_CASE("azure xml: a page list with paging") {
  // Azure prefixes a BOM.
  auto list = parse_page_list(
      "\xEF\xBB\xBF<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<PageList>"
      "<PageRange><Start>0</Start><End>4095</End></PageRange>"
      "<PageRange><Start>4096</Start><End>4607</End></PageRange>"
      "<PageRange><Start>1099511627264</Start><End>1099511627775</End></PageRange>"
      "<NextMarker>2!104!MDAwMDM4IXNvbWUtbWFya2Vy</NextMarker></PageList>");
  CHECK(list.ranges == std::vector<PageRange>{{0, 4095, false},
                                              {4096, 4607, false},
                                              {1099511627264, 1099511627775, false}});
  CHECK(list.next_marker == "2!104!MDAwMDM4IXNvbWUtbWFya2Vy");
}

TEST_CASE("azure xml: a diff against a snapshot keeps ClearRange in document order") {
  auto list = parse_page_list(
      "<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList>"
      "<ClearRange><Start>8192</Start><End>8703</End></ClearRange>"
      "<PageRange><Start>0</Start><End>511</End></PageRange>"
      "<ClearRange><Start>1024</Start><End>1535</End></ClearRange>"
      "<NextMarker /></PageList>");
  CHECK(list.ranges ==
        std::vector<PageRange>{{8192, 8703, true}, {0, 511, false}, {1024, 1535, true}});
  CHECK(list.next_marker.empty());
}

TEST_CASE("azure xml: empty lists") {
  CHECK(parse_page_list("<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList />").ranges.empty());
  auto list = parse_page_list("<PageList></PageList>");
  CHECK(list.ranges.empty());
  CHECK(list.next_marker.empty());
}

TEST_CASE("azure xml: unsorted, adjacent and odd ranges are returned as received") {
  auto list = parse_page_list(
      "<PageList><PageRange><Start>4096</Start><End>4607</End></PageRange>"
      "<PageRange><Start>0</Start><End>4095</End></PageRange>"
      "<PageRange><Start>100</Start><End>50</End></PageRange></PageList>");
  CHECK(list.ranges ==
        std::vector<PageRange>{{4096, 4607, false}, {0, 4095, false}, {100, 50, false}});
}

TEST_CASE("azure xml: garbage and bad numbers are EIO naming the element") {
  CHECK(io_error_of("not xml at all <").find("not XML") != std::string::npos);
  CHECK(io_error_of("").find("Get Page Ranges") != std::string::npos);
  CHECK(io_error_of("<EnumerationResults/>").find("<PageList>") != std::string::npos);
  CHECK(io_error_of("<PageList><PageRange><Start>0</Start><End>x</End></PageRange></PageList>") ==
        "azure: Get Page Ranges: <End> is not a number: 'x'");
  CHECK(io_error_of("<PageList><PageRange><Start>0</Start></PageRange></PageList>") ==
        "azure: Get Page Ranges: <PageRange> without <End>");
  CHECK(io_error_of("<PageList><ClearRange><End>511</End></ClearRange></PageList>") ==
        "azure: Get Page Ranges: <ClearRange> without <Start>");
  for (std::string_view bad : {"-1", "+5", " 5", "5 ", "0x10", "1e3", "", "18446744073709551616",
                               "99999999999999999999999"}) {
    CAPTURE(bad);
    auto xml = "<PageList><PageRange><Start>" + std::string(bad) +
               "</Start><End>511</End></PageRange></PageList>";
    CHECK(io_error_of(xml).find("<Start> is not a number") != std::string::npos);
  }
  // The largest value still fits.
  auto max = parse_page_list(
      "<PageList><PageRange><Start>0</Start><End>18446744073709551615</End></PageRange></"
      "PageList>");
  CHECK(max.ranges.at(0).end == 18446744073709551615ull);
}

TEST_CASE("azure xml: error bodies") {
  auto e = parse_error(
      "\xEF\xBB\xBF<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>LeaseIdMissing</Code>"
      "<Message>There is currently a lease on the blob and no lease ID was specified in the "
      "request.\n"
      "RequestId:6c3d2f5a-0000\nTime:2026-11-21T05:00:00.0000000Z</Message></Error>");
  CHECK(e.code == "LeaseIdMissing");
  CHECK(e.message ==
        "There is currently a lease on the blob and no lease ID was specified in the request.");
  auto none = parse_error("<html>502 Bad Gateway</html>");
  CHECK(none.code.empty());
  CHECK(none.message.empty());
  CHECK(parse_error("").code.empty());
  CHECK(parse_error("<Error><Code>X</Code>").code.empty());  // truncated
}

// Azurite 3.37.0's answer to List Blobs with include=snapshots: a block blob, a page blob
// snapshot, then its base blob.
const char* const azurite_list =
    "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?><EnumerationResults "
    "ServiceEndpoint=\"http://127.0.0.1:10417/devstoreaccount1\" "
    "ContainerName=\"proof\"><Prefix/><Marker/><MaxResults>5000</MaxResults><Blobs>"
    "<Blob><Name>dir/block.txt</Name>"
    "<Properties><Creation-Time>Sat, 21 Nov 2026 11:13:27 GMT</Creation-Time><Last-Modified>Sat, "
    "21 Nov 2026 11:13:27 GMT</Last-Modified><Etag>0x1CE843DF9F9A190</Etag>"
    "<Content-Length>5</Content-Length><Content-Type>application/octet-stream</"
    "Content-Type><Content-MD5>XUFAKrxLKna5cZ2REBfFkg==</Content-MD5><BlobType>BlockBlob</"
    "BlobType><LeaseStatus>unlocked</LeaseStatus><LeaseState>available</"
    "LeaseState><ServerEncrypted>true</ServerEncrypted><AccessTier>Hot</"
    "AccessTier><AccessTierInferred>true</AccessTierInferred><AccessTierChangeTime>Sat, 21 Nov "
    "2026 11:13:27 GMT</AccessTierChangeTime></Properties></Blob>"
    "<Blob><Name>my disk\xC3\xBC.vhd</Name><Snapshot>2026-11-21T11:13:27.4770000Z</Snapshot>"
    "<Properties><Creation-Time>Sat, 21 Nov 2026 11:13:07 GMT</Creation-Time><Last-Modified>Sat, "
    "21 Nov 2026 11:13:21 GMT</Last-Modified><Etag>0x25FF966DB23CBA0</Etag>"
    "<Content-Length>1048576</Content-Length><Content-Type>application/octet-stream</"
    "Content-Type><x-ms-blob-sequence-number>0</x-ms-blob-sequence-number><BlobType>PageBlob</"
    "BlobType><LeaseStatus>unlocked</LeaseStatus><LeaseState>available</"
    "LeaseState><ServerEncrypted>true</ServerEncrypted></Properties></Blob>"
    "<Blob><Name>my disk\xC3\xBC.vhd</Name>"
    "<Properties><Creation-Time>Sat, 21 Nov 2026 11:13:07 GMT</Creation-Time><Last-Modified>Sat, "
    "21 Nov 2026 11:13:21 GMT</Last-Modified><Etag>0x25FF966DB23CBA0</Etag>"
    "<Content-Length>1048576</Content-Length><Content-Type>application/octet-stream</"
    "Content-Type><x-ms-blob-sequence-number>0</x-ms-blob-sequence-number><BlobType>PageBlob</"
    "BlobType><LeaseStatus>unlocked</LeaseStatus><LeaseState>available</"
    "LeaseState><ServerEncrypted>true</ServerEncrypted></Properties></Blob>"
    "</Blobs><NextMarker/></EnumerationResults>";

TEST_CASE("azure xml: List Blobs as Azurite sends it") {
  auto list = parse_blob_list(azurite_list);
  REQUIRE(list.blobs.size() == 3);
  CHECK(list.blobs[0].name == "dir/block.txt");
  CHECK(list.blobs[0].blob_type == "BlockBlob");
  CHECK(list.blobs[0].size == 5);
  CHECK(list.blobs[0].snapshot.empty());
  CHECK(list.blobs[1].name == "my disk\xC3\xBC.vhd");
  CHECK(list.blobs[1].snapshot == "2026-11-21T11:13:27.4770000Z");
  CHECK(list.blobs[1].blob_type == "PageBlob");
  CHECK(list.blobs[1].size == 1048576);
  CHECK(list.blobs[1].last_modified == "Sat, 21 Nov 2026 11:13:21 GMT");
  CHECK(list.blobs[1].lease_state == "available");
  CHECK(list.blobs[2].snapshot.empty());
  CHECK(list.next_marker.empty());
}

TEST_CASE("azure xml: List Blobs paging, prefixes and bad entries") {
  auto list = parse_blob_list(
      "<EnumerationResults><Blobs><BlobPrefix><Name>dir/</Name></BlobPrefix>"
      "<Blob><Name>a</Name><Properties><Content-Length>512</Content-Length><BlobType>PageBlob</"
      "BlobType>"
      "<LeaseState>leased</LeaseState></Properties></Blob></Blobs>"
      "<NextMarker>2!80!bWFya2Vy</NextMarker></EnumerationResults>");
  REQUIRE(list.blobs.size() == 1);
  CHECK(list.blobs[0].lease_state == "leased");
  CHECK(list.next_marker == "2!80!bWFya2Vy");
  CHECK(parse_blob_list("<EnumerationResults><Blobs/></EnumerationResults>").blobs.empty());
  CHECK(io_error_of("<EnumerationResults><Blobs><Blob><Name>a</Name><Properties><Content-Length>"
                    "12x</Content-Length></Properties></Blob></Blobs></EnumerationResults>",
                    false) == "azure: List Blobs: <Content-Length> is not a number: '12x'");
  CHECK(io_error_of(
            "<EnumerationResults><Blobs><Blob><Properties/></Blob></Blobs></EnumerationResults>",
            false) == "azure: List Blobs: <Blob> without <Name>");
  CHECK(io_error_of("<PageList/>", false).find("<EnumerationResults>") != std::string::npos);
}
