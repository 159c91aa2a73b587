// The ParentFinder for images in local files: parents are opened read-only by path, named
// by their realpath (so loop detection sees through symlinks and "./"), and siblings are the
// regular files of the same directory.
#pragma once

#include "formats/parent_finder.hpp"

namespace imagenbd::server {

// explicit_parent: --parent FILE, or "".
formats::ParentFinder local_parent_finder(std::string explicit_parent = {});

}  // namespace imagenbd::server
