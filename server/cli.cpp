#include "server/cli.hpp"

#include <getopt.h>

#include <algorithm>
#include <charconv>
#include <optional>

namespace imagenbd::server {

namespace {

enum LongOnly : int {
  opt_threads = 1000,
  opt_pid_file,
  opt_handshake_timeout,
  opt_debug,
  opt_blocking_threads,
  opt_parent,
  opt_vhd_size,
  opt_snapshot,
  opt_force,
  opt_lease_duration,
  opt_retry_deadline,
  opt_tls,
  opt_tls_certificates,
  opt_tls_psk,
  opt_tls_verify_peer,
  opt_allow,
  opt_allow_identity,
  opt_max_connections,
  opt_idle_timeout,
  opt_admin,
  opt_config,
  opt_overlay,
  opt_cache,
  opt_cache_size,
  opt_cache_chunk,
  opt_readahead,
  opt_boot_profile,
  opt_commit_to,
};

const option long_options[] = {
    {"port", required_argument, nullptr, 'p'},
    {"bind", required_argument, nullptr, 'b'},
    {"socket", required_argument, nullptr, 'k'},
    {"shared", required_argument, nullptr, 'e'},
    {"persistent", no_argument, nullptr, 't'},
    {"export-name", required_argument, nullptr, 'x'},
    {"export", required_argument, nullptr, 'x'},  // nbdkit's spelling
    {"description", required_argument, nullptr, 'D'},
    {"read-only", no_argument, nullptr, 'r'},
    {"readonly", no_argument, nullptr, 'r'},
    {"format", required_argument, nullptr, 'f'},
    {"parent", required_argument, nullptr, opt_parent},
    {"vhd-size", required_argument, nullptr, opt_vhd_size},
    {"snapshot", optional_argument, nullptr, opt_snapshot},
    {"force", no_argument, nullptr, opt_force},
    {"lease-duration", required_argument, nullptr, opt_lease_duration},
    {"retry-deadline", required_argument, nullptr, opt_retry_deadline},
    {"overlay", required_argument, nullptr, opt_overlay},
    {"cache", required_argument, nullptr, opt_cache},
    {"cache-size", required_argument, nullptr, opt_cache_size},
    {"cache-chunk", required_argument, nullptr, opt_cache_chunk},
    {"readahead", required_argument, nullptr, opt_readahead},
    {"boot-profile", required_argument, nullptr, opt_boot_profile},
    {"commit-to", required_argument, nullptr, opt_commit_to},
    {"threads", required_argument, nullptr, opt_threads},
    {"blocking-threads", required_argument, nullptr, opt_blocking_threads},
    {"pid-file", required_argument, nullptr, opt_pid_file},
    {"handshake-timeout", required_argument, nullptr, opt_handshake_timeout},
    {"tls", required_argument, nullptr, opt_tls},
    {"tls-certificates", required_argument, nullptr, opt_tls_certificates},
    {"tls-psk", required_argument, nullptr, opt_tls_psk},
    {"tls-verify-peer", no_argument, nullptr, opt_tls_verify_peer},
    {"allow", required_argument, nullptr, opt_allow},
    {"allow-identity", required_argument, nullptr, opt_allow_identity},
    {"max-connections", required_argument, nullptr, opt_max_connections},
    {"idle-timeout", required_argument, nullptr, opt_idle_timeout},
    {"admin", required_argument, nullptr, opt_admin},
    {"config", required_argument, nullptr, opt_config},
    {"verbose", no_argument, nullptr, 'v'},
    {"debug", required_argument, nullptr, opt_debug},
    {"quiet", no_argument, nullptr, 'q'},
    {"help", no_argument, nullptr, 'h'},
    {"version", no_argument, nullptr, 'V'},
    {nullptr, 0, nullptr, 0},
};

unsigned parse_number(std::string_view text, std::string_view flag, unsigned max) {
  unsigned value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value > max) {
    throw UsageError("invalid value '" + std::string(text) + "' for " + std::string(flag) +
                     " (expected a number from 0 to " + std::to_string(max) + ")");
  }
  return value;
}

}  // namespace

const char* serve_help() {
  return R"(Usage: imagenbd serve [OPTIONS] [NAME=]IMAGE...

Serve disk images over the Network Block Device protocol (NBD).

IMAGE is a file or block device (optionally written file:PATH), memory:SIZE for a
sparse RAM disk (e.g. memory:1G), or an Azure page blob (see below). Each IMAGE becomes
one export: name it with NAME=IMAGE (NAME without '/', ':' or '?') or, for a single
image, with -x NAME. The first export is also the default export, the one a client gets
when it asks for the empty name.

Connection:
  -p, --port=PORT            TCP port to listen on (default 10809)
  -b, --bind=ADDR            address to listen on (default: every IPv4 and IPv6
                             address); may be given several times
  -k, --socket=PATH          listen on a Unix socket; without -p or -b, no TCP listener
  -e, --shared=NUM           serve at most NUM clients at once (default 0: no limit)
  -t, --persistent           accepted for qemu-nbd compatibility (imagenbd always stays up
                             after the last client leaves)

Exports:
  -x, --export-name=NAME     export name for a single IMAGE (default: "")
  -D, --description=TEXT     export description (shown by nbdinfo --list, qemu-nbd -L)
  -r, --read-only            refuse writes, trims and zeroes (EPERM)
  -f, --format=FORMAT        image format: raw, vhd (fixed, dynamic) or vdi (static,
                             dynamic); default: probe the image by its magic (a raw
                             image is never taken for another format on writes)
      --parent=FILE          the parent of a differencing IMAGE, instead of the one its
                             VHD parent locators name or, for VDI, the image with its
                             parent UUID in the same directory (checked by UUID)
      --vhd-size=POLICY      where a VHD's virtual size comes from: auto (default:
                             current_size, except the CHS geometry for images made by
                             Virtual PC and old qemu), current_size, or chs

Azure blob storage:
  IMAGE may be a page blob: az://ACCOUNT/CONTAINER/BLOB,
  https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB[?SAS], or an emulator's path-style
  URL http://HOST:PORT/ACCOUNT/CONTAINER/BLOB[?SAS]; ?snapshot=T addresses a snapshot.
  Credentials come from AZURE_STORAGE_CONNECTION_STRING (UseDevelopmentStorage=true for
  Azurite), else AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN,
  or the URI's SAS. A writable export holds the blob's lease (one writer at a time);
  -r serves the live blob without a lease (it may change underneath).
      --snapshot[=TIMESTAMP] serve a snapshot read-only: a new one taken at start, or
                             the existing one with that timestamp; any number of
                             servers can serve snapshots of one blob
      --force                break a lease held by another writer and take it over (the
                             other writer's writes then fail)
      --lease-duration=SECS  lease duration, 15 to 60 (default 60); renewed every third
      --retry-deadline=SECS  retry transient faults (timeouts, resets, 5xx, throttling)
                             of one request for this long (default 60)

TLS (NBD_OPT_STARTTLS; clients: qemu's tls-creds objects, nbds:// URIs of libnbd):
      --tls=MODE             off (default), on (offer TLS, plaintext still allowed) or
                             require (before TLS only STARTTLS is answered; no export
                             name or size is revealed)
      --tls-certificates=DIR X.509: DIR holds server-cert.pem, server-key.pem and, for
                             --tls-verify-peer, ca-cert.pem
      --tls-psk=FILE         TLS-PSK: FILE holds "username:hexkey" lines (psktool -u)
      --tls-verify-peer      require client certificates signed by DIR/ca-cert.pem

Access control and limits (for every export on the command line):
      --allow=CIDR[,CIDR...] serve only clients from these addresses (e.g. 10.0.0.0/8,
                             ::1); may be given several times; Unix socket clients
                             are always allowed
      --allow-identity=NAME  serve only TLS clients with this identity: a client
                             certificate's subject ("CN=node1,O=Example") or a PSK
                             user name; may be given several times
      --max-connections=NUM  at most NUM connections per export (default 0: no limit)
      --idle-timeout=S       close connections idle (no request) for S seconds
                             (default 0: never)

S3 and HTTP(S), read-only:
  IMAGE may be s3://BUCKET/KEY (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
  AWS_SESSION_TOKEN, else anonymous; AWS_REGION or AWS_DEFAULT_REGION; an S3-compatible
  store through AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) or any other http(s):// URL of a
  server that honours Range requests (one that ignores them is refused). Such exports
  are read-only (add --overlay to write); a replaced object makes reads fail instead of
  mixing versions.

Remote images: local cache and copy-on-write overlay (any IMAGE; made for remote ones):
      --cache=PATH           keep the bytes fetched from the remote in PATH (a sparse
                             file, PATH.meta says what it holds); a restart keeps them,
                             a changed remote object discards them; shared by every
                             export and connection serving the same object
      --cache-size=SIZE      cap the cached bytes (e.g. 20G; default: the image's size);
                             least recently used chunks are evicted
      --cache-chunk=SIZE     the cache's unit of fetching (a power of two, at least 4K;
                             default: the remote's preferred request size, or 1M)
      --readahead=on|off     with --cache, prefetch ahead of sequential reads, the window
                             growing from 64 KiB to 16 MiB per stream (default: on)
      --boot-profile=FILE    with --cache, record the order in which the image's chunks
                             are first read after start into FILE; when FILE already
                             holds the profile of this image and version, prefetch in
                             that order in the background instead
      --overlay=FILE         keep every write in FILE (created if missing or empty), a
                             copy-on-write overlay over the image, which is only read
                             (but see --commit-to); survives restarts and crashes
                             (flushed writes are kept); works over read-only S3/HTTP too
      --commit-to=URI        live snapshots (`imagenbd snapshot --admin=ADDR EXPORT`)
                             commit the overlay's writes into the base blob when this
                             server holds its lease (no -r, no --snapshot), else into
                             this private page blob, cloned from the base at first use

Server:
      --config=FILE          read listeners, TLS, limits and exports from a TOML file
                             (see README); SIGHUP reloads it
      --admin=ADDR           admin endpoint (/metrics, /exports, /reload) on
                             unix:PATH or a loopback HOST:PORT (default: off)
      --threads=NUM          I/O threads (default: one per CPU)
      --blocking-threads=NUM threads for blocking file calls (default 16)
      --pid-file=FILE        write the process id to FILE once listening
      --handshake-timeout=S  close clients that have not finished the handshake after
                             S seconds (default 10)
  -v, --verbose              log handshakes and opens; twice: one line per request
      --debug=LIST           debug logging by name: control, data (comma-separated)
  -q, --quiet                log warnings and errors only
  -h, --help                 print this help and exit
  -V, --version              print the version and exit

Stop with SIGINT or SIGTERM: imagenbd stops accepting, finishes the requests in flight,
flushes and closes. Logs go to stderr, with syslog priorities under systemd.

Examples:
  imagenbd serve -x disk disk.img
      qemu-img info nbd://localhost:10809/disk
      nbdinfo nbd://localhost/disk
      nbd-client localhost 10809 /dev/nbd0 -N disk
  imagenbd serve -r -k /tmp/nbd.sock base=base.img scratch=memory:1G
      qemu-io -r -f raw 'nbd+unix:///base?socket=/tmp/nbd.sock'
  AZURE_STORAGE_CONNECTION_STRING=UseDevelopmentStorage=true \
    imagenbd serve -x disk az://devstoreaccount1/images/disk.vhd
  imagenbd serve --snapshot -x disk az://myaccount/images/disk.vhd
  imagenbd serve -x disk --cache=/var/cache/imagenbd/disk --cache-size=20G \
      --overlay=/var/lib/imagenbd/disk.cow s3://images/disk.vhd
)";
}

ServeCommand parse_serve(int argc, char** argv) {
  ServeCommand cmd;
  std::optional<std::string> export_name;
  std::optional<std::string> description;
  formats::Format format = formats::Format::automatic;
  formats::vhd::SizePolicy vhd_size = formats::vhd::SizePolicy::automatic;
  std::string parent;
  bool read_only = false;
  bool port_given = false;
  std::string snapshot;
  bool force = false;
  int lease_duration = 60;
  int retry_deadline = 60;
  int verbosity = 0;
  AccessRules access;
  ExportSpec remote;  // --overlay, --cache* , --readahead, --boot-profile, --commit-to
  bool tls_mode_given = false;
  // Flags that describe the images on the command line (the first one given, for the
  // error when there are none).
  std::string per_image_flag;
  const auto per_image = [&](std::string_view flag) {
    if (per_image_flag.empty()) per_image_flag = flag;
  };

  ::optind = 0;  // full reset: parse_serve may be called more than once (tests)
  ::opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, ":p:b:k:e:tx:D:rf:vqhV", long_options, nullptr)) != -1) {
    const std::string arg = optarg ? optarg : "";
    switch (c) {
      case 'p':
        cmd.server.listen.port = static_cast<uint16_t>(parse_number(arg, "--port", 65535));
        port_given = true;
        break;
      case 'b':
        cmd.server.listen.bind_addresses.push_back(arg);
        break;
      case 'k':
        cmd.server.listen.unix_paths.push_back(arg);
        break;
      case 'e':
        cmd.server.max_clients = parse_number(arg, "--shared", 1u << 20);
        break;
      case 't':
        break;
      case 'x':
        per_image("--export-name");
        export_name = arg;
        break;
      case 'D':
        per_image("--description");
        description = arg;
        break;
      case 'r':
        per_image("--read-only");
        read_only = true;
        break;
      case 'f':
        per_image("--format");
        try {
          format = formats::parse_format(arg);
        } catch (const std::invalid_argument& e) {
          throw UsageError(e.what());
        }
        break;
      case opt_parent:
        per_image("--parent");
        if (arg.empty()) throw UsageError("--parent needs a file name");
        parent = arg;
        break;
      case opt_vhd_size:
        per_image("--vhd-size");
        if (arg == "auto") {
          vhd_size = formats::vhd::SizePolicy::automatic;
        } else if (arg == "current_size") {
          vhd_size = formats::vhd::SizePolicy::current_size;
        } else if (arg == "chs") {
          vhd_size = formats::vhd::SizePolicy::chs;
        } else {
          throw UsageError("invalid --vhd-size '" + arg + "' (known: auto, current_size, chs)");
        }
        break;
      case opt_snapshot:
        per_image("--snapshot");
        snapshot = arg.empty() ? "new" : arg;
        break;
      case opt_force:
        per_image("--force");
        force = true;
        break;
      case opt_lease_duration:
        per_image("--lease-duration");
        lease_duration = static_cast<int>(parse_number(arg, "--lease-duration", 60));
        if (lease_duration < 15) {
          throw UsageError("invalid value '" + arg +
                           "' for --lease-duration (expected 15 to 60 seconds)");
        }
        break;
      case opt_retry_deadline:
        per_image("--retry-deadline");
        retry_deadline = static_cast<int>(parse_number(arg, "--retry-deadline", 86400));
        break;
      case opt_overlay:
        per_image("--overlay");
        if (arg.empty()) throw UsageError("--overlay needs a file name");
        remote.overlay = arg;
        break;
      case opt_cache:
        per_image("--cache");
        if (arg.empty()) throw UsageError("--cache needs a file name");
        remote.cache = arg;
        break;
      case opt_cache_size:
      case opt_cache_chunk: {
        const bool chunk = c == opt_cache_chunk;
        per_image(chunk ? "--cache-chunk" : "--cache-size");
        uint64_t bytes = 0;
        try {
          bytes = parse_size(arg);
        } catch (const std::invalid_argument& e) {
          throw UsageError(std::string(chunk ? "--cache-chunk: " : "--cache-size: ") + e.what());
        }
        if (chunk) {
          remote.cache_chunk = static_cast<uint32_t>(std::min<uint64_t>(bytes, UINT32_MAX));
        } else {
          remote.cache_size = bytes;
        }
        break;
      }
      case opt_readahead:
        per_image("--readahead");
        if (arg != "on" && arg != "off") {
          throw UsageError("invalid --readahead '" + arg + "' (known: on, off)");
        }
        remote.readahead = arg == "on";
        break;
      case opt_boot_profile:
        per_image("--boot-profile");
        if (arg.empty()) throw UsageError("--boot-profile needs a file name");
        remote.boot_profile = arg;
        break;
      case opt_commit_to:
        per_image("--commit-to");
        if (arg.empty()) throw UsageError("--commit-to needs a blob URI");
        remote.commit_to = arg;
        break;
      case opt_threads:
        cmd.server.threads = parse_number(arg, "--threads", 1024);
        break;
      case opt_blocking_threads:
        cmd.blocking_threads = parse_number(arg, "--blocking-threads", 4096);
        break;
      case opt_pid_file:
        cmd.server.pid_file = arg;
        break;
      case opt_handshake_timeout:
        cmd.server.session.handshake_timeout =
            std::chrono::seconds(parse_number(arg, "--handshake-timeout", 86400));
        // 0 would not mean "never": the deadline would pass at once and drop every client.
        if (cmd.server.session.handshake_timeout.count() == 0) {
          throw UsageError("invalid value '0' for --handshake-timeout (expected 1 to 86400)");
        }
        break;
      case opt_tls:
        cmd.tls_flags_given = true;
        if (arg == "off") {
          cmd.server.tls.mode = protocol::TlsMode::off;
        } else if (arg == "on") {
          cmd.server.tls.mode = protocol::TlsMode::on;
        } else if (arg == "require") {
          cmd.server.tls.mode = protocol::TlsMode::require;
        } else {
          throw UsageError("invalid --tls '" + arg + "' (known: off, on, require)");
        }
        tls_mode_given = true;
        break;
      case opt_tls_certificates:
        cmd.tls_flags_given = true;
        cmd.server.tls.certificates_dir = arg;
        break;
      case opt_tls_psk:
        cmd.tls_flags_given = true;
        cmd.server.tls.psk_file = arg;
        break;
      case opt_tls_verify_peer:
        cmd.tls_flags_given = true;
        cmd.server.tls.verify_peer = true;
        break;
      case opt_allow: {
        per_image("--allow");
        std::string_view list = arg;
        while (!list.empty()) {
          auto comma = list.find(',');
          try {
            access.allow.push_back(Cidr::parse(list.substr(0, comma)));
          } catch (const std::invalid_argument& e) {
            throw UsageError(std::string("--allow: ") + e.what());
          }
          list = comma == std::string_view::npos ? "" : list.substr(comma + 1);
        }
        break;
      }
      case opt_allow_identity:
        per_image("--allow-identity");
        if (arg.empty()) throw UsageError("--allow-identity needs a name");
        access.tls_identities.push_back(arg);
        break;
      case opt_max_connections:
        per_image("--max-connections");
        access.max_connections = parse_number(arg, "--max-connections", 1u << 20);
        break;
      case opt_idle_timeout:
        cmd.server.session.idle_timeout =
            std::chrono::seconds(parse_number(arg, "--idle-timeout", 86400 * 7));
        break;
      case opt_admin:
        cmd.server.admin.listen = arg;
        break;
      case opt_config:
        if (arg.empty()) throw UsageError("--config needs a file name");
        cmd.config_file = arg;
        break;
      case 'v':
        ++verbosity;
        break;
      case opt_debug: {
        std::string_view list = arg;
        while (!list.empty()) {
          auto comma = list.find(',');
          auto item = list.substr(0, comma);
          if (item == "control")
            cmd.log.control_debug = true;
          else if (item == "data")
            cmd.log.data_debug = true;
          else
            throw UsageError("unknown --debug switch '" + std::string(item) +
                             "' (known: control, data)");
          list = comma == std::string_view::npos ? "" : list.substr(comma + 1);
        }
        break;
      }
      case 'q':
        cmd.log.level = log::Level::warning;
        break;
      case 'h':
        cmd.help = true;
        return cmd;
      case 'V':
        cmd.version = true;
        return cmd;
      case ':':
        throw UsageError(std::string("option ") + argv[optind - 1] + " needs a value");
      default:
        throw UsageError(std::string("unknown option ") + argv[optind - 1]);
    }
  }
  if (verbosity >= 1) cmd.log.control_debug = true;
  if (verbosity >= 2) cmd.log.data_debug = true;
  // -k alone means a Unix socket only, as with qemu-nbd.
  cmd.server.listen.tcp = cmd.server.listen.unix_paths.empty() || port_given ||
                          !cmd.server.listen.bind_addresses.empty();

  // TLS flags alone turn TLS on, as with nbdkit; --tls=off with them is a contradiction.
  const bool tls_credentials =
      !cmd.server.tls.certificates_dir.empty() || !cmd.server.tls.psk_file.empty();
  if (!tls_mode_given && tls_credentials) cmd.server.tls.mode = protocol::TlsMode::on;
  if (cmd.server.tls.mode != protocol::TlsMode::off) {
    if (!tls_credentials) {
      throw UsageError(
          "--tls=" + std::string(cmd.server.tls.mode == protocol::TlsMode::on ? "on" : "require") +
          " needs --tls-certificates=DIR or --tls-psk=FILE");
    }
    if (!cmd.server.tls.certificates_dir.empty() && !cmd.server.tls.psk_file.empty()) {
      throw UsageError("--tls-certificates and --tls-psk cannot be used together");
    }
  } else if (tls_credentials || cmd.server.tls.verify_peer) {
    throw UsageError("--tls=off cannot go with --tls-certificates, --tls-psk or --tls-verify-peer");
  }
  if (cmd.server.tls.verify_peer && cmd.server.tls.certificates_dir.empty()) {
    throw UsageError("--tls-verify-peer needs --tls-certificates=DIR (with DIR/ca-cert.pem)");
  }
  // With --config, TLS may come from the file: apply_config_file checks after merging.
  if (!access.tls_identities.empty() && cmd.server.tls.mode == protocol::TlsMode::off &&
      cmd.config_file.empty()) {
    throw UsageError("--allow-identity needs TLS (--tls=on or require, with credentials)");
  }
  // Without --tls-verify-peer no client certificate is asked for, so no X.509 client has
  // an identity and the list would refuse everyone.
  if (!access.tls_identities.empty() && !cmd.server.tls.certificates_dir.empty() &&
      !cmd.server.tls.verify_peer) {
    throw UsageError(
        "--allow-identity with --tls-certificates needs --tls-verify-peer (without it "
        "clients send no certificate, so none has an identity)");
  }

  std::vector<std::string> images(argv + optind, argv + argc);
  // With --config the exports come from the file; images on the command line are added.
  if (images.empty() && !cmd.config_file.empty()) {
    // Per-image flags would silently apply to nothing: an --allow or --read-only that
    // protects nothing is worse than an error.
    if (!per_image_flag.empty()) {
      throw UsageError(per_image_flag +
                       " applies to the images given on the command line, and there are "
                       "none: with --config, set it in the file's [[export]] tables");
    }
    return cmd;
  }
  if (images.empty()) throw UsageError("no image given: imagenbd serve [OPTIONS] [NAME=]IMAGE...");
  if (!parent.empty() && images.size() > 1) {
    throw UsageError("--parent applies to a single image; serve the others separately");
  }
  if (images.size() > 1 && (!remote.overlay.empty() || !remote.cache.empty() ||
                            !remote.boot_profile.empty() || !remote.commit_to.empty())) {
    throw UsageError(
        "--overlay, --cache, --boot-profile and --commit-to name files of a single image; "
        "serve the others separately or use a config file");
  }
  if (force && (read_only || !snapshot.empty())) {
    throw UsageError("--force takes over a writer's lease: it cannot go with " +
                     std::string(read_only ? "--read-only" : "--snapshot"));
  }
  for (const auto& image : images) {
    ExportSpec spec;
    auto eq = image.find('=');
    // NAME=IMAGE, unless the '=' belongs to a path ("./a=b.img", "/x/a=b"), a prefix
    // ("file:a=b", "memory:...") or a URI's query ("az://a/c/b?snapshot=T").
    if (eq != std::string::npos && image.find_first_of("/:?") > eq) {
      spec.name = image.substr(0, eq);
      spec.image = image.substr(eq + 1);
    } else {
      if (images.size() > 1) {
        throw UsageError("several images given: name each one, as NAME=IMAGE ('" + image + "')");
      }
      spec.name = export_name.value_or("");
      spec.image = image;
    }
    if (spec.image.empty()) throw UsageError("export '" + spec.name + "' has no image");
    if (spec.name.size() > 4096) throw UsageError("export names are limited to 4096 bytes");
    spec.description = description.value_or("");
    spec.format = format;
    // A snapshot cannot be written, except through an overlay.
    spec.read_only = read_only || (!snapshot.empty() && remote.overlay.empty());
    spec.snapshot = snapshot;
    spec.force = force;
    spec.lease_duration = lease_duration;
    spec.retry_deadline = retry_deadline;
    spec.parent = parent;
    spec.vhd_size = vhd_size;
    spec.access = access;
    spec.overlay = remote.overlay;
    spec.cache = remote.cache;
    spec.cache_size = remote.cache_size;
    spec.cache_chunk = remote.cache_chunk;
    spec.readahead = remote.readahead;
    spec.boot_profile = remote.boot_profile;
    spec.commit_to = remote.commit_to;
    if (auto problem = remote_options_problem(spec); !problem.empty()) throw UsageError(problem);
    cmd.exports.push_back(std::move(spec));
  }
  return cmd;
}

}  // namespace imagenbd::server
