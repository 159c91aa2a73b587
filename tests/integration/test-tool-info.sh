#!/usr/bin/env bash
# imagenbd info: images made by qemu-img (VHD fixed/dynamic with and without force_size,
# VDI static/dynamic) and raw files are described as qemu-img sees them: same virtual
# size, file size, block size and allocation counts, with stable --json keys; a VHD whose
# CHS size differs from current_size reports both and which one is served; a differencing
# VHD (patched) shows its parent's name and UUID. Damaged images fail with exit status 1
# and the very message `serve` gives; usage mistakes exit 2.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io timeout

mib=$(( 1024 * 1024 ))

json_get ()   # FILE KEY...
{
    py3 - "$@" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    v = v[k]
print(str(v).lower() if isinstance(v, bool) else v)
PY
}
json_keys ()  # FILE [KEY...]: the keys of an object, sorted, space separated
{
    py3 - "$@" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    v = v[k]
print(" ".join(sorted(v)))
PY
}
qemu_get ()   # FORMAT FILE KEY
{
    qemu-img info -f "$1" --output=json "$2" |
        py3 -c "import json, sys; print(json.load(sys.stdin)['$3'])"
}

# --- images made by qemu ----------------------------------------------------------------
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/fixed.vhd" 24M
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/dyn.vhd" 24M
qemu-img create -f vpc -o subformat=dynamic "$tmpdir/chs.vhd" 10M
qemu-img create -f vdi -o static=on "$tmpdir/static.vdi" 8M
qemu-img create -f vdi "$tmpdir/dyn.vdi" 10M
qemu-img create -f raw "$tmpdir/disk.raw" 3M
qemu-io -f vpc -c 'write -P 1 0 4k' -c 'write -P 2 5M 4k' "$tmpdir/dyn.vhd" >/dev/null
qemu-io -f vdi -c 'write -P 1 5M 4k' -c 'write -P 2 0 512' "$tmpdir/dyn.vdi" >/dev/null

for spec in fixed.vhd:vpc:vhd dyn.vhd:vpc:vhd chs.vhd:vpc:vhd static.vdi:vdi:vdi \
            dyn.vdi:vdi:vdi disk.raw:raw:raw; do
    IFS=: read -r file qfmt fmt <<<"$spec"
    "$IMAGENBD" info --json "$tmpdir/$file" >"$tmpdir/$file.json" || fail "info --json $file"
    cat "$tmpdir/$file.json"
    "$IMAGENBD" info "$tmpdir/$file" >"$tmpdir/$file.txt" || fail "info $file"
    cat "$tmpdir/$file.txt"
    [ "$(json_get "$tmpdir/$file.json" format)" = "$fmt" ] || fail "$file: format"
    [ "$(json_get "$tmpdir/$file.json" virtual_size)" = "$(qemu_get $qfmt "$tmpdir/$file" virtual-size)" ] ||
        fail "$file: virtual size differs from qemu-img's"
    [ "$(json_get "$tmpdir/$file.json" file_size)" = "$(stat -c %s "$tmpdir/$file")" ] ||
        fail "$file: file size"
    [ "$(json_get "$tmpdir/$file.json" allocated_bytes)" = $(( $(stat -c %b "$tmpdir/$file") * 512 )) ] ||
        fail "$file: allocated bytes"
    must_contain "$tmpdir/$file.txt" "^file format: $fmt$"
    must_contain "$tmpdir/$file.txt" "^virtual size: .*\($(json_get "$tmpdir/$file.json" virtual_size) bytes\)$"
    # -f gives the same answer as probing.
    "$IMAGENBD" info -f "$qfmt" --output=json "$tmpdir/$file" | cmp - "$tmpdir/$file.json" ||
        fail "$file: info -f $qfmt differs from the probed info"
done

# Stable keys.
[ "$(json_keys "$tmpdir/disk.raw.json")" = "allocated_bytes file_size filename format virtual_size" ] ||
    fail "raw: top-level keys changed"
[ "$(json_keys "$tmpdir/dyn.vhd.json" vhd)" = "block_size blocks_allocated blocks_total chs_size creator_app creator_host_os creator_version current_size footer_copy_used geometry original_size qemu72_size size_source subformat timestamp uuid" ] ||
    fail "vhd: keys changed"
[ "$(json_keys "$tmpdir/dyn.vdi.json" vdi)" = "block_size blocks_allocated blocks_total blocks_used comment header_size modify_uuid parent_modify_uuid parent_uuid subformat uuid version" ] ||
    fail "vdi: keys changed"

# VHD details.
[ "$(json_get "$tmpdir/fixed.vhd.json" vhd subformat)" = fixed ] || fail "fixed subformat"
[ "$(json_get "$tmpdir/fixed.vhd.json" vhd creator_app)" = qem2 ] || fail "fixed creator"
[ "$(json_get "$tmpdir/fixed.vhd.json" vhd geometry heads)" = 16 ] || fail "fixed geometry"
[ "$(json_get "$tmpdir/dyn.vhd.json" vhd subformat)" = dynamic ] || fail "dyn subformat"
[ "$(json_get "$tmpdir/dyn.vhd.json" vhd block_size)" = $(( 2 * mib )) ] || fail "dyn block size"
[ "$(json_get "$tmpdir/dyn.vhd.json" vhd blocks_total)" = 12 ] || fail "dyn blocks total"
[ "$(json_get "$tmpdir/dyn.vhd.json" vhd blocks_allocated)" = 2 ] || fail "dyn blocks allocated"
# qemu without force_size: creator "qemu", current_size = C*H*S*512 = 10514432 (rounded up).
[ "$(json_get "$tmpdir/chs.vhd.json" vhd creator_app)" = qemu ] || fail "chs creator"
[ "$(json_get "$tmpdir/chs.vhd.json" vhd chs_size)" = 10514432 ] || fail "chs: CHS size"
[ "$(json_get "$tmpdir/chs.vhd.json" vhd current_size)" = 10514432 ] || fail "chs: current_size"
must_contain "$tmpdir/chs.vhd.txt" "geometry: 302/4/17 \(C/H/S\)"

# A CHS size below current_size: qemu 7.2 (creator "vpc ") uses CHS; so does serve; both shown.
cp "$tmpdir/fixed.vhd" "$tmpdir/vpc.vhd"
end=$(( $(stat -c %s "$tmpdir/vpc.vhd") - 512 ))
patch_bytes "$tmpdir/vpc.vhd" $(( end + 0x1c )) 76706320          # creator "vpc "
patch_bytes "$tmpdir/vpc.vhd" $(( end + 0x38 )) 02d20411          # 722/4/17: 25,137,152 bytes
fix_checksum "$tmpdir/vpc.vhd" "$end" 512 $(( 0x40 ))
"$IMAGENBD" info --json "$tmpdir/vpc.vhd" >"$tmpdir/vpc.json" || fail "info vpc.vhd"
cat "$tmpdir/vpc.json"
chs=$(( 722 * 4 * 17 * 512 ))
[ "$(json_get "$tmpdir/vpc.json" vhd chs_size)" = $chs ] || fail "vpc: CHS size"
[ "$(json_get "$tmpdir/vpc.json" vhd size_source)" = chs ] || fail "vpc: size source"
[ "$(json_get "$tmpdir/vpc.json" virtual_size)" = $chs ] || fail "vpc: served size"
[ "$(json_get "$tmpdir/vpc.json" virtual_size)" = "$(qemu_get vpc "$tmpdir/vpc.vhd" virtual-size)" ] ||
    fail "vpc: qemu disagrees"

# VDI details.
[ "$(json_get "$tmpdir/static.vdi.json" vdi subformat)" = static ] || fail "static subformat"
[ "$(json_get "$tmpdir/static.vdi.json" vdi blocks_allocated)" = 8 ] || fail "static allocated"
[ "$(json_get "$tmpdir/dyn.vdi.json" vdi subformat)" = dynamic ] || fail "vdi dyn subformat"
[ "$(json_get "$tmpdir/dyn.vdi.json" vdi blocks_total)" = 10 ] || fail "vdi blocks total"
[ "$(json_get "$tmpdir/dyn.vdi.json" vdi blocks_allocated)" = 2 ] || fail "vdi allocated"
[ "$(json_get "$tmpdir/dyn.vdi.json" vdi blocks_used)" = 2 ] || fail "vdi used"
[ "$(json_get "$tmpdir/dyn.vdi.json" vdi version)" = 1.1 ] || fail "vdi version"
json_get "$tmpdir/dyn.vdi.json" vdi uuid | grep -Eq '^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-' ||
    fail "vdi uuid is not a version 4 UUID in RFC order"

# --- a differencing VHD (patched): its parent's name and UUID --------------------------
cp "$tmpdir/dyn.vhd" "$tmpdir/diff.vhd"
size=$(stat -c %s "$tmpdir/diff.vhd")
for at in 0 $(( size - 512 )); do
    patch_bytes "$tmpdir/diff.vhd" $(( at + 0x3c )) 00000004
    fix_checksum "$tmpdir/diff.vhd" "$at" 512 $(( 0x40 ))
done
patch_bytes "$tmpdir/diff.vhd" $(( 512 + 0x28 )) 0123456789ab4cde8f0123456789abcd
patch_bytes "$tmpdir/diff.vhd" $(( 512 + 0x40 )) 0070006100720065006e0074002e00760068006400e9
fix_checksum "$tmpdir/diff.vhd" 512 1024 $(( 0x24 ))
"$IMAGENBD" info --json "$tmpdir/diff.vhd" >"$tmpdir/diff.json" || fail "info diff.vhd"
cat "$tmpdir/diff.json"
[ "$(json_get "$tmpdir/diff.json" vhd subformat)" = differencing ] || fail "diff subformat"
[ "$(json_get "$tmpdir/diff.json" vhd parent_uuid)" = 01234567-89ab-4cde-8f01-23456789abcd ] ||
    fail "diff parent uuid"
[ "$(json_get "$tmpdir/diff.json" vhd parent_name)" = "parent.vhdé" ] || fail "diff parent name"
json_get "$tmpdir/diff.json" not_served |
    grep -q 'parent not found: wanted unique id 01234567-89ab-4cde-8f01-23456789abcd (name "parent.vhd.*"); tried: .*/parent.vhd.* (the header.s parent name): not found' ||
    fail "diff: not_served does not say why"

# --- damaged images: serve's message, exit status 1 ------------------------------------
same_error ()   # NAME FILE: info and serve fail with the same message
{
    local status=0
    "$IMAGENBD" info "$2" >"$tmpdir/$1.info" 2>&1 || status=$?
    cat "$tmpdir/$1.info"
    [ $status -eq 1 ] || fail "info $1: exit status $status, expected 1"
    must_fail "$tmpdir/$1.serve" timeout 20 "$IMAGENBD" serve -k "$sockdir/bad.sock" "$2"
    grep '^imagenbd: ' "$tmpdir/$1.serve" | tail -1 >"$tmpdir/$1.serve.msg"
    grep '^imagenbd: ' "$tmpdir/$1.info" >"$tmpdir/$1.info.msg"
    cmp "$tmpdir/$1.info.msg" "$tmpdir/$1.serve.msg" || fail "info and serve differ on $1"
    must_contain "$tmpdir/$1.info" "$3"
}
cp "$tmpdir/fixed.vhd" "$tmpdir/badsum.vhd"
patch_bytes "$tmpdir/badsum.vhd" $(( $(stat -c %s "$tmpdir/badsum.vhd") - 512 + 0x37 )) 01
same_error badsum "$tmpdir/badsum.vhd" "vhd: $tmpdir/badsum.vhd: footer: checksum mismatch"
cp "$tmpdir/dyn.vhd" "$tmpdir/header.vhd"
patch_bytes "$tmpdir/header.vhd" $(( 0x200 + 0x20 )) 01
same_error header "$tmpdir/header.vhd" "dynamic header: checksum mismatch"
cp "$tmpdir/dyn.vdi" "$tmpdir/bad.vdi"
patch_bytes "$tmpdir/bad.vdi" $(( 0x178 )) b80b0000                   # block size 3000
same_error badvdi "$tmpdir/bad.vdi" "vdi: $tmpdir/bad.vdi: .*3000"
same_error missing "$tmpdir/nothere.vhd" "nothere.vhd: No such file"

# --- usage ------------------------------------------------------------------------------
status=0; "$IMAGENBD" info -f qcow2 "$tmpdir/disk.raw" >"$tmpdir/u1" 2>&1 || status=$?
[ $status -eq 2 ] || fail "unknown format: status $status"
must_contain "$tmpdir/u1" "unknown image format 'qcow2'"
status=0; "$IMAGENBD" info >"$tmpdir/u2" 2>&1 || status=$?
[ $status -eq 2 ] || fail "no image: status $status"
must_contain "$tmpdir/u2" "no image given"
"$IMAGENBD" info --help >"$tmpdir/help" || fail "info --help"
must_contain "$tmpdir/help" "Usage: imagenbd info"
"$IMAGENBD" --help >"$tmpdir/mainhelp" || fail "--help"
must_contain "$tmpdir/mainhelp" "^  info "
must_contain "$tmpdir/mainhelp" "^  create "
echo "$test_name: PASS"
