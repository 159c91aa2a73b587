#!/usr/bin/python3
"""Open N NBD connections that finish the handshake and then stay idle; print the server's
"VmRSS VmHWM" (KiB) while they are all open.

    idle_conns.py URI N SERVER_PID

Needs Debian's python3 with the libnbd bindings (python3-libnbd).
"""
import sys
import time

import nbd


def status_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(rest.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def main():
    uri, count, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    handles = []
    for i in range(count):
        h = nbd.NBD()
        h.connect_uri(uri)  # returns after NBD_OPT_GO: the server holds a live session
        handles.append(h)
    # One cheap request on every connection, so that lazily built per-connection state
    # (buffers, worker threads) exists before we read the memory.
    for h in handles:
        h.pread(512, 0)
    time.sleep(0.5)  # let the server settle after the last reply (not a synchronisation)
    rss, hwm = status_kib(pid)
    print(rss, hwm)
    for h in handles:
        h.shutdown()


if __name__ == "__main__":
    main()
