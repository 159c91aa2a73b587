#!/usr/bin/env bash
# Graceful stop.
#  1. SIGTERM while a client keeps 32 writes in flight: the server exits 0 within 10 s,
#     and every write it acknowledged is in the file.
#  2. SIGTERM with idle clients (one in transmission, one that never finished the
#     handshake): the server does not wait for them, it exits 0 within 10 s.
#  3. SIGINT is a graceful stop too.
source "$(dirname "$0")/functions.sh"
set -x

requires_nbdsh

size=$(( 16 * 1024 * 1024 ))
img=$tmpdir/disk.img
truncate -s $size "$img"

# --- 1. in-flight writes ----------------------------------------------------------------
start_imagenbd disk="$img"
export SOCK=$sock SERVER_PID=$imagenbd_pid ACKED=$tmpdir/acked.json
nbdsh_py -n -c - <<'EOF'
import errno, json, os, signal
import nbd

CH = 64 * 1024
N = 16 * 1024 * 1024 // CH
def pattern(k):
    head = b"write %05d " % k
    return head + bytes([k % 251 + 1]) * (CH - len(head))

h = nbd.NBD()
h.connect_unix(os.environ["SOCK"])
inflight = {}            # cookie -> write index
acked, failed = [], {}
at_term = None
nxt = 0
dead = False
while True:
    while not dead and nxt < N and len(inflight) < 32:
        try:
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(nxt))), nxt * CH)
        except nbd.Error as e:
            print("issuing stopped at write %d: %s" % (nxt, e.string))
            dead = True
            break
        inflight[c] = nxt
        nxt += 1
    if not inflight:
        break
    try:
        h.poll(1000)
    except nbd.Error as e:
        print("poll: %s" % e.string)
        dead = True
    for c, k in list(inflight.items()):
        try:
            done = h.aio_command_completed(c)
        except nbd.Error as e:
            failed[k] = e.errnum
            done = True
        if done:
            del inflight[c]
            if k not in failed:
                acked.append(k)
    if h.aio_is_dead() or h.aio_is_closed():
        # Commands still unresolved on a dead handle will never complete.
        for c, k in inflight.items():
            failed[k] = -1
        break
    if at_term is None and len(acked) >= 64:
        at_term = sorted(inflight.values())
        print("SIGTERM with %d writes in flight (%r...)" % (len(at_term), at_term[:4]), flush=True)
        os.kill(int(os.environ["SERVER_PID"]), signal.SIGTERM)

print("acked %d, failed %d (errnos %r)" % (len(acked), len(failed), sorted(set(failed.values()))))
assert at_term is not None, "never reached 64 acknowledged writes"
bad = {k: e for k, e in failed.items() if e not in (errno.ESHUTDOWN, errno.ENOTCONN, -1)}
assert not bad, "writes failed with unexpected errors: %r" % bad
json.dump(acked, open(os.environ["ACKED"], "w"))
EOF
wait_imagenbd_exit "$imagenbd_pid"

py3 - "$img" "$tmpdir/acked.json" <<'EOF'
import json, sys
CH = 64 * 1024
def pattern(k):
    head = b"write %05d " % k
    return head + bytes([k % 251 + 1]) * (CH - len(head))
data = open(sys.argv[1], "rb").read()
acked = json.load(open(sys.argv[2]))
assert len(acked) >= 64, acked
lost = [k for k in acked if data[k * CH:(k + 1) * CH] != pattern(k)]
assert not lost, "acknowledged writes missing from the file: %r" % lost
print("all %d acknowledged writes are in the file" % len(acked))
EOF

# --- 2. idle clients do not hold the server up ----------------------------------------------
start_imagenbd disk="$img"
export SOCK=$sock
nbdsh_py -u "$(nbd_uri disk)" -c '
import time
assert h.pread(16, 0) == b"write 00000 \x01\x01\x01\x01"
open("'"$tmpdir"'/idle-connected", "w").close()
try:
    time.sleep(60)      # the server closes the connection under us; we just sit here
except KeyboardInterrupt:
    pass
' >"$tmpdir/idle.log" 2>&1 &
idle_client=$!
py3 -c '
import os, socket, time
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["SOCK"])
s.recv(18)                       # the greeting; then nothing more from us
open("'"$tmpdir"'/half-connected", "w").close()
s.settimeout(60)
try:
    s.recv(1)                    # returns when the server closes the connection
except OSError:
    pass
' >"$tmpdir/half.log" 2>&1 &
half_client=$!
cleanup_fn kill_quietly "$idle_client" "$half_client"
for (( i = 0; i < 100; ++i )); do
    [ -e "$tmpdir/idle-connected" ] && [ -e "$tmpdir/half-connected" ] && break
    sleep 0.1
done
[ -e "$tmpdir/idle-connected" ] && [ -e "$tmpdir/half-connected" ] ||
    { cat "$tmpdir/idle.log" "$tmpdir/half.log"; fail "idle clients did not connect"; }
stop_imagenbd
# The half-open client saw its connection closed (its recv returned).
for (( i = 0; i < 50; ++i )); do
    kill -0 "$half_client" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$half_client" 2>/dev/null &&
    fail "the server exited but the half-open client's connection was not closed"

# --- 3. SIGINT --------------------------------------------------------------------------------
start_imagenbd disk="$img"
nbdsh_py -u "$(nbd_uri disk)" -c 'h.pwrite(b"\xee" * 4096, 8 << 20)' -c 'h.flush()'
stop_imagenbd "$imagenbd_pid" INT
cmp <(head -c 4096 /dev/zero | tr '\0' '\356') <(dd if="$img" bs=4096 skip=2048 count=1 status=none) ||
    fail "write before SIGINT not in the file"
