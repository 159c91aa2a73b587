#include "backends/retry.hpp"
