#!/usr/bin/env bash
# TLS credentials rotated in place and a reload (SIGHUP) with the [tls] settings unchanged:
# new connections get the new server certificate (a client that trusts only the new CA
# gets in, one that trusts only the old CA no longer does), a client connected before
# the reload keeps reading over its session, and a key file that no longer loads fails
# the reload with the file named while the running credentials keep serving.
source "$(dirname "$0")/functions.sh"
source "$srcdir/tls.sh"
set -x

requires openssl nbdinfo
requires_nbdsh

make_ca "$tmpdir/ca1" "/CN=imagenbd test CA 1"
make_ca "$tmpdir/ca2" "/CN=imagenbd test CA 2"
make_server_dir "$tmpdir/ca1" "$tmpdir/server"
make_client_dir "$tmpdir/ca1" "$tmpdir/trusts1"
make_client_dir "$tmpdir/ca2" "$tmpdir/trusts2"

head -c $((1 << 20)) /dev/urandom >"$tmpdir/disk.img"
cat >"$tmpdir/imagenbd.toml" <<EOF
[tls]
mode = "require"
certificates = "$tmpdir/server"
[[export]]
name = "disk"
image = "$tmpdir/disk.img"
EOF
start_imagenbd_tcp --config "$tmpdir/imagenbd.toml"
tls_uri () { echo "nbds://127.0.0.1:$port/disk?tls-certificates=$tmpdir/$1"; }

nbdinfo --size "$(tls_uri trusts1)" || fail "the client trusting CA 1 was refused at start"
must_fail "$tmpdir/before.out" nbdinfo --size "$(tls_uri trusts2)"

# A client connected before the rotation; it reads again after the reload.
fifo=$tmpdir/go
mkfifo "$fifo"
py3 - "$(tls_uri trusts1)" "$tmpdir/disk.img" "$fifo" >"$tmpdir/held.out" 2>&1 <<'EOF' &
import sys, nbd
uri, path, fifo = sys.argv[1:]
data = open(path, "rb").read()
h = nbd.NBD()
h.set_uri_allow_local_file(True)  # tls-certificates= names a directory
h.connect_uri(uri)
assert h.pread(65536, 0) == data[:65536]
print("connected", flush=True)
open(fifo).read()  # until the shell has rotated and reloaded
assert h.pread(65536, 4096) == data[4096:4096 + 65536]
h.shutdown()
print("read after the reload", flush=True)
EOF
held=$!
for _ in $(seq 100); do grep -q connected "$tmpdir/held.out" && break; sleep 0.1; done
must_contain "$tmpdir/held.out" "connected" "the held client"

# Rotate: same paths, a certificate and key from CA 2.
rm "$tmpdir/server/server-cert.pem" "$tmpdir/server/server-key.pem"
make_server_dir "$tmpdir/ca2" "$tmpdir/server"
nbdinfo --size "$(tls_uri trusts1)" || fail "the new files were used before a reload"
reload_imagenbd 1
must_contain "$imagenbd_log" "TLS: credentials read again" "reload log"
nbdinfo --size "$(tls_uri trusts2)" || fail "the client trusting CA 2 was refused after the reload"
must_fail "$tmpdir/after.out" nbdinfo --size "$(tls_uri trusts1)"

echo go >"$fifo"
wait "$held" || { cat "$tmpdir/held.out"; fail "the client connected before the reload failed"; }
must_contain "$tmpdir/held.out" "read after the reload" "the held client"

# A key file that no longer loads: the reload fails naming it, the running credentials stay.
echo "not a key" >"$tmpdir/server/server-key.pem"
reload_imagenbd 2
must_contain "$imagenbd_log" "reload failed.*\[tls\].*server-key.pem" "failed reload log"
must_contain "$imagenbd_log" "the running credentials stay" "failed reload log"
nbdinfo --size "$(tls_uri trusts2)" || fail "a failed reload took the running credentials away"
stop_imagenbd
