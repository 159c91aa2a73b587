#!/usr/bin/env bash
# One writer, many readers (the hpcpack model) on an Azure page blob in Azurite.
# (1) A writable server holds the blob's lease (renewed: it outlives --lease-duration=15);
# a second writable server is refused (exit 1, naming the lease, --force and --snapshot);
# a read-only server of the live blob needs no lease. (2) A third with --force takes the
# lease over: the first one's writes then fail with EIO (its reads still work, its log
# says why), and stopping it does not release the new holder's lease. A clean stop
# releases the lease. (3) Eight --snapshot servers (one new snapshot, seven more on its
# timestamp) serve at once, alongside a writer changing the live blob, and all read the
# image as it was.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io qemu-img nbdcopy nbdinfo jq sha256sum
start_azurite

mib=$(( 1024 * 1024 ))
img=$tmpdir/disk.raw
head -c $(( 8 * mib )) /dev/urandom >"$img"
truncate -s 24M "$img"
head -c $mib /dev/urandom >>"$img"
"$IMAGENBD" upload "$img" "$(az_uri disk.raw)"
blob=$(az_uri disk.raw)

# lease_state: the blob's lease state from ls --json.
lease_state ()
{
    "$IMAGENBD" ls --json "az://$azure_account/$azure_container" >"$tmpdir/ls.json"
    jq -r '.blobs[] | select(.name == "disk.raw" and (.snapshot // "") == "") | .lease_state' \
        "$tmpdir/ls.json"
}
# qio URI [-r] COMMANDS...: qemu-io on an export (-r: opened read-only); stdout+stderr in
# $tmpdir/qio.out; its status.
qio ()
{
    local target=$1 c status=0
    local -a cmds=()
    shift
    if [ "${1:-}" = -r ]; then cmds+=(-r); shift; fi
    for c in "$@"; do cmds+=(-c "$c"); done
    qemu-io -f raw "${cmds[@]}" "$target" >"$tmpdir/qio.out" 2>&1 || status=$?
    cat "$tmpdir/qio.out"
    return $status
}

[ "$(lease_state)" = available ] || fail "a freshly uploaded blob is not available"

# --- 1. The writer holds the lease --------------------------------------------------------
start_imagenbd --lease-duration=15 w1="$blob"
first_pid=$imagenbd_pid first_log=$imagenbd_log first=$(nbd_uri w1)
[ "$(lease_state)" = leased ] || fail "a writable server does not hold the blob's lease"
io raw "$first" 'write -P 0x11 0 64k'

# A second writer is refused, saying why and what to do.
status=0
timeout 30 "$IMAGENBD" serve -k "$sockdir/second.sock" "$blob" >"$tmpdir/second.out" 2>&1 ||
    status=$?
cat "$tmpdir/second.out"
[ "$status" = 1 ] || fail "a second writable server exited with $status, expected 1"
must_contain "$tmpdir/second.out" "lease" "the second server's message"
must_contain "$tmpdir/second.out" "--force" "the second server's message"
must_contain "$tmpdir/second.out" "--snapshot" "the second server's message"

# A read-only server of the live blob takes no lease and sees the writer's data.
start_imagenbd -r ro="$blob"
qio "$(nbd_uri ro)" -r 'read -P 0x11 0 64k' || fail "reading the read-only server failed"
if grep -Ei 'fail|error' "$tmpdir/qio.out"; then fail "reading the read-only server failed"; fi
stop_imagenbd
[ "$(lease_state)" = leased ] || fail "a read-only server changed the lease"

# The lease is renewed: past its 15 s the writer still writes and still holds it.
sleep 20
io raw "$first" 'write -P 0x12 64k 64k'
[ "$(lease_state)" = leased ] || fail "the writer's lease was not renewed"

# --- 2. --force takes over ----------------------------------------------------------------
start_imagenbd --force w3="$blob"
third_pid=$imagenbd_pid third=$(nbd_uri w3)
[ "$(lease_state)" = leased ] || fail "the --force server does not hold the lease"
io raw "$third" 'read -P 0x11 0 64k' 'read -P 0x12 64k 64k' 'write -P 0x33 1M 64k'

# The first server has lost the lease: writes fail with EIO, never silently succeed...
if qio "$first" "write -P 0x44 $(( 10 * mib )) 64k"; then :; fi
must_contain "$tmpdir/qio.out" "Input/output error" "a write through the server that lost its lease"
if qio "$first" "write -P 0x45 $(( 9 * mib + 3000 )) 5000"; then :; fi
must_contain "$tmpdir/qio.out" "Input/output error" \
    "an unaligned write through the server that lost its lease"
# ... its reads still work, and its log says why.
qio "$first" 'read -P 0x33 1M 64k' 'read -P 0x11 0 64k' ||
    fail "reads through the server that lost its lease failed"
if grep -Ei 'fail|error' "$tmpdir/qio.out"; then fail "reads after the lease loss failed"; fi
must_contain "$first_log" "lease" "the log of the server that lost its lease"
# Nothing it tried to write reached the blob.
io raw "$third" "read -P 0 $(( 9 * mib )) $(( mib + 64 * 1024 ))"

# Stopping it does not release (or otherwise disturb) the new holder's lease.
kill -TERM "$first_pid"
wait_imagenbd_exit "$first_pid"
[ "$(lease_state)" = leased ] || fail "stopping the old writer released the new one's lease"
io raw "$third" 'write -P 0x34 1M 4k'

# A clean stop releases the lease.
stop_imagenbd "$third_pid"
[ "$(lease_state)" = available ] || fail "a clean stop did not release the lease"

# --- 3. Eight snapshot servers at once, and a writer ------------------------------------
# What the blob holds now (the reference for the snapshot readers).
"$IMAGENBD" download "$blob" "$tmpdir/now.raw"
want=$(sha256sum <"$tmpdir/now.raw" | cut -d' ' -f1)
before=$(jq '[.blobs[] | select(.name == "disk.raw" and .snapshot != null and
                              .snapshot != "")] | length' \
            <("$IMAGENBD" ls --json --snapshots "az://$azure_account/$azure_container"))

start_imagenbd --snapshot s0="$blob"
snap_uris=("$(nbd_uri s0)") snap_pids=("$imagenbd_pid")
"$IMAGENBD" ls --json --snapshots "az://$azure_account/$azure_container" >"$tmpdir/snaps.json"
cat "$tmpdir/snaps.json"
jq -e --argjson before "$before" \
    '[.blobs[] | select(.name == "disk.raw" and .snapshot != null and .snapshot != "")]
     | length == $before + 1' "$tmpdir/snaps.json" >/dev/null ||
    fail "--snapshot did not take exactly one new snapshot"
stamp=$(jq -r '[.blobs[] | select(.name == "disk.raw" and .snapshot != null and
                 .snapshot != "") | .snapshot] | sort | last' "$tmpdir/snaps.json")
[ -n "$stamp" ] || fail "no snapshot timestamp in ls --json --snapshots"
for i in 1 2 3 4 5 6 7; do
    start_imagenbd --snapshot="$stamp" "s$i=$blob"
    snap_uris+=("$(nbd_uri "s$i")") snap_pids+=("$imagenbd_pid")
done
# The snapshot servers took no further snapshot, and no lease.
jq -e --argjson before "$before" \
    '[.blobs[] | select(.name == "disk.raw" and .snapshot != null and .snapshot != "")]
     | length == $before + 1' \
    <("$IMAGENBD" ls --json --snapshots "az://$azure_account/$azure_container") >/dev/null ||
    fail "--snapshot=TIMESTAMP took a new snapshot"
[ "$(lease_state)" = available ] || fail "a snapshot server took a lease"

# A writer on the live blob meanwhile changes it.
start_imagenbd live="$blob"
io raw "$(nbd_uri live)" 'write -P 0x77 0 1M' 'write -P 0x78 20M 64k'

# All eight read at once, and read the image as it was when the snapshot was taken.
pids=()
for i in "${!snap_uris[@]}"; do
    ( nbdcopy "${snap_uris[i]}" - | sha256sum | cut -d' ' -f1 >"$tmpdir/sum.$i" ) &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "reading a snapshot server failed"; done
for i in "${!snap_uris[@]}"; do
    got=$(cat "$tmpdir/sum.$i")
    [ "$got" = "$want" ] || fail "snapshot server s$i read $got, expected $want"
done
# Snapshot exports are read-only.
nbdinfo "${snap_uris[3]}" >"$tmpdir/snap.info"
must_contain "$tmpdir/snap.info" "is_read_only: true" "nbdinfo of a --snapshot export"
# And the live blob has the writer's data.
io raw "$(nbd_uri live)" 'read -P 0x77 0 1M'
stop_imagenbd
for p in "${snap_pids[@]}"; do stop_imagenbd "$p"; done
[ "$(lease_state)" = available ] || fail "the lease is not released after every server stopped"
