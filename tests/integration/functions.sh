# imagenbd integration tests: common functions, sourced by every test-*.sh.
#
# A test looks like this (nbdkit's tests/functions.sh pattern):
#
#   #!/usr/bin/env bash
#   source "$(dirname "$0")/functions.sh"
#   set -x
#   requires qemu-img nbdinfo
#   start_imagenbd -x disk "$tmpdir/disk.img"      # Unix socket in $tmpdir
#   qemu-img info "$(nbd_uri disk)"
#   stop_imagenbd                                    # SIGTERM, must exit 0
#
# Environment:
#   IMAGENBD               the imagenbd binary (CTest sets it; default: build/server/imagenbd)
#   IMAGENBD_TEST_TMP      parent directory for the per-test temporary directory
#   IMAGENBD_REQUIRE_ALL=1 a missing client is a failure (exit 1), not a skip (exit 77)
#   IMAGENBD_TEST_VERBOSE=1 start the server with -v
#
# Exit codes: 0 pass, 1 fail, 77 skip.  On failure the server logs are printed and the
# temporary directory is kept.

set -e -o pipefail

test_name=$(basename "$0" .sh)
srcdir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---------------------------------------------------------------------------
# Reporting

# fail MESSAGE...: report a failure and exit 1 (the EXIT trap prints the server logs).
fail ()
{
    echo "$test_name: FAIL: $*" >&2
    exit 1
}

# skip REASON...: exit 77, or fail when IMAGENBD_REQUIRE_ALL=1 (CI must not skip).
skip ()
{
    if [ "${IMAGENBD_REQUIRE_ALL:-0}" = 1 ]; then
        echo "$test_name: FAIL: $* (IMAGENBD_REQUIRE_ALL=1 forbids skipping)" >&2
        exit 1
    fi
    echo "$test_name: SKIP: $*" >&2
    exit 77
}

# requires CMD...: skip unless every command is on $PATH.
requires ()
{
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || skip "required command '$c' not found"
    done
}

# requires_run CMD [ARGS...]: skip unless the command (or shell function) succeeds.
requires_run ()
{
    "$@" </dev/null >/dev/null 2>&1 || skip "required check '$*' failed"
}

# requires_nbdsh: nbdsh plus the python3-libnbd module it runs on.
requires_nbdsh ()
{
    requires nbdsh
    requires_run nbdsh_py -n -c 'import nbd'
}

# ---------------------------------------------------------------------------
# Clients

# nbdsh_py ARGS...: nbdsh under the system python3 (python3-libnbd is installed for
# /usr/bin/python3; a pyenv python3 earlier on $PATH would shadow it).
nbdsh_py ()
{
    PATH=/usr/bin:$PATH nbdsh "$@"
}

# py3 ARGS...: the system python3, with this directory on sys.path (for rawnbd.py).
py3 ()
{
    PATH=/usr/bin:$PATH PYTHONDONTWRITEBYTECODE=1 \
        PYTHONPATH="$srcdir${PYTHONPATH:+:$PYTHONPATH}" python3 "$@"
}

# must_fail OUTFILE CMD [ARGS...]: run CMD, expect a non-zero exit status; its stdout
# and stderr go to OUTFILE (and are echoed for the test log).
must_fail ()
{
    local out=$1 status=0
    shift
    "$@" >"$out" 2>&1 || status=$?
    cat "$out"
    if [ "$status" -eq 0 ]; then
        fail "expected failure, but '$*' succeeded"
    fi
}

# must_contain FILE REGEX [WHAT]: FILE must match the extended regular expression.
must_contain ()
{
    grep -Eq -- "$2" "$1" || {
        echo "--- $1:" >&2; cat "$1" >&2
        fail "${3:-$1} does not match /$2/"
    }
}

# free_port: print a TCP port on 127.0.0.1 that is free right now.
free_port ()
{
    py3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

# fs_supports_holes DIR: true if files in DIR can be sparse (SEEK_HOLE finds a hole).
fs_supports_holes ()
{
    py3 - "$1" <<'EOF'
import os, sys, tempfile
fd, path = tempfile.mkstemp(dir=sys.argv[1])
try:
    os.ftruncate(fd, 8 << 20)
    os.pwrite(fd, b"x" * 65536, 4 << 20)
    os.fsync(fd)
    ok = os.lseek(fd, 0, os.SEEK_DATA) == 4 << 20
finally:
    os.close(fd)
    os.unlink(path)
sys.exit(0 if ok else 1)
EOF
}

# ---------------------------------------------------------------------------
# The binary under test

if [ -z "${IMAGENBD:-}" ]; then
    IMAGENBD=$(cd "$srcdir/../.." && pwd)/build/server/imagenbd
fi
case "$IMAGENBD" in
    /*) ;;
    */*) IMAGENBD=$(pwd)/$IMAGENBD ;;
esac
if [ ! -x "$IMAGENBD" ]; then
    echo "$test_name: FAIL: imagenbd binary not found or not executable: $IMAGENBD" \
         "(build it, or set IMAGENBD=/path/to/imagenbd)" >&2
    exit 1
fi

# ---------------------------------------------------------------------------
# Temporary directory and cleanup

_tmp_parent=${IMAGENBD_TEST_TMP:-${TMPDIR:-/tmp}}
mkdir -p "$_tmp_parent"
tmpdir=$(mktemp -d "$_tmp_parent/$test_name.XXXXXX")
# Unix socket paths are limited to 107 bytes; fall back to /tmp for deep build trees.
if [ ${#tmpdir} -le 80 ]; then
    sockdir=$tmpdir
else
    sockdir=$(mktemp -d /tmp/imagenbd-sock.XXXXXX)
fi

# Run in the temporary directory, so that nothing a client drops in its working
# directory (fio's verify state, for one) lands in the source tree.
cd "$tmpdir"

declare -a _cleanup_hooks=()
declare -a _imagenbd_pids=()      # every server started by this test
declare -a _imagenbd_logs=()
declare -A _imagenbd_stopped=()   # pid -> 1 once stop_imagenbd reaped it

# cleanup_fn CMD [ARGS...]: run CMD when the test exits, for any reason (last in, first run).
cleanup_fn ()
{
    _cleanup_hooks+=("$(printf '%q ' "$@")")
}

# kill_quietly PID...: SIGTERM processes that may already be gone (for cleanup_fn).
kill_quietly ()
{
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || :; done
}

# dump_imagenbd_log [LOGFILE]: print a server log (default: every server of this test).
dump_imagenbd_log ()
{
    local log
    local -a logs=("$@")
    [ $# -eq 0 ] && logs=("${_imagenbd_logs[@]}")
    for log in "${logs[@]}"; do
        echo "===== imagenbd log: $log =====" >&2
        if [ -s "$log" ]; then tail -n 300 "$log" >&2; else echo "(empty)" >&2; fi
        echo "===== end of $log =====" >&2
    done
}

_run_cleanup ()
{
    local status=$? i pid
    set +e +x
    trap '' INT QUIT TERM EXIT
    for (( i = ${#_cleanup_hooks[@]} - 1; i >= 0; --i )); do
        eval "${_cleanup_hooks[i]}"
    done
    for pid in "${_imagenbd_pids[@]}"; do
        [ -n "${_imagenbd_stopped[$pid]:-}" ] && continue
        if _alive "$pid"; then
            kill -TERM "$pid" 2>/dev/null
            i=0
            while _alive "$pid" && [ "$i" -lt 50 ]; do
                sleep 0.1
                i=$(( i + 1 ))
            done
            _alive "$pid" && kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    if [ "$status" -ne 0 ] && [ "$status" -ne 77 ]; then
        dump_imagenbd_log
        echo "$test_name: exit status $status; keeping $tmpdir" >&2
    else
        rm -rf "$tmpdir"
    fi
    [ "$sockdir" != "$tmpdir" ] && rm -rf "$sockdir"
    exit "$status"
}
trap _run_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 131' QUIT

# _alive PID: the process exists and is not a zombie.
_alive ()
{
    local state
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# ---------------------------------------------------------------------------
# Starting and stopping the server

# The subcommand start_imagenbd uses ("serve"; test-cli.sh also tries none).
imagenbd_subcommand=serve

# start_imagenbd [SERVE-ARGS...]: run "$IMAGENBD serve --pid-file F SERVE-ARGS" in the
# background and wait (up to 10 s) until it has written its pidfile.  Unless the
# arguments choose a listener (-k/--socket, -p/--port), a Unix socket in $sockdir is
# added.  Sets:
#   imagenbd_pid  imagenbd_log  imagenbd_pidfile
#   sock          the Unix socket ("" if the caller chose the listener)
#   port          "" (start_imagenbd_tcp sets it)
#   uri           URI of the default export; see also nbd_uri NAME
start_imagenbd ()
{
    local n=$(( ${#_imagenbd_pids[@]} + 1 )) a own_listener= i content
    local -a listen=() verbose=()
    for a in "$@"; do
        case "$a" in
            -k|--socket|--socket=*|-p|--port|--port=*) own_listener=1 ;;
        esac
    done
    sock= port= uri=
    if [ -z "$own_listener" ]; then
        sock=$sockdir/imagenbd-$n.sock
        listen=(-k "$sock")
        uri="nbd+unix:///?socket=$sock"
    fi
    [ "${IMAGENBD_TEST_VERBOSE:-0}" = 1 ] && verbose=(-v)
    imagenbd_pidfile=$tmpdir/imagenbd-$n.pid
    imagenbd_log=$tmpdir/imagenbd-$n.log
    rm -f "$imagenbd_pidfile"

    echo "$test_name: starting: $IMAGENBD $imagenbd_subcommand --pid-file $imagenbd_pidfile ${listen[*]} ${verbose[*]} $*" >&2
    "$IMAGENBD" $imagenbd_subcommand --pid-file "$imagenbd_pidfile" "${listen[@]}" "${verbose[@]}" "$@" \
        </dev/null >"$imagenbd_log" 2>&1 &
    imagenbd_pid=$!
    _imagenbd_pids+=("$imagenbd_pid")
    _imagenbd_logs+=("$imagenbd_log")

    for (( i = 0; i < 100; ++i )); do
        [ -s "$imagenbd_pidfile" ] && break
        if ! _alive "$imagenbd_pid"; then
            local status=0
            wait "$imagenbd_pid" || status=$?
            _imagenbd_stopped[$imagenbd_pid]=1
            fail "imagenbd exited (status $status) before writing its pidfile; args: $*"
        fi
        sleep 0.1
    done
    [ -s "$imagenbd_pidfile" ] ||
        fail "imagenbd did not write its pidfile $imagenbd_pidfile within 10 s"
    # The pidfile must hold our child's pid (allow for a write in progress).
    for (( i = 0; i < 10; ++i )); do
        content=$(tr -d '[:space:]' <"$imagenbd_pidfile")
        [ "$content" = "$imagenbd_pid" ] && break
        sleep 0.1
    done
    [ "$content" = "$imagenbd_pid" ] ||
        fail "pidfile holds '$content', expected the server pid $imagenbd_pid"
    if [ -n "$sock" ] && [ ! -S "$sock" ]; then
        fail "pidfile written but no Unix socket at $sock (pidfile must mean 'listening')"
    fi
}

# start_imagenbd_tcp [SERVE-ARGS...]: like start_imagenbd, on 127.0.0.1 and a free TCP
# port.  Sets port and uri=nbd://127.0.0.1:PORT/.
start_imagenbd_tcp ()
{
    local p
    p=$(free_port)
    start_imagenbd -b 127.0.0.1 -p "$p" "$@"
    port=$p
    uri="nbd://127.0.0.1:$port/"
}

# nbd_uri [NAME]: URI of export NAME on the most recently started server.
nbd_uri ()
{
    local name=${1:-}
    if [ -n "$sock" ]; then
        echo "nbd+unix:///$name?socket=$sock"
    elif [ -n "$port" ]; then
        echo "nbd://127.0.0.1:$port/$name"
    else
        fail "nbd_uri: the server was started with a caller-chosen listener"
    fi
}

# stop_imagenbd [PID [SIGNAL]]: send SIGTERM (or SIGNAL) to the server (default: the
# latest) and require a graceful exit -- see wait_imagenbd_exit.
stop_imagenbd ()
{
    local pid=${1:-$imagenbd_pid} sig=${2:-TERM} status=0
    [ -n "${_imagenbd_stopped[$pid]:-}" ] && fail "stop_imagenbd: $pid was already stopped"
    _alive "$pid" || {
        wait "$pid" || status=$?
        _imagenbd_stopped[$pid]=1
        fail "imagenbd (pid $pid) died before it was stopped (exit status $status)"
    }
    kill "-$sig" "$pid"
    wait_imagenbd_exit "$pid"
}

# wait_imagenbd_exit [PID [SECONDS]]: wait (default 10 s) for a server that was told to
# stop, and require exit status 0 -- a graceful stop is part of what we test.
wait_imagenbd_exit ()
{
    local pid=${1:-$imagenbd_pid} secs=${2:-10} i status=0
    for (( i = 0; i < secs * 10; ++i )); do
        _alive "$pid" || break
        sleep 0.1
    done
    if _alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || :
        wait "$pid" 2>/dev/null || :
        _imagenbd_stopped[$pid]=1
        fail "imagenbd (pid $pid) did not exit within $secs s of being told to stop"
    fi
    wait "$pid" || status=$?
    _imagenbd_stopped[$pid]=1
    [ "$status" -eq 0 ] || fail "imagenbd (pid $pid) exited with status $status, expected 0"
}

# reload_imagenbd N [PID]: SIGHUP the server (default $imagenbd_pid) and wait until its
# log has the outcome of the Nth reload ("configuration reloaded" or "reload failed").
reload_imagenbd ()
{
    local n=$1 pid=${2:-$imagenbd_pid} i
    kill -HUP "$pid"
    for (( i = 0; i < 150; ++i )); do
        [ "$(grep -Ec 'configuration reloaded|reload failed' "$imagenbd_log")" -ge "$n" ] && return
        sleep 0.1
    done
    fail "reload $n: no outcome in the log"
}

# notify_listen SOCKET OUT [SECONDS]: the service manager's notification socket, owned by
# the test as systemd would own it. Binds SOCKET (a path, or "@name" for an abstract one)
# and writes the sd_notify datagrams that arrive into OUT, one line each with "|" for
# their newlines (READY=1|MAINPID=...|STATUS=...), until a STOPPING=1 or SECONDS (60)
# without one. Returns once it listens; $notify_listener is its pid (wait for it after a
# stop; cleanup kills it).
notify_listen ()
{
    py3 - "$1" "$2" "${3:-60}" <<'PY' &
import socket, sys
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("\0" + path[1:] if path.startswith("@") else path)
s.settimeout(float(sys.argv[3]))
with open(out, "w") as f:
    f.write("bound\n"); f.flush()
    while True:
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            break
        f.write(msg.replace("\n", "|") + "\n"); f.flush()
        if "STOPPING=1" in msg:
            break
PY
    notify_listener=$!
    cleanup_fn kill_quietly "$notify_listener"
    local i
    for (( i = 0; i < 100; ++i )); do
        grep -q bound "$2" 2>/dev/null && return
        sleep 0.1
    done
    fail "the notification listener on $1 did not start"
}

# ---------------------------------------------------------------------------
# Image helpers shared by the format tests

# qemu-io on a local image (-f FORMAT) or on an export (-f raw); fails on any error.
io ()   # FORMAT TARGET COMMANDS...
{
    local format=$1 target=$2 c
    local -a cmds=()
    shift 2
    for c in "$@"; do cmds+=(-c "$c"); done
    qemu-io -f "$format" "${cmds[@]}" "$target" >"$tmpdir/io.out" 2>&1 || {
        cat "$tmpdir/io.out"; fail "qemu-io ${cmds[*]} on $target failed"
    }
    if grep -Ei 'fail|error|not permitted' "$tmpdir/io.out"; then
        fail "qemu-io reported an error on $target"
    fi
}

# map_types URI: "offset length type" per line from nbdinfo --map (type 0 data, 3 hole).
map_types ()
{
    nbdinfo --map "$1" | awk '{ print $1, $2, $3 }' | tee "$tmpdir/map.txt"
}

# patch_bytes FILE OFFSET HEX: overwrite bytes in place.
patch_bytes ()
{
    printf "$(echo "$3" | sed 's/../\\x&/g')" |
        dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# fix_checksum FILE OFFSET SIZE CHECKSUM-FIELD: recompute a VHD checksum (formats.md §1.3).
fix_checksum ()
{
    py3 - "$@" <<'EOF'
import sys
path, offset, size, field = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(path, "r+b") as f:
    f.seek(offset)
    s = bytearray(f.read(size))
    s[field:field + 4] = b"\0\0\0\0"
    f.seek(offset + field)
    f.write((~sum(s) & 0xFFFFFFFF).to_bytes(4, "big"))
EOF
}

# both NAME [-o QEMU-IO-OPTIONS --] COMMANDS...: run the qemu-io commands on export NAME and
# on $tmpdir/NAME.raw (a reference given the same writes); fails on any error.
both ()   # NAME [-o QEMU-IO-OPTIONS --] COMMANDS...
{
    local name=$1 c
    local -a opts=() cmds=()
    shift
    if [ "${1:-}" = -o ]; then
        shift
        while [ "$1" != -- ]; do opts+=("$1"); shift; done
        shift
    fi
    for c in "$@"; do cmds+=(-c "$c"); done
    for target in "$(nbd_uri "$name")" "$tmpdir/$name.raw"; do
        qemu-io -f raw "${opts[@]}" "${cmds[@]}" "$target" >"$tmpdir/io.out" 2>&1 || {
            cat "$tmpdir/io.out"; fail "qemu-io ${cmds[*]} on $target failed"
        }
        cat "$tmpdir/io.out"
        if grep -Ei 'fail|error|not permitted' "$tmpdir/io.out"; then
            fail "qemu-io reported an error on $target"
        fi
    done
}

# ---------------------------------------------------------------------------
# Azure: an Azurite blob service of this test's own (formats.md §3.10)
#
#   start_azurite                  # free loopback port, data in $tmpdir/azurite
#   "$IMAGENBD" upload "$tmpdir/disk.img" "$(az_uri disk.img)"
#   start_imagenbd "$(az_uri disk.img)"
#
# start_azurite sets azure_port, azure_location, azure_container (created, fresh for this
# test) and exports AZURE_STORAGE_CONNECTION_STRING. stop_azurite / restart_azurite stop it
# and start it again on the same port with the same data (the fault tests); the test's
# cleanup stops it in any case.

# Azurite's well-known development account (not a secret: it is in Microsoft's docs).
azure_account=devstoreaccount1
azure_key='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='
azurite_pid=
azurite_log=

# azure_connection_string PORT: the connection string for a blob endpoint on 127.0.0.1:PORT
# (Azurite itself, or fault_proxy.py in front of it).
azure_connection_string ()
{
    echo "DefaultEndpointsProtocol=http;AccountName=$azure_account;AccountKey=$azure_key;BlobEndpoint=http://127.0.0.1:$1/$azure_account;"
}

# _azurite_launch: start azurite-blob on $azure_port with $azure_location and wait (up to
# 30 s) until it answers HTTP.
_azurite_launch ()
{
    local i n=$(( ${_azurite_starts:-0} + 1 ))
    _azurite_starts=$n
    mkdir -p "$azure_location"
    azurite_log=$tmpdir/azurite-$n.log
    echo "$test_name: starting azurite-blob on 127.0.0.1:$azure_port ($azure_location)" >&2
    azurite-blob --blobHost 127.0.0.1 --blobPort "$azure_port" --location "$azure_location" \
        --skipApiVersionCheck --loose --disableTelemetry </dev/null >"$azurite_log" 2>&1 &
    azurite_pid=$!
    for (( i = 0; i < 300; ++i )); do
        _alive "$azurite_pid" || { cat "$azurite_log" >&2; fail "azurite-blob exited at start"; }
        # Any HTTP answer will do (an unsigned request gets an error status).
        if py3 - "$azure_port" <<'PY' 2>/dev/null
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=2)
c.request("GET", "/devstoreaccount1?comp=list")
c.getresponse().read()
PY
        then
            return 0
        fi
        sleep 0.1
    done
    cat "$azurite_log" >&2
    fail "azurite-blob did not answer on port $azure_port within 30 s"
}

# start_azurite [--location DIR]: start Azurite and create this test's container.
start_azurite ()
{
    requires azurite-blob
    azure_location=$tmpdir/azurite
    if [ "${1:-}" = --location ]; then azure_location=$2; fi
    azure_port=$(free_port)
    _azurite_launch
    cleanup_fn _azurite_cleanup
    export AZURE_STORAGE_CONNECTION_STRING
    AZURE_STORAGE_CONNECTION_STRING=$(azure_connection_string "$azure_port")
    # Container names: 3..63 of [a-z0-9-], no "--", starting and ending alphanumeric.
    azure_container=$(echo "t-$test_name-$$" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' - |
                      sed -e 's/--*/-/g' | cut -c 1-63 | sed -e 's/-*$//')
    "$IMAGENBD" container create "az://$azure_account/$azure_container" ||
        fail "imagenbd container create az://$azure_account/$azure_container failed"
}

# stop_azurite: SIGTERM (Azurite saves its metadata database on a graceful stop, so a
# restart keeps every acknowledged write), and wait up to 20 s.
stop_azurite ()
{
    local i
    [ -n "$azurite_pid" ] || fail "stop_azurite: Azurite is not running"
    kill -TERM "$azurite_pid" 2>/dev/null || :
    for (( i = 0; i < 200; ++i )); do
        _alive "$azurite_pid" || break
        sleep 0.1
    done
    if _alive "$azurite_pid"; then
        kill -KILL "$azurite_pid" 2>/dev/null || :
        wait "$azurite_pid" 2>/dev/null || :
        azurite_pid=
        fail "azurite-blob did not stop within 20 s of SIGTERM"
    fi
    wait "$azurite_pid" 2>/dev/null || :
    azurite_pid=
}

# restart_azurite: start it again, same port, same data.
restart_azurite ()
{
    [ -z "$azurite_pid" ] || fail "restart_azurite: Azurite is still running"
    _azurite_launch
}

_azurite_cleanup ()
{
    [ -n "$azurite_pid" ] || return 0
    local i pid
    # Servers first, so that they release their leases while Azurite still answers (and
    # do not spend their stop retrying).
    for pid in "${_imagenbd_pids[@]}"; do
        [ -z "${_imagenbd_stopped[$pid]:-}" ] && kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${_imagenbd_pids[@]}"; do
        for (( i = 0; i < 50; ++i )); do
            _alive "$pid" || break
            sleep 0.1
        done
    done
    kill -TERM "$azurite_pid" 2>/dev/null
    for (( i = 0; i < 50; ++i )); do
        _alive "$azurite_pid" || break
        sleep 0.1
    done
    kill -KILL "$azurite_pid" 2>/dev/null
    wait "$azurite_pid" 2>/dev/null
    azurite_pid=
    return 0
}

# az_uri NAME: az:// URI of blob NAME in this test's container.
az_uri ()
{
    echo "az://$azure_account/$azure_container/$1"
}

# az_http_uri NAME: the same blob as a path-style URL on Azurite's port.
az_http_uri ()
{
    echo "http://127.0.0.1:$azure_port/$azure_account/$azure_container/$1"
}

# start_fault_proxy [FAULT_PROXY-ARGS...]: fault_proxy.py in front of this test's Azurite.
# Sets proxy_port, proxy_pid, proxy_log, proxy_stats (JSON counts) and proxy_control (see
# set_faults); azure_connection_string "$proxy_port" reaches Azurite through it.
start_fault_proxy ()
{
    local i
    proxy_control=$tmpdir/proxy.control
    proxy_stats=$tmpdir/proxy.stats
    proxy_log=$tmpdir/proxy.log
    rm -f "$tmpdir/proxy.port"
    : >"$proxy_control"
    # A simple command, not the py3 function: $! must be python itself, not a subshell.
    PATH=/usr/bin:$PATH PYTHONDONTWRITEBYTECODE=1 python3 "$srcdir/fault_proxy.py" \
        --target "127.0.0.1:$azure_port" \
        --port-file "$tmpdir/proxy.port" --control "$proxy_control" --stats "$proxy_stats" \
        --log "$proxy_log" "$@" </dev/null >>"$proxy_log" 2>&1 &
    proxy_pid=$!
    cleanup_fn kill_quietly "$proxy_pid"
    for (( i = 0; i < 100; ++i )); do
        [ -s "$tmpdir/proxy.port" ] && break
        _alive "$proxy_pid" || { cat "$proxy_log" >&2; fail "fault_proxy.py exited at start"; }
        sleep 0.1
    done
    [ -s "$tmpdir/proxy.port" ] || fail "fault_proxy.py did not start within 10 s"
    proxy_port=$(cat "$tmpdir/proxy.port")
}

# set_faults KEY=VALUE...: replace the proxy's faults (fail_every, reset_every, delay_ms;
# none given: no faults). Written atomically; the proxy picks it up at its next request.
set_faults ()
{
    printf '%s\n' "$@" >"$proxy_control.tmp"
    mv "$proxy_control.tmp" "$proxy_control"
}

# proxy_count KEY: one of the proxy's counts (requests, forwarded, failed_503, resets, ...).
proxy_count ()
{
    py3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
        "$proxy_stats" "$1"
}
