#!/usr/bin/env bash
# The admin endpoint (serve --admin) and `imagenbd stats`. (1) After a known workload
# (qemu-io: 3 writes of 64 KiB, 5 reads of 4 KiB; a raw client's out-of-range read) the
# Prometheus counters moved by exactly that much, the histogram is cumulative, the
# connection gauges go 1 then 0. (2) /exports JSON, /health, 404, 405, POST /reload without
# --config is 409, ?export= narrows, an unknown export is 404. (3) `imagenbd stats`: the
# table, --json, --prometheus, errors. (4) A stuck admin client (sends half a request) and
# a slow one (pipelines requests without reading answers) block neither the NBD data path
# nor other admin clients. (5) Loopback TCP works, a non-loopback --admin is refused, the
# socket file is 0600 and removed at exit. (6) POST /reload with --config: 200 and the
# new export listed; a broken file is 500 and changes nothing.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io

admin=unix:$sockdir/admin.sock
ah () { py3 "$srcdir/adminhttp.py" "$@"; }
ah_status () { py3 "$srcdir/adminhttp.py" "$@" | sed -n 1p; }

start_imagenbd --admin="$admin" disk=memory:16M other=memory:1M
must_contain "$imagenbd_log" "admin endpoint on $admin"
[ "$(stat -c %a "$sockdir/admin.sock")" = 600 ] || fail "the admin socket is not mode 0600"

# --- 1. Counters after a known workload ---------------------------------------------------
ah "$admin" GET /metrics >"$tmpdir/before.txt"
qemu-io -f raw -c 'write -P 1 0 64k' -c 'write -P 2 64k 64k' -c 'write -P 3 128k 64k' \
    -c 'read -P 1 0 4k' -c 'read -P 1 4k 4k' -c 'read -P 2 64k 4k' -c 'read -P 2 68k 4k' \
    -c 'read -P 3 128k 4k' "$(nbd_uri disk)" >"$tmpdir/qemu-io.out" 2>&1 ||
    { cat "$tmpdir/qemu-io.out"; fail "qemu-io failed"; }

py3 - "$admin" "$sock" <<'EOF'
import sys, time, adminhttp, rawnbd
admin, sock = sys.argv[1:]
m = adminhttp.scrape(admin)
v = lambda name, **l: m.value(name, **l)
d = dict(export="disk")
# No scrape before the workload had a connection: the counters started from 0.
assert v("imagenbd_export_requests_total", command="write", **d) == 3, m.text
assert v("imagenbd_export_bytes_total", command="write", **d) == 196608
assert v("imagenbd_export_requests_total", command="read", **d) == 5
assert v("imagenbd_export_bytes_total", command="read", **d) == 5 * 4096
assert v("imagenbd_export_connections_total", **d) == 1
assert v("imagenbd_export_size_bytes", **d) == 16 << 20
assert v("imagenbd_export_size_bytes", export="other") == 1 << 20
assert v("imagenbd_export_info", format="raw", read_only="false", **d) == 1
assert v("imagenbd_export_requests_total", command="read", export="other") == 0
assert v("imagenbd_exports") == 2
assert v("imagenbd_connections_accepted_total") >= 1
assert sum(v("imagenbd_export_errors_total", errno=e, **d) for e in
           ("EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP",
            "ESHUTDOWN", "other")) == 0
assert m.types["imagenbd_export_request_duration_seconds"] == "histogram"
buckets, total, count = m.histogram("imagenbd_export_request_duration_seconds",
                                    command="write", **d)
assert count == 3 and buckets[-1] == (float("inf"), 3), buckets
assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), "buckets not cumulative"
assert 0 < total < 10, total

# A raw client: connected -> gauges 1; an out-of-range read -> EINVAL, counted.
c = rawnbd.Conn(sock)
c.handshake()
size, _ = c.go("disk")
m = adminhttp.scrape(admin)
assert m.value("imagenbd_export_connections", **d) == 1, m.text
assert m.value("imagenbd_connections") == 1
c.request(rawnbd.CMD_READ, offset=size, length=4096)
error, _ = c.simple_reply()
assert error == 22, error
m = adminhttp.scrape(admin)
assert m.value("imagenbd_export_errors_total", errno="EINVAL", **d) == 1, m.text
assert m.value("imagenbd_export_requests_total", command="read", **d) == 6
assert m.value("imagenbd_export_bytes_total", command="read", **d) == 5 * 4096
discs = m.value("imagenbd_export_requests_total", command="disc", **d)
c.request(rawnbd.CMD_DISC)
c.close()
for _ in range(50):
    m = adminhttp.scrape(admin)
    if m.value("imagenbd_export_connections", **d) == 0 and m.value("imagenbd_connections") == 0:
        break
    time.sleep(0.1)
else:
    raise AssertionError("connection gauges did not go back to 0:\n" + m.text)
assert m.value("imagenbd_export_connections_total", **d) == 2
assert m.value("imagenbd_export_requests_total", command="disc", **d) == discs + 1
EOF

# --- 2. The other resources ---------------------------------------------------------------
py3 - "$admin" <<'EOF'
import json, sys, adminhttp
admin = sys.argv[1]
r = adminhttp.request
status, headers, body = r(admin, "GET", "/exports")
assert status == 200 and headers["content-type"] == "application/json", (status, headers)
exports = json.loads(body)["exports"]
assert [e["name"] for e in exports] == ["disk", "other"], exports
disk = exports[0]
assert disk["image"] == "memory:16M" and disk["format"] == "raw", disk
assert disk["size"] == 16 << 20 and disk["read_only"] is False, disk
assert disk["connections"] == 0 and disk["connections_total"] == 2 and disk["in_flight"] == 0
assert disk["access"] == {"allow": [], "allow_identities": [], "max_connections": 0}, disk
assert set(disk) >= {"name", "description", "image", "format", "size", "read_only",
                     "connections", "connections_total", "in_flight", "access"}

status, _, body = r(admin, "GET", "/exports?export=other")
assert status == 200 and [e["name"] for e in json.loads(body)["exports"]] == ["other"], body
status, _, body = r(admin, "GET", "/metrics?export=nope")
assert status == 404 and json.loads(body) == {"error": "no export 'nope'"}, (status, body)
status, _, body = r(admin, "GET", "/health")
assert status == 200 and body == "ok\n", (status, body)
status, headers, body = r(admin, "GET", "/no/such/thing")
assert status == 404 and "error" in json.loads(body), (status, body)
status, headers, body = r(admin, "DELETE", "/metrics")
assert status == 405 and headers["allow"] == "GET" and "error" in json.loads(body)
status, headers, body = r(admin, "GET", "/reload")
assert status == 405 and headers["allow"] == "POST"
status, _, body = r(admin, "POST", "/reload")
assert status == 409 and "--config" in json.loads(body)["error"], (status, body)
status, _, body = r(admin, "POST", "/reload", body="x" * 70000)
assert status == 413, status
m = adminhttp.scrape(admin)
assert m.value("imagenbd_reloads_total") == 0 and m.value("imagenbd_reload_failures_total") == 0
EOF

# --- 3. imagenbd stats --------------------------------------------------------------------
"$IMAGENBD" stats --admin="$admin" | tee "$tmpdir/stats.txt"
must_contain "$tmpdir/stats.txt" "^export 'disk' \(raw, read-write\): 0 connection\(s\) open \(2 since start, 0 refused\)"
must_contain "$tmpdir/stats.txt" "^  write +3 +196608 +<?[0-9.]+ [mu]?s +<?[0-9.]+ [mu]?s$"
must_contain "$tmpdir/stats.txt" "^  read +6 +20480 "
must_contain "$tmpdir/stats.txt" "^  errors: EINVAL 1$"
must_contain "$tmpdir/stats.txt" "^export 'other'"
"$IMAGENBD" stats --admin="$admin" other >"$tmpdir/stats-other.txt"
grep "export 'disk'" "$tmpdir/stats-other.txt" && fail "stats other showed export disk"
must_contain "$tmpdir/stats-other.txt" "^export 'other'.*1 MiB \(1048576 bytes\)"
must_contain "$tmpdir/stats-other.txt" "no requests yet"
"$IMAGENBD" stats --admin="$admin" --json disk >"$tmpdir/stats.json"
py3 -c '
import json, sys
e = json.load(open(sys.argv[1]))["exports"]
assert [x["name"] for x in e] == ["disk"] and e[0]["connections_total"] == 2, e' "$tmpdir/stats.json"
"$IMAGENBD" stats --admin="$admin" --prometheus >"$tmpdir/stats.prom"
must_contain "$tmpdir/stats.prom" '^imagenbd_export_requests_total\{export="disk",command="write"\} 3$'
must_fail "$tmpdir/stats-nope.out" "$IMAGENBD" stats --admin="$admin" nope
must_contain "$tmpdir/stats-nope.out" "no export 'nope'"
must_fail "$tmpdir/stats-down.out" "$IMAGENBD" stats --admin="unix:$sockdir/none.sock"
must_contain "$tmpdir/stats-down.out" "cannot connect to the admin endpoint unix:$sockdir/none.sock"
status=0; "$IMAGENBD" stats >"$tmpdir/stats-usage.out" 2>&1 || status=$?
[ "$status" = 2 ] || fail "stats without --admin: exit $status, expected 2"
must_contain "$tmpdir/stats-usage.out" "--admin=ADDR is required"
"$IMAGENBD" stats --help | grep -- "--prometheus" >/dev/null || fail "stats --help"

# --- 4. Stuck and slow admin clients ------------------------------------------------------
py3 - "$admin" "$sockdir/admin.sock" <<'EOF' &
import socket, sys, time
path = sys.argv[2]
stuck = socket.socket(socket.AF_UNIX); stuck.connect(path)
stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # and never the rest
slow = socket.socket(socket.AF_UNIX); slow.connect(path)
slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
slow.setblocking(False)
req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
sent = 0
deadline = time.time() + 6
while time.time() < deadline:               # pipeline requests, read no answer
    try:
        sent += slow.send(req * 64)
    except BlockingIOError:
        time.sleep(0.05)
    except OSError:
        break                               # closed by the server's write timeout
open(sys.argv[1].replace("unix:", "") + ".slow-done", "w").write(str(sent))
time.sleep(1)
EOF
clients=$!
sleep 1
start=$(date +%s%N)
for i in 1 2 3; do
    [ "$(ah_status "$admin" GET /health)" = 200 ] ||
        fail "admin endpoint not answering while other clients are stuck"
    qemu-io -f raw -c 'read -P 1 0 64k' "$(nbd_uri disk)" >/dev/null ||
        fail "NBD reads failed while admin clients are stuck"
done
elapsed_ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$elapsed_ms" -lt 4000 ] || fail "requests took $elapsed_ms ms while admin clients were stuck"
wait "$clients"
[ -s "$sockdir/admin.sock.slow-done" ] || fail "the slow client did not run"

# An admin connection left open does not hold up the stop (stop_imagenbd allows 10 s; the
# client would hold it for 30). A simple command, not py3: $! must be python itself.
PATH=/usr/bin:$PATH python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
s.recv(4096)
time.sleep(30)' "$sockdir/admin.sock" &
idle_client=$!
cleanup_fn kill_quietly "$idle_client"
sleep 0.5
stop_imagenbd
kill_quietly "$idle_client"
[ -e "$sockdir/admin.sock" ] && fail "the admin socket file was left behind"

# --- 5. TCP, refusals, stale socket -------------------------------------------------------
aport=$(free_port)
start_imagenbd --admin="127.0.0.1:$aport" memory:1M
must_contain "$imagenbd_log" "admin endpoint on 127.0.0.1:$aport"
[ "$(ah_status "127.0.0.1:$aport" GET /health)" = 200 ] || fail "TCP admin: /health"
"$IMAGENBD" stats --admin="127.0.0.1:$aport" >"$tmpdir/stats-tcp.txt"
must_contain "$tmpdir/stats-tcp.txt" "^export ''"
# What keeps web pages out of an endpoint without authentication: a foreign Host (DNS
# rebinding) or any Origin (a cross-site form) is 403; localhost and [::1] forms pass.
py3 - "$aport" <<'PY' || fail "TCP admin: Host/Origin checks"
import http.client, sys
port = int(sys.argv[1])
def status(headers, method="GET", target="/health"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.putrequest(method, target, skip_host=True)
    for k, v in headers.items():
        c.putheader(k, v)
    c.endheaders()
    r = c.getresponse(); r.read(); c.close()
    return r.status
assert status({"Host": "localhost:%d" % port}) == 200
assert status({"Host": "127.0.0.1"}) == 200
assert status({"Host": "[::1]:%d" % port}) == 200
assert status({"Host": "evil.example:%d" % port}) == 403, "foreign Host passed"
assert status({"Host": "127.0.0.1:%d" % port, "Origin": "http://evil.example"},
              "POST", "/reload") == 403, "cross-origin POST passed"
PY
stop_imagenbd

must_fail "$tmpdir/nonloopback.out" "$IMAGENBD" serve -k "$sockdir/x.sock" --admin="0.0.0.0:$aport" memory:1M
must_contain "$tmpdir/nonloopback.out" "not a loopback address.*no authentication"
must_fail "$tmpdir/badaddr.out" "$IMAGENBD" serve -k "$sockdir/x.sock" --admin="nowhere" memory:1M
must_contain "$tmpdir/badaddr.out" "admin address 'nowhere'"

# --- 6. POST /reload with --config -------------------------------------------------------
# [admin] listen from the file; an added export appears in /exports, reloads_total counts;
# a broken file is 500, counted as a failure, and the exports stay as they were.
cat >"$tmpdir/imagenbd.toml" <<EOF
[admin]
listen = "unix:$sockdir/cfg-admin.sock"

[[export]]
name = "one"
image = "memory:1M"
EOF
start_imagenbd --config "$tmpdir/imagenbd.toml"
cadmin=unix:$sockdir/cfg-admin.sock
cat >>"$tmpdir/imagenbd.toml" <<EOF

[[export]]
name = "two"
image = "memory:2M"
EOF
py3 - "$cadmin" <<'EOF'
import json, sys, adminhttp
admin = sys.argv[1]
status, _, body = adminhttp.request(admin, "POST", "/reload")
assert status == 200, (status, body)
answer = json.loads(body)
assert answer["result"] == "reloaded" and "1 added" in answer["summary"], answer
status, _, body = adminhttp.request(admin, "GET", "/exports")
assert [e["name"] for e in json.loads(body)["exports"]] == ["one", "two"], body
m = adminhttp.scrape(admin)
assert m.value("imagenbd_reloads_total") == 1 and m.value("imagenbd_exports") == 2, m.text
assert m.value("imagenbd_export_size_bytes", export="two") == 2 << 20
EOF
echo 'this is = not [valid' >>"$tmpdir/imagenbd.toml"
py3 - "$cadmin" <<'EOF'
import json, sys, adminhttp
admin = sys.argv[1]
status, _, body = adminhttp.request(admin, "POST", "/reload")
assert status == 500 and "imagenbd.toml" in json.loads(body)["error"], (status, body)
status, _, body = adminhttp.request(admin, "GET", "/exports")
assert [e["name"] for e in json.loads(body)["exports"]] == ["one", "two"], body
m = adminhttp.scrape(admin)
assert m.value("imagenbd_reloads_total") == 1 and m.value("imagenbd_reload_failures_total") == 1
EOF
stop_imagenbd

# A stale socket file (its server gone) is replaced.
py3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$sockdir/stale.sock"
[ -S "$sockdir/stale.sock" ] || fail "could not make a stale socket"
start_imagenbd --admin="unix:$sockdir/stale.sock" memory:1M
[ "$(ah_status "unix:$sockdir/stale.sock" GET /health)" = 200 ] ||
    fail "admin endpoint on a replaced stale socket"
stop_imagenbd
