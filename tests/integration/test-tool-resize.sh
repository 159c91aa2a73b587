#!/usr/bin/env bash
# imagenbd resize: images made by qemu-img and imagenbd create, filled with qemu-io, grow
# (a dynamic VHD whose one-sector BAT must grow past block 0, which follows it at once; a
# VDI whose block map must grow past the data offset; fixed VHD; static VDI; raw), and
# afterwards qemu-img info reports the new size, qemu-img check passes (VDI),
# 'imagenbd check' passes, the old contents compare equal and the new space reads as
# zeroes (qemu-img compare on the common prefix), and libvhdi sees the new VHD size.
# Shrinking is refused without --shrink and over allocated blocks, and works with it.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io

mib=$(( 1024 * 1024 ))

qsize ()   # FORMAT FILE: the virtual size qemu-img reports
{
    qemu-img info -f "$1" --output=json "$2" |
        py3 -c "import json, sys; print(json.load(sys.stdin)['virtual-size'])"
}

# resized QFMT FILE REFERENCE.raw SIZE: the image has SIZE bytes for qemu, imagenbd check
# passes, and it holds REFERENCE followed by zeroes.
resized ()
{
    local qfmt=$1 file=$2 ref=$3 size=$4
    [ "$(qsize "$qfmt" "$file")" = "$size" ] || fail "$file: qemu-img sees $(qsize "$qfmt" "$file"), expected $size"
    "$IMAGENBD" check "$file" || fail "$file: imagenbd check failed after resize"
    if [ "$qfmt" = vdi ]; then qemu-img check "$file" || fail "$file: qemu-img check failed"; fi
    # compare: the common prefix must be equal, the longer image's rest zero.
    qemu-img compare -f raw -F "$qfmt" "$ref" "$file" || fail "$file: contents differ"
    "$IMAGENBD" info --json "$file" >"$file.info.json"
    py3 -c "import json,sys; assert json.load(open(sys.argv[1]))['virtual_size'] == int(sys.argv[2])" \
        "$file.info.json" "$size" || fail "$file: imagenbd info size"
}

# --- dynamic VHD: the BAT (1 sector, 6 entries) must grow past block 0 ----------------
qemu-img create -f vpc dyn.vhd 10M
qemu-io -f vpc -c 'write -P 1 0 64k' -c 'write -P 2 5M 4k' -c 'write -P 3 10000k 4k' dyn.vhd >/dev/null
qemu-img convert -f vpc -O raw dyn.vhd dyn.raw
# Block 0 starts right after the BAT (qemu does not align): 0x600 + 512.
[ "$(od -An -tx1 -j $(( 0x600 )) -N 4 dyn.vhd | tr -d ' ')" = 00000004 ] || fail "block 0 is not at 0x800"
"$IMAGENBD" resize --json dyn.vhd 1000M >dyn.json
cat dyn.json
py3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['relocated_blocks'] == 1 and d['new_size'] == 1000 << 20, d" dyn.json ||
    fail "dyn.vhd: block 0 was not relocated"
resized vpc dyn.vhd dyn.raw $(( 1000 * mib ))
if command -v vhdiinfo >/dev/null; then
    vhdiinfo dyn.vhd | tee vhdi.txt
    must_contain vhdi.txt "Media size.*\\($(( 1000 * mib )) bytes\\)"
fi
# The image is served and grows further with the new BAT.
start_imagenbd -x d dyn.vhd
qemu-io -f raw -c 'write -P 9 900M 64k' -c 'read -P 1 0 64k' -c 'read -P 0 20M 64k' "$(nbd_uri d)" >io.txt ||
    { cat io.txt; fail "serving the resized dyn.vhd"; }
stop_imagenbd
qemu-io -f vpc -c 'read -P 9 900M 64k' -c 'read -P 2 5M 4k' dyn.vhd | tee io.txt
grep -q 'Pattern verification failed' io.txt && fail "dyn.vhd: data after serving"
"$IMAGENBD" check dyn.vhd || fail "dyn.vhd: check after serving"

# Shrinking: refused without --shrink, refused over an allocated block, fine above it.
status=0; "$IMAGENBD" resize dyn.vhd 500M 2>err.txt || status=$?
cat err.txt; [ "$status" -eq 1 ] || fail "shrink without --shrink exited $status"
must_contain err.txt 'needs --shrink'
status=0; "$IMAGENBD" resize --shrink dyn.vhd 100M 2>err.txt || status=$?
cat err.txt; [ "$status" -eq 1 ] || fail "shrink over block 450 exited $status"
must_contain err.txt 'block 450 .*is allocated'
"$IMAGENBD" resize --shrink dyn.vhd -99M
[ "$(qsize vpc dyn.vhd)" = $(( 901 * mib )) ] || fail "dyn.vhd: relative shrink"
"$IMAGENBD" check dyn.vhd || fail "dyn.vhd: check after shrink"

# --- imagenbd-made dynamic VHD and fixed VHDs --------------------------------------------
"$IMAGENBD" create -f vhd idyn.vhd 4M
qemu-io -f vpc -c 'write -P 5 0 4M' idyn.vhd >/dev/null
qemu-img convert -f vpc -O raw idyn.vhd idyn.raw
"$IMAGENBD" resize idyn.vhd 2G
resized vpc idyn.vhd idyn.raw $(( 2048 * mib ))

qemu-img create -f vpc -o subformat=fixed,force_size=on fixed.vhd 8M
qemu-io -f vpc -c 'write -P 6 0 8M' fixed.vhd >/dev/null
qemu-img convert -f vpc -O raw fixed.vhd fixed.raw
"$IMAGENBD" resize -f vpc fixed.vhd +4M
[ "$(stat -c %s fixed.vhd)" = $(( 12 * mib + 512 )) ] || fail "fixed.vhd: file size"
resized vpc fixed.vhd fixed.raw $(( 12 * mib ))
"$IMAGENBD" resize -f vpc --shrink fixed.vhd 2M 2>warn.txt
cat warn.txt
must_contain warn.txt 'cut off'
head -c $(( 2 * mib )) fixed.raw >fixed2.raw
resized vpc fixed.vhd fixed2.raw $(( 2 * mib ))

# --- VDI: the block map must grow past the data offset ------------------------------------
qemu-img create -f vdi dyn.vdi 10M
qemu-io -f vdi -c 'write -P 1 0 4k' -c 'write -P 2 5M 4k' -c 'write -P 3 10236k 4k' dyn.vdi >/dev/null
qemu-img convert -f vdi -O raw dyn.vdi dyn-vdi.raw
"$IMAGENBD" resize --json dyn.vdi 300M >vdi.json
cat vdi.json
py3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['relocated_blocks'] == 1, d" vdi.json ||
    fail "dyn.vdi: no block was relocated"
resized vdi dyn.vdi dyn-vdi.raw $(( 300 * mib ))
qemu-io -f vdi -c 'write -P 8 299M 64k' dyn.vdi >/dev/null
qemu-img check dyn.vdi || fail "dyn.vdi: qemu-img check after a write past the old end"
status=0; "$IMAGENBD" resize --shrink dyn.vdi 100M 2>err.txt || status=$?
cat err.txt; [ "$status" -eq 1 ] || fail "vdi shrink over block 299 exited $status"
must_contain err.txt 'block 299 .*is allocated'

qemu-img create -f vdi -o static=on static.vdi 100M
qemu-io -f vdi -c 'write -P 4 0 100M' static.vdi >/dev/null
qemu-img convert -f vdi -O raw static.vdi static.raw
"$IMAGENBD" resize static.vdi 200M
resized vdi static.vdi static.raw $(( 200 * mib ))

"$IMAGENBD" create -f vdi idyn.vdi 8M
qemu-io -f vdi -c 'write -P 7 1M 1M' idyn.vdi >/dev/null
qemu-img convert -f vdi -O raw idyn.vdi idyn-vdi.raw
"$IMAGENBD" resize idyn.vdi 24M
resized vdi idyn.vdi idyn-vdi.raw $(( 24 * mib ))
"$IMAGENBD" resize --shrink idyn.vdi 2M
[ "$(qsize vdi idyn.vdi)" = $(( 2 * mib )) ] || fail "idyn.vdi: shrink"
qemu-img check idyn.vdi || fail "idyn.vdi: qemu-img check after shrink"

# --- differencing images are refused ------------------------------------------------------
"$IMAGENBD" create -f vhd base.vhd 10M
"$IMAGENBD" create -f vhd --parent base.vhd child.vhd
status=0; "$IMAGENBD" resize child.vhd 20M 2>err.txt || status=$?
cat err.txt; [ "$status" -eq 1 ] || fail "differencing resize exited $status"
must_contain err.txt 'differencing disk cannot be resized'
[ "$(qsize vpc child.vhd)" = $(( 10 * mib )) ] || fail "child.vhd changed"

# --- raw, and usage ------------------------------------------------------------------------
qemu-img create -f raw disk.raw 1M
"$IMAGENBD" resize disk.raw 3M
[ "$(stat -c %s disk.raw)" = $(( 3 * mib )) ] || fail "raw: size"
status=0; "$IMAGENBD" resize disk.raw 2>/dev/null || status=$?
[ "$status" -eq 2 ] || fail "usage error exited $status"
status=0; "$IMAGENBD" resize dyn.vhd 1000 2>err.txt || status=$?
cat err.txt; [ "$status" -eq 1 ] || fail "odd size exited $status"
must_contain err.txt 'multiple of 512'
