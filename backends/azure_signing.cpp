#include "backends/azure_signing.hpp"
