#!/usr/bin/env bash
# A read-only export (-r): nbdinfo shows is_read_only true and no trim/zero/fua/fast_zero;
# the server holds the image open O_RDONLY; reads work; qemu-io, qemu-img and nbdcopy
# refuse to write; a write that reaches the server (libnbd, strict mode off) fails with
# EPERM "Operation not permitted"; the image is unchanged at the end.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io qemu-img nbdinfo nbdcopy jq cmp
requires_nbdsh

img=$tmpdir/ro.img
truncate -s 4M "$img"
qemu-io -f raw -c 'write -P 0x5c 0 4M' "$img"
cp "$img" "$tmpdir/orig.img"

start_imagenbd -r -x ro "$img"
u=$(nbd_uri ro)

# --- what the server advertises ---------------------------------------------------------
nbdinfo --json "$u" | tee "$tmpdir/info.json"
jq -e '.exports[0].is_read_only == true' "$tmpdir/info.json" || fail "is_read_only is not true"
for f in can_trim can_zero can_fua can_fast_zero; do
    jq -e --arg f "$f" '.exports[0][$f] == false' "$tmpdir/info.json" ||
        fail "read-only export advertises $f"
done
nbdinfo --is read-only "$u" || fail "nbdinfo --is read-only says no"

# --- the server opened the image read-only ---------------------------------------------------
found=0
for fd in /proc/$imagenbd_pid/fd/*; do
    [ "$(readlink "$fd")" = "$img" ] || continue
    flags=$(awk '/^flags:/ { print $2 }' "/proc/$imagenbd_pid/fdinfo/${fd##*/}")
    (( (8#$flags & 3) == 0 )) || fail "image open with flags $flags, not O_RDONLY"
    found=1
done
[ $found -eq 1 ] || fail "no open file descriptor for $img in the server"

# --- reads work ------------------------------------------------------------------------------
qemu-io -r -f raw -c 'read -P 0x5c 0 4M' "$u" | tee "$tmpdir/read.out"
! grep -q "verification failed" "$tmpdir/read.out" || fail "read -P failed"
nbdcopy "$u" - | cmp "$img" - || fail "nbdcopy read differs"

# --- clients refuse to write ---------------------------------------------------------------
must_fail "$tmpdir/qemu-io-rw.out" qemu-io -f raw -c 'write -P 0x11 0 4k' "$u"
must_contain "$tmpdir/qemu-io-rw.out" "read-only|Permission denied|Operation not permitted"
must_fail "$tmpdir/qemu-io-ro.out" qemu-io -r -f raw -c 'write -P 0x11 0 4k' "$u"
must_contain "$tmpdir/qemu-io-ro.out" "read-only|Operation not permitted"
must_fail "$tmpdir/qemu-img.out" qemu-img convert -n -f raw -O raw "$tmpdir/orig.img" "$u"
must_fail "$tmpdir/nbdcopy.out" nbdcopy "$tmpdir/orig.img" "$u"
must_contain "$tmpdir/nbdcopy.out" "read-only"

# --- a write that reaches the server: EPERM ----------------------------------------------
must_fail "$tmpdir/nbdsh.out" nbdsh_py -u "$u" \
    -c 'h.set_strict_mode(0)' -c 'h.pwrite(b"\x11" * 4096, 0)'
must_contain "$tmpdir/nbdsh.out" "command failed: Operation not permitted"
nbdsh_py -u "$u" -c 'h.set_strict_mode(0)' -c '
import errno
for name, fn in (("trim", lambda: h.trim(4096, 0)), ("zero", lambda: h.zero(4096, 0))):
    try:
        fn()
        raise AssertionError(name + " on a read-only export succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, "%s: %s" % (name, e.string)
        print(name, "refused:", e.string)
assert h.pread(4096, 0) == b"\x5c" * 4096
'

stop_imagenbd
cmp "$img" "$tmpdir/orig.img" || fail "the read-only image was modified"
