#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: installs the wasm target,
# builds the release filter the end-to-end tests load, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

build_filter
echo "==> cargo test --workspace"
cargo test --workspace "$@"
