#!/usr/bin/env bash
# The kernel's nbd client writes to raw, dynamic VHD and dynamic VDI exports (kernel.sh,
# tests/kernel/README.md): O_DIRECT writes + FLUSH read back (aligned, at the end, and
# 3 sectors not 4 KiB-aligned), TRIM, mkfs.ext4, 16 MiB + 200 files, detach, reattach,
# e2fsck -fn and every file checked. Then, on the host, qemu-img must read a clean ext4
# out of each image: what imagenbd allocated and wrote is valid VHD/VDI.
# test-kernel-multiconn.sh does the same with four connections (nbd-client -C 4).
source "$(dirname "$0")/functions.sh"
source "$srcdir/kernel.sh"

kernel_write_formats "" raw vhd vdi
