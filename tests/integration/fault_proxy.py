#!/usr/bin/env python3
"""An HTTP/1.1 proxy that injects faults between imagenbd and Azurite (the Azure fault tests).

    fault_proxy.py --target 127.0.0.1:AZURITE_PORT --port-file F [--control FILE] [--log FILE]
                   [--fail-every N] [--reset-every M] [--delay-ms D]

It listens on a free loopback port (written to --port-file once listening) and forwards
each request to the target, one upstream connection per client connection, keep-alive on
both sides (requests and responses framed by Content-Length; chunked responses relayed).
Faults, counted over all requests in arrival order (1-based):

  fail_every=N    every Nth request is answered 503 ServerBusy (Azure's throttling answer,
                  with x-ms-error-code and an XML error body) after its body was read and
                  discarded; the request never reaches Azurite. N=1 fails every request.
  reset_every=M   every Mth request ends in a connection reset (SO_LINGER 0, so the client
                  sees ECONNRESET): alternately before the request is forwarded and after
                  Azurite answered it (the answer is lost: a retried write happens twice).
  delay_ms=D      every request waits D ms before it is forwarded.

The control file (key=value lines, re-read whenever it changes) overrides the command line,
so a test can change the faults while the proxy runs. Counts go to the log, one line per
fault, and to the --stats file as JSON after every request.
"""

import argparse
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time

MAX_HEADER = 64 * 1024


class Faults:
    """The fault settings: command-line defaults, overridden by the control file."""

    def __init__(self, args):
        self.defaults = {
            "fail_every": args.fail_every,
            "reset_every": args.reset_every,
            "delay_ms": args.delay_ms,
        }
        self.control = args.control
        self.mtime = None
        self.current = dict(self.defaults)
        self.lock = threading.Lock()

    def get(self):
        with self.lock:
            if self.control:
                try:
                    mtime = os.stat(self.control).st_mtime_ns
                except FileNotFoundError:
                    mtime = -1
                if mtime != self.mtime:
                    self.mtime = mtime
                    self.current = dict(self.defaults)
                    if mtime != -1:
                        with open(self.control) as f:
                            for line in f:
                                line = line.split("#", 1)[0].strip()
                                if not line:
                                    continue
                                key, _, value = line.partition("=")
                                key = key.strip()
                                if key not in self.defaults:
                                    raise ValueError(f"{self.control}: unknown key {key!r}")
                                self.current[key] = int(value)
                    log(f"faults now {self.current}")
            return dict(self.current)


class Stats:
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "forwarded": 0, "failed_503": 0, "resets": 0,
                       "connections": 0, "upstream_errors": 0}

    def next_request(self):
        with self.lock:
            self.counts["requests"] += 1
            return self.counts["requests"]

    def add(self, key):
        with self.lock:
            self.counts[key] += 1
            self.save()

    def save(self):
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.counts, f)
        os.replace(tmp, self.path)


LOG = sys.stderr
LOG_LOCK = threading.Lock()


def log(msg):
    with LOG_LOCK:
        LOG.write(f"{time.strftime('%H:%M:%S')} fault_proxy: {msg}\n")
        LOG.flush()


class Closed(Exception):
    pass


class Reader:
    """Buffered reads from a socket: lines, exact counts, headers."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(256 * 1024)
        if not data:
            raise Closed()
        self.buf += data

    def head(self):
        """The request or status line and headers, up to and including the blank line."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEADER:
                raise ValueError("header too large")
            self._fill()
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n") + 2
        data, self.buf = self.buf[:end], self.buf[end:]
        return data

    def rest(self):
        """Everything until the peer closes (a response framed by the connection's end)."""
        chunks = [self.buf]
        self.buf = b""
        while True:
            data = self.sock.recv(256 * 1024)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    first = lines[0]
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, headers


def read_body(reader, headers, allow_eof_framing):
    """The message body after its head, raw (chunked bodies keep their framing)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size_line = reader.line()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = reader.line()
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        return b"".join(parts), True
            parts.append(reader.exact(size + 2))
    if "content-length" in headers:
        return reader.exact(int(headers["content-length"])), True
    if allow_eof_framing:
        return reader.rest(), False
    return b"", True


def reset(sock):
    """Close with RST instead of FIN: the peer's next read fails with ECONNRESET."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def busy_response(request_id):
    body = ("<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>ServerBusy</Code>"
            "<Message>Operations per second is over the account limit (injected by "
            f"fault_proxy.py, request {request_id}).</Message></Error>").encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/xml\r\n"
            "x-ms-error-code: ServerBusy\r\n"
            f"x-ms-request-id: fault-proxy-{request_id}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n").encode()
    return head + body


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        server = self.server
        server.stats.add("connections")
        client = self.request
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = Reader(client)
        upstream = None
        up_reader = None
        try:
            while True:
                try:
                    head = reader.head()
                except Closed:
                    return
                first, headers = parse_head(head)
                method = first.split(" ", 1)[0].upper()
                body, _ = read_body(reader, headers, allow_eof_framing=False)
                n = server.stats.next_request()
                faults = server.faults.get()

                reset_every = faults["reset_every"]
                if reset_every > 0 and n % reset_every == 0:
                    after = (n // reset_every) % 2 == 0
                    if after:
                        # Forward, wait for the answer, then drop it with a reset.
                        try:
                            upstream, up_reader = self.forward(upstream, up_reader, head, body,
                                                               method, None)
                        except (OSError, Closed):
                            pass
                    server.stats.add("resets")
                    log(f"request {n}: {first}: connection reset "
                        f"({'after Azurite answered' if after else 'before forwarding'})")
                    reset(client)
                    return

                fail_every = faults["fail_every"]
                if fail_every > 0 and n % fail_every == 0:
                    server.stats.add("failed_503")
                    log(f"request {n}: {first}: 503 ServerBusy")
                    client.sendall(busy_response(n))
                    continue

                if faults["delay_ms"] > 0:
                    time.sleep(faults["delay_ms"] / 1000)
                try:
                    upstream, up_reader = self.forward(upstream, up_reader, head, body, method,
                                                       client)
                except (OSError, Closed) as e:
                    # Azurite is down or dropped us: so does the proxy (the client sees the
                    # connection close without an answer, as with Azurite itself).
                    server.stats.add("upstream_errors")
                    log(f"request {n}: {first}: upstream error {e!r}: closing")
                    return
                server.stats.add("forwarded")
        except (ConnectionError, Closed):
            return
        finally:
            if upstream is not None:
                upstream.close()
            try:
                client.close()
            except OSError:
                pass

    def forward(self, upstream, up_reader, head, body, method, client):
        """Sends one request upstream (connecting when needed) and relays its response to
        client (None: read and drop it). Returns the upstream connection to keep, or None."""
        if upstream is None:
            upstream = socket.create_connection(self.server.target, timeout=120)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up_reader = Reader(upstream)
        try:
            upstream.sendall(head + body)
            resp_head = up_reader.head()
            status_line, resp_headers = parse_head(resp_head)
            status = int(status_line.split(" ")[1])
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                resp_body, keep = b"", True
            else:
                resp_body, keep = read_body(up_reader, resp_headers, allow_eof_framing=True)
            if resp_headers.get("connection", "").lower() == "close":
                keep = False
        except BaseException:
            upstream.close()
            raise
        if client is not None:
            client.sendall(resp_head + resp_body)
        if not keep:
            upstream.close()
            return None, None
        return upstream, up_reader


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    global LOG
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT of Azurite")
    p.add_argument("--port", type=int, default=0, help="listening port (default: a free one)")
    p.add_argument("--port-file", help="write the listening port here once listening")
    p.add_argument("--control", help="key=value file with the faults, re-read when it changes")
    p.add_argument("--stats", help="JSON counts, rewritten after every request")
    p.add_argument("--log", help="log file (default: stderr)")
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--reset-every", type=int, default=0)
    p.add_argument("--delay-ms", type=int, default=0)
    args = p.parse_args()
    if args.log:
        LOG = open(args.log, "a", buffering=1)
    host, _, port = args.target.rpartition(":")

    server = Server(("127.0.0.1", args.port), Handler)
    server.target = (host, int(port))
    server.faults = Faults(args)
    server.stats = Stats(args.stats)
    server.stats.save()
    server.faults.get()
    listen_port = server.server_address[1]
    log(f"listening on 127.0.0.1:{listen_port}, forwarding to {args.target}")
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{listen_port}\n")
        os.replace(tmp, args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
