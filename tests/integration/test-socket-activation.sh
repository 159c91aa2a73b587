#!/usr/bin/env bash
# Systemd socket activation: libnbd starts imagenbd with LISTEN_PID/LISTEN_FDS and a
# listening socket on fd 3 (as systemd does); the server must serve there, not bind its own.
source "$(dirname "$0")/functions.sh"
requires_nbdsh

truncate -s 8M "$tmpdir/disk.img"
nbdsh_py -c "
h.connect_systemd_socket_activation(['$IMAGENBD', 'serve', '-x', 'disk', '$tmpdir/disk.img'])
assert h.get_size() == 8 << 20, h.get_size()
h.pwrite(b'activated' * 512, 4096)
h.flush()
assert h.pread(9 * 512, 4096) == b'activated' * 512
h.shutdown()
" || fail "socket-activated server did not serve"

# The data reached the file.
py3 -c "
import sys
with open('$tmpdir/disk.img', 'rb') as f:
    f.seek(4096)
    sys.exit(0 if f.read(9 * 512) == b'activated' * 512 else 1)
" || fail "write through the socket-activated server is not in the file"

# Without LISTEN_PID naming this process, the variables are ignored (TCP/Unix as usual).
sock="$sockdir/plain.sock"
LISTEN_PID=1 LISTEN_FDS=1 start_imagenbd -x disk "$tmpdir/disk.img"
nbdsh_py -u "$(nbd_uri disk)" -c 'assert h.get_size() == 8 << 20' ||
    fail "server with foreign LISTEN_PID did not listen on its own socket"
stop_imagenbd

# Several sockets at once, as a socket unit with several ListenStream= passes them (fds 3
# and 4): systemd-socket-activate listens on TCP and on a Unix socket and execs imagenbd
# at the first connection. Both must serve the same export, at the same time, and the
# server's own -p/-b must not be bound.
requires systemd-socket-activate
tcp_port=$(free_port)
own_port=$(free_port)
activated_sock=$sockdir/activated.sock
systemd-socket-activate -l "127.0.0.1:$tcp_port" -l "$activated_sock" \
    "$IMAGENBD" serve -b 127.0.0.1 -p "$own_port" -x disk "$tmpdir/disk.img" \
    </dev/null >"$tmpdir/activate.log" 2>&1 &
activated_pid=$!
_imagenbd_pids+=("$activated_pid")      # the cleanup stops it if the test fails
_imagenbd_logs+=("$tmpdir/activate.log")
for _ in $(seq 100); do [ -S "$activated_sock" ] && break; sleep 0.1; done
[ -S "$activated_sock" ] || fail "systemd-socket-activate did not create $activated_sock"

# One client on each socket, both connected at once: a write through TCP is read back
# through the Unix socket after a flush.
nbdsh_py -c "
import nbd
tcp = h
tcp.connect_uri('nbd://127.0.0.1:$tcp_port/disk')
unix = nbd.NBD()
unix.connect_uri('nbd+unix:///disk?socket=$activated_sock')
assert unix.get_size() == tcp.get_size() == 8 << 20
tcp.pwrite(b'two sockets' * 93, 65536)
tcp.flush()
assert unix.pread(11 * 93, 65536) == b'two sockets' * 93
unix.shutdown()
tcp.shutdown()
" || fail "the TCP and Unix sockets passed together did not both serve"
must_contain "$tmpdir/activate.log" "socket activation: serving on 2 socket\(s\)" \
    "the activation log"
must_contain "$tmpdir/activate.log" "listening on systemd fd 3 \(127\.0\.0\.1:$tcp_port\)"
must_contain "$tmpdir/activate.log" "listening on systemd fd 4 \(unix:$activated_sock\)"
# systemd-socket-activate execs the server in place: the pid is imagenbd's.
[ "$(readlink "/proc/$activated_pid/exe")" = "$(readlink -f "$IMAGENBD")" ] ||
    fail "pid $activated_pid is not imagenbd"
if (exec 3<>"/dev/tcp/127.0.0.1/$own_port") 2>/dev/null; then
    fail "socket-activated imagenbd also bound its own port $own_port"
fi
stop_imagenbd "$activated_pid"
