#!/usr/bin/env bash
# The Azure page-blob leaf against Azurite: (1) a raw image with holes and a fixed VHD made
# by qemu-img, uploaded and served, read as the local files, holes shown by nbdinfo --map;
# (2) unaligned writes (read-modify-write of the edge pages, several into one page at once)
# read back, and the page map kept exact by our own writes: zero -u and discard become
# holes, zero without unmap stays data; (3) reads larger than one ranged GET, across holes;
# (4) the lease: held while serving, released by a clean stop, a second writer refused
# with a message naming --force and --snapshot, --force takes over; (5) what cannot be
# served says why: a missing blob, a block blob, a missing snapshot, a writable export with
# a read-only SAS (a path-style SAS URL is served with -r); (6) a new snapshot is
# served read-only, and again by its timestamp in the URI.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo nbdcopy jq
start_azurite

mib=$(( 1024 * 1024 ))

# lease_state NAME: the blob's lease state from ls --json.
lease_state ()
{
    "$IMAGENBD" ls --json "az://$azure_account/$azure_container" |
        jq -r --arg n "$1" '.blobs[] | select(.name == $n and (.snapshot // "") == "") | .lease_state'
}

# --- 1. Upload and serve ------------------------------------------------------------------
truncate -s 24M "$tmpdir/disk.raw"
io raw "$tmpdir/disk.raw" 'write -P 0x11 0 1M' "write -P 0x22 $(( 6 * mib )) 3M" \
    "write -P 0x33 $(( 20 * mib )) 512k"
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/disk.vhd" 16M
io vpc "$tmpdir/disk.vhd" "write -P 0x44 $(( 2 * mib )) 2M"
"$IMAGENBD" upload "$tmpdir/disk.raw" "$(az_uri disk.raw)"
"$IMAGENBD" upload "$tmpdir/disk.vhd" "$(az_uri disk.vhd)"

start_imagenbd raw="$(az_uri disk.raw)" vhd="$(az_uri disk.vhd)"
qemu-img compare -f raw -F raw "$tmpdir/disk.raw" "$(nbd_uri raw)" ||
    fail "the raw blob served differs from the uploaded file"
qemu-img compare -f vpc -F raw "$tmpdir/disk.vhd" "$(nbd_uri vhd)" ||
    fail "the VHD blob served differs from the VHD's virtual disk"
map_types "$(nbd_uri raw)"
diff -u - "$tmpdir/map.txt" <<EOF || fail "nbdinfo --map does not show the blob's holes"
0 $mib 0
$mib $(( 5 * mib )) 3
$(( 6 * mib )) $(( 3 * mib )) 0
$(( 9 * mib )) $(( 11 * mib )) 3
$(( 20 * mib )) $(( mib / 2 )) 0
$(( 20 * mib + mib / 2 )) $(( 3 * mib + mib / 2 )) 3
EOF
map_types "$(nbd_uri vhd)"
must_contain "$tmpdir/map.txt" "^$(( 2 * mib )) $(( 2 * mib )) 0$" "the VHD's map"
[ "$(lease_state disk.raw)" = leased ] || fail "a writable export does not hold the lease"

# --- 2. Unaligned writes, zeroes and trims --------------------------------------------------
cp "$tmpdir/disk.raw" "$tmpdir/raw.raw"   # the reference for both()
both raw 'write -P 0x55 1000 3000' "write -P 0x56 $(( 3 * mib + 7 )) 100" \
    "write -P 0x57 $(( 22 * mib - 1 )) 1026"
both raw -o -t writeback -- 'aio_write -P 0x61 100 10' 'aio_write -P 0x62 200 10' \
    'aio_write -P 0x63 300 10' 'aio_write -P 0x64 400 200' 'aio_flush'
io raw "$(nbd_uri raw)" 'read -P 0x55 1000 3000' 'read -P 0x11 4000 1000' \
    'read -P 0x61 100 10' 'read -P 0x64 400 200' "read -P 0 $(( 3 * mib )) 7"
both raw -o -d unmap -- "write -z -u $(( 6 * mib )) 1M" "discard $(( 20 * mib )) 512k" \
    "write -z $(( 8 * mib )) 512k"
qemu-img compare -f raw -F raw "$tmpdir/raw.raw" "$(nbd_uri raw)" ||
    fail "the export differs from the raw file given the same writes"
map_types "$(nbd_uri raw)"
# 0-1M data; the page written at 3M+7; 6M-7M cleared; 7M-9M data (8M zero-written);
# the pages of 22M-1..22M+1025; 20M-20.5M discarded.
diff -u - "$tmpdir/map.txt" <<EOF || fail "the page map does not follow our writes"
0 $mib 0
$mib $(( 2 * mib )) 3
$(( 3 * mib )) 512 0
$(( 3 * mib + 512 )) $(( 4 * mib - 512 )) 3
$(( 7 * mib )) $(( 2 * mib )) 0
$(( 9 * mib )) $(( 13 * mib - 512 )) 3
$(( 22 * mib - 512 )) 2048 0
$(( 22 * mib + 1536 )) $(( 2 * mib - 1536 )) 3
EOF

# --- 3. Large reads across holes (split into ranges, holes zero-filled) -------------------
nbdcopy --request-size=$(( 32 * mib )) "$(nbd_uri raw)" "$tmpdir/copy.raw"
cmp "$tmpdir/raw.raw" "$tmpdir/copy.raw" || fail "32 MiB reads differ from the reference"

# --- 4. The lease -----------------------------------------------------------------------------
first_pid=$imagenbd_pid first_log=$imagenbd_log first_raw=$(nbd_uri raw)
must_fail "$tmpdir/second.out" "$IMAGENBD" serve -k "$tmpdir/second.sock" "$(az_uri disk.raw)"
must_contain "$tmpdir/second.out" "leased by another writer" "the second server's message"
must_contain "$tmpdir/second.out" "--force" "the second server's message"
must_contain "$tmpdir/second.out" "--snapshot" "the second server's message"
start_imagenbd --force "$(az_uri disk.raw)"
must_contain "$imagenbd_log" "breaking the lease" "the log of the --force server"
must_fail "$tmpdir/lost.out" qemu-io -f raw -c 'write -P 0x77 0 4k' "$first_raw"
must_contain "$tmpdir/lost.out" "Input/output error" "a write after the lease was taken over"
must_contain "$first_log" "lease lost" "the log of the server that lost its lease"
io raw "$uri" 'write -P 0x78 0 4k' 'read -P 0x78 0 4k'
io raw "$tmpdir/raw.raw" 'write -P 0x78 0 4k'
stop_imagenbd
stop_imagenbd "$first_pid"
[ "$(lease_state disk.raw)" = available ] || fail "a clean stop did not release the lease"
[ "$(lease_state disk.vhd)" = available ] || fail "a clean stop did not release the VHD's lease"

# --- 5. What cannot be served -----------------------------------------------------------------
must_fail "$tmpdir/missing.out" "$IMAGENBD" serve -k "$tmpdir/x.sock" "$(az_uri nope.raw)"
must_contain "$tmpdir/missing.out" "blob not found"
"$IMAGENBD" upload --blob-type=block "$tmpdir/disk.raw" "$(az_uri block.raw)"
must_fail "$tmpdir/block.out" "$IMAGENBD" serve -k "$tmpdir/x.sock" "$(az_uri block.raw)"
must_contain "$tmpdir/block.out" "only page blobs can be served"
must_fail "$tmpdir/nosnap.out" "$IMAGENBD" serve -k "$tmpdir/x.sock" \
    --snapshot=2001-01-01T00:00:00.0000000Z "$(az_uri disk.raw)"
must_contain "$tmpdir/nosnap.out" "no snapshot 2001-01-01T00:00:00.0000000Z of"
must_fail "$tmpdir/local.out" "$IMAGENBD" serve -k "$tmpdir/x.sock" --snapshot "$tmpdir/disk.raw"
must_contain "$tmpdir/local.out" "Azure blob URIs only"

# A path-style URL with a read-only SAS and no connection string: served with -r (reads
# need no lease); without -r the refusal says what to do, and shows no signature.
sas=$(py3 - "$azure_container" <<'EOF'
import base64, hashlib, hmac, sys, urllib.parse
key = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
fields = ["r", "", "2099-01-01T00:00:00Z", f"/blob/devstoreaccount1/{sys.argv[1]}/disk.raw",
          "", "", "", "2021-08-06", "b", "", "", "", "", "", "", ""]
sig = base64.b64encode(hmac.new(key, "\n".join(fields).encode(), hashlib.sha256).digest())
print("sv=2021-08-06&sr=b&sp=r&se=2099-01-01T00:00:00Z&sig=" + urllib.parse.quote(sig, safe=""))
EOF
)
sas_url="$(az_http_uri disk.raw)?$sas"
saved_connection_string=$AZURE_STORAGE_CONNECTION_STRING
unset AZURE_STORAGE_CONNECTION_STRING
must_fail "$tmpdir/sas-rw.out" "$IMAGENBD" serve -k "$tmpdir/x.sock" "$sas_url"
must_contain "$tmpdir/sas-rw.out" "403.*serve it read-only with -r"
if grep -F "${sas#*sig=}" "$tmpdir/sas-rw.out"; then fail "the SAS signature reached the message"; fi
start_imagenbd -r "$sas_url"
must_contain "$imagenbd_log" "may change it underneath" "the log of a read-only live blob"
qemu-img compare -f raw -F raw "$tmpdir/raw.raw" "$uri" ||
    fail "the blob served by its SAS URL differs from the reference"
stop_imagenbd
export AZURE_STORAGE_CONNECTION_STRING=$saved_connection_string

# --- 6. A new snapshot is served read-only with the blob's data of that moment -------------
start_imagenbd --snapshot "$(az_uri disk.raw)"
must_contain "$imagenbd_log" "serving new snapshot"
nbdinfo "$uri" | tee "$tmpdir/snap.info"
must_contain "$tmpdir/snap.info" "is_read_only: true"
qemu-io -r -f raw -c 'read -P 0x78 0 4k' -c 'read -P 0x11 4096 1000' "$uri" \
    >"$tmpdir/snap.out" 2>&1 || fail "reading the snapshot failed"
cat "$tmpdir/snap.out"
if grep -Ei 'fail|error|mismatch' "$tmpdir/snap.out"; then fail "the snapshot reads wrong"; fi
must_fail "$tmpdir/snap-write.out" qemu-io -f raw -c 'write 0 4k' "$uri"
# The same snapshot by its timestamp, given as az://...?snapshot=T (cli.md).
snap=$(grep -o 'serving new snapshot [^ ]*' "$imagenbd_log" | cut -d' ' -f4)
snap_pid=$imagenbd_pid snap_uri=$uri
start_imagenbd "$(az_uri disk.raw)?snapshot=$snap"
qemu-img compare -f raw -F raw "$snap_uri" "$uri" ||
    fail "az://...?snapshot=$snap serves other data than the snapshot just taken"
stop_imagenbd
stop_imagenbd "$snap_pid"
