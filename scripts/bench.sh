#!/usr/bin/env bash
# Every benchmark in one run: decision cost against Cedar and Rego, per-request
# cost in the filter and through ext_authz, token verification, propagation to
# 1, 100 and 1000 sidecars, and a 100k-grant bootstrap. Writes
# benches/RESULTS.md, benches/decision.svg and benches/propagation.svg.
# Arguments go to consent-bench (--quick: small sizes, a smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

build_filter
echo "==> building consentd and consent-bench (release)"
cargo build --release -p consent-control-plane --bin consentd -p consent-benches --bin consent-bench
exec target/release/consent-bench --command "$(echo ./scripts/bench.sh "$@")" "$@"
