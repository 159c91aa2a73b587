#!/usr/bin/env bash
# Several NAME=IMAGE exports in one server: each is reachable by name with its own size
# and content, the empty name is the first export, writes to one do not touch another,
# two handles on different exports work side by side, a name with spaces and non-ASCII
# characters works, and an unknown name is refused by every client.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io qemu-img nbdinfo
requires_nbdsh

a=$tmpdir/a.img
b=$tmpdir/b.img
truncate -s 4M "$a"
truncate -s 8M "$b"
qemu-io -f raw -c 'write -P 0xaa 0 4M' "$a"
qemu-io -f raw -c 'write -P 0xbb 0 8M' "$b"
odd="disk ü 1"

start_imagenbd first="$a" second="$b" scratch=memory:2M "$odd=memory:1M"

# --- sizes and content by name ---------------------------------------------------------------
[ "$(nbdinfo --size "$(nbd_uri first)")" = 4194304 ] || fail "size of first"
[ "$(nbdinfo --size "$(nbd_uri second)")" = 8388608 ] || fail "size of second"
[ "$(nbdinfo --size "$(nbd_uri scratch)")" = 2097152 ] || fail "size of scratch"
[ "$(nbdinfo --size "$(nbd_uri)")" = 4194304 ] || fail "the default export is not 'first'"
qemu-io -r -f raw -c 'read -P 0xaa 0 4M' "$(nbd_uri first)" | tee "$tmpdir/r1"
qemu-io -r -f raw -c 'read -P 0xbb 0 8M' "$(nbd_uri second)" | tee "$tmpdir/r2"
qemu-io -r -f raw -c 'read -P 0 0 2M' "$(nbd_uri scratch)" | tee "$tmpdir/r3"
qemu-io -r -f raw -c 'read -P 0xaa 0 4M' "$(nbd_uri)" | tee "$tmpdir/r4"
! grep -q "verification failed" "$tmpdir"/r? || fail "wrong content behind an export name"

# --- writes stay in their export ---------------------------------------------------------------
qemu-io -f raw -c 'write -P 0x11 0 64k' "$(nbd_uri first)"
qemu-io -f raw -c 'write -P 0x22 0 64k' "$(nbd_uri scratch)"
qemu-io -r -f raw -c 'read -P 0x11 0 64k' -c 'read -P 0xaa 64k 64k' "$(nbd_uri first)"
qemu-io -r -f raw -c 'read -P 0xbb 0 8M' "$(nbd_uri second)"
qemu-io -r -f raw -c 'read -P 0x22 0 64k' -c 'read -P 0 64k 64k' "$(nbd_uri scratch)"

# --- two exports side by side, and the odd name ---------------------------------------------------
export SOCK=$sock ODD=$odd
nbdsh_py -n -c - <<'EOF'
import os, nbd
sock = os.environ["SOCK"]
def open_export(name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h
h1, h2, h3 = open_export("first"), open_export("second"), open_export(os.environ["ODD"])
h1.pwrite(b"\x31" * 4096, 8192)
h2.pwrite(b"\x32" * 4096, 8192)
h3.pwrite(b"\x33" * 4096, 8192)
assert h1.pread(4096, 8192) == b"\x31" * 4096
assert h2.pread(4096, 8192) == b"\x32" * 4096
assert h3.pread(4096, 8192) == b"\x33" * 4096 and h3.get_size() == 1 << 20
names = []
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(sock)
h.opt_list(lambda name, desc: names.append(name) or 0)
assert sorted(names) == sorted(["first", "second", "scratch", os.environ["ODD"]]), names
h.opt_abort()
print("side by side ok; exports:", names)
EOF

# --- unknown names are refused -----------------------------------------------------------------
must_fail "$tmpdir/u1" qemu-img info "$(nbd_uri nosuch)"
must_fail "$tmpdir/u2" nbdinfo "$(nbd_uri nosuch)"
must_fail "$tmpdir/u3" qemu-io -r -f raw -c 'read 0 512' "$(nbd_uri FIRST)"   # names are exact
must_fail "$tmpdir/u4" nbdsh_py -u "$(nbd_uri first%20)" -c 'pass'
# The server is unaffected.
qemu-io -r -f raw -c 'read -P 0xbb 64k 64k' "$(nbd_uri second)"

stop_imagenbd
qemu-io -f raw -c 'read -P 0x11 0 8k' -c 'read -P 0x31 8k 4k' -c 'read -P 0x11 12k 52k' "$a" | tee "$tmpdir/final"
qemu-io -f raw -c 'read -P 0xbb 0 8192' -c 'read -P 0x32 8192 4096' "$b" | tee -a "$tmpdir/final"
! grep -q "verification failed" "$tmpdir/final" || fail "export files do not hold their writes"
