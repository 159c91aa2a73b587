#!/usr/bin/env bash
# Payload limits: clients that asked for block sizes get the advertised 32 MiB maximum;
# clients that did not (EXPORT_NAME, GO without NBD_INFO_BLOCK_SIZE, like nbd-tester-client)
# may send READ/WRITE up to 64 MiB, split internally; beyond that EINVAL, and the
# connection carries on.
source "$(dirname "$0")/functions.sh"
requires_nbdsh

truncate -s 256M "$tmpdir/disk.img"
start_imagenbd -x disk "$tmpdir/disk.img"

nbdsh_py -c "
import errno, os
def expect_errno(e, f):
    try:
        f()
    except nbd.Error as err:
        assert err.errnum == e, (err.errnum, err)
        return
    raise AssertionError('request succeeded, expected errno %d' % e)

# A client that did not request block sizes.
h.set_request_block_size(False)
h.set_strict_mode(0)
h.connect_uri('$(nbd_uri disk)')
data = os.urandom(48 << 20)
h.pwrite(data, 3 << 20)                       # 48 MiB in one WRITE
assert h.pread(48 << 20, 3 << 20) == data     # 48 MiB in one READ (structured chunks)
assert h.pread(64 << 20, 0)[3 << 20:] == data + bytes((64 << 20) - (3 << 20) - (48 << 20))
# (Beyond 64 MiB, libnbd refuses to send; test-peer-conformance checks EINVAL there.)
assert h.pread(4096, 3 << 20) == data[:4096]  # the connection survived
h.shutdown()

# A client that requested them must keep to the 32 MiB it was told.
h2 = nbd.NBD()
h2.set_strict_mode(0)
h2.connect_uri('$(nbd_uri disk)')
assert h2.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
expect_errno(errno.EINVAL, lambda: h2.pread((32 << 20) + 1, 0))
assert len(h2.pread(32 << 20, 0)) == 32 << 20
h2.shutdown()
" || fail "large request limits"

# The big write is on disk, byte for byte.
cmp -n $((48 << 20)) -i $((3 << 20)) "$tmpdir/disk.img" /dev/zero >/dev/null 2>&1 &&
    fail "the 48 MiB write did not reach the file"
stop_imagenbd
