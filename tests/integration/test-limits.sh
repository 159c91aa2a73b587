#!/usr/bin/env bash
# Limits (issue 7, item 5): --max-connections per export (the next client gets
# NBD_REP_ERR_POLICY; once one leaves, a new one is served), -e/--shared for the whole
# server (the excess connection is closed before the greeting, the others carry on),
# --handshake-timeout (a silent client is dropped: not before, and soon after), the
# option-round limit (a client that haggles forever is cut off and the log says why),
# --idle-timeout (an idle client is disconnected, a busy one is not). After every refusal
# or drop the server keeps serving.
source "$(dirname "$0")/functions.sh"
set -x

requires nbdinfo
requires_nbdsh

cat >"$tmpdir/limits.py" <<'EOF'
import socket, struct, sys, time
import adminhttp
from rawnbd import *
from checks import check, done

def handle(sock, name="disk", messages=None):
    import nbd
    h = nbd.NBD()
    if messages is not None:
        # libnbd 1.14 puts the server's error text only in its debug output.
        h.set_debug_callback(lambda _ctx, msg: messages.append(msg))
        h.set_debug(True)
    h.set_export_name(name)
    h.connect_unix(sock)
    return h

def metric(admin, name, **labels):
    """One sample of the admin endpoint's /metrics (admin: its Unix socket), or None."""
    try:
        return adminhttp.scrape("unix:" + admin).value(name, **labels)
    except KeyError:
        return None

def replies_before_hangup(sock, option, payload, counted, rounds=1025):
    """Sends `rounds` copies of one option in one go and counts the replies of type
    `counted` that arrive before the server hangs up."""
    c = Conn(sock)
    c.handshake()
    c.send(b"".join(struct.pack(">QII", IHAVEOPT, option, len(payload)) + payload
                    for _ in range(rounds)))
    n = 0
    try:
        while True:
            _opt, rtype, _data = c.read_option_reply()
            if rtype == counted:
                n += 1
    except (EOFError, ConnectionResetError):
        pass
    return n

def refused(sock, name="disk"):
    """The server's error text if connecting is refused, else None (the handle is closed)."""
    import nbd
    messages = []
    try:
        h = handle(sock, name, messages)
    except nbd.Error as e:
        said = [m.split("server error message: ", 1)[1] for m in messages
                if "server error message: " in m]
        return said[-1] if said else str(e)
    h.shutdown()
    return None
EOF
# py3 with $tmpdir on the path too, for the helpers above.
lim_py ()
{
    PYTHONPATH="$tmpdir" py3 "$@"
}

# --- --max-connections=2: the third is refused, a fourth after one left is served ---------
admin=$sockdir/admin.sock
start_imagenbd --admin="unix:$admin" --max-connections=2 disk=memory:1M other=memory:2M
lim_py - "$sock" "$admin" <<'EOF'
import sys, time
from limits import *
sock, admin = sys.argv[1], sys.argv[2]
h1 = handle(sock)
h2 = handle(sock)
h1.pwrite(b"one", 0)
err = refused(sock)
check(err is not None and "has its maximum of 2 connections" in err,
      "third connection refused with the reason (got %r)" % err)
# Raw: ERR_POLICY on GO, but the export is still listed (it is only full).
c = Conn(sock)
c.handshake()
replies = c.option(OPT_LIST)
check(len([r for r, _ in replies if r == REP_SERVER]) == 2, "a full export is still listed")
replies = c.option(OPT_GO, Conn.info_payload("disk"))
check(replies[-1][0] == REP_ERR_POLICY, "GO of a full export -> ERR_POLICY (got %s)"
      % rep_name(replies[-1][0]))
# The limit is per export: the other export still takes clients.
check(c.go("other")[0] == 2 << 20, "another export is not limited by this one's count")
c.close()
# The two connected clients are unaffected.
check(h2.pread(3, 0) == b"one", "existing connections keep working")
h1.shutdown()
# The server counts the connection closed once it has drained it: allow a moment.
deadline = time.monotonic() + 5
refusals = 2  # the libnbd client and the raw GO above (LIST counts nothing)
while True:
    err = refused(sock)
    if err is None or time.monotonic() > deadline:
        break
    refusals += 1
    time.sleep(0.1)
check(err is None, "after one client left, a new one is served (last error %r)" % err)
h4 = handle(sock)
check(h4.pread(3, 0) == b"one", "the new client reads")
check(refused(sock) is not None, "and the limit holds again with two connected")
refusals += 1
# Each refused connection counts once, however often it named the export.
n = metric(admin, "imagenbd_export_connections_refused_total", export="disk")
check(n == refusals, "imagenbd_export_connections_refused_total{export=disk} = %s, expected %d"
      % (n, refusals))
n = metric(admin, "imagenbd_export_connections_refused_total", export="other")
check(n == 0, "no refusals counted for the other export (got %s)" % n)
check(metric(admin, "imagenbd_export_connections", export="disk") == 2, "2 connections open")
h4.shutdown()
h2.shutdown()
done()
EOF
must_contain "$imagenbd_log" "Unix socket client: access refused: export 'disk' has its maximum of 2" \
    "log of the connection-limit refusal"
stop_imagenbd

# --- -e/--shared=2: the whole server takes two clients ---------------------------------------
start_imagenbd --admin="unix:$admin" --shared=2 disk=memory:1M other=memory:1M
lim_py - "$sock" "$admin" <<'EOF'
import sys, time
from limits import *
sock, admin = sys.argv[1], sys.argv[2]
h1 = handle(sock, "disk")
h2 = handle(sock, "other")
# The third connection is accepted and closed at once, before the greeting.
c = Conn(sock)
closed, data = c.drain_until_close(timeout=5)
check(closed and data == b"", "excess connection closed without a greeting (got %r)" % data)
h1.pwrite(b"x" * 512, 0)
check(h2.pread(4, 0) == bytes(4) and h1.pread(1, 0) == b"x", "existing clients unaffected")
h1.shutdown()
# A try before the server has seen h1 go is refused too, and counted.
deadline = time.monotonic() + 5
tries = 0
while True:
    err = refused(sock, "disk")
    tries += 1
    if err is None or time.monotonic() > deadline:
        break
    time.sleep(0.1)
check(err is None, "after one client left, a new one is served (last error %r)" % err)
n = metric(admin, "imagenbd_connections_refused_total")
check(n == tries, "imagenbd_connections_refused_total = %s, expected %d" % (n, tries))
h2.shutdown()
done()
EOF
must_contain "$imagenbd_log" "refused: 2 clients already connected \(--shared=2\)" "--shared log"
stop_imagenbd

# --- --handshake-timeout=2: a silent client is dropped after 2 s, not before ---------------
# Also the option-round limit: a client that sends NBD_OPT_LIST forever gets 1024 answers,
# then the server hangs up and logs why.
start_imagenbd --admin="unix:$admin" --handshake-timeout=2 -x disk memory:1M
lim_py - "$sock" "$admin" <<'EOF'
import struct, sys, time
from limits import *
sock, admin = sys.argv[1], sys.argv[2]

# Silent after connecting (not even the client flags).
c = Conn(sock)
start = time.monotonic()
c.recv_exact(18)  # the greeting
closed = c.is_closed_by_peer(timeout=10)
took = time.monotonic() - start
check(closed and 1.9 <= took <= 3.0, "silent client dropped after %.2f s (2 s timeout)" % took)

# Silent after the client flags, and after one option: the deadline covers the whole
# handshake, not each read.
c = Conn(sock)
start = time.monotonic()
c.handshake()
time.sleep(1)
check(c.option(OPT_LIST)[-1][0] == REP_ACK, "an option answered inside the deadline")
closed = c.is_closed_by_peer(timeout=10)
took = time.monotonic() - start
check(closed and 1.9 <= took <= 3.0, "slow client dropped %.2f s after connecting" % took)

# Options forever: the limit is 1024 rounds; each LIST is answered (SERVER + ACK). The
# 1025th is the last one sent, so the server leaves nothing unread and closes with a FIN
# (unread data would make it a RST, which may discard replies still in flight).
acks = replies_before_hangup(sock, OPT_LIST, b"", REP_ACK)
check(acks == 1024, "option rounds answered before the hang-up: %d (limit 1024)" % acks)

# Unknown INFO names, one after another, get the same treatment.
errors = replies_before_hangup(sock, OPT_INFO, Conn.info_payload("no-such-export"),
                               REP_ERR_UNKNOWN)
check(errors == 1024, "unknown-export INFO rounds before the hang-up: %d" % errors)
n = metric(admin, "imagenbd_handshake_timeouts_total")
check(n == 2, "imagenbd_handshake_timeouts_total = %s, expected 2" % n)
n = metric(admin, "imagenbd_handshake_failures_total")
check(n is not None and n >= 2, "imagenbd_handshake_failures_total = %s, at least the 2 cut off" % n)
done()
EOF
must_contain "$imagenbd_log" "handshake not finished after 2000 ms, closing" "handshake timeout log"
must_contain "$imagenbd_log" "too many options \(limit 1024\)" "option-limit log"
[ "$(nbdinfo --size "$(nbd_uri disk)")" = 1048576 ] || fail "not serving after the drops"
stop_imagenbd

# --- --idle-timeout=2: idle clients go, busy ones stay --------------------------------------
start_imagenbd --admin="unix:$admin" --idle-timeout=2 -x disk memory:32M
lim_py - "$sock" "$admin" <<'EOF'
import sys, time
import nbd
from limits import *
sock, admin = sys.argv[1], sys.argv[2]

idle = handle(sock)
busy = handle(sock)
idle.pread(512, 0)
# The busy client sends a read every second for 5 s: more than twice the timeout.
start = time.monotonic()
for i in range(5):
    time.sleep(1)
    busy.pread(512, 0)
check(time.monotonic() - start >= 5, "busy client active for 5 s")
try:
    busy.pread(512, 0)
    check(True, "a client that kept sending requests is still connected")
except nbd.Error as e:
    check(False, "busy client was disconnected: %s" % e)
try:
    idle.pread(512, 0)
    check(False, "an idle client is still connected after 5 s (idle timeout 2 s)")
except nbd.Error as e:
    check(True, "idle client disconnected (%s)" % e)
busy.shutdown()

# When: after about 2 s of silence, not before. A raw client sees the server close.
c = Conn(sock)
c.handshake()
c.go("disk")
start = time.monotonic()
check(not c.is_closed_by_peer(timeout=1.5), "not disconnected 1.5 s into 2 s of idleness")
closed = c.is_closed_by_peer(timeout=5)
took = time.monotonic() - start
check(closed and took <= 3.5, "idle raw client disconnected after %.2f s" % took)

# A request in flight is activity even when the client is slow to take the reply: with
# a small receive buffer, 16 MiB of reads cannot all be written, so the server is busy
# writing while the client sends nothing for 4 s. Then every byte must still arrive.
c = Conn(sock, rcvbuf=16384)
c.handshake()
c.go("disk")
for i in range(16):
    c.request(CMD_READ, offset=i << 20, length=1 << 20, cookie=i)
time.sleep(4)
try:
    for i in range(16):
        error, data = c.simple_reply(cookie=i, read_length=1 << 20)
        assert error == 0 and len(data) == 1 << 20
    check(True, "slow reader with replies pending kept its connection through 4 s")
except (EOFError, ConnectionResetError, AssertionError) as e:
    check(False, "slow reader with replies pending was disconnected: %r" % e)
n = metric(admin, "imagenbd_idle_timeouts_total")
check(n == 2, "imagenbd_idle_timeouts_total = %s, expected 2 (the idle libnbd and raw clients)" % n)
done()
EOF
must_contain "$imagenbd_log" "idle for 2 s, closing the connection" "idle timeout log"
[ "$(nbdinfo --size "$(nbd_uri disk)")" = 33554432 ] || fail "not serving after idle drops"
stop_imagenbd
