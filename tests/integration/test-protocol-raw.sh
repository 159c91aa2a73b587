#!/usr/bin/env bash
# Wire-level checks libnbd cannot express: exact option reply codes (STARTTLS refused
# with ERR_POLICY, unknown options ERR_UNSUP, payload where none is allowed ERR_INVALID),
# option payloads always consumed, INFO/GO consistency, the legacy EXPORT_NAME path with
# and without C_NO_ZEROES, the kernel path (GO with zero info requests, simple replies),
# unknown commands and flags => EINVAL, cookies echoed, DISC closes, a stalled handshake
# is dropped after --handshake-timeout.
# Spec: protocol.md sections 3-11, 17, 23.
source "$(dirname "$0")/functions.sh"
set -x

requires python3

# 1 MiB file: first 64 KiB is 0xa5, the rest a hole.
img=$tmpdir/disk.img
truncate -s 1M "$img"
head -c 65536 /dev/zero | tr '\0' '\245' | dd of="$img" conv=notrunc status=none

start_imagenbd -x disk -D "raw test disk" "$img"

py3 - "$sock" "$img" <<'EOF'
import errno, os, struct, sys
from rawnbd import *

sock, img = sys.argv[1], sys.argv[2]
SIZE = os.path.getsize(img)
failures = []

def check(cond, what):
    print(("ok:   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        failures.append(what)

def only_reply(replies):
    assert len(replies) == 1, "expected one reply, got %r" % (replies,)
    return replies[0][0]

def list_names(c):
    replies = c.option(OPT_LIST)
    check(replies[-1][0] == REP_ACK, "LIST ends with ACK (got %s)" % rep_name(replies[-1][0]))
    names = []
    for rtype, data in replies[:-1]:
        check(rtype == REP_SERVER, "LIST reply is NBD_REP_SERVER")
        (n,) = struct.unpack(">I", data[:4])
        names.append(data[4:4 + n].decode())
    return names

# --- greeting --------------------------------------------------------------
c = Conn(sock)
flags = c.handshake()
check(flags & FLAG_FIXED_NEWSTYLE, "server offers fixed newstyle")
check(flags & FLAG_NO_ZEROES, "server offers NO_ZEROES")

# --- unknown option with a payload: ERR_UNSUP, payload consumed --------------
r = only_reply(c.option(0x7fff, b"\xee" * 100))
check(r == REP_ERR_UNSUP, "unknown option 0x7fff -> ERR_UNSUP (got %s)" % rep_name(r))
check(list_names(c) == ["disk"], "LIST still in sync after the unknown option")

r = only_reply(c.option(OPT_PEEK_EXPORT))
check(r == REP_ERR_UNSUP, "withdrawn PEEK_EXPORT -> ERR_UNSUP (got %s)" % rep_name(r))

# --- STARTTLS without TLS configured: ERR_POLICY, session continues ----------
r = only_reply(c.option(OPT_STARTTLS))
check(r == REP_ERR_POLICY, "STARTTLS -> ERR_POLICY (got %s)" % rep_name(r))
r = only_reply(c.option(OPT_STARTTLS, b"junk"))
check(r in (REP_ERR_POLICY, REP_ERR_INVALID),
      "STARTTLS with payload -> ERR_POLICY or ERR_INVALID (got %s)" % rep_name(r))
check(list_names(c) == ["disk"], "LIST still in sync after STARTTLS refusals")

# --- payload where none is allowed: ERR_INVALID --------------------------------
r = only_reply(c.option(OPT_LIST, b"x" * 10))
check(r == REP_ERR_INVALID, "LIST with payload -> ERR_INVALID (got %s)" % rep_name(r))
r = only_reply(c.option(OPT_STRUCTURED_REPLY, b"x" * 3))
check(r == REP_ERR_INVALID, "STRUCTURED_REPLY with payload -> ERR_INVALID (got %s)" % rep_name(r))

# --- SET_META_CONTEXT needs structured replies first ---------------------------
r = c.option(OPT_SET_META_CONTEXT, Conn.meta_payload("disk", ["base:allocation"]))[-1][0]
check(r == REP_ERR_INVALID,
      "SET_META_CONTEXT before STRUCTURED_REPLY -> ERR_INVALID (got %s)" % rep_name(r))

# --- INFO: malformed, unknown export, then the real thing -----------------------
bad = struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0)   # name length > payload
r = c.option(OPT_INFO, bad)[-1][0]
check(r == REP_ERR_INVALID, "INFO with name length past the payload -> ERR_INVALID (got %s)" % rep_name(r))
r = c.option(OPT_INFO, Conn.info_payload("no-such-export"))[-1][0]
check(r == REP_ERR_UNKNOWN, "INFO for an unknown export -> ERR_UNKNOWN (got %s)" % rep_name(r))

want = (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE)
replies = c.option(OPT_INFO, Conn.info_payload("disk", want))
check(replies[-1][0] == REP_ACK, "INFO disk -> ACK")
infos = Conn.parse_infos(replies)
check(INFO_EXPORT in infos and len(infos[INFO_EXPORT]) == 10, "INFO includes NBD_INFO_EXPORT (12 bytes)")
size, tflags = struct.unpack(">QH", infos[INFO_EXPORT])
check(size == SIZE, "INFO export size %d == %d" % (size, SIZE))
check(tflags & 1, "transmission flags have HAS_FLAGS")
check(infos.get(INFO_NAME) == b"disk", "INFO_NAME is 'disk' (got %r)" % infos.get(INFO_NAME))
check(infos.get(INFO_DESCRIPTION) == b"raw test disk",
      "INFO_DESCRIPTION (got %r)" % infos.get(INFO_DESCRIPTION))
bs = infos.get(INFO_BLOCK_SIZE)
check(bs is not None and len(bs) == 12, "INFO_BLOCK_SIZE present, 14 bytes")
if bs and len(bs) == 12:
    check(struct.unpack(">III", bs) == (1, 4096, 32 << 20),
          "block sizes 1/4096/32M (got %r)" % (struct.unpack(">III", bs),))
# Same question again, this time GO: the answers must agree (INFO/GO consistency).
size2, tflags2 = c.go("disk", want)
check((size2, tflags2) == (size, tflags),
      "GO agrees with INFO: %r == %r" % ((size2, tflags2), (size, tflags)))

# Transmission with simple replies (no STRUCTURED_REPLY was negotiated).
c.request(CMD_READ, 0, 4096, cookie=0xdeadbeefcafe0001)
err, data = c.simple_reply(cookie=0xdeadbeefcafe0001, read_length=4096)
check(err == 0 and data == b"\xa5" * 4096, "simple-reply READ returns the data")
c.request(CMD_READ, 65536 - 512, 1024, cookie=2)
err, data = c.simple_reply(cookie=2, read_length=1024)
check(err == 0 and data == b"\xa5" * 512 + bytes(512), "READ across data/hole boundary")
c.request(0x55, 0, 512, cookie=3)
err, _ = c.simple_reply(cookie=3)
check(err == errno.EINVAL, "unknown command 0x55 -> EINVAL (got %d)" % err)
c.request(CMD_READ, 0, 512, flags=1 << 9, cookie=4)
err, _ = c.simple_reply(cookie=4, read_length=512)
check(err == errno.EINVAL, "READ with unknown flag bit 9 -> EINVAL (got %d)" % err)
c.request(CMD_READ, SIZE - 512, 1024, cookie=5)
err, _ = c.simple_reply(cookie=5, read_length=1024)
check(err == errno.EINVAL, "READ past the end -> EINVAL, no payload (got %d)" % err)
# Offset + length wrapping around 2^64 must not pass the bounds check.
c.request(CMD_READ, (1 << 64) - 512, 1024, cookie=6)
err, _ = c.simple_reply(cookie=6, read_length=1024)
check(err == errno.EINVAL, "READ with offset+length wrapping 2^64 -> EINVAL (got %d)" % err)
c.request(CMD_WRITE, (1 << 64) - 512, 1024, cookie=7, payload=b"\x01" * 1024)
err, _ = c.simple_reply(cookie=7)
check(err in (errno.ENOSPC, errno.EINVAL),
      "WRITE with offset+length wrapping 2^64 -> ENOSPC or EINVAL (got %d)" % err)
c.request(CMD_BLOCK_STATUS, 0, 4096, cookie=8)
err, _ = c.simple_reply(cookie=8)
check(err == errno.EINVAL, "BLOCK_STATUS without structured replies/context -> EINVAL (got %d)" % err)
c.request(CMD_WRITE, 4096, 512, cookie=9, payload=b"\x5a" * 512)
err, _ = c.simple_reply(cookie=9)
check(err == 0, "simple-reply WRITE succeeds")
c.request(CMD_FLUSH, 0, 0, cookie=10)
err, _ = c.simple_reply(cookie=10)
check(err == 0, "FLUSH succeeds")
c.request(CMD_READ, 4096, 512, cookie=11)
err, data = c.simple_reply(cookie=11, read_length=512)
check(err == 0 and data == b"\x5a" * 512, "read back what was written")
c.request(CMD_DISC, 0, 0, cookie=12)
check(c.is_closed_by_peer(), "server closes the connection after DISC")
c.close()

# --- ABORT: ACK, then the server closes ------------------------------------------
c = Conn(sock)
c.handshake()
r = only_reply(c.option(OPT_ABORT))
check(r == REP_ACK, "ABORT -> ACK (got %s)" % rep_name(r))
check(c.is_closed_by_peer(), "server closes after ABORT")
c.close()

# --- legacy EXPORT_NAME, without and with NO_ZEROES ---------------------------------
for cflags in (FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
    c = Conn(sock)
    c.handshake(cflags)
    size, tflags = c.export_name("disk")   # checks the 124 zero bytes when expected
    check(size == SIZE, "EXPORT_NAME (client flags %d): size %d" % (cflags, size))
    c.request(CMD_READ, 0, 512, cookie=77)
    err, data = c.simple_reply(cookie=77, read_length=512)
    check(err == 0 and data == b"\xa5" * 512, "EXPORT_NAME then READ (client flags %d)" % cflags)
    c.request(CMD_DISC)
    c.close()

# Default export by empty name.
c = Conn(sock)
c.handshake()
size, _ = c.export_name("")
check(size == SIZE, "EXPORT_NAME '' selects the default export")
c.request(CMD_DISC)
c.close()

# Unknown EXPORT_NAME cannot be reported: the server must hang up.
c = Conn(sock)
c.handshake()
c.send_option(OPT_EXPORT_NAME, b"no-such-export")
check(c.is_closed_by_peer(), "EXPORT_NAME of an unknown export -> disconnect")
c.close()

# --- kernel path: GO with zero info requests, no structured replies -----------------
c = Conn(sock)
c.handshake()
size, tflags = c.go("", ())
check(size == SIZE, "GO with no info requests (nbd-client style)")
check(not tflags & 0x80, "SEND_DF clear without structured replies (flags %#x)" % tflags)
c.request(CMD_READ, 0, 512, cookie=0xffffffffffffffff)
err, data = c.simple_reply(cookie=0xffffffffffffffff, read_length=512)
check(err == 0 and data == b"\xa5" * 512, "READ with cookie 2^64-1 echoed")
c.request(CMD_DISC)
c.close()

# --- structured replies ------------------------------------------------------------
c = Conn(sock)
c.handshake()
r = only_reply(c.option(OPT_STRUCTURED_REPLY))
check(r == REP_ACK, "STRUCTURED_REPLY -> ACK")
replies = c.option(OPT_LIST_META_CONTEXT, Conn.meta_payload("disk", []))
ctx = [d[4:].decode() for t, d in replies if t == REP_META_CONTEXT]
check(replies[-1][0] == REP_ACK and "base:allocation" in ctx,
      "LIST_META_CONTEXT (no queries) lists base:allocation (got %r)" % ctx)
replies = c.option(OPT_SET_META_CONTEXT, Conn.meta_payload("disk", ["base:allocation", "x-nosuch:thing"]))
ctx = [(struct.unpack(">I", d[:4])[0], d[4:].decode()) for t, d in replies if t == REP_META_CONTEXT]
check(replies[-1][0] == REP_ACK and [n for _, n in ctx] == ["base:allocation"],
      "SET_META_CONTEXT selects only base:allocation (got %r)" % ctx)
ctx_id = ctx[0][0] if ctx else None
size, tflags = c.go("disk", (INFO_BLOCK_SIZE,))
check(tflags & 0x80, "SEND_DF set with structured replies (flags %#x)" % tflags)

c.request(CMD_READ, 0, 131072, cookie=20)
chunks = c.structured_reply(cookie=20)
check(chunks[0][0] is not None, "READ gets a structured reply, never a simple one")
got = bytearray(131072)
covered = 0
for fl, t, p in chunks:
    if t == REPLY_TYPE_OFFSET_DATA:
        (off,) = struct.unpack(">Q", p[:8])
        got[off:off + len(p) - 8] = p[8:]
        covered += len(p) - 8
    elif t == REPLY_TYPE_OFFSET_HOLE:
        off, n = struct.unpack(">QI", p)
        covered += n
check(covered == 131072 and bytes(got) == b"\xa5" * 512 * 8 + b"\x5a" * 512 + b"\xa5" * (65536 - 4608) + bytes(65536),
      "structured READ covers the range with the right content")
check(chunks[-1][0] & REPLY_FLAG_DONE and all(not f & REPLY_FLAG_DONE for f, _, _ in chunks[:-1]),
      "only the last chunk has DONE")

c.request(0x55, 0, 512, cookie=21)
err = Conn.reply_error(c.structured_reply(cookie=21))
check(err == errno.EINVAL, "unknown command (structured) -> EINVAL (got %d)" % err)
c.request(CMD_READ, SIZE, 512, cookie=22)
chunks = c.structured_reply(cookie=22)
check(chunks[0][0] is not None and Conn.reply_error(chunks) == errno.EINVAL,
      "READ past the end -> structured error EINVAL (got %r)" % (chunks,))
c.request(CMD_BLOCK_STATUS, 0, SIZE, flags=CMD_FLAG_REQ_ONE, cookie=23)
chunks = c.structured_reply(cookie=23)
bs = [p for f, t, p in chunks if t == REPLY_TYPE_BLOCK_STATUS]
check(len(bs) == 1 and len(bs[0]) == 12, "BLOCK_STATUS REQ_ONE -> one chunk with one extent")
if len(bs) == 1 and len(bs[0]) == 12:
    cid, length, status = struct.unpack(">III", bs[0])
    check(cid == ctx_id, "BLOCK_STATUS uses the context id from SET_META_CONTEXT")
    check(0 < length <= 65536 and status & 3 == 0,
          "first extent is data, at most 64 KiB (got length %d status %d)" % (length, status))
c.request(CMD_DISC)
check(c.is_closed_by_peer(), "server closes after DISC")
c.close()

# --- oversized export name: refused (ERR_INVALID or disconnect), server survives -------
c = Conn(sock)
c.handshake()
try:
    r = c.option(OPT_INFO, Conn.info_payload("n" * 5000))[-1][0]
    check(r & 0x80000000, "INFO with a 5000-byte name -> error (got %s)" % rep_name(r))
except (EOFError, ConnectionResetError):
    check(True, "INFO with a 5000-byte name -> disconnect")
c.close()
c = Conn(sock)
c.handshake()
check(list_names(c) == ["disk"], "server still answers after the oversized name")
c.option(OPT_ABORT)
c.close()

if failures:
    print("%d check(s) failed" % len(failures))
    sys.exit(1)
EOF

stop_imagenbd

# A client that never finishes the handshake is dropped (slow-loris bound, qemu
# CVE-2024-7409): with --handshake-timeout 1 the server closes it within a few seconds,
# and keeps serving others.
start_imagenbd --handshake-timeout 1 memory:1M
py3 - "$sock" <<'EOF'
import sys, time
from rawnbd import *
c = Conn(sys.argv[1])
c.handshake()
start = time.time()
closed = c.is_closed_by_peer(timeout=10)
took = time.time() - start
assert closed and took < 5, "stalled handshake not closed (closed=%s after %.1f s)" % (closed, took)
print("ok:   stalled handshake closed after %.1f s" % took)
c = Conn(sys.argv[1])
c.handshake()
size, _ = c.go("")
assert size == 1 << 20
c.request(CMD_DISC)
print("ok:   server still serves new clients")
EOF
stop_imagenbd
