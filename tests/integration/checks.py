"""Soft checks for the integration tests' Python scripts: a failed check is printed and
collected rather than raised, so that one run reports every wrong answer; done() then
fails the script, naming them.

    from checks import check, done
    check(reply == REP_ACK, "LIST ends with ACK")
    done()
"""

import sys

failures = []


def check(cond, what):
    print(("ok:   " if cond else "FAIL: ") + what, flush=True)
    if not cond:
        failures.append(what)


def done():
    if failures:
        sys.exit("%d check(s) failed: %s" % (len(failures), "; ".join(failures)))
