#!/usr/bin/env bash
# VDI images through imagenbd. (1) Images made by qemu-img (static and dynamic) and filled
# by qemu-io are served byte-identically, whether probed or named with -f vdi, and
# nbdinfo --map shows unallocated blocks as holes. (2) Images written through imagenbd
# (qemu-io over NBD: allocating, unaligned, concurrent and FUA writes, write -z, discard;
# nbdcopy of a random file) pass qemu-img check and compare equal to a raw file given the
# same writes; fio verifies writes from four connections at once. (3) Damaged images (bad
# signature, truncated file, differencing without its parent) are refused, naming the file
# and the field.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo nbdcopy jq

mib=$(( 1024 * 1024 ))

# --- 1. qemu-made images are served as qemu reads them ---------------------------------
for kind in dynamic static; do
    opts=()
    [ "$kind" = static ] && opts=(-o static=on)
    qemu-img create -f vdi "${opts[@]}" "$tmpdir/$kind.vdi" 24M
    io vdi "$tmpdir/$kind.vdi" 'write -P 0x11 0 64k' 'write -P 0x22 3M 1536k' \
        'write -P 0x33 7000 3000' "write -P 0x44 $(( 24 * mib - 4096 )) 4096"
    qemu-img convert -f vdi -O raw "$tmpdir/$kind.vdi" "$tmpdir/$kind.raw"
done
cp "$tmpdir/dynamic.vdi" "$tmpdir/named.vdi"
start_imagenbd -r dynamic="$tmpdir/dynamic.vdi" static="$tmpdir/static.vdi"
for kind in dynamic static; do
    qemu-img compare -f raw -F raw "$tmpdir/$kind.raw" "$(nbd_uri $kind)" ||
        fail "$kind.vdi served through imagenbd differs from qemu-img convert's raw copy"
    [ "$(nbdinfo --size "$(nbd_uri $kind)")" = $(( 24 * mib )) ] || fail "$kind: wrong size"
done
# Dynamic: blocks 0, 3, 4 and 23 are allocated, the rest are holes. Static: all data.
map_types "$(nbd_uri dynamic)" >/dev/null
diff -u - "$tmpdir/map.txt" <<EOF || fail "dynamic.vdi: nbdinfo --map differs"
0 $mib 0
$mib $(( 2 * mib )) 3
$(( 3 * mib )) $(( 2 * mib )) 0
$(( 5 * mib )) $(( 18 * mib )) 3
$(( 23 * mib )) $mib 0
EOF
map_types "$(nbd_uri static)" >/dev/null
diff -u - "$tmpdir/map.txt" <<<"0 $(( 24 * mib )) 0" || fail "static.vdi: nbdinfo --map differs"
stop_imagenbd

# Named with -f vdi: the same.
start_imagenbd -r -f vdi -x named "$tmpdir/named.vdi"
qemu-img compare -f raw -F raw "$tmpdir/dynamic.raw" "$(nbd_uri named)" ||
    fail "-f vdi: image differs"
stop_imagenbd

# --- 2. Images written through imagenbd -------------------------------------------------
# The same writes go to an imagenbd export of a new dynamic VDI and to a raw file; both
# must read the same, and the VDI must pass qemu-img check.
qemu-img create -f vdi "$tmpdir/w.vdi" 32M
truncate -s 32M "$tmpdir/w.raw"
qemu-img create -f vdi -o static=on "$tmpdir/ws.vdi" 8M
truncate -s 8M "$tmpdir/ws.raw"
qemu-img create -f vdi "$tmpdir/copy.vdi" 16M
head -c $(( 16 * mib - 3 * 4096 )) /dev/urandom >"$tmpdir/random.bin"
truncate -s 16M "$tmpdir/random.bin"  # ends in zeroes: nbdcopy may zero, not write, them

start_imagenbd w="$tmpdir/w.vdi" ws="$tmpdir/ws.vdi" copy="$tmpdir/copy.vdi"
# Allocating writes (FUA: qemu-io's default writethrough cache), then in-place ones.
both w 'write -P 0x41 0 64k' 'write -P 0x42 1M 1M' 'write -P 0x43 20M 4k' \
       'write -P 0x44 64k 4k'
# Unaligned, and across block boundaries (blocks 1/2, and 5/6/7 in one request).
both w 'write -P 0x51 3000 5000' "write -P 0x52 $(( 2 * mib - 100 )) 200" \
       "write -P 0x53 $(( 5 * mib + 7 )) $(( 2 * mib + 13 ))"
# Many requests in flight at once, several to one unallocated block.
both w -o -t writeback -- 'aio_write -P 0x61 10M 4k' 'aio_write -P 0x62 10300k 8k' \
       'aio_write -P 0x63 10500k 64k' 'aio_write -P 0x64 11M 512' \
       'aio_write -P 0x65 11400k 4k' 'aio_write -P 0x66 10240k 1k' 'aio_flush' 'flush'
# A whole block of zeroes written as data, write -z inside allocated blocks and over whole
# free blocks (with and without unmap), discard.
both w "write -P 0 $(( 12 * mib )) 1M" 'write -z 1M 64k' 'write -z 14M 2M'
both w -o -d unmap -- 'write -z -u 5M 64k' 'write -z -u 24M 1M' 'discard 1536k 512k' \
       'discard 16M 1M'
# The static image: in place only.
both ws 'write -P 0x71 0 64k' "write -P 0x72 $(( 3 * mib - 10 )) 20" 'write -z 4M 1M'
both ws -o -d unmap -- 'discard 6M 1M' 'write -z -u 7M 4k'

nbdcopy "$tmpdir/random.bin" "$(nbd_uri copy)"

for name in w ws; do
    qemu-img compare -f raw -F raw "$tmpdir/$name.raw" "$(nbd_uri $name)" ||
        fail "$name: the export differs from the raw file given the same writes"
done
qemu-img compare -f raw -F raw "$tmpdir/random.bin" "$(nbd_uri copy)" ||
    fail "copy: the export differs from the file nbdcopy copied"
# Blocks with data are data; blocks nothing touched, or that were only zeroed (12, 14, 15,
# 24), are holes.
map_types "$(nbd_uri w)" >/dev/null
diff -u - "$tmpdir/map.txt" <<EOF || fail "w: nbdinfo --map differs"
0 $(( 3 * mib )) 0
$(( 3 * mib )) $(( 2 * mib )) 3
$(( 5 * mib )) $(( 3 * mib )) 0
$(( 8 * mib )) $(( 2 * mib )) 3
$(( 10 * mib )) $(( 2 * mib )) 0
$(( 12 * mib )) $(( 8 * mib )) 3
$(( 20 * mib )) $mib 0
$(( 21 * mib )) $(( 11 * mib )) 3
EOF
stop_imagenbd

for name in w ws copy; do
    qemu-img check -f vdi "$tmpdir/$name.vdi" || fail "qemu-img check fails on $name.vdi"
done
for name in w ws; do
    qemu-img compare -f vdi -F raw "$tmpdir/$name.vdi" "$tmpdir/$name.raw" ||
        fail "$name.vdi (read by qemu) differs from the raw file"
done
qemu-img compare -f vdi -F raw "$tmpdir/copy.vdi" "$tmpdir/random.bin" ||
    fail "copy.vdi (read by qemu) differs from random.bin"
# qemu sees the same allocation: 9 data blocks in w, all 16 in copy.
for name_blocks in w:9 copy:16; do
    name=${name_blocks%:*}
    qemu-img map -f vdi --output=json "$tmpdir/$name.vdi" | tee "$tmpdir/$name.map"
    data=$(jq '[.[] | select(.data) | .length] | add' "$tmpdir/$name.map")
    [ "$data" = $(( ${name_blocks#*:} * mib )) ] ||
        fail "$name.vdi: qemu-img map finds $data bytes of data"
done

# --- 2b. Four connections at once, verified (fio's nbd engine, where installed) ----------
if command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then
    qemu-img create -f vdi "$tmpdir/fio.vdi" 32M
    start_imagenbd "$tmpdir/fio.vdi"
    fio --output="$tmpdir/fio.out" --name=vdi --ioengine=nbd --uri="$uri" \
        --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=16 --numjobs=4 --size=8M \
        --offset_increment=8M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --verify_dump=0 --verify_state_save=0 --randrepeat=0 ||
        { cat "$tmpdir/fio.out"; fail "fio with 4 connections to a dynamic VDI failed"; }
    stop_imagenbd
    qemu-img check -f vdi "$tmpdir/fio.vdi" || fail "qemu-img check fails after fio"
fi

# --- 3. Damaged images are refused ------------------------------------------------------
serve_fails ()   # OUTFILE SERVE-ARGS...
{
    local out=$1
    shift
    must_fail "$out" timeout 20 "$IMAGENBD" serve -k "$sockdir/bad.sock" "$@"
}
cp "$tmpdir/dynamic.vdi" "$tmpdir/badsig.vdi"
printf '\x7f\x10\xda\xbf' | dd of="$tmpdir/badsig.vdi" bs=1 seek=64 conv=notrunc status=none
serve_fails "$tmpdir/badsig.out" -f vdi "$tmpdir/badsig.vdi"
must_contain "$tmpdir/badsig.out" \
    "vdi: $tmpdir/badsig.vdi: header: signature 0xbfda107f is not 0xbeda107f \(not a VDI image\)"

# The last allocated block (block 23, physical 3) loses its data: the file is cut short.
cp "$tmpdir/dynamic.vdi" "$tmpdir/short.vdi"
truncate -s -1M "$tmpdir/short.vdi"
for ro in "" -r; do
    serve_fails "$tmpdir/short.out" $ro "$tmpdir/short.vdi"
    must_contain "$tmpdir/short.out" \
        "vdi: $tmpdir/short.vdi: block map entry 23 points past the end of the file"
done

# A differencing image whose parent is nowhere is refused as such (never read as if it had
# no parent): patch the type and a parent UUID. test-vdi-differencing.sh has the rest.
cp "$tmpdir/dynamic.vdi" "$tmpdir/diff.vdi"
printf '\x04' | dd of="$tmpdir/diff.vdi" bs=1 seek=$(( 0x4c )) conv=notrunc status=none
printf '\x01' | dd of="$tmpdir/diff.vdi" bs=1 seek=$(( 0x1a8 )) conv=notrunc status=none
serve_fails "$tmpdir/diff.out" "$tmpdir/diff.vdi"
must_contain "$tmpdir/diff.out" "vdi: $tmpdir/diff.vdi: parent not found: no image with uuidCreate"
