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
