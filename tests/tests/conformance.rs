//! Conformance tests for consent-sim: each pins one behaviour of Envoy as a
//! proxy-wasm host, using a small guest module written for the purpose.

mod support;

#[path = "conformance/loading.rs"]
mod loading;

#[path = "conformance/lifecycle.rs"]
mod lifecycle;

#[path = "conformance/state.rs"]
mod state;

#[path = "conformance/callouts.rs"]
mod callouts;
