# Shared by the scripts: install what the build needs on a fresh machine.
# Sourced, not run.

# The filter builds for wasm32-wasip1; rustup installs the target once.
ensure_wasm_target() {
    if ! rustup target list --installed | grep -qx wasm32-wasip1; then
        echo "==> installing the wasm32-wasip1 target"
        rustup target add wasm32-wasip1
    fi
}

# The release filter that Envoy (and consent-sim) load.
FILTER_WASM=target/wasm32-wasip1/wasm-release/consent_filter.wasm

build_filter() {
    ensure_wasm_target
    echo "==> building $FILTER_WASM"
    cargo build -p consent-filter --target wasm32-wasip1 --profile wasm-release
}
