#!/usr/bin/env bash
# Installs what imagenbd needs to build and test, from Debian 12's archive; installs only
# what is missing, so running it again is cheap. Usage: scripts/install-deps.sh [build|test]
set -euo pipefail

build_packages=(cmake ninja-build g++ ccache libboost-dev libfmt-dev doctest-dev
  libcurl4-openssl-dev libssl-dev libpugixml-dev)
# The real NBD clients the tests drive, and the peers the benchmarks compare against.
test_packages=(qemu-utils libnbd-bin python3 python3-libnbd fio nbdkit e2fsprogs libvhdi-utils)

packages=("${build_packages[@]}")
if [[ "${1:-build}" == test ]]; then packages+=("${test_packages[@]}"); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "imagenbd: installing ${missing[*]}" >&2
sudo=()
if ((EUID != 0)); then sudo=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
# Another apt may hold the lock (unattended upgrades): wait for it rather than fail.
apt_opts=(-o DPkg::Lock::Timeout=300)
"${sudo[@]}" apt-get "${apt_opts[@]}" update -qq
"${sudo[@]}" apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}"
