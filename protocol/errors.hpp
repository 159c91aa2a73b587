// The one mapping from errno (the layers' error language) to NBD error values, after
// nbdkit's nbd_errno(), and printable names for protocol values (logs and tests).
#pragma once

#include <string_view>
#include <system_error>

#include "protocol/wire.hpp"

namespace imagenbd::protocol {

// EROFS/EPERM -> EPERM; ENOSPC/EFBIG/EDQUOT -> ENOSPC; ENOTSUP -> ENOTSUP only when the
// request used FAST_ZERO (else EINVAL); EOVERFLOW only with DF (else EINVAL); ESHUTDOWN,
// ENOMEM, EINVAL as themselves; everything else -> EIO.
Errno to_nbd_error(int error_number, bool fast_zero = false, bool df = false);
// The errno value (for strerror) of an NBD error.
int to_errno(Errno error);

std::string_view name(Opt option);  // "NBD_OPT_GO", or "unknown" for others
std::string_view name(Rep reply);
std::string_view name(Cmd command);
std::string_view name(Errno error);

}  // namespace imagenbd::protocol
