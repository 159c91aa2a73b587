#!/usr/bin/env bash
# --tls=require and --tls=on (protocol.md §16, the spec's FORCEDTLS): in require mode a
# plaintext libnbd client is refused with "TLS required", and a raw client that sends
# LIST, INFO, GO, meta context options, an unknown option and EXPORT_NAME without TLS gets
# ERR_TLS_REQD (EXPORT_NAME: hang-up) and -- reading every byte the server sends -- never
# an export name, description or size. After STARTTLS and the TLS handshake (Python's ssl)
# the same options work, a second STARTTLS is ERR_INVALID, options agreed before TLS
# are forgotten, and DISC ends TLS with a close_notify. Bytes sent after STARTTLS but
# before the TLS handshake close the connection. In on mode plaintext and TLS clients
# both work. A client that drops mid-handshake or mid-transmission is EOF (the server
# does not spin). The server keeps serving after each refusal. The handshake deadline
# covers the TLS handshake, and a server stop ends TLS sessions with close_notify.
# /metrics counts the TLS handshakes.
source "$(dirname "$0")/functions.sh"
source "$srcdir/tls.sh"
set -x

requires openssl nbdinfo python3

make_ca "$tmpdir/ca" "/CN=imagenbd test CA"
make_server_dir "$tmpdir/ca" "$tmpdir/server"
make_client_dir "$tmpdir/ca" "$tmpdir/client"

img=$tmpdir/secret-disk.img
truncate -s 3210240 "$img"   # 0x30FC00: its bytes must not appear before TLS
desc="quite confidential description"

start_imagenbd_tcp --tls=require --tls-certificates="$tmpdir/server" \
    -x secret-disk -D "$desc" "$img"

# --- plaintext libnbd clients are refused ----------------------------------------
# libnbd shows the server's message only in its debug output.
must_fail "$tmpdir/plain.out" env LIBNBD_DEBUG=1 nbdinfo "nbd://127.0.0.1:$port/secret-disk"
must_contain "$tmpdir/plain.out" "server error message: TLS is required" "plaintext nbdinfo"
must_fail "$tmpdir/plain-list.out" nbdinfo --list "nbd://127.0.0.1:$port/"
if grep -E 'secret-disk|confidential|3210240' "$tmpdir/plain-list.out"; then
    fail "nbdinfo --list without TLS learnt something about the export"
fi

# --- TLS libnbd client gets in -------------------------------------------------------
nbdinfo --json "nbds://127.0.0.1:$port/secret-disk?tls-certificates=$tmpdir/client" |
    tee "$tmpdir/tls.json"
must_contain "$tmpdir/tls.json" '"TLS": true'
must_contain "$tmpdir/tls.json" '"export-size": 3210240'
must_contain "$tmpdir/tls.json" "$desc"

# --- raw clients: every byte before TLS, STARTTLS, reset, early data ---------------------
py3 - "$port" "$tmpdir/client/ca-cert.pem" "$desc" <<'EOF'
import socket, ssl, struct, sys
from rawnbd import *
from checks import check, done

port, ca, desc = int(sys.argv[1]), sys.argv[2], sys.argv[3]
secrets = [b"secret-disk", b"secret", desc.encode(), b"confidential",
           struct.pack(">Q", 3210240), struct.pack(">I", 3210240)]

def leaks(data):
    return [s for s in secrets if s in data]

# 1. Everything a plaintext client could ask, pipelined in one send, then read every byte
# until the server hangs up at EXPORT_NAME.
c = Conn(("127.0.0.1", port))
greeting = c.recv_exact(18)
c.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
opts = [
    (OPT_LIST, b""),
    (OPT_INFO, Conn.info_payload("secret-disk", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE))),
    (OPT_INFO, Conn.info_payload("", (INFO_NAME, INFO_DESCRIPTION))),
    (OPT_GO, Conn.info_payload("secret-disk", (INFO_NAME, INFO_DESCRIPTION))),
    (OPT_GO, Conn.info_payload("")),
    (OPT_STRUCTURED_REPLY, b""),
    (OPT_LIST_META_CONTEXT, Conn.meta_payload("secret-disk", [])),
    (OPT_SET_META_CONTEXT, Conn.meta_payload("secret-disk", ["base:allocation"])),
    (0x4242, b"unknown option"),
    (OPT_EXPORT_NAME, b"secret-disk"),
]
for opt, data in opts:
    c.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
closed, data = c.drain_until_close(timeout=5)
c.close()
everything = greeting + data
check(closed, "the server hangs up at EXPORT_NAME before TLS")
check(not leaks(everything), "no export name, description or size before TLS (leaked: %r)"
      % leaks(everything))
# Parse what came: exactly one ERR_TLS_REQD per option except EXPORT_NAME.
replies, pos = [], 0
while pos + 20 <= len(data):
    magic, opt, rtype, length = struct.unpack(">QIII", data[pos:pos + 20])
    check(magic == REPLY_MAGIC, "reply magic at byte %d" % pos)
    replies.append((opt, rtype))
    pos += 20 + length
check(pos == len(data), "nothing but whole option replies (%d of %d bytes)" % (pos, len(data)))
want = [(opt, REP_ERR_TLS_REQD) for opt, _ in opts[:-1]]
check(replies == want, "every option got ERR_TLS_REQD: %r" % [(o, rep_name(t)) for o, t in replies])

# 2. STARTTLS, TLS, then the options work; pre-TLS STRUCTURED_REPLY does not count.
c = Conn(("127.0.0.1", port))
c.handshake()
check(c.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ERR_TLS_REQD, "STRUCTURED_REPLY before TLS")
check(c.option(OPT_STARTTLS, b"junk")[-1][0] == REP_ERR_INVALID, "STARTTLS with data: ERR_INVALID")
r = c.option(OPT_STARTTLS)
check(r == [(REP_ACK, b"")], "STARTTLS: ACK")
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
# Ragged EOFs raise, so the end of the connection below shows the server's close_notify.
c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost", suppress_ragged_eofs=False)
check(c.sock.version() in ("TLSv1.2", "TLSv1.3"), "TLS version %s" % c.sock.version())
names = [d[4:4 + struct.unpack(">I", d[:4])[0]].decode()
         for t, d in c.option(OPT_LIST) if t == REP_SERVER]
check(names == ["secret-disk"], "LIST over TLS names the export: %r" % names)
check(c.option(OPT_STARTTLS)[-1][0] == REP_ERR_INVALID, "second STARTTLS: ERR_INVALID")
# Meta contexts need structured replies negotiated after TLS.
r = c.option(OPT_SET_META_CONTEXT, Conn.meta_payload("secret-disk", ["base:allocation"]))
check(r[-1][0] == REP_ERR_INVALID, "SET_META_CONTEXT without structured replies after TLS")
size, flags = c.go("secret-disk")
check(size == 3210240, "GO over TLS: size %d" % size)
check(not flags & TX_SEND_DF, "no DF: structured replies were not negotiated after TLS")
c.request(CMD_READ, 0, 4096)
err, block = c.simple_reply(read_length=4096)
check(err == 0 and block == bytes(4096), "READ over TLS with simple replies")
c.request(CMD_DISC)
try:
    check(c.sock.recv(1) == b"", "after DISC the server ends TLS with close_notify")
except ssl.SSLEOFError as e:
    check(False, "after DISC the server ends TLS with close_notify (%s)" % e)
c.close()

# 3. Data sent after STARTTLS before the TLS handshake: the connection is closed.
c = Conn(("127.0.0.1", port))
c.handshake()
c.send(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0) + struct.pack(">QII", IHAVEOPT, OPT_LIST, 0))
closed, data = c.drain_until_close(timeout=5)
c.close()
check(closed, "early data after STARTTLS closes the connection")
check(not leaks(data), "nothing leaked after early data")

# 4. A client that drops in the middle of the TLS handshake.
c = Conn(("127.0.0.1", port))
c.handshake()
check(c.option(OPT_STARTTLS) == [(REP_ACK, b"")], "STARTTLS: ACK (then hang up)")
c.send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello
c.close()

# 5. A TLS client that vanishes in the middle of transmission, without close_notify,
# with a READ outstanding.
c = Conn(("127.0.0.1", port))
c.handshake()
check(c.option(OPT_STARTTLS) == [(REP_ACK, b"")], "STARTTLS: ACK (then vanish later)")
c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
c.go("secret-disk")
c.request(CMD_READ, 0, 65536)
c.sock.close()

done()
EOF

# Still serving after all that, and not spinning: the server's CPU time stays small.
nbdinfo "nbds://127.0.0.1:$port/secret-disk?tls-certificates=$tmpdir/client" >/dev/null
sleep 1
cpu=$(awk '{ print $14 + $15 }' "/proc/$imagenbd_pid/stat")
sleep 2
cpu2=$(awk '{ print $14 + $15 }' "/proc/$imagenbd_pid/stat")
[ $(( cpu2 - cpu )) -lt 50 ] || fail "the server used $(( cpu2 - cpu )) ticks in 2 s idle"
must_contain "$imagenbd_log" "data received after NBD_OPT_STARTTLS" "server log"
must_contain "$imagenbd_log" "TLS handshake failed" "server log"
stop_imagenbd

# --- the handshake deadline covers the TLS handshake; a stop ends TLS cleanly -----------------
start_imagenbd_tcp --tls=require --tls-certificates="$tmpdir/server" --handshake-timeout=1 \
    -x secret-disk "$img"
py3 - "$port" "$tmpdir/client/ca-cert.pem" "$tmpdir/ready" >"$tmpdir/idle.out" 2>&1 <<'EOF2' &
import ssl, sys, time
from rawnbd import *
port, ca, ready = int(sys.argv[1]), sys.argv[2], sys.argv[3]
# A client that stalls after STARTTLS is dropped by the handshake deadline.
c = Conn(("127.0.0.1", port))
c.handshake()
assert c.option(OPT_STARTTLS) == [(REP_ACK, b"")]
start = time.monotonic()
assert c.is_closed_by_peer(timeout=5), "a client stalled after STARTTLS was not dropped"
print("stalled client dropped after %.1f s" % (time.monotonic() - start), flush=True)
# An idle TLS client in transmission: the server's stop ends TLS with close_notify.
c = Conn(("127.0.0.1", port), timeout=20)
c.handshake()
assert c.option(OPT_STARTTLS) == [(REP_ACK, b"")]
ctx = ssl.create_default_context(cafile=ca)
ctx.check_hostname = False
c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost", suppress_ragged_eofs=False)
c.go("secret-disk")
open(ready, "w").close()
try:
    data = c.sock.recv(1)
except ssl.SSLEOFError as e:
    sys.exit("the stop did not end TLS with close_notify: %s" % e)
assert data == b"", "unexpected data %r" % data
print("stop: close_notify received", flush=True)
EOF2
idle_pid=$!
for (( i = 0; i < 100; ++i )); do [ -e "$tmpdir/ready" ] && break; sleep 0.1; done
[ -e "$tmpdir/ready" ] || { cat "$tmpdir/idle.out"; fail "the idle TLS client did not connect"; }
stop_imagenbd
wait "$idle_pid" || { cat "$tmpdir/idle.out"; fail "the idle TLS client saw no clean end"; }
cat "$tmpdir/idle.out"
must_contain "$imagenbd_log" "handshake not finished" "server log"

# --- on mode: plaintext and TLS both work ----------------------------------------------
start_imagenbd_tcp --tls=on --tls-certificates="$tmpdir/server" --admin="unix:$sockdir/admin.sock" \
    -x secret-disk "$img"
nbdinfo --json "nbd://127.0.0.1:$port/secret-disk" | tee "$tmpdir/on-plain.json"
must_contain "$tmpdir/on-plain.json" '"TLS": false'
nbdinfo --json "nbds://127.0.0.1:$port/secret-disk?tls-certificates=$tmpdir/client" |
    tee "$tmpdir/on-tls.json"
must_contain "$tmpdir/on-tls.json" '"TLS": true'
nbdinfo --is tls "nbds://127.0.0.1:$port/secret-disk?tls-certificates=$tmpdir/client" ||
    fail "nbdinfo --is tls: not TLS in on mode"
# Two TLS handshakes, one plaintext client: the metric counts the handshakes.
if command -v curl >/dev/null; then
    curl -sf --unix-socket "$sockdir/admin.sock" http://localhost/metrics >"$tmpdir/metrics.txt"
    must_contain "$tmpdir/metrics.txt" '^imagenbd_tls_handshakes_total 2$' "/metrics"
fi
stop_imagenbd

# --- TLS flags need credentials; credentials alone mean on ------------------------------
must_fail "$tmpdir/nocreds.out" "$IMAGENBD" serve --tls=require "$img"
must_contain "$tmpdir/nocreds.out" "tls-certificates"
must_fail "$tmpdir/missing.out" "$IMAGENBD" serve --tls-certificates="$tmpdir/nowhere" \
    -p "$(free_port)" "$img"
must_contain "$tmpdir/missing.out" "$tmpdir/nowhere/server-cert.pem: no such file"
