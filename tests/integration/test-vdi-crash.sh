#!/usr/bin/env bash
# SIGKILL during allocating writes to a dynamic VDI, many times: afterwards qemu-img check
# passes (no leaked or doubly used block, whenever the kill came), imagenbd opens the
# image again, and every write qemu-io saw acknowledged (with FUA: qemu-io's default
# writethrough cache) is in it.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io

rounds=${IMAGENBD_VDI_CRASH_ROUNDS:-15}
mib=$(( 1024 * 1024 ))
img=$tmpdir/crash.vdi
sock=$sockdir/crash.sock

# One 8 KiB write per block, at a different offset in each.
cmds=()
for k in $(seq 0 63); do
    cmds+=(-c "write -P $(( k + 1 )) $(( k * mib + (k * 4096) % 65536 )) 8k")
done

# The server of the current round, until it has been killed and reaped.
server=
kill_server () { [ -n "$server" ] && kill -KILL "$server" 2>/dev/null; :; }
cleanup_fn kill_server

for round in $(seq "$rounds"); do
    rm -f "$img" "$sock" "$tmpdir/crash.pid"
    qemu-img create -f vdi "$img" 64M >/dev/null
    "$IMAGENBD" serve -q -k "$sock" --pid-file "$tmpdir/crash.pid" "$img" \
        </dev/null >>"$tmpdir/crash-server.log" 2>&1 &
    server=$!
    for (( i = 0; i < 100; ++i )); do
        [ -s "$tmpdir/crash.pid" ] && [ -S "$sock" ] && break
        sleep 0.05
    done
    [ -S "$sock" ] || fail "round $round: the server did not start"

    qemu-io -f raw "${cmds[@]}" "nbd+unix:///?socket=$sock" >"$tmpdir/io.out" 2>&1 &
    client=$!
    sleep "0.$(printf %03d $(( RANDOM % 200 + 5 )))"
    kill -KILL "$server"
    wait "$server" 2>/dev/null || :
    server=
    wait "$client" 2>/dev/null || :

    qemu-img check -f vdi "$img" || fail "round $round: qemu-img check fails after SIGKILL"
    allocated=$(od -An -tu4 -j $(( 0x184 )) -N4 "$img" | tr -d ' ')
    echo "round $round: $allocated blocks allocated when killed"

    # Acknowledged writes ("wrote 8192/8192 bytes at offset N") are all there, read by
    # imagenbd (which must open the image) and by qemu.
    checks=()
    while read -r offset; do
        k=$(( offset / mib ))
        checks+=(-c "read -P $(( k + 1 )) $offset 8k")
    done < <(sed -n 's/^wrote 8192\/8192 bytes at offset \([0-9]*\)$/\1/p' "$tmpdir/io.out")
    [ ${#checks[@]} -eq 0 ] && continue
    qemu-io -f vdi -r "${checks[@]}" "$img" >"$tmpdir/check.out" 2>&1 ||
        { cat "$tmpdir/check.out"; fail "round $round: acknowledged writes missing (qemu)"; }
    start_imagenbd -r "$img"
    qemu-io -f raw -r "${checks[@]}" "$uri" >"$tmpdir/check.out" 2>&1 ||
        { cat "$tmpdir/check.out"; fail "round $round: acknowledged writes missing (imagenbd)"; }
    if grep -Ei 'fail|error' "$tmpdir/check.out"; then
        fail "round $round: acknowledged writes missing (imagenbd)"
    fi
    stop_imagenbd
done
