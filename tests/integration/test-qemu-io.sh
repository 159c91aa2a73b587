#!/usr/bin/env bash
# qemu-io over nbd+unix://: pattern writes (aligned, unaligned, vectored, async, FUA)
# read back with read -P; discard leaves neighbours intact; write -z (with and without
# unmap) reads back as zeroes; flush; everything acknowledged is in the file afterwards.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io

img=$tmpdir/disk.img
truncate -s 8M "$img"
start_imagenbd -x disk "$img"
u=$(nbd_uri disk)

# qemu-io exits 1 if any command (including a read -P verification) fails.
io ()   # [QEMU-IO-OPTIONS...] -- COMMANDS...
{
    local -a opts=() cmds=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift
    for c in "$@"; do cmds+=(-c "$c"); done
    qemu-io -f raw "${opts[@]}" "${cmds[@]}" "$u" >"$tmpdir/io.out" 2>&1 || {
        cat "$tmpdir/io.out"; fail "qemu-io ${cmds[*]} failed"
    }
    cat "$tmpdir/io.out"
    if grep -Ei 'fail|error|not permitted' "$tmpdir/io.out"; then
        fail "qemu-io reported an error"
    fi
}

# Default cache mode (writethrough): qemu puts FUA on every write.
io -- 'write -P 0xa1 0 64k' 'write -P 0xa2 64k 64k' 'write -P 0xa3 1M 1M' \
      'write -P 0xa4 3000 5000' 'writev -P 0xb1 2M 4k 8k 12k' \
      'write -f -P 0xb2 4M 128k'
io -- 'read -P 0xa1 0 3000' 'read -P 0xa4 3000 5000' 'read -P 0xa1 8000 57536' \
      'read -P 0xa2 64k 64k' 'read -P 0xa3 1M 1M' 'readv -P 0xb1 2M 12k 12k' \
      'read -P 0xb2 4M 128k' 'read -P 0 5M 3M'

# The verification itself must be able to fail.
status=0
qemu-io -f raw -c 'read -P 0xff 0 64k' "$u" >"$tmpdir/neg.out" 2>&1 || status=$?
cat "$tmpdir/neg.out"
[ $status -ne 0 ] || fail "read -P with a wrong pattern did not fail"
must_contain "$tmpdir/neg.out" "Pattern verification failed"

# Writeback mode: no FUA; several requests in flight, then flush.
io -t writeback -- 'aio_write -P 0xc1 3M 64k' 'aio_write -P 0xc2 3136k 64k' \
      'aio_write -P 0xc3 3200k 512k' 'aio_flush' 'flush'
io -- 'read -P 0xc1 3M 64k' 'read -P 0xc2 3136k 64k' 'read -P 0xc3 3200k 512k'

# Discard: must succeed; content of the discarded range is unspecified, neighbours kept.
io -d unmap -- 'discard 1M 512k'
io -- 'read -P 0xa3 1536k 512k' 'read -P 0xa2 64k 64k'

# Write zeroes: without unmap (NO_HOLE) and with unmap allowed.
io -- 'write -z 64k 64k'
io -d unmap -- 'write -z -u 2M 12k'
io -- 'read -P 0 64k 64k' 'read -P 0xa1 0 3000' 'read -P 0 2M 12k' \
      'read -P 0xb1 2060k 12k' 'read -P 0xa3 1536k 512k'

stop_imagenbd

# Everything acknowledged is in the file behind the export.
qemu-io -f raw -c 'read -P 0xa1 0 3000' -c 'read -P 0xa4 3000 5000' \
        -c 'read -P 0 64k 64k' -c 'read -P 0xa3 1536k 512k' -c 'read -P 0 2M 12k' \
        -c 'read -P 0xb2 4M 128k' -c 'read -P 0xc1 3M 64k' -c 'read -P 0xc3 3200k 512k' \
        -c 'read -P 0 5M 3M' "$img" || fail "the image file does not hold the written data"
