#!/usr/bin/env bash
# Differencing VDIs (formats.md §2.7). A chain base.vdi <- diff1.vdi <- diff2.vdi made by
# `imagenbd create -f vdi --parent` and written through the server (copy-up over the
# parent's data, writes over its holes, zeroes over its data, whole zero blocks, unaligned
# and concurrent writes) is served like a raw file given the same writes, also by a fresh
# process; parents are never written. The parent is found by UUID in the same directory, or
# named with `serve --parent` (also in another directory); a missing or wrong parent is
# refused with what was searched, a changed parent is reported. SIGKILL during copy-up
# writes never leaves a half-copied block. qemu refuses VDIs with a parent UUID, so it
# checks only the base (qemu-img check, compare).
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo md5sum

mib=$(( 1024 * 1024 ))
d=$tmpdir/imgs
mkdir "$d"
truncate -s 24M "$tmpdir/chain.raw"   # the expectation: every write of the chain, flattened

# header_hex FILE OFFSET LENGTH: bytes of FILE as hex.
header_hex ()
{
    od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# --- base: a dynamic VDI (1 MiB blocks) ----------------------------------------------------
"$IMAGENBD" create -f vdi "$d/base.vdi" 24M
start_imagenbd -x chain "$d/base.vdi"
both chain 'write -P 0x11 0 3M' 'write -P 0x22 5M 1M' 'write -P 0x33 20M 2M' \
    'write -P 0x34 23M 4k'
stop_imagenbd
cp "$tmpdir/chain.raw" "$tmpdir/base.raw"
qemu-img check -f vdi "$d/base.vdi" || fail "qemu-img check fails on base.vdi"
qemu-img compare -f vdi -F raw "$d/base.vdi" "$tmpdir/base.raw" ||
    fail "base.vdi (read by qemu) differs from the raw file"

# --- diff1: differencing, size and block size from the parent ---------------------------
"$IMAGENBD" create -f vdi --parent "$d/base.vdi" "$d/diff1.vdi" ||
    fail "create -f vdi --parent base.vdi failed"
# Type 4; uuidLinkage and uuidParentModify are the parent's uuidCreate and uuidModify, in
# the same (GUID) byte order; the size is the parent's.
[ "$(header_hex "$d/diff1.vdi" $(( 0x4c )) 4)" = 04000000 ] || fail "diff1.vdi: type is not 4"
[ "$(header_hex "$d/diff1.vdi" $(( 0x1a8 )) 16)" = "$(header_hex "$d/base.vdi" $(( 0x188 )) 16)" ] ||
    fail "diff1.vdi: uuidLinkage is not base.vdi's uuidCreate"
[ "$(header_hex "$d/diff1.vdi" $(( 0x1b8 )) 16)" = "$(header_hex "$d/base.vdi" $(( 0x198 )) 16)" ] ||
    fail "diff1.vdi: uuidParentModify is not base.vdi's uuidModify"
base_md5=$(md5sum <"$d/base.vdi")

# Found by UUID next to it (no --parent). Fresh, it reads as its parent.
start_imagenbd -x chain "$d/diff1.vdi"
[ "$(nbdinfo --size "$(nbd_uri chain)")" = $(( 24 * mib )) ] || fail "diff1.vdi: wrong size"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "a fresh differencing image does not read as its parent"
# Partial writes over the parent's data (copy-up), over its holes; zeroes inside a block of
# parent data, over a whole block of it (a zero entry hides the parent), written as data;
# unaligned across the parent's data.
both chain 'write -P 0x44 1028k 8k' 'write -P 0x55 8M 64k' 'write -z 2M 8k' \
    'write -z -u 5M 1M' "write -P 0x56 $(( 20 * mib + 100 )) 5000" 'write -P 0 23M 1M'
# Several writes in flight to one block free here (a hole in the parent: block 10; data
# in the parent: block 21).
both chain -o -t writeback -- 'aio_write -P 0x61 10M 4k' 'aio_write -P 0x62 10300k 8k' \
    'aio_write -P 0x63 21M 4k' 'aio_write -P 0x64 21600k 4k' 'aio_write -P 0x65 21604k 4k' \
    'aio_flush' 'flush'
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "diff1.vdi served through imagenbd differs from the flattened expectation"
stop_imagenbd
cp "$tmpdir/chain.raw" "$tmpdir/diff1.raw"
[ "$(md5sum <"$d/base.vdi")" = "$base_md5" ] || fail "base.vdi changed while diff1 was written"

# --- diff2: differencing of a differencing image -----------------------------------------
"$IMAGENBD" create -f vdi --parent "$d/diff1.vdi" "$d/diff2.vdi" 24M ||
    fail "create -f vdi --parent diff1.vdi 24M failed"
diff1_md5=$(md5sum <"$d/diff1.vdi")
start_imagenbd -x chain "$d/diff2.vdi"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "a fresh diff2.vdi does not read as diff1.vdi"
# Over diff1's data, over holes of every layer, a partial zero over base's data, over
# diff1's zero entry, across a block boundary.
both chain 'write -P 0x66 1536k 4k' 'write -P 0x77 12M 4k' 'write -z 0 4k' \
    "write -P 0x78 $(( 5 * mib + 7 )) 100" "write -P 0x79 $(( 6 * mib - 50 )) 100"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "diff2.vdi served through imagenbd differs from the flattened expectation"
# Block status: data wherever a layer has data that no zero entry above hides (1 MiB
# blocks): 0-2 (base, diff1, diff2), 5-6 (diff2), 8 and 10 (diff1), 12 (diff2), 20-21
# (base, diff1); block 23 (zero in diff1) and the rest are holes.
map_types "$(nbd_uri chain)" >/dev/null
diff -u - "$tmpdir/map.txt" <<EOF || fail "diff2.vdi: nbdinfo --map differs"
0 $(( 3 * mib )) 0
$(( 3 * mib )) $(( 2 * mib )) 3
$(( 5 * mib )) $(( 2 * mib )) 0
$(( 7 * mib )) $mib 3
$(( 8 * mib )) $mib 0
$(( 9 * mib )) $mib 3
$(( 10 * mib )) $mib 0
$(( 11 * mib )) $mib 3
$(( 12 * mib )) $mib 0
$(( 13 * mib )) $(( 7 * mib )) 3
$(( 20 * mib )) $(( 2 * mib )) 0
$(( 22 * mib )) $(( 2 * mib )) 3
EOF
stop_imagenbd
[ "$(md5sum <"$d/diff1.vdi")" = "$diff1_md5" ] || fail "diff1.vdi changed while diff2 was written"
# info shows the chain: diff2's parent UUID is diff1's, and its parents are diff1, base.
"$IMAGENBD" info --json "$d/diff2.vdi" >"$tmpdir/diff2.json"
"$IMAGENBD" info --json "$d/diff1.vdi" >"$tmpdir/diff1.json"
py3 - "$tmpdir/diff2.json" "$tmpdir/diff1.json" <<'EOF' || fail "info --json diff2.vdi: wrong chain"
import json, os, sys
top, mid = (json.load(open(p)) for p in sys.argv[1:3])
assert top["vdi"]["subformat"] == "differencing", top
assert top["vdi"]["parent_uuid"] == mid["vdi"]["uuid"], (top, mid)
assert [os.path.basename(p["filename"]) for p in top["parents"]] == ["diff1.vdi", "base.vdi"], top
EOF
[ "$(md5sum <"$d/base.vdi")" = "$base_md5" ] || fail "base.vdi changed while diff2 was written"

# A fresh process reads every layer of the chain as the expectations say.
start_imagenbd -r top="$d/diff2.vdi" mid="$d/diff1.vdi" base="$d/base.vdi"
for pair in top:chain mid:diff1 base:base; do
    qemu-img compare -f raw -F raw "$tmpdir/${pair#*:}.raw" "$(nbd_uri "${pair%:*}")" ||
        fail "${pair%:*} reopened differs from $tmpdir/${pair#*:}.raw"
done
stop_imagenbd
qemu-img check -f vdi "$d/base.vdi" || fail "qemu-img check fails on base.vdi at the end"
# qemu refuses the children (formats.md §2.7): the header really carries a parent UUID.
must_fail "$tmpdir/qemu.out" qemu-img info -f vdi "$d/diff1.vdi"

# --- serve --parent, and a parent in another directory ---------------------------------
other=$tmpdir/other
mkdir "$other"
cp "$d/diff2.vdi" "$other/diff2.vdi"
cp "$d/base.vdi" "$other/unrelated.vdi"   # a VDI with another uuidCreate than the parent's
echo notes >"$other/notes.txt"
must_fail "$tmpdir/missing.out" timeout 20 "$IMAGENBD" serve -k "$sockdir/bad.sock" \
    "$other/diff2.vdi"
must_contain "$tmpdir/missing.out" \
    "vdi: $other/diff2.vdi: parent not found: no image with uuidCreate [0-9a-f-]{36} \(its uuidLinkage\) next to it; name it with --parent\. Searched 3 files: .*notes\.txt: not a VDI.*unrelated\.vdi: uuidCreate"
start_imagenbd -r --parent "$d/diff1.vdi" -x chain "$other/diff2.vdi"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "serve --parent diff1.vdi other/diff2.vdi differs from the expectation"
stop_imagenbd
# A --parent that is not the parent is an error, not a fallback.
must_fail "$tmpdir/wrong.out" timeout 20 "$IMAGENBD" serve -k "$sockdir/bad.sock" \
    --parent "$d/base.vdi" "$other/diff2.vdi"
must_contain "$tmpdir/wrong.out" \
    "vdi: $other/diff2.vdi: --parent $d/base.vdi is not its parent: uuidCreate"

# --- a parent modified after the child was made: served, with a warning -----------------
# A new uuidModify in diff1 (as any write through a server would give it).
patch_bytes "$d/diff1.vdi" $(( 0x198 )) 0123456789abcdef0123456789abcdef
start_imagenbd -r -x chain "$d/diff2.vdi"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "diff2.vdi with a changed parent uuidModify reads differently"
stop_imagenbd
must_contain "$imagenbd_log" \
    "vdi: $d/diff2.vdi: parent .*diff1\.vdi has uuidModify .* the parent was modified after the child was made"

# --- SIGKILL during copy-up writes ------------------------------------------------------
# The parent is 0x11 everywhere; one 8 KiB write per block of the child, at a different
# offset in each, and the server killed at a random moment. Afterwards the child opens,
# every acknowledged write (writethrough: FUA) is there, and every block, written or not,
# reads as the parent around the write: a block is either not yet in the map or wholly
# copied up, never half.
crash=$tmpdir/crash
mkdir "$crash"
"$IMAGENBD" create -f vdi "$crash/base.vdi" 64M
io vdi "$crash/base.vdi" 'write -P 0x11 0 64M'
writes=() around=()
for k in $(seq 0 63); do
    at=$(( k * mib + (k * 12288) % (mib - 8192) ))
    writes+=(-c "write -P $(( k + 1 )) $at 8k")
    [ "$at" -gt $(( k * mib )) ] && around+=(-c "read -P 0x11 $(( k * mib )) $(( at - k * mib ))")
    around+=(-c "read -P 0x11 $(( at + 8192 )) $(( (k + 1) * mib - at - 8192 ))")
done
server=
kill_server () { [ -n "$server" ] && kill -KILL "$server" 2>/dev/null; :; }
cleanup_fn kill_server
for round in 1 2 3 4 5 6; do
    rm -f "$crash/diff.vdi" "$crash/s.sock" "$crash/pid"
    "$IMAGENBD" create -f vdi --parent "$crash/base.vdi" "$crash/diff.vdi" >/dev/null
    "$IMAGENBD" serve -q -k "$crash/s.sock" --pid-file "$crash/pid" "$crash/diff.vdi" \
        </dev/null >>"$tmpdir/crash-server.log" 2>&1 &
    server=$!
    for (( i = 0; i < 100; ++i )); do
        [ -s "$crash/pid" ] && [ -S "$crash/s.sock" ] && break
        sleep 0.05
    done
    [ -S "$crash/s.sock" ] || fail "crash round $round: the server did not start"
    qemu-io -f raw "${writes[@]}" "nbd+unix:///?socket=$crash/s.sock" >"$tmpdir/io.out" 2>&1 &
    client=$!
    sleep "0.$(printf %03d $(( RANDOM % 300 + 5 )))"
    kill -KILL "$server"
    wait "$server" 2>/dev/null || :
    server=
    wait "$client" 2>/dev/null || :
    acked=()
    while read -r offset; do
        acked+=(-c "read -P $(( offset / mib + 1 )) $offset 8k")
    done < <(sed -n 's/^wrote 8192\/8192 bytes at offset \([0-9]*\)$/\1/p' "$tmpdir/io.out")
    echo "crash round $round: $(( ${#acked[@]} / 2 )) of 64 writes acknowledged before the kill"
    start_imagenbd -r -x chain "$crash/diff.vdi"
    qemu-io -f raw -r "${acked[@]}" "${around[@]}" "$(nbd_uri chain)" >"$tmpdir/check.out" 2>&1 ||
        { cat "$tmpdir/check.out"; fail "crash round $round: reading the child failed"; }
    if grep -Ei 'fail|error' "$tmpdir/check.out"; then
        fail "crash round $round: a write or the parent's data around it is missing"
    fi
    [ "$(grep -c '^read ' "$tmpdir/check.out")" -eq $(( (${#acked[@]} + ${#around[@]}) / 2 )) ] ||
        fail "crash round $round: qemu-io did not run every read"
    stop_imagenbd
done
