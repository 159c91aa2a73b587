// RFC 3986 percent-encoding, shared by the blob-store leaves (Azure blob names and SAS
// query values, S3 object keys): the one place that decides which bytes stay as they are.
#pragma once

#include <string>
#include <string_view>

namespace imagenbd::backends {

// Unreserved characters (A-Z a-z 0-9 - . _ ~) and those in `keep` stay as they are; every
// other byte becomes %XX with upper-case hex.
std::string percent_encode(std::string_view text, std::string_view keep = {});

}  // namespace imagenbd::backends
