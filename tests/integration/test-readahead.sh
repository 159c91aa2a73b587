#!/usr/bin/env bash
# Readahead and boot-profile replay over an image in Azurite (issue 6 item 2), counted in
# the admin endpoint's /metrics. (1) A sequential read of the whole image in 64 KiB reads,
# one at a time (what a booting kernel does), through --cache with --readahead=off and
# then on: "on" sends at least 3x fewer remote requests, larger ones, and every byte is
# right. (2) A boot-like pattern (fixed pseudo-random jumps, short sequential runs, small
# think times) served with a fresh cache A and --boot-profile P records P; served again
# with a fresh cache B and the same P, the replay runs at start and the same pattern then
# waits for the remote on fewer than a third as many chunks (imagenbd_cache_misses_total).
# The numbers and times are printed.
source "$(dirname "$0")/functions.sh"
set -x

requires_nbdsh
start_azurite

mib=$(( 1024 * 1024 ))
size=$(( 64 * mib ))
admin=unix:$sockdir/admin.sock

head -c "$size" /dev/urandom >"$tmpdir/disk.raw"
"$IMAGENBD" upload "$tmpdir/disk.raw" "$(az_uri disk.raw)"
sum=$(sha256sum <"$tmpdir/disk.raw" | cut -d' ' -f1)

# The clients below read without structured replies, like the kernel's nbd client: with
# them, every read also asks the export for its extents, which a live blob without a lease
# answers with a Get Page Ranges request each time (the cache passes extents() through),
# and those requests would drown the ones counted here.
# seq_read: reads the export in 64 KiB reads, one at a time, checks its sha256, prints
# "requests BYTES misses MS" counted between two scrapes around the read.
seq_read ()
{
    py3 - "$(nbd_uri disk)" "$admin" "$size" "$sum" <<'EOF'
import hashlib, sys, time, adminhttp, nbd
uri, admin, size, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
h = nbd.NBD()
h.set_request_structured_replies(False)  # as the kernel's client: no extents per read
h.connect_uri(uri)
before = adminhttp.scrape(admin)
start = time.monotonic()
digest = hashlib.sha256()
for offset in range(0, size, 65536):
    digest.update(h.pread(65536, offset))
ms = int((time.monotonic() - start) * 1000)
after = adminhttp.scrape(admin)
h.shutdown()
assert digest.hexdigest() == want, "the export's bytes differ from the image's"
d = lambda name, **l: int(after.value(name, **l) - before.value(name, **l))
print(d("imagenbd_remote_requests_total", backend="azure"),
      d("imagenbd_remote_bytes_fetched_total", backend="azure"),
      d("imagenbd_cache_misses_total"), ms)
EOF
}

# --- 1. Sequential read, readahead off vs on ----------------------------------------------
start_imagenbd -r --admin="$admin" --cache="$tmpdir/cache-off.img" --readahead=off \
    disk="$(az_uri disk.raw)"
out=$(seq_read)
read -r off_requests off_bytes off_misses off_ms <<<"$out"
stop_imagenbd
start_imagenbd -r --admin="$admin" --cache="$tmpdir/cache-on.img" disk="$(az_uri disk.raw)"
out=$(seq_read)
read -r on_requests on_bytes on_misses on_ms <<<"$out"
stop_imagenbd
echo "$test_name: sequential 64 MiB in 64 KiB reads: readahead off: $off_requests remote" \
    "requests, $off_bytes bytes, $off_misses chunk misses, $off_ms ms; on: $on_requests" \
    "requests, $on_bytes bytes, $on_misses chunk misses, $on_ms ms" >&2
[ "$off_requests" -ge 60 ] || fail "readahead off: only $off_requests remote requests for 64 chunks"
[ $(( on_requests * 3 )) -le "$off_requests" ] ||
    fail "readahead on: $on_requests remote requests, not 3x fewer than $off_requests"
# Larger requests, not more bytes: nothing fetched twice, nothing past the image.
[ "$on_bytes" -le "$size" ] || fail "readahead on fetched $on_bytes bytes of a $size-byte image"
[ "$on_misses" -lt "$off_misses" ] ||
    fail "readahead on: $on_misses chunk misses, not fewer than $off_misses"

# --- 2. Boot profile: record, then replay on a fresh cache --------------------------------
# boot_read: the same boot-like pattern every time; prints "misses requests MS".
boot_read ()
{
    py3 - "$(nbd_uri disk)" "$admin" "$size" <<'EOF'
import random, sys, time, adminhttp, nbd
uri, admin, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(20261121)
pattern, places = [], []
for i in range(80):
    at = rng.choice(places) if (i % 9 == 8 and places) else rng.randrange(size // 4096) * 4096
    places.append(at)
    for k in range(rng.randint(1, 8)):
        length = min(4096 << rng.randrange(5), size - at)
        if length <= 0:
            break
        pattern.append((at, length, rng.random() < 0.2))
        at += length
h = nbd.NBD()
h.set_request_structured_replies(False)  # as the kernel's client: no extents per read
h.connect_uri(uri)
before = adminhttp.scrape(admin)
start = time.monotonic()
for at, length, think in pattern:
    h.pread(length, at)
    if think:
        time.sleep(0.002)  # part of the pattern (a boot computes between reads)
ms = int((time.monotonic() - start) * 1000)
after = adminhttp.scrape(admin)
h.shutdown()
d = lambda name, **l: int(after.value(name, **l) - before.value(name, **l))
print(d("imagenbd_cache_misses_total"), d("imagenbd_remote_requests_total", backend="azure"),
      ms, len(pattern))
EOF
}

profile=$tmpdir/boot.profile
start_imagenbd -r --admin="$admin" --cache="$tmpdir/cache-a.img" --boot-profile="$profile" \
    disk="$(az_uri disk.raw)"
must_contain "$imagenbd_log" "boot profile: $profile: recording"
out=$(boot_read)
read -r a_misses a_requests a_ms reads <<<"$out"
stop_imagenbd
must_contain "$imagenbd_log" "boot profile: $profile: recording saved"
[ -s "$profile" ] || fail "no boot profile saved in $profile"

start_imagenbd -r --admin="$admin" --cache="$tmpdir/cache-b.img" --boot-profile="$profile" \
    disk="$(az_uri disk.raw)"
must_contain "$imagenbd_log" "boot profile: $profile: replaying"
# Wait (up to 20 s) for the replay to end, as a client that connects a little after the
# server started would find it.
for (( i = 0; i < 200; ++i )); do
    grep -q "boot profile: $profile: replay done" "$imagenbd_log" && break
    sleep 0.1
done
must_contain "$imagenbd_log" "boot profile: $profile: replay done"
grep "boot profile: $profile: replay" "$imagenbd_log" >&2
out=$(boot_read)
read -r b_misses b_requests b_ms reads <<<"$out"
stop_imagenbd
echo "$test_name: boot pattern of $reads reads: first boot (recording): $a_misses cache" \
    "misses, $a_requests remote requests, $a_ms ms; second boot (replayed): $b_misses cache" \
    "misses, $b_requests remote requests, $b_ms ms" >&2
[ "$a_misses" -ge 30 ] || fail "the first boot waited for only $a_misses chunks"
[ $(( b_misses * 3 )) -lt "$a_misses" ] ||
    fail "after the replay the boot waited for $b_misses chunks, not < 1/3 of $a_misses"
