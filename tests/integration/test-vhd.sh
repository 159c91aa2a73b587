#!/usr/bin/env bash
# VHD images through imagenbd. (1) Images made by qemu-img -f vpc (fixed and dynamic, with
# and without force_size) and filled by qemu-io are served byte-identically, probed or named
# with -f vhd, and nbdinfo --map shows unallocated blocks as holes. (1b) So are more sizes
# (CHS-exact or not, odd, up to 1000 MiB + 512; made by qemu-img and by imagenbd create)
# and block sizes from 4 KiB to 16 MiB. (2) Images written through imagenbd (qemu-io
# over NBD: allocating, unaligned, concurrent and FUA writes, write -z, discard; nbdcopy
# over several connections) read back through qemu (-f vpc) and through a fresh imagenbd
# exactly like a raw file given the same writes. (3) fio verify over 4 connections,
# verified again by a fresh process. (4) Damaged images are refused naming the file, the
# structure and the field; a dynamic disk whose last sector is cut short is served
# read-only from the footer copy at offset 0, with a warning.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo nbdcopy

mib=$(( 1024 * 1024 ))

# --- 1. qemu-made images are served as qemu reads them ---------------------------------
# force_size=on: exact sizes, creator "qem2", geometry 65535/16/255. Without it (chs.vhd),
# qemu rounds 10M up to a CHS-exact 10,514,432 bytes, creator "qemu".
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/fixed.vhd" 24M
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/dynamic.vhd" 24M
qemu-img create -f vpc -o subformat=dynamic "$tmpdir/chs.vhd" 10M
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/odd.vhd" $(( 5 * mib + 3 * 512 ))
for kind in fixed dynamic chs odd; do
    size=$(qemu-img info -f vpc --output=json "$tmpdir/$kind.vhd" |
           py3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
    io vpc "$tmpdir/$kind.vhd" 'write -P 0x11 0 64k' 'write -P 0x22 3M 1536k' \
        'write -P 0x33 7000 3000' "write -P 0x44 $(( size - 4096 )) 4096"
    qemu-img convert -f vpc -O raw "$tmpdir/$kind.vhd" "$tmpdir/$kind.raw"
done
[ "$(stat -c %s "$tmpdir/chs.raw")" = 10514432 ] || fail "qemu did not round chs.vhd up"
cp "$tmpdir/dynamic.vhd" "$tmpdir/named.vhd"
start_imagenbd -r fixed="$tmpdir/fixed.vhd" dynamic="$tmpdir/dynamic.vhd" \
    chs="$tmpdir/chs.vhd" odd="$tmpdir/odd.vhd"
for kind in fixed dynamic chs odd; do
    qemu-img compare -f raw -F raw "$tmpdir/$kind.raw" "$(nbd_uri $kind)" ||
        fail "$kind.vhd served through imagenbd differs from qemu-img convert's raw copy"
    [ "$(nbdinfo --size "$(nbd_uri $kind)")" = "$(stat -c %s "$tmpdir/$kind.raw")" ] ||
        fail "$kind: wrong size"
done
# Dynamic (2 MiB blocks): blocks 0, 1, 2 and 11 are allocated, the rest are holes.
map_types "$(nbd_uri dynamic)" >/dev/null
diff -u - "$tmpdir/map.txt" <<EOF || fail "dynamic.vhd: nbdinfo --map differs"
0 $(( 6 * mib )) 0
$(( 6 * mib )) $(( 16 * mib )) 3
$(( 22 * mib )) $(( 2 * mib )) 0
EOF
stop_imagenbd

# Named with -f vhd: the same.
start_imagenbd -r -f vhd -x named "$tmpdir/named.vhd"
qemu-img compare -f raw -F raw "$tmpdir/dynamic.raw" "$(nbd_uri named)" ||
    fail "-f vhd: image differs"
stop_imagenbd

# --- 1b. More sizes and block sizes -------------------------------------------------------
# Sizes that are not CHS-exact (qemu rounds them up without force_size) and odd ones, fixed
# and dynamic, force_size on and off; images of the same sizes made by imagenbd create; and
# block sizes other than 2 MiB, which qemu 7.2 cannot create but reads and writes (made by
# imagenbd create, filled by qemu). Each is filled by qemu-io -f vpc at its start, across
# a block boundary, unaligned, and at its very end, then served byte-identically to
# qemu-img convert's raw copy, at the size qemu reads.
fill_vhd ()   # IMAGE BLOCK-SIZE
{
    local img=$1 bs=$2 size
    size=$(qemu-img info -f vpc --output=json "$img" |
           py3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
    io vpc "$img" 'write -P 0x11 0 64k' "write -P 0x22 $(( bs - 300 )) 3000" \
        "write -P 0x33 $(( size / 2 + 7 )) 5000" "write -P 0x44 $(( size - 4096 )) 3396" \
        "write -P 0x55 $(( size - 700 )) 700"
    qemu-img convert -f vpc -O raw "$img" "${img%.vhd}.raw"
}
variants=()
for size in 10M $(( 1000 * mib + 512 )) 127M $(( 33 * mib + 3 * 512 )); do
    for sub in fixed dynamic; do
        for force in on off; do
            name=q${#variants[@]}
            qemu-img create -f vpc -o subformat=$sub,force_size=$force "$tmpdir/$name.vhd" \
                "$size" >/dev/null
            fill_vhd "$tmpdir/$name.vhd" $(( 2 * mib ))
            variants+=("$name")
        done
        name=i${#variants[@]}
        "$IMAGENBD" create -f vhd --subformat $sub "$tmpdir/$name.vhd" "$size"
        fill_vhd "$tmpdir/$name.vhd" $(( 2 * mib ))
        variants+=("$name")
    done
done
# Not below 4 KiB: qemu 7.2 computes a 0-byte sector bitmap for such blocks (block_size /
# 4096, rounded up to 512: block/vpc.c) and so writes them without one, which imagenbd
# rightly refuses ("BAT entry N points past the end of the file").
for bs in 4096 65536 $(( 512 * 1024 )) $mib $(( 4 * mib )) $(( 16 * mib )); do
    name=b$bs
    "$IMAGENBD" create -f vhd --subformat dynamic --block-size "$bs" "$tmpdir/$name.vhd" \
        $(( 33 * mib + 3 * 512 ))
    fill_vhd "$tmpdir/$name.vhd" "$bs"
    variants+=("$name")
done
exports=()
for name in "${variants[@]}"; do exports+=("$name=$tmpdir/$name.vhd"); done
start_imagenbd -r "${exports[@]}"
for name in "${variants[@]}"; do
    [ "$(nbdinfo --size "$(nbd_uri "$name")")" = "$(stat -c %s "$tmpdir/$name.raw")" ] ||
        fail "$name: imagenbd serves a different size than qemu reads"
    qemu-img compare -f raw -F raw "$tmpdir/$name.raw" "$(nbd_uri "$name")" ||
        fail "$name.vhd served through imagenbd differs from qemu-img convert's raw copy"
done
stop_imagenbd
# force_size=on keeps the exact size; off rounds up to CHS; imagenbd create is exact.
[ "$(stat -c %s "$tmpdir/q0.raw")" = 10485760 ] || fail "q0: force_size=on is not exact"
[ "$(stat -c %s "$tmpdir/q1.raw")" = 10514432 ] || fail "q1: qemu did not round 10M up"
for name in i2 i5; do
    [ "$(stat -c %s "$tmpdir/$name.raw")" = 10485760 ] || fail "$name: create is not exact"
done
for name in q18 i20 q21 i23 b4096 b$(( 16 * mib )); do
    [ "$(stat -c %s "$tmpdir/$name.raw")" = $(( 33 * mib + 3 * 512 )) ] ||
        fail "$name: not exactly the size asked for"
done
for name in q19 q22; do
    [ "$(stat -c %s "$tmpdir/$name.raw")" -gt $(( 33 * mib + 3 * 512 )) ] ||
        fail "$name: qemu did not round up"
done
rm -f "$tmpdir"/[qib]*.raw "$tmpdir"/[qib]*.vhd

# --- 2. Images written through imagenbd -------------------------------------------------
# The same writes go to an imagenbd export of a VHD and to a raw file; qemu must read the
# VHD as the raw file afterwards.
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/w.vhd" 32M
truncate -s 32M "$tmpdir/w.raw"
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/wf.vhd" 8M
truncate -s 8M "$tmpdir/wf.raw"
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/copy.vhd" 16M
head -c $(( 16 * mib - 3 * 4096 )) /dev/urandom >"$tmpdir/random.bin"
truncate -s 16M "$tmpdir/random.bin"  # ends in zeroes: nbdcopy may zero, not write, them

start_imagenbd w="$tmpdir/w.vhd" wf="$tmpdir/wf.vhd" copy="$tmpdir/copy.vhd"
# Allocating writes (FUA: qemu-io's default writethrough cache), then in-place ones.
both w 'write -P 0x41 0 64k' 'write -P 0x42 2M 2M' 'write -P 0x43 20M 4k' \
       'write -P 0x44 64k 4k'
# Unaligned, and across block boundaries (blocks 1/2, and 2/3/4 in one request).
both w 'write -P 0x51 3000 5000' "write -P 0x52 $(( 4 * mib - 100 )) 200" \
       "write -P 0x53 $(( 5 * mib + 7 )) $(( 4 * mib + 13 ))"
# Many requests in flight at once, several to one unallocated block (block 5).
both w -o -t writeback -- 'aio_write -P 0x61 10M 4k' 'aio_write -P 0x62 10300k 8k' \
       'aio_write -P 0x63 10500k 64k' 'aio_write -P 0x64 11M 512' \
       'aio_write -P 0x65 11400k 4k' 'aio_write -P 0x66 10240k 1k' 'aio_flush' 'flush'
# A whole block of zeroes written as data, write -z inside an allocated block and over a
# free one.
both w "write -P 0 $(( 12 * mib )) 2M" 'write -z 1M 64k' 'write -z 14M 2M'
# With unmap: zero and discard inside blocks, over a free block, and over a whole allocated
# block (block 1 is freed, then allocated again at the end of the file).
both w -o -d unmap -- 'write -z -u 5M 64k' 'write -z -u 24M 2M' 'discard 16M 1M' \
       'discard 2M 2M'
both w "write -P 0x71 $(( 3 * mib + 100 )) 1000"
# The fixed image: in place only.
both wf 'write -P 0x81 0 64k' "write -P 0x82 $(( 3 * mib - 10 )) 20" 'write -z 4M 1M' \
        "write -P 0x83 $(( 8 * mib - 512 )) 512"
both wf -o -d unmap -- 'discard 6M 1M' 'write -z -u 7M 4k'

nbdcopy "$tmpdir/random.bin" "$(nbd_uri copy)"

for name in w wf; do
    qemu-img compare -f raw -F raw "$tmpdir/$name.raw" "$(nbd_uri $name)" ||
        fail "$name: the export differs from the raw file given the same writes"
done
qemu-img compare -f raw -F raw "$tmpdir/random.bin" "$(nbd_uri copy)" ||
    fail "copy: the export differs from the file nbdcopy copied"
# Blocks with data are data (block 6 holds written zeroes); blocks nothing wrote to, or
# that were only zeroed or discarded (7, 8, 12), are holes.
map_types "$(nbd_uri w)" >/dev/null
diff -u - "$tmpdir/map.txt" <<EOF || fail "w: nbdinfo --map differs"
0 $(( 14 * mib )) 0
$(( 14 * mib )) $(( 6 * mib )) 3
$(( 20 * mib )) $(( 2 * mib )) 0
$(( 22 * mib )) $(( 10 * mib )) 3
EOF
stop_imagenbd

# qemu reads what we wrote; so does a fresh imagenbd.
for name in w wf; do
    qemu-img compare -f vpc -F raw "$tmpdir/$name.vhd" "$tmpdir/$name.raw" ||
        fail "$name.vhd (read by qemu) differs from the raw file"
done
qemu-img compare -f vpc -F raw "$tmpdir/copy.vhd" "$tmpdir/random.bin" ||
    fail "copy.vhd (read by qemu) differs from random.bin"
[ "$(stat -c %s "$tmpdir/wf.vhd")" = $(( 8 * mib + 512 )) ] || fail "wf.vhd changed size"
# w: blocks 0-6 and 10, then block 1 once more after its discard. Footer copy, header and
# BAT (16 entries, one sector) end at 2048; each block takes 2 MiB + 512 after 3584 bytes of
# padding that put its data on a 4 KiB boundary; then the footer.
[ "$(stat -c %s "$tmpdir/w.vhd")" = $(( 9 * (2 * mib + 4096) + 512 )) ] ||
    fail "w.vhd: unexpected file size"
start_imagenbd -r w="$tmpdir/w.vhd" copy="$tmpdir/copy.vhd"
qemu-img compare -f raw -F raw "$tmpdir/w.raw" "$(nbd_uri w)" || fail "w.vhd reopened differs"
qemu-img compare -f raw -F raw "$tmpdir/random.bin" "$(nbd_uri copy)" ||
    fail "copy.vhd reopened differs"
stop_imagenbd

# --- 3. fio over 4 connections, then a fresh process --------------------------------------
# Random 4k/64k writes from 4 jobs (one connection each, each its own 8 MiB slice, 16 in
# flight) allocate the blocks of a new dynamic VHD concurrently and verify them; a second
# server process then verifies every block again.
if fio --enghelp 2>/dev/null | grep -qw nbd; then
    qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/fio.vhd" 32M
    run_fio ()   # OUTFILE FIO-OPTIONS...
    {
        local out=$1 status=0
        shift
        fio --output-format=json --output="$out" --name=vhd --ioengine=nbd \
            --uri="$(nbd_uri)" --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=16 \
            --numjobs=4 --size=8M --offset_increment=8M --verify=crc32c --verify_fatal=1 \
            --verify_state_save=0 --group_reporting=0 "$@" || status=$?
        [ $status -eq 0 ] || { cat "$out"; fail "fio $* exited with status $status"; }
        py3 - "$out" <<'PY'
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
assert len(jobs) == 4, jobs
for j in jobs:
    print(j["jobname"], j["error"], j["read"]["io_bytes"])
    assert j["error"] == 0 and j["read"]["io_bytes"] == 8 << 20, "fio did not verify 8 MiB"
PY
    }
    start_imagenbd "$tmpdir/fio.vhd"
    run_fio "$tmpdir/fio-write.json" --do_verify=1
    stop_imagenbd
    start_imagenbd -r "$tmpdir/fio.vhd"
    run_fio "$tmpdir/fio-verify.json" --verify_only
    stop_imagenbd
    [ "$(stat -c %s "$tmpdir/fio.vhd")" = $(( 16 * (2 * mib + 4096) + 512 )) ] ||
        fail "fio.vhd: expected 16 blocks, each allocated once"
else
    echo "$test_name: fio without the nbd engine: skipping the fio part"
fi

# --- 4. Damaged images ------------------------------------------------------------------
serve_fails ()   # OUTFILE SERVE-ARGS...
{
    local out=$1
    shift
    must_fail "$out" timeout 20 "$IMAGENBD" serve -k "$sockdir/bad.sock" "$@"
}
size_of () { stat -c %s "$1"; }

# A fixed disk's footer with a wrong checksum (current_size changed under it).
cp "$tmpdir/fixed.vhd" "$tmpdir/badsum.vhd"
patch_bytes "$tmpdir/badsum.vhd" $(( $(size_of "$tmpdir/badsum.vhd") - 512 + 0x37 )) 01
serve_fails "$tmpdir/badsum.out" "$tmpdir/badsum.vhd"
must_contain "$tmpdir/badsum.out" \
    "vhd: $tmpdir/badsum.vhd: footer: checksum mismatch \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\)"

# Both footers of a dynamic disk damaged: each named.
cp "$tmpdir/dynamic.vhd" "$tmpdir/both.vhd"
patch_bytes "$tmpdir/both.vhd" $(( $(size_of "$tmpdir/both.vhd") - 512 + 0x37 )) 01
patch_bytes "$tmpdir/both.vhd" $(( 0x37 )) 01
serve_fails "$tmpdir/both.out" -f vhd "$tmpdir/both.vhd"
must_contain "$tmpdir/both.out" \
    "vhd: $tmpdir/both.vhd: footer: checksum mismatch .*; footer copy at offset 0: footer: checksum mismatch"

# The dynamic header's checksum (qemu does not check it; we do).
cp "$tmpdir/dynamic.vhd" "$tmpdir/header.vhd"
patch_bytes "$tmpdir/header.vhd" $(( 0x200 + 0x20 )) 01
serve_fails "$tmpdir/header.out" "$tmpdir/header.vhd"
must_contain "$tmpdir/header.out" "vhd: $tmpdir/header.vhd: dynamic header: checksum mismatch"

# A block size that is not a power of two, checksum fixed so the field itself is checked.
cp "$tmpdir/dynamic.vhd" "$tmpdir/bsize.vhd"
patch_bytes "$tmpdir/bsize.vhd" $(( 0x200 + 0x20 )) 00000bb8
fix_checksum "$tmpdir/bsize.vhd" 512 1024 $(( 0x24 ))
serve_fails "$tmpdir/bsize.out" "$tmpdir/bsize.vhd"
must_contain "$tmpdir/bsize.out" \
    "vhd: $tmpdir/bsize.vhd: dynamic header: block_size 3000 is not a power of two"

# The last allocated block cut off: its BAT entry (11) points past the end of the file.
cp "$tmpdir/dynamic.vhd" "$tmpdir/cut.vhd"
tail -c 512 "$tmpdir/cut.vhd" >"$tmpdir/footer.bin"
truncate -s -$(( mib + 512 )) "$tmpdir/cut.vhd"
cat "$tmpdir/footer.bin" >>"$tmpdir/cut.vhd"
serve_fails "$tmpdir/cut.out" -r "$tmpdir/cut.vhd"
must_contain "$tmpdir/cut.out" "vhd: $tmpdir/cut.vhd: BAT entry 11 points past the end of the file"

# The last sector of a dynamic disk cut short: served read-only from the footer copy at 0,
# with a warning, and with the same contents.
cp "$tmpdir/dynamic.vhd" "$tmpdir/short.vhd"
truncate -s -100 "$tmpdir/short.vhd"
start_imagenbd short="$tmpdir/short.vhd"
must_contain "$imagenbd_log" \
    "vhd: $tmpdir/short.vhd: the footer at the end is damaged .*using its copy at offset 0.*read-only"
qemu-img compare -f raw -F raw "$tmpdir/dynamic.raw" "$(nbd_uri short)" ||
    fail "short.vhd: contents differ"
nbdinfo "$(nbd_uri short)" | tee "$tmpdir/short.info"
must_contain "$tmpdir/short.info" "is_read_only: true"
must_fail "$tmpdir/short-write.out" qemu-io -f raw -c 'write -P 0x55 0 4k' "$(nbd_uri short)"
stop_imagenbd
