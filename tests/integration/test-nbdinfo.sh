#!/usr/bin/env bash
# nbdinfo against imagenbd: --list shows every export with its description; --json
# reports size, capability flags as booleans (the full writable set: flush, fua, trim,
# zero, fast_zero, df, multi_conn, cache; not read-only), base:allocation among the
# contexts and the block sizes 1/4096/32M; --map of a sparse file and of a memory
# export shows holes as holes and data as data; --size and --can agree.
source "$(dirname "$0")/functions.sh"
set -x

requires nbdinfo jq qemu-io

mib=$(( 1024 * 1024 ))

# alpha: 4 MiB of data.  gamma: a sparse 16 MiB file with data at [1M,2M) and
# [8M,8M+64K).  beta: an empty 8 MiB RAM disk.
alpha=$tmpdir/alpha.img
head -c $(( 4 * mib )) /dev/urandom >"$alpha"
gamma=$tmpdir/gamma.img
truncate -s 16M "$gamma"
qemu-io -f raw -c 'write -P 0x5a 1M 1M' -c 'write -P 0x6b 8M 64k' "$gamma"

desc="imagenbd test exports"
start_imagenbd -D "$desc" alpha="$alpha" beta=memory:8M gamma="$gamma"

# --- --list ----------------------------------------------------------------------
nbdinfo --list "$uri" | tee "$tmpdir/list.txt"
for name in alpha beta gamma; do
    must_contain "$tmpdir/list.txt" "export=\"?$name\"?" "nbdinfo --list"
done
must_contain "$tmpdir/list.txt" "description: $desc" "nbdinfo --list"

nbdinfo --list --json "$uri" | tee "$tmpdir/list.json"
jq -e '[.exports[]."export-name"] | sort == ["alpha", "beta", "gamma"]' "$tmpdir/list.json" ||
    fail "--list --json does not name exactly alpha, beta, gamma"
jq -e --arg d "$desc" '[.exports[].description] == [$d, $d, $d]' "$tmpdir/list.json" ||
    fail "--list --json descriptions differ from -D"
jq -e '[.exports[] | select(."export-name" == "alpha")."export-size"] == [4194304]' \
   "$tmpdir/list.json" || fail "--list --json: wrong size for alpha"
jq -e '[.exports[] | select(."export-name" == "beta")."export-size"] == [8388608]' \
   "$tmpdir/list.json" || fail "--list --json: wrong size for beta"

# --- --json of one export ------------------------------------------------------------
for name in alpha beta gamma; do
    nbdinfo --json "$(nbd_uri $name)" | tee "$tmpdir/$name.json"
    j=$tmpdir/$name.json
    jq -e '.protocol == "newstyle-fixed" and .structured == true and .TLS == false' "$j" ||
        fail "$name: protocol/structured/TLS fields wrong"
    jq -e '.exports | length == 1' "$j"
    jq -e --arg n "$name" '.exports[0]."export-name" == $n' "$j" || fail "$name: export-name"
    jq -e --arg d "$desc" '.exports[0].description == $d' "$j" || fail "$name: description"
    jq -e '.exports[0].contexts | index("base:allocation") != null' "$j" ||
        fail "$name: base:allocation is not among the contexts"
    # Every capability flag is a JSON boolean, with the values of a writable image.
    for f in can_flush can_fua can_trim can_zero can_fast_zero can_df can_multi_conn can_cache; do
        jq -e --arg f "$f" '.exports[0][$f] == true' "$j" || fail "$name: $f is not true"
    done
    jq -e '.exports[0].is_read_only == false' "$j" || fail "$name: is_read_only is not false"
    jq -e '.exports[0].is_rotational == false' "$j" || fail "$name: is_rotational is not false"
    jq -e '.exports[0].block_size_minimum == 1 and .exports[0].block_size_preferred == 4096
           and .exports[0].block_size_maximum == 33554432' "$j" ||
        fail "$name: block sizes are not 1/4096/33554432"
done
jq -e '.exports[0]."export-size" == 4194304' "$tmpdir/alpha.json"
jq -e '.exports[0]."export-size" == 8388608' "$tmpdir/beta.json"
jq -e '.exports[0]."export-size" == 16777216' "$tmpdir/gamma.json"

# The empty name is the first export.
nbdinfo --json "$uri" | jq -e '.exports[0]."export-size" == 4194304' ||
    fail "the default export is not alpha"

[ "$(nbdinfo --size "$(nbd_uri gamma)")" = 16777216 ] || fail "nbdinfo --size gamma"
nbdinfo --can write "$(nbd_uri beta)" || fail "nbdinfo --can write beta"
nbdinfo --can trim "$(nbd_uri beta)" || fail "nbdinfo --can trim beta"
status=0
nbdinfo --is read-only "$(nbd_uri beta)" || status=$?
[ $status -eq 2 ] || fail "nbdinfo --is read-only beta: status $status, expected 2 (false)"

# --- --map -----------------------------------------------------------------------------
# check_map URI EXPECTED: merge adjacent extents of the same type, then compare with
# EXPECTED, a JSON list of [offset, length, type] (type 0 data, 3 hole+zero).
check_map ()
{
    nbdinfo --map --json "$1" | tee "$tmpdir/map.json"
    jq -c --argjson want "$2" '
        reduce .[] as $e ([];
            if length > 0 and .[-1][2] == $e.type and .[-1][0] + .[-1][1] == $e.offset
            then .[-1][1] += $e.length
            else . + [[$e.offset, $e.length, $e.type]] end)
        | if . == $want then "ok" else error("map \(.) != expected \($want)") end' \
        "$tmpdir/map.json" || fail "nbdinfo --map $1 does not match $2"
}

if fs_supports_holes "$tmpdir"; then
    check_map "$(nbd_uri gamma)" \
        "[[0,$mib,3],[$mib,$mib,0],[$((2*mib)),$((6*mib)),3],[$((8*mib)),65536,0],[$((8*mib+65536)),$((8*mib-65536)),3]]"
else
    echo "$test_name: $tmpdir cannot hold sparse files; file --map check not run"
fi

# A fresh RAM disk is one hole; after writes the map follows them.
check_map "$(nbd_uri beta)" "[[0,$((8*mib)),3]]"
qemu-io -f raw -c 'write -P 0x77 2M 1M' -c 'write -P 0x78 6M 64k' "$(nbd_uri beta)"
check_map "$(nbd_uri beta)" \
    "[[0,$((2*mib)),3],[$((2*mib)),$mib,0],[$((3*mib)),$((3*mib)),3],[$((6*mib)),65536,0],[$((6*mib+65536)),$((2*mib-65536)),3]]"
# Trimming the first data range turns it back into a hole.
qemu-io -f raw -d unmap -c 'discard 2M 1M' "$(nbd_uri beta)"
check_map "$(nbd_uri beta)" \
    "[[0,$((6*mib)),3],[$((6*mib)),65536,0],[$((6*mib+65536)),$((2*mib-65536)),3]]"

# An all-data file is one data extent.
check_map "$(nbd_uri alpha)" "[[0,$((4*mib)),0]]"

stop_imagenbd
