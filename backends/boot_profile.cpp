// PLACEHOLDER (issue 6 seam): passes `below` through until the filter is written.
#include "backends/boot_profile.hpp"

namespace imagenbd::backends {

DevicePtr open_boot_profile(DevicePtr below, const BootProfileOptions&) {
  return below;
}

}  // namespace imagenbd::backends
