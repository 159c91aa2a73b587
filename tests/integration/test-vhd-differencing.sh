#!/usr/bin/env bash
# Differencing VHDs (formats.md §1.7, §1.8). A chain base.vhd <- mid.vhd <- top.vhd made by
# `imagenbd create --parent` and written through the server is served like a raw file given
# the same writes; libvhdi (vhdiinfo, vhdimount over FUSE) reads the images we wrote and
# sees the same merged disk (qemu cannot: it ignores VHD parents). Writes are 4 KiB
# aligned because libvhdi 20210425 misreads bitmap runs that end inside a byte. Then: the
# relative locator keeps working after the directory moves, a missing parent is refused
# naming every name tried, `info --json` shows the chain, and --parent overrides.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo vhdiinfo

mib=$(( 1024 * 1024 ))
d=$tmpdir/imgs
mkdir "$d"
truncate -s 16M "$tmpdir/chain.raw"   # the expectation: every write of the chain, flattened

json_field ()   # FILE PYTHON-EXPRESSION-ON-j
{
    py3 -c "import json, sys; j = json.load(open(sys.argv[1])); print($2)" "$1"
}

# --- base: a dynamic VHD, 512 KiB blocks ----------------------------------------------
"$IMAGENBD" create -f vhd --block-size 512K "$d/base.vhd" 16M
start_imagenbd -x chain "$d/base.vhd"
both chain 'write -P 0x11 0 4M' 'write -P 0x22 6M 1M' 'write -P 0x33 14M 2M'
stop_imagenbd
cp "$tmpdir/chain.raw" "$tmpdir/base.raw"

# --- mid: differencing, SIZE and block size from the parent ----------------------------
"$IMAGENBD" create -f vhd --parent "$d/base.vhd" --json "$d/mid.vhd" >"$tmpdir/mid.json"
[ "$(json_field "$tmpdir/mid.json" 'j["virtual_size"]')" = $(( 16 * mib )) ] ||
    fail "mid.vhd: not the parent's size"
[ "$(json_field "$tmpdir/mid.json" 'j["vhd"]["subformat"]')" = differencing ] ||
    fail "mid.vhd: not differencing"
[ "$(json_field "$tmpdir/mid.json" 'j["vhd"]["block_size"]')" = 524288 ] ||
    fail "mid.vhd: block size not taken from the parent"
start_imagenbd -x chain "$d/mid.vhd"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "a fresh differencing image does not read as its parent"
# Over the parent's data, over its holes, zeroes over its data (must not show it again).
both chain 'write -P 0x44 1M 512k' 'write -P 0x55 8M 64k' 'write -z 3M 8k' \
    'write -z -u 6M 512k' 'write -P 0x56 14M 4k'
stop_imagenbd
cp "$tmpdir/chain.raw" "$tmpdir/mid.raw"

# --- top: differencing of a differencing image -----------------------------------------
"$IMAGENBD" create -f vhd --parent "$d/mid.vhd" "$d/top.vhd" 16M
start_imagenbd -x chain "$d/top.vhd"
both chain 'write -P 0x66 1536k 4k' 'write -P 0x77 12M 4k' 'write -z 6M 4k' \
    'write -P 0x78 8M 8k' 'write -P 0x79 15M 12k' 'aio_write -P 0x7a 10M 4k' \
    'aio_write -P 0x7b 10304k 4k' 'aio_flush'
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "top.vhd served through imagenbd differs from the flattened expectation"
# Block status: data wherever any layer has data (512 KiB blocks): base 0-4M, 6-7M,
# 14-16M; mid 8M; top 12M and 10M.
map_types "$(nbd_uri chain)" >/dev/null
diff -u - "$tmpdir/map.txt" <<EOF || fail "top.vhd: nbdinfo --map differs"
0 $(( 4 * mib )) 0
$(( 4 * mib )) $(( 2 * mib )) 3
$(( 6 * mib )) $(( 1 * mib )) 0
$(( 7 * mib )) $(( 1 * mib )) 3
$(( 8 * mib )) $(( 512 * 1024 )) 0
$(( 8 * mib + 512 * 1024 )) $(( 3 * mib / 2 )) 3
$(( 10 * mib )) $(( 512 * 1024 )) 0
$(( 10 * mib + 512 * 1024 )) $(( 3 * mib / 2 )) 3
$(( 12 * mib )) $(( 512 * 1024 )) 0
$(( 12 * mib + 512 * 1024 )) $(( 3 * mib / 2 )) 3
$(( 14 * mib )) $(( 2 * mib )) 0
EOF
stop_imagenbd
# A fresh process reads the same.
start_imagenbd -r -x chain "$d/top.vhd"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "top.vhd reopened differs"
stop_imagenbd

# Unaligned and FUA writes (partial sectors completed from the parent), on a sibling of
# top.vhd (libvhdi is no oracle for these), then reopened.
"$IMAGENBD" create -f vhd --parent "$d/mid.vhd" "$tmpdir/odd.vhd"
cp "$tmpdir/mid.raw" "$tmpdir/odd.raw"
start_imagenbd -x odd "$tmpdir/odd.vhd"
both odd 'write -P 0x91 1000 3000' 'write -P 0x92 1048000 1000' 'write -f -P 0x93 5M 4k' \
    'write -P 0x94 6291000 10' 'write -z 14680001 700' 'aio_write -P 0x95 8389000 100' \
    'aio_write -P 0x96 8389200 100' 'aio_flush'
stop_imagenbd
start_imagenbd -r -x odd "$tmpdir/odd.vhd"
qemu-img compare -f raw -F raw "$tmpdir/odd.raw" "$(nbd_uri odd)" ||
    fail "odd.vhd (unaligned writes) reopened differs"
stop_imagenbd

# --- info: UUIDs and the chain ----------------------------------------------------------
"$IMAGENBD" info --json "$d/top.vhd" | tee "$tmpdir/top.json"
"$IMAGENBD" info --json "$d/mid.vhd" >"$tmpdir/mid.json"
"$IMAGENBD" info --json "$d/base.vhd" >"$tmpdir/base.json"
mid_uuid=$(json_field "$tmpdir/mid.json" 'j["vhd"]["uuid"]')
base_uuid=$(json_field "$tmpdir/base.json" 'j["vhd"]["uuid"]')
[ "$(json_field "$tmpdir/top.json" 'j["vhd"]["parent_uuid"]')" = "$mid_uuid" ] ||
    fail "info: top's parent_uuid is not mid's uuid"
[ "$(json_field "$tmpdir/top.json" 'j["vhd"]["parent_name"]')" = mid.vhd ] ||
    fail "info: top's parent_name"
[ "$(json_field "$tmpdir/top.json" \
      '" ".join(p["filename"] + "," + p["format"] + "," + p["uuid"] for p in j["parents"])')" = \
  "$d/mid.vhd,vhd,$mid_uuid $d/base.vhd,vhd,$base_uuid" ] || fail "info: wrong parent chain"
"$IMAGENBD" info "$d/top.vhd" | tee "$tmpdir/top.txt"
must_contain "$tmpdir/top.txt" "^    1: $d/mid.vhd \(vhd, uuid $mid_uuid\)"
must_contain "$tmpdir/top.txt" "^    2: $d/base.vhd \(vhd, uuid $base_uuid\)"

# --- libvhdi reads what we wrote --------------------------------------------------------
vhdiinfo "$d/top.vhd" | tee "$tmpdir/vhdiinfo.txt"
must_contain "$tmpdir/vhdiinfo.txt" 'Disk type[[:space:]]*:[[:space:]]*Differential'
must_contain "$tmpdir/vhdiinfo.txt" "Parent identifier[[:space:]]*:[[:space:]]*$mid_uuid"
must_contain "$tmpdir/vhdiinfo.txt" 'Parent filename[[:space:]]*:[[:space:]]*mid.vhd'
must_contain "$tmpdir/vhdiinfo.txt" "Media size[[:space:]]*:.*$(( 16 * mib )) bytes"
vhdiinfo "$d/base.vhd" >"$tmpdir/vhdiinfo-base.txt"
must_contain "$tmpdir/vhdiinfo-base.txt" 'Disk type[[:space:]]*:[[:space:]]*Dynamic'

# vhdimount exposes the chain base first: vhdi1 base, vhdi2 mid, vhdi3 top (merged).
unmount ()
{
    fusermount -u "$1" 2>/dev/null || fusermount3 -u "$1" 2>/dev/null || umount "$1"
}
mnt=$tmpdir/mnt
mkdir "$mnt"
if command -v vhdimount >/dev/null && vhdimount "$d/top.vhd" "$mnt" >"$tmpdir/vhdimount.log" 2>&1; then
    cleanup_fn unmount "$mnt"
    ls -l "$mnt"
    [ -e "$mnt/vhdi3" ] || fail "vhdimount did not open the whole chain"
    cmp "$mnt/vhdi1" "$tmpdir/base.raw" || fail "vhdimount: base.vhd differs from the expectation"
    cmp "$mnt/vhdi2" "$tmpdir/mid.raw" ||
        fail "vhdimount: mid.vhd (merged with base) differs from the expectation"
    cmp "$mnt/vhdi3" "$tmpdir/chain.raw" ||
        fail "vhdimount: top.vhd (merged with mid and base) differs from the expectation"
    unmount "$mnt"
else
    cat "$tmpdir/vhdimount.log" || :
    echo "$test_name: NOTE: vhdimount could not mount over FUSE here; the merged view was" \
         "not checked through libvhdi (vhdiinfo was)" >&2
fi

# --- the relative locator survives moving the whole directory -----------------------------
mv "$d" "$tmpdir/moved"
d=$tmpdir/moved
start_imagenbd -r -x chain "$d/top.vhd"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "after moving the directory: top.vhd differs"
stop_imagenbd

# --- a missing parent: refused, every name tried listed ---------------------------------
mv "$d/base.vhd" "$d/elsewhere.vhd"
must_fail "$tmpdir/missing.txt" "$IMAGENBD" serve -r -k "$sockdir/missing.sock" "$d/top.vhd"
must_contain "$tmpdir/missing.txt" "vhd: $d/mid.vhd: parent not found: wanted unique id $base_uuid \(name \"base.vhd\"\); tried: "
must_contain "$tmpdir/missing.txt" "$d/base.vhd \(W2ru locator [0-9]\): not found"
must_contain "$tmpdir/missing.txt" "\(chain: $d/top.vhd -> $d/mid.vhd\)"
must_contain "$tmpdir/missing.txt" "$tmpdir/imgs/base.vhd \(W2ku locator [0-9]\): not found"
# info still describes the image, with serve's refusal.
"$IMAGENBD" info --json "$d/top.vhd" >"$tmpdir/orphan.json"
json_field "$tmpdir/orphan.json" 'j["not_served"]' | grep -q 'parent not found' ||
    fail "info: no not_served for a missing parent"
# --parent names it explicitly (checked by UUID): for the top image only, so here the
# mid's parent cannot be overridden; a wrong one is refused.
must_fail "$tmpdir/wrong.txt" "$IMAGENBD" serve -r -k "$sockdir/wrong.sock" \
    --parent "$d/elsewhere.vhd" "$d/top.vhd"
must_contain "$tmpdir/wrong.txt" "--parent $d/elsewhere.vhd is not its parent: unique id $base_uuid"
mv "$d/elsewhere.vhd" "$d/base.vhd"
cp "$d/mid.vhd" "$d/mid-copy.vhd"
start_imagenbd -r -x chain --parent "$d/mid-copy.vhd" "$d/top.vhd"
qemu-img compare -f raw -F raw "$tmpdir/chain.raw" "$(nbd_uri chain)" ||
    fail "--parent: top.vhd differs"
stop_imagenbd

# --- create refuses what it cannot make ---------------------------------------------------
must_fail "$tmpdir/size.txt" "$IMAGENBD" create -f vhd --parent "$d/base.vhd" "$d/x.vhd" 8M
must_contain "$tmpdir/size.txt" "size 8388608 differs from the parent's 16777216"
must_fail "$tmpdir/fixed.txt" "$IMAGENBD" create -f vhd --subformat fixed --parent "$d/base.vhd" "$d/x.vhd"
must_contain "$tmpdir/fixed.txt" "cannot have a parent"
truncate -s 1M "$tmpdir/plain.raw"
must_fail "$tmpdir/raw.txt" "$IMAGENBD" create -f vhd --parent "$tmpdir/plain.raw" "$d/x.vhd"
must_contain "$tmpdir/raw.txt" "is a raw image; a vhd image needs a vhd parent"
[ ! -e "$d/x.vhd" ] || fail "a refused create left a file"
exit 0
