#!/usr/bin/env bash
# fio's nbd engine (libnbd) against a 32 MiB RAM disk and a 32 MiB file: 4 jobs, so 4
# connections at once, each random-writing its own 8 MiB slice with a 4k/64k block
# mix and 16 requests in flight, then verifying every block with crc32c.  fio must exit
# 0 with no errors and no verify failures.  The file export is also checked on disk.
source "$(dirname "$0")/functions.sh"
set -x

requires fio jq
requires_run sh -c 'fio --enghelp | grep -qw nbd'

img=$tmpdir/disk.img
truncate -s 32M "$img"
start_imagenbd mem=memory:32M file="$img"

run_fio ()   # NAME URI
{
    local out=$tmpdir/fio-$1.json status=0
    # One NBD connection per job; offset_increment gives each job its own slice.
    fio --output-format=json --output="$out" \
        --name="verify-$1" --ioengine=nbd --uri="$2" \
        --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=16 \
        --numjobs=4 --size=8M --offset_increment=8M \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 --verify_state_save=0 \
        --randrepeat=0 --group_reporting=0 || status=$?
    [ $status -eq 0 ] || { cat "$out"; fail "fio against $2 exited with status $status"; }
    jq -c '.jobs[] | {jobname, error, written: .write.io_bytes, verified: .read.io_bytes}' "$out"
    jq -e '[.jobs[].error] | all(. == 0)' "$out" || fail "a fio job reported an error"
    jq -e '.jobs | length == 4' "$out" || fail "expected 4 fio jobs"
    # Every job wrote its whole slice and read it all back for verification.
    jq -e '[.jobs[] | .write.io_bytes >= 8388608 and .read.io_bytes >= 8388608] | all' "$out" ||
        fail "a fio job did not write and verify its full 8 MiB"
    ! grep -Ei 'verify: bad|bad magic|crc32c.*(fail|mismatch)' "$out" ||
        fail "fio reported verify failures"
}

run_fio mem "$(nbd_uri mem)"
run_fio file "$(nbd_uri file)"

stop_imagenbd

# The file holds fio's verify headers: no 4 KiB block of the 32 MiB is left all zero.
py3 - "$img" <<'EOF'
import sys
data = open(sys.argv[1], "rb").read()
assert len(data) == 32 << 20, len(data)
zero = bytes(4096)
empty = [i for i in range(0, len(data), 4096) if data[i:i + 4096] == zero]
assert not empty, "%d blocks never written, first at %d" % (len(empty), empty[0])
print("all %d blocks written" % (len(data) // 4096))
EOF
