#!/usr/bin/env bash
# Azure exports from a config file (Azurite): the connection string comes from
# `credentials = "file:PATH"` (relative to the file, trailing newline ignored) and
# `credentials = "env:VAR"`, with no AZURE_STORAGE_* variable in the server's environment;
# inline secrets and unset variables are refused. Reload and blob leases: a changed
# writable export of the same blob is refused while the running one holds the lease
# (nothing changes); removing it gives the lease back, so adding it back works.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io nbdinfo
start_azurite

truncate -s 4M "$tmpdir/disk.img"
qemu-io -f raw -c 'write -P 0x5a 0 1M' "$tmpdir/disk.img" >/dev/null
"$IMAGENBD" upload "$tmpdir/disk.img" "$(az_uri disk.img)"

mkdir -p "$tmpdir/etc"
cfg=$tmpdir/etc/imagenbd.toml
echo "$AZURE_STORAGE_CONNECTION_STRING" >"$tmpdir/etc/azure.secret"  # with a newline
export IMAGENBD_TEST_AZURE=$AZURE_STORAGE_CONNECTION_STRING
unset AZURE_STORAGE_CONNECTION_STRING

blob=$'[[export]]\nname = "blob"\nimage = "'"$(az_uri disk.img)"$'"\ncredentials = "file:azure.secret"'
snap=$'[[export]]\nname = "snap"\nimage = "'"$(az_uri disk.img)"$'"\nread-only = true\ncredentials = "env:IMAGENBD_TEST_AZURE"'
write_config () { printf '%s\n' "$@" >"$cfg.tmp"; mv "$cfg.tmp" "$cfg"; }
write_config "$blob" "$snap"

"$IMAGENBD" check-config "$cfg" >"$tmpdir/check.out"
must_contain "$tmpdir/check.out" 'OK, 2 exports \(blob, snap\)'

start_imagenbd --config "$cfg"
[ "$(nbdinfo --size "$(nbd_uri blob)")" = 4194304 ] || fail "blob not served"
io raw "$(nbd_uri blob)" 'read -P 0x5a 0 1M' 'write -P 0x6b 1M 64k' 'flush'
qemu-io -r -f raw -c 'read -P 0x6b 1M 64k' "$(nbd_uri snap)" | tee "$tmpdir/snap.out"
must_contain "$tmpdir/snap.out" 'read 65536/65536 bytes'
! grep -q 'verification failed' "$tmpdir/snap.out" || fail "snap does not see the blob's data"

# A changed writable export of the same blob: refused, the running one stays.
write_config "$blob"$'\ndescription = "changed"' "$snap"
reload_imagenbd 1
must_contain "$imagenbd_log" "reload failed, the previous configuration stays: export 'blob': its settings changed, but the running export holds the blob's lease"
io raw "$(nbd_uri blob)" 'read -P 0x6b 1M 64k' 'write -P 0x7c 2M 64k'

# Removed: the lease goes back (no client uses it); added back with the new settings.
write_config "$snap"
reload_imagenbd 2
must_contain "$imagenbd_log" 'configuration reloaded: 0 added, 1 removed, 0 changed, 1 unchanged'
must_contain "$imagenbd_log" "export 'blob' \(removed by a reload\): closed"
write_config "$blob"$'\ndescription = "changed"' "$snap"
reload_imagenbd 3
must_contain "$imagenbd_log" 'configuration reloaded: 1 added, 0 removed, 0 changed, 1 unchanged'
nbdinfo --list "$(nbd_uri blob)" >"$tmpdir/list.out"
must_contain "$tmpdir/list.out" 'description: changed'
io raw "$(nbd_uri blob)" 'read -P 0x7c 2M 64k' 'write -P 0x8d 3M 64k' 'flush'
stop_imagenbd

# Refused: an inline secret, an unset variable.
printf '[[export]]\nname = "x"\nimage = "%s"\ncredentials = "%s"\n' "$(az_uri disk.img)" \
    "$IMAGENBD_TEST_AZURE" >"$cfg"
must_fail "$tmpdir/inline.out" "$IMAGENBD" check-config "$cfg"
must_contain "$tmpdir/inline.out" "$cfg:4: export 'x': credentials: credentials must be env:VAR or file:PATH \(never inline\)"
! grep -q "$azure_key" "$tmpdir/inline.out" || fail "the secret was echoed"
printf '[[export]]\nname = "x"\nimage = "%s"\ncredentials = "env:IMAGENBD_TEST_UNSET"\n' \
    "$(az_uri disk.img)" >"$cfg"
must_fail "$tmpdir/unset.out" "$IMAGENBD" serve --config "$cfg" -k "$sockdir/x.sock"
must_contain "$tmpdir/unset.out" "environment variable 'IMAGENBD_TEST_UNSET' is not set"
