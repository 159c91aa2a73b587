// The XML bodies of the Blob service, parsed with pugixml: error responses, Get Page
// Ranges and List Blobs. Malformed XML or missing fields throw Error(io_error) naming the
// element; numbers are checked, never trusted.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace imagenbd::backends::azure {

struct ServiceError {
  std::string code;     // <Code>, e.g. "LeaseIdMissing"; "" when the body has none
  std::string message;  // <Message>, first line only
};
// Never throws: a body that is not an Azure error gives empty fields.
ServiceError parse_error(std::string_view xml);

struct PageRange {
  uint64_t start = 0;  // first byte
  uint64_t end = 0;    // last byte (inclusive, as on the wire)
  bool clear = false;  // a <ClearRange> (diffs against prevsnapshot only)
  bool operator==(const PageRange&) const = default;
};

struct PageList {
  std::vector<PageRange> ranges;  // in document order, as received
  std::string next_marker;        // "" on the last page
};
PageList parse_page_list(std::string_view xml);

struct BlobItem {
  std::string name;
  std::string snapshot;     // "" for the base blob
  std::string blob_type;    // "PageBlob", "BlockBlob", "AppendBlob"
  uint64_t size = 0;        // Content-Length
  std::string last_modified;
  std::string lease_state;  // "available", "leased", ...
};

struct BlobList {
  std::vector<BlobItem> blobs;
  std::string next_marker;
};
BlobList parse_blob_list(std::string_view xml);

}  // namespace imagenbd::backends::azure
