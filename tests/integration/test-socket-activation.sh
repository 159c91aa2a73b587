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
