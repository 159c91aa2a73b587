// Finding the parent of a differencing VDI (formats.md §2.7). The file records no path,
// only the parent's uuidCreate (uuidLinkage), so the candidates are the --parent the user
// named (top of the chain only) or the files next to the image, and the one whose header
// carries that UUID is the parent. Candidates that are no VDI are skipped; a --parent
// that is not the parent is an error, never a fallback.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "backends/block_device.hpp"
#include "formats/parent_finder.hpp"
#include "formats/vdi_layout.hpp"

namespace imagenbd::formats::vdi {

struct FoundParent {
  backends::DevicePtr device;  // the parent's byte store, not yet opened as a VDI
  Header header;               // its first sector, decoded
  std::string source;          // "--parent" or "same directory", for logs
};

// The parent of the differencing image `child` (header = its header), among what
// chain.finder offers. Warns when the parent's uuidModify is not the uuidParentModify the
// child recorded (the parent changed since), and when several files carry the UUID (the one
// with the recorded uuidModify wins, then the first by name).
// @throws backends::Error: EINVAL without a finder, for a chain deeper than
// max_parent_depth, for a loop, or a --parent that is not the parent; ENOENT naming the
// files searched when none matches; finder errors for --parent.
boost::asio::awaitable<FoundParent> find_parent(backends::BlockDevice& child, const Header& header,
                                                const ParentChain& chain);

}  // namespace imagenbd::formats::vdi
