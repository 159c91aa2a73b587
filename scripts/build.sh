#!/usr/bin/env bash
# Configures and builds imagenbd with a CMake preset (default: "default" -> build/).
# Usage: scripts/build.sh [default|release|asan] [extra cmake --build args...]
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-default}"
shift || true
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "${IMAGENBD_JOBS:-$(nproc)}" "$@"
