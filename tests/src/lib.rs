//! consent-sim: an Envoy-faithful proxy-wasm host (ABI 0.2.1) on wasmtime, for
//! end-to-end tests of proxy-wasm filters without Envoy.
//!
//! It reproduces what Envoy does as a host, not what one filter needs: the
//! start-up sequence and its restrictions, Envoy's WASI subset, a canary VM,
//! one VM per worker thread plus a main-thread VM, per-VM context ids, shared
//! data with CAS and shared queues across VMs, one timer per root context,
//! header maps reachable only in their own phase, pause/resume, local replies,
//! CEL properties, metrics, captured logs, fail-closed (or fail-open) VMs after
//! a trap, and gRPC / HTTP callouts bridged to real servers over loopback.
//!
//! ```no_run
//! # async fn demo() -> Result<(), consent_sim::SimError> {
//! use consent_sim::{HttpRequest, Sidecar, SidecarConfig, Wasm};
//! let sidecar = Sidecar::start(SidecarConfig {
//!     plugin_config: r#"{"mode":"enforce"}"#.into(),
//!     clusters: vec![("consentd".into(), "http://127.0.0.1:50051".into())],
//!     ..SidecarConfig::new(Wasm::Path("filter.wasm".into()))
//! })
//! .await?;
//! let resp = sidecar
//!     .send(HttpRequest::get("/patients/p1/records").peer_identity("spiffe://cluster.local/ns/a/sa/b"))
//!     .await?;
//! assert_eq!(resp.status, 200);
//! # Ok(()) }
//! ```
//!
//! Callouts run on the tokio runtime that called [`Sidecar::start`]; prefer a
//! multi-threaded runtime so they progress while a test blocks.

#![forbid(unsafe_code)]

mod abi;
mod callout;
mod clock;
mod error;
mod exchange;
mod hostcalls;
mod hostcalls_http;
pub mod mesh;
mod properties;
mod shared;
mod sidecar;
mod state;
mod vm;
mod wasi;
mod worker;

pub use abi::Status;
pub use callout::{EnvoyGrpc, GrpcService, RawCodec};
pub use clock::SimClock;
pub use error::SimError;
pub use exchange::{
    GuestTime, Headers, HttpRequest, HttpResponse, Upstream, UpstreamRequest, UpstreamResponse,
    echo_upstream,
};
pub use shared::{LogEntry, LogLevel, MetricValue, SharedDataUsage};
pub use sidecar::{Sidecar, SidecarConfig, Wasm};

/// Envoy's WASI preview1 functions, by name: a filter's imports must stay inside this set.
pub const WASI_FUNCTIONS: &[&str] = wasi::FUNCTIONS;
