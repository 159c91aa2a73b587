# The Linux kernel's own NBD client against imagenbd: shared by test-kernel-*.sh, sourced
# after functions.sh.
#
# The host kernel has no nbd module (and the tests run without root), so the vendored rig
# in tests/kernel (see its README.md) boots a Debian kernel under qemu, whose nbd-client
# attaches the export as /dev/nbd0 through qemu's user network: the guest reaches the
# host's 127.0.0.1 as 10.0.2.2, so the server listens on 127.0.0.1 (start_imagenbd_tcp).
#
# qemu-system-x86_64 missing is the only skip (and a failure with IMAGENBD_REQUIRE_ALL=1);
# the rig installs its other tools and fetches the kernel with apt-get into
# IMAGENBD_KERNEL_CACHE (default ~/.cache/imagenbd-kernel-rig), and a failure there (rig
# exit 4) fails the test: CI must not pass without having booted the kernel.

kernel_rig=$(cd "$srcdir/../kernel" && pwd)
# e2fsck, debugfs and mkfs.ext4 live in /usr/sbin, which is not on a Debian user's PATH.
PATH=$PATH:/usr/sbin:/sbin
requires qemu-system-x86_64 qemu-img e2fsck debugfs

MiB=1048576

# elapsed_since T0: seconds since T0 (date +%s.%N), one decimal.
elapsed_since ()
{
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

# image_from_raw FORMAT RAW OUT: OUT holds RAW's bytes as a raw file, a dynamic VHD or a
# dynamic VDI (qemu-img convert skips zeroes, so RAW's holes stay unallocated blocks).
image_from_raw ()
{
    case "$1" in
        raw) cp --sparse=always "$2" "$3" ;;
        vhd) qemu-img convert -f raw -O vpc -o subformat=dynamic "$2" "$3" ;;
        vdi) qemu-img convert -f raw -O vdi -o static=off "$2" "$3" ;;
        *) fail "image_from_raw: unknown format $1" ;;
    esac
}

# qemu_format FORMAT: qemu's name for it.
qemu_format ()
{
    case "$1" in vhd) echo vpc ;; *) echo "$1" ;; esac
}

# host_view FORMAT IMAGE OUT: the image's virtual disk as qemu reads it, as a raw file.
host_view ()
{
    qemu-img convert -f "$(qemu_format "$1")" -O raw "$2" "$3" ||
        fail "qemu-img cannot read $2 ($1) after the kernel wrote through imagenbd"
}

# kernel_run MODE EXPORT [RUN-KERNEL-TEST-ARGS...]: boot the rig's guest against export
# EXPORT of the latest server (start_imagenbd_tcp) and require its PASS line.
kernel_run ()
{
    local mode=$1 name=$2 rc=0 t0 log
    shift 2
    [ -n "$port" ] || fail "kernel_run: the server has no TCP port (use start_imagenbd_tcp)"
    log=$tmpdir/kernel-$mode-$name.log
    t0=$(date +%s.%N)
    "$kernel_rig/run-kernel-test.sh" --quiet --port "$port" --export "$name" --mode "$mode" \
        --log "$log" "$@" >"$tmpdir/kernel.out" 2>&1 || rc=$?
    cat "$tmpdir/kernel.out"
    # The guest's own log lines (rig: ...) say what it checked, with its timings.
    grep -E '^(rig|rootfs-init): ' "$log" 2>/dev/null || :
    echo "$test_name: TIME kernel $mode '$name' $* : $(elapsed_since "$t0") s (exit $rc)" >&2
    case $rc in
        0) ;;
        3) fail "kernel $mode on '$name': the guest timed out (log: $log)" ;;
        4) fail "kernel $mode on '$name': the rig could not set up (packages, kernel" \
                "download, initramfs; see above). Not a skip: fix the environment" ;;
        *) fail "kernel $mode on '$name': the guest did not pass (exit $rc, log: $log)" ;;
    esac
}

# kernel_write_formats CLIENT-OPTS FORMAT...: the rig's write mode on a fresh 64 MiB image
# of each FORMAT (one server, export disk-FORMAT each), with extra nbd-client options
# CLIENT-OPTS (e.g. "-C 4"); then, with the server stopped, the host's view of each image
# must be a clean ext4 holding the 16 MiB file the guest listed in its manifest.
kernel_write_formats ()
{
    local opts=$1 fmt connections=1 got want
    local -a exports=() rig_opts=()
    shift
    [ -z "$opts" ] || rig_opts=(--client-opts "$opts")
    [[ "$opts" =~ -C\ *([0-9]+) ]] && connections=${BASH_REMATCH[1]}
    truncate -s 64M "$tmpdir/blank.raw"
    for fmt in "$@"; do
        image_from_raw "$fmt" "$tmpdir/blank.raw" "$tmpdir/disk.$fmt"
        exports+=("disk-$fmt=$tmpdir/disk.$fmt")
    done
    start_imagenbd_tcp "${exports[@]}"
    for fmt in "$@"; do
        kernel_run write "disk-$fmt" "${rig_opts[@]}"
        # Attached twice (the reattach before e2fsck), each time with every connection.
        got=$(grep -c "connected to export 'disk-$fmt'" "$imagenbd_log" || :)
        [ "$got" = $((2 * connections)) ] ||
            fail "disk-$fmt: $got connections in the server log, expected $((2 * connections))"
    done
    stop_imagenbd   # flushes and closes; must exit 0

    for fmt in "$@"; do
        host_view "$fmt" "$tmpdir/disk.$fmt" "$tmpdir/view.raw"
        e2fsck -fn "$tmpdir/view.raw" >"$tmpdir/fsck.out" 2>&1 || {
            cat "$tmpdir/fsck.out"
            fail "the ext4 the kernel made on disk-$fmt is not clean on the host"
        }
        debugfs -R 'cat /manifest' "$tmpdir/view.raw" >"$tmpdir/manifest" 2>/dev/null
        want=$(awk '$2 == "./big.bin" { print $1 }' "$tmpdir/manifest")
        [ -n "$want" ] || fail "disk-$fmt: no big.bin in the guest's manifest on the host"
        rm -f "$tmpdir/big.bin"
        debugfs -R "dump /big.bin $tmpdir/big.bin" "$tmpdir/view.raw" >/dev/null 2>&1
        got=$(sha256sum <"$tmpdir/big.bin" | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "disk-$fmt: big.bin on the host differs from what the guest wrote"
        [ "$(wc -l <"$tmpdir/manifest")" -ge 201 ] ||
            fail "disk-$fmt: the manifest on the host lists too few files"
    done
}
