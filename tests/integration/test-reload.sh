#!/usr/bin/env bash
# Reloading the configuration file on SIGHUP: a client connected to an unchanged export
# keeps reading and writing across the reload without a single failed request; the added
# export is reachable; the removed one refuses new clients (NBD_REP_ERR_UNKNOWN) while its
# connected client finishes its work, and the export is closed at the next reload after
# that (while the other client still runs); a changed export is reopened for new clients; a
# broken file leaves everything as it was and logs the error; the test-owned
# NOTIFY_SOCKET sees RELOADING=1 then READY=1 for each reload (sd_notify, Type=notify).
source "$(dirname "$0")/functions.sh"
set -x

requires nbdinfo timeout
requires_nbdsh

truncate -s 4M "$tmpdir/keep.img"
mkdir -p "$tmpdir/etc"
cfg=$tmpdir/etc/imagenbd.toml

# write_config EXPORT-TABLES...: the file with these [[export]] tables.
write_config ()
{
    {
        echo '[server]'
        echo 'log-level = "info"'
        printf '%s\n' "${server_extra:-}"
        for e in "$@"; do printf '%s\n' "$e"; done
    } >"$cfg.tmp"
    mv "$cfg.tmp" "$cfg"
}
keep=$'[[export]]\nname = "keep"\nimage = "../keep.img"'
gone=$'[[export]]\nname = "gone"\nimage = "memory:1M"'
chg1=$'[[export]]\nname = "chg"\nimage = "memory:1M"'
chg2=$'[[export]]\nname = "chg"\nimage = "memory:2M"'
new=$'[[export]]\nname = "new"\nimage = "memory:3M"'
write_config "$keep" "$gone" "$chg1"

# --- the notification socket, owned by the test (as systemd's) ------------------------------
notify_out=$tmpdir/notify.out
notify_listen "$sockdir/notify.sock" "$notify_out" 120

NOTIFY_SOCKET=$sockdir/notify.sock start_imagenbd --config "$cfg"
for _ in $(seq 100); do grep -q READY=1 "$notify_out" && break; sleep 0.1; done
must_contain "$notify_out" '^READY=1(\||$)' "no READY=1 at start"

[ "$(nbdinfo --size "$(nbd_uri keep)")" = 4194304 ] || fail "keep not served"
[ "$(nbdinfo --size "$(nbd_uri gone)")" = 1048576 ] || fail "gone not served"
[ "$(nbdinfo --size "$(nbd_uri chg)")" = 1048576 ] || fail "chg not served"

# --- clients that stay connected across the reloads -----------------------------------------
# Each writes a pattern of its own, reads it back, counts rounds in DIR/count-NAME, until
# DIR/stop-NAME appears; then flushes and prints "ok ROUNDS". Any failed request fails it.
cat >"$tmpdir/client.py" <<'EOF'
import os, sys, time
import nbd
name, d = os.environ["NAME"], os.environ["DIR"]
h = nbd.NBD()
h.set_export_name(name)
h.connect_unix(os.environ["SOCK"])
size = h.get_size()
rounds = 0
deadline = time.time() + 120
while not os.path.exists("%s/stop-%s" % (d, name)):
    if time.time() > deadline:
        raise SystemExit("%s: never told to stop" % name)
    off = (rounds * 65536) % size
    data = (b"%s round %06d " % (name.encode(), rounds)) * 4096
    data = data[:65536]
    h.pwrite(data, off)
    assert h.pread(65536, off) == data, "%s: round %d read back differs" % (name, rounds)
    rounds += 1
    with open("%s/count-%s.tmp" % (d, name), "w") as f:
        f.write(str(rounds))
    os.rename("%s/count-%s.tmp" % (d, name), "%s/count-%s" % (d, name))
    time.sleep(0.01)
h.flush()
h.shutdown()
print("ok", rounds)
EOF
declare -a clients=()
kill_clients () { kill_quietly "${clients[@]}"; }
cleanup_fn kill_clients
for name in keep gone; do
    NAME=$name DIR=$tmpdir SOCK=$sock nbdsh_py -n -c - <"$tmpdir/client.py" \
        >"$tmpdir/client-$name.log" 2>&1 &
    clients+=($!)
done

# count NAME: rounds done by that client so far.
count () { cat "$tmpdir/count-$1" 2>/dev/null || echo 0; }
# wait_rounds NAME N: until the client has done more than N rounds (or 30 s).
wait_rounds ()
{
    for _ in $(seq 300); do [ "$(count "$1")" -gt "$2" ] && return; sleep 0.1; done
    cat "$tmpdir/client-$1.log" >&2
    fail "client $1 made no progress past $2 rounds"
}
wait_rounds keep 5
wait_rounds gone 5

# --- reload 1: add new, remove gone, change chg -----------------------------------------
# (and a [server] setting, which waits for a restart)
server_extra='idle-timeout = 300'
write_config "$keep" "$chg2" "$new"
reload_imagenbd 1
must_contain "$imagenbd_log" 'configuration reloaded: 1 added, 1 removed, 1 changed, 1 unchanged'
must_contain "$imagenbd_log" '\[server\] idle-timeout changed: this needs a restart'
[ "$(nbdinfo --size "$(nbd_uri new)")" = 3145728 ] || fail "the added export is not served"
[ "$(nbdinfo --size "$(nbd_uri chg)")" = 2097152 ] || fail "the changed export is not reopened"
[ "$(nbdinfo --size "$(nbd_uri keep)")" = 4194304 ] || fail "keep not served after the reload"
# The removed export refuses new clients with NBD_REP_ERR_UNKNOWN.
must_fail "$tmpdir/gone.out" nbdsh_py -n -c - <<EOF
import nbd
h = nbd.NBD()
h.set_export_name("gone")
h.set_opt_mode(True)
h.connect_unix("$sock")
try:
    h.opt_info()
except nbd.Error as e:
    print("refused:", e.string, e.errno)
    raise SystemExit(1)
print("gone is still served")
EOF
must_contain "$tmpdir/gone.out" 'refused:.*(unknown|ENOENT|No such)' \
    "the removed export was not refused as unknown"
nbdinfo --list "$(nbd_uri keep)" >"$tmpdir/list.out"
! grep -q 'export="gone"' "$tmpdir/list.out" || fail "gone still listed"
grep -q 'export="new"' "$tmpdir/list.out" || fail "new not listed"

# Both connected clients go on: keep (unchanged) and gone (removed, finishes its work).
k=$(count keep) g=$(count gone)
wait_rounds keep $(( k + 5 ))
wait_rounds gone $(( g + 5 ))

# --- reload 2: a broken file changes nothing --------------------------------------------------
cp "$cfg" "$tmpdir/good.toml"
printf '%s\nreadonly = true\n' "$keep" >"$cfg"
reload_imagenbd 2
must_contain "$imagenbd_log" "reload failed, the previous configuration stays: .*imagenbd.toml:4: export 'keep': unknown key 'readonly' \(did you mean 'read-only'\?\)"
[ "$(nbdinfo --size "$(nbd_uri new)")" = 3145728 ] || fail "new lost by a failed reload"
[ "$(nbdinfo --size "$(nbd_uri chg)")" = 2097152 ] || fail "chg lost by a failed reload"
must_fail "$tmpdir/gone2.out" nbdinfo --size "$(nbd_uri gone)"
# The removed export's client finishes; the export is closed at the next reload (the
# keep client, connected since before, still runs: it holds only its own export).
touch "$tmpdir/stop-gone"
wait "${clients[1]}" || fail "the client of the removed export failed"
must_contain "$tmpdir/client-gone.log" '^ok [0-9]+' "gone client"
! grep "export 'gone' (removed by a reload): closed" "$imagenbd_log" ||
    fail "the removed export was closed while its client was connected"
# An export that cannot be opened fails the reload as a whole, too.
write_config "$keep" "$chg2" "$new" $'[[export]]\nname = "broken"\nimage = "../missing.img"'
reload_imagenbd 3
must_contain "$imagenbd_log" "reload failed, the previous configuration stays: export 'broken': .*missing.img"
must_fail "$tmpdir/broken.out" nbdinfo --size "$(nbd_uri broken)"
must_contain "$imagenbd_log" "export 'gone' \(removed by a reload\): closed"
[ "$(nbdinfo --size "$(nbd_uri new)")" = 3145728 ] || fail "new lost by a failed open"

k=$(count keep)
wait_rounds keep $(( k + 5 ))

# --- the clients finish cleanly ---------------------------------------------------------------
touch "$tmpdir/stop-keep"
wait "${clients[0]}" || fail "the client connected to keep across the reloads failed"
must_contain "$tmpdir/client-keep.log" '^ok [0-9]+' "keep client"
clients=()

# Every reload told the service manager: RELOADING=1, then READY=1.
# One line per datagram: its first field only (READY=1, RELOADING=1, STOPPING=1).
cut -d'|' -f1 "$notify_out" >"$tmpdir/notify.first"
[ "$(grep -c '^RELOADING=1$' "$tmpdir/notify.first")" = 3 ] || fail "expected 3 RELOADING=1"
[ "$(grep -c '^READY=1$' "$tmpdir/notify.first")" = 4 ] ||
    fail "expected 4 READY=1 (start + 3 reloads)"
grep -E '^(READY|RELOADING)=1$' "$tmpdir/notify.first" | tr '\n' ' ' >"$tmpdir/notify.seq"
must_contain "$tmpdir/notify.seq" '^READY=1 (RELOADING=1 READY=1 ){3}$' "notify order"

stop_imagenbd
[ "$(grep -c "export 'gone' (removed by a reload): closed" "$imagenbd_log")" = 1 ] ||
    fail "the removed export was not closed exactly once"
