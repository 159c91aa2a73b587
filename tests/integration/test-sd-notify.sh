#!/usr/bin/env bash
# Type=notify readiness: with NOTIFY_SOCKET set, imagenbd sends READY=1 (with MAINPID and a
# STATUS) once it listens, and STOPPING=1 when a stop signal arrives, as sd_notify(3) does.
# The test owns the notification socket (a path, then an abstract "@name"), as systemd would.
source "$(dirname "$0")/functions.sh"
requires timeout nbdinfo

for name in "$sockdir/notify.sock" "@imagenbd-test-$$"; do
    out=$tmpdir/notify-$(echo "$name" | tr -c 'a-z0-9\n' _).out
    notify_listen "$name" "$out" 30
    NOTIFY_SOCKET=$name start_imagenbd -x disk memory:1M
    pid=$imagenbd_pid
    for _ in $(seq 100); do grep -q READY=1 "$out" && break; sleep 0.1; done
    must_contain "$out" "^READY=1\|MAINPID=$pid\|STATUS=serving on 1 listener" \
        "$name: no READY=1 with MAINPID=$pid"
    # Ready means ready: a client gets served at once.
    [ "$(nbdinfo --size "$(nbd_uri disk)")" = 1048576 ] || fail "$name: not serving when ready"
    stop_imagenbd
    wait "$notify_listener" || true
    must_contain "$out" "^STOPPING=1\|STATUS=stopping" "$name: no STOPPING=1 on SIGTERM"
    [ "$(grep -c READY=1 "$out")" = 1 ] || fail "$name: READY=1 sent more than once"
done

# Without NOTIFY_SOCKET nothing is sent and nothing fails; with a bad one, a warning only.
NOTIFY_SOCKET=relative/path start_imagenbd -x disk memory:1M
[ "$(nbdinfo --size "$(nbd_uri disk)")" = 1048576 ] || fail "bad NOTIFY_SOCKET broke serving"
stop_imagenbd
must_contain "$imagenbd_log" "NOTIFY_SOCKET 'relative/path' is not a socket path" \
    "bad NOTIFY_SOCKET: no warning"
