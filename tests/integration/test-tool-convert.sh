#!/usr/bin/env bash
# imagenbd convert: raw <-> VHD (fixed, dynamic) <-> VDI (static, dynamic) in every
# direction. A raw source with data, holes and a run of written zeroes goes to every
# format and from there to every other one; each result compares identical (qemu-img
# compare) with the source, VDI outputs pass qemu-img check, and every output stays sparse.
# VHD <-> VDI keeps the UUID (GUID byte order in VDI, checked in the file's bytes).
# --azure gives a fixed VHD of N MiB + 512 bytes that qemu-img -f vpc and vhdiinfo read
# with the same size, rounding a size that is not a whole MiB up with a message.
# Refusals: OUT exists without --force, IN == OUT, unknown -O, damaged IN (and then no
# partial OUT is left behind, and an OUT given with --force stays as it was).
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io

mib=$(( 1024 * 1024 ))
qemu_fmt () { case "$1" in vhd) echo vpc ;; *) echo "$1" ;; esac; }

# json_get FILE KEY...: a value from imagenbd's --json output.
json_get ()
{
    py3 - "$@" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2:]:
    v = v[k]
print(str(v).lower() if isinstance(v, bool) else v)
PY
}

allocated () { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }

# same_as_source FILE FORMAT: qemu reads FILE (as FORMAT) identical to src.img.
same_as_source ()
{
    qemu-img compare -f raw -F "$(qemu_fmt "$2")" "$tmpdir/src.img" "$1" ||
        fail "$1 ($2) differs from src.img"
}

sparse=1
fs_supports_holes "$tmpdir" || { sparse=0; echo "no holes in $tmpdir: sparseness not checked"; }

# --- the source: 64 MiB, data at three places, 4 MiB of written zeroes, holes elsewhere --
src=$tmpdir/src.img
truncate -s 64M "$src"
io raw "$src" "write -P 0xa1 0 1M" "write -P 0xb2 $(( 20 * mib + 4096 )) 12288" \
    "write -P 0 $(( 30 * mib )) 4M" "write -P 0xc3 $(( 64 * mib - 512 )) 512"
[ "$sparse" = 0 ] || [ "$(allocated "$src")" -ge $(( 5 * mib )) ] ||
    fail "the source's written zeroes should be allocated"

src_md5=$(md5sum <"$src")

"$IMAGENBD" convert --help | grep -- --azure >/dev/null || fail "convert --help does not show --azure"
"$IMAGENBD" --help | grep convert >/dev/null || fail "imagenbd --help does not list convert"

# --- raw -> every format -> every format --------------------------------------------
kinds=("raw -" "vhd fixed" "vhd dynamic" "vdi static" "vdi dynamic")
out_args ()   # FORMAT SUBFORMAT
{
    echo "-O $1"
    [ "$2" != - ] && echo "--subformat $2"
    :
}
check_output ()   # FILE FORMAT SUBFORMAT
{
    local file=$1 fmt=$2 sub=$3
    same_as_source "$file" "$fmt"
    "$IMAGENBD" info --json "$file" >"$tmpdir/info.json" || fail "info $file"
    [ "$(json_get "$tmpdir/info.json" format)" = "$fmt" ] || fail "$file is not $fmt"
    [ "$(json_get "$tmpdir/info.json" virtual_size)" = $(( 64 * mib )) ] ||
        fail "$file: virtual size is not 64 MiB"
    [ "$sub" = - ] || [ "$(json_get "$tmpdir/info.json" "$fmt" subformat)" = "$sub" ] ||
        fail "$file is not $sub"
    if [ "$fmt" = vdi ]; then
        qemu-img check -f vdi "$file" || fail "qemu-img check $file"
    fi
    # Sparse stays sparse: 1 MiB + 12 KiB + 512 of data (the 4 MiB of written zeroes
    # are not written); new VHD/VDI blocks are extended sparsely, so only metadata adds.
    if [ "$sparse" = 1 ]; then
        [ "$(allocated "$file")" -le $(( 3 * mib )) ] ||
            fail "$file: $(allocated "$file") bytes allocated for 1 MiB of data"
    fi
}

for a in "${kinds[@]}"; do
    read -r fa sa <<<"$a"
    first=$tmpdir/first-$fa-$sa
    # shellcheck disable=SC2046
    "$IMAGENBD" convert $(out_args "$fa" "$sa") --json "$src" "$first" >"$tmpdir/first.json" ||
        fail "convert src.img to $fa $sa"
    cat "$tmpdir/first.json"
    check_output "$first" "$fa" "$sa"
    j=$tmpdir/first.json
    [ "$(json_get "$j" input_format)" = raw ] || fail "json input_format"
    [ "$(json_get "$j" output_format)" = "$fa" ] || fail "json output_format"
    [ "$(json_get "$j" file_size)" = "$(stat -c %s "$first")" ] || fail "json file_size"
    [ $(( $(json_get "$j" bytes_read) + $(json_get "$j" bytes_holes) )) = $(( 64 * mib )) ] ||
        fail "json: bytes read and holes do not add up to the size"
    [ $(( $(json_get "$j" bytes_written) + $(json_get "$j" bytes_zero) )) = \
        "$(json_get "$j" bytes_read)" ] || fail "json: written and zero do not add up to read"
    [ "$(json_get "$j" bytes_written)" = $(( mib + 12288 + 4096 )) ] ||
        fail "json: written is not the data (4 KiB granules)"
    [ "$sparse" = 0 ] || [ "$(json_get "$j" bytes_zero)" -ge $(( 4 * mib )) ] ||
        fail "json: the written zeroes were not skipped"

    for b in "${kinds[@]}"; do
        read -r fb sb <<<"$b"
        second=$tmpdir/second-$fa-$sa-$fb-$sb
        # shellcheck disable=SC2046
        "$IMAGENBD" convert -q $(out_args "$fb" "$sb") "$first" "$second" 2>"$tmpdir/err" ||
            fail "convert $fa $sa to $fb $sb: $(cat "$tmpdir/err")"
        [ -s "$tmpdir/err" ] && fail "-q printed something: $(cat "$tmpdir/err")"
        check_output "$second" "$fb" "$sb"
        # Back to raw: byte-identical with the source, also by cmp.
        "$IMAGENBD" convert -q -O raw "$second" "$tmpdir/back.raw" || fail "to raw"
        cmp "$src" "$tmpdir/back.raw" || fail "$fa $sa -> $fb $sb -> raw differs from src.img"
        rm -f "$second" "$tmpdir/back.raw"
    done
done

# Nothing but the outputs was left in the directory (no temporary files).
ls -a "$tmpdir" | grep -Eq '^\..*\.imagenbd-[0-9a-f]{8}$' && fail "temporary files left: $(ls -a "$tmpdir")"

# --- UUIDs survive VHD <-> VDI, in each format's byte order --------------------------
"$IMAGENBD" convert -O vhd "$src" "$tmpdir/u.vhd"
"$IMAGENBD" convert -O vdi "$tmpdir/u.vhd" "$tmpdir/u.vdi"
"$IMAGENBD" convert -O vhd --subformat fixed "$tmpdir/u.vdi" "$tmpdir/u2.vhd"
"$IMAGENBD" convert -O vdi --subformat static "$tmpdir/u.vdi" "$tmpdir/u2.vdi"
for f in u.vhd u.vdi u2.vhd u2.vdi; do
    "$IMAGENBD" info --json "$tmpdir/$f" >"$tmpdir/$f.json"
done
uuid=$(json_get "$tmpdir/u.vhd.json" vhd uuid)
[ "$(json_get "$tmpdir/u.vdi.json" vdi uuid)" = "$uuid" ] || fail "vhd -> vdi changed the uuid"
[ "$(json_get "$tmpdir/u2.vhd.json" vhd uuid)" = "$uuid" ] || fail "vdi -> vhd changed the uuid"
[ "$(json_get "$tmpdir/u2.vdi.json" vdi uuid)" = "$uuid" ] || fail "vdi -> vdi changed the uuid"
# The bytes themselves: RFC order in the VHD footer (offset 68), GUID order at 0x188 in VDI.
py3 - "$tmpdir/u.vhd" "$tmpdir/u.vdi" "$uuid" <<'PY' || fail "uuid byte order"
import sys, uuid
vhd, vdi, text = sys.argv[1], sys.argv[2], sys.argv[3]
with open(vhd, "rb") as f:
    f.seek(-512, 2)
    footer = f.read(512)
with open(vdi, "rb") as f:
    f.seek(0x188)
    raw = f.read(16)
want = uuid.UUID(text)
assert uuid.UUID(bytes=footer[68:84]) == want, "vhd footer"
assert uuid.UUID(bytes_le=raw) == want, "vdi uuidCreate is not in GUID order"
print("uuid bytes ok:", want)
PY
# Raw sources get a fresh random UUID each time.
"$IMAGENBD" convert -O vhd "$src" "$tmpdir/u3.vhd"
"$IMAGENBD" info --json "$tmpdir/u3.vhd" >"$tmpdir/u3.json"
[ "$(json_get "$tmpdir/u3.json" vhd uuid)" != "$uuid" ] || fail "two raw conversions share a uuid"

# --- sizes that are not multiples of 512 or of 1 MiB --------------------------------
odd=$tmpdir/odd.img
odd_size=$(( 5 * mib + 1000 ))
truncate -s "$odd_size" "$odd"
io raw "$odd" "write -P 0x5a 0 64k" "write -P 0x6b $(( odd_size - 1000 )) 1000"
"$IMAGENBD" convert -O raw "$odd" "$tmpdir/odd.raw"
[ "$(stat -c %s "$tmpdir/odd.raw")" = "$odd_size" ] || fail "raw -> raw changed the size"
cmp "$odd" "$tmpdir/odd.raw" || fail "odd raw -> raw differs"
"$IMAGENBD" convert -O vdi "$odd" "$tmpdir/odd.vdi" 2>"$tmpdir/err" || fail "odd -> vdi"
cat "$tmpdir/err"
must_contain "$tmpdir/err" "virtual size $odd_size is not a multiple of 512: rounded up to $(( 5 * mib + 1024 ))"
"$IMAGENBD" convert -O raw "$tmpdir/odd.vdi" "$tmpdir/odd-back.raw"
[ "$(stat -c %s "$tmpdir/odd-back.raw")" = $(( 5 * mib + 1024 )) ] || fail "vdi -> raw size"
cmp -n "$odd_size" "$odd" "$tmpdir/odd-back.raw" || fail "odd -> vdi -> raw differs"
[ "$(tail -c 24 "$tmpdir/odd-back.raw" | od -An -tx1 | tr -d ' \n')" = "$(printf '%048d' 0)" ] ||
    fail "the rounding does not read as zeroes"

# --- --azure: N MiB + 512, read alike by qemu-img -f vpc and vhdiinfo -------------------
"$IMAGENBD" convert --azure --json "$odd" "$tmpdir/az.vhd" >"$tmpdir/az.json" 2>"$tmpdir/err" ||
    fail "convert --azure"
cat "$tmpdir/err" "$tmpdir/az.json"
must_contain "$tmpdir/err" "virtual size $odd_size \(5 MiB\) is not a whole MiB, as Azure requires: rounded up to 6291456 \(6 MiB\)"
must_contain "$tmpdir/err" "below 20 MiB"
[ "$(stat -c %s "$tmpdir/az.vhd")" = $(( 6 * mib + 512 )) ] || fail "az.vhd is not 6 MiB + 512"
[ "$(json_get "$tmpdir/az.json" output_subformat)" = fixed ] || fail "azure: not fixed"
qsize=$(qemu-img info -f vpc --output=json "$tmpdir/az.vhd" |
    py3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
[ "$qsize" = $(( 6 * mib )) ] || fail "qemu-img -f vpc reads $qsize, not 6 MiB"
if command -v vhdiinfo >/dev/null; then
    vhdiinfo "$tmpdir/az.vhd" | tee "$tmpdir/vhdiinfo.txt"
    must_contain "$tmpdir/vhdiinfo.txt" "Media size.*\($(( 6 * mib )) bytes\)"
    must_contain "$tmpdir/vhdiinfo.txt" "Disk type.*Fixed"
else
    echo "vhdiinfo not installed: libvhdi's reading not checked"
fi
[ "$(tail -c 512 "$tmpdir/az.vhd" | head -c 8)" = conectix ] || fail "no footer at the end"
cmp -n "$odd_size" "$odd" "$tmpdir/az.vhd" || fail "the fixed VHD's data is not the source"
"$IMAGENBD" info --json "$tmpdir/az.vhd" >"$tmpdir/az-info.json"
[ "$(json_get "$tmpdir/az-info.json" vhd creator_app)" = inbd ] || fail "azure creator"
[ "$(json_get "$tmpdir/az-info.json" vhd qemu72_size)" = $(( 6 * mib )) ] || fail "qemu72 size"
# A whole-MiB source (64 MiB) gets no message and exactly 64 MiB + 512.
"$IMAGENBD" convert --azure "$src" "$tmpdir/az64.vhd" 2>"$tmpdir/err" || fail "azure 64M"
[ -s "$tmpdir/err" ] && fail "azure of a whole-MiB size printed: $(cat "$tmpdir/err")"
[ "$(stat -c %s "$tmpdir/az64.vhd")" = $(( 64 * mib + 512 )) ] || fail "az64 size"
same_as_source "$tmpdir/az64.vhd" vhd
# qemu-img's spelling gives the same image.
"$IMAGENBD" convert -O vpc -o subformat=fixed,force_size=on "$src" "$tmpdir/qemu-style.vhd"
[ "$(stat -c %s "$tmpdir/qemu-style.vhd")" = $(( 64 * mib + 512 )) ] || fail "-o spelling"

# --- progress: with -p on a non-terminal stderr; never with --json ------------------
"$IMAGENBD" convert -p -O vdi "$src" "$tmpdir/p.vdi" 2>"$tmpdir/err" || fail "-p"
must_contain "$tmpdir/err" '100% \[=+\]'
"$IMAGENBD" convert -p --json -O vdi "$src" "$tmpdir/p2.vdi" >/dev/null 2>"$tmpdir/err"
grep -q '%' "$tmpdir/err" && fail "progress drawn with --json"
"$IMAGENBD" convert -O vdi "$src" "$tmpdir/p3.vdi" 2>"$tmpdir/err"
[ -s "$tmpdir/err" ] && fail "progress drawn without -p on a non-terminal"

# --- refusals -----------------------------------------------------------------------
before=$(md5sum <"$tmpdir/az.vhd")
must_fail "$tmpdir/err" "$IMAGENBD" convert -O raw "$src" "$tmpdir/az.vhd"
must_contain "$tmpdir/err" "az.vhd: the file exists \(use --force to overwrite it\)"
[ "$(md5sum <"$tmpdir/az.vhd")" = "$before" ] || fail "a refused convert changed OUT"
"$IMAGENBD" convert --force -O raw "$odd" "$tmpdir/az.vhd" || fail "--force"
cmp "$odd" "$tmpdir/az.vhd" || fail "--force did not replace OUT"

status=0
"$IMAGENBD" convert -O raw "$src" "$src" 2>"$tmpdir/err" || status=$?
cat "$tmpdir/err"
[ "$status" = 2 ] || fail "IN == OUT: exit $status, expected 2"
must_contain "$tmpdir/err" "same file"
ln -s "$src" "$tmpdir/link.img"
status=0
"$IMAGENBD" convert --force -O raw "$tmpdir/link.img" "$src" 2>"$tmpdir/err" || status=$?
cat "$tmpdir/err"
[ "$status" = 1 ] || fail "IN == OUT through a symlink: exit $status, expected 1"
must_contain "$tmpdir/err" "are the same file"
[ "$(md5sum <"$src")" = "$src_md5" ] || fail "a refused convert changed src.img"

status=0
"$IMAGENBD" convert -O qcow2 "$src" "$tmpdir/x.qcow2" 2>"$tmpdir/err" || status=$?
cat "$tmpdir/err"
[ "$status" = 2 ] || fail "unknown -O: exit $status"
must_contain "$tmpdir/err" "unknown image format 'qcow2'"
[ -e "$tmpdir/x.qcow2" ] && fail "unknown -O left a file"
status=0
"$IMAGENBD" convert "$src" "$tmpdir/x.img" 2>"$tmpdir/err" || status=$?
[ "$status" = 2 ] || fail "no -O: exit $status"
must_contain "$tmpdir/err" "needs an output format"

must_fail "$tmpdir/err" "$IMAGENBD" convert -O vhd "$tmpdir/missing.img" "$tmpdir/x.vhd"
must_contain "$tmpdir/err" "missing.img: No such file or directory"
[ -e "$tmpdir/x.vhd" ] && fail "a failed convert left OUT"

# A damaged input (VDI block map entry past the end): refused with serve's message; an
# existing OUT given with --force is left as it was, and no temporary file remains.
cp "$tmpdir/u.vdi" "$tmpdir/bad.vdi"
patch_bytes "$tmpdir/bad.vdi" $(( 0x200 )) "ffff0000"
before=$(md5sum <"$tmpdir/odd.raw")
must_fail "$tmpdir/err" "$IMAGENBD" convert --force -O raw "$tmpdir/bad.vdi" "$tmpdir/odd.raw"
must_contain "$tmpdir/err" "bad.vdi"
[ "$(md5sum <"$tmpdir/odd.raw")" = "$before" ] || fail "a failed --force convert changed OUT"
ls -a "$tmpdir" | grep -Eq '^\..*\.imagenbd-[0-9a-f]{8}$' && fail "temporary files left: $(ls -a "$tmpdir")"

# --- differencing inputs are flattened ----------------------------------------------
if "$IMAGENBD" create --help | grep -- "--parent" >/dev/null; then
    "$IMAGENBD" convert -O vhd "$src" "$tmpdir/base.vhd"
    "$IMAGENBD" create -f vhd --parent "$tmpdir/base.vhd" "$tmpdir/child.vhd"
    cp "$src" "$tmpdir/child.raw"
    start_imagenbd -x child "$tmpdir/child.vhd"
    both child "write -P 0xee $(( 2 * mib )) 1M" "write -P 0xdd 0 4096"
    stop_imagenbd
    "$IMAGENBD" convert -O vdi "$tmpdir/child.vhd" "$tmpdir/flat.vdi" || fail "flatten"
    qemu-img compare -f raw -F vdi "$tmpdir/child.raw" "$tmpdir/flat.vdi" ||
        fail "the flattened child differs from base + its writes"
    "$IMAGENBD" info --json "$tmpdir/flat.vdi" >"$tmpdir/flat.json"
    [ "$(json_get "$tmpdir/flat.json" vdi subformat)" = dynamic ] || fail "flat.vdi subformat"
    # A differencing VDI (parent found by UUID in the same directory), flattened to VHD.
    "$IMAGENBD" create -f vdi --parent "$tmpdir/flat.vdi" "$tmpdir/vchild.vdi"
    cp "$tmpdir/child.raw" "$tmpdir/vchild.raw"
    start_imagenbd -x vchild "$tmpdir/vchild.vdi"
    both vchild "write -P 0x77 $(( 40 * mib )) 64k"
    stop_imagenbd
    "$IMAGENBD" convert -O vhd --subformat fixed "$tmpdir/vchild.vdi" "$tmpdir/vflat.vhd" ||
        fail "flatten vdi"
    qemu-img compare -f raw -F vpc "$tmpdir/vchild.raw" "$tmpdir/vflat.vhd" ||
        fail "the flattened VDI child differs from its parent + its writes"
else
    echo "create --parent is not built: differencing inputs not checked"
fi

# --- SIGINT: the conversion stops, and neither OUT nor a temporary file is left ------
head -c $(( 192 * mib )) /dev/urandom >"$tmpdir/big.img"
"$IMAGENBD" convert -O vdi "$tmpdir/big.img" "$tmpdir/big.vdi" 2>"$tmpdir/err" &
pid=$!
sleep 0.3
kill -INT "$pid" 2>/dev/null || :
status=0
wait "$pid" || status=$?
cat "$tmpdir/err"
if [ "$status" = 0 ]; then   # too fast to interrupt: then it must be complete
    qemu-img compare -f raw -F vdi "$tmpdir/big.img" "$tmpdir/big.vdi" || fail "big.vdi"
else
    [ "$status" = 1 ] || fail "interrupted convert: exit $status, expected 1"
    must_contain "$tmpdir/err" "interrupted"
    [ -e "$tmpdir/big.vdi" ] && fail "an interrupted convert left OUT"
fi
ls -a "$tmpdir" | grep -Eq '^\..*\.imagenbd-[0-9a-f]{8}$' && fail "temporary files left: $(ls -a "$tmpdir")"
rm -f "$tmpdir/big.img" "$tmpdir/big.vdi"

echo "$test_name: OK"
