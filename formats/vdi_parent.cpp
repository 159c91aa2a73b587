// The parent search of a differencing VDI: see vdi_parent.hpp. Each candidate costs one
// open and one 512-byte read; only the match is opened as a VDI (by open_vdi).
#include "formats/vdi_parent.hpp"

#include <algorithm>
#include <array>
#include <optional>

#include <fmt/format.h>

#include "backends/error.hpp"
#include "backends/log.hpp"

namespace imagenbd::formats::vdi {

namespace {

constexpr std::size_t max_listed = 8;  // candidates named in a "not found" message

// The header of a candidate, or nullopt when it is no VDI (too short, other signature).
boost::asio::awaitable<std::optional<Header>> peek_header(backends::BlockDevice& candidate) {
  if (candidate.size() < header_bytes) co_return std::nullopt;
  std::array<std::byte, header_bytes> sector;
  co_await candidate.read(0, sector);
  Header h = decode_header(sector);
  if (h.signature != signature) co_return std::nullopt;
  co_return h;
}

// A candidate: its device (null when nothing has that name) and header (nullopt when it
// is no VDI).
struct Candidate {
  backends::DevicePtr device;
  std::optional<Header> header;
};

boost::asio::awaitable<Candidate> examine(const ParentFinder& finder, const std::string& name) {
  Candidate c;
  c.device = co_await finder.open(name);
  if (c.device) c.header = co_await peek_header(*c.device);
  co_return c;
}

}  // namespace

boost::asio::awaitable<FoundParent> find_parent(backends::BlockDevice& child, const Header& header,
                                                const ParentChain& chain) {
  const std::string self = child.describe();
  const std::string wanted = header.uuid_linkage.to_string();
  if (!chain.finder) {
    backends::fail(std::errc::invalid_argument,
                   "vdi: {}: differencing VDI needs its parent (uuidLinkage {}), and nothing "
                   "was given to look for it",
                   self, wanted);
  }
  if (chain.names.size() >= max_parent_depth) {
    backends::fail(std::errc::invalid_argument,
                   "vdi: {}: the parent chain is deeper than {} images (a loop?): {}", self,
                   max_parent_depth, chain.text(self));
  }
  const ParentFinder& finder = *chain.finder;
  const bool explicit_parent = chain.names.empty() && !finder.explicit_parent.empty();
  std::vector<std::string> candidates;
  if (explicit_parent) {
    candidates.push_back(finder.explicit_parent);
  } else if (finder.siblings) {
    candidates = finder.siblings(self);
    std::sort(candidates.begin(), candidates.end());
  }

  std::vector<FoundParent> matches;
  std::vector<std::string> tried;  // "name: why not"
  for (const auto& name : candidates) {
    std::string refusal;
    Candidate candidate;
    try {
      candidate = co_await examine(finder, name);
    } catch (const backends::Error& e) {
      // An unreadable neighbour is no reason to fail; an unreadable --parent is.
      if (explicit_parent) throw;
      tried.push_back(fmt::format("{}: {}", name, e.what()));
      continue;
    }
    auto& [device, h] = candidate;
    if (!device) {
      refusal = "not found";
    } else if (!h) {
      refusal = "not a VDI";
    } else if (h->uuid_create != header.uuid_linkage) {
      refusal = fmt::format("uuidCreate {}", h->uuid_create.to_string());
    }
    if (!refusal.empty()) {
      if (explicit_parent) {
        backends::fail(refusal == "not found" ? std::errc::no_such_file_or_directory
                                              : std::errc::invalid_argument,
                       "vdi: {}: --parent {} is not its parent: {} (the parent has uuidCreate {})",
                       self, name, refusal, wanted);
      }
      tried.push_back(fmt::format("{}: {}", name, refusal));
      continue;
    }
    const std::string parent_name = device->describe();
    if (parent_name == self || chain.contains(parent_name) ||
        h->uuid_create == header.uuid_create) {
      backends::fail(std::errc::invalid_argument, "vdi: {}: parent loop: {} -> {}", self,
                     chain.text(self), parent_name);
    }
    matches.push_back({std::move(device), *h, explicit_parent ? "--parent" : "same directory"});
  }

  if (matches.empty()) {
    std::string list;
    for (std::size_t i = 0; i < tried.size() && i < max_listed; ++i) {
      list += (i ? "; " : "") + tried[i];
    }
    if (tried.size() > max_listed) list += fmt::format("; and {} more", tried.size() - max_listed);
    backends::fail(std::errc::no_such_file_or_directory,
                   "vdi: {}: parent not found: no image with uuidCreate {} (its uuidLinkage) "
                   "next to it; name it with --parent. Searched {} file{}{}{}",
                   self, wanted, tried.size(), tried.size() == 1 ? "" : "s",
                   list.empty() ? "" : ": ", list);
  }
  // Copies of the parent share its uuidCreate; the one the child was made from has the
  // uuidModify it recorded, unless the parent was written since.
  auto best = std::find_if(matches.begin(), matches.end(), [&](const FoundParent& m) {
    return m.header.uuid_modify == header.uuid_parent_modify;
  });
  if (best == matches.end()) best = matches.begin();
  if (matches.size() > 1) {
    std::string names;
    for (const auto& m : matches) names += (names.empty() ? "" : ", ") + m.device->describe();
    log::warn("vdi: {}: {} images carry the parent's uuidCreate {} ({}); using {}", self,
              matches.size(), wanted, names, best->device->describe());
  }
  if (best->header.uuid_modify != header.uuid_parent_modify) {
    log::warn(
        "vdi: {}: parent {} has uuidModify {}, the child recorded {} (uuidParentModify): the "
        "parent was modified after the child was made, so the disk may read inconsistent data",
        self, best->device->describe(), best->header.uuid_modify.to_string(),
        header.uuid_parent_modify.to_string());
  }
  co_return std::move(*best);
}

}  // namespace imagenbd::formats::vdi
