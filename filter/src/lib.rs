//! consent-filter: the proxy-wasm filter that enforces consent in Envoy.
