//! consent-filter: the proxy-wasm filter that enforces consent in Envoy.
//! The glue to proxy-wasm lives in `glue` (wasm only); every other module is
//! pure and tested natively.

#![forbid(unsafe_code)]

pub mod audit;
pub mod check;
pub mod config;
pub mod metrics;
pub mod reply;
pub mod request;
pub mod route;
pub mod store;
pub mod sync;
pub mod token_cache;

#[cfg(target_arch = "wasm32")]
mod glue;
