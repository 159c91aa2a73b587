#!/usr/bin/env bash
# serve --config: one TOML file with exports of every kind (a raw file, a RAM disk, a
# dynamic VHD and a VDI made by qemu-img, a read-only one, one limited to one connection)
# served at once, each read by nbdinfo and qemu-io; relative image paths start at the
# file's directory; images on the command line are added; `check-config` on valid and
# broken files (exit codes, messages with file:line); serve refuses a broken file.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo
requires_nbdsh

mkdir -p "$tmpdir/images" "$tmpdir/etc"
img=$tmpdir/images
truncate -s 4M "$img/raw.img"
qemu-io -f raw -c 'write -P 0xaa 0 4M' "$img/raw.img" >/dev/null
qemu-img create -q -f vpc -o subformat=dynamic "$img/dyn.vhd" 8M
qemu-io -f vpc -c 'write -P 0xbb 1M 1M' "$img/dyn.vhd" >/dev/null
qemu-img create -q -f vdi "$img/disk.vdi" 6M
qemu-io -f vdi -c 'write -P 0xcc 0 64k' "$img/disk.vdi" >/dev/null
truncate -s 2M "$img/ro.img"
qemu-io -f raw -c 'write -P 0xdd 0 2M' "$img/ro.img" >/dev/null

cfg=$tmpdir/etc/imagenbd.toml
cat >"$cfg" <<'EOF'
# Every kind of export at once; image paths relative to this file.
[server]
max-connections = 0
handshake-timeout = 10
log-level = "info"

[[export]]
name = "raw"
image = "../images/raw.img"
description = "a raw file"

[[export]]
name = "ram"
image = "memory:3M"

[[export]]
name = "vhd"
image = "file:../images/dyn.vhd"
format = "vhd"

[[export]]
name = "vdi"
image = "../images/disk.vdi"

[[export]]
name = "ro"
image = "../images/ro.img"
read-only = true

[[export]]
name = "one"
image = "memory:1M"
max-connections = 1
EOF

# --- check-config: valid ---------------------------------------------------------------------
"$IMAGENBD" check-config "$cfg" >"$tmpdir/check.out"
must_contain "$tmpdir/check.out" "^$cfg: OK, 6 exports \(raw, ram, vhd, vdi, ro, one\)$"
"$IMAGENBD" check-config --json "$cfg" >"$tmpdir/check.json"
py3 - "$tmpdir/check.json" "$img" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
assert j["valid"] is True, j
assert [e["name"] for e in j["exports"]] == ["raw", "ram", "vhd", "vdi", "ro", "one"], j
assert j["exports"][0]["image"] == sys.argv[2] + "/raw.img", j   # resolved
assert j["exports"][2]["image"] == "file:" + sys.argv[2] + "/dyn.vhd", j
EOF
# The shipped example is valid: every key parses; only its images are missing here.
must_fail "$tmpdir/example.out" "$IMAGENBD" check-config "$srcdir/../../systemd/imagenbd.toml.example"
must_contain "$tmpdir/example.out" "imagenbd.toml.example: export 'disk': /var/lib/imagenbd/disk.vhd: No such file or directory"
"$IMAGENBD" check-config --help | grep 'Usage: imagenbd check-config' >/dev/null ||
    fail "check-config --help"

# --- serve it: every export with its size and content -------------------------------------
start_imagenbd --config "$cfg" extra=memory:5M
[ "$(nbdinfo --size "$(nbd_uri raw)")" = 4194304 ] || fail "size of raw"
[ "$(nbdinfo --size "$(nbd_uri ram)")" = 3145728 ] || fail "size of ram"
# qemu's VHDs have a CHS-rounded size: what qemu-img says is what we serve.
vhd_size=$(qemu-img info --output=json "$img/dyn.vhd" | py3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
[ "$(nbdinfo --size "$(nbd_uri vhd)")" = "$vhd_size" ] || fail "size of vhd"
[ "$(nbdinfo --size "$(nbd_uri vdi)")" = 6291456 ] || fail "size of vdi"
[ "$(nbdinfo --size "$(nbd_uri ro)")" = 2097152 ] || fail "size of ro"
[ "$(nbdinfo --size "$(nbd_uri one)")" = 1048576 ] || fail "size of one"
[ "$(nbdinfo --size "$(nbd_uri extra)")" = 5242880 ] || fail "size of the command line's export"
# The file's first export is the default one.
[ "$(nbdinfo --size "$(nbd_uri)")" = 4194304 ] || fail "the default export is not 'raw'"
nbdinfo --list "$(nbd_uri raw)" >"$tmpdir/list.out"
must_contain "$tmpdir/list.out" 'description: a raw file'
io raw "$(nbd_uri raw)" 'read -P 0xaa 0 4M'
io raw "$(nbd_uri vhd)" 'read -P 0 0 1M' 'read -P 0xbb 1M 1M' 'read -P 0 2M 6M'
io raw "$(nbd_uri vdi)" 'read -P 0xcc 0 64k' 'read -P 0 64k 64k'
qemu-io -r -f raw -c 'read -P 0xdd 0 2M' "$(nbd_uri ro)" | tee "$tmpdir/ro-read.out"
must_contain "$tmpdir/ro-read.out" 'read 2097152/2097152 bytes'
! grep -q 'verification failed' "$tmpdir/ro-read.out" || fail "wrong content in ro"
# Writes go through to the files (and to the VHD's blocks).
io raw "$(nbd_uri raw)" 'write -P 0x11 0 64k' 'flush'
io raw "$(nbd_uri vhd)" 'write -P 0x22 4M 64k' 'flush'
io raw "$(nbd_uri ram)" 'write -P 0x33 0 64k' 'read -P 0x33 0 64k'
# The read-only export refuses writes.
nbdinfo "$(nbd_uri ro)" >"$tmpdir/ro-info.out"
must_contain "$tmpdir/ro-info.out" 'is_read_only: true'
must_fail "$tmpdir/ro-write.out" nbdsh_py -u "$(nbd_uri ro)" -c 'h.pwrite(b"x" * 512, 0)'
must_contain "$tmpdir/ro-write.out" 'not permitted|read-only|does not support write'
# max-connections = 1: a second client is refused while the first stays connected.
T=$tmpdir nbdsh_py -u "$(nbd_uri one)" -c '
import os, time
open(os.environ["T"] + "/held", "w").close()
while not os.path.exists(os.environ["T"] + "/release"):
    time.sleep(0.05)
h.pread(512, 0)
' &
holder=$!
cleanup_fn kill_quietly "$holder"
for _ in $(seq 100); do [ -e "$tmpdir/held" ] && break; sleep 0.1; done
[ -e "$tmpdir/held" ] || fail "the first client of 'one' did not connect"
must_fail "$tmpdir/one.out" nbdinfo --size "$(nbd_uri one)"
must_contain "$tmpdir/one.out" 'policy' "the second client of 'one' was not refused by policy"
touch "$tmpdir/release"
wait "$holder" || fail "the first client of 'one' failed"
[ "$(nbdinfo --size "$(nbd_uri one)")" = 1048576 ] || fail "'one' refused after its client left"
stop_imagenbd
qemu-io -f raw -r -c 'read -P 0x11 0 64k' "$img/raw.img" | tee "$tmpdir/r1"
qemu-io -f vpc -r -c 'read -P 0x22 4M 64k' "$img/dyn.vhd" | tee "$tmpdir/r2"
! grep -q "verification failed" "$tmpdir/r1" "$tmpdir/r2" || fail "writes did not reach the images"

# --- [server] listen and pid-file from the file (no listener flags on the command line) ---------
tcp_port=$(free_port)
mkdir -p "$tmpdir/etc/run"
# Unix socket paths are limited to 107 bytes: relative to the file if that fits.
nbd_sock=run/nbd.sock sock_path=$tmpdir/etc/run/nbd.sock
if [ ${#sock_path} -gt 100 ]; then nbd_sock=$sockdir/listen.sock sock_path=$sockdir/listen.sock; fi
cat >"$tmpdir/etc/listen.toml" <<EOF
[server]
listen = ["127.0.0.1:$tcp_port", "unix:$nbd_sock"]
pid-file = "run/imagenbd.pid"
[[export]]
name = "disk"
image = "../images/raw.img"
read-only = true
EOF
"$IMAGENBD" serve --config "$tmpdir/etc/listen.toml" </dev/null >"$tmpdir/listen.log" 2>&1 &
listen_pid=$!
cleanup_fn kill_quietly "$listen_pid"
for _ in $(seq 100); do [ -s "$tmpdir/etc/run/imagenbd.pid" ] && break; sleep 0.1; done
[ "$(cat "$tmpdir/etc/run/imagenbd.pid" 2>/dev/null)" = "$listen_pid" ] ||
    { cat "$tmpdir/listen.log"; fail "no pid file at the file's pid-file (relative to it)"; }
[ "$(nbdinfo --size "nbd://127.0.0.1:$tcp_port/disk")" = 4194304 ] ||
    fail "not on the file's TCP address"
[ "$(nbdinfo --size "nbd+unix:///disk?socket=$sock_path")" = 4194304 ] ||
    fail "not on the file's Unix socket (relative to it)"
kill -TERM "$listen_pid"
wait "$listen_pid" || fail "the server with the file's listeners did not stop cleanly"
[ ! -e "$tmpdir/etc/run/imagenbd.pid" ] || fail "pid file left behind"

# --- a duplicate name between the file and the command line ---------------------------------
must_fail "$tmpdir/dup.out" "$IMAGENBD" serve --config "$cfg" -k "$sockdir/x.sock" raw=memory:1M
must_contain "$tmpdir/dup.out" "export name 'raw' is used twice: in $cfg:7 and on the command line"

# --- broken files: check-config says where, serve refuses ------------------------------------
bad=$tmpdir/etc/bad.toml
sed 's/^read-only = true/readonly = true/' "$cfg" >"$bad"
status=0
"$IMAGENBD" check-config "$bad" >"$tmpdir/bad.out" 2>&1 || status=$?
cat "$tmpdir/bad.out"
[ "$status" = 1 ] || fail "check-config on a broken file: exit $status, expected 1"
must_contain "$tmpdir/bad.out" \
    "$bad:28: export 'ro': unknown key 'readonly' \(did you mean 'read-only'\?\)"
status=0
"$IMAGENBD" check-config --json "$bad" >"$tmpdir/bad.json" || status=$?
[ "$status" = 1 ] || fail "check-config --json on a broken file: exit $status"
must_contain "$tmpdir/bad.json" '"valid":false,"error":".*unknown key'
must_fail "$tmpdir/serve-bad.out" "$IMAGENBD" serve --config "$bad" -k "$sockdir/y.sock"
must_contain "$tmpdir/serve-bad.out" "$bad:28: export 'ro': unknown key 'readonly'"

printf '[server]\nthreads = "two"\n' >"$bad"
must_fail "$tmpdir/type.out" "$IMAGENBD" check-config "$bad"
must_contain "$tmpdir/type.out" "$bad:2: \[server\]: threads: expected an integer"

printf '[[export]]\nname = "x"\nimage = "nothere.img"\n' >"$bad"
must_fail "$tmpdir/missing.out" "$IMAGENBD" check-config "$bad"
must_contain "$tmpdir/missing.out" "export 'x': $tmpdir/etc/nothere.img: No such file or directory"

printf '[[export]]\nname = "x"\nimage = "az://a/cont/b"\ncredentials = "AccountKey=abc"\n' >"$bad"
must_fail "$tmpdir/inline.out" "$IMAGENBD" check-config "$bad"
must_contain "$tmpdir/inline.out" "$bad:4: export 'x': credentials: credentials must be env:VAR or file:PATH \(never inline\)"

must_fail "$tmpdir/nofile.out" "$IMAGENBD" check-config "$tmpdir/etc/none.toml"
must_contain "$tmpdir/nofile.out" "cannot read $tmpdir/etc/none.toml"

# Usage errors: exit 2.
for args in "" "--bogus $cfg" "$cfg $cfg"; do
    status=0
    # shellcheck disable=SC2086
    "$IMAGENBD" check-config $args >"$tmpdir/usage.out" 2>&1 || status=$?
    [ "$status" = 2 ] || fail "check-config $args: exit $status, expected 2"
done
