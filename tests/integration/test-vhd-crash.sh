#!/usr/bin/env bash
# SIGKILL during allocating writes to a dynamic VHD, many times (the model is
# test-vdi-crash.sh). Rounds alternate between an image made by `imagenbd create` and one
# made by qemu-img, and between qemu-io's writethrough cache (every write is FUA) and
# writeback with a flush after every fourth write. After each kill:
#   - a fresh imagenbd opens the image read-write from its end footer: the file grows
#     with its new footer in one write (BlockDevice::grow), so no kill leaves a file that
#     ends without one (falling back to the footer copy at 0 fails the test);
#   - `imagenbd check` finds no errors (leaked blocks, which a kill between the data and
#     the BAT entry leaves, are allowed: exit status 3);
#   - every write that is durable by contract is there, read through imagenbd and through
#     qemu: with FUA every acknowledged write, with writeback every write acknowledged
#     before the last flush that completed. Acknowledged writes after that flush are
#     counted, not required.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo cmp

rounds=${IMAGENBD_VHD_CRASH_ROUNDS:-16}
mib=$(( 1024 * 1024 ))
img=$tmpdir/crash.vhd
sock=$sockdir/crash.sock

# One 8 KiB write per 2 MiB block (so each allocates), at a different offset in each; a
# flush after every fourth write, then a 512-byte read at a marker offset: qemu-io runs its
# commands in order, so the marker's "read ... at offset" line means the flush completed.
cmds=()
for k in $(seq 0 47); do
    cmds+=(-c "write -P $(( k + 1 )) $(( k * 2 * mib + (k * 12288) % (2 * mib - 8192) )) 8k")
    if (( k % 4 == 3 )); then
        cmds+=(-c flush -c "read $(( 1000 * 512 + k * 512 )) 512")
    fi
done

# The server of the current round, until it has been killed and reaped.
server=
kill_server () { [ -n "$server" ] && kill -KILL "$server" 2>/dev/null; :; }
cleanup_fn kill_server

leak_rounds=0 unflushed_total=0 unflushed_missing=0

for round in $(seq "$rounds"); do
    rm -f "$img" "$sock" "$tmpdir/crash.pid"
    if (( round % 2 )); then
        "$IMAGENBD" create -f vhd --subformat dynamic "$img" 96M
    else
        qemu-img create -f vpc -o subformat=dynamic "$img" 96M >/dev/null
    fi
    cache=writethrough
    (( (round - 1) / 2 % 2 )) && cache=writeback
    "$IMAGENBD" serve -q -k "$sock" --pid-file "$tmpdir/crash.pid" "$img" \
        </dev/null >>"$tmpdir/crash-server.log" 2>&1 &
    server=$!
    for (( i = 0; i < 100; ++i )); do
        [ -s "$tmpdir/crash.pid" ] && [ -S "$sock" ] && break
        sleep 0.05
    done
    [ -S "$sock" ] || fail "round $round: the server did not start"

    qemu-io -f raw -t "$cache" "${cmds[@]}" "nbd+unix:///?socket=$sock" >"$tmpdir/io.out" 2>&1 &
    client=$!
    sleep "0.$(printf %03d $(( RANDOM % 300 + 5 )))"
    kill -KILL "$server"
    wait "$server" 2>/dev/null || :
    server=
    wait "$client" 2>/dev/null || :

    # Which writes must be there: all acknowledged ones with FUA; with writeback, those
    # before the last completed flush (its marker read).
    required=() later=()
    pending=()
    while read -r kind offset; do
        if [ "$kind" = wrote ]; then
            pending+=("$offset")
        else  # a flush completed
            required+=("${pending[@]}")
            pending=()
        fi
    done < <(sed -n 's/^\(wrote\) 8192\/8192 bytes at offset \([0-9]*\)$/\1 \2/p;
                     s/^\(read\) 512\/512 bytes at offset \([0-9]*\)$/\1 \2/p' "$tmpdir/io.out")
    if [ "$cache" = writethrough ]; then
        required+=("${pending[@]}")
    else
        later=("${pending[@]}")
    fi
    size=$(stat -c %s "$img")
    echo "round $round ($cache): ${#required[@]} writes required, ${#later[@]} unflushed," \
         "file $size bytes"

    # A fresh server opens it read-write, from the end footer.
    start_imagenbd "$img"
    nbdinfo "$uri" >"$tmpdir/info.out" 2>&1 || { cat "$tmpdir/info.out"; fail "nbdinfo"; }
    if grep -q 'using its copy at offset 0' "$imagenbd_log"; then
        fail "round $round: the file does not end in its footer after SIGKILL"
    fi
    grep -q 'is_read_only: false' "$tmpdir/info.out" ||
        fail "round $round: a sound image was served read-only"

    checks=()
    for offset in "${required[@]}"; do
        k=$(( offset / (2 * mib) ))
        checks+=(-c "read -P $(( k + 1 )) $offset 8k")
    done
    if [ ${#checks[@]} -gt 0 ]; then
        qemu-io -f raw -r "${checks[@]}" "$uri" >"$tmpdir/check.out" 2>&1 ||
            { cat "$tmpdir/check.out"; fail "round $round: durable writes missing (imagenbd)"; }
        if grep -Ei 'fail|error|pattern verification' "$tmpdir/check.out"; then
            fail "round $round: durable writes missing (imagenbd)"
        fi
    fi
    for offset in "${later[@]}"; do
        k=$(( offset / (2 * mib) ))
        unflushed_total=$(( unflushed_total + 1 ))
        qemu-io -f raw -r -c "read -P $(( k + 1 )) $offset 8k" "$uri" >"$tmpdir/late.out" 2>&1
        grep -qEi 'fail|error|pattern verification' "$tmpdir/late.out" &&
            unflushed_missing=$(( unflushed_missing + 1 ))
    done
    stop_imagenbd

    # qemu reads the same.
    if [ ${#checks[@]} -gt 0 ]; then
        qemu-io -f vpc -r "${checks[@]}" "$img" >"$tmpdir/check.out" 2>&1 ||
            { cat "$tmpdir/check.out"; fail "round $round: durable writes missing (qemu)"; }
        if grep -Ei 'fail|error|pattern verification' "$tmpdir/check.out"; then
            fail "round $round: durable writes missing (qemu)"
        fi
    fi

    status=0
    "$IMAGENBD" check "$img" >"$tmpdir/check-tool.out" 2>&1 || status=$?
    cat "$tmpdir/check-tool.out"
    case $status in
        0) ;;
        3) leak_rounds=$(( leak_rounds + 1 )) ;;
        *) fail "round $round: imagenbd check exits with $status after SIGKILL" ;;
    esac
done

echo "$rounds rounds: $leak_rounds with leaked" \
     "blocks; $unflushed_missing of $unflushed_total acknowledged but unflushed writes lost"
