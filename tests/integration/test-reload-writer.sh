#!/usr/bin/env bash
# A reload must not open a writable dynamic VHD a second time while clients still write to
# it through the running export: the two stacks would each keep their own block table and
# end of file, allocate the same blocks and overwrite each other's table. Changing such an
# export (here only its description) with a client connected is refused and logged, the
# old export keeps serving old and new clients; once the client has left, the same reload
# goes through. Every block written, before and after, reads back and `imagenbd check`
# finds the image consistent.
source "$(dirname "$0")/functions.sh"
set -x

requires_nbdsh

"$IMAGENBD" create -f vhd "$tmpdir/d.vhd" 64M >/dev/null
cfg=$tmpdir/imagenbd.toml
# write_config DESCRIPTION: one writable export 'd' of the VHD.
write_config ()
{
    printf '[[export]]\nname = "d"\nimage = "d.vhd"\ndescription = "%s"\n' "$1" >"$cfg.tmp"
    mv "$cfg.tmp" "$cfg"
}
write_config one
start_imagenbd --config "$cfg"

# hup N: SIGHUP the server and wait for the outcome of the Nth reload in its log.
hup ()
{
    local i
    kill -HUP "$imagenbd_pid"
    for (( i = 0; i < 150; ++i )); do
        [ "$(grep -Ec 'configuration reloaded|reload failed' "$imagenbd_log")" -ge "$1" ] && return
        sleep 0.1
    done
    fail "reload $1: no outcome in the log"
}

# write_at BYTE OFFSET: one new client writes 64 KiB of BYTE at OFFSET (a fresh block).
write_at ()
{
    nbdsh_py -n -c - <<EOF || fail "writing $1 at $2 failed"
import nbd
h = nbd.NBD()
h.set_export_name("d")
h.connect_unix("$sock")
h.pwrite(b"$1" * 65536, $2)
h.flush()
h.shutdown()
EOF
}

# A client that writes block 0, stays connected until told, then writes at 8 MiB.
cat >"$tmpdir/client.py" <<'EOF'
import os, time
import nbd
d = os.environ["DIR"]
h = nbd.NBD()
h.set_export_name("d")
h.connect_unix(os.environ["SOCK"])
h.pwrite(b"A" * 65536, 0)
open(d + "/wrote", "w").close()
deadline = time.time() + 60
while not os.path.exists(d + "/go"):
    if time.time() > deadline:
        raise SystemExit("never told to go on")
    time.sleep(0.05)
h.pwrite(b"B" * 65536, 8 << 20)
h.flush()
h.shutdown()
print("ok")
EOF
SOCK=$sock DIR=$tmpdir nbdsh_py -n -c - <"$tmpdir/client.py" >"$tmpdir/client.log" 2>&1 &
client=$!
cleanup_fn kill_quietly "$client"
for _ in $(seq 200); do [ -e "$tmpdir/wrote" ] && break; sleep 0.1; done
[ -e "$tmpdir/wrote" ] || { cat "$tmpdir/client.log" >&2; fail "the client did not write"; }

# --- reload 1, with the writer connected: refused, nothing changes ---------------------
write_config two
hup 1
must_contain "$imagenbd_log" "reload failed.*still written by the clients of the running export 'd'" \
    "the reload with a writer connected"
# New clients still get the running export, and allocate through the same stack.
write_at C $(( 16 << 20 ))
touch "$tmpdir/go"
wait "$client" || { cat "$tmpdir/client.log" >&2; fail "the connected client failed"; }
must_contain "$tmpdir/client.log" '^ok' "the connected client"

# --- reload 2, nobody connected: the export is reopened ---------------------------------
# Both clients are gone once the server has logged their ends (the connection count drops
# right after that line).
for _ in $(seq 100); do
    [ "$(grep -c "disconnected from 'd'" "$imagenbd_log")" -ge 2 ] && break
    sleep 0.1
done
sleep 0.2
hup 2
must_contain "$imagenbd_log" 'configuration reloaded: 0 added, 0 removed, 1 changed, 0 unchanged'
write_at D $(( 24 << 20 ))
stop_imagenbd

# --- the image: consistent, every block where it was written ----------------------------
"$IMAGENBD" check "$tmpdir/d.vhd" >"$tmpdir/check.out" 2>&1 ||
    { cat "$tmpdir/check.out" >&2; fail "imagenbd check finds the image damaged"; }
start_imagenbd -r "$tmpdir/d.vhd"
nbdsh_py -u "$(nbd_uri)" -c - <<'EOF' || fail "a block did not read back"
for byte, offset in ((b"A", 0), (b"B", 8 << 20), (b"C", 16 << 20), (b"D", 24 << 20)):
    got = h.pread(65536, offset)
    assert got == byte * 65536, "at %d: %r..." % (offset, got[:16])
EOF
stop_imagenbd
