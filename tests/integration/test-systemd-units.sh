#!/usr/bin/env bash
# The unit files in systemd/: `systemd-analyze verify` has nothing to say about them,
# `systemd-analyze security` rates imagenbd@.service's exposure at most 2.0 ("OK"), and the
# service's own ExecStart, run the way systemd would run it, works: the socket unit's
# sockets (TCP and Unix) passed with LISTEN_FDS by systemd-socket-activate, readiness and
# the ExecReload (SIGHUP) reported on a test-owned NOTIFY_SOCKET, the config file's
# exports served on both sockets and a reload adding one.
#
# systemd cannot run as PID 1 here (nor in CI), so nothing starts the units for real:
# User=, the sandboxing and the system call filter are only checked statically.
source "$(dirname "$0")/functions.sh"
requires systemd-analyze systemd-socket-activate nbdinfo

units=$(cd "$srcdir/../../systemd" && pwd)
mkdir "$tmpdir/units"
cp "$units/imagenbd@.service" "$units/imagenbd@.socket" "$units/imagenbd.socket" "$tmpdir/units/"
cd "$tmpdir/units"

# verify checks that ExecStart's binary exists: the copy runs the imagenbd under test.
exec_start='ExecStart=/usr/local/bin/imagenbd serve --config /etc/imagenbd/%i.toml'
[ "$(grep -c "^ExecStart=" imagenbd@.service)" = 1 ] || fail "imagenbd@.service: not one ExecStart="
grep -qxF "$exec_start" imagenbd@.service || fail "imagenbd@.service: ExecStart is not '$exec_start'"
sed -i "s|^ExecStart=/usr/local/bin/imagenbd |ExecStart=$IMAGENBD |" imagenbd@.service

# verify FILE...: systemd-analyze verify must succeed and print nothing at all (it only
# warns about unknown keys or sections, so any output counts as a failure).
verify ()
{
    local status=0
    systemd-analyze verify "$@" >"$tmpdir/verify.out" 2>&1 || status=$?
    cat "$tmpdir/verify.out"
    [ "$status" = 0 ] && [ ! -s "$tmpdir/verify.out" ]
}
# The socket's Service=imagenbd@default.service is found in the same directory.
verify ./imagenbd@.service ./imagenbd@.socket ./imagenbd.socket ||
    fail "systemd-analyze verify complained about the unit files"
SYSTEMD_UNIT_PATH=$tmpdir/units: verify imagenbd@disks.service imagenbd@disks.socket ||
    fail "systemd-analyze verify complained about the instance 'disks'"

# The check can fail: a misspelt key, and a missing binary, are reported.
sed 's/^ProtectHome=/ProtectHomes=/' imagenbd@.service >"$tmpdir/typo@.service"
verify "$tmpdir/typo@.service" && fail "verify did not notice an unknown key"
must_contain "$tmpdir/verify.out" "Unknown key 'ProtectHomes'"
sed "s|^ExecStart=$IMAGENBD |ExecStart=$tmpdir/no-such-imagenbd |" imagenbd@.service \
    >"$tmpdir/missing@.service"
verify "$tmpdir/missing@.service" && fail "verify did not notice a missing ExecStart binary"

# Hardening: exposure at most 2.0 of 10 (threshold in tenths). The unit does not ask for
# what imagenbd needs no more than it asks for what it needs.
systemd-analyze security --offline=yes --threshold=20 ./imagenbd@.service \
    >"$tmpdir/security.out" 2>&1 || {
    cat "$tmpdir/security.out"
    fail "systemd-analyze security rates imagenbd@.service above 2.0"
}
tail -n 1 "$tmpdir/security.out"
for setting in NoNewPrivileges=yes ProtectSystem=strict PrivateTmp=yes ProtectHome=yes \
    'CapabilityBoundingSet=' 'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' \
    SystemCallFilter=@system-service User=imagenbd StateDirectory=imagenbd \
    ReadWritePaths=/var/lib/imagenbd RuntimeDirectory=imagenbd Type=notify \
    'ExecReload=/bin/kill -HUP $MAINPID'; do
    grep -qxF "$setting" imagenbd@.service || fail "imagenbd@.service lacks $setting"
done
grep -qxF 'u imagenbd - "imagenbd NBD server" /var/lib/imagenbd' \
    "$units/sysusers.d/imagenbd.conf" || fail "sysusers.d/imagenbd.conf does not make the user"

# ---------------------------------------------------------------------------
# ExecStart as systemd runs it: instance "disks", /etc/imagenbd as $tmpdir/etc.
mkdir "$tmpdir/etc"
command=$(sed -n 's/^ExecStart=//p' imagenbd@.service | sed "s|%i|disks|g; s|/etc/imagenbd/|$tmpdir/etc/|g")
truncate -s 4M "$tmpdir/etc/disk.img"
own_port=$(free_port)
# listen = is ignored under socket activation; own_port must stay closed.
cat >"$tmpdir/etc/disks.toml" <<EOF
[server]
listen = ["127.0.0.1:$own_port"]

[[export]]
name = "disk"
image = "disk.img"

[[export]]
name = "scratch"
image = "memory:1M"
read-only = true
EOF
"$IMAGENBD" check-config "$tmpdir/etc/disks.toml" || fail "check-config refuses the test's config"

# The notification socket, owned by the test as systemd owns it: datagrams, one per line
# ("|" for newlines), until STOPPING=1 or 60 s.
notify_sock=$sockdir/notify.sock
notify_out=$tmpdir/notify.out
notify_listen "$notify_sock" "$notify_out" 60

tcp_port=$(free_port)
unit_sock=$sockdir/disks.sock
# systemd-socket-activate passes on only PATH, TERM, USER, HOME and what -E names.
# shellcheck disable=SC2086 # $command is the unit's ExecStart, split into words as systemd does
systemd-socket-activate -l "127.0.0.1:$tcp_port" -l "$unit_sock" -E "NOTIFY_SOCKET=$notify_sock" \
    $command </dev/null >"$tmpdir/service.log" 2>&1 &
service_pid=$!
_imagenbd_pids+=("$service_pid")
_imagenbd_logs+=("$tmpdir/service.log")
for _ in $(seq 100); do [ -S "$unit_sock" ] && break; sleep 0.1; done
[ -S "$unit_sock" ] || fail "systemd-socket-activate did not listen on $unit_sock"

# The first connection starts the service; both exports on both sockets.
[ "$(nbdinfo --size "nbd://127.0.0.1:$tcp_port/disk")" = $((4 << 20)) ] ||
    fail "export disk over the activated TCP socket"
[ "$(nbdinfo --size "nbd+unix:///scratch?socket=$unit_sock")" = $((1 << 20)) ] ||
    fail "export scratch over the activated Unix socket"
for _ in $(seq 100); do grep -q READY=1 "$notify_out" && break; sleep 0.1; done
must_contain "$notify_out" "^READY=1\|MAINPID=$service_pid\|STATUS=serving on 2 listener" \
    "the service's readiness notification"
if (exec 3<>"/dev/tcp/127.0.0.1/$own_port") 2>/dev/null; then
    fail "the activated service also bound the config file's listen address"
fi

# ExecReload: kill -HUP $MAINPID. A new export appears; RELOADING=1 then READY=1.
cat >>"$tmpdir/etc/disks.toml" <<EOF

[[export]]
name = "added"
image = "memory:2M"
EOF
kill -HUP "$service_pid"
for _ in $(seq 100); do [ "$(grep -c READY=1 "$notify_out")" = 2 ] && break; sleep 0.1; done
must_contain "$notify_out" "^RELOADING=1\|MONOTONIC_USEC=[0-9]+" "RELOADING=1 on SIGHUP"
must_contain "$notify_out" "^READY=1\|STATUS=configuration reloaded" "READY=1 after the reload"
[ "$(nbdinfo --size "nbd+unix:///added?socket=$unit_sock")" = $((2 << 20)) ] ||
    fail "the export added by the reload is not served"

stop_imagenbd "$service_pid"
wait "$notify_listener" || :
must_contain "$notify_out" "^STOPPING=1" "STOPPING=1 on SIGTERM"
