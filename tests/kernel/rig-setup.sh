# shellcheck shell=bash
# Sourced by run-kernel-test.sh and make-rootfs-image.sh: installs the host
# tools, fetches a Debian kernel and builds the test initramfs in a cache dir.
#
# Environment:
#   IMAGENBD_KERNEL_CACHE  cache dir (default ~/.cache/imagenbd-kernel-rig; the
#                     rig's own name KERNEL_RIG_CACHE works too)
#   KERNEL_RIG_PKG    kernel package to boot (default: what linux-image-amd64
#                     depends on, e.g. linux-image-6.1.0-56-amd64)

RIG_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# depmod, modprobe, mke2fs and e2fsck live in /usr/sbin, which is not on a Debian user's PATH.
PATH=$PATH:/usr/sbin:/sbin
# In the user's cache rather than /tmp: the kernel and the initramfs survive a reboot and
# are shared by every checkout and build tree.
RIG_CACHE=${IMAGENBD_KERNEL_CACHE:-${KERNEL_RIG_CACHE:-${HOME:-/tmp}/.cache/imagenbd-kernel-rig}}
# Modules the guest needs; their dependencies are resolved with modprobe.
RIG_MODULES=(virtio_pci virtio_net nbd ext4)

rig_log() { echo "kernel-rig: $*" >&2; }
rig_die() {
    echo "kernel-rig: error: $*" >&2
    exit 4
}

# apt-get that waits for a dpkg lock held by someone else instead of failing
rig_apt() {
    local sudo=
    [ "$(id -u)" = 0 ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -q -o DPkg::Lock::Timeout=300 "$@"
}

rig_pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# Host tools: qemu, a static busybox (initramfs and NBD root), nbd-client and
# e2fsprogs (copied into the initramfs), kmod (module dependency order).
rig_ensure_host_tools() {
    local pkg missing=()
    for pkg in qemu-system-x86 busybox-static nbd-client e2fsprogs kmod util-linux; do
        rig_pkg_installed "$pkg" || missing+=("$pkg")
    done
    [ ${#missing[@]} = 0 ] && return 0
    rig_log "installing ${missing[*]}"
    rig_apt install -y --no-install-recommends "${missing[@]}" >"$RIG_CACHE/apt-install.log" 2>&1 ||
        {
            rig_apt update >>"$RIG_CACHE/apt-install.log" 2>&1
            rig_apt install -y --no-install-recommends "${missing[@]}" >>"$RIG_CACHE/apt-install.log" 2>&1
        } ||
        rig_die "apt-get install ${missing[*]} failed; see $RIG_CACHE/apt-install.log"
}

rig_kernel_pkg() {
    if [ -n "${KERNEL_RIG_PKG:-}" ]; then
        echo "$KERNEL_RIG_PKG"
        return
    fi
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        rig_apt update >"$RIG_CACHE/apt-update.log" 2>&1 || true
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    fi
    if [ -z "$pkg" ]; then # offline: fall back to a kernel already in the cache
        pkg=$(find "$RIG_CACHE/kernel" -mindepth 2 -maxdepth 2 -name .done 2>/dev/null |
            sed 's|/.done$||; s|.*/||' | sort -V | tail -n 1)
    fi
    [ -n "$pkg" ] || rig_die "cannot tell which linux-image package to use (apt-cache depends linux-image-amd64 gave nothing)"
    echo "$pkg"
}

# Sets RIG_KERNEL_DIR (vmlinuz, the needed .ko files, modules.list) and
# RIG_KVER. The package is downloaded with apt-get download and unpacked
# with dpkg-deb; only vmlinuz and the needed modules are kept.
rig_ensure_kernel() {
    local pkg dir deb tmp m cmd path ko
    pkg=$(rig_kernel_pkg)
    dir=$RIG_CACHE/kernel/$pkg
    RIG_KERNEL_DIR=$dir
    if [ ! -f "$dir/.done" ]; then
        rig_log "fetching $pkg"
        mkdir -p "$RIG_CACHE/debs"
        rm -f "$RIG_CACHE/debs/${pkg}_"*.deb
        (cd "$RIG_CACHE/debs" && apt-get -q download "$pkg" >"$RIG_CACHE/apt-download.log" 2>&1) ||
            {
                rig_apt update >>"$RIG_CACHE/apt-download.log" 2>&1
                (cd "$RIG_CACHE/debs" && apt-get -q download "$pkg" >>"$RIG_CACHE/apt-download.log" 2>&1)
            } ||
            rig_die "apt-get download $pkg failed; see $RIG_CACHE/apt-download.log (set KERNEL_RIG_PKG to another linux-image-*-amd64?)"
        deb=$(ls "$RIG_CACHE/debs/${pkg}_"*.deb)
        tmp=$(mktemp -d "$RIG_CACHE/unpack.XXXXXX")
        dpkg-deb -x "$deb" "$tmp"
        RIG_KVER=$(ls "$tmp/lib/modules")
        depmod -b "$tmp" "$RIG_KVER"
        rm -rf "$dir"
        mkdir -p "$dir/modules"
        cp "$tmp/boot/vmlinuz-$RIG_KVER" "$dir/vmlinuz"
        echo "$RIG_KVER" >"$dir/kver"
        : >"$dir/modules.list"
        for m in "${RIG_MODULES[@]}"; do
            # -C /dev/null: ignore the host's /etc/modprobe.d options
            # Lines "insmod PATH [PARAMS]" (or "builtin NAME"), deps first.
            modprobe -C /dev/null -d "$tmp" -S "$RIG_KVER" --show-depends "$m" |
                while read -r cmd path _; do
                    [ "$cmd" = insmod ] || continue
                    ko=$(basename "$path")
                    grep -qxF "$ko" "$dir/modules.list" && continue
                    cp "$path" "$dir/modules/$ko"
                    echo "$ko" >>"$dir/modules.list"
                done
        done
        grep -q '^nbd\.ko$' "$dir/modules.list" || rig_die "$pkg has no nbd.ko"
        rm -rf "$tmp" "$deb"
        touch "$dir/.done"
    fi
    RIG_KVER=$(cat "$dir/kver")
}

# Sets RIG_INITRD. The cache key covers the guest script, the kernel and the
# versions of the host packages whose binaries are copied in.
rig_ensure_initramfs() {
    local key stage bin lib ko
    key=$({
        cat "$RIG_DIR/guest/init" "$RIG_KERNEL_DIR/modules.list"
        echo "$RIG_KERNEL_DIR"
        dpkg-query -W busybox-static nbd-client e2fsprogs libc6
    } | sha256sum | cut -c1-16)
    RIG_INITRD=$RIG_CACHE/initramfs-$key.cpio.gz
    [ -f "$RIG_INITRD" ] && return 0
    rig_log "building $RIG_INITRD"
    stage=$(mktemp -d "$RIG_CACHE/stage.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,etc/rig,lib/x86_64-linux-gnu,lib64,lib/modules/rig,dev,proc,sys,tmp,mnt,newroot,run}
    install -m 755 "$RIG_DIR/guest/init" "$stage/init"
    cp /bin/busybox "$stage/bin/busybox"
    for bin in nbd-client mke2fs e2fsck; do
        bin=$(PATH=/usr/sbin:/sbin:/usr/bin:/bin command -v "$bin") || rig_die "$bin not found on the host"
        cp "$bin" "$stage/sbin/"
        # Shared libraries as ldd resolves them on this host; ld.so goes to
        # /lib64, the rest to the multiarch dir.
        ldd "$bin" | awk '/=> \// { print $3 } /^\t\/lib64\// { print $1 }' | while read -r lib; do
            case "$lib" in
            */ld-linux-*) cp -L "$lib" "$stage/lib64/$(basename "$lib")" ;;
            *) cp -L "$lib" "$stage/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
            esac
        done
    done
    ln -s mke2fs "$stage/sbin/mkfs.ext4"
    [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$stage/etc/"
    while read -r ko; do
        cp "$RIG_KERNEL_DIR/modules/$ko" "$stage/lib/modules/rig/"
    done <"$RIG_KERNEL_DIR/modules.list"
    cp "$RIG_KERNEL_DIR/modules.list" "$stage/etc/rig/modules.list"
    (cd "$stage" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -6) \
        >"$RIG_INITRD.tmp.$$"
    mv "$RIG_INITRD.tmp.$$" "$RIG_INITRD"
    rm -rf "$stage"
    find "$RIG_CACHE" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -path "$RIG_INITRD" -delete
}

# Everything a run needs, under a lock so that parallel runs build once.
rig_prepare() {
    mkdir -p "$RIG_CACHE"
    exec 9>"$RIG_CACHE/.lock"
    flock 9
    rig_ensure_host_tools
    rig_ensure_kernel
    rig_ensure_initramfs
    flock -u 9
    exec 9>&-
}
