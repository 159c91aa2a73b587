#!/usr/bin/env bash
# qemu-img against imagenbd over nbd+unix:// and nbd:// (TCP): info reports the size,
# compare sees identical content (and notices a difference), convert copies the export
# out byte-exactly and copies an image into a writable export; the default listener
# (no -b) accepts 127.0.0.1 and, where configured, ::1.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io jq cmp

size=$(( 16 * 1024 * 1024 ))
img=$tmpdir/disk.img
qemu-img create -f raw "$img" $size
qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 5M 3M' \
        -c 'write -P 0x33 15M 1M' -c 'write -P 0x44 12345 678' "$img"

# A copy that differs in one 4 KiB block at 8 MiB.
other=$tmpdir/other.img
cp "$img" "$other"
qemu-io -f raw -c 'write -P 0x55 8M 4k' "$other"

check_export ()   # URI
{
    local u=$1 status out=$tmpdir/out.img
    qemu-img info --output=json "$u" >"$tmpdir/info.json"
    cat "$tmpdir/info.json"
    jq -e ".\"virtual-size\" == $size" "$tmpdir/info.json" >/dev/null ||
        fail "qemu-img info $u: virtual-size is not $size"

    qemu-img compare -f raw -F raw "$img" "$u" || fail "qemu-img compare $u: differs from $img"
    status=0
    qemu-img compare -f raw -F raw "$other" "$u" >"$tmpdir/compare.out" 2>&1 || status=$?
    cat "$tmpdir/compare.out"
    [ $status -eq 1 ] || fail "qemu-img compare against a different image: status $status, expected 1"
    must_contain "$tmpdir/compare.out" "offset 8388608" "qemu-img compare output"

    rm -f "$out"
    qemu-img convert -f raw -O raw "$u" "$out"
    cmp "$img" "$out" || fail "qemu-img convert $u produced different bytes"
}

# --- Unix socket ---------------------------------------------------------------
start_imagenbd -x disk "$img"
check_export "$(nbd_uri disk)"
# The first (only) export is also the default export "".
check_export "$(nbd_uri)"
# qemu's legacy syntax.
qemu-img info "nbd:unix:$sock:exportname=disk" | grep -E "virtual size: 16 MiB \($size bytes\)"
stop_imagenbd

# --- TCP ---------------------------------------------------------------------------
start_imagenbd_tcp -x disk "$img"
check_export "$(nbd_uri disk)"
qemu-img info "nbd:127.0.0.1:$port:exportname=disk" | grep -E "virtual size: 16 MiB \($size bytes\)"
stop_imagenbd

# --- convert INTO a writable export (TCP) -------------------------------------------
target=$tmpdir/target.img
truncate -s $size "$target"
start_imagenbd_tcp "$target"
qemu-img convert -n -f raw -O raw "$img" "$uri"
qemu-img compare -f raw -F raw "$img" "$uri" || fail "export differs after convert into it"
stop_imagenbd
cmp "$img" "$target" || fail "the file behind the export differs after convert into it"

# --- default bind address: every address, IPv4 and IPv6 ----------------------------
p=$(free_port)
start_imagenbd -p "$p" -x disk "$img"
qemu-img info --output=json "nbd://127.0.0.1:$p/disk" | jq -e ".\"virtual-size\" == $size"
if py3 -c 'import socket; socket.socket(socket.AF_INET6).bind(("::1", 0))' 2>/dev/null; then
    qemu-img info --output=json "nbd://[::1]:$p/disk" | jq -e ".\"virtual-size\" == $size" ||
        fail "default bind does not accept IPv6 (::1) connections"
else
    echo "$test_name: no IPv6 loopback here; IPv6 part of the default bind not checked"
fi
stop_imagenbd
