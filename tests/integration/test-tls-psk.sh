#!/usr/bin/env bash
# TLS-PSK (--tls-psk FILE, psktool's format) with the GnuTLS clients: qemu-img info (TLS
# 1.3 and 1.2) and convert and qemu-io write/read through
# --object tls-creds-psk, nbdinfo and nbdcopy with
# nbds:// URIs and tls-psk-file; data written over TLS reads back identically and is in
# the image on disk. A wrong key and an unknown user are refused and the server keeps
# serving. --allow-identity lets in the PSK user named and refuses the other
# (NBD_REP_ERR_POLICY).
source "$(dirname "$0")/functions.sh"
source "$srcdir/tls.sh"
set -x

requires psktool openssl qemu-img qemu-io nbdinfo nbdcopy

# Server keys: alice and bob, made by psktool itself (the format we claim to read).
keys=$tmpdir/server.psk
psktool -u alice -p "$keys" </dev/null
psktool -u bob -p "$keys" </dev/null
chmod 600 "$keys"
# Client key files: qemu wants DIR/keys.psk; libnbd takes the file.
mkdir -p "$tmpdir/alice" "$tmpdir/bob" "$tmpdir/wrong" "$tmpdir/mallory"
grep '^alice:' "$keys" >"$tmpdir/alice/keys.psk"
grep '^bob:' "$keys" >"$tmpdir/bob/keys.psk"
make_psk "$tmpdir/wrong/keys.psk" alice          # alice with another key
make_psk "$tmpdir/mallory/keys.psk" mallory      # a user the server does not know

img=$tmpdir/disk.img
head -c $(( 4 * 1024 * 1024 )) /dev/urandom >"$img"

start_imagenbd_tcp --tls=require --tls-psk="$keys" -x disk "$img"
must_contain "$imagenbd_log" "TLS-PSK with 2 users" "server log"
if grep -E "$(cut -d: -f2 "$keys" | head -1)" "$imagenbd_log"; then
    fail "the server logged a key"
fi

qemu_tls () { # USER: --object for qemu-img/qemu-io
    echo "tls-creds-psk,id=tls0,endpoint=client,dir=$tmpdir/$1,username=$1"
}
psk_uri () { # USER [KEYDIR]
    echo "nbds://$1@127.0.0.1:$port/disk?tls-psk-file=$tmpdir/${2:-$1}/keys.psk"
}

# --- qemu-img and qemu-io -------------------------------------------------------------
qemu_tls_copy "$(qemu_tls alice)" "$img" TLS-PSK
# The other user writes: 0x5a at [1M, 1M+256k).
qemu_tls_io "$(qemu_tls bob)" "$img" 0x5a 1024 256 TLS-PSK

# TLS 1.2 too (a GnuTLS priority string without TLS 1.3; qemu adds the PSK key exchanges).
qemu-img info --object "$(qemu_tls alice),priority=NORMAL:-VERS-TLS1.3" \
    --image-opts "$(qemu_nbd)" >/dev/null || fail "qemu-img over TLS 1.2 failed"
must_contain "$imagenbd_log" "TLS established \(TLSv1.2, [A-Z]*-?PSK-.*\) with alice" "server log"
must_contain "$imagenbd_log" "TLS established \(TLSv1.3, .*\) with alice" "server log"

# --- nbdinfo and nbdcopy ------------------------------------------------------------------
nbdinfo --json "$(psk_uri alice)" | tee "$tmpdir/nbdinfo.json"
must_contain "$tmpdir/nbdinfo.json" '"TLS": true'
must_contain "$tmpdir/nbdinfo.json" '"export-size": 4194304'

nbdcopy "$(psk_uri bob)" "$tmpdir/copy.raw"
cmp "$img" "$tmpdir/copy.raw" || fail "nbdcopy from the TLS-PSK export differs from the image"
head -c $(( 1024 * 1024 )) /dev/urandom >"$tmpdir/new.raw"
truncate -s 4M "$tmpdir/new.raw"
nbdcopy "$tmpdir/new.raw" "$(psk_uri alice)"
nbdcopy "$(psk_uri alice)" "$tmpdir/back.raw"
cmp "$tmpdir/new.raw" "$tmpdir/back.raw" || fail "data written by nbdcopy over TLS-PSK reads back differently"
cmp "$tmpdir/new.raw" "$img" || fail "data written by nbdcopy over TLS-PSK is not in the image"

# --- refused: wrong key, unknown user; the server keeps serving -------------------------------
must_fail "$tmpdir/wrong.out" nbdinfo "$(psk_uri alice wrong)"
must_fail "$tmpdir/mallory.out" nbdinfo "$(psk_uri mallory)"
must_fail "$tmpdir/wrong-qemu.out" qemu-img info --object "$(qemu_tls wrong | sed 's/username=wrong/username=alice/')" \
    --image-opts "$(qemu_nbd)"
nbdinfo "$(psk_uri alice)" >/dev/null || fail "the server stopped serving after refusing bad keys"
must_contain "$imagenbd_log" "TLS handshake failed: .*: unknown TLS-PSK user 'mallory'" "server log"
must_contain "$imagenbd_log" "TLS handshake failed: .*: TLS-PSK user 'alice': is the client's key" \
    "server log"
stop_imagenbd

# --- --allow-identity: alice in, bob refused -------------------------------------------------
start_imagenbd_tcp --tls=require --tls-psk="$keys" --allow-identity=alice -x disk "$img"
nbdinfo "$(psk_uri alice)" >/dev/null || fail "alice is on the allow-list but was refused"
# libnbd shows the server's message only in its debug output.
must_fail "$tmpdir/bob.out" env LIBNBD_DEBUG=1 nbdinfo "$(psk_uri bob)"
must_contain "$tmpdir/bob.out" "server error message: TLS identity 'bob' is not allowed" \
    "the refusal (NBD_REP_ERR_POLICY) names the identity"
qemu-img info --object "$(qemu_tls alice)" --image-opts "$(qemu_nbd)" >/dev/null ||
    fail "qemu-img as alice was refused"
must_fail "$tmpdir/bob-qemu.out" qemu-img info --object "$(qemu_tls bob)" --image-opts "$(qemu_nbd)"
nbdinfo "$(psk_uri alice)" >/dev/null || fail "the server stopped serving after refusing bob"
stop_imagenbd
