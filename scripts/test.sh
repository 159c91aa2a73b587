#!/usr/bin/env bash
# The README's second command: install what is missing, build, and run the whole test suite
# through ctest: unit and integration tests on the normal build, then the unit tests again
# under AddressSanitizer and UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh test

# A missing client must fail the run, not skip a test.
export IMAGENBD_REQUIRE_ALL=1

scripts/build.sh default
# Tests labelled "kernel" (the kernel's nbd client booted under qemu, minutes each; see
# tests/integration/CMakeLists.txt) are left out; test-kernel-rootfs runs as a sample.
# All of them: ctest --preset default -R test-kernel
ctest --preset default -j "${IMAGENBD_TEST_JOBS:-2}" -LE '^kernel$'

scripts/build.sh asan --target unit_protocol unit_backends unit_formats
ctest --preset asan -j "${IMAGENBD_TEST_JOBS:-2}"
