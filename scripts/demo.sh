#!/usr/bin/env bash
# The whole loop as a demo: consentd on SQLite, N sidecars (default 20, two
# workers each) running the real filter in consent-sim, traffic, a revocation
# with wait, per-sidecar acknowledgement latency, denials and the audit trail.
# Arguments go to consent-demo: --sidecars N --workers N.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

build_filter
echo "==> building consentd and consent-demo (release)"
cargo build --release -p consent-control-plane --bin consentd -p consent-sim --bin consent-demo
exec target/release/consent-demo "$@"
