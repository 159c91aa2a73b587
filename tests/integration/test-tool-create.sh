#!/usr/bin/env bash
# imagenbd create: raw, VHD (fixed, dynamic) and VDI (static, dynamic) images of exact
# sizes, CHS-exact and not. qemu-img info -f vpc|vdi shows exactly the size asked for,
# qemu-img check -f vdi passes; each image serves through imagenbd, reads back as zeroes,
# takes writes from qemu-io over NBD and then compares equal (through qemu) to a raw file
# given the same writes. --json prints what was created. Mistakes are refused: an
# existing file without --force, bad sizes, unknown formats and subformats.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io

mib=$(( 1024 * 1024 ))
qemu_fmt () { case "$1" in vhd) echo vpc ;; *) echo "$1" ;; esac; }

# qemu_size FORMAT FILE: the virtual size qemu-img reports.
qemu_size ()
{
    qemu-img info -f "$(qemu_fmt "$1")" --output=json "$2" |
        py3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])'
}

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

# --- every format, subformat and a few sizes: qemu sees the exact size ------------------
# 20959232 = 602/4/17 CHS-exact (geometry stored); 20 MiB and 5 MiB + 1536 are not
# (65535/16/255 stored); qemu 7.2 must read current_size in both cases.
cases=(
    "raw - 5M"
    "vhd fixed 20M" "vhd fixed 20959232" "vhd dynamic 20M" "vhd dynamic 20959232"
    "vhd dynamic $(( 5 * mib + 1536 ))" "vdi static 10M" "vdi dynamic 10M"
    "vdi dynamic $(( 5 * mib + 1536 ))"
)
declare -a names=()
n=0
for c in "${cases[@]}"; do
    read -r fmt sub size <<<"$c"
    n=$(( n + 1 ))
    name=img$n
    names+=("$name:$fmt:$size")
    args=(-f "$fmt")
    [ "$sub" != - ] && args+=(--subformat "$sub")
    "$IMAGENBD" create "${args[@]}" --json "$tmpdir/$name" "$size" >"$tmpdir/$name.json" ||
        fail "create ${args[*]} $size failed"
    cat "$tmpdir/$name.json"
    bytes=$(py3 -c "
s = '$size'
m = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
print(int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s))")
    [ "$(json_get "$tmpdir/$name.json" virtual_size)" = "$bytes" ] ||
        fail "$name: --json virtual_size is not $bytes"
    [ "$(json_get "$tmpdir/$name.json" format)" = "$fmt" ] || fail "$name: --json format"
    [ "$(json_get "$tmpdir/$name.json" file_size)" = "$(stat -c %s "$tmpdir/$name")" ] ||
        fail "$name: --json file_size is not the file's size"
    [ "$(qemu_size "$fmt" "$tmpdir/$name")" = "$bytes" ] ||
        fail "$name ($c): qemu-img does not see $bytes bytes"
    case "$fmt" in
        vhd)
            [ "$(json_get "$tmpdir/$name.json" vhd creator_app)" = inbd ] || fail "$name creator"
            [ "$(json_get "$tmpdir/$name.json" vhd current_size)" = "$bytes" ] ||
                fail "$name current_size"
            [ "$(json_get "$tmpdir/$name.json" vhd qemu72_size)" = "$bytes" ] ||
                fail "$name: qemu 7.2 would not see $bytes"
            [ "$(json_get "$tmpdir/$name.json" vhd subformat)" = "$sub" ] || fail "$name sub"
            if [ "$bytes" = 20959232 ]; then
                [ "$(json_get "$tmpdir/$name.json" vhd geometry cylinders)" = 602 ] ||
                    fail "$name: CHS-exact size without its own geometry"
            else
                [ "$(json_get "$tmpdir/$name.json" vhd geometry cylinders)" = 65535 ] ||
                    fail "$name: not CHS-exact, but not the maximum geometry"
            fi
            ;;
        vdi)
            qemu-img check -f vdi "$tmpdir/$name" || fail "$name: qemu-img check failed"
            [ "$(json_get "$tmpdir/$name.json" vdi subformat)" = "$sub" ] || fail "$name sub"
            [ "$(json_get "$tmpdir/$name.json" vdi block_size)" = $mib ] || fail "$name bs"
            ;;
    esac
    truncate -s "$bytes" "$tmpdir/$name.expected"
done
[ "$(stat -c %s "$tmpdir/img2")" = $(( 20 * mib + 512 )) ] ||
    fail "a fixed 20M VHD is not 20 MiB + 512 bytes"
[ "$(json_get "$tmpdir/img4.json" vhd block_size)" = $(( 2 * mib )) ] ||
    fail "dynamic VHD block size is not 2 MiB"

# --- served: zeroes, then writes, then equal to the expected raw through qemu -----------
exports=()
for e in "${names[@]}"; do exports+=("${e%%:*}=$tmpdir/${e%%:*}"); done
start_imagenbd "${exports[@]}"
for e in "${names[@]}"; do
    IFS=: read -r name fmt size <<<"$e"
    uri=$(nbd_uri "$name")
    bytes=$(stat -c %s "$tmpdir/$name.expected")
    qemu-img compare -f raw -F raw "$tmpdir/$name.expected" "$uri" ||
        fail "$name does not read back as zeroes"
    cmds=(-c 'write -P 0x5a 0 64k' -c 'write -P 0xa5 1536k 700k'
          -c "write -P 0x33 $(( bytes - 4096 )) 4096" -c 'write -P 0x77 3000 5000')
    qemu-io -f raw "${cmds[@]}" "$uri" >"$tmpdir/io.out" 2>&1 || { cat "$tmpdir/io.out"; fail "qemu-io on $name"; }
    ! grep -Ei 'fail|error' "$tmpdir/io.out" || fail "qemu-io reported an error on $name"
    qemu-io -f raw "${cmds[@]}" "$tmpdir/$name.expected" >/dev/null
    qemu-img compare -f raw -F raw "$tmpdir/$name.expected" "$uri" ||
        fail "$name over NBD differs from the expected raw"
done
stop_imagenbd
for e in "${names[@]}"; do
    IFS=: read -r name fmt size <<<"$e"
    qemu-img compare -f "$(qemu_fmt "$fmt")" -F raw "$tmpdir/$name" "$tmpdir/$name.expected" ||
        fail "$name read by qemu differs from the expected raw"
    if [ "$fmt" = vdi ]; then
        qemu-img check -f vdi "$tmpdir/$name" || fail "$name: qemu-img check after writes"
    fi
done

# --- refusals ---------------------------------------------------------------------------
must_fail "$tmpdir/exists.out" "$IMAGENBD" create -f raw "$tmpdir/img1" 1M
must_contain "$tmpdir/exists.out" "img1: the file exists \(use --force"
[ "$(stat -c %s "$tmpdir/img1")" = $(( 5 * mib )) ] || fail "a refused create changed the file"
"$IMAGENBD" create -f vdi --force "$tmpdir/img1" 2M || fail "--force did not overwrite"
[ "$(qemu_size vdi "$tmpdir/img1")" = $(( 2 * mib )) ] || fail "--force: not a 2M VDI"

must_fail "$tmpdir/badsize.out" "$IMAGENBD" create -f raw "$tmpdir/bad" 12X
must_contain "$tmpdir/badsize.out" "invalid size '12X'"
must_fail "$tmpdir/odd.out" "$IMAGENBD" create -f vhd "$tmpdir/bad" 1000
must_contain "$tmpdir/odd.out" "vhd size 1000 is not a positive multiple of 512"
must_fail "$tmpdir/big.out" "$IMAGENBD" create -f vhd "$tmpdir/bad" 2041G
must_contain "$tmpdir/big.out" "larger than 2040 GiB"
must_fail "$tmpdir/fmt.out" "$IMAGENBD" create -f qcow2 "$tmpdir/bad" 1M
must_contain "$tmpdir/fmt.out" "unknown image format 'qcow2'"
must_fail "$tmpdir/nofmt.out" "$IMAGENBD" create "$tmpdir/bad" 1M
must_contain "$tmpdir/nofmt.out" "needs a format"
must_fail "$tmpdir/sub.out" "$IMAGENBD" create -f vhd --subformat static "$tmpdir/bad" 1M
must_contain "$tmpdir/sub.out" "vhd subformat 'static' is not fixed or dynamic"
must_fail "$tmpdir/bs.out" "$IMAGENBD" create -f vhd --block-size 3000 "$tmpdir/bad" 1M
must_contain "$tmpdir/bs.out" "block size 3000 is not a power of two"
[ ! -e "$tmpdir/bad" ] || fail "a refused create left a file behind"

"$IMAGENBD" create --help >"$tmpdir/help.out" || fail "create --help"
for word in --subformat --block-size --force --json inbd 65535/16/255; do
    grep -qe "$word" "$tmpdir/help.out" || fail "create --help does not mention $word"
done
echo "$test_name: PASS"
