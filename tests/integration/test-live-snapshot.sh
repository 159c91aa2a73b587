#!/usr/bin/env bash
# Live snapshots (issue 6 item 4) in Azurite: a fixed VHD page blob served with --overlay,
# (a) holding the blob's lease (commits go into the base blob), (b) from a snapshot with
# --commit-to (commits go into a clone made by Copy Blob). A writer puts sequence-numbered
# 4 KiB records at random offsets, one at a time, while a commit is taken; the snapshot,
# served read-only by a fresh server, must be the export at one point in time between the
# last write acknowledged before the POST and the first issued after it returned. A second
# commit carries only the blocks changed since the first; after the writers stop, a last
# commit equals the export (qemu-img compare). The export never pauses: the writer's
# longest write during the commit is printed.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/functions.sh"
set -x

requires qemu-img nbdinfo
requires_nbdsh
start_azurite

mib=$(( 1024 * 1024 ))
qemu-img create -f raw "$tmpdir/base.raw" 32M
io raw "$tmpdir/base.raw" 'write -P 0x11 0 1M' 'write -P 0x22 9M 2M' 'write -P 0x33 30M 64k'
qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on "$tmpdir/base.raw" \
    "$tmpdir/base.vhd"
"$IMAGENBD" upload "$tmpdir/base.vhd" "$(az_uri base.vhd)"
"$IMAGENBD" upload "$tmpdir/base.vhd" "$(az_uri gold.vhd)"
admin=unix:$sockdir/admin.sock

# commit NAME: POST a live snapshot, wait until it is done, print its final state (JSON).
commit ()
{
    py3 - "$admin" "$1" <<'EOF'
import json, sys, time, adminhttp
address, name = sys.argv[1], sys.argv[2]
status, _, body = adminhttp.request(address, "POST", "/exports/%s/snapshot" % name)
assert status == 202, (status, body)
while True:
    status, _, body = adminhttp.request(address, "GET", "/exports/%s/snapshot" % name)
    state = json.loads(body)
    if state["state"] != "running":
        break
    time.sleep(0.05)
assert state["state"] == "done", state
print(json.dumps(state))
EOF
}

# commit_state NAME: the state of the export's last commit (JSON).
commit_state ()
{
    py3 - "$admin" "$1" <<'EOF'
import sys, adminhttp
print(adminhttp.request(sys.argv[1], "GET", "/exports/%s/snapshot" % sys.argv[2])[2])
EOF
}

# live_round NAME TARGET_BLOB: writer running, commit mid-stream, check the point in time.
live_round ()
{
    local name=$1 blob=$2 log=$tmpdir/writer-$1.log stop=$tmpdir/stop-$1
    rm -f "$stop"
    py3 "$here/seqwriter.py" write "$(nbd_uri "$name")" "$log" "$stop" 7 &
    local writer=$!
    cleanup_fn kill_quietly $writer
    # Let it write a while.
    for i in $(seq 200); do [ -f "$log" ] && [ "$(wc -l <"$log")" -ge 300 ] && break; sleep 0.05; done
    local before after state
    before=$(tail -n 1 "$log" | cut -d' ' -f1)
    py3 - "$admin" "$name" >"$tmpdir/post-$name.json" <<'EOF'
import sys, adminhttp
status, _, body = adminhttp.request(sys.argv[1], "POST", "/exports/%s/snapshot" % sys.argv[2])
assert status == 202, (status, body)
print(body)
EOF
    # Anything issued from the one after the next is later than the POST's answer.
    after=$(( $(tail -n 1 "$log" | cut -d' ' -f1) + 2 ))
    # A second commit while one runs is refused (409), unless the first is done already.
    py3 - "$admin" "$name" <<'EOF'
import json, sys, adminhttp
status, _, body = adminhttp.request(sys.argv[1], "POST", "/exports/%s/snapshot" % sys.argv[2])
if status != 409:
    assert status == 202 or status == 409, (status, body)
    print("the first commit had ended already; a second started:", body)
EOF
    until state=$(py3 - "$admin" "$name" <<'EOF'
import json, sys, adminhttp
_, _, body = adminhttp.request(sys.argv[1], "GET", "/exports/%s/snapshot" % sys.argv[2])
s = json.loads(body)
print(json.dumps(s))
sys.exit(0 if s["state"] != "running" else 1)
EOF
    ); do sleep 0.05; done
    echo "$state" | jq -e '.state == "done"' || fail "$name: the commit failed: $state"
    local done_at=$(tail -n 1 "$log" | cut -d' ' -f1)
    for i in $(seq 100); do [ "$(wc -l <"$log")" -ge $(( after + 200 )) ] && break; sleep 0.05; done
    touch "$stop"
    wait $writer || fail "$name: the writer failed"
    # The export never paused: the longest write while the commit ran (it ended before
    # the GET that saw it done, so the writes up to the last one logged then cover it).
    awk -v a="$before" -v b="$done_at" '$1 >= a && $1 <= b && $3 > m { m = $3 }
        END { printf "longest write during the commit: %.1f ms\n", m / 1000 }' "$log"
    snapshot=$(echo "$state" | jq -r .snapshot)
    [ -n "$snapshot" ] && [ "$snapshot" != null ] || fail "$name: no snapshot id"
    jq -e '.blocks_total > 0' "$tmpdir/post-$name.json" || fail "$name: nothing captured"
    # The snapshot, served read-only by a fresh server.
    local saved=("$imagenbd_pid" "$imagenbd_log" "$imagenbd_pidfile" "$sock" "$uri")
    start_imagenbd -r snap="$(az_uri "$blob")?snapshot=$snapshot"
    py3 "$here/seqwriter.py" check "$(nbd_uri snap)" "$tmpdir/base.raw" "$log" "$before" \
        "$after" || fail "$name: the snapshot is not the export at one point in time"
    stop_imagenbd
    imagenbd_pid=${saved[0]} imagenbd_log=${saved[1]} imagenbd_pidfile=${saved[2]}
    sock=${saved[3]} uri=${saved[4]}
}

# --- (a) the lease holder commits into the base blob ---------------------------------------
start_imagenbd --admin="$admin" --overlay="$tmpdir/a.cow" a="$(az_uri base.vhd)"
live_round a base.vhd
# Only what changed since the last commit goes with the next one: nothing, then 3 blocks.
commit a >"$tmpdir/a-2.json"
"$IMAGENBD" snapshot --admin="$admin" --json a >"$tmpdir/a-3.json" ||
    fail "imagenbd snapshot --admin failed"
cat "$tmpdir/a-3.json"
jq -e '.state == "done" and .blocks_total == 0' "$tmpdir/a-3.json" ||
    fail "a commit right after another committed blocks again"
nbdsh_py -u "$(nbd_uri a)" -c 'h.pwrite(b"x" * 4096, 0)' -c 'h.pwrite(b"y" * 100, 5 << 20)' \
    -c 'h.zero(65536, 65536)'
snapshot=$("$IMAGENBD" snapshot --admin="$admin" a) || fail "imagenbd snapshot --admin failed"
state=$(commit_state a)
echo "$state" | jq -e --arg s "$snapshot" '.blocks_total == 3 and .snapshot == $s' ||
    fail "the last commit should carry exactly the 3 blocks written since: $state"
# The export, quiet now, equals its last snapshot.
saved=("$imagenbd_pid" "$sock")
start_imagenbd -r snap="$(az_uri base.vhd)?snapshot=$snapshot"
qemu-img compare -f raw -F raw "$(nbd_uri snap)" "nbd+unix:///a?socket=${saved[1]}" ||
    fail "the export differs from its last snapshot"
stop_imagenbd
stop_imagenbd "${saved[0]}"

# --- fio writing with verify during a commit -----------------------------------------------
if command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then
    "$IMAGENBD" upload "$tmpdir/base.vhd" "$(az_uri fio.vhd)"
    start_imagenbd --admin="$admin" --overlay="$tmpdir/f.cow" f="$(az_uri fio.vhd)"
    fio --output-format=json --output="$tmpdir/fio.json" --name=verify --ioengine=nbd \
        --uri="$(nbd_uri f)" --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=8 --size=16M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 \
        --verify_state_save=0 --randrepeat=0 &
    fio_pid=$!
    sleep 1  # fio is writing by now (it has no progress file to poll)
    commit f >"$tmpdir/f.json" || fail "the commit during fio failed"
    wait $fio_pid || { cat "$tmpdir/fio.json"; fail "fio failed while a commit ran"; }
    jq -e '.jobs[0].error == 0' "$tmpdir/fio.json" || fail "fio reported an error"
    jq -r '"fio during a commit: longest write \(.jobs[0].write.clat_ns.max / 1e6) ms, " +
           "\(.jobs[0].write.io_bytes) bytes written and verified"' "$tmpdir/fio.json"
    jq -c . "$tmpdir/f.json"
    stop_imagenbd
fi

# --- (b) a snapshot served read-only, committed into a clone (--commit-to) ------------------
start_imagenbd --admin="$admin" --snapshot=new --overlay="$tmpdir/b.cow" \
    --commit-to="$(az_uri clone.vhd)" b="$(az_uri gold.vhd)"
live_round b clone.vhd
commit b >"$tmpdir/b-2.json"
jq -e '.target | endswith("/clone.vhd")' "$tmpdir/b-2.json" || fail "b: committed elsewhere"
snapshot=$("$IMAGENBD" snapshot --admin="$admin" b) || fail "imagenbd snapshot --admin failed"
commit_state b | jq -e '.blocks_total == 0' || fail "b: a quiet export committed blocks again"
saved=("$imagenbd_pid" "$sock")
start_imagenbd -r snap="$(az_uri clone.vhd)?snapshot=$snapshot"
qemu-img compare -f raw -F raw "$(nbd_uri snap)" "nbd+unix:///b?socket=${saved[1]}" ||
    fail "b: the export differs from its last snapshot in the clone"
stop_imagenbd
stop_imagenbd "${saved[0]}"
# The clone belongs to that base snapshot: another one (a new snapshot of the same blob)
# is refused, naming both.
start_imagenbd --admin="$admin" --snapshot=new --overlay="$tmpdir/c.cow" \
    --commit-to="$(az_uri clone.vhd)" c="$(az_uri gold.vhd)"
nbdsh_py -u "$(nbd_uri c)" -c 'h.pwrite(b"z" * 4096, 0)'
must_fail "$tmpdir/c.out" "$IMAGENBD" snapshot --admin="$admin" c
must_contain "$tmpdir/c.out" "was not cloned from .*gold.vhd@.*cloned from .*gold.vhd@"
# Without --commit-to a read-only base has nowhere to go.
stop_imagenbd
start_imagenbd --admin="$admin" --snapshot=new --overlay="$tmpdir/d.cow" d="$(az_uri gold.vhd)"
must_fail "$tmpdir/d.out" "$IMAGENBD" snapshot --admin="$admin" d
must_contain "$tmpdir/d.out" "commit-to"
stop_imagenbd
