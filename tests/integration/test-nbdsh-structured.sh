#!/usr/bin/env bash
# Structured replies through libnbd, on a sparse file export and on a RAM disk:
#  - pread_structured: holes arrive as OFFSET_HOLE chunks and data as OFFSET_DATA, the
#    chunks tile the request exactly and the data is right;
#  - DF: one content chunk for a read mixing data and hole;
#  - block_status (base:allocation) with and without REQ_ONE follows what was written,
#    trimmed and zeroed (hole|zero vs data), REQ_ONE gives exactly one extent no longer
#    than the request, and ranges reported ZERO read back as zeroes;
#  - FAST_ZERO is accepted on both export types.
source "$(dirname "$0")/functions.sh"
set -x

requires_nbdsh

img=$tmpdir/sparse.img
truncate -s 16M "$img"
fs_supports_holes "$tmpdir" ||
    skip "$tmpdir cannot hold sparse files (no SEEK_HOLE), so holes cannot be checked"

start_imagenbd file="$img" mem=memory:16M

export SOCK=$sock
nbdsh_py -n -c - <<'EOF'
import errno, os
import nbd

sock = os.environ["SOCK"]
K, M = 1024, 1024 * 1024
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO
checks = 0

def check(cond, what):
    global checks
    checks += 1
    print(("ok:   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        raise AssertionError(what)

def pattern(n, seed):
    return bytes((i * 7 + seed) % 251 + 1 for i in range(n))   # never zero

def chunks_of(h, count, offset, flags=0):
    """pread_structured; returns (data, [(status, offset, length)])."""
    seen = []
    def cb(buf, off, status, err):
        seen.append((status, off, len(buf)))
        return 0
    data = h.pread_structured(count, offset, cb, flags)
    return data, sorted(seen, key=lambda c: c[1])

def merge(extents):
    out = []
    for off, ln, fl in extents:
        if out and out[-1][2] == fl and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + ln, fl)
        else:
            out.append((off, ln, fl))
    return out

def block_status_map(h, offset, length):
    """All extents of [offset, offset+length), asking again where the server stopped."""
    out, pos, end = [], offset, offset + length
    while pos < end:
        got = []
        def cb(ctx, off, entries, err):
            got.append((ctx, off, list(entries)))
            return 0
        h.block_status(end - pos, pos, cb)
        check(len(got) == 1 and got[0][0] == "base:allocation" and got[0][1] == pos,
              "one base:allocation reply for the request at %d" % pos)
        entries = got[0][2]
        check(len(entries) >= 2 and len(entries) % 2 == 0, "extent list well formed")
        for i in range(0, len(entries), 2):
            ln, fl = entries[i], entries[i + 1]
            check(ln > 0, "extent length > 0")
            out.append((pos, min(ln, end - pos), fl & 3))
            pos += ln
            if pos >= end:
                break
    return merge(out)

def req_one(h, count, offset):
    got = []
    h.block_status(count, offset, lambda ctx, off, entries, err: got.append(list(entries)) or 0,
                   nbd.CMD_FLAG_REQ_ONE)
    check(len(got) == 1 and len(got[0]) == 2,
          "REQ_ONE at %d: exactly one extent (got %r)" % (offset, got))
    ln, fl = got[0]
    check(0 < ln <= count, "REQ_ONE at %d: length %d within the request (%d)" % (offset, ln, count))
    return ln, fl & 3

for name in ("file", "mem"):
    print("=== export %s" % name, flush=True)
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sock))
    check(h.get_structured_replies_negotiated(), "structured replies")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation selected")
    check(h.can_df(), "DF advertised")
    size = h.get_size()
    check(size == 16 * M, "size 16M")

    data1 = pattern(M, 1)
    h.pwrite(data1, 1 * M)

    # --- sparse structured read --------------------------------------------------
    data, chunks = chunks_of(h, 3 * M, 0)
    check(data == bytes(M) + data1 + bytes(M), "pread_structured returns the right bytes")
    pos = 0
    for status, off, ln in chunks:
        check(off == pos, "chunks tile the request without gaps/overlaps (at %d)" % off)
        pos += ln
    check(pos == 3 * M, "chunks cover the whole request")
    holes = [(off, ln) for st, off, ln in chunks if st == nbd.READ_HOLE]
    datas = [(off, ln) for st, off, ln in chunks if st == nbd.READ_DATA]
    check(all(off + ln <= M or off >= 2 * M for off, ln in holes)
          and sum(ln for _, ln in holes) == 2 * M,
          "the 2 MiB of unwritten ranges arrive as OFFSET_HOLE chunks: %r" % chunks)
    check(all(M <= off and off + ln <= 2 * M for off, ln in datas)
          and sum(ln for _, ln in datas) == M,
          "the written 1 MiB arrives as OFFSET_DATA chunks")
    check(all(st in (nbd.READ_DATA, nbd.READ_HOLE) for st, _, _ in chunks), "no error chunks")
    check(all(off % 512 == 0 and ln % 512 == 0 for _, off, ln in chunks),
          "chunk boundaries of an aligned read are 512-byte aligned (qemu warns otherwise)")

    # A read entirely inside a hole.
    data, chunks = chunks_of(h, 256 * K, 8 * M)
    check(data == bytes(256 * K) and chunks and all(c[0] == nbd.READ_HOLE for c in chunks),
          "read of a hole: only OFFSET_HOLE chunks (%r)" % chunks)

    # --- DF: one content chunk even across data/hole ------------------------------------
    data, chunks = chunks_of(h, 64 * K, 2 * M - 32 * K, nbd.CMD_FLAG_DF)
    check(data == data1[-32 * K:] + bytes(32 * K), "DF read returns the right bytes")
    check(len(chunks) == 1 and chunks[0] == (nbd.READ_DATA, 2 * M - 32 * K, 64 * K),
          "DF read over data+hole: exactly one OFFSET_DATA chunk (%r)" % chunks)
    data, chunks = chunks_of(h, 64 * K, 8 * M, nbd.CMD_FLAG_DF)
    check(data == bytes(64 * K) and len(chunks) == 1 and chunks[0][1:] == (8 * M, 64 * K),
          "DF read of a hole: exactly one chunk covering it (%r)" % chunks)

    # --- block status -------------------------------------------------------------------
    m = block_status_map(h, 0, size)
    want = [(0, M, HOLE_ZERO), (M, M, 0), (2 * M, 14 * M, HOLE_ZERO)]
    check(m == want, "block status map %r == %r" % (m, want))

    ln, fl = req_one(h, size, 0)
    check(fl == HOLE_ZERO and ln <= M, "REQ_ONE at 0: hole|zero, stops at the data (%d, %d)" % (ln, fl))
    ln, fl = req_one(h, size - M, M)
    check(fl == 0 and ln <= M, "REQ_ONE at 1M: data, at most 1 MiB (%d, %d)" % (ln, fl))
    ln, fl = req_one(h, 64 * K, 0)
    check(fl == HOLE_ZERO and ln <= 64 * K, "REQ_ONE with a 64 KiB request inside a hole")
    ln, fl = req_one(h, 4096, M + 512)
    check(fl == 0 and ln <= 4096, "REQ_ONE, unaligned offset inside data")

    # Trim a part of the data: it becomes hole|zero, and reads as zeroes.
    h.trim(512 * K, M)
    # Zero without NO_HOLE: must read as zeroes and report ZERO.
    h.zero(256 * K, M + 512 * K)
    # Zero with NO_HOLE: must read as zeroes (allocation unspecified here).
    h.zero(128 * K, M + 768 * K, nbd.CMD_FLAG_NO_HOLE)
    check(h.pread(M, M) == bytes(896 * K) + data1[896 * K:], "trimmed/zeroed ranges read as zeroes")
    m = block_status_map(h, 0, size)
    print("map after trim/zero: %r" % m, flush=True)
    def flags_over(start, end):
        return [fl for off, ln, fl in m if off < end and off + ln > start]
    check(flags_over(0, M) == [HOLE_ZERO], "[0, 1M) still hole|zero")
    check(set(flags_over(M, M + 512 * K)) == {HOLE_ZERO}, "the trimmed range is hole|zero")
    check(all(fl & nbd.STATE_ZERO for fl in flags_over(M + 512 * K, M + 768 * K)),
          "the write-zeroes range (no NO_HOLE) reports ZERO")
    check(flags_over(M + 896 * K, 2 * M) == [0], "the remaining data is still data")
    check(flags_over(2 * M, 16 * M) == [HOLE_ZERO], "the tail is still hole|zero")
    # Whatever says ZERO must read as zeroes.
    for off, ln, fl in m:
        if fl & nbd.STATE_ZERO and off < 3 * M:
            check(h.pread(min(ln, 3 * M - off), off) == bytes(min(ln, 3 * M - off)),
                  "extent (%d, %d) reported ZERO reads as zeroes" % (off, ln))

    # FAST_ZERO is advertised, so it must be accepted (not ENOTSUP) on this export type.
    check(h.can_fast_zero(), "fast zero advertised")
    h.pwrite(pattern(64 * K, 5), 4 * M)
    h.zero(64 * K, 4 * M, nbd.CMD_FLAG_FAST_ZERO)
    check(h.pread(64 * K, 4 * M) == bytes(64 * K), "FAST_ZERO write-zeroes succeeds and reads as zeroes")
    ln, fl = req_one(h, 64 * K, 4 * M)
    check(fl & nbd.STATE_ZERO, "the fast-zeroed range reports ZERO")

    # A small unaligned write inside a hole shows up as data around it.
    h.pwrite(pattern(512, 9), 5 * M + 100)
    ln, fl = req_one(h, 4096, 5 * M + 100)
    check(fl == 0, "a 512-byte write makes its block data")
    check(h.pread(512, 5 * M + 100) == pattern(512, 9), "small unaligned write reads back")
    h.shutdown()

print("%d checks passed" % checks)
EOF

stop_imagenbd
