#!/usr/bin/env bash
# The persistent cache (serve --cache) over the http leaf, against nginx (as in
# test-http-leaf.sh): (1) a full read fills the cache; (2) a restart with the same cache
# reads everything again without fetching (imagenbd_remote_requests_total: only the
# requests of the open, counted from /metrics right after the start; nginx's log agrees:
# no ranged GET); (3) the object replaced: the restart says the cache was discarded and
# serves the new bytes; (4) --cache-size smaller than the image: after a full read the
# cache file's allocated bytes stay within the cap plus one chunk and chunks were evicted;
# (5) two exports of the same object with the same cache path (a config file) share it:
# reading the second after the first fetches nothing.
source "$(dirname "$0")/functions.sh"
set -x

requires nginx qemu-img qemu-io nbdcopy curl

mib=$(( 1024 * 1024 ))
www=$tmpdir/www
mkdir -p "$www" "$tmpdir/nginx"
admin=unix:$sockdir/admin.sock

# metric NAME [LABEL=VALUE...]: the sample's value on the admin endpoint, as an integer.
metric ()
{
    py3 - "$admin" "$@" <<'EOF'
import sys, adminhttp
admin, name = sys.argv[1:3]
labels = dict(a.split("=", 1) for a in sys.argv[3:])
print(int(adminhttp.scrape(admin).value(name, **labels)))
EOF
}
remote_requests () { metric imagenbd_remote_requests_total backend=http; }
# allocated FILE: bytes the file takes on disk.
allocated () { echo $(( $(stat -c '%b * %B' "$1") )); }

# --- an image (a dynamic VHD, so a format sits above the cache) -----------------------------
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$www/disk.vhd" 16M
io vpc "$www/disk.vhd" 'write -P 0x44 0 1M' 'write -P 0x55 5M 3M' "write -P 0x66 $(( 16 * mib - 4096 )) 4096"
qemu-img convert -f vpc -O raw "$www/disk.vhd" "$tmpdir/disk.expected"

# --- nginx -------------------------------------------------------------------------------
nginx_port=$(free_port)
{
    [ "$(id -u)" = 0 ] && echo "user root;"  # as root, workers would otherwise be nobody
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
    server {
        listen 127.0.0.1:$nginx_port;
        root $www;
    }
}
EOF
} >"$tmpdir/nginx/nginx.conf"
nginx -e "$tmpdir/nginx/error.log" -p "$tmpdir/nginx" -c "$tmpdir/nginx/nginx.conf" \
    </dev/null >>"$tmpdir/nginx/stdout.log" 2>&1 &
nginx_pid=$!
cleanup_fn kill_quietly "$nginx_pid"
base=http://127.0.0.1:$nginx_port
for (( i = 0; i < 100; ++i )); do
    curl -sf -o /dev/null -r 0-0 "$base/disk.vhd" && break
    _alive "$nginx_pid" || { cat "$tmpdir/nginx/"*.log >&2; fail "nginx exited at start"; }
    sleep 0.1
done
log_lines () { wc -l <"$tmpdir/nginx/access.log"; }

cache=$tmpdir/cache/disk
mkdir -p "$tmpdir/cache"
# Readahead off: its prefetches are guesses that fetch what no client read (test-readahead).
serve_cached ()
{
    start_imagenbd -r --admin="$admin" --cache="$cache" --cache-chunk=256K --readahead=off "$@"
}

# --- 1. a cold full read fetches, through the cache -------------------------------------------
serve_cached -x disk "$base/disk.vhd"
at_open=$(remote_requests)
qemu-img compare -f raw -F raw "$tmpdir/disk.expected" "$(nbd_uri disk)" ||
    fail "the cached export differs from the image"
cold=$(remote_requests)
[ "$cold" -gt "$at_open" ] || fail "a cold read made no remote request ($at_open, then $cold)"
[ "$(metric imagenbd_cache_misses_total)" -gt 0 ] || fail "a cold read counted no cache miss"
[ "$(metric imagenbd_cache_bytes_fetched_total)" -gt 0 ] || fail "no bytes fetched counted"
stop_imagenbd
[ -s "$cache.meta" ] || fail "no cache metadata saved at $cache.meta"
echo "cold: $at_open requests at open, $(( cold - at_open )) for the full read"

# --- 2. the restart reads everything from the cache --------------------------------------------
lines_before=$(log_lines)
serve_cached -x disk "$base/disk.vhd"
at_open=$(remote_requests)
lines_open=$(log_lines)
qemu-img compare -f raw -F raw "$tmpdir/disk.expected" "$(nbd_uri disk)" ||
    fail "the export differs after a restart with the cache"
nbdcopy "$(nbd_uri disk)" - >/dev/null
warm=$(remote_requests)
[ "$warm" -eq "$at_open" ] ||
    fail "the warm read made $(( warm - at_open )) remote requests (only the open's $at_open allowed)"
[ "$(metric imagenbd_cache_bytes_fetched_total)" -eq 0 ] || fail "the warm read fetched bytes"
[ "$(metric imagenbd_cache_hits_total)" -gt 0 ] || fail "the warm read counted no cache hit"
[ "$(log_lines)" -eq "$lines_open" ] || fail "nginx saw requests after the open"
echo "nginx's log of the restart (the open's requests only):"
tail -n +"$(( lines_before + 1 ))" "$tmpdir/nginx/access.log"
stop_imagenbd
echo "warm: $at_open requests at open, none for the full read"

# --- 3. the object replaced: the cache is discarded, the new bytes served --------------------
cp "$www/disk.vhd" "$tmpdir/new.vhd"
io vpc "$tmpdir/new.vhd" 'write -P 0xee 5M 1M' 'write -P 0xdd 12M 64k'
qemu-img convert -f vpc -O raw "$tmpdir/new.vhd" "$tmpdir/new.expected"
touch -d "@$(( $(date +%s) + 100 ))" "$tmpdir/new.vhd"  # nginx's ETag is mtime-size
mv "$tmpdir/new.vhd" "$www/disk.vhd"
serve_cached -x disk "$base/disk.vhd"
must_contain "$imagenbd_log" "cache: .*discarding the cache: remote (version tag|size) changed"
qemu-img compare -f raw -F raw "$tmpdir/new.expected" "$(nbd_uri disk)" ||
    fail "the export after the object was replaced differs from the new object"
stop_imagenbd

# --- 4. the size cap holds ----------------------------------------------------------------
# 16 MiB image, 2 MiB cap, 256 KiB chunks.
cap=$(( 2 * mib )) chunk=$(( 256 * 1024 ))
start_imagenbd -r --admin="$admin" --cache="$tmpdir/cache/small" --cache-size=2M \
    --cache-chunk=256K --readahead=off -x disk "$base/disk.vhd"
qemu-img compare -f raw -F raw "$tmpdir/new.expected" "$(nbd_uri disk)" ||
    fail "the export with a small cache differs"
evictions=$(metric imagenbd_cache_evictions_total)
[ "$evictions" -gt 0 ] || fail "a full read of 16 MiB through a 2 MiB cache evicted nothing"
# Prefetches may still be settling: poll until the allocation is within the cap.
for (( i = 0; i < 50; ++i )); do
    used=$(allocated "$tmpdir/cache/small")
    [ "$used" -le $(( cap + chunk )) ] && break
    sleep 0.1
done
[ "$used" -le $(( cap + chunk )) ] ||
    fail "the cache file holds $used bytes, over the 2 MiB cap plus a chunk"
stop_imagenbd
used=$(allocated "$tmpdir/cache/small")
[ "$used" -le $(( cap + chunk )) ] || fail "after the stop the cache file holds $used bytes"
echo "cap: $used bytes allocated of a $cap cap, $evictions chunks evicted"

# --- 5. two exports of one object share one cache -----------------------------------------
cat >"$tmpdir/shared.toml" <<EOF
[[export]]
name = "a"
image = "$base/disk.vhd"
read-only = true
cache = "$tmpdir/cache/shared"
cache-chunk = "256K"
readahead = false

[[export]]
name = "b"
image = "$base/disk.vhd"
read-only = true
cache = "$tmpdir/cache/shared"
cache-chunk = "256K"
readahead = false
EOF
start_imagenbd --admin="$admin" --config="$tmpdir/shared.toml"
qemu-img compare -f raw -F raw "$tmpdir/new.expected" "$(nbd_uri a)" || fail "export a differs"
after_a=$(remote_requests)
qemu-img compare -f raw -F raw "$tmpdir/new.expected" "$(nbd_uri b)" || fail "export b differs"
[ "$(remote_requests)" -eq "$after_a" ] ||
    fail "export b fetched what export a had cached ($after_a, then $(remote_requests) requests)"
stop_imagenbd

# --- 6. a leased Azure blob written through the cache: our own writes keep it valid --------
# Every Put Page changes the blob's ETag; the leaf learns the new one at the flush, the
# cache saves it, so the restart trusts the cache and reads the written bytes from it.
command -v azurite-blob >/dev/null || skip "azurite-blob not found (parts 1 to 5 passed)"
start_azurite
qemu-img create -f raw "$tmpdir/az.raw" 8M
io raw "$tmpdir/az.raw" 'write -P 0x71 0 8M'
"$IMAGENBD" upload "$tmpdir/az.raw" "$(az_uri az.raw)"
cp "$tmpdir/az.raw" "$tmpdir/az.expected"
azw=(-c 'write -P 0x72 1M 64k' -c 'write -P 0x73 3000 5000' -c 'write -z 5M 300k')
qemu-io -f raw "${azw[@]}" "$tmpdir/az.expected" >/dev/null
az_requests () { metric imagenbd_remote_requests_total backend=azure; }
azure_cached ()
{
    start_imagenbd --admin="$admin" --cache="$tmpdir/cache/az" --cache-chunk=256K \
        --readahead=off -x disk "$(az_uri az.raw)"
}
azure_cached
nbdinfo --json "$(nbd_uri disk)" | jq -e '.exports[0].is_read_only == false' ||
    fail "the leased blob with a cache is not writable"
nbdcopy "$(nbd_uri disk)" - >/dev/null  # everything cached
qemu-io -f raw "${azw[@]}" -c flush "$(nbd_uri disk)" >"$tmpdir/az-io.out" 2>&1 ||
    { cat "$tmpdir/az-io.out"; fail "writes through the cache failed"; }
qemu-img compare -f raw -F raw "$tmpdir/az.expected" "$(nbd_uri disk)" ||
    fail "the written-through export differs"
stop_imagenbd
azure_cached
if grep 'discarding the cache' "$imagenbd_log"; then
    fail "the cache was discarded after our own writes"
fi
qemu-img compare -f raw -F raw "$tmpdir/az.expected" "$(nbd_uri disk)" ||
    fail "the export differs after the restart"
# (Block status still asks the blob for its page ranges: extents are not cached.)
[ "$(metric imagenbd_cache_misses_total)" -eq 0 ] &&
    [ "$(metric imagenbd_cache_bytes_fetched_total)" -eq 0 ] ||
    fail "the restart fetched what the cache held"
stop_imagenbd
"$IMAGENBD" download "$(az_uri az.raw)" "$tmpdir/az.blob" || fail "download failed"
cmp "$tmpdir/az.expected" "$tmpdir/az.blob" || fail "the blob does not hold the writes"
