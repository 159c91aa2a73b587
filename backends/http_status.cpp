#include "backends/http_status.hpp"
