#include "backends/parallel.hpp"
