#!/usr/bin/env bash
# The http leaf against nginx (Debian's, as the test user, on a free port, everything in
# $tmpdir): qemu-made images (raw with holes, dynamic VHD, VDI) in nginx's root, served
# by imagenbd over http://, read byte-exactly by qemu-img compare and nbdcopy; writes
# refused (read-only); a server that ignores Range (python's http.server) refused at open
# with the message; an object replaced while served fails reads with "changed" (never
# mixed data); 503s and connection resets from fault_proxy.py in front are retried.
source "$(dirname "$0")/functions.sh"
set -x

requires nginx qemu-img qemu-io nbdcopy cmp

mib=$(( 1024 * 1024 ))
www=$tmpdir/www
mkdir -p "$www" "$tmpdir/nginx"

# --- images ------------------------------------------------------------------------------
qemu-img create -f raw "$www/disk.raw" 16M
io raw "$www/disk.raw" 'write -P 0x11 0 64k' 'write -P 0x22 3M 1536k' 'write -P 0x33 7000 3000'
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$www/disk.vhd" 24M
io vpc "$www/disk.vhd" 'write -P 0x44 0 64k' 'write -P 0x55 5M 2M' "write -P 0x66 $(( 24 * mib - 4096 )) 4096"
qemu-img create -f vdi "$www/disk.vdi" 16M
io vdi "$www/disk.vdi" 'write -P 0x77 1M 1M' 'write -P 0x88 9000 5000'
for f in raw vpc:vhd vdi; do
    fmt=${f%%:*} ext=${f##*:}
    qemu-img convert -f "$fmt" -O raw "$www/disk.$ext" "$tmpdir/disk.$ext.expected"
done

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
        location = /moved.raw { return 302 /disk.raw; }
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
    curl -sf -o /dev/null -r 0-0 "$base/disk.raw" && break  # ranged: no 200 GET in the log
    _alive "$nginx_pid" || { cat "$tmpdir/nginx/"*.log >&2; fail "nginx exited at start"; }
    sleep 0.1
done

# --- 1. images served byte-exactly ---------------------------------------------------------
start_imagenbd -r raw="$base/disk.raw" vhd="$base/disk.vhd" vdi="$base/disk.vdi" \
    moved="$base/moved.raw"
for e in raw vhd vdi; do
    qemu-img compare -f raw -F raw "$tmpdir/disk.$e.expected" "$(nbd_uri $e)" ||
        fail "$e over http differs from qemu-img convert's raw copy"
    nbdcopy "$(nbd_uri $e)" "$tmpdir/copy.$e"
    cmp "$tmpdir/disk.$e.expected" "$tmpdir/copy.$e" || fail "nbdcopy of $e over http differs"
done
# A redirect at open is followed (nginx's 302 for moved.raw).
qemu-img compare -f raw -F raw "$tmpdir/disk.raw.expected" "$(nbd_uri moved)" ||
    fail "the redirected export differs"
must_contain "$imagenbd_log" "redirected to http://127.0.0.1:$nginx_port/disk.raw"
# Every GET nginx saw was ranged: 206 in the access log, never a 200 GET.
must_contain "$tmpdir/nginx/access.log" '"GET /disk.vhd HTTP/1.1" 206 '
if grep -E '"GET [^"]*" 200 ' "$tmpdir/nginx/access.log"; then
    fail "imagenbd sent an unranged GET (200 in nginx's access log)"
fi
stop_imagenbd

# --- 2. writes are refused: the export is read-only -----------------------------------------
sum_before=$(md5sum <"$www/disk.raw")
start_imagenbd -x disk "$base/disk.raw"
must_fail "$tmpdir/write.out" qemu-io -f raw -c 'write -P 0x99 0 4096' "$(nbd_uri disk)"
must_contain "$tmpdir/write.out" "read-only|Operation not permitted|Permission denied"
must_contain "$imagenbd_log" "serving read-only"
stop_imagenbd
[ "$(md5sum <"$www/disk.raw")" = "$sum_before" ] || fail "the image changed"

# --- 3. a server that ignores Range is refused at open ---------------------------------------
py_port=$(free_port)
PATH=/usr/bin:$PATH python3 -m http.server --bind 127.0.0.1 --directory "$www" "$py_port" \
    </dev/null >"$tmpdir/pyhttp.log" 2>&1 &
py_pid=$!
cleanup_fn kill_quietly "$py_pid"
for (( i = 0; i < 100; ++i )); do
    curl -sf -o /dev/null -r 0-0 "http://127.0.0.1:$py_port/disk.raw" && break
    sleep 0.1
done
must_fail "$tmpdir/ignores.out" timeout 30 "$IMAGENBD" serve -r -k "$tmpdir/ignores.sock" \
    -x disk "http://127.0.0.1:$py_port/disk.raw"
must_contain "$tmpdir/ignores.out" \
    "ignores Range requests.*imagenbd cannot serve it without downloading it whole"

# --- 4. the object replaced while served: reads fail with "changed", never mixed data ----------
cp "$www/disk.raw" "$www/live.raw"
start_imagenbd -r -x live "$base/live.raw"
qemu-io -r -f raw -c 'read -P 0x22 3M 1536k' "$(nbd_uri live)" >"$tmpdir/before.out" 2>&1 ||
    { cat "$tmpdir/before.out"; fail "reading the live object failed"; }
# Same size, other bytes, another mtime (nginx's ETag is mtime-size).
cp "$www/disk.raw" "$www/live.new"
io raw "$www/live.new" 'write -P 0xee 3M 1536k'
touch -d "@$(( $(date +%s) + 100 ))" "$www/live.new"
mv "$www/live.new" "$www/live.raw"
must_fail "$tmpdir/after.out" qemu-io -r -f raw -c 'read -P 0x22 3M 1536k' "$(nbd_uri live)"
must_contain "$tmpdir/after.out" "Input/output error"
must_contain "$imagenbd_log" "the object changed since it was opened"
if grep -q 'Pattern verification failed' "$tmpdir/after.out"; then
    fail "a read returned data of the new object"
fi
stop_imagenbd

# --- 5. 503s and resets from fault_proxy.py are retried --------------------------------------
azure_port=$nginx_port  # start_fault_proxy forwards to $azure_port
start_fault_proxy
set_faults fail_every=3 reset_every=7
start_imagenbd -r -x disk "http://127.0.0.1:$proxy_port/disk.vhd"
qemu-img compare -f raw -F raw "$tmpdir/disk.vhd.expected" "$(nbd_uri disk)" ||
    fail "the export differs through the faulty proxy"
cat "$proxy_stats"; echo
[ "$(proxy_count failed_503)" -ge 3 ] || fail "the proxy answered too few requests with 503"
must_contain "$imagenbd_log" "retr(y|ying|ies)"
stop_imagenbd
