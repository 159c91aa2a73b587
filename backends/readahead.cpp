// PLACEHOLDER (issue 6 seam): passes `below` through until the filter is written.
#include "backends/readahead.hpp"

namespace imagenbd::backends {

DevicePtr open_readahead(DevicePtr below, const ReadaheadOptions&) {
  return below;
}

}  // namespace imagenbd::backends
