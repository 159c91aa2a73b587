#include "backends/azure_page_blob.hpp"
