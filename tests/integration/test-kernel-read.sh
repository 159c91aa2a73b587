#!/usr/bin/env bash
# The kernel's nbd client reads raw, dynamic VHD and dynamic VDI exports (nbd-client -R;
# kernel.sh, tests/kernel/README.md): O_DIRECT 1 MiB reads and buffered 4 KiB reads with
# readahead must both give the bytes qemu-img reads from the image, holes included, and
# a write to the read-only device must be refused.
source "$(dirname "$0")/functions.sh"
source "$srcdir/kernel.sh"

# 32 MiB, mostly holes: random data at the start, at odd places in the middle (a VHD
# block is 2 MiB, a VDI block 1 MiB) and in the last MiB; qemu-img convert keeps the
# holes as unallocated blocks, which imagenbd must read as zeroes.
raw=$tmpdir/pattern.raw
truncate -s 32M "$raw"
for at in 0:$MiB $((3 * MiB + 4096)):$((300 * 1024)) $((17 * MiB - 512)):$((2 * MiB)) \
         $((24 * MiB)):65536 $((31 * MiB)):$MiB; do
    dd if=/dev/urandom of="$raw" bs="${at#*:}" count=1 seek="${at%%:*}" oflag=seek_bytes \
        iflag=fullblock conv=notrunc status=none
done

exports=()
for fmt in raw vhd vdi; do
    image_from_raw "$fmt" "$raw" "$tmpdir/disk.$fmt"
    exports+=("disk-$fmt=$tmpdir/disk.$fmt")
done
start_imagenbd_tcp -r "${exports[@]}"

for fmt in raw vhd vdi; do
    host_view "$fmt" "$tmpdir/disk.$fmt" "$tmpdir/view.raw"
    size=$(stat -c %s "$tmpdir/view.raw")
    want=$(sha256sum <"$tmpdir/view.raw" | cut -d' ' -f1)
    # The first 32 MiB are the pattern in every format (a VHD's CHS size may add zeroes).
    cmp -n $((32 * MiB)) "$raw" "$tmpdir/view.raw" || fail "qemu-img convert of the $fmt image differs"
    kernel_run read "disk-$fmt" --expect-sha256 "$want" --expect-size "$size"
    must_contain "$tmpdir/kernel-read-disk-$fmt.log" "sha256 matches the expected value"
done
stop_imagenbd
