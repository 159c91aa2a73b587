#!/usr/bin/env bash
# nbdcopy against imagenbd: copy an export out to a file and to stdout (single and
# multi-connection), copy a file into a file export and into a RAM disk, copy export
# to export; every copy is compared byte for byte.
source "$(dirname "$0")/functions.sh"
set -x

requires nbdcopy cmp

mib=$(( 1024 * 1024 ))
size=$(( 32 * mib ))

# Source: random data with holes (sparse where the filesystem allows).
src=$tmpdir/src.img
truncate -s $size "$src"
for off in 0 3 4 10 17 31; do
    head -c $mib /dev/urandom | dd of="$src" bs=$mib seek=$off conv=notrunc status=none
done
head -c 12345 /dev/urandom | dd of="$src" bs=1 seek=$(( 20 * mib + 777 )) conv=notrunc status=none

dst=$tmpdir/dst.img
truncate -s $size "$dst"

start_imagenbd src="$src" mem=memory:32M dst="$dst"

# --- out -------------------------------------------------------------------------------
nbdcopy "$(nbd_uri src)" "$tmpdir/out1.img"
cmp "$src" "$tmpdir/out1.img" || fail "nbdcopy export -> file differs"

nbdcopy --connections=4 --requests=16 --request-size=65536 "$(nbd_uri src)" "$tmpdir/out2.img"
cmp "$src" "$tmpdir/out2.img" || fail "nbdcopy (4 connections) export -> file differs"

nbdcopy "$(nbd_uri src)" - | cmp "$src" - || fail "nbdcopy export -> stdout differs"

# --- in --------------------------------------------------------------------------------
nbdcopy --flush "$src" "$(nbd_uri dst)"
nbdcopy "$(nbd_uri dst)" - | cmp "$src" - || fail "file -> file export -> stdout differs"

nbdcopy --connections=4 "$src" "$(nbd_uri mem)"
nbdcopy "$(nbd_uri mem)" - | cmp "$src" - || fail "file -> memory export -> stdout differs"

# --- export to export: overwrite the RAM disk with a different image, then copy it over
# the file export; the old content must be gone everywhere (holes zeroed by nbdcopy).
other=$tmpdir/other.img
truncate -s $size "$other"
head -c $(( 2 * mib )) /dev/urandom | dd of="$other" bs=$mib seek=5 conv=notrunc status=none
nbdcopy "$other" "$(nbd_uri mem)"
nbdcopy "$(nbd_uri mem)" "$(nbd_uri dst)"
nbdcopy "$(nbd_uri dst)" - | cmp "$other" - || fail "memory export -> file export differs"

stop_imagenbd

# The file behind the export holds exactly what was acknowledged.
cmp "$other" "$dst" || fail "dst.img on disk differs from what was copied in"
cmp "$src" "$tmpdir/out1.img"
