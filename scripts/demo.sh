#!/usr/bin/env bash
# The README's first command: install what is missing, build, and serve a demo image on
# 127.0.0.1:10809 (export "demo") in the foreground. Ctrl-C stops it. Running it again
# stops a demo server left running and starts a new one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh build
scripts/build.sh default --target imagenbd

mkdir -p demo
image=demo/demo.img
if [[ ! -f "$image" ]]; then
  # A 256 MiB sparse disk with an ext4 file system holding a README, when mkfs.ext4 is
  # there (Debian has it); otherwise a plain sparse disk with a text banner at offset 0.
  content=$(mktemp -d)
  printf 'Hello from imagenbd: this file lives on an NBD export.\n' > "$content/README.txt"
  truncate -s 256M "$image.tmp"
  if command -v mkfs.ext4 >/dev/null 2>&1 || [[ -x /sbin/mkfs.ext4 ]]; then
    PATH="$PATH:/sbin:/usr/sbin" mkfs.ext4 -q -F -L imagenbd-demo -d "$content" "$image.tmp"
  else
    printf 'imagenbd demo disk\n' | dd of="$image.tmp" conv=notrunc status=none
  fi
  rm -rf "$content"
  mv "$image.tmp" "$image"
fi

# Stop a demo server from an earlier run, so this command can be repeated.
if [[ -f demo/imagenbd.pid ]] && kill -0 "$(cat demo/imagenbd.pid)" 2>/dev/null; then
  kill "$(cat demo/imagenbd.pid)" && sleep 0.5
fi

cat <<MSG

Serving $(pwd)/$image as export "demo" on 127.0.0.1:10809. Connect with:
  qemu-img info nbd://127.0.0.1:10809/demo
  nbdinfo --map nbd://127.0.0.1:10809/demo
  nbdcopy nbd://127.0.0.1:10809/demo copy.img
  sudo nbd-client 127.0.0.1 10809 /dev/nbd0 -N demo && sudo mount /dev/nbd0 /mnt
Stop with Ctrl-C.

MSG
exec build/server/imagenbd serve --bind 127.0.0.1 --port 10809 --pid-file demo/imagenbd.pid \
  --description "imagenbd demo disk (ext4)" demo="$image"
