// Error, PageList and EnumerationResults bodies, parsed with pugixml. Numbers go through
// std::from_chars over the whole text: a service (or a proxy) that sends garbage gets an
// EIO naming the element, never a silently wrong range.
#include "backends/azure_xml.hpp"

#include <charconv>

#include <pugixml.hpp>

#include "backends/error.hpp"
#include "backends/log.hpp"

namespace imagenbd::backends::azure {

namespace {

pugi::xml_document load(std::string_view xml, std::string_view operation) {
  pugi::xml_document doc;
  auto result = doc.load_buffer(xml.data(), xml.size());
  if (!result)
    fail(std::errc::io_error, "azure: {}: the response is not XML ({} at byte {})", operation,
         result.description(), result.offset);
  return doc;
}

// The quoted value in messages: short and printable.
std::string shown(std::string_view text) {
  return log::printable(text, 40);
}

uint64_t number(const pugi::xml_node& parent, const char* name, std::string_view operation) {
  auto node = parent.child(name);
  if (!node)
    fail(std::errc::io_error, "azure: {}: <{}> without <{}>", operation, parent.name(), name);
  std::string_view text = node.child_value();
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size())
    fail(std::errc::io_error, "azure: {}: <{}> is not a number: '{}'", operation, name,
         shown(text));
  return value;
}

}  // namespace

ServiceError parse_error(std::string_view xml) {
  ServiceError e;
  pugi::xml_document doc;
  if (!doc.load_buffer(xml.data(), xml.size())) return e;
  auto error = doc.child("Error");
  if (!error) return e;
  e.code = error.child_value("Code");
  std::string_view message = error.child_value("Message");
  // Azure appends "\nRequestId:...\nTime:..." lines.
  message = message.substr(0, message.find_first_of("\r\n"));
  e.message = std::string(message);
  return e;
}

PageList parse_page_list(std::string_view xml) {
  constexpr std::string_view operation = "Get Page Ranges";
  auto doc = load(xml, operation);
  auto root = doc.child("PageList");
  if (!root) fail(std::errc::io_error, "azure: {}: the response has no <PageList>", operation);
  PageList list;
  for (auto node : root.children()) {
    std::string_view name = node.name();
    if (name == "PageRange" || name == "ClearRange") {
      PageRange r;
      r.start = number(node, "Start", operation);
      r.end = number(node, "End", operation);
      r.clear = name == "ClearRange";
      list.ranges.push_back(r);
    } else if (name == "NextMarker") {
      list.next_marker = node.child_value();
    }
  }
  return list;
}

BlobList parse_blob_list(std::string_view xml) {
  constexpr std::string_view operation = "List Blobs";
  auto doc = load(xml, operation);
  auto root = doc.child("EnumerationResults");
  if (!root)
    fail(std::errc::io_error, "azure: {}: the response has no <EnumerationResults>", operation);
  BlobList list;
  for (auto blob : root.child("Blobs").children("Blob")) {
    BlobItem item;
    auto name = blob.child("Name");
    if (!name) fail(std::errc::io_error, "azure: {}: <Blob> without <Name>", operation);
    item.name = name.child_value();
    item.snapshot = blob.child_value("Snapshot");
    auto properties = blob.child("Properties");
    if (!properties)
      fail(std::errc::io_error, "azure: {}: <Blob> '{}' without <Properties>", operation,
           shown(item.name));
    item.blob_type = properties.child_value("BlobType");
    item.size = number(properties, "Content-Length", operation);
    item.last_modified = properties.child_value("Last-Modified");
    item.lease_state = properties.child_value("LeaseState");
    list.blobs.push_back(std::move(item));
  }
  list.next_marker = root.child_value("NextMarker");
  return list;
}

}  // namespace imagenbd::backends::azure
