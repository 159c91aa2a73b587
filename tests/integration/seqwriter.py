"""Sequence-numbered writes for the live-snapshot test (test-live-snapshot.sh).

  seqwriter.py write URI LOG STOPFILE SEED   one 4 KiB record at a time at random 4 KiB
                                             offsets until STOPFILE exists; each
                                             acknowledged write is logged "SEQ OFFSET"
  seqwriter.py check URI BASE LOG LAST_BEFORE FIRST_AFTER
                                             the disk at URI must be BASE (a raw file) with,
                                             at every offset, the last record of seq <= K
                                             written there, for one K with LAST_BEFORE <= K
                                             < FIRST_AFTER; prints K's range
"""
import os
import random
import sys
import time

import nbd

RECORD = 4096


def record(seq, offset):
    head = b"SEQ%012d OFF%012d " % (seq, offset)
    return (head * (RECORD // len(head) + 1))[:RECORD]


def write(uri, log_path, stop, seed):
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // RECORD
    rnd = random.Random(int(seed))
    seq = 0
    with open(log_path, "w") as log:
        while not os.path.exists(stop):
            seq += 1
            offset = rnd.randrange(blocks) * RECORD
            began = time.monotonic()
            h.pwrite(record(seq, offset), offset)
            micros = int((time.monotonic() - began) * 1e6)
            log.write("%d %d %d\n" % (seq, offset, micros))
            log.flush()
    h.flush()
    h.shutdown()


def check(uri, base_path, log_path, last_before, first_after):
    writes = {}  # offset -> [seq, ...] ascending
    for line in open(log_path):
        seq, offset = map(int, line.split()[:2])
        writes.setdefault(offset, []).append(seq)
    h = nbd.NBD()
    h.connect_uri(uri)
    base = open(base_path, "rb")
    low, high = last_before, first_after - 1  # K must lie in [low, high]
    for offset, seqs in writes.items():
        got = h.pread(RECORD, offset)
        base.seek(offset)
        if got == base.read(RECORD):
            high = min(high, seqs[0] - 1)  # nothing written here yet at K
            continue
        seq = int(got[3:15]) if got.startswith(b"SEQ") else -1
        if seq not in seqs or got != record(seq, offset):
            sys.exit("offset %d holds neither the base nor a whole record written there "
                     "(%r...)" % (offset, got[:32]))
        later = [s for s in seqs if s > seq]
        low = max(low, seq)
        if later:
            high = min(high, later[0] - 1)
    if low > high:
        sys.exit("no point in time fits: the snapshot needs K >= %d and K <= %d (acknowledged "
                 "before the commit: %d, issued after it: %d)" % (low, high, last_before,
                                                                   first_after))
    # Everything not written must be the base's bytes.
    size = h.get_size()
    chunk = 1 << 20
    for at in range(0, size, chunk):
        n = min(chunk, size - at)
        got = bytearray(h.pread(n, at))
        base.seek(at)
        want = bytearray(base.read(n))
        for offset in range(at, at + n, RECORD):
            if offset in writes:
                got[offset - at:offset - at + RECORD] = bytes(RECORD)
                want[offset - at:offset - at + RECORD] = bytes(RECORD)
        if got != want:
            sys.exit("bytes never written differ from the base near offset %d" % at)
    print("point in time: K in [%d, %d] (acknowledged before: %d, issued after: %d), "
          "%d offsets written" % (low, high, last_before, first_after, len(writes)))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        check(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
