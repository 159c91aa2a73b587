#include "backends/azure_credentials.hpp"
