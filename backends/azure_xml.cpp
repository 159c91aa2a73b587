#include "backends/azure_xml.hpp"
