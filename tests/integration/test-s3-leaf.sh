#!/usr/bin/env bash
# The s3 leaf against moto (moto_server, signature checks on: formats.md §4.6): qemu-made
# images (raw with holes, dynamic VHD, VDI; one key with a space and a '+') uploaded with
# boto3, served by imagenbd over s3://, read byte-exactly by qemu-img compare and nbdcopy;
# every request SigV4-signed by libcurl (moto refuses a bad signature); a wrong secret
# refused at open naming the variable to check; an object replaced while served fails
# reads with "changed".
source "$(dirname "$0")/functions.sh"
set -x

requires moto_server qemu-img qemu-io nbdcopy cmp
# boto3 lives beside moto_server (a pyenv python, not Debian's).
python3 -c 'import boto3' 2>/dev/null || skip "python3 has no boto3 (needed to set up moto)"

mib=$(( 1024 * 1024 ))

# --- images ------------------------------------------------------------------------------
qemu-img create -f raw "$tmpdir/disk.raw" 16M
io raw "$tmpdir/disk.raw" 'write -P 0x11 0 64k' 'write -P 0x22 3M 1536k' 'write -P 0x33 7000 3000'
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/disk.vhd" 24M
io vpc "$tmpdir/disk.vhd" 'write -P 0x44 0 64k' 'write -P 0x55 5M 2M' "write -P 0x66 $(( 24 * mib - 4096 )) 4096"
qemu-img create -f vdi "$tmpdir/disk.vdi" 16M
io vdi "$tmpdir/disk.vdi" 'write -P 0x77 1M 1M' 'write -P 0x88 9000 5000'
for f in raw vpc:vhd vdi; do
    fmt=${f%%:*} ext=${f##*:}
    qemu-img convert -f "$fmt" -O raw "$tmpdir/disk.$ext" "$tmpdir/disk.$ext.expected"
done

# --- moto with signature checks ----------------------------------------------------------
# The first 4 requests run unauthenticated (create a user, its policy, its key, the
# bucket); every later one must carry a valid SigV4 signature of that key.
moto_port=$(free_port)
INITIAL_NO_AUTH_ACTION_COUNT=4 moto_server -H 127.0.0.1 -p "$moto_port" \
    </dev/null >"$tmpdir/moto.log" 2>&1 &
moto_pid=$!
cleanup_fn kill_quietly "$moto_pid"
endpoint=http://127.0.0.1:$moto_port
for (( i = 0; i < 150; ++i )); do
    curl -s -o /dev/null "$endpoint/moto-api/" && break
    _alive "$moto_pid" || { cat "$tmpdir/moto.log" >&2; fail "moto_server exited at start"; }
    sleep 0.1
done
# s3 ACTION ARGS...: boto3 against moto with the test user's key (after setup).
s3 ()
{
    python3 - "$endpoint" "$tmpdir/keys" "$@" <<'PY'
import json, sys, boto3
from botocore.config import Config
endpoint, keys, action, *args = sys.argv[1:]
# boto3's default aws-chunked uploads with checksum trailers fail moto's signature check.
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          config=Config(request_checksum_calculation="when_required",
                        response_checksum_validation="when_required"))
if action == "setup":
    anon = dict(kw, aws_access_key_id="setup", aws_secret_access_key="setup")
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="tester")
    iam.put_user_policy(UserName="tester", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="tester")["AccessKey"]
    boto3.client("s3", **anon).create_bucket(Bucket="images")
    with open(keys, "w") as f:
        f.write("%s %s\n" % (key["AccessKeyId"], key["SecretAccessKey"]))
    sys.exit(0)
key_id, secret = open(keys).read().split()
s3 = boto3.client("s3", aws_access_key_id=key_id, aws_secret_access_key=secret, **kw)
if action == "put":
    s3.upload_file(args[0], "images", args[1])
PY
}
s3 setup
read -r key_id secret <"$tmpdir/keys"
s3 put "$tmpdir/disk.raw" disk.raw
s3 put "$tmpdir/disk.vhd" dir/disk-image_1.vhd
s3 put "$tmpdir/disk.vdi" disk.vdi
export AWS_ENDPOINT_URL=$endpoint AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$secret
unset AWS_SESSION_TOKEN AWS_ENDPOINT_URL_S3 AWS_DEFAULT_REGION

# Signature checks are on: an unsigned request is refused (moto: 403, or 500 for some).
code=$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/images/disk.raw")
case $code in 2*) fail "moto answered $code to an unsigned GET: signature checks are off" ;; esac

# --- 1. images served byte-exactly, every request signed -------------------------------------
start_imagenbd -r raw=s3://images/disk.raw vhd=s3://images/dir/disk-image_1.vhd \
    vdi=s3://images/disk.vdi
for e in raw vhd vdi; do
    qemu-img compare -f raw -F raw "$tmpdir/disk.$e.expected" "$(nbd_uri $e)" ||
        fail "$e over s3 differs from qemu-img convert's raw copy"
    nbdcopy "$(nbd_uri $e)" "$tmpdir/copy.$e"
    cmp "$tmpdir/disk.$e.expected" "$tmpdir/copy.$e" || fail "nbdcopy of $e over s3 differs"
done
stop_imagenbd

# --- 2. a wrong secret is refused at open, naming the variable --------------------------------
must_fail "$tmpdir/wrong.out" env AWS_SECRET_ACCESS_KEY=wrong-secret timeout 60 \
    "$IMAGENBD" serve -r -k "$tmpdir/wrong.sock" -x disk s3://images/disk.raw
must_contain "$tmpdir/wrong.out" "access denied"
must_contain "$tmpdir/wrong.out" "AWS_SECRET_ACCESS_KEY"
if grep -qF "$secret" "$tmpdir/wrong.out"; then fail "the secret reached the log"; fi

# --- 3. the object replaced while served: reads fail with "changed" ---------------------------
s3 put "$tmpdir/disk.raw" live.raw
start_imagenbd -r -x live s3://images/live.raw
qemu-io -r -f raw -c 'read -P 0x22 3M 1536k' "$(nbd_uri live)" >"$tmpdir/before.out" 2>&1 ||
    { cat "$tmpdir/before.out"; fail "reading the live object failed"; }
cp "$tmpdir/disk.raw" "$tmpdir/live.new"
io raw "$tmpdir/live.new" 'write -P 0xee 3M 1536k'
s3 put "$tmpdir/live.new" live.raw
must_fail "$tmpdir/after.out" qemu-io -r -f raw -c 'read -P 0x22 3M 1536k' "$(nbd_uri live)"
must_contain "$tmpdir/after.out" "Input/output error"
must_contain "$imagenbd_log" "the object changed since it was opened"
if grep -q 'Pattern verification failed' "$tmpdir/after.out"; then
    fail "a read returned data of the new object"
fi
stop_imagenbd
