"""Minimal raw NBD client for the integration tests.

libnbd cannot send some things we must test (unknown options and commands, option
payloads where none are allowed, NBD_OPT_EXPORT_NAME, exact option reply codes), so
test-protocol-raw.sh speaks the wire format directly with this module.
Layouts follow /work/shared/docs/protocol.md sections 2-11.
"""

import socket
import struct

NBDMAGIC = 0x4e42444d41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC = 0x0003e889045565a9        # option reply
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_DF = 4
CMD_FLAG_REQ_ONE = 8
CMD_FLAG_FAST_ZERO = 16

# Transmission flags (protocol.md section 7).
TX_HAS_FLAGS = 0x1
TX_READ_ONLY = 0x2
TX_SEND_FLUSH = 0x4
TX_SEND_FUA = 0x8
TX_SEND_TRIM = 0x20
TX_SEND_WRITE_ZEROES = 0x40
TX_SEND_DF = 0x80
TX_CAN_MULTI_CONN = 0x100
TX_SEND_CACHE = 0x400
TX_SEND_FAST_ZERO = 0x800

STATE_HOLE = 1
STATE_ZERO = 2

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

REP_NAMES = {
    REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO",
    REP_META_CONTEXT: "META_CONTEXT", REP_ERR_UNSUP: "ERR_UNSUP",
    REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}


def rep_name(t):
    return REP_NAMES.get(t, hex(t))


class ProtocolError(Exception):
    pass


class Conn:
    """One raw connection.  address: a Unix socket path, or (host, port)."""

    def __init__(self, address, timeout=10, rcvbuf=None, sndbuf=None):
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small buffers (set before connecting) make backpressure show up sooner.
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.handshake_flags = None
        self.structured = False

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the connection after %d of %d bytes"
                               % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def drain_until_close(self, timeout=5):
        """Reads whatever the server still sends until it closes the connection.
        Returns (closed, data): closed is False if the connection was still open
        after timeout seconds of silence."""
        self.sock.settimeout(timeout)
        data = bytearray()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True, bytes(data)
            except socket.timeout:
                return False, bytes(data)
            if not chunk:
                return True, bytes(data)
            data += chunk

    def is_closed_by_peer(self, timeout=5):
        """True if the server closes the connection (EOF) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    # ---- handshake -------------------------------------------------------

    def handshake(self, client_flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolError("bad greeting %x %x" % (magic, opt_magic))
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("server does not offer fixed newstyle")
        self.handshake_flags = flags
        self.client_flags = client_flags
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def read_option_reply(self):
        """Returns (option, reply_type, data)."""
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != REPLY_MAGIC:
            raise ProtocolError("bad option reply magic %x" % magic)
        return option, rtype, self.recv_exact(length)

    def option(self, option, data=b""):
        """Send an option; collect replies up to the final ACK or error.
        Returns a list of (reply_type, data); checks that each echoes the option."""
        self.send_option(option, data)
        replies = []
        while True:
            opt, rtype, rdata = self.read_option_reply()
            if opt != option:
                raise ProtocolError("reply echoes option %d, expected %d" % (opt, option))
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & 0x80000000:
                return replies

    @staticmethod
    def info_payload(name, infos=()):
        n = name.encode()
        return (struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))

    @staticmethod
    def meta_payload(name, queries):
        n = name.encode()
        out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            qb = q.encode()
            out += struct.pack(">I", len(qb)) + qb
        return out

    @staticmethod
    def parse_infos(replies):
        """{info_type: payload} from NBD_REP_INFO replies (duplicates raise)."""
        infos = {}
        for rtype, data in replies:
            if rtype != REP_INFO:
                continue
            (itype,) = struct.unpack(">H", data[:2])
            if itype in infos:
                raise ProtocolError("NBD_INFO type %d sent twice" % itype)
            infos[itype] = data[2:]
        return infos

    def export_name(self, name):
        """NBD_OPT_EXPORT_NAME: returns (size, flags); enters transmission."""
        self.send_option(OPT_EXPORT_NAME, name.encode())
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        if not self.client_flags & FLAG_NO_ZEROES:
            pad = self.recv_exact(124)
            if pad != bytes(124):
                raise ProtocolError("EXPORT_NAME padding is not zero")
        return size, flags

    def go(self, name="", infos=()):
        """NBD_OPT_GO; returns (size, flags) from NBD_INFO_EXPORT."""
        replies = self.option(OPT_GO, self.info_payload(name, infos))
        rtype = replies[-1][0]
        if rtype != REP_ACK:
            raise ProtocolError("GO failed with %s" % rep_name(rtype))
        infos = self.parse_infos(replies)
        if INFO_EXPORT not in infos or len(infos[INFO_EXPORT]) != 10:
            raise ProtocolError("GO: missing or bad NBD_INFO_EXPORT")
        return struct.unpack(">QH", infos[INFO_EXPORT])

    # ---- transmission ----------------------------------------------------

    @staticmethod
    def request_bytes(cmd, offset=0, length=0, flags=0, cookie=0x1122334455667788,
                      magic=REQUEST_MAGIC):
        """The 28-byte compact request header."""
        return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)

    def request(self, cmd, offset=0, length=0, flags=0, cookie=0x1122334455667788,
                payload=b""):
        self.send(self.request_bytes(cmd, offset, length, flags, cookie) + payload)

    def simple_reply(self, cookie=0x1122334455667788, read_length=0):
        """Read a simple reply; returns (error, data).  read_length bytes of data
        follow only on success."""
        magic, error, ck = struct.unpack(">IIQ", self.recv_exact(16))
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError("expected a simple reply, got magic %x" % magic)
        if ck != cookie:
            raise ProtocolError("cookie %x echoed as %x" % (cookie, ck))
        data = self.recv_exact(read_length) if error == 0 and read_length else b""
        return error, data

    def structured_reply(self, cookie=0x1122334455667788):
        """Read chunks up to DONE; returns a list of (flags, type, payload).
        A simple reply is returned as [(None, 'simple', error)]."""
        chunks = []
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, ck = struct.unpack(">IQ", self.recv_exact(12))
                if ck != cookie:
                    raise ProtocolError("cookie %x echoed as %x" % (cookie, ck))
                if chunks:
                    raise ProtocolError("simple reply in the middle of structured chunks")
                return [(None, "simple", error)]
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ProtocolError("bad reply magic %x" % magic)
            flags, rtype, ck, length = struct.unpack(">HHQI", self.recv_exact(16))
            if ck != cookie:
                raise ProtocolError("cookie %x echoed as %x" % (cookie, ck))
            chunks.append((flags, rtype, self.recv_exact(length)))
            if flags & REPLY_FLAG_DONE:
                return chunks

    @staticmethod
    def reply_error(chunks):
        """The error number of a reply (0 on success)."""
        if chunks and chunks[0][0] is None:
            return chunks[0][2]
        for _flags, rtype, payload in chunks:
            if rtype & 0x8000:
                (err,) = struct.unpack(">I", payload[:4])
                return err
        return 0
