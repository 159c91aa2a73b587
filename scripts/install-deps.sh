#!/usr/bin/env bash
# Installs what imagenbd needs to build and test, from Debian 12's archive; installs only
# what is missing, so running it again is cheap. Usage: scripts/install-deps.sh [build|test]
set -euo pipefail

build_packages=(cmake ninja-build g++ ccache libboost-dev libfmt-dev doctest-dev
  libcurl4-openssl-dev libssl-dev libpugixml-dev libtomlplusplus-dev)
# The real NBD clients the tests drive, and the peers the benchmarks compare against.
# openssl makes the test certificates, gnutls-bin's psktool the PSK files; systemd gives
# systemd-analyze and systemd-socket-activate.
test_packages=(qemu-utils libnbd-bin python3 python3-libnbd fio nbdkit e2fsprogs libvhdi-utils
  openssl gnutls-bin systemd)
# The kernel rig (tests/kernel) boots a Debian kernel (fetched with apt-get download) under
# qemu; its initramfs takes busybox, nbd-client and mke2fs/e2fsck from the host.
test_packages+=(qemu-system-x86 busybox-static nbd-client kmod util-linux)
# test-systemd-units: systemd-analyze verify wants ExecReload's /bin/kill.
test_packages+=(procps)
# test-http-leaf: a range-capable web server for the http leaf.
test_packages+=(nginx)

packages=("${build_packages[@]}")
if [[ "${1:-build}" == test ]]; then packages+=("${test_packages[@]}"); fi

# The Azure tests run against Azurite (npm), pinned to the version formats.md §3.10 was
# verified on. It needs node and npm; Debian's nodejs 18 runs it (its "engines" asks for 22,
# which npm only warns about), so Debian's are installed only when there is no npm at all.
azurite_version=3.37.0
need_azurite=0
if [[ "${1:-build}" == test ]] && ! command -v azurite-blob >/dev/null 2>&1; then
  need_azurite=1
  if ! command -v npm >/dev/null 2>&1; then packages+=(nodejs npm); fi
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0 && need_azurite == 0)); then
  exit 0
fi

sudo=()
if ((EUID != 0)); then sudo=(sudo); fi
if ((${#missing[@]} > 0)); then
  echo "imagenbd: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Another apt may hold the lock (unattended upgrades): wait for it rather than fail.
  apt_opts=(-o DPkg::Lock::Timeout=300)
  "${sudo[@]}" apt-get "${apt_opts[@]}" update -qq
  "${sudo[@]}" apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}"
fi
if ((need_azurite)); then
  echo "imagenbd: installing azurite@$azurite_version (npm install -g)" >&2
  "${sudo[@]}" npm install -g --no-fund --no-audit --loglevel=error "azurite@$azurite_version"
fi
