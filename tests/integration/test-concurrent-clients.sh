#!/usr/bin/env bash
# 64 nbdsh clients connect to one export at the same time (all 64 are connected before
# any of them writes), then each writes its own 256 KiB range with a pattern naming the
# client and the sector -- half with one 256 KiB write, half with 16 async 16 KiB writes
# in flight -- flushes and reads its range back.  Afterwards every range is verified
# over NBD and in the file.  Then --shared 2: a third simultaneous client is refused,
# and a new one gets in once one of the two has left.
source "$(dirname "$0")/functions.sh"
set -x

requires_nbdsh

n=64
range=$(( 256 * 1024 ))
img=$tmpdir/disk.img
truncate -s $(( n * range )) "$img"
start_imagenbd disk="$img"

cat >"$tmpdir/pattern.py" <<'EOF'
RANGE = 256 * 1024

def pattern(client):
    """RANGE bytes: each 512-byte sector names the client and the sector."""
    out = bytearray()
    for sector in range(RANGE // 512):
        head = b"client %02d sector %04d " % (client, sector)
        out += head + bytes([client + 1]) * (512 - len(head))
    return bytes(out)
EOF

cat >"$tmpdir/client.py" <<'EOF'
import os, sys, time
import nbd
sys.path.insert(0, os.environ["DIR"])
from pattern import RANGE, pattern

i, d = int(os.environ["I"]), os.environ["DIR"]
h = nbd.NBD()
h.connect_unix(os.environ["SOCK"])
open("%s/ready-%d" % (d, i), "w").close()
deadline = time.time() + 120
while not os.path.exists(d + "/go"):
    if time.time() > deadline:
        raise SystemExit("client %d: no go signal" % i)
    time.sleep(0.02)

data, off = pattern(i), i * RANGE
if i % 2 == 0:
    h.pwrite(data, off)
else:
    step = 16 * 1024
    bufs = [nbd.Buffer.from_bytearray(bytearray(data[j:j + step])) for j in range(0, RANGE, step)]
    cookies = [h.aio_pwrite(b, off + k * step) for k, b in enumerate(bufs)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        h.aio_command_completed(c)        # raises if the write failed
h.flush()
got = h.pread(RANGE, off)
assert got == data, "client %d: read back differs" % i
h.shutdown()
print("client %d ok" % i)
EOF

export SOCK=$sock DIR=$tmpdir
declare -a clients=()
kill_clients () { kill_quietly "${clients[@]}"; }
cleanup_fn kill_clients
for (( i = 0; i < n; ++i )); do
    I=$i nbdsh_py -n -c - <"$tmpdir/client.py" >"$tmpdir/client-$i.log" 2>&1 &
    clients+=($!)
done

# Barrier: wait until all 64 are connected at once.
for (( t = 0; t < 600; ++t )); do
    ready=$(find "$tmpdir" -maxdepth 1 -name 'ready-*' | wc -l)
    [ "$ready" -eq $n ] && break
    for (( i = 0; i < n; ++i )); do
        if [ ! -e "$tmpdir/ready-$i" ] && ! kill -0 "${clients[i]}" 2>/dev/null; then
            cat "$tmpdir/client-$i.log"
            fail "client $i exited before connecting (server refused a concurrent client?)"
        fi
    done
    sleep 0.1
done
[ "$ready" -eq $n ] || fail "only $ready of $n clients managed to connect at the same time"
touch "$tmpdir/go"

failed=0
for (( i = 0; i < n; ++i )); do
    if ! wait "${clients[i]}"; then
        echo "--- client $i:"; cat "$tmpdir/client-$i.log"
        failed=$(( failed + 1 ))
    fi
done
[ $failed -eq 0 ] || fail "$failed of $n clients failed"

verify='
import os, sys
sys.path.insert(0, os.environ["DIR"])
from pattern import RANGE, pattern
def check(read):
    bad = [i for i in range('$n') if read(i * RANGE, RANGE) != pattern(i)]
    assert not bad, "ranges of clients %r are wrong" % bad
    print("all %d ranges verified" % '$n')
'
# Over NBD, from a fresh connection...
nbdsh_py -u "$(nbd_uri disk)" -c "$verify" -c 'check(lambda off, n: h.pread(n, off))'
stop_imagenbd
# ...and in the file.
py3 -c "$verify"'
f = open(sys.argv[1], "rb")
check(lambda off, n: os.pread(f.fileno(), n, off))' "$img"

# --- --shared 2 ----------------------------------------------------------------------------
start_imagenbd -e 2 memory:1M
export SOCK=$sock
nbdsh_py -n -c - <<'EOF'
import os, time
import nbd
def connect():
    h = nbd.NBD()
    h.connect_unix(os.environ["SOCK"])
    return h
h1, h2 = connect(), connect()
h1.pwrite(b"\x01" * 512, 0)
try:
    connect()
    raise AssertionError("a third client got in despite --shared 2")
except nbd.Error as e:
    print("third client refused:", e.string)
assert h2.pread(512, 0) == b"\x01" * 512, "the two admitted clients are unaffected"
h1.shutdown()
deadline = time.time() + 5
while True:
    try:
        h3 = connect()
        break
    except nbd.Error as e:
        if time.time() > deadline:
            raise AssertionError("no new client admitted after one of two left: " + e.string)
        time.sleep(0.05)
assert h3.pread(512, 0) == b"\x01" * 512
h3.shutdown()
h2.shutdown()
print("--shared 2 enforced")
EOF
stop_imagenbd
