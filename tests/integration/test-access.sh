#!/usr/bin/env bash
# Access rules (issue 7, item 5): --allow=CIDR refuses clients from other addresses with
# NBD_REP_ERR_POLICY and a message, hides the export from NBD_OPT_LIST and closes
# EXPORT_NAME; loopback has all of 127.0.0.0/8, so a client that binds its source
# address to 127.0.0.2 is "another host". Unix socket clients pass the address rule.
# Dual-stack listeners see IPv4 clients as ::ffff:a.b.c.d, which must match IPv4 blocks.
# After every refusal the server keeps serving the others.
source "$(dirname "$0")/functions.sh"
set -x

requires nbdinfo
requires_nbdsh

# The python helpers every step below uses: a raw client or a libnbd handle whose TCP
# connection comes from a chosen source address.
cat >"$tmpdir/peer.py" <<'EOF'
import socket, struct, sys
import rawnbd
from rawnbd import *
from checks import check, done

def tcp_from(source, port, host="127.0.0.1"):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(10)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s

def raw_from(source, port, host="127.0.0.1"):
    """A rawnbd.Conn whose socket comes from `source`, greeted and fixed-newstyle."""
    c = Conn.__new__(Conn)
    c.sock = tcp_from(source, port, host)
    c.handshake_flags = None
    c.structured = False
    c.handshake()
    return c

def nbd_from(source, port, name="", host="127.0.0.1"):
    import nbd
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_socket(tcp_from(source, port, host).detach())
    return h

def list_names(c):
    replies = c.option(OPT_LIST)
    check(replies[-1][0] == REP_ACK, "LIST ends with ACK (got %s)" % rep_name(replies[-1][0]))
    names = []
    for rtype, data in replies[:-1]:
        (n,) = struct.unpack(">I", data[:4])
        names.append(data[4:4 + n].decode())
    return names

def go_result(c, name):
    """(reply type, message) of NBD_OPT_GO for `name`."""
    replies = c.option(OPT_GO, Conn.info_payload(name))
    rtype, data = replies[-1]
    return rtype, data.decode(errors="replace")
EOF
# py3 with $tmpdir on the path too, for the helpers above.
peer_py ()
{
    PYTHONPATH="$tmpdir" py3 "$@"
}

# A bad block is refused at start-up, with the block the user probably meant.
must_fail "$tmpdir/bad.out" "$IMAGENBD" serve --allow 10.0.0.1/8 -k "$sockdir/bad.sock" memory:1M
must_contain "$tmpdir/bad.out" "--allow: '10.0.0.1/8' .*write 10.0.0.0/8" "host bits message"
must_fail "$tmpdir/bad.out" "$IMAGENBD" serve --allow 10.0.0.0/33 -k "$sockdir/bad.sock" memory:1M
must_contain "$tmpdir/bad.out" "at most 32" "prefix range message"
must_fail "$tmpdir/bad.out" "$IMAGENBD" serve --allow=nonsense -k "$sockdir/bad.sock" memory:1M
must_contain "$tmpdir/bad.out" "'nonsense' is not an address block" "junk message"

# --- --allow 127.0.0.2/32 on a TCP listener plus a Unix socket -------------------------
tport=$(free_port)
start_imagenbd -b 127.0.0.1 -p "$tport" -k "$sockdir/a.sock" --allow 127.0.0.2/32 \
    -x disk memory:1M
log1=$imagenbd_log

# nbdinfo connects from 127.0.0.1: refused. libnbd 1.14 shows the server's reason only in
# its debug output ("server error message: ...").
LIBNBD_DEBUG=1 must_fail "$tmpdir/nbdinfo.out" nbdinfo "nbd://127.0.0.1:$tport/disk"
must_contain "$tmpdir/nbdinfo.out" \
    "server error message: client 127.0.0.1 is not allowed to use export 'disk'" \
    "nbdinfo's error"
must_contain "$log1" "access refused: client 127.0.0.1 is not allowed to use export 'disk'" \
    "server log of the refusal"

peer_py - "$tport" <<'EOF'
import sys
from peer import *
port = int(sys.argv[1])

# From 127.0.0.1: INFO and GO get ERR_POLICY with the reason; LIST shows nothing; the
# client may still ask again (the connection stays usable) and then ABORT.
c = raw_from("127.0.0.1", port)
check(list_names(c) == [], "LIST hides the export from 127.0.0.1")
replies = c.option(OPT_INFO, Conn.info_payload("disk"))
check(replies[-1][0] == REP_ERR_POLICY and len(replies) == 1,
      "INFO from 127.0.0.1 -> ERR_POLICY only (got %r)" % [rep_name(r) for r, _ in replies])
rtype, message = go_result(c, "disk")
check(rtype == REP_ERR_POLICY, "GO from 127.0.0.1 -> ERR_POLICY (got %s)" % rep_name(rtype))
check("not allowed" in message, "ERR_POLICY carries the reason (got %r)" % message)
rtype, message = go_result(c, "")
check(rtype == REP_ERR_POLICY, "GO of the default export -> ERR_POLICY (got %s)" % rep_name(rtype))
rtype, _ = go_result(c, "nonexistent")
check(rtype == REP_ERR_UNKNOWN, "an unknown export is still ERR_UNKNOWN (got %s)" % rep_name(rtype))
c.close()

# EXPORT_NAME cannot carry an error: the server closes.
c = raw_from("127.0.0.1", port)
c.send_option(OPT_EXPORT_NAME, b"disk")
closed, data = c.drain_until_close(timeout=5)
check(closed and data == b"", "EXPORT_NAME from 127.0.0.1: closed without data (got %r)" % data)

# From 127.0.0.2: allowed, listed, and served.
c = raw_from("127.0.0.2", port)
check(list_names(c) == ["disk"], "LIST shows the export to 127.0.0.2")
size, flags = c.go("disk")
check(size == 1 << 20, "GO from 127.0.0.2 -> ACK, 1 MiB")
c.close()
h = nbd_from("127.0.0.2", port, "disk")
h.pwrite(b"allowed!", 4096)
check(h.pread(8, 4096) == b"allowed!", "libnbd from 127.0.0.2 reads and writes")
h.shutdown()
done()
EOF

# Unix socket clients have no address; the socket file's permissions guard them.
[ "$(nbdinfo --size "nbd+unix:///disk?socket=$sockdir/a.sock")" = 1048576 ] ||
    fail "a Unix socket client was refused by the address rule"
stop_imagenbd

# --- --allow 127.0.0.0/8: every loopback client; several --allow add up ------------------
start_imagenbd_tcp --allow 192.0.2.0/24,2001:db8::/32 --allow 127.0.0.0/8 -x disk memory:1M
[ "$(nbdinfo --size "$(nbd_uri disk)")" = 1048576 ] || fail "127.0.0.0/8 did not allow 127.0.0.1"
nbdinfo --list "$(nbd_uri)" >"$tmpdir/list.out"
must_contain "$tmpdir/list.out" "export=.*disk" "nbdinfo --list with 127.0.0.0/8"
stop_imagenbd

# --- IPv6 ------------------------------------------------------------------------------
if peer_py -c 'import socket; s = socket.socket(socket.AF_INET6); s.bind(("::1", 0))' 2>/dev/null
then
    tport=$(free_port)
    start_imagenbd -b ::1 -p "$tport" --allow ::1 -x disk memory:1M
    [ "$(nbdinfo --size "nbd://[::1]:$tport/disk")" = 1048576 ] || fail "::1 was not allowed"
    stop_imagenbd

    tport=$(free_port)
    start_imagenbd -b ::1 -p "$tport" --allow 127.0.0.0/8 -x disk memory:1M
    LIBNBD_DEBUG=1 must_fail "$tmpdir/v6.out" nbdinfo "nbd://[::1]:$tport/disk"
    must_contain "$tmpdir/v6.out" "client ::1 is not allowed" "::1 refused by an IPv4-only list"
    stop_imagenbd

    # Our own listeners are IPv6-only, but a socket unit's ListenStream=PORT (here
    # systemd-socket-activate -l PORT) is dual-stack: IPv4 clients arrive as
    # ::ffff:127.0.0.x and must match IPv4 blocks, and be named in IPv4 form.
    if command -v systemd-socket-activate >/dev/null; then
        tport=$(free_port)
        systemd-socket-activate -l "$tport" "$IMAGENBD" serve --allow 127.0.0.1 \
            -x disk memory:1M </dev/null >"$tmpdir/activate.log" 2>&1 &
        activated_pid=$!
        _imagenbd_pids+=("$activated_pid")
        _imagenbd_logs+=("$tmpdir/activate.log")
        for _ in $(seq 100); do
            grep "Listening on" "$tmpdir/activate.log" >/dev/null && break
            sleep 0.1
        done
        peer_py - "$tport" <<'PY'
import sys
from peer import *
port = int(sys.argv[1])
c = raw_from("127.0.0.1", port)
check(c.go("disk")[0] == 1 << 20, "::ffff:127.0.0.1 matches 127.0.0.1/32")
c.close()
c = raw_from("127.0.0.2", port)
rtype, message = go_result(c, "disk")
check(rtype == REP_ERR_POLICY, "::ffff:127.0.0.2 refused (got %s)" % rep_name(rtype))
check(message == "client 127.0.0.2 is not allowed to use export 'disk'",
      "the refusal names the IPv4 address (got %r)" % message)
c.close()
done()
PY
        kill "$activated_pid"
        wait_imagenbd_exit "$activated_pid"
    fi
fi

# --- two exports with different rules (config file) ---------------------------------------
tport=$(free_port)
cat >"$tmpdir/two.toml" <<EOF
[server]
listen = ["127.0.0.1:$tport"]

[[export]]
name = "public"
image = "memory:1M"

[[export]]
name = "private"
image = "memory:2M"
allow = ["127.0.0.2"]
EOF
"$IMAGENBD" check-config "$tmpdir/two.toml"
# The same parser checks the file's blocks, naming the file and line.
sed 's|"127.0.0.2"|"127.0.0.2/24"|' "$tmpdir/two.toml" >"$tmpdir/bad.toml"
must_fail "$tmpdir/bad-config.out" "$IMAGENBD" check-config "$tmpdir/bad.toml"
must_contain "$tmpdir/bad-config.out" "bad.toml:[0-9]+.*write 127.0.0.0/24" "config allow error"
start_imagenbd -p "$tport" --config "$tmpdir/two.toml"
[ "$(nbdinfo --size "nbd://127.0.0.1:$tport/public")" = 1048576 ] ||
    fail "the export without rules refused 127.0.0.1"
LIBNBD_DEBUG=1 must_fail "$tmpdir/private.out" nbdinfo "nbd://127.0.0.1:$tport/private"
must_contain "$tmpdir/private.out" "not allowed to use export 'private'" "private refusal"
peer_py - "$tport" <<'EOF'
import sys
from peer import *
port = int(sys.argv[1])
c = raw_from("127.0.0.1", port)
check(list_names(c) == ["public"], "127.0.0.1 is shown only the public export")
c.close()
c = raw_from("127.0.0.2", port)
check(sorted(list_names(c)) == ["private", "public"], "127.0.0.2 is shown both exports")
check(c.go("private")[0] == 2 << 20, "127.0.0.2 may use the private export")
c.close()
done()
EOF
stop_imagenbd

# --- TLS identities (PSK user names): --allow-identity=alice -------------------------------
# Keys made at test time with psktool; the client uses the same file with its user name.
# (test-tls-psk.sh and test-tls-x509.sh cover identities over TCP and certificate DNs.)
if command -v psktool >/dev/null; then
    psktool -u alice -p "$tmpdir/keys.psk" >/dev/null
    psktool -u bob -p "$tmpdir/keys.psk" >/dev/null
    start_imagenbd --tls=on --tls-psk="$tmpdir/keys.psk" --allow-identity=alice \
        -x disk memory:1M
    psk_uri ()
    {
        echo "nbds+unix://$1@/disk?socket=$sock&tls-psk-file=$tmpdir/keys.psk"
    }
    [ "$(nbdinfo --size "$(psk_uri alice)")" = 1048576 ] || fail "alice (PSK) was refused"
    LIBNBD_DEBUG=1 must_fail "$tmpdir/bob.out" nbdinfo "$(psk_uri bob)"
    must_contain "$tmpdir/bob.out" "TLS identity 'bob' is not allowed to use export 'disk'" \
        "bob's refusal"
    # --tls=on lets plaintext clients in, but not to an export that names identities.
    LIBNBD_DEBUG=1 must_fail "$tmpdir/plain.out" nbdinfo "nbd+unix:///disk?socket=$sock"
    must_contain "$tmpdir/plain.out" "export 'disk' requires TLS" "plaintext refusal"
    must_contain "$imagenbd_log" "access refused: TLS identity 'bob'" "log of bob's refusal"
    stop_imagenbd
fi
