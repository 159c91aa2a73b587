#!/usr/bin/env bash
# Transient faults between imagenbd and Azure (Azurite), and what the NBD client sees.
# (a) Azurite stopped for 3 s (and then restarted on the same port with the same data)
# in the middle of a write load: every write is acknowledged (the outage is well within
# the 60 s retry deadline), the log shows the retries, and a fresh process downloads
# every one of them. (b) Through fault_proxy.py answering every 5th request with 503
# ServerBusy and resetting every 7th connection: qemu-io writes and reads back, fio
# verifies over 2 connections, nothing fails, nothing is lost. (c) With every request
# failing and --retry-deadline=3, a write fails with EIO -- after 3 s, not before -- and
# the server serves again once the faults stop. (a') The same load as (a) while the way
# to Azurite is cut for 3 s (the proxy killed and restarted), Azurite itself staying up.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io cmp
start_azurite

mib=$(( 1024 * 1024 ))
kib=1024

# acked OUTFILE: how many writes qemu-io acknowledged.
acked () { grep -c '^wrote ' "$1" || :; }
# retries LOGFILE: how many retry lines the server logged.
retries () { grep -Eci 'retr(y|ies|ying)' "$1" || :; }
# with_endpoint PORT CMD...: run CMD with the connection string pointing at PORT.
with_endpoint ()
{
    local saved=$AZURE_STORAGE_CONNECTION_STRING status=0
    AZURE_STORAGE_CONNECTION_STRING=$(azure_connection_string "$1")
    shift
    "$@" || status=$?
    AZURE_STORAGE_CONNECTION_STRING=$saved
    return $status
}
now_ms () { echo $(( $(date +%s%N) / 1000000 )); }

# --- (b) 503 ServerBusy and connection resets ---------------------------------------------
start_fault_proxy
set_faults fail_every=5 reset_every=7
truncate -s 32M "$tmpdir/b.raw"
"$IMAGENBD" upload "$tmpdir/b.raw" "$(az_uri b.raw)"
# The server reaches Azurite only through the proxy, from its start (opening the blob and
# taking the lease are retried too).
with_endpoint "$proxy_port" start_imagenbd b="$(az_uri b.raw)"
b_log=$imagenbd_log
load=() ref=()
for (( k = 0; k < 100; ++k )); do
    off=$(( k * 160 * kib + (k % 5) * 1000 ))
    load+=(-c "write -P $(( k + 1 )) $off 96k" -c "read -P $(( k + 1 )) $off 96k")
    ref+=(-c "write -P $(( k + 1 )) $off 96k")
done
qemu-io -f raw "${load[@]}" "$(nbd_uri b)" >"$tmpdir/load-b.out" 2>&1 &
load_pid=$!
cleanup_fn kill_quietly "$load_pid"
fio_ok=
if command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then
    fio_ok=1
    fio_args=(--name=faults --ioengine=nbd --rw=randwrite --bssplit=4k/50:64k/50 --iodepth=8
              --numjobs=2 --size=4M --offset=16M --offset_increment=8M --verify=crc32c
              --verify_fatal=1 --verify_state_save=0 --randrepeat=1 --group_reporting=0)
    fio "${fio_args[@]}" --uri="$(nbd_uri b)" --do_verify=1 >"$tmpdir/fio-b.out" 2>&1 ||
        { cat "$tmpdir/fio-b.out"; fail "fio through the faulty proxy failed"; }
    cat "$tmpdir/fio-b.out"
    if grep -Ei 'verify: bad|err=[ ]*[1-9]' "$tmpdir/fio-b.out"; then
        fail "fio reported errors through the faulty proxy"
    fi
fi
status=0
wait "$load_pid" || status=$?
tail -n 4 "$tmpdir/load-b.out"
[ "$status" -eq 0 ] || fail "qemu-io exited with $status through the faulty proxy"
if grep -Ei 'fail|error|mismatch' "$tmpdir/load-b.out"; then
    fail "a request failed through the faulty proxy (503s and resets must be retried)"
fi
[ "$(acked "$tmpdir/load-b.out")" -eq 100 ] || fail "not every write was acknowledged"
cat "$proxy_stats"; echo
[ "$(proxy_count failed_503)" -ge 10 ] || fail "the proxy answered too few requests with 503"
[ "$(proxy_count resets)" -ge 5 ] || fail "the proxy reset too few connections"
r=$(retries "$b_log")
echo "server logged $r retries"
[ "$r" -ge 10 ] || fail "the server log shows too few retries ($r) for the injected faults"
must_contain "$b_log" "ServerBusy|503" "the server log (the cause of the retries)"
stop_imagenbd
set_faults

# A fresh process, straight to Azurite: the qemu-io writes, and fio's blocks.
qemu-io -f raw "${ref[@]}" "$tmpdir/b.raw" >/dev/null
"$IMAGENBD" download "$(az_uri b.raw)" "$tmpdir/b-dl.raw"
cmp -n $(( 16 * mib )) "$tmpdir/b-dl.raw" "$tmpdir/b.raw" ||
    fail "(b) acknowledged writes are missing from the blob"
if [ -n "$fio_ok" ]; then
    start_imagenbd -r "$(az_uri b.raw)"
    fio "${fio_args[@]}" --uri="$(nbd_uri)" --verify_only >"$tmpdir/fio-b2.out" 2>&1 ||
        { cat "$tmpdir/fio-b2.out"; fail "(b) fio --verify_only from a fresh process failed"; }
    stop_imagenbd
fi

# --- (c) Every request fails: EIO after the deadline, not before ------------------------
truncate -s 4M "$tmpdir/c.raw"
"$IMAGENBD" upload "$tmpdir/c.raw" "$(az_uri c.raw)"
with_endpoint "$proxy_port" start_imagenbd --retry-deadline=3 c="$(az_uri c.raw)"
c_uri=$(nbd_uri c)
io raw "$c_uri" 'write -P 0x11 0 64k'

# timed_failure WHAT FAULTS...: with those faults, a write must fail with EIO, and only
# once 3 s of retrying have passed (allowing 0.2 s for measuring from outside).
timed_failure ()
{
    local what=$1 t0 t1 ms
    shift
    set_faults "$@"
    t0=$(now_ms)
    qemu-io -f raw -c 'write -P 0x22 64k 64k' "$c_uri" >"$tmpdir/c.out" 2>&1 || :
    t1=$(now_ms)
    ms=$(( t1 - t0 ))
    cat "$tmpdir/c.out"
    echo "$what: the write failed after $ms ms"
    must_contain "$tmpdir/c.out" "Input/output error" "a write while $what"
    [ "$ms" -ge 2800 ] || fail "$what: the write failed after $ms ms, before the 3 s deadline"
    [ "$ms" -le 20000 ] || fail "$what: the write took $ms ms to fail with a 3 s deadline"
    set_faults
}
timed_failure "every request is answered 503" fail_every=1
timed_failure "every connection is reset" reset_every=1

# The server is still there, and serves again.
_alive "$imagenbd_pid" || fail "the server died after the failed writes"
io raw "$c_uri" 'write -P 0x33 64k 64k' 'read -P 0x11 0 64k' 'read -P 0x33 64k 64k'
stop_imagenbd
"$IMAGENBD" download "$(az_uri c.raw)" "$tmpdir/c-dl.raw"
qemu-io -f raw -c 'write -P 0x11 0 64k' -c 'write -P 0x33 64k 64k' "$tmpdir/c.raw" >/dev/null
cmp "$tmpdir/c-dl.raw" "$tmpdir/c.raw" || fail "(c) the blob does not hold the acknowledged writes"

# --- (a') The endpoint gone for 3 s: the proxy killed and started again on its port ----
# Like (a) below, but Azurite itself stays up (and so keeps the lease): only the way to it
# is cut, every connection dropped and new ones refused.
set_faults
truncate -s 16M "$tmpdir/p.raw"
"$IMAGENBD" upload "$tmpdir/p.raw" "$(az_uri p.raw)"
with_endpoint "$proxy_port" start_imagenbd p="$(az_uri p.raw)"
p_log=$imagenbd_log
load=() ref=()
for (( k = 0; k < 100; ++k )); do
    load+=(-c "write -P $(( k + 1 )) $(( k * 64 * kib + (k % 7) * 512 )) 60k" -c 'sleep 20')
    ref+=(-c "write -P $(( k + 1 )) $(( k * 64 * kib + (k % 7) * 512 )) 60k")
done
qemu-io -f raw "${load[@]}" "$(nbd_uri p)" >"$tmpdir/load-p.out" 2>&1 &
load_pid=$!
cleanup_fn kill_quietly "$load_pid"
for (( i = 0; i < 300; ++i )); do
    [ "$(acked "$tmpdir/load-p.out")" -ge 20 ] && break
    sleep 0.1
done
kill -KILL "$proxy_pid"
wait "$proxy_pid" 2>/dev/null || :
at_stop=$(acked "$tmpdir/load-p.out")
sleep 3
start_fault_proxy --port "$proxy_port"
status=0
wait "$load_pid" || status=$?
tail -n 3 "$tmpdir/load-p.out"
echo "proxy killed after $at_stop acknowledged writes"
[ "$at_stop" -ge 20 ] && [ "$at_stop" -lt 80 ] ||
    fail "(a') the outage did not fall in the middle of the load ($at_stop of 100 written)"
if grep -Ei 'fail|error' "$tmpdir/load-p.out"; then
    fail "(a') a write failed while the endpoint was gone for 3 s (the retry deadline is 60 s)"
fi
[ "$status" -eq 0 ] && [ "$(acked "$tmpdir/load-p.out")" -eq 100 ] ||
    fail "(a') not every write was acknowledged"
r=$(retries "$p_log")
echo "server logged $r retries"
[ "$r" -ge 1 ] || fail "(a') the server log shows no retries across the outage"
stop_imagenbd
qemu-io -f raw "${ref[@]}" "$tmpdir/p.raw" >/dev/null
"$IMAGENBD" download "$(az_uri p.raw)" "$tmpdir/p-dl.raw"
cmp "$tmpdir/p-dl.raw" "$tmpdir/p.raw" || fail "(a') acknowledged writes are missing from the blob"

# --- (a) Azurite stopped and restarted during a write load --------------------------------
# 200 writes of 60 KiB (none overlapping another), each acknowledged before the next is
# issued, 20 ms apart.
n=200
truncate -s 16M "$tmpdir/a.raw"
"$IMAGENBD" upload "$tmpdir/a.raw" "$(az_uri a.raw)"
load=()
for (( k = 0; k < n; ++k )); do
    load+=(-c "write -P $(( k % 250 + 1 )) $(( k * 64 * kib + (k % 7) * 512 )) 60k" -c 'sleep 20')
done
start_imagenbd a="$(az_uri a.raw)"
a_log=$imagenbd_log
qemu-io -f raw "${load[@]}" "$(nbd_uri a)" >"$tmpdir/load-a.out" 2>&1 &
load_pid=$!
cleanup_fn kill_quietly "$load_pid"
for (( i = 0; i < 300; ++i )); do
    [ "$(acked "$tmpdir/load-a.out")" -ge 20 ] && break
    sleep 0.1
done
stop_azurite
at_stop=$(acked "$tmpdir/load-a.out")
echo "Azurite stopped after $at_stop acknowledged writes"
sleep 3
restart_azurite
status=0
wait "$load_pid" || status=$?
tail -n 5 "$tmpdir/load-a.out"
[ "$at_stop" -ge 20 ] && [ "$at_stop" -lt $(( n - 20 )) ] ||
    fail "the outage did not fall in the middle of the load ($at_stop of $n written)"
stop_imagenbd

# First what matters most: a fresh process finds every acknowledged write ("wrote 61440/
# 61440 bytes at offset N").
"$IMAGENBD" download "$(az_uri a.raw)" "$tmpdir/a-dl.raw"
checks=() ref=()
while read -r offset; do
    k=$(( offset / (64 * kib) ))
    checks+=(-c "read -P $(( k % 250 + 1 )) $offset 60k")
    ref+=(-c "write -P $(( k % 250 + 1 )) $offset 60k")
done < <(sed -n 's/^wrote 61440\/61440 bytes at offset \([0-9]*\)$/\1/p' "$tmpdir/load-a.out")
acks=$(( ${#checks[@]} / 2 ))
echo "$acks of $n writes acknowledged"
if [ "$acks" -gt 0 ]; then
    qemu-io -f raw -r "${checks[@]}" "$tmpdir/a-dl.raw" >"$tmpdir/check-a.out" 2>&1 ||
        { cat "$tmpdir/check-a.out"; fail "(a) checking the acknowledged writes failed"; }
    if grep -Ei 'fail|error|mismatch' "$tmpdir/check-a.out"; then
        fail "(a) acknowledged writes are missing from the blob"
    fi
fi
# Then: the outage was well within the 60 s retry deadline, so nothing may have failed.
if grep -Ei 'fail|error' "$tmpdir/load-a.out"; then
    if grep -q 'lease lost' "$a_log"; then
        fail "writes failed after Azurite restarted: the server gave its lease up as lost" \
             "(Azurite 3.37 marks every lease 'expired' when it restarts; Put Page then" \
             "answers 412 LeaseNotPresentWithBlobOperation, and a renew with the same" \
             "lease id succeeds, since nobody leased the blob meanwhile)"
    fi
    fail "a write failed during a 3 s outage (the retry deadline is 60 s)"
fi
[ "$status" -eq 0 ] || fail "qemu-io exited with $status across the Azurite restart"
[ "$acks" -eq $n ] || fail "not every write was acknowledged"
# Every write acknowledged: the blob is exactly the image given the same writes.
qemu-io -f raw "${ref[@]}" "$tmpdir/a.raw" >/dev/null
cmp "$tmpdir/a-dl.raw" "$tmpdir/a.raw" || fail "(a) the blob differs from the writes made"
r=$(retries "$a_log")
echo "server logged $r retries"
[ "$r" -ge 1 ] || fail "the server log shows no retries across the outage"
