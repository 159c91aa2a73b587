// HTTP status -> errno, and secret redaction. Redaction is a scan for known names (query
// parameters, connection-string keys, Authorization schemes) whose values are replaced,
// so it works the same on URLs, header lines, connection strings and free text.
#include "backends/http_status.hpp"

#include <array>
#include <cctype>

namespace imagenbd::backends::http {

std::errc errc_for_status(long status, std::string_view service_code) {
  // Creating what exists is EEXIST, not a busy resource (Azure answers 409 for both).
  if (service_code == "BlobAlreadyExists" || service_code == "ContainerAlreadyExists") {
    return std::errc::file_exists;
  }
  switch (status) {
    case 400:
    case 416:
      return std::errc::invalid_argument;
    case 401:
    case 403:
      return std::errc::permission_denied;
    case 404:
      return std::errc::no_such_file_or_directory;
    case 409:
    case 412:
      return std::errc::device_or_resource_busy;
    case 413:
      return std::errc::file_too_large;
    case 507:
      return std::errc::no_space_on_device;
    default:
      return std::errc::io_error;
  }
}

bool is_transient(long status, std::string_view service_code) {
  switch (status) {
    case 408:
    case 429:
    case 500:
    case 502:
    case 503:
    case 504:
      return true;
    default:
      return service_code == "ServerBusy" || service_code == "OperationTimedOut" ||
             service_code == "InternalError";
  }
}

namespace {

constexpr std::string_view redacted = "REDACTED";

// A secret introduced by `prefix` (matched case-insensitively at a word start) whose value
// runs until one of `stops`, whitespace, a quote or the end of the text.
struct Secret {
  std::string_view prefix;
  std::string_view stops;
};

constexpr std::array<Secret, 11> secrets{{
    {"sig=", "&;,"},
    {"x-amz-signature=", "&;,"},
    {"x-amz-credential=", "&;,"},
    {"x-amz-security-token=", "&;,"},
    {"accountkey=", ";"},             // connection strings
    {"sharedaccesssignature=", ";"},  // a whole SAS, '&' included
    {"signature=", "&;,"},            // AWS4-HMAC-SHA256 Authorization
    {"credential=", "&;,"},
    {"bearer ", ",;"},
    // "SharedKey account:SIGNATURE": the account stays, the signature goes.
    {"sharedkey ", ""},
    {"sharedkeylite ", ""},
}};

bool word_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_';
}

bool starts_with_nocase(std::string_view text, std::size_t at, std::string_view prefix) {
  if (text.size() - at < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(text[at + i])) != prefix[i]) return false;
  }
  return true;
}

bool value_end(char c, std::string_view stops) {
  return std::isspace(static_cast<unsigned char>(c)) != 0 || c == '"' || c == '\'' ||
         stops.find(c) != std::string_view::npos;
}

}  // namespace

std::string redact(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (i < text.size()) {
    const Secret* found = nullptr;
    if (i == 0 || !word_char(text[i - 1])) {
      for (const auto& s : secrets) {
        if (starts_with_nocase(text, i, s.prefix)) {
          found = &s;
          break;
        }
      }
    }
    if (found == nullptr) {
      out += text[i++];
      continue;
    }
    std::size_t value = i + found->prefix.size();
    if (found->prefix.starts_with("sharedkey")) {
      // Skip the account name up to the ':'; no ':' means it is not a credential.
      std::size_t colon = value;
      while (colon < text.size() && text[colon] != ':' && !value_end(text[colon], "")) ++colon;
      if (colon >= text.size() || text[colon] != ':') {
        out.append(text.substr(i, value - i));
        i = value;
        continue;
      }
      value = colon + 1;
    }
    std::size_t end = value;
    while (end < text.size() && !value_end(text[end], found->stops)) ++end;
    out.append(text.substr(i, value - i));
    if (end > value) out.append(redacted);
    i = end;
  }
  return out;
}

}  // namespace imagenbd::backends::http
