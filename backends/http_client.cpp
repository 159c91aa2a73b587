#include "backends/http_client.hpp"
