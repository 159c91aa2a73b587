"""The admin endpoint from the integration tests: HTTP over a Unix socket or loopback TCP,
and a strict reader of the Prometheus text format it serves.

    import adminhttp
    status, headers, body = adminhttp.request("unix:/path/admin.sock", "GET", "/metrics")
    m = adminhttp.scrape("unix:/path/admin.sock")        # checks the format, too
    m.value("imagenbd_export_requests_total", export="disk", command="write")

Also a command line:  python3 adminhttp.py ADDR METHOD TARGET  prints the status line,
the headers and the body (exit 0 whatever the status).
"""

import http.client
import math
import re
import socket
import sys


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def connection(address, timeout=10):
    """An http.client connection to unix:PATH, HOST:PORT or [V6]:PORT."""
    if address.startswith("unix:"):
        return _UnixConnection(address[5:], timeout)
    host, _, port = address.rpartition(":")
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


def request(address, method, target, body=None, timeout=10):
    """One request on a fresh connection; returns (status, {header: value}, body text)."""
    c = connection(address, timeout)
    try:
        c.request(method, target, body=body)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        c.close()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value):
    return re.sub(r'\\(.)', lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


class Metrics:
    """A parsed exposition: samples by (name, sorted labels), and the families' types."""

    def __init__(self, text):
        self.text = text
        self.samples = {}
        self.types = {}
        helps = set()
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name = line.split(" ")[2]
                assert name not in helps, "two HELP lines for " + name
                helps.add(name)
                continue
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                assert name not in self.types, "two TYPE lines for " + name
                assert name in helps, "TYPE before HELP for " + name
                self.types[name] = kind
                continue
            assert line and not line.startswith("#"), "unexpected line: %r" % line
            m = _SAMPLE.match(line)
            assert m, "not a sample line: %r" % line
            name, labels_text, value = m.group(1), m.group(3) or "", m.group(4)
            labels = {}
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                assert lm, "bad labels in %r" % line
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
            family = name
            for suffix in ("_bucket", "_sum", "_count"):
                if family not in self.types and family.endswith(suffix):
                    family = family[: -len(suffix)]
            assert family in self.types, "sample before its TYPE: %r" % line
            key = (name, tuple(sorted(labels.items())))
            assert key not in self.samples, "sample twice: %r" % line
            self.samples[key] = math.inf if value == "+Inf" else float(value)

    def value(self, name, **labels):
        """The sample's value; KeyError if there is none."""
        key = (name, tuple(sorted(labels.items())))
        if key not in self.samples:
            raise KeyError("no sample %s%s" % (name, labels))
        return self.samples[key]

    def histogram(self, name, **labels):
        """[(le, cumulative count)] in order, plus _sum and _count."""
        buckets = []
        for (n, ls), v in self.samples.items():
            d = dict(ls)
            le = d.pop("le", None)
            if n == name + "_bucket" and d == labels:
                buckets.append((math.inf if le == "+Inf" else float(le), v))
        buckets.sort()
        return buckets, self.value(name + "_sum", **labels), self.value(name + "_count", **labels)


def scrape(address):
    status, headers, body = request(address, "GET", "/metrics")
    assert status == 200, "GET /metrics: %d %s" % (status, body)
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", headers
    return Metrics(body)


if __name__ == "__main__":
    status, headers, body = request(sys.argv[1], sys.argv[2], sys.argv[3])
    print(status)
    for k, v in headers.items():
        print("%s: %s" % (k, v))
    print()
    sys.stdout.write(body)
