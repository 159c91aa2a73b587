#!/usr/bin/env bash
# TLS with X.509 certificates (--tls-certificates DIR) and the GnuTLS clients: qemu-img
# info/convert (TLS 1.3 and 1.2) and qemu-io write/read through --object tls-creds-x509, nbdinfo and nbdcopy
# with nbds:// URIs and tls-certificates; data written over TLS reads back identically and
# is in the image. With --tls-verify-peer a client certificate from our CA gets in, one
# from another CA and none at all are refused, and the server keeps serving. With
# --allow-identity the certificate subject (RFC 2253) decides: on the list in, another
# subject of the same CA refused with NBD_REP_ERR_POLICY.
source "$(dirname "$0")/functions.sh"
source "$srcdir/tls.sh"
set -x

requires openssl qemu-img qemu-io nbdinfo nbdcopy

make_ca "$tmpdir/ca" "/CN=imagenbd test CA"
make_ca "$tmpdir/other-ca" "/CN=someone else's CA"
make_server_dir "$tmpdir/ca" "$tmpdir/server"
make_client_dir "$tmpdir/ca" "$tmpdir/anon"                                  # no certificate
make_client_dir "$tmpdir/ca" "$tmpdir/client1" "/O=Example/CN=client1"
make_client_dir "$tmpdir/ca" "$tmpdir/client2" "/O=Example/CN=client2"
make_client_dir "$tmpdir/ca" "$tmpdir/foreign" "/O=Example/CN=client1" "$tmpdir/other-ca"

img=$tmpdir/disk.img
head -c $(( 4 * 1024 * 1024 )) /dev/urandom >"$img"

qemu_tls () { # CLIENT-DIR
    echo "tls-creds-x509,id=tls0,endpoint=client,dir=$tmpdir/$1"
}
x509_uri () { # CLIENT-DIR
    echo "nbds://127.0.0.1:$port/disk?tls-certificates=$tmpdir/$1"
}

# --- server certificate only --------------------------------------------------------------
start_imagenbd_tcp --tls=require --tls-certificates="$tmpdir/server" -x disk "$img"
must_contain "$imagenbd_log" "X.509 certificate CN=localhost,O=Example" "server log"

qemu_tls_copy "$(qemu_tls anon)" "$img" TLS
qemu_tls_io "$(qemu_tls anon)" "$img" 0xa7 512 128 TLS

# TLS 1.2 too (GnuTLS priority string without TLS 1.3).
qemu-img info --object "$(qemu_tls anon),priority=NORMAL:-VERS-TLS1.3" \
    --image-opts "$(qemu_nbd)" >/dev/null || fail "qemu-img over TLS 1.2 failed"
must_contain "$imagenbd_log" "TLS established \(TLSv1.2, ECDHE-" "server log"

nbdinfo --json "$(x509_uri anon)" | tee "$tmpdir/nbdinfo.json"
must_contain "$tmpdir/nbdinfo.json" '"TLS": true'
head -c $(( 4 * 1024 * 1024 )) /dev/urandom >"$tmpdir/new.raw"
nbdcopy "$tmpdir/new.raw" "$(x509_uri anon)"
nbdcopy "$(x509_uri anon)" "$tmpdir/back.raw"
cmp "$tmpdir/new.raw" "$tmpdir/back.raw" || fail "nbdcopy over TLS reads back differently"
cmp "$tmpdir/new.raw" "$img" || fail "nbdcopy over TLS: the data is not in the image"

# A client that does not trust our CA gives up (the server sees a failed handshake).
make_client_dir "$tmpdir/other-ca" "$tmpdir/distrust"
must_fail "$tmpdir/distrust.out" nbdinfo "$(x509_uri distrust)"
nbdinfo "$(x509_uri anon)" >/dev/null || fail "the server stopped serving"
stop_imagenbd

# --- --tls-verify-peer: client certificates from our CA only -------------------------------------
start_imagenbd_tcp --tls=require --tls-certificates="$tmpdir/server" --tls-verify-peer \
    -x disk "$img"
nbdinfo "$(x509_uri client1)" >/dev/null || fail "client1's certificate was refused"
qemu-img info --object "$(qemu_tls client2)" --image-opts "$(qemu_nbd)" >/dev/null ||
    fail "qemu-img with client2's certificate was refused"
must_fail "$tmpdir/foreign.out" nbdinfo "$(x509_uri foreign)"
must_fail "$tmpdir/foreign-qemu.out" \
    qemu-img info --object "$(qemu_tls foreign)" --image-opts "$(qemu_nbd)"
must_fail "$tmpdir/anon.out" nbdinfo "$(x509_uri anon)"
nbdinfo "$(x509_uri client1)" >/dev/null || fail "the server stopped serving after the refusals"
must_contain "$imagenbd_log" "TLS established \(TLSv1.3, .*\) with CN=client1,O=Example" \
    "server log"
must_contain "$imagenbd_log" "TLS handshake failed" "server log"
stop_imagenbd

# --- --allow-identity: the certificate subject decides ------------------------------------------
start_imagenbd_tcp --tls=require --tls-certificates="$tmpdir/server" --tls-verify-peer \
    --allow-identity="CN=client1,O=Example" -x disk "$img"
nbdinfo "$(x509_uri client1)" >/dev/null || fail "client1 is on the allow-list but was refused"
qemu-img info --object "$(qemu_tls client1)" --image-opts "$(qemu_nbd)" >/dev/null ||
    fail "qemu-img as client1 was refused"
# libnbd shows the server's message only in its debug output.
must_fail "$tmpdir/client2.out" env LIBNBD_DEBUG=1 nbdinfo "$(x509_uri client2)"
must_contain "$tmpdir/client2.out" \
    "server error message: TLS identity 'CN=client2,O=Example' is not allowed" \
    "the refusal (NBD_REP_ERR_POLICY) names the subject"
must_fail "$tmpdir/client2-qemu.out" \
    qemu-img info --object "$(qemu_tls client2)" --image-opts "$(qemu_nbd)"
nbdinfo "$(x509_uri client1)" >/dev/null || fail "the server stopped serving after refusing client2"
stop_imagenbd
