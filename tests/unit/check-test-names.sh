#!/usr/bin/env bash
# doctest_discover_tests registers one ctest entry per test case; a ';' in a name splits
# it (CMake lists), so doctest gets a filter that matches nothing and the entry passes
# without running anything. Fail instead. Usage: check-test-names.sh UNIT_EXECUTABLE...
status=0
for exe in "$@"; do
    bad=$("$exe" --list-test-cases --no-version 2>/dev/null | grep ';') || true
    if [ -n "$bad" ]; then
        echo "$(basename "$exe"): test names with ';' never run under ctest (rename them):" >&2
        echo "$bad" >&2
        status=1
    fi
done
exit $status
