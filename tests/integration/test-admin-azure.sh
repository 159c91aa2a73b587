#!/usr/bin/env bash
# The remote-storage counters of the admin endpoint, imagenbd_remote_*{backend="azure"},
# against Azurite behind fault_proxy.py: opening the blob counts requests; a 64 KiB write
# counts its body as bytes sent, a read its body as bytes fetched; with every 2nd request
# answered 503, retries and errors move while the NBD client sees no failure.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-io
start_azurite

admin=unix:$sockdir/admin.sock
truncate -s 8M "$tmpdir/a.raw"
"$IMAGENBD" upload "$tmpdir/a.raw" "$(az_uri a.raw)"
start_fault_proxy
saved=$AZURE_STORAGE_CONNECTION_STRING
AZURE_STORAGE_CONNECTION_STRING=$(azure_connection_string "$proxy_port")
start_imagenbd --admin="$admin" a="$(az_uri a.raw)"
AZURE_STORAGE_CONNECTION_STRING=$saved

# scrape NAME: the remote counters now, as a JSON object, into $tmpdir/NAME.json.
scrape ()
{
    py3 - "$admin" >"$tmpdir/$1.json" <<'EOF'
import json, sys, adminhttp
m = adminhttp.scrape(sys.argv[1])
print(json.dumps({k: m.value("imagenbd_remote_%s_total" % k, backend="azure")
                  for k in ("requests", "retries", "errors", "bytes_fetched", "bytes_sent")}))
EOF
    cat "$tmpdir/$1.json"
}
# check A B EXPR: EXPR (python, over dicts a and b) holds for scrapes A and B.
check ()
{
    py3 -c '
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:3])
d = {k: b[k] - a[k] for k in a}
assert eval(sys.argv[3]), "%s: a=%s b=%s" % (sys.argv[3], a, b)' \
        "$tmpdir/$1.json" "$tmpdir/$2.json" "$3" || fail "remote counters: $3"
}

scrape opened
py3 -c 'import json, sys; m = json.load(open(sys.argv[1])); assert m["requests"] >= 2, m' \
    "$tmpdir/opened.json" || fail "opening the blob (properties, lease) counted no requests"

io raw "$(nbd_uri a)" 'write -P 7 1M 64k'
scrape written
check opened written 'd["requests"] >= 1 and 65536 <= d["bytes_sent"] <= 2 * 65536'
check opened written 'd["errors"] == 0 and d["retries"] == 0'

io raw "$(nbd_uri a)" 'read -P 7 1M 64k'
scrape read
check written read 'd["requests"] >= 1 and d["bytes_fetched"] >= 65536 and d["bytes_sent"] == 0'

# Throttling: every 2nd request is a 503, retried by the server, invisible to the client.
set_faults fail_every=2
io raw "$(nbd_uri a)" 'read -P 7 1M 64k' 'read -P 0 2M 64k' 'write -P 8 3M 4k' 'read -P 8 3M 4k'
set_faults
scrape throttled
check read throttled 'd["retries"] >= 1 and d["errors"] >= d["retries"]'
check read throttled 'd["requests"] > d["retries"]'
[ "$(proxy_count failed_503)" -ge 1 ] || fail "the proxy failed no request"

stop_imagenbd
