#include "backends/page_map.hpp"
