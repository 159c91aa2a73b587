#!/usr/bin/env bash
# test-kernel-write.sh with four connections per device (nbd-client -C 4): the kernel
# spreads its requests over them, so writes that allocate VHD/VDI blocks, and the FLUSH
# that must cover writes made on the other connections, arrive on four sessions at once.
source "$(dirname "$0")/functions.sh"
source "$srcdir/kernel.sh"

kernel_write_formats "-C 4" raw vhd vdi
