#include "backends/azure_blob.hpp"
