#!/usr/bin/env bash
# The kernel boots from imagenbd: the rig's guest mounts an ext4 root from /dev/nbd0 served
# from a raw, a dynamic VHD and a dynamic VDI image, switch_roots into it and runs its
# /sbin/init, which checks its files against a manifest and writes one (kernel.sh,
# tests/kernel/README.md). On the host, the image must then hold a clean ext4 with that
# file.
source "$(dirname "$0")/functions.sh"
source "$srcdir/kernel.sh"

"$kernel_rig/make-rootfs-image.sh" "$tmpdir/root.ext4" 32
exports=()
for fmt in raw vhd vdi; do
    image_from_raw "$fmt" "$tmpdir/root.ext4" "$tmpdir/root.$fmt"
    exports+=("root-$fmt=$tmpdir/root.$fmt")
done
start_imagenbd_tcp "${exports[@]}"
for fmt in raw vhd vdi; do
    kernel_run rootfs "root-$fmt"
done
stop_imagenbd   # flushes and closes; must exit 0

for fmt in raw vhd vdi; do
    host_view "$fmt" "$tmpdir/root.$fmt" "$tmpdir/view.raw"
    e2fsck -fn "$tmpdir/view.raw" >"$tmpdir/fsck.out" 2>&1 || {
        cat "$tmpdir/fsck.out"
        fail "the $fmt root filesystem is not clean on the host after the boot"
    }
    debugfs -R 'cat /var/rig-boot' "$tmpdir/view.raw" >"$tmpdir/boot.txt" 2>/dev/null
    must_contain "$tmpdir/boot.txt" '^booted with nonce [0-9a-f]{16}$' \
        "the file the booted system wrote to its $fmt root"
done
