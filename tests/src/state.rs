//! Host state: what one VM's `Store` carries (its contexts, streams, callouts,
//! timer) and the sidecar-wide environment every VM shares.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::mpsc::Sender;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;
use wasmtime::{Func, Memory};

use crate::clock::SimClock;
use crate::exchange::{GuestTime, Headers, HttpResponse, Upstream, UpstreamRequest};
use crate::shared::{LogLevel, Logs, MetricKind, Metrics, SharedData, SharedQueues};
use crate::worker::Job;

/// Everything shared by the VMs of one sidecar ("the process").
pub struct Env {
    pub vm_id: String,
    pub root_id: String,
    pub plugin_name: String,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    pub env_vars: Vec<(String, String)>,
    pub clusters: HashMap<String, String>,
    pub clock: SimClock,
    pub log_level: LogLevel,
    pub fail_open: bool,
    pub node: Vec<u8>,
    pub upstream: Upstream,
    pub runtime: tokio::runtime::Handle,
    pub shared_data: SharedData,
    pub queues: SharedQueues,
    pub metrics: Metrics,
    pub logs: Logs,
}

/// Which VM a store belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRole {
    Canary,
    Main,
    Worker(usize),
}

impl std::fmt::Display for VmRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmRole::Canary => f.write_str("canary"),
            VmRole::Main => f.write_str("main"),
            VmRole::Worker(i) => write!(f, "worker {i}"),
        }
    }
}

/// Where an HTTP stream is in Envoy's filter chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    Upstream,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
}

impl Phase {
    pub fn is_request(self) -> bool {
        self < Phase::Upstream
    }

    pub fn is_response(self) -> bool {
        self > Phase::Upstream && self < Phase::Log
    }
}

/// A local reply requested with `proxy_send_local_response`.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Headers,
}

/// Connection facts behind the `connection.*`, `source.*` and `request.*` properties.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub peer_identity: Option<String>,
    pub source_address: String,
    pub start_ns: u64,
    pub request_id: String,
}

/// One HTTP stream (an HTTP context in the VM).
pub struct Stream {
    pub phase: Phase,
    /// The filter returned a stop status in the current phase.
    pub paused: bool,
    /// The filter asked to continue (deferred until its callback returns).
    pub resume: bool,
    pub local_reply: Option<LocalReply>,
    pub reset: bool,
    /// The filter is out of the chain (fail-open after a VM failure).
    pub bypass: bool,
    /// The response is a local reply, so no upstream request was made.
    pub local: bool,
    pub request_headers: Headers,
    pub request_body: Vec<u8>,
    pub request_trailers: Headers,
    /// Response headers, `:status` first.
    pub response_headers: Headers,
    pub response_body: Vec<u8>,
    pub response_trailers: Headers,
    pub meta: RequestMeta,
    pub filter_state: BTreeMap<String, Vec<u8>>,
    pub upstream_request: Option<UpstreamRequest>,
    pub details: Option<String>,
    pub guest_time: GuestTime,
    pub reply: Option<tokio::sync::oneshot::Sender<HttpResponse>>,
}

/// Data visible to the guest only during one root-context callback.
#[derive(Debug, Default)]
pub struct CallbackData {
    pub grpc_initial_metadata: Option<Headers>,
    pub grpc_trailing_metadata: Option<Headers>,
    pub grpc_message: Option<Vec<u8>>,
    pub http_call_response: Option<HttpCallResponse>,
    /// `proxy_get_status` (code, message).
    pub status: (u32, String),
    /// Plugin configuration is readable only inside `on_configure`.
    pub configuring: bool,
}

/// The response to a `proxy_http_call`.
#[derive(Debug, Clone, Default)]
pub struct HttpCallResponse {
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// A gRPC call or stream opened by a root context.
pub struct GrpcHandle {
    pub context_id: u32,
    pub sender: Option<UnboundedSender<Bytes>>,
    pub task: Option<AbortHandle>,
    pub local_closed: bool,
    pub remote_closed: bool,
}

pub struct HttpCallHandle {
    pub context_id: u32,
    pub task: Option<AbortHandle>,
}

/// The periodic timer of the root context.
#[derive(Debug, Clone, Copy)]
pub struct Timer {
    pub period_ns: u64,
    /// Monotonic deadline of the next tick.
    pub next_ns: u64,
}

/// What a VM's `Store` carries.
pub struct HostState {
    pub env: Arc<Env>,
    pub role: VmRole,
    pub memory: Option<Memory>,
    pub allocator: Option<Func>,
    /// The module is running `_initialize`/`main`/`_start`.
    pub starting: bool,
    /// A trap happened in some callback; the VM is never called again.
    pub failed: bool,
    pub root_context_id: u32,
    pub next_context_id: u32,
    /// The context of the callback being run, and the one host calls act on.
    pub current_context: u32,
    pub effective_context: u32,
    pub streams: HashMap<u32, Stream>,
    pub callback: CallbackData,
    pub timer: Option<Timer>,
    pub metric_ids: HashMap<u32, (MetricKind, String)>,
    pub next_metric: [u32; 3],
    pub grpc: HashMap<u32, GrpcHandle>,
    pub next_grpc_call: u32,
    pub next_grpc_stream: u32,
    pub http_calls: HashMap<u32, HttpCallHandle>,
    pub next_http_call: u32,
    /// Posts callout events back to the worker that owns this VM.
    pub jobs: Sender<Job>,
    /// `proxy_*` host calls made so far (per-stream counts are differences).
    pub host_calls: u64,
}

impl HostState {
    pub fn new(env: Arc<Env>, role: VmRole, jobs: Sender<Job>) -> Self {
        Self {
            env,
            role,
            memory: None,
            allocator: None,
            starting: false,
            failed: false,
            root_context_id: 0,
            next_context_id: 1,
            current_context: 0,
            effective_context: 0,
            streams: HashMap::new(),
            callback: CallbackData::default(),
            timer: None,
            metric_ids: HashMap::new(),
            next_metric: [0, 1, 2],
            grpc: HashMap::new(),
            next_grpc_call: 1,
            next_grpc_stream: 2,
            http_calls: HashMap::new(),
            next_http_call: 1,
            jobs,
            host_calls: 0,
        }
    }

    /// The stream the current host call acts on, if the effective context is one.
    pub fn stream(&mut self) -> Option<&mut Stream> {
        self.streams.get_mut(&self.effective_context)
    }

    pub fn is_root(&self, context_id: u32) -> bool {
        context_id != 0 && context_id == self.root_context_id
    }
}

impl Drop for HostState {
    /// Callouts die with their VM, as the canary's do in Envoy.
    fn drop(&mut self) {
        for h in self.grpc.values() {
            if let Some(t) = &h.task {
                t.abort();
            }
        }
        for h in self.http_calls.values() {
            if let Some(t) = &h.task {
                t.abort();
            }
        }
    }
}

impl HostState {
    /// Records a guest log line if it is at or above the configured level.
    pub fn log(&self, level: crate::shared::LogLevel, message: String) {
        if level >= self.env.log_level {
            self.env.logs.push(crate::shared::LogEntry {
                level,
                message,
                vm: self.role.to_string(),
            });
        }
    }
}
