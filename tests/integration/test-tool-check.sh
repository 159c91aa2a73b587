#!/usr/bin/env bash
# imagenbd check: clean images made by qemu-img and by imagenbd create (VHD fixed/dynamic,
# VDI static/dynamic) exit 0 with "No errors were found on the image."; a damaged corpus
# built by byte-patching (bad footer and header checksums, overlapping BAT entries, a BAT
# entry past the end, VDI duplicate map entries, a bad allocated block count) exits 2 with
# a message naming the field, every bad entry reported; leaks alone exit 3, raw images 63,
# an unreadable file 1 -- qemu-img check's exit codes. qemu-img check agrees on the VDIs.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io

json_get ()   # FILE KEY...
{
    py3 - "$@" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    v = v[int(k)] if isinstance(v, list) else v[k]
print(str(v).lower() if isinstance(v, bool) else v)
PY
}

# expect_status STATUS OUT CMD...: run CMD (output to OUT), require the exit status.
expect_status ()
{
    local want=$1 out=$2 status=0
    shift 2
    "$@" >"$out" 2>&1 || status=$?
    cat "$out"
    [ "$status" -eq "$want" ] || fail "'$*' exited $status, expected $want"
}

# --- clean images --------------------------------------------------------------------
qemu-img create -f vpc -o subformat=fixed q-fixed.vhd 10M
qemu-img create -f vpc q-dyn.vhd 10M
qemu-img create -f vdi -o static=on q-static.vdi 8M
qemu-img create -f vdi q-dyn.vdi 10M
qemu-io -f vpc -c 'write -P 1 0 4k' -c 'write -P 2 5M 4k' q-dyn.vhd >/dev/null
qemu-io -f vdi -c 'write -P 1 5M 4k' -c 'write -P 2 0 512' q-dyn.vdi >/dev/null
"$IMAGENBD" create -f vhd --subformat fixed i-fixed.vhd 10M
"$IMAGENBD" create -f vhd i-dyn.vhd 20M
"$IMAGENBD" create -f vdi --subformat static i-static.vdi 8M
"$IMAGENBD" create -f vdi i-dyn.vdi 20M
start_imagenbd -x vhd i-dyn.vhd
qemu-io -f raw -c 'write -P 3 0 64k' -c 'write -P 4 9M 4k' "$(nbd_uri vhd)" >/dev/null
stop_imagenbd
start_imagenbd -x vdi i-dyn.vdi
qemu-io -f raw -c 'write -P 3 0 64k' -c 'write -P 4 9M 4k' "$(nbd_uri vdi)" >/dev/null
stop_imagenbd

for f in q-fixed.vhd q-dyn.vhd q-static.vdi q-dyn.vdi i-fixed.vhd i-dyn.vhd i-static.vdi i-dyn.vdi; do
    expect_status 0 "$f.txt" "$IMAGENBD" check "$f"
    must_contain "$f.txt" '^No errors were found on the image\.$'
    expect_status 0 "$f.json" "$IMAGENBD" check --json "$f"
    [ "$(json_get "$f.json" errors)" = "[]" ] || fail "$f: errors in the JSON"
    [ "$(json_get "$f.json" leaked_bytes)" = 0 ] || fail "$f: leaked bytes"
    [ "$(json_get "$f.json" complete)" = true ] || fail "$f: incomplete check"
done
[ "$(json_get q-dyn.vhd.json allocated_blocks)" = 2 ] || fail "q-dyn.vhd: allocated blocks"
[ "$(json_get q-dyn.vhd.json total_blocks)" = 6 ] || fail "q-dyn.vhd: total blocks"
[ "$(json_get q-dyn.vdi.json allocated_blocks)" = 2 ] || fail "q-dyn.vdi: allocated blocks"
[ "$(json_get i-dyn.vdi.json allocated_blocks)" = 2 ] || fail "i-dyn.vdi: allocated blocks"
[ "$(json_get i-dyn.vhd.json allocated_blocks)" = 2 ] || fail "i-dyn.vhd: allocated blocks"
py3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert sorted(d) == ["allocated_blocks","complete","errors","filename","format","leaked_bytes","notes","total_blocks","warnings"], sorted(d)' \
    q-dyn.vhd.json || fail "check --json keys changed"

# --- damaged VHDs ----------------------------------------------------------------------
# q-dyn.vhd: footer copy 0x0, header 0x200, BAT 0x600 (6 entries), blocks at 0x800 and
# 0x200a00, end footer at 0x400c00.
size=$(stat -c %s q-dyn.vhd)

cp q-dyn.vhd bad-footer.vhd          # end footer checksum: the copy at 0 is still sound
patch_bytes bad-footer.vhd $(( size - 512 + 0x40 )) 00000000
expect_status 2 bad-footer.txt "$IMAGENBD" check bad-footer.vhd
must_contain bad-footer.txt 'ERROR footer at the end of the file: checksum mismatch'
must_contain bad-footer.txt 'copy at offset 0 is sound'
must_contain bad-footer.txt '^1 errors were found on the image\.$'

cp q-dyn.vhd bad-copy.vhd            # footer copy at 0: qemu reads it first
patch_bytes bad-copy.vhd $(( 0x30 )) 0000000001000000
expect_status 2 bad-copy.txt "$IMAGENBD" check bad-copy.vhd
must_contain bad-copy.txt 'footer copy at offset 0: checksum mismatch'

cp q-dyn.vhd bad-header.vhd          # dynamic header checksum (qemu never checks it)
patch_bytes bad-header.vhd $(( 0x200 + 0x24 )) 00000000
expect_status 2 bad-header.txt "$IMAGENBD" check --json bad-header.vhd
[ "$(json_get bad-header.txt errors 0 structure)" = "dynamic header" ] || fail "header: structure"
[ "$(json_get bad-header.txt errors 0 field)" = "checksum" ] || fail "header: field"

cp q-dyn.vhd bad-bat.vhd             # entry 3 = entry 0 (overlap), entry 4 past the end
patch_bytes bad-bat.vhd $(( 0x600 + 12 )) 00000004
patch_bytes bad-bat.vhd $(( 0x600 + 16 )) 00100000
expect_status 2 bad-bat.txt "$IMAGENBD" check bad-bat.vhd
must_contain bad-bat.txt 'ERROR BAT entries 0 and 3 point at the same block \(0x800\)'
must_contain bad-bat.txt 'ERROR BAT entry 4 points past the end of the file'
must_contain bad-bat.txt '^2 errors were found on the image\.$'
expect_status 2 bad-bat.json "$IMAGENBD" check --json bad-bat.vhd
[ "$(json_get bad-bat.json errors 1 field)" = "entries 0 and 3" ] || fail "bat: field of the overlap"
[ "$(json_get bad-bat.json errors 0 field)" = "entry 4" ] || fail "bat: field of the entry past the end"

cp q-dyn.vhd bad-field.vhd           # footer current_size not a multiple of 512, checksum fixed
patch_bytes bad-field.vhd $(( size - 512 + 0x30 )) 0000000000a07001
fix_checksum bad-field.vhd $(( size - 512 )) 512 64
expect_status 2 bad-field.txt "$IMAGENBD" check bad-field.vhd
must_contain bad-field.txt 'ERROR footer: current_size 10514433 is not a multiple of 512'

cp q-fixed.vhd bad-fixed.vhd         # a fixed disk has no copy: nothing to fall back to
fsize=$(stat -c %s bad-fixed.vhd)
patch_bytes bad-fixed.vhd $(( fsize - 512 + 0x40 )) 00000000
expect_status 2 bad-fixed.txt "$IMAGENBD" check -f vpc bad-fixed.vhd
must_contain bad-fixed.txt 'checksum mismatch'
must_contain bad-fixed.txt 'stopped early'

# A leaked block alone (what a crash between a block's data and its BAT entry leaves):
# the end footer moves one block further, exit 3.
cp q-dyn.vhd leak.vhd
span=$(( 2 * 1024 * 1024 + 512 ))
dd if=q-dyn.vhd of=footer.bin bs=1 skip=$(( size - 512 )) count=512 status=none
truncate -s $(( size - 512 + span )) leak.vhd
cat footer.bin >>leak.vhd
expect_status 3 leak.txt "$IMAGENBD" check leak.vhd
must_contain leak.txt "^$span leaked bytes were found on the image\.$"
grep -q 'errors were found' leak.txt && fail "leak.vhd: a leak reported as an error"

# --- damaged VDIs ----------------------------------------------------------------------
# q-dyn.vdi: map at 0x200: entry 0 -> 1, entry 5 -> 0; blocks_allocated (0x184) = 2.
cp q-dyn.vdi dup.vdi
patch_bytes dup.vdi $(( 0x200 + 4 * 7 )) 00000000   # entry 7 -> block 0, shared with entry 5
patch_bytes dup.vdi $(( 0x184 )) 03000000            # qemu's tally stays consistent
expect_status 2 dup.txt "$IMAGENBD" check dup.vdi
must_contain dup.txt 'ERROR block map entries 5 and 7 point at the same block \(0\)'
status=0; qemu-img check dup.vdi || status=$?
[ "$status" -eq 2 ] || fail "qemu-img check dup.vdi exited $status, expected 2"

cp q-dyn.vdi count.vdi
patch_bytes count.vdi $(( 0x184 )) 03000000
expect_status 2 count.txt "$IMAGENBD" check --json count.vdi
[ "$(json_get count.txt errors 0 field)" = "blocks_allocated" ] || fail "count: field"
must_contain count.txt 'allocated blocks mismatch'
status=0; qemu-img check count.vdi || status=$?
[ "$status" -eq 2 ] || fail "qemu-img check count.vdi exited $status, expected 2"

cp q-dyn.vdi range.vdi
patch_bytes range.vdi $(( 0x200 + 4 * 3 )) e8030000  # entry 3 -> block 1000 of 10
patch_bytes range.vdi $(( 0x200 + 4 * 4 )) 09000000  # entry 4 -> block 9, past the file
expect_status 2 range.txt "$IMAGENBD" check range.vdi
must_contain range.txt 'ERROR block map entry 3 points at block 1000, beyond the 10 blocks'
must_contain range.txt 'ERROR block map entry 4 points past the end of the file'

cp q-dyn.vdi bad-vdi-header.vdi
patch_bytes bad-vdi-header.vdi $(( 0x178 )) b80b0000  # block size 3000
expect_status 2 bad-vdi-header.txt "$IMAGENBD" check bad-vdi-header.vdi
must_contain bad-vdi-header.txt 'ERROR header: block size 3000 is not a power of two'

cp q-dyn.vdi tail.vdi                                 # a block written, header never updated
truncate -s $(( $(stat -c %s q-dyn.vdi) + 1048576 )) tail.vdi
expect_status 3 tail.txt "$IMAGENBD" check tail.vdi
must_contain tail.txt '^1048576 leaked bytes were found on the image\.$'

# --- differencing images: the parent link is checked --------------------------------------
"$IMAGENBD" create -f vhd base.vhd 10M
"$IMAGENBD" create -f vhd --parent base.vhd child.vhd
"$IMAGENBD" create -f vdi base.vdi 10M
"$IMAGENBD" create -f vdi --parent base.vdi child.vdi
expect_status 0 child-vhd.txt "$IMAGENBD" check child.vhd
expect_status 0 child-vdi.txt "$IMAGENBD" check child.vdi
mkdir moved && mv base.vhd base.vdi moved/
expect_status 2 orphan-vhd.txt "$IMAGENBD" check --json child.vhd
[ "$(json_get orphan-vhd.txt errors 0 structure)" = parent ] || fail "child.vhd: missing parent"
must_contain orphan-vhd.txt 'parent not found'
expect_status 2 orphan-vdi.txt "$IMAGENBD" check --json child.vdi
[ "$(json_get orphan-vdi.txt errors 0 structure)" = parent ] || fail "child.vdi: missing parent"

# --- other exit codes ------------------------------------------------------------------
qemu-img create -f raw disk.raw 1M
expect_status 63 raw.txt "$IMAGENBD" check disk.raw
must_contain raw.txt 'raw images have no structure to check'
expect_status 1 missing.txt "$IMAGENBD" check no-such.vhd
must_contain missing.txt 'No such file or directory'
expect_status 1 usage.txt "$IMAGENBD" check
expect_status 0 help.txt "$IMAGENBD" check --help
must_contain help.txt '^Exit status'
