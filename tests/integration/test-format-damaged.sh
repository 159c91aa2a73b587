#!/usr/bin/env bash
# Damaged VHD and VDI files, made at test time by byte-patching images qemu-img made and
# qemu-io filled (a few cases of the corpora in tests/unit/formats/*_damaged_test.cpp, end
# to end): `imagenbd serve` and `imagenbd info` refuse each one with exit status 1 (never a
# signal, never a hang) and a message that names the file, the structure and the field;
# `imagenbd check` finds errors (exit status 2) and names the field too. The undamaged
# images pass all three.
source "$(dirname "$0")/functions.sh"
set -x

requires qemu-img qemu-io

mib=$(( 1024 * 1024 ))
if "$IMAGENBD" check --help >/dev/null 2>&1; then have_check=1; else have_check=; fi

# refused FILE FIELD REGEX [SERVE-ARGS...]: serve and info exit 1 with "FORMAT: FILE: REGEX"
# (FORMAT from the file's extension); check exits 2 and mentions FIELD.
refused ()
{
    local file=$1 field=$2 regex=$3 format=${1##*.} status
    shift 3
    for tool in serve info; do
        status=0
        if [ $tool = serve ]; then
            timeout 20 "$IMAGENBD" serve -k "$sockdir/bad.sock" "$@" "$file" \
                >"$tmpdir/out" 2>&1 || status=$?
        else
            timeout 20 "$IMAGENBD" info "$@" "$file" >"$tmpdir/out" 2>&1 || status=$?
        fi
        cat "$tmpdir/out"
        [ "$status" = 1 ] || fail "$tool $file: exit status $status, expected 1"
        must_contain "$tmpdir/out" "^imagenbd: $format: $file: $regex" "$tool $file"
    done
    if [ -n "$have_check" ]; then
        status=0
        timeout 20 "$IMAGENBD" check "$@" "$file" >"$tmpdir/out" 2>&1 || status=$?
        cat "$tmpdir/out"
        [ "$status" = 2 ] || fail "check $file: exit status $status, expected 2 (errors)"
        must_contain "$tmpdir/out" "$field" "check $file"
    fi
}

# accepted FILE: serve, info and check all take it.
accepted ()
{
    timeout 20 "$IMAGENBD" info "$1" >"$tmpdir/out" 2>&1 || { cat "$tmpdir/out"; fail "info $1"; }
    if [ -n "$have_check" ]; then
        "$IMAGENBD" check "$1" || fail "check $1 finds problems in an undamaged image"
    fi
    start_imagenbd -r "$1"
    stop_imagenbd
}

# --- VHD: a dynamic image, 2 MiB blocks; blocks 0 and 1 hold data -----------------------
# Footer copy at 0, dynamic header at 0x200, BAT at 0x600, blocks from 0x800.
qemu-img create -f vpc -o subformat=dynamic,force_size=on "$tmpdir/good.vhd" 16M
io vpc "$tmpdir/good.vhd" 'write -P 0x11 0 64k' 'write -P 0x22 3M 64k'
end=$(( $(stat -c %s "$tmpdir/good.vhd") - 512 ))
accepted "$tmpdir/good.vhd"

vhd_case () { cp "$tmpdir/good.vhd" "$tmpdir/$1.vhd"; echo "$tmpdir/$1.vhd"; }
header_field () { patch_bytes "$1" $(( 0x200 + $2 )) "$3"; fix_checksum "$1" 512 1024 $(( 0x24 )); }
footer_field ()
{
    local at
    for at in 0 "$end"; do
        patch_bytes "$1" $(( at + $2 )) "$3"
        fix_checksum "$1" "$at" 512 $(( 0x40 ))
    done
}

f=$(vhd_case entries)
header_field "$f" $(( 0x1c )) ffffffff
refused "$f" max_table_entries \
    "dynamic header: max_table_entries 4294967295 is larger than the limit of 67108864"

f=$(vhd_case table)
header_field "$f" $(( 0x10 )) 0000000000000601
refused "$f" table_offset "dynamic header: table_offset 0x601 \(the BAT\) is not a multiple of 512"

f=$(vhd_case overlap)
header_field "$f" $(( 0x10 )) 0000000000000400
refused "$f" table_offset \
    "dynamic header: table_offset 0x400: the BAT \(0x200 bytes\) overlaps the dynamic header at 0x200"

f=$(vhd_case bat0)
patch_bytes "$f" $(( 0x600 + 4 )) 00000000
refused "$f" BAT "BAT entry 1 points into the footer copy at 0x0"

f=$(vhd_case twice)
patch_bytes "$f" $(( 0x600 + 4 )) "$(od -An -tx1 -j $(( 0x600 )) -N4 "$f" | tr -d ' \n')"
refused "$f" BAT "BAT entries 0 and 1 point at the same block"

f=$(vhd_case bsize)
header_field "$f" $(( 0x20 )) 00000100
refused "$f" block_size "dynamic header: block_size 256 is smaller than 512"

f=$(vhd_case huge)
footer_field "$f" $(( 0x30 )) 0000020000000000  # 2 TiB
refused "$f" current_size \
    "footer: current_size 2199023255552 is larger than 2190433320960 \(2040 GiB\)"

f=$(vhd_case type7)
footer_field "$f" $(( 0x3c )) 00000007
refused "$f" disk_type "footer: disk_type 7 is not 2 \(fixed\), 3 \(dynamic\) or 4"

f=$(vhd_case hsum)
patch_bytes "$f" $(( 0x200 + 0x300 )) 01
refused "$f" checksum "dynamic header: checksum mismatch \(stored 0x[0-9a-f]{8}, computed"

: >"$tmpdir/empty.vhd"
refused "$tmpdir/empty.vhd" "0 bytes|truncated|footer" \
    "the file is 0 bytes, shorter than a 512-byte footer \(truncated\?\)" -f vhd

# --- VDI: a dynamic image, 1 MiB blocks; blocks 0 and 3 hold data ------------------------
# Block map at 0x200, data at 0x400.
qemu-img create -f vdi "$tmpdir/good.vdi" 8M
io vdi "$tmpdir/good.vdi" 'write -P 0x11 0 64k' 'write -P 0x22 3M 64k'
accepted "$tmpdir/good.vdi"

vdi_case () { cp "$tmpdir/good.vdi" "$tmpdir/$1.vdi"; echo "$tmpdir/$1.vdi"; }

f=$(vdi_case version)
patch_bytes "$f" $(( 0x44 )) 02000100  # 1.2, little-endian
refused "$f" version "header: version 1.2 is not supported \(only 1.1\)"

f=$(vdi_case data)
patch_bytes "$f" $(( 0x158 )) 01040000
refused "$f" "data offset|offData" "header: data offset 0x401 is not a multiple of 512"

f=$(vdi_case extra)
patch_bytes "$f" $(( 0x17c )) 03000000
refused "$f" "extra|cbBlockExtra" "header: block extra size 3 is neither 0 nor a power of two"

f=$(vdi_case count)
patch_bytes "$f" $(( 0x180 )) ffffff7f
refused "$f" "block count|cBlocks" \
    "header: block count 2147483647 does not match the disk size 8388608"

f=$(vdi_case beyond)
patch_bytes "$f" $(( 0x200 + 4 * 5 )) e8030000  # entry 5 = 1000
refused "$f" "block map" "block map entry 5 points at block 1000, beyond the 8 blocks"

f=$(vdi_case shared)
patch_bytes "$f" $(( 0x200 + 4 * 6 )) 00000000  # entry 6 = physical 0, as entry 0
refused "$f" "block map" "block map entries 0 and 6 point at the same block \(0\)"

f=$(vdi_case short)
truncate -s 512 "$f"
refused "$f" "block map|truncated" \
    "header: the block map \(0x200 to 0x220\) extends past the end of the file \(0x200 bytes"
