#!/usr/bin/env bash
# The copy-on-write overlay (serve --overlay FILE) over images that are only read: a local
# raw image and a dynamic VHD served by nginx over http:// (with --cache under it, the
# whole remote stack). qemu-io writes (aligned, unaligned, write -z, discard) read back
# and compared with the same commands applied to a copy by qemu-io; the lower image's
# bytes unchanged (sha256); a restart keeps the writes; SIGKILL right after a write and a
# flush keeps the flushed data; an overlay made for another image is refused naming what
# differs, -r with --overlay is refused; nbdinfo shows the size and can_multi_conn.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io nbdinfo jq sha256sum

mib=$(( 1024 * 1024 ))

# writes: the qemu-io commands every part applies, to the export and to an expected copy.
writes=(
    'write -P 0xa1 0 64k'             # aligned
    'write -P 0xa2 70000 3001'        # unaligned, inside one block
    'write -P 0xa3 1048000 9000'      # unaligned, across blocks
    'write -z 2M 256k'                # zeroes, aligned
    'write -z 3145000 5000'           # zeroes, unaligned
    'discard 4M 128k'                 # trim
    'write -P 0xa4 15M 1M'            # the last MiB
)
io_args () { local c; for c in "${writes[@]}"; do printf -- '-c\0%s\0' "$c"; done; }

# check_overlay NAME EXPECTED BASE BASE-SHA: write, read back, compare, base untouched.
check_overlay ()
{
    local name=$1 expected=$2 base=$3 base_sha=$4 args
    mapfile -d '' args < <(io_args)
    qemu-io -d unmap -f raw "${args[@]}" "$(nbd_uri "$name")" >"$tmpdir/$name-io.out" 2>&1 ||
        { cat "$tmpdir/$name-io.out"; fail "$name: qemu-io writes through the overlay failed"; }
    qemu-io -r -f raw -c 'read -P 0xa2 70000 3001' -c 'read -P 0xa3 1048000 9000' \
        -c 'read -P 0 2M 256k' -c 'read -P 0 3145000 5000' -c 'read -P 0xa4 15M 1M' \
        "$(nbd_uri "$name")" >"$tmpdir/$name-read.out" 2>&1 ||
        { cat "$tmpdir/$name-read.out"; fail "$name: the written bytes do not read back"; }
    if grep -E 'Pattern verification failed|error' "$tmpdir/$name-read.out"; then
        fail "$name: the written bytes do not read back"
    fi
    qemu-img compare -f raw -F raw "$expected" "$(nbd_uri "$name")" ||
        fail "$name: the export differs from the expected copy"
    [ "$(sha256sum <"$base")" = "$base_sha" ] || fail "$name: the lower image changed"
}

# expect FILE-RAW: apply the writes to a raw copy.
expect ()
{
    local args
    mapfile -d '' args < <(io_args)
    qemu-io -d unmap -f raw "${args[@]}" "$1" >/dev/null
}

# --- 1. a local raw image ---------------------------------------------------------------------
base=$tmpdir/base.raw
qemu-img create -f raw "$base" 16M
io raw "$base" 'write -P 0x11 0 2M' 'write -P 0x22 3M 2M' 'write -P 0x33 14M 2M'
base_sha=$(sha256sum <"$base")
cp "$base" "$tmpdir/local.expected"
expect "$tmpdir/local.expected"
overlay=$tmpdir/local.cow

# -r with --overlay is refused (the overlay would never be written).
must_fail "$tmpdir/ro.out" timeout 30 "$IMAGENBD" serve -r -k "$tmpdir/ro.sock" \
    --overlay="$overlay" -x disk "$base"
must_contain "$tmpdir/ro.out" "--read-only with --overlay"

start_imagenbd --overlay="$overlay" -x disk "$base"
must_contain "$imagenbd_log" "overlay: .*new overlay"
nbdinfo --json "$(nbd_uri disk)" | tee "$tmpdir/info.json"
jq -e ".exports[0].\"export-size\" == $(( 16 * mib ))" "$tmpdir/info.json" || fail "wrong size"
jq -e '.exports[0].can_multi_conn == true and .exports[0].is_read_only == false' \
    "$tmpdir/info.json" || fail "the overlay export is not writable with multi-conn"
check_overlay disk "$tmpdir/local.expected" "$base" "$base_sha"
stop_imagenbd

# A restart keeps the writes.
start_imagenbd --overlay="$overlay" -x disk "$base"
qemu-img compare -f raw -F raw "$tmpdir/local.expected" "$(nbd_uri disk)" ||
    fail "the writes did not survive a restart"

# SIGKILL right after a write and a flush: the flushed data is there after the restart.
qemu-io -f raw -c 'write -P 0xb1 6M 128k' -c 'write -P 0xb2 8392000 777' -c flush \
    "$(nbd_uri disk)" >"$tmpdir/kill-io.out" 2>&1 || { cat "$tmpdir/kill-io.out"; fail "write"; }
kill -KILL "$imagenbd_pid"
wait "$imagenbd_pid" || :
_imagenbd_stopped[$imagenbd_pid]=1
start_imagenbd --overlay="$overlay" -x disk "$base"
qemu-io -r -f raw -c 'read -P 0xb1 6M 128k' -c 'read -P 0xb2 8392000 777' -c 'read -P 0xa4 15M 1M' \
    "$(nbd_uri disk)" >"$tmpdir/killed.out" 2>&1 ||
    { cat "$tmpdir/killed.out"; fail "flushed writes lost after SIGKILL"; }
must_contain "$tmpdir/killed.out" "read 131072/131072 bytes"
if grep 'Pattern verification failed' "$tmpdir/killed.out"; then fail "flushed writes lost"; fi
stop_imagenbd
[ "$(sha256sum <"$base")" = "$base_sha" ] || fail "the lower image changed"

# An overlay made for another image is refused, naming what differs.
cp "$base" "$tmpdir/other.raw"
must_fail "$tmpdir/other.out" timeout 30 "$IMAGENBD" serve -k "$tmpdir/other.sock" \
    --overlay="$overlay" -x disk "$tmpdir/other.raw"
must_contain "$tmpdir/other.out" "the overlay was made over .*base.raw"
qemu-img create -f raw "$tmpdir/bigger.raw" 17M
must_fail "$tmpdir/bigger.out" timeout 30 "$IMAGENBD" serve -k "$tmpdir/bigger.sock" \
    --overlay="$overlay" -x disk "$tmpdir/bigger.raw"
must_contain "$tmpdir/bigger.out" "size changed from $(( 16 * mib )) to $(( 17 * mib ))"

# --- 2. a dynamic VHD over http:// (nginx), with the cache under the overlay -------------------
if ! command -v nginx >/dev/null || ! command -v curl >/dev/null; then
    skip "nginx or curl not found (the local part passed)"
fi
www=$tmpdir/www
mkdir -p "$www" "$tmpdir/nginx"
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$www/disk.vhd" 16M
io vpc "$www/disk.vhd" 'write -P 0x44 0 3M' 'write -P 0x55 5M 1M' 'write -P 0x66 15M 1M'
vhd_sha=$(sha256sum <"$www/disk.vhd")
qemu-img convert -f vpc -O raw "$www/disk.vhd" "$tmpdir/http.expected"
expect "$tmpdir/http.expected"
nginx_port=$(free_port)
{
    [ "$(id -u)" = 0 ] && echo "user root;"
    cat <<EOF
daemon off;
worker_processes 1;
pid $tmpdir/nginx/nginx.pid;
error_log $tmpdir/nginx/error.log info;
events { worker_connections 256; }
http {
    access_log $tmpdir/nginx/access.log;
    client_body_temp_path $tmpdir/nginx/body;
    proxy_temp_path $tmpdir/nginx/proxy;
    fastcgi_temp_path $tmpdir/nginx/fastcgi;
    uwsgi_temp_path $tmpdir/nginx/uwsgi;
    scgi_temp_path $tmpdir/nginx/scgi;
    default_type application/octet-stream;
    server { listen 127.0.0.1:$nginx_port; root $www; }
}
EOF
} >"$tmpdir/nginx/nginx.conf"
nginx -e "$tmpdir/nginx/error.log" -p "$tmpdir/nginx" -c "$tmpdir/nginx/nginx.conf" \
    </dev/null >>"$tmpdir/nginx/stdout.log" 2>&1 &
nginx_pid=$!
cleanup_fn kill_quietly "$nginx_pid"
url=http://127.0.0.1:$nginx_port/disk.vhd
for (( i = 0; i < 100; ++i )); do
    curl -sf -o /dev/null -r 0-0 "$url" && break
    _alive "$nginx_pid" || { cat "$tmpdir/nginx/"*.log >&2; fail "nginx exited at start"; }
    sleep 0.1
done

remote=(--overlay="$tmpdir/http.cow" --cache="$tmpdir/http.cache" --cache-chunk=256K)
start_imagenbd "${remote[@]}" -x disk "$url"
nbdinfo --json "$(nbd_uri disk)" | tee "$tmpdir/http-info.json"
jq -e ".exports[0].\"export-size\" == $(( 16 * mib )) and .exports[0].can_multi_conn == true" \
    "$tmpdir/http-info.json" || fail "http: wrong size or no multi-conn"
check_overlay disk "$tmpdir/http.expected" "$www/disk.vhd" "$vhd_sha"
stop_imagenbd
# Only ranged GETs and HEADs reached nginx: nothing was written there.
if grep -Ev '"(GET|HEAD) ' "$tmpdir/nginx/access.log"; then
    fail "imagenbd sent nginx something else than GET and HEAD"
fi

start_imagenbd "${remote[@]}" -x disk "$url"
qemu-img compare -f raw -F raw "$tmpdir/http.expected" "$(nbd_uri disk)" ||
    fail "http: the writes did not survive a restart"
qemu-io -f raw -c 'write -P 0xc1 9M 64k' -c flush "$(nbd_uri disk)" >/dev/null
kill -KILL "$imagenbd_pid"
wait "$imagenbd_pid" || :
_imagenbd_stopped[$imagenbd_pid]=1
start_imagenbd "${remote[@]}" -x disk "$url"
qemu-io -r -f raw -c 'read -P 0xc1 9M 64k' -c 'read -P 0xa4 15M 1M' "$(nbd_uri disk)" \
    >"$tmpdir/http-killed.out" 2>&1 ||
    { cat "$tmpdir/http-killed.out"; fail "http: flushed writes lost after SIGKILL"; }
if grep 'Pattern verification failed' "$tmpdir/http-killed.out"; then fail "http: lost"; fi
stop_imagenbd
[ "$(sha256sum <"$www/disk.vhd")" = "$vhd_sha" ] || fail "http: the image changed"

# The object replaced: the overlay (tied to its version) is refused.
cp "$www/disk.vhd" "$tmpdir/new.vhd"
io vpc "$tmpdir/new.vhd" 'write -P 0xee 5M 64k'
touch -d "@$(( $(date +%s) + 100 ))" "$tmpdir/new.vhd"
mv "$tmpdir/new.vhd" "$www/disk.vhd"
must_fail "$tmpdir/replaced.out" timeout 30 "$IMAGENBD" serve -k "$tmpdir/replaced.sock" \
    "${remote[@]}" -x disk "$url"
must_contain "$tmpdir/replaced.out" "the overlay was made over"
