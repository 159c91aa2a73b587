# TLS helpers for the test-tls-*.sh tests, sourced after functions.sh. Certificates and
# keys are made at test time with openssl, laid out as nbdkit, qemu and libnbd expect:
#   server dir: ca-cert.pem server-cert.pem server-key.pem   (imagenbd --tls-certificates)
#   client dir: ca-cert.pem [client-cert.pem client-key.pem] (qemu tls-creds-x509 dir=,
#               libnbd tls-certificates=)

# make_ca DIR SUBJECT: a self-signed CA: DIR/ca-cert.pem, DIR/ca-key.pem.
make_ca ()
{
    mkdir -p "$1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$1/ca-key.pem" -out "$1/ca-cert.pem" -days 2 -subj "$2" \
        -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null ||
        fail "openssl could not make the CA $2"
}

# make_cert CADIR OUT-PREFIX SUBJECT server|client: OUT-PREFIX-cert.pem and -key.pem,
# signed by CADIR's CA. Server certificates name 127.0.0.1 and localhost (GnuTLS clients
# check the host they connect to).
make_cert ()
{
    local ca=$1 out=$2 subject=$3 kind=$4 ext=$tmpdir/ext.$$.cnf
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$out-key.pem" -out "$out.csr" -subj "$subject" 2>/dev/null ||
        fail "openssl could not make a key for $subject"
    if [ "$kind" = server ]; then
        printf '%s\n' 'basicConstraints=CA:FALSE' 'extendedKeyUsage=serverAuth' \
            'subjectAltName=IP:127.0.0.1,DNS:localhost' >"$ext"
    else
        printf '%s\n' 'basicConstraints=CA:FALSE' 'extendedKeyUsage=clientAuth' >"$ext"
    fi
    openssl x509 -req -in "$out.csr" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" \
        -CAcreateserial -days 2 -extfile "$ext" -out "$out-cert.pem" 2>/dev/null ||
        fail "openssl could not sign the certificate for $subject"
    rm -f "$out.csr" "$ext"
    chmod 600 "$out-key.pem"
}

# make_server_dir CADIR DIR: DIR/ca-cert.pem, server-cert.pem, server-key.pem.
make_server_dir ()
{
    mkdir -p "$2"
    cp "$1/ca-cert.pem" "$2/ca-cert.pem"
    make_cert "$1" "$2/server" "/O=Example/CN=localhost" server
}

# make_client_dir CADIR DIR [SUBJECT [SIGNING-CADIR]]: DIR/ca-cert.pem (CADIR's, to check
# the server) and, with SUBJECT, client-cert.pem/client-key.pem signed by SIGNING-CADIR
# (default CADIR).
make_client_dir ()
{
    mkdir -p "$2"
    cp "$1/ca-cert.pem" "$2/ca-cert.pem"
    if [ -n "${3:-}" ]; then
        make_cert "${4:-$1}" "$2/client" "$3" client
    fi
}

# make_psk FILE USER...: a psktool-style key file with a random 32-byte key per user.
make_psk ()
{
    local file=$1 user
    shift
    : >"$file"
    for user in "$@"; do
        printf '%s:%s\n' "$user" "$(openssl rand -hex 32)" >>"$file"
    done
    chmod 600 "$file"
}

# qemu_nbd: qemu's --image-opts for export "disk" of the server on $port, over the TLS
# credentials object with id tls0 (the --object of qemu_tls_copy and qemu_tls_io).
qemu_nbd ()
{
    echo "driver=nbd,host=127.0.0.1,port=$port,export=disk,tls-creds=tls0"
}

# qemu_tls_copy OBJECT IMAGE WHAT: with --object OBJECT, qemu-img info gives the size of
# IMAGE (a whole number of MiB) and qemu-img convert copies it byte for byte. WHAT (e.g.
# "TLS-PSK") goes in the failure messages.
qemu_tls_copy ()
{
    local object=$1 image=$2 what=$3
    qemu-img info --object "$object" --image-opts "$(qemu_nbd)" | tee "$tmpdir/info.out"
    must_contain "$tmpdir/info.out" "virtual size: $(( $(stat -c %s "$image") >> 20 )) MiB" \
        "qemu-img info over $what"
    qemu-img convert --object "$object" --image-opts "$(qemu_nbd)" -O raw "$tmpdir/conv.raw"
    cmp "$image" "$tmpdir/conv.raw" || fail "qemu-img convert over $what differs from the image"
}

# qemu_tls_io OBJECT IMAGE BYTE OFFSET-KIB LENGTH-KIB WHAT: with --object OBJECT, qemu-io
# writes BYTE (0x00-0xff) over LENGTH-KIB KiB at OFFSET-KIB, reads it back and flushes
# without an error, and the bytes are then in IMAGE, the file the server serves.
qemu_tls_io ()
{
    local object=$1 image=$2 byte=$3 offset=$4 length=$5 what=$6
    qemu-io --object "$object" --image-opts "$(qemu_nbd)" \
        -c "write -P $byte ${offset}k ${length}k" -c "read -P $byte ${offset}k ${length}k" \
        -c 'flush' >"$tmpdir/io.out" 2>&1 ||
        { cat "$tmpdir/io.out"; fail "qemu-io write/read over $what failed"; }
    cat "$tmpdir/io.out"
    if grep -Ei 'fail|error|pattern' "$tmpdir/io.out"; then fail "qemu-io reported an error"; fi
    cmp <(head -c $(( length * 1024 )) /dev/zero | tr '\0' "\\$(printf '%03o' $(( byte )))") \
        <(dd if="$image" bs=1024 skip="$offset" count="$length" status=none) ||
        fail "the data qemu-io wrote over $what is not in the image"
}
