#!/usr/bin/env bash
# Holes of page blobs. (1) upload sends only the non-zero 512-byte pages of a sparse raw
# image: --json counts the Put Pages (split at --block-size) and the bytes skipped, zeroes
# written into the file included. (2) nbdinfo --map through imagenbd (Get Page Ranges)
# shows holes exactly where the image has no data. (3) Writes through the server change
# the map: data into a hole makes it data, write -z -u/discard (Clear Page) make holes.
# (4) download leaves the holes sparse and says how much it skipped.
source "$(dirname "$0")/functions.sh"
set -x

requires nbdinfo qemu-io qemu-img jq
start_azurite

mib=$(( 1024 * 1024 ))
size=$(( 32 * mib ))
img=$tmpdir/sparse.raw

# put FILE OFFSET LENGTH: random (never all-zero) bytes at OFFSET.
put ()
{
    head -c "$3" /dev/urandom | tr '\0' '\1' |
        dd of="$1" bs=512 seek=$(( $2 / 512 )) conv=notrunc status=none
}

# Data: A [0, 64k), B [5M+512, 5M+2048), C1 [8M, 8M+1k) and C2 [8M+1536, 8M+2k) (one zero
# page between them), D [12M, 16M+512) (more than one 4 MiB Put Page), E the last page.
# [20M, 21M) is written, but with zeroes: allocated in the file, not data.
truncate -s $size "$img"
put "$img" 0 65536
put "$img" $(( 5 * mib + 512 )) 1536
put "$img" $(( 8 * mib )) 1024
put "$img" $(( 8 * mib + 1536 )) 512
put "$img" $(( 12 * mib )) $(( 4 * mib + 512 ))
put "$img" $(( size - 512 )) 512
head -c $mib /dev/zero | dd of="$img" bs=1M seek=20 conv=notrunc status=none
data=$(( 65536 + 1536 + 1024 + 512 + 4 * mib + 512 + 512 ))

# --- 1. upload --json counts ---------------------------------------------------------------
check_upload ()   # JSON-FILE URI REQUESTS
{
    cat "$1"
    jq -e --arg uri "$2" --argjson size $size --argjson data $data --argjson req "$3" '
        .uri == $uri and .blob_type == "page" and .size == $size and
        .uploaded_bytes == $data and .skipped_bytes == $size - $data and
        .requests == $req and (.seconds | type) == "number"' "$1" >/dev/null ||
        fail "upload --json: expected $3 requests, $data bytes uploaded, $(( size - data )) skipped"
}
"$IMAGENBD" upload --json "$img" "$(az_uri sparse.raw)" >"$tmpdir/up.json"
check_upload "$tmpdir/up.json" "$(az_uri sparse.raw)" 7      # A B C1 C2 D(2) E
"$IMAGENBD" upload --json --block-size=1M "$img" "$(az_uri sparse-1m.raw)" >"$tmpdir/up1.json"
check_upload "$tmpdir/up1.json" "$(az_uri sparse-1m.raw)" 10  # A B C1 C2 D(5) E
"$IMAGENBD" upload --json --block-size=64k --parallel=16 "$img" "$(az_uri sparse-64k.raw)" \
    >"$tmpdir/up64k.json"
check_upload "$tmpdir/up64k.json" "$(az_uri sparse-64k.raw)" 70 # A B C1 C2 D(65) E
# An all-zero image: the blob is created, nothing is sent.
truncate -s 8M "$tmpdir/zero.raw"
"$IMAGENBD" upload --json "$tmpdir/zero.raw" "$(az_uri zero.raw)" >"$tmpdir/zero.json"
cat "$tmpdir/zero.json"
jq -e '.size == 8388608 and .requests == 0 and .uploaded_bytes == 0 and
       .skipped_bytes == 8388608' "$tmpdir/zero.json" >/dev/null ||
    fail "upload of an all-zero image sent Put Pages"

# --- 2. nbdinfo --map ----------------------------------------------------------------------
# merged_map URI: the map with adjacent extents of one type merged, "offset length type".
merged_map ()
{
    nbdinfo --map "$1" | awk '
        { off = $1; len = $2; type = $3
          if (n > 0 && type == t[n] && off == o[n] + l[n]) { l[n] += len; next }
          n++; o[n] = off; l[n] = len; t[n] = type }
        END { for (i = 1; i <= n; i++) print o[i], l[i], t[i] }' | tee "$tmpdir/map.txt"
}
# expect_map URI: the map must be what is on stdin.
expect_map ()
{
    merged_map "$1" >/dev/null
    diff -u - "$tmpdir/map.txt" || fail "nbdinfo --map of $1 differs from the image's holes"
}

start_imagenbd -r sparse="$(az_uri sparse.raw)" zero="$(az_uri zero.raw)" \
    sparse1m="$(az_uri sparse-1m.raw)" sparse64k="$(az_uri sparse-64k.raw)"
qemu-img compare -f raw -F raw "$img" "$(nbd_uri sparse)" || fail "sparse: contents differ"
# The ranges Put Pages of 1M and 64k leave are adjacent (Azurite lists them unmerged).
for name in sparse sparse1m sparse64k; do
    expect_map "$(nbd_uri $name)" <<EOF
0 65536 0
65536 $(( 5 * mib + 512 - 65536 )) 3
$(( 5 * mib + 512 )) 1536 0
$(( 5 * mib + 2048 )) $(( 3 * mib - 2048 )) 3
$(( 8 * mib )) 1024 0
$(( 8 * mib + 1024 )) 512 3
$(( 8 * mib + 1536 )) 512 0
$(( 8 * mib + 2048 )) $(( 4 * mib - 2048 )) 3
$(( 12 * mib )) $(( 4 * mib + 512 )) 0
$(( 16 * mib + 512 )) $(( 16 * mib - 1024 )) 3
$(( size - 512 )) 512 0
EOF
done
expect_map "$(nbd_uri zero)" <<EOF
0 8388608 3
EOF
stop_imagenbd

# --- 3. Writes change the map --------------------------------------------------------------
start_imagenbd sparse="$(az_uri sparse.raw)"
# write -z -u: zeroes that may be holes (without -u, qemu sets NBD_CMD_FLAG_NO_HOLE).
qemu-io -f raw -d unmap -c "write -P 0x5a $(( 2 * mib )) 4096" \
    -c "write -z -u $(( 12 * mib )) $(( 4 * mib ))" -c 'discard 0 64k' \
    "$(nbd_uri sparse)" >"$tmpdir/zero.out" 2>&1 ||
    { cat "$tmpdir/zero.out"; fail "write/write -z/discard through the server failed"; }
cat "$tmpdir/zero.out"
if grep -Ei 'fail|error|not permitted' "$tmpdir/zero.out"; then
    fail "write/write -z/discard through the server failed"
fi
qemu-io -f raw -c "read -P 0 0 64k" -c "read -P 0 $(( 12 * mib )) 4M" \
    -c "read -P 0x5a $(( 2 * mib )) 4k" "$(nbd_uri sparse)" >"$tmpdir/read.out" 2>&1 ||
    { cat "$tmpdir/read.out"; fail "reads after write -z/discard failed"; }
if grep -Ei 'fail|error|mismatch' "$tmpdir/read.out"; then
    fail "write -z/discard did not read back as zeroes"
fi
expect_map "$(nbd_uri sparse)" <<EOF
0 $(( 2 * mib )) 3
$(( 2 * mib )) 4096 0
$(( 2 * mib + 4096 )) $(( 3 * mib + 512 - 4096 )) 3
$(( 5 * mib + 512 )) 1536 0
$(( 5 * mib + 2048 )) $(( 3 * mib - 2048 )) 3
$(( 8 * mib )) 1024 0
$(( 8 * mib + 1024 )) 512 3
$(( 8 * mib + 1536 )) 512 0
$(( 8 * mib + 2048 )) $(( 8 * mib - 2048 )) 3
$(( 16 * mib )) 512 0
$(( 16 * mib + 512 )) $(( 16 * mib - 1024 )) 3
$(( size - 512 )) 512 0
EOF
stop_imagenbd

# --- 4. download: holes stay holes ---------------------------------------------------------
# The blob now: B, C1, C2, the 4 KiB at 2M, the page at 16M and E.
left=$(( 1536 + 1024 + 512 + 4096 + 512 + 512 ))
"$IMAGENBD" download --json "$(az_uri sparse.raw)" "$tmpdir/dl.raw" >"$tmpdir/dl.json"
cat "$tmpdir/dl.json"
jq -e --argjson size $size --argjson left $left '
    .size == $size and .downloaded_bytes == $left and .hole_bytes == $size - $left' \
    "$tmpdir/dl.json" >/dev/null ||
    fail "download --json: expected $left bytes downloaded and the rest holes"
start_imagenbd -r sparse="$(az_uri sparse.raw)"
qemu-img compare -f raw -F raw "$tmpdir/dl.raw" "$(nbd_uri sparse)" ||
    fail "the downloaded image differs from the blob"
stop_imagenbd
if fs_supports_holes "$tmpdir"; then
    used=$(du -k "$tmpdir/dl.raw" | cut -f1)
    echo "downloaded $size bytes, $used KiB allocated"
    [ "$used" -le 256 ] || fail "download did not leave the holes sparse ($used KiB used)"
fi
