#!/usr/bin/env bash
# Option haggling through libnbd (nbdsh) in opt mode: LIST (names + descriptions), INFO
# for every export with NAME/DESCRIPTION/BLOCK_SIZE (and INFO/GO agreement),
# LIST_META_CONTEXT (all, "base:" query, unknown namespace), SET_META_CONTEXT via
# add_meta_context + GO, GO/INFO with an unknown export name refused without killing
# the session, ABORT, STARTTLS refused (TLS required => connect fails cleanly; TLS
# allowed => plain session), and a session without structured replies (no DF, no
# contexts).
source "$(dirname "$0")/functions.sh"
set -x

requires_nbdsh

desc="options test"
start_imagenbd -D "$desc" alpha=memory:4M beta=memory:8M

export SOCK=$sock DESC=$desc
nbdsh_py -n -c - <<'EOF'
import errno, os
import nbd

sock, desc = os.environ["SOCK"], os.environ["DESC"]
EXPORTS = {"alpha": 4 << 20, "beta": 8 << 20}
checks = 0

def check(cond, what):
    global checks
    checks += 1
    print(("ok:   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        raise AssertionError(what)

def expect_error(what, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        print("ok:   %s -> %s" % (what, e.string), flush=True)
        return e
    raise AssertionError("%s: expected nbd.Error, but it succeeded" % what)

def negotiating(full_info=True):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(full_info)
    h.connect_unix(sock)
    check(h.aio_is_negotiating(), "connected in opt mode, still negotiating")
    return h

def flags(h):
    return (h.get_size(), h.is_read_only(), h.can_flush(), h.can_fua(), h.can_trim(),
            h.can_zero(), h.can_fast_zero(), h.can_df(), h.can_multi_conn(),
            h.can_cache(), h.is_rotational())

# --- LIST ----------------------------------------------------------------------
h = negotiating()
check(h.get_protocol() == "newstyle-fixed", "fixed newstyle")
check(h.get_structured_replies_negotiated(), "structured replies negotiated")
seen = []
n = h.opt_list(lambda name, description: seen.append((name, description)) or 0)
check(n == 2, "opt_list counts 2 exports (got %d)" % n)
check(sorted(seen) == [("alpha", desc), ("beta", desc)], "opt_list names and descriptions: %r" % seen)

# --- INFO for each export, with every info type (full info = NAME + DESCRIPTION) --------
info_flags = {}
for name, size in EXPORTS.items():
    h.set_export_name(name)
    h.opt_info()
    check(h.aio_is_negotiating(), "still negotiating after opt_info(%s)" % name)
    check(h.get_size() == size, "INFO %s: size %d" % (name, h.get_size()))
    check(h.get_canonical_export_name() == name, "INFO %s: NBD_INFO_NAME" % name)
    check(h.get_export_description() == desc, "INFO %s: NBD_INFO_DESCRIPTION" % name)
    bs = (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
          h.get_block_size(nbd.SIZE_MAXIMUM))
    check(bs == (1, 4096, 32 << 20), "INFO %s: NBD_INFO_BLOCK_SIZE %r" % (name, bs))
    check(not h.is_read_only(), "INFO %s: writable" % name)
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df",
                "can_multi_conn", "can_cache"):
        check(getattr(h, cap)(), "INFO %s: %s" % (name, cap))
    info_flags[name] = flags(h)

h.set_export_name("")
h.opt_info()
check(h.get_size() == EXPORTS["alpha"], "INFO '': the default export is the first (alpha)")

# --- INFO / GO with an unknown name: refused, session continues --------------------------
h.set_export_name("no-such-export")
expect_error("opt_info(no-such-export)", h.opt_info)
check(h.aio_is_negotiating(), "still negotiating after a refused INFO")
expect_error("opt_go(no-such-export)", h.opt_go)
check(h.aio_is_negotiating(), "still negotiating after a refused GO")

# --- LIST_META_CONTEXT --------------------------------------------------------------
h.set_export_name("alpha")
ctx = []
n = h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
check("base:allocation" in ctx and n == len(ctx), "list all contexts: %r" % ctx)
h.add_meta_context("base:")
ctx = []
h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
check(ctx == ["base:allocation"], "query 'base:' lists base:allocation: %r" % ctx)
h.clear_meta_contexts()
h.add_meta_context("x-nosuch:thing")
ctx = []
n = h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
check(n == 0 and ctx == [], "unknown namespace lists nothing: %r" % ctx)

# --- SET_META_CONTEXT (add_meta_context) + GO ----------------------------------------
h.clear_meta_contexts()
h.add_meta_context("x-nosuch:thing")
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_export_name("beta")
h.opt_go()
check(h.aio_is_ready(), "GO beta: ready for transmission")
check(h.get_size() == EXPORTS["beta"], "GO beta: size")
check(flags(h) == info_flags["beta"], "GO agrees with INFO: %r == %r" % (flags(h), info_flags["beta"]))
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation selected")
check(not h.can_meta_context("x-nosuch:thing"), "unknown context not selected")
h.pwrite(b"\x42" * 65536, 1 << 20)
ext = []
h.block_status(2 << 20, 0, lambda ctx, off, entries, err: ext.append((ctx, off, list(entries))) or 0)
check(len(ext) == 1 and ext[0][0] == "base:allocation", "block status via the selected context")
check(h.pread(65536, 1 << 20) == b"\x42" * 65536, "read back on beta")
h.shutdown()

# --- GO to an unknown export, then a good one, on the same connection -----------------
h = negotiating()
h.set_export_name("nope")
expect_error("opt_go(nope)", h.opt_go)
check(h.aio_is_negotiating(), "still negotiating")
h.set_export_name("alpha")
h.opt_go()
check(h.get_size() == EXPORTS["alpha"], "second GO to alpha works")
check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no context requested, none selected")
h.shutdown()

# Without opt mode, an unknown export fails the connect.
h = nbd.NBD()
expect_error("connect_uri(unknown export)", h.connect_uri,
             "nbd+unix:///nope?socket=" + sock)

# --- ABORT -----------------------------------------------------------------------------
h = negotiating()
h.opt_abort()
check(h.aio_is_closed(), "opt_abort closes the handle")

# --- STARTTLS refused ------------------------------------------------------------------
if nbd.NBD().supports_tls():
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    e = expect_error("connect with TLS required", h.connect_unix, sock)
    check("tls" in e.string.lower(), "the error is about TLS: %s" % e.string)
    check(h.aio_is_dead() or h.aio_is_closed(), "handle is closed/dead after the refusal")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_ALLOW)
    h.connect_unix(sock)
    check(not h.get_tls_negotiated(), "TLS allowed: server refused, session continues in plain text")
    check(h.pread(512, 0) == bytes(512), "plain session after the refused STARTTLS works")
    h.shutdown()
else:
    raise AssertionError("this libnbd has no TLS support; cannot check STARTTLS refusal")

# --- no structured replies: no DF, no contexts; reads still work -------------------------
h = nbd.NBD()
h.set_request_structured_replies(False)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_unix(sock)
check(not h.get_structured_replies_negotiated(), "structured replies not negotiated")
check(not h.can_df(), "no DF without structured replies")
check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no context without structured replies")
h.pwrite(b"\x17" * 4096, 8192)
check(h.pread(4096, 8192) == b"\x17" * 4096, "simple-reply read/write")
h.shutdown()

# --- kernel-like GO: no block size, no name, no description requested -----------------
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_request_block_size(False)
h.set_full_info(False)
h.connect_unix(sock)
check(h.get_size() == EXPORTS["alpha"], "minimal GO (zero info requests) works")
check(h.pread(4096, 8192) == b"\x17" * 4096, "minimal GO: data visible")
h.shutdown()

print("%d checks passed" % checks)
EOF

stop_imagenbd
