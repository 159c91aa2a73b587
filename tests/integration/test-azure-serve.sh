#!/usr/bin/env bash
# Images in Azure page blobs (Azurite) served through imagenbd. (1) A fixed VHD made by
# qemu-img and a raw image with holes are uploaded and served read-only, by az:// URI and
# by path-style http:// URL: each reads exactly as qemu reads the local file (the VHD as
# its virtual disk). (2) Written through the server with qemu-io (aligned, unaligned,
# across 4 MiB Put Page limits, large, concurrent, write -z, discard) like a raw file given
# the same writes; downloaded by a fresh process afterwards, the blobs hold those writes.
# (3) fio verify (crc32c) over 2 connections, verified again by a fresh server process.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo
start_azurite

mib=$(( 1024 * 1024 ))

# --- 1. Upload and serve ------------------------------------------------------------------
# The VHD: fixed, 64 MiB (a whole MiB, as Azure wants it), some data in it.
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/vhd.vhd" 64M
io vpc "$tmpdir/vhd.vhd" 'write -P 0x11 0 64k' 'write -P 0x22 3M 1536k' \
    'write -P 0x33 7000 3000' "write -P 0x44 $(( 64 * mib - 4096 )) 4096"
qemu-img convert -f vpc -O raw "$tmpdir/vhd.vhd" "$tmpdir/vhd.raw"
# The raw image: 40 MiB, random data at a few places, holes elsewhere.
truncate -s 40M "$tmpdir/holes.raw"
for at in 0 $(( 5 * mib + 512 )) $(( 12 * mib )) $(( 40 * mib - 8192 )); do
    head -c 8192 /dev/urandom | dd of="$tmpdir/holes.raw" bs=512 seek=$(( at / 512 )) \
        conv=notrunc status=none
done
head -c $(( 5 * mib )) /dev/urandom | dd of="$tmpdir/holes.raw" bs=1M seek=20 conv=notrunc \
    status=none

"$IMAGENBD" upload "$tmpdir/vhd.vhd" "$(az_uri vhd.vhd)" 2>"$tmpdir/upload-vhd.err" ||
    { cat "$tmpdir/upload-vhd.err"; fail "upload of the fixed VHD failed"; }
cat "$tmpdir/upload-vhd.err"
if grep -q 'imagenbd convert --azure' "$tmpdir/upload-vhd.err"; then
    fail "upload warned about a fixed whole-MiB VHD, which Azure mounts as it is"
fi
"$IMAGENBD" upload "$tmpdir/holes.raw" "$(az_uri holes.raw)"

# Read-only: one export by az:// URI, one by path-style URL.
start_imagenbd -r vhd="$(az_uri vhd.vhd)" holes="$(az_http_uri holes.raw)"
for name in vhd holes; do
    [ "$(nbdinfo --size "$(nbd_uri $name)")" = "$(stat -c %s "$tmpdir/$name.raw")" ] ||
        fail "$name: imagenbd serves a different size than the local image has"
    qemu-img compare -f raw -F raw "$tmpdir/$name.raw" "$(nbd_uri $name)" ||
        fail "$name: the blob served through imagenbd differs from the local image"
done
nbdinfo "$(nbd_uri holes)" | tee "$tmpdir/holes.info"
must_contain "$tmpdir/holes.info" "is_read_only: true"
must_fail "$tmpdir/ro-write.out" qemu-io -f raw -c 'write -P 0x55 0 4k' "$(nbd_uri holes)"
stop_imagenbd

# --- 2. Writes through the server ---------------------------------------------------------
# The same writes go to the exports and to the local raw files (both, in functions.sh);
# the VHD export is its virtual disk, so vhd.raw is its reference.
start_imagenbd vhd="$(az_uri vhd.vhd)" holes="$(az_http_uri holes.raw)"
for name in vhd holes; do
    # Aligned, into holes and over data.
    both $name 'write -P 0x41 0 64k' 'write -P 0x42 2M 1M' "write -P 0x43 $(( 12 * mib )) 4k"
    # Unaligned (read-modify-write of the edge pages), one inside a single page.
    both $name 'write -P 0x51 3000 5000' "write -P 0x52 $(( 5 * mib + 100 )) 200" \
        "write -P 0x53 $(( 7 * mib + 7 )) $(( mib + 13 ))"
    # Larger than one Put Page (4 MiB), across 4 MiB boundaries, unaligned at both ends.
    both $name "write -P 0x61 $(( 15 * mib )) $(( 9 * mib ))" \
        "write -P 0x62 $(( 26 * mib - 1000 )) $(( 4 * mib + 3000 ))"
    # Many in flight at once, some overlapping pages of others' unaligned edges.
    both $name -o -t writeback -- 'aio_write -P 0x71 32M 4k' 'aio_write -P 0x72 32772k 8k' \
        'aio_write -P 0x73 33M 64k' 'aio_write -P 0x74 33850000 1000' \
        'aio_write -P 0x75 33851000 3000' 'aio_write -P 0x76 34M 1M' 'aio_flush' 'flush'
    # Zeroes: written as data, write -z aligned and not, discard (Clear Page).
    both $name "write -P 0 $(( 34 * mib )) 64k" "write -z $(( 20 * mib )) 1M" \
        "write -z $(( 22 * mib + 100 )) 5000"
    both $name -o -d unmap -- "write -z -u $(( 23 * mib )) 512k" "discard $(( 24 * mib )) 1M"
    # The last bytes.
    size=$(stat -c %s "$tmpdir/$name.raw")
    both $name "write -P 0x7f $(( size - 700 )) 700"
    qemu-img compare -f raw -F raw "$tmpdir/$name.raw" "$(nbd_uri $name)" ||
        fail "$name: the export differs from the raw file given the same writes"
done
stop_imagenbd

# A fresh process sees the writes: download both blobs and compare.
"$IMAGENBD" download "$(az_uri vhd.vhd)" "$tmpdir/vhd-dl.vhd"
"$IMAGENBD" download "$(az_http_uri holes.raw)" "$tmpdir/holes-dl.raw"
[ "$(stat -c %s "$tmpdir/vhd-dl.vhd")" = $(( 64 * mib + 512 )) ] ||
    fail "the downloaded VHD has the wrong size"
qemu-img compare -f vpc -F raw "$tmpdir/vhd-dl.vhd" "$tmpdir/vhd.raw" ||
    fail "the downloaded VHD (read by qemu) differs from what was written"
cmp "$tmpdir/holes-dl.raw" "$tmpdir/holes.raw" ||
    fail "the downloaded raw image differs from what was written"

# --- 3. fio verify, then a fresh process --------------------------------------------------
if fio --enghelp 2>/dev/null | grep -qw nbd; then
    truncate -s 16M "$tmpdir/fio.raw"
    "$IMAGENBD" upload "$tmpdir/fio.raw" "$(az_uri fio.raw)"
    run_fio ()   # OUTFILE FIO-OPTIONS...
    {
        local out=$1 status=0
        shift
        fio --output-format=json --output="$out" --name=azure --ioengine=nbd \
            --uri="$(nbd_uri)" --rw=randwrite --bssplit=4k/40:64k/40:1m/20 --iodepth=8 \
            --numjobs=2 --size=4M --offset_increment=8M --verify=crc32c --verify_fatal=1 \
            --verify_state_save=0 --randrepeat=1 --group_reporting=0 "$@" || status=$?
        [ $status -eq 0 ] || { cat "$out"; fail "fio $* exited with status $status"; }
        py3 - "$out" <<'PY'
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
assert len(jobs) == 2, jobs
for j in jobs:
    print(j["jobname"], j["error"], j["read"]["io_bytes"])
    assert j["error"] == 0 and j["read"]["io_bytes"] == 4 << 20, "fio did not verify 4 MiB"
PY
    }
    start_imagenbd "$(az_uri fio.raw)"
    run_fio "$tmpdir/fio-write.json" --do_verify=1
    stop_imagenbd
    start_imagenbd -r "$(az_uri fio.raw)"
    run_fio "$tmpdir/fio-verify.json" --verify_only
    stop_imagenbd
else
    echo "$test_name: fio without the nbd engine: skipping the fio part"
fi
