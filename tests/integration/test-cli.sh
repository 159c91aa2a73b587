#!/usr/bin/env bash
# The command line: --help names the main flags, --version prints a version, the word
# "serve" is optional, -k alone opens no TCP listener, -v logs connections; and every
# mistake ends promptly with a non-zero status and a message that names the culprit:
# a missing image file, an unknown format, a port in use, a bad option (with a usage
# hint), no image at all, bad numbers and sizes, duplicate export names, several
# unnamed images.
source "$(dirname "$0")/functions.sh"
set -x

requires timeout nbdinfo qemu-img

# run_fail NAME ARGS...: imagenbd ARGS must exit non-zero within 10 s, without writing
# its pidfile; output in $tmpdir/NAME.out.
run_fail ()
{
    local name=$1 status=0
    shift
    rm -f "$tmpdir/$name.pid"
    timeout 10 "$IMAGENBD" "$@" >"$tmpdir/$name.out" 2>&1 </dev/null || status=$?
    echo "--- imagenbd $* -> status $status:"
    cat "$tmpdir/$name.out"
    [ $status -ne 124 ] || fail "imagenbd $* did not exit within 10 s"
    [ $status -ne 0 ] || fail "imagenbd $* succeeded, expected an error"
    [ ! -s "$tmpdir/$name.pid" ] || fail "imagenbd $* wrote its pidfile although it failed"
}

# --- help and version ------------------------------------------------------------------------
for args in "--help" "-h" "serve --help"; do
    "$IMAGENBD" $args >"$tmpdir/help.out" 2>&1 || fail "imagenbd $args exited non-zero"
    for flag in --port --bind --socket --export-name --description --read-only --format \
                --shared --pid-file --verbose --threads --help --version memory:; do
        grep -qe "$flag" "$tmpdir/help.out" || fail "imagenbd $args does not mention $flag"
    done
done
"$IMAGENBD" --version >"$tmpdir/version.out" 2>&1 || fail "--version exited non-zero"
cat "$tmpdir/version.out"
must_contain "$tmpdir/version.out" "imagenbd.*[0-9]+\.[0-9]+(\.[0-9]+)?" "--version output"
"$IMAGENBD" -V | grep -Eq "[0-9]+\.[0-9]+" || fail "-V prints no version"

# --- "serve" is optional; -k alone means no TCP; -v logs the connection ------------------------
imagenbd_subcommand=
start_imagenbd -v -x cli-disk memory:1M
imagenbd_subcommand=serve
[ "$(nbdinfo --size "$(nbd_uri cli-disk)")" = 1048576 ] || fail "server without 'serve' misbehaves"
py3 - "$imagenbd_pid" <<'EOF' || fail "imagenbd -k without -p opened a TCP listener"
import os, sys
pid = sys.argv[1]
inodes = set()
for fd in os.listdir("/proc/%s/fd" % pid):
    target = os.readlink("/proc/%s/fd/%s" % (pid, fd))
    if target.startswith("socket:["):
        inodes.add(target[8:-1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(table).read().splitlines()[1:]
    except FileNotFoundError:
        continue
    for line in lines:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:      # LISTEN, owned by the server
            sys.exit("TCP listener %s in %s" % (f[1], table))
EOF
stop_imagenbd
must_contain "$imagenbd_log" "cli-disk" "the -v log (no mention of the export a client opened)"

# --- mistakes ---------------------------------------------------------------------------------
missing=$tmpdir/no-such-dir/missing-image.img
run_fail missing serve --pid-file "$tmpdir/missing.pid" -k "$sockdir/missing.sock" "$missing"
must_contain "$tmpdir/missing.out" "missing-image\.img" "missing image: the message does not name the file"

truncate -s 1M "$tmpdir/raw.img"
run_fail format serve --pid-file "$tmpdir/format.pid" -k "$sockdir/format.sock" -f qcow9 "$tmpdir/raw.img"
must_contain "$tmpdir/format.out" "qcow9" "unknown format: the message does not name it"

run_fail badopt serve --no-such-option -k "$sockdir/badopt.sock" memory:1M
must_contain "$tmpdir/badopt.out" "no-such-option" "bad option: the message does not name it"
grep -Eiq -- "--help|usage" "$tmpdir/badopt.out" || fail "bad option: no usage hint"

run_fail noimage serve -k "$sockdir/noimage.sock"
grep -Eiq -- "image|usage|--help" "$tmpdir/noimage.out" || fail "no image: unclear message"

run_fail badport serve -p 99999 memory:1M
must_contain "$tmpdir/badport.out" "99999" "bad port number: the message does not name it"
run_fail badport2 serve -p notaport memory:1M
must_contain "$tmpdir/badport2.out" "notaport" "bad port: the message does not name it"

run_fail badsize serve -k "$sockdir/badsize.sock" memory:12XB
must_contain "$tmpdir/badsize.out" "12XB" "bad memory size: the message does not name it"

run_fail dup serve -k "$sockdir/dup.sock" dupname=memory:1M dupname=memory:2M
must_contain "$tmpdir/dup.out" "dupname" "duplicate export: the message does not name it"

run_fail unnamed serve -k "$sockdir/unnamed.sock" memory:1M memory:2M
grep -Eiq "name" "$tmpdir/unnamed.out" || fail "several unnamed images: unclear message"

# Port in use: a second server on the port of the first.
start_imagenbd_tcp -x first memory:1M
run_fail inuse serve --pid-file "$tmpdir/inuse.pid" -b 127.0.0.1 -p "$port" memory:1M
must_contain "$tmpdir/inuse.out" "$port" "port in use: the message does not name the port"
grep -Eiq "in use|address already" "$tmpdir/inuse.out" || fail "port in use: message does not say so"
# The first server is unharmed.
[ "$(nbdinfo --size "$(nbd_uri first)")" = 1048576 ] || fail "first server broken by the second"
stop_imagenbd

# --vhd-size: a bad policy is a usage error naming it. A fixed 10 MiB VHD whose footer
# says geometry 20/16/63 (10,321,920 bytes): auto and current_size serve current_size
# (creator "qem2"), chs serves the geometry's size.
run_fail badpolicy serve --vhd-size=sideways -k "$sockdir/badpolicy.sock" memory:1M
must_contain "$tmpdir/badpolicy.out" "sideways" "bad --vhd-size: the message does not name it"
qemu-img create -q -f vpc -o subformat=fixed,force_size=on "$tmpdir/geo.vhd" 10M
footer=$(( 10 * 1024 * 1024 ))
patch_bytes "$tmpdir/geo.vhd" $(( footer + 0x38 )) 0014103f
fix_checksum "$tmpdir/geo.vhd" "$footer" 512 $(( 0x40 ))
for policy in auto:10485760 current_size:10485760 chs:10321920; do
    start_imagenbd --vhd-size="${policy%%:*}" -x geo "$tmpdir/geo.vhd"
    [ "$(nbdinfo --size "$(nbd_uri geo)")" = "${policy#*:}" ] ||
        fail "--vhd-size=${policy%%:*}: size is not ${policy#*:}"
    stop_imagenbd
done

# --parent names the parent of one image only.
run_fail twoparents serve --parent "$tmpdir/geo.vhd" -k "$sockdir/tp.sock" a=memory:1M b=memory:1M
must_contain "$tmpdir/twoparents.out" "--parent" "--parent with two images: unclear message"
