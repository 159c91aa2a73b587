#!/bin/bash
# Test an NBD server on 127.0.0.1 with the real Linux kernel nbd client.
#
# Boots a Debian kernel under qemu (KVM when /dev/kvm works, TCG otherwise)
# with a small initramfs (guest/init) that attaches /dev/nbd0 with nbd-client
# through qemu's user-mode network (the guest reaches the host's 127.0.0.1 as
# 10.0.2.2) and runs one test mode. Exits 0 only if the guest printed PASS.
# See README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: run-kernel-test.sh --port PORT --export NAME [options]

Attach an NBD export served on 127.0.0.1:PORT as /dev/nbd0 in a qemu guest
running a Debian kernel, and test it with the kernel's own nbd driver.

  --port PORT            TCP port of the server on 127.0.0.1 (required)
  --export NAME          export name passed to nbd-client -N (required; may be "")
  --mode MODE            read   (default) attach read-only (-R), read the device
                                twice (O_DIRECT 1 MiB and buffered 4 KiB), hashes
                                must agree; a write must be refused
                         write  raw O_DIRECT writes + flush read back, mkfs.ext4,
                                write files, umount, detach, reattach, e2fsck -fn,
                                verify every file (DESTROYS the export's data)
                         rootfs mount the export's ext4 as the root filesystem
                                (switch_root) and run its /sbin/init, which must
                                print PASS (image: make-rootfs-image.sh)
  --expect-sha256 HEX    read mode: sha256 the read range must have
  --read-bytes N         read mode: read only the first N bytes (default: all;
                         a multiple of 512)
  --expect-size BYTES    fail unless the device has exactly this size
  --client-opts "ARGS"   extra nbd-client arguments, e.g. "-b 4096", "-C 2", "-L"
  --timeout SECONDS      kill the guest after this long (default 300)
  --accel auto|kvm|tcg   qemu accelerator (default auto: kvm if usable)
  --smp N                guest CPUs (default 2)
  --log FILE             serial console log (default CACHE/logs/MODE-TIME-PID.log)
  --quiet                do not stream the console to stdout
  --build-only           only install tools, fetch the kernel, build the initramfs
  -h, --help             this text

Exit status: 0 PASS, 1 FAIL (guest said FAIL or stopped without PASS),
2 usage error, 3 timeout, 4 setup error.
Environment: IMAGENBD_KERNEL_CACHE (default ~/.cache/imagenbd-kernel-rig), KERNEL_RIG_PKG.
EOF
}

PORT='' EXPORT='' EXPORT_SET='' MODE=read EXPECT='' READ_BYTES='' EXPECT_SIZE='' CLIENT_OPTS=''
TIMEOUT=300 ACCEL=auto SMP=2 LOG='' QUIET='' BUILD_ONLY=''
bad_usage() {
    echo "run-kernel-test.sh: $*" >&2
    echo "Try 'run-kernel-test.sh --help'." >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
    --port) PORT=${2-} && shift ;;
    --export) EXPORT=${2-} EXPORT_SET=1 && shift ;;
    --mode) MODE=${2-} && shift ;;
    --expect-sha256) EXPECT=${2-} && shift ;;
    --read-bytes) READ_BYTES=${2-} && shift ;;
    --expect-size) EXPECT_SIZE=${2-} && shift ;;
    --client-opts) CLIENT_OPTS=${2-} && shift ;;
    --timeout) TIMEOUT=${2-} && shift ;;
    --accel) ACCEL=${2-} && shift ;;
    --smp) SMP=${2-} && shift ;;
    --log) LOG=${2-} && shift ;;
    --quiet) QUIET=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) bad_usage "unknown argument '$1'" ;;
    esac
    shift
done

# shellcheck source=rig-setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/rig-setup.sh"

if [ -z "$BUILD_ONLY" ]; then
    if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
        bad_usage "--port needs a TCP port number"
    fi
    [ -n "$EXPORT_SET" ] || bad_usage "--export NAME is required (use --export '' for the default export)"
    case "$MODE" in read | write | rootfs) ;; *) bad_usage "--mode must be read, write or rootfs" ;; esac
    [ -z "$EXPECT" ] || [[ "$EXPECT" =~ ^[0-9a-f]{64}$ ]] || bad_usage "--expect-sha256 needs 64 lowercase hex digits"
    [ -z "$READ_BYTES" ] || { [[ "$READ_BYTES" =~ ^[0-9]+$ ]] && [ $((READ_BYTES % 512)) = 0 ] && [ "$READ_BYTES" -gt 0 ]; } ||
        bad_usage "--read-bytes needs a positive multiple of 512"
    [ -z "$EXPECT_SIZE" ] || [[ "$EXPECT_SIZE" =~ ^[0-9]+$ ]] || bad_usage "--expect-size needs a number of bytes"
    [[ "$TIMEOUT" =~ ^[0-9]+$ ]] || bad_usage "--timeout needs seconds"
    [[ "$SMP" =~ ^[0-9]+$ ]] || bad_usage "--smp needs a number"
    case "$ACCEL" in auto | kvm | tcg) ;; *) bad_usage "--accel must be auto, kvm or tcg" ;; esac
    [ ${#EXPORT} -le 400 ] || bad_usage "export names longer than 400 bytes do not fit on the kernel command line"
    [ ${#CLIENT_OPTS} -le 200 ] || bad_usage "--client-opts is too long"
fi

T_START=$(date +%s.%N)
rig_prepare
if [ -n "$BUILD_ONLY" ]; then
    echo "kernel:    $RIG_KERNEL_DIR/vmlinuz ($RIG_KVER)"
    echo "initramfs: $RIG_INITRD"
    exit 0
fi

hex() { printf %s "$1" | od -An -tx1 -v | tr -d ' \n'; }

QEMU_PID='' TAIL_PID=''
# shellcheck disable=SC2317 # called from traps
cleanup() {
    [ -z "$QEMU_PID" ] || kill "$QEMU_PID" 2>/dev/null || true
    [ -z "$TAIL_PID" ] || kill "$TAIL_PID" 2>/dev/null || true
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# boot_guest ACCEL CMDLINE LOG TIMEOUT STREAM MARKER: boots the guest with
# the serial console going to LOG (and to stdout if STREAM is set); returns
# once qemu exits, TIMEOUT seconds pass, or 15 s after the guest printed its
# result line (MARKER), should the power-off hang. Sets BOOT_TIMED_OUT and
# BOOT_QEMU_RC.
boot_guest() {
    local accel=$1 cmdline=$2 log=$3 timeout=$4 stream=$5 marker=$6 cpu=max deadline now result_seen=
    [ "$accel" = kvm ] && cpu=host
    : >"$log"
    # Serial console to a file; user-mode network without option ROMs.
    qemu-system-x86_64 -name kernel-nbd-rig -machine pc -accel "$accel" -cpu "$cpu" -smp "$SMP" -m 512 \
        -nodefaults -no-user-config -display none -no-reboot -monitor none \
        -kernel "$RIG_KERNEL_DIR/vmlinuz" -initrd "$RIG_INITRD" -append "$cmdline" \
        -chardev file,id=con0,path="$log" -serial chardev:con0 \
        -netdev user,id=net0 -device virtio-net-pci,netdev=net0,romfile= \
        </dev/null >"$log.qemu-stderr" 2>&1 &
    QEMU_PID=$!
    if [ -n "$stream" ]; then
        tail -n +1 -f --pid="$QEMU_PID" "$log" &
        TAIL_PID=$!
    fi
    deadline=$(($(date +%s) + timeout))
    BOOT_TIMED_OUT=
    while kill -0 "$QEMU_PID" 2>/dev/null; do
        now=$(date +%s)
        if [ -z "$result_seen" ] && grep -qF "$marker" "$log"; then
            result_seen=1
            [ $((now + 15)) -ge "$deadline" ] || deadline=$((now + 15))
        fi
        if [ "$now" -ge "$deadline" ]; then
            [ -n "$result_seen" ] || BOOT_TIMED_OUT=1
            kill "$QEMU_PID" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    BOOT_QEMU_RC=0
    wait "$QEMU_PID" 2>/dev/null || BOOT_QEMU_RC=$?
    QEMU_PID=''
    [ -s "$log.qemu-stderr" ] || rm -f "$log.qemu-stderr"
    if [ -n "$TAIL_PID" ]; then
        wait "$TAIL_PID" 2>/dev/null || true
        TAIL_PID=''
    fi
}

# /dev/kvm can be there and still unable to boot a stock kernel (nested
# setups such as kvm_pvm hang it; some hosts reject -cpu host MSRs), so
# "auto" boots the guest once in probe mode under KVM and keeps the verdict
# for this host boot.
kvm_boots() {
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    local verdict nonce
    verdict=$RIG_CACHE/kvm-verdict-$(cat /proc/sys/kernel/random/boot_id)-$(basename "$RIG_INITRD" .cpio.gz)
    if [ ! -f "$verdict" ]; then
        nonce=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
        mkdir -p "$RIG_CACHE/logs"
        # 2>/dev/null: bash's "Aborted" notice if qemu dies of a signal
        boot_guest kvm "console=ttyS0,115200 panic=-1 quiet no_timer_check rig.mode=probe rig.nonce=$nonce" \
            "$RIG_CACHE/logs/kvm-probe.log" 25 "" "KERNEL-NBD-TEST $nonce " 2>/dev/null
        rm -f "$RIG_CACHE"/kvm-verdict-*
        if grep -qF "KERNEL-NBD-TEST $nonce PASS" "$RIG_CACHE/logs/kvm-probe.log"; then
            echo ok >"$verdict"
        else
            echo no >"$verdict"
            rig_log "KVM: /dev/kvm is there but a test boot did not reach /init in 25 s" \
                "(see $RIG_CACHE/logs/kvm-probe.log*); using TCG"
        fi
    fi
    [ "$(cat "$verdict")" = ok ]
}
if [ "$ACCEL" = auto ]; then
    if kvm_boots; then ACCEL=kvm; else ACCEL=tcg; fi
fi

NONCE=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
# no_timer_check: under TCG on a loaded host the kernel's early check of the timer
# interrupt can miss and panic ("IO-APIC + timer doesn't work!"; seen with load 11 on 2
# cores); virtual machines skip that check as a rule.
CMDLINE="console=ttyS0,115200 panic=-1 quiet no_timer_check rig.mode=$MODE rig.port=$PORT rig.nonce=$NONCE"
CMDLINE+=" rig.export=$(hex "$EXPORT") rig.opts=$(hex "$CLIENT_OPTS")"
[ -z "$EXPECT" ] || CMDLINE+=" rig.expect=$EXPECT"
[ -z "$READ_BYTES" ] || CMDLINE+=" rig.readbytes=$READ_BYTES"
[ -z "$EXPECT_SIZE" ] || CMDLINE+=" rig.size=$EXPECT_SIZE"

if [ -z "$LOG" ]; then
    mkdir -p "$RIG_CACHE/logs"
    LOG=$RIG_CACHE/logs/$MODE-$(date +%Y%m%d-%H%M%S)-$$.log
fi

echo "run-kernel-test: mode=$MODE export='$EXPORT' server=127.0.0.1:$PORT kernel=$RIG_KVER accel=$ACCEL log=$LOG"
T_BOOT=$(date +%s.%N)
stream=
[ -n "$QUIET" ] || stream=1
# 2>/dev/null: qemu's stderr is in $LOG.qemu-stderr
boot_guest "$ACCEL" "$CMDLINE" "$LOG" "$TIMEOUT" "$stream" "KERNEL-NBD-TEST $NONCE " 2>/dev/null

since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
summary="mode=$MODE export='$EXPORT' port=$PORT accel=$ACCEL boot+test $(since "$T_BOOT")s total $(since "$T_START")s log=$LOG"
PASS_LINE="KERNEL-NBD-TEST $NONCE PASS"
FAIL_LINE="KERNEL-NBD-TEST $NONCE FAIL"
if grep -qF "$PASS_LINE" "$LOG"; then
    echo "run-kernel-test: PASS $summary"
    exit 0
fi
[ -z "$QUIET" ] || tail -n 40 "$LOG" >&2
if [ -n "$BOOT_TIMED_OUT" ]; then
    echo "run-kernel-test: FAIL (timeout after ${TIMEOUT}s) $summary" >&2
    exit 3
fi
if grep -qF "$FAIL_LINE" "$LOG"; then
    echo "run-kernel-test: FAIL ($(grep -F "$FAIL_LINE" "$LOG" | head -n 1 | sed "s/.*$FAIL_LINE //")) $summary" >&2
else
    [ ! -f "$LOG.qemu-stderr" ] || sed 's/^/qemu: /' "$LOG.qemu-stderr" >&2
    echo "run-kernel-test: FAIL (guest stopped without a result; qemu exit $BOOT_QEMU_RC) $summary" >&2
fi
exit 1
