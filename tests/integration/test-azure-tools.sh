#!/usr/bin/env bash
# The blob tools against Azurite: --help and usage errors of each; upload's refusals (a
# size that is not a multiple of 512, an existing blob without --overwrite) and its
# warning for VHDs Azure would not mount; ls (text and --json); snapshot, download of a
# snapshot, rm of one snapshot and of a blob with its snapshots; lease acquire, renew,
# release and break; block blobs both ways; download leaving holes sparse and refusing
# to overwrite a file; container create and delete.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io jq cmp
start_azurite

mib=$(( 1024 * 1024 ))
container=az://$azure_account/$azure_container

# expect_status STATUS OUTFILE CMD...: run CMD (stdout and stderr to OUTFILE), require STATUS.
expect_status ()
{
    local want=$1 out=$2 status=0
    shift 2
    "$@" >"$out" 2>&1 || status=$?
    cat "$out"
    [ "$status" -eq "$want" ] || fail "'$*' exited with $status, expected $want"
}
# blob_field NAME FIELD [SNAPSHOT]: FIELD of blob NAME (the base blob, or that snapshot)
# from ls --json --snapshots.
blob_field ()
{
    "$IMAGENBD" ls --json --snapshots "$container" >"$tmpdir/ls.json"
    jq -r --arg n "$1" --arg f "$2" --arg s "${3:-}" \
        '.blobs[] | select(.name == $n and (.snapshot // "") == $s) | .[$f]' "$tmpdir/ls.json"
}
snapshots_of () # NAME: how many snapshots of NAME ls --snapshots lists
{
    "$IMAGENBD" ls --json --snapshots "$container" >"$tmpdir/ls.json"
    jq --arg n "$1" '[.blobs[] | select(.name == $n and (.snapshot // "") != "")] | length' \
        "$tmpdir/ls.json"
}

# --- --help and usage errors ----------------------------------------------------------------
for cmd in upload download ls rm snapshot lease container; do
    expect_status 0 "$tmpdir/help.out" "$IMAGENBD" "$cmd" --help
    must_contain "$tmpdir/help.out" "$cmd" "$cmd --help"
    expect_status 2 "$tmpdir/usage.out" "$IMAGENBD" "$cmd" --no-such-option
    must_contain "$tmpdir/usage.out" "^imagenbd" "$cmd's usage error"
done
expect_status 0 "$tmpdir/help.out" "$IMAGENBD" upload --help
for opt in --block-size --blob-type --parallel --overwrite --progress --json; do
    must_contain "$tmpdir/help.out" "$opt" "upload --help"
done
expect_status 0 "$tmpdir/help.out" "$IMAGENBD" lease --help
for action in acquire renew release break; do
    must_contain "$tmpdir/help.out" "$action" "lease --help"
done

# --- upload: refusals and warnings ----------------------------------------------------------
head -c 1000 /dev/urandom >"$tmpdir/odd.bin"
expect_status 1 "$tmpdir/odd.out" "$IMAGENBD" upload "$tmpdir/odd.bin" "$(az_uri odd.bin)"
must_contain "$tmpdir/odd.out" "512" "the refusal of a 1000-byte page blob"
must_contain "$tmpdir/odd.out" "^imagenbd: " "the refusal of a 1000-byte page blob"
[ -z "$(blob_field odd.bin name)" ] || fail "the refused upload left a blob behind"
# --block-size: a multiple of 512, at most 4M.
expect_status 2 "$tmpdir/bs.out" "$IMAGENBD" upload --block-size=1000 "$tmpdir/odd.bin" \
    "$(az_uri bs.bin)"
expect_status 2 "$tmpdir/bs.out" "$IMAGENBD" upload --block-size=8M "$tmpdir/odd.bin" \
    "$(az_uri bs.bin)"

# A dynamic VHD, and a fixed one whose size is not a whole MiB: uploaded, with a warning
# saying how to fix them; a fixed whole-MiB one: no warning.
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/dyn.vhd" 8M
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/odd.vhd" $(( 5 * mib + 3 * 512 ))
qemu-img create -f vpc -o subformat=fixed,force_size=on "$tmpdir/ok.vhd" 6M
for name in dyn odd; do
    expect_status 0 "$tmpdir/$name.out" "$IMAGENBD" upload "$tmpdir/$name.vhd" \
        "$(az_uri $name.vhd)"
    must_contain "$tmpdir/$name.out" "imagenbd convert --azure" "the warning for $name.vhd"
done
expect_status 0 "$tmpdir/ok.out" "$IMAGENBD" upload "$tmpdir/ok.vhd" "$(az_uri ok.vhd)"
if grep -q 'convert --azure' "$tmpdir/ok.out"; then fail "a mountable VHD got the warning"; fi

# --overwrite: refused without it (and the blob is left alone), replaced with it.
head -c $mib /dev/urandom >"$tmpdir/one.raw"
head -c $(( 2 * mib )) /dev/urandom >"$tmpdir/two.raw"
"$IMAGENBD" upload "$tmpdir/one.raw" "$(az_uri data.raw)"
expect_status 1 "$tmpdir/over.out" "$IMAGENBD" upload "$tmpdir/two.raw" "$(az_uri data.raw)"
must_contain "$tmpdir/over.out" "--overwrite" "the refusal to replace a blob"
[ "$(blob_field data.raw size)" = $mib ] || fail "the refused upload changed the blob"
"$IMAGENBD" download "$(az_uri data.raw)" "$tmpdir/data-dl.raw"
cmp "$tmpdir/data-dl.raw" "$tmpdir/one.raw" || fail "the refused upload changed the blob"
"$IMAGENBD" upload --overwrite "$tmpdir/two.raw" "$(az_uri data.raw)"
[ "$(blob_field data.raw size)" = $(( 2 * mib )) ] || fail "--overwrite did not replace it"

# download refuses an existing file without --overwrite, and leaves it alone.
expect_status 1 "$tmpdir/dlover.out" "$IMAGENBD" download "$(az_uri data.raw)" \
    "$tmpdir/data-dl.raw"
must_contain "$tmpdir/dlover.out" "--overwrite" "download's refusal to replace a file"
cmp "$tmpdir/data-dl.raw" "$tmpdir/one.raw" || fail "the refused download changed the file"
"$IMAGENBD" download --overwrite "$(az_uri data.raw)" "$tmpdir/data-dl.raw"
cmp "$tmpdir/data-dl.raw" "$tmpdir/two.raw" || fail "download --overwrite: contents differ"
# A blob that is not there: exit 1, naming it.
expect_status 1 "$tmpdir/missing.out" "$IMAGENBD" download "$(az_uri nothing.raw)" \
    "$tmpdir/nothing.raw"
must_contain "$tmpdir/missing.out" "nothing.raw" "the error for a missing blob"
[ ! -e "$tmpdir/nothing.raw" ] || fail "a failed download left a file behind"

# --- block blobs ----------------------------------------------------------------------------
# Any size (no 512 rule), several blocks.
head -c $(( 9 * mib + 777 )) /dev/urandom >"$tmpdir/plain.bin"
"$IMAGENBD" upload --blob-type=block --json "$tmpdir/odd.bin" "$(az_uri small.bin)" \
    >"$tmpdir/small.json"
"$IMAGENBD" upload --blob-type=block --json "$tmpdir/plain.bin" "$(az_uri plain.bin)" \
    >"$tmpdir/plain.json"
cat "$tmpdir/small.json" "$tmpdir/plain.json"
jq -e '.blob_type == "block" and .size == 1000' "$tmpdir/small.json" >/dev/null ||
    fail "upload --blob-type=block --json of 1000 bytes"
jq -e --argjson s $(( 9 * mib + 777 )) '.blob_type == "block" and .size == $s and
    .requests >= 3' "$tmpdir/plain.json" >/dev/null ||
    fail "upload --blob-type=block --json: expected several Put Blocks"
"$IMAGENBD" download "$(az_uri small.bin)" "$tmpdir/small-dl.bin"
"$IMAGENBD" download "$(az_uri plain.bin)" "$tmpdir/plain-dl.bin"
cmp "$tmpdir/small-dl.bin" "$tmpdir/odd.bin" || fail "block blob round trip (1000 bytes)"
cmp "$tmpdir/plain-dl.bin" "$tmpdir/plain.bin" || fail "block blob round trip (9 MiB + 777)"

# --- ls -------------------------------------------------------------------------------------
"$IMAGENBD" ls "$container" >"$tmpdir/ls.txt"
cat "$tmpdir/ls.txt"
for name in dyn.vhd odd.vhd ok.vhd data.raw small.bin plain.bin; do
    must_contain "$tmpdir/ls.txt" "^$name[[:space:]]" "ls"
done
[ "$(wc -l <"$tmpdir/ls.txt")" -eq 6 ] || fail "ls: expected one line per blob (6)"
must_contain "$tmpdir/ls.txt" "^data\.raw[[:space:]]+[A-Za-z]*[Pp]age[A-Za-z]*[[:space:]]+$(( 2 * mib ))[[:space:]]+available" "ls's line for data.raw"
must_contain "$tmpdir/ls.txt" "^plain\.bin[[:space:]]+[A-Za-z]*[Bb]lock[A-Za-z]*[[:space:]]+$(( 9 * mib + 777 ))[[:space:]]" "ls's line for plain.bin"
"$IMAGENBD" ls --json "$container" >"$tmpdir/ls.json"
cat "$tmpdir/ls.json"
jq -e --argjson two $(( 2 * mib )) '
    (.blobs | length) == 6 and
    (.blobs[] | select(.name == "data.raw") | .blob_type == "page" and .size == $two and
                .lease_state == "available" and (.last_modified | type) == "string") and
    (.blobs[] | select(.name == "plain.bin") | .blob_type == "block")' "$tmpdir/ls.json" \
    >/dev/null || fail "ls --json: wrong or missing fields"
# A prefix.
"$IMAGENBD" ls --json "$container/d" >"$tmpdir/ls-d.json"
jq -e '[.blobs[].name] | sort == ["data.raw", "dyn.vhd"]' "$tmpdir/ls-d.json" >/dev/null ||
    fail "ls with a prefix"

# --- snapshot, download --snapshot, rm ----------------------------------------------------
head -c $mib /dev/urandom >"$tmpdir/s0.raw"
"$IMAGENBD" upload "$tmpdir/s0.raw" "$(az_uri snap.raw)"
t1=$("$IMAGENBD" snapshot "$(az_uri snap.raw)")
echo "snapshot: $t1"
[[ "$t1" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z$ ]] ||
    fail "snapshot printed '$t1', not a snapshot timestamp"
# Change the blob through a server, then take a second snapshot (--json).
cp "$tmpdir/s0.raw" "$tmpdir/s1.raw"
start_imagenbd "$(az_uri snap.raw)"
io raw "$(nbd_uri)" 'write -P 0x5a 4096 64k'
stop_imagenbd
qemu-io -f raw -c 'write -P 0x5a 4096 64k' "$tmpdir/s1.raw" >/dev/null
"$IMAGENBD" snapshot --json "$(az_uri snap.raw)" >"$tmpdir/snap.json"
cat "$tmpdir/snap.json"
t2=$(jq -r .snapshot "$tmpdir/snap.json")
[ -n "$t2" ] && [ "$t2" != null ] && [ "$t2" != "$t1" ] || fail "snapshot --json: '$t2'"
[ "$(snapshots_of snap.raw)" = 2 ] || fail "ls --snapshots does not list both snapshots"
"$IMAGENBD" ls "$container" >"$tmpdir/ls.txt"
[ "$(grep -c '^snap\.raw[[:space:]]' "$tmpdir/ls.txt")" = 1 ] ||
    fail "ls without --snapshots lists snapshots"
"$IMAGENBD" ls --snapshots "$container" >"$tmpdir/ls.txt"
cat "$tmpdir/ls.txt"
must_contain "$tmpdir/ls.txt" "^snap\.raw[[:space:]].*$t1" "ls --snapshots"
must_contain "$tmpdir/ls.txt" "^snap\.raw[[:space:]].*$t2" "ls --snapshots"
# Each snapshot downloads as it was (by --snapshot and by ?snapshot= on the path-style
# URL); the blob as it is. (az://...?snapshot=: at the end.)
"$IMAGENBD" download --snapshot="$t1" "$(az_uri snap.raw)" "$tmpdir/t1.raw"
"$IMAGENBD" download "$(az_http_uri snap.raw)?snapshot=$t2" "$tmpdir/t2.raw"
"$IMAGENBD" download "$(az_uri snap.raw)" "$tmpdir/live.raw"
cmp "$tmpdir/t1.raw" "$tmpdir/s0.raw" || fail "download --snapshot: not the first snapshot"
cmp "$tmpdir/t2.raw" "$tmpdir/s1.raw" || fail "download ?snapshot=: not the second snapshot"
cmp "$tmpdir/live.raw" "$tmpdir/s1.raw" || fail "download: not the live blob"
# rm of a blob with snapshots needs --snapshots; rm --snapshot=T removes just that one.
expect_status 1 "$tmpdir/rm.out" "$IMAGENBD" rm "$(az_uri snap.raw)"
[ "$(blob_field snap.raw size)" = $mib ] || fail "a refused rm removed the blob"
"$IMAGENBD" rm --snapshot="$t1" "$(az_uri snap.raw)"
[ "$(snapshots_of snap.raw)" = 1 ] || fail "rm --snapshot=T did not remove exactly one"
[ -z "$(blob_field snap.raw name "$t1")" ] || fail "rm --snapshot=T removed the wrong one"
[ -n "$(blob_field snap.raw name "$t2")" ] || fail "rm --snapshot=T removed the wrong one"
[ -n "$(blob_field snap.raw name)" ] || fail "rm --snapshot=T removed the blob"
"$IMAGENBD" rm --snapshots "$(az_uri snap.raw)"
[ "$(snapshots_of snap.raw)" = 0 ] && [ -z "$(blob_field snap.raw name)" ] ||
    fail "rm --snapshots left the blob or a snapshot"
# A plain blob.
"$IMAGENBD" rm "$(az_uri ok.vhd)"
[ -z "$(blob_field ok.vhd name)" ] || fail "rm did not remove ok.vhd"
expect_status 1 "$tmpdir/rm2.out" "$IMAGENBD" rm "$(az_uri ok.vhd)"

# --- leases ---------------------------------------------------------------------------------
lb=$(az_uri data.raw)
id=$("$IMAGENBD" lease acquire --duration=15 "$lb")
echo "lease id: $id"
[[ "$id" =~ ^[0-9a-fA-F-]{36}$ ]] || fail "lease acquire printed '$id', not a lease id"
[ "$(blob_field data.raw lease_state)" = leased ] || fail "lease acquire: not leased"
# Held: another acquire fails, and so does rm without the id.
expect_status 1 "$tmpdir/l.out" "$IMAGENBD" lease acquire --duration=15 "$lb"
expect_status 1 "$tmpdir/l.out" "$IMAGENBD" rm "$lb"
# renew with the id works, with another does not; release likewise.
"$IMAGENBD" lease renew --lease-id="$id" "$lb"
other=3f2504e0-4f89-41d3-9a0c-0305e82c3301
expect_status 1 "$tmpdir/l.out" "$IMAGENBD" lease renew --lease-id="$other" "$lb"
expect_status 1 "$tmpdir/l.out" "$IMAGENBD" lease release --lease-id="$other" "$lb"
[ "$(blob_field data.raw lease_state)" = leased ] || fail "a wrong release changed the lease"
"$IMAGENBD" lease release --lease-id="$id" "$lb"
[ "$(blob_field data.raw lease_state)" = available ] || fail "lease release: not available"
# A proposed id, --json.
"$IMAGENBD" lease acquire --duration=60 --lease-id="$other" --json "$lb" >"$tmpdir/l.json"
cat "$tmpdir/l.json"
[ "$(jq -r .lease_id "$tmpdir/l.json")" = "$other" ] || fail "lease acquire --lease-id --json"
# break --break-period=0: broken at once (prints 0), and anyone may acquire it again.
out=$("$IMAGENBD" lease break --break-period=0 "$lb")
echo "break: $out"
[ "$out" = 0 ] || fail "lease break --break-period=0 printed '$out', expected 0"
[ "$(blob_field data.raw lease_state)" = broken ] || fail "lease break: not broken"
id=$("$IMAGENBD" lease acquire --duration=30 "$lb")
# break with a period: breaking, for at most that long; the holder can still release.
out=$("$IMAGENBD" lease break --break-period=10 "$lb")
echo "break: $out"
[[ "$out" =~ ^[0-9]+$ ]] && [ "$out" -ge 1 ] && [ "$out" -le 10 ] ||
    fail "lease break --break-period=10 printed '$out'"
[ "$(blob_field data.raw lease_state)" = breaking ] || fail "lease break: not breaking"
expect_status 1 "$tmpdir/l.out" "$IMAGENBD" lease renew --lease-id="$id" "$lb"
"$IMAGENBD" lease release --lease-id="$id" "$lb"
[ "$(blob_field data.raw lease_state)" = available ] || fail "release while breaking"
# Only finite durations, 15..60 (or infinite, which this test never takes).
for d in 10 61 0 abc; do
    expect_status 2 "$tmpdir/l.out" "$IMAGENBD" lease acquire --duration=$d "$lb"
done
[ "$(blob_field data.raw lease_state)" = available ] || fail "a refused acquire took a lease"
# rm with the lease id removes a leased blob.
id=$("$IMAGENBD" lease acquire --duration=15 "$lb")
"$IMAGENBD" rm --lease-id="$id" "$lb"
[ -z "$(blob_field data.raw name)" ] || fail "rm --lease-id did not remove the blob"

# --- download: holes stay sparse ------------------------------------------------------------
truncate -s 64M "$tmpdir/sparse.raw"
head -c $mib /dev/urandom | dd of="$tmpdir/sparse.raw" bs=1M seek=30 conv=notrunc status=none
"$IMAGENBD" upload "$tmpdir/sparse.raw" "$(az_uri sparse.raw)"
"$IMAGENBD" download --json --parallel=4 "$(az_uri sparse.raw)" "$tmpdir/sparse-dl.raw" \
    >"$tmpdir/dl.json"
cat "$tmpdir/dl.json"
jq -e --argjson m $mib '.size == 64 * $m and .downloaded_bytes == $m and
    .hole_bytes == 63 * $m' "$tmpdir/dl.json" >/dev/null || fail "download --json counts"
cmp "$tmpdir/sparse-dl.raw" "$tmpdir/sparse.raw" || fail "sparse download: contents differ"
if fs_supports_holes "$tmpdir"; then
    used=$(du -k "$tmpdir/sparse-dl.raw" | cut -f1)
    echo "downloaded 64 MiB, $used KiB allocated"
    [ "$used" -le 2048 ] || fail "download did not leave the holes sparse ($used KiB)"
fi

# --- container create and delete ----------------------------------------------------------
c2=az://$azure_account/${azure_container:0:55}-second
"$IMAGENBD" container create "$c2"
"$IMAGENBD" ls --json "$c2" >"$tmpdir/c2.json"
jq -e '.blobs == []' "$tmpdir/c2.json" >/dev/null || fail "a new container is not empty"
"$IMAGENBD" upload "$tmpdir/one.raw" "$c2/x.raw"
"$IMAGENBD" container delete "$c2"
expect_status 1 "$tmpdir/c2.out" "$IMAGENBD" ls "$c2"
# upload creates a missing container.
c3=az://$azure_account/${azure_container:0:55}-third
"$IMAGENBD" upload "$tmpdir/one.raw" "$c3/y.raw"
[ "$("$IMAGENBD" ls --json "$c3" | jq -r '.blobs[0].name')" = y.raw ] ||
    fail "upload did not create the missing container"

# --- az://...?snapshot=T (download --help documents it) ----------------------------------
"$IMAGENBD" upload "$tmpdir/s0.raw" "$(az_uri snap2.raw)"
t3=$("$IMAGENBD" snapshot "$(az_uri snap2.raw)")
start_imagenbd "$(az_uri snap2.raw)"
io raw "$(nbd_uri)" 'write -P 0x5a 4096 64k'
stop_imagenbd
"$IMAGENBD" download "$(az_uri snap2.raw)?snapshot=$t3" "$tmpdir/t3.raw" ||
    fail "download az://...?snapshot=T failed"
cmp "$tmpdir/t3.raw" "$tmpdir/s0.raw" || fail "download az://...?snapshot=T: not the snapshot"
