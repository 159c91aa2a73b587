#!/usr/bin/env bash
# Bad requests get the exact NBD error and the connection stays usable afterwards.
# libnbd's strict mode is switched off so that it sends what it would normally refuse.
#   beyond the end: READ/TRIM/CACHE/BLOCK_STATUS -> EINVAL, WRITE/WRITE_ZEROES -> ENOSPC
#   length 0 -> EINVAL; READ > 32 MiB -> EINVAL, with DF -> EOVERFLOW; WRITE > 32 MiB
#   -> EINVAL (payload swallowed); a flag not valid for the command -> EINVAL;
#   BLOCK_STATUS with no context selected -> EINVAL; writes to a read-only export -> EPERM.
# And the things that must work: a 32 MiB read/write, FUA on any command, FAST_ZERO,
# FLUSH, CACHE, and a mix of good and bad requests in flight at once.
source "$(dirname "$0")/functions.sh"
set -x

requires_nbdsh

ro_img=$tmpdir/ro.img
head -c $(( 4 * 1024 * 1024 )) /dev/urandom >"$ro_img"
cp "$ro_img" "$tmpdir/ro.orig"

start_imagenbd mem=memory:64M
rw_sock=$sock
start_imagenbd -r ro="$ro_img"
ro_sock=$sock

export RW_SOCK=$rw_sock RO_SOCK=$ro_sock RO_ORIG=$tmpdir/ro.orig
nbdsh_py -n -c - <<'EOF'
import errno, os
import nbd

K, M = 1024, 1024 * 1024
checks = 0
failures = []

# Failed checks are collected (so one run reports every wrong errno); a connection that
# becomes unusable stops the script.
def check(cond, what):
    global checks
    checks += 1
    print(("ok:   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        failures.append(what)

def connect(sock, name, context=True):
    h = nbd.NBD()
    if context:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri("nbd+unix:///%s?socket=%s" % (name, sock))
    h.set_strict_mode(0)
    return h

h = connect(os.environ["RW_SOCK"], "mem")
size = h.get_size()
check(size == 64 * M, "export size 64M")
canary = bytes(range(256)) * 2
h.pwrite(canary, 0)

def still_usable(what):
    try:
        ok = h.pread(512, 0) == canary
    except nbd.Error as e:
        raise AssertionError("connection unusable after %s: %s" % (what, e.string))
    check(ok, "connection still usable after: " + what)

def expect_errno(want, what, fn, *args):
    try:
        fn(*args)
        got, msg = 0, "success"
    except nbd.Error as e:
        got, msg = e.errnum, "%s: %s" % (e.errno, e.string)
        # libnbd words errors the server sent as "command failed"; anything else was
        # refused client-side and never reached the server.
        if "command failed" not in e.string:
            got = -1
    check(got == want, "%s -> %s (got %s)" % (what, errno.errorcode[want], msg))
    still_usable(what)

bs_cb = lambda ctx, off, entries, err: 0
rd_cb = lambda buf, off, status, err: 0

# --- beyond the end ------------------------------------------------------------------------
end = size - 1024
expect_errno(errno.EINVAL, "READ across the end", h.pread, 4096, end)
expect_errno(errno.ENOSPC, "WRITE across the end", h.pwrite, b"x" * 4096, end)
expect_errno(errno.EINVAL, "TRIM across the end", h.trim, 4096, end)
expect_errno(errno.ENOSPC, "WRITE_ZEROES across the end", h.zero, 4096, end)
expect_errno(errno.EINVAL, "CACHE across the end", h.cache, 4096, end)
expect_errno(errno.EINVAL, "BLOCK_STATUS across the end", h.block_status, 4096, end, bs_cb)
expect_errno(errno.EINVAL, "READ wholly past the end", h.pread, 512, size + 4096)
expect_errno(errno.ENOSPC, "WRITE wholly past the end", h.pwrite, b"x" * 512, size)
expect_errno(errno.EINVAL, "READ at offset 2^63", h.pread, 512, 1 << 63)
check(h.pread(1024, end) == bytes(1024), "READ of the last 1024 bytes works")
h.pwrite(b"\x01" * 1024, end)
check(h.pread(1024, end) == b"\x01" * 1024, "WRITE of the last 1024 bytes works")

# --- length 0 ---------------------------------------------------------------------------
expect_errno(errno.EINVAL, "READ of length 0", h.pread, 0, 0)
expect_errno(errno.EINVAL, "WRITE of length 0", h.pwrite, b"", 0)
expect_errno(errno.EINVAL, "TRIM of length 0", h.trim, 0, 0)
expect_errno(errno.EINVAL, "WRITE_ZEROES of length 0", h.zero, 0, 0)
expect_errno(errno.EINVAL, "CACHE of length 0", h.cache, 0, 0)
expect_errno(errno.EINVAL, "BLOCK_STATUS of length 0", h.block_status, 0, 0, bs_cb)

# --- over the 32 MiB maximum payload ---------------------------------------------------------
check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * M, "maximum block size is 32 MiB")
expect_errno(errno.EINVAL, "READ of 33 MiB", h.pread, 33 * M, 0)
expect_errno(errno.EINVAL, "READ of 64 MiB", h.pread, 64 * M, 0)
expect_errno(errno.EOVERFLOW, "DF READ of 33 MiB", h.pread_structured, 33 * M, 0, rd_cb,
             nbd.CMD_FLAG_DF)
big = b"\xbb" * (33 * M)
expect_errno(errno.EINVAL, "WRITE of 33 MiB (payload swallowed)", h.pwrite, big, 0)
big = b"\xbc" * (64 * M)
expect_errno(errno.EINVAL, "WRITE of 64 MiB (payload swallowed)", h.pwrite, big, 0)
del big
check(h.pread(512, 16 * M) == bytes(512), "refused big writes wrote nothing")
data = bytes((i * 13) % 256 for i in range(32 * M))
h.pwrite(data, 8 * M)
check(h.pread(32 * M, 8 * M) == data, "WRITE and READ of exactly 32 MiB work")
del data

# --- flags that the command does not take ---------------------------------------------------
expect_errno(errno.EINVAL, "READ with unknown flag 1<<7", h.pread, 512, 0, 1 << 7)
expect_errno(errno.EINVAL, "READ with unknown flag 1<<15", h.pread, 512, 0, 1 << 15)
expect_errno(errno.EINVAL, "READ with NO_HOLE", h.pread, 512, 0, nbd.CMD_FLAG_NO_HOLE)
expect_errno(errno.EINVAL, "READ with REQ_ONE", h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
expect_errno(errno.EINVAL, "WRITE with REQ_ONE", h.pwrite, b"y" * 512, 4096, nbd.CMD_FLAG_REQ_ONE)
expect_errno(errno.EINVAL, "WRITE with DF", h.pwrite, b"y" * 512, 4096, nbd.CMD_FLAG_DF)
expect_errno(errno.EINVAL, "WRITE with FAST_ZERO", h.pwrite, b"y" * 512, 4096, nbd.CMD_FLAG_FAST_ZERO)
expect_errno(errno.EINVAL, "TRIM with NO_HOLE", h.trim, 512, 4096, nbd.CMD_FLAG_NO_HOLE)
expect_errno(errno.EINVAL, "WRITE_ZEROES with DF", h.zero, 512, 4096, nbd.CMD_FLAG_DF)
expect_errno(errno.EINVAL, "CACHE with unknown flag 1<<9", h.cache, 512, 0, 1 << 9)
expect_errno(errno.EINVAL, "FLUSH with NO_HOLE", h.flush, nbd.CMD_FLAG_NO_HOLE)
expect_errno(errno.EINVAL, "BLOCK_STATUS with DF", h.block_status, 512, 0, bs_cb, nbd.CMD_FLAG_DF)
check(h.pread(512, 4096) == bytes(512), "refused writes wrote nothing")

# --- valid requests that must succeed ---------------------------------------------------------
check(h.can_fua() and h.can_flush() and h.can_cache() and h.can_fast_zero() and h.can_zero()
      and h.can_trim() and h.can_df(), "writable export advertises fua/flush/cache/fast_zero/zero/trim/df")
h.pwrite(b"\x33" * 4096, 4096, nbd.CMD_FLAG_FUA)
check(h.pread(4096, 4096, nbd.CMD_FLAG_FUA) == b"\x33" * 4096, "FUA write; FUA on READ accepted")
h.flush()
h.flush(nbd.CMD_FLAG_FUA)
h.cache(M, 0)
h.cache(M, 0, nbd.CMD_FLAG_FUA)
h.trim(4096, 4096, nbd.CMD_FLAG_FUA)
h.zero(64 * K, M, nbd.CMD_FLAG_FAST_ZERO)
check(h.pread(64 * K, M) == bytes(64 * K), "FAST_ZERO write-zeroes succeeds and reads as zeroes")
h.zero(64 * K, M, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
check(h.pread(1, 12345) == bytes(1), "1-byte unaligned read (minimum block size 1)")
h.pwrite(b"\x7e", 12345)
check(h.pread(3, 12344) == b"\x00\x7e\x00", "1-byte unaligned write")
checks += 1
print("ok:   FLUSH, CACHE, TRIM+FUA, FAST_ZERO, NO_HOLE all succeed", flush=True)

# --- good and bad requests in flight together: each gets its own answer ---------------------------
buf_ok = [nbd.Buffer(4096) for _ in range(8)]
cookies = []
for i in range(8):
    if i % 2:
        cookies.append((h.aio_pread(buf_ok[i], size + i * 4096), errno.EINVAL))
    else:
        cookies.append((h.aio_pread(buf_ok[i], 0), 0))
cookies.append((h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"z" * 512)), size), errno.ENOSPC))
cookies.append((h.aio_flush(), 0))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, (cookie, want) in enumerate(cookies):
    try:
        h.aio_command_completed(cookie)
        got = 0
    except nbd.Error as e:
        got = e.errnum
    check(got == want, "in-flight request %d: errno %d (want %d)" % (i, got, want))
check(buf_ok[0].to_bytearray()[:512] == canary, "good reads among bad ones got their data")

# --- BLOCK_STATUS with no context selected -----------------------------------------------------
h2 = connect(os.environ["RW_SOCK"], "mem", context=False)
check(not h2.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no context negotiated")
try:
    h2.block_status(4096, 0, bs_cb)
    got = "success"
except nbd.Error as e:
    got = e.errno
check(got == "EINVAL", "BLOCK_STATUS without a context -> EINVAL (got %s)" % got)
check(h2.pread(512, 0) == canary, "h2 still usable")
h2.shutdown()
h.shutdown()

# --- read-only export -------------------------------------------------------------------------
h = connect(os.environ["RO_SOCK"], "ro")
orig = open(os.environ["RO_ORIG"], "rb").read()
canary = orig[:512]
check(h.is_read_only(), "read-only export says so")
check(not h.can_trim() and not h.can_zero() and not h.can_fua() and not h.can_fast_zero(),
      "read-only export does not advertise trim/zero/fua/fast_zero")
expect_errno(errno.EPERM, "WRITE to a read-only export", h.pwrite, b"w" * 4096, 0)
expect_errno(errno.EPERM, "TRIM on a read-only export", h.trim, 4096, 0)
expect_errno(errno.EPERM, "WRITE_ZEROES on a read-only export", h.zero, 4096, 0)
expect_errno(errno.EPERM, "WRITE_ZEROES+NO_HOLE on a read-only export", h.zero, 4096, 0,
             nbd.CMD_FLAG_NO_HOLE)
expect_errno(errno.EINVAL, "READ across the end of the read-only export", h.pread, 8192, len(orig) - 4096)
check(h.pread(len(orig), 0) == orig, "read-only export content intact")
h.shutdown()

if failures:
    raise AssertionError("%d of %d checks failed:\n  " % (len(failures), checks)
                         + "\n  ".join(failures))
print("%d checks passed" % checks)
EOF

stop_imagenbd "${_imagenbd_pids[1]}"
stop_imagenbd "${_imagenbd_pids[0]}"
cmp "$ro_img" "$tmpdir/ro.orig" || fail "the read-only image was modified"
