// Validation of one transmission request against the export and what was negotiated,
// done once, here, before any layer sees the request (after nbdkit's validate_request).
// Layers below may assert what this guarantees.
#pragma once

#include <cstdint>
#include <string_view>

#include "protocol/transmission.hpp"
#include "protocol/wire.hpp"

namespace imagenbd::server {

struct RequestLimits {
  uint64_t size = 0;          // export size in bytes
  uint16_t tx_flags = 0;      // transmission flags as sent to the client
  uint32_t block_min = 1;     // required alignment of offset and length
  uint32_t block_max = 0;     // largest READ/WRITE payload
  bool block_status = false;  // a meta context (base:allocation) was selected
};

// The outcome of validation: Errno::ok, or the NBD error to reply with and why (a fixed
// string, sent to the client in structured error chunks and logged in debug mode).
struct Verdict {
  protocol::Errno error = protocol::Errno::ok;
  std::string_view reason;
  bool operator==(protocol::Errno e) const { return error == e; }
};

// NBD_CMD_DISC is accepted whatever its fields (the client is leaving anyway).
Verdict validate_request(const protocol::Request& request, const RequestLimits& limits);

}  // namespace imagenbd::server
