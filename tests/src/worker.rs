//! A worker thread: owns one VM and runs everything that happens on it, in
//! order: HTTP streams, timer ticks, callout events and queue notifications.
//! This gives Envoy's per-worker semantics (a VM is only ever entered from its
//! own thread) and keeps each worker deterministic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rand::RngCore;
use tokio::sync::oneshot;

use crate::callout::GrpcEvent;
use crate::exchange::{Headers, HttpRequest, HttpResponse, UpstreamRequest};
use crate::shared::LogLevel;
use crate::state::{HttpCallResponse, LocalReply, Phase, RequestMeta, Stream};
use crate::vm::Vm;

/// Work posted to a worker.
pub enum Job {
    Http {
        request: HttpRequest,
        reply: oneshot::Sender<HttpResponse>,
    },
    Grpc {
        token: u32,
        event: GrpcEvent,
    },
    HttpCall {
        token: u32,
        response: Option<HttpCallResponse>,
    },
    QueueReady {
        context_id: u32,
        token: u32,
    },
    /// Runs due timers, then answers: everything posted before it is done.
    Sync(oneshot::Sender<()>),
    /// Breaks the VM as a trap in a callback would (fault injection for tests).
    Trap(oneshot::Sender<()>),
    Stop,
}

/// How often a worker looks at the clock: tests may move it at any time.
const POLL: Duration = Duration::from_millis(5);

pub struct Worker {
    pub index: usize,
    pub vm: Vm,
    pub failed: Arc<AtomicBool>,
}

fn next(phase: Phase) -> Phase {
    match phase {
        Phase::RequestHeaders => Phase::RequestBody,
        Phase::RequestBody => Phase::RequestTrailers,
        Phase::RequestTrailers => Phase::Upstream,
        Phase::Upstream => Phase::ResponseHeaders,
        Phase::ResponseHeaders => Phase::ResponseBody,
        Phase::ResponseBody => Phase::ResponseTrailers,
        Phase::ResponseTrailers | Phase::Log => Phase::Log,
    }
}

fn request_id() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn status_of(headers: &Headers) -> u16 {
    headers
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

impl Worker {
    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            match jobs.recv_timeout(POLL) {
                Ok(Job::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(job) => self.handle(job),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.run_due_timer();
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Http { request, reply } => self.start_stream(request, reply),
            Job::Grpc { token, event } => self.grpc_event(token, event),
            Job::HttpCall { token, response } => self.http_call_done(token, response),
            Job::QueueReady { context_id, token } => {
                self.root_call(
                    context_id,
                    "proxy_on_queue_ready",
                    &[context_id as i32, token as i32],
                );
            }
            Job::Sync(done) => {
                self.run_due_timer();
                let _ = done.send(());
            }
            Job::Trap(done) => {
                let state = self.vm.state();
                state.failed = true;
                state.log(
                    LogLevel::Critical,
                    "wasm trap injected by the test".to_owned(),
                );
                self.failed.store(true, Ordering::SeqCst);
                let _ = done.send(());
            }
            Job::Stop => {}
        }
    }

    /// Runs a root-context callback, then whatever streams it resumed or answered.
    fn root_call(&mut self, context: u32, name: &str, args: &[i32]) {
        if self.vm.failed() {
            return;
        }
        let _ = self.vm.call(context, name, args);
        self.failed.store(self.vm.failed(), Ordering::SeqCst);
        self.drive_pending();
    }

    /// One timer per root context: the next tick is one period after the
    /// handler returns, so a slow handler never causes a burst.
    fn run_due_timer(&mut self) {
        let state = self.vm.state();
        let now = state.env.clock.monotonic_ns();
        let Some(timer) = state.timer else { return };
        if now < timer.next_ns || state.failed {
            return;
        }
        let root = state.root_context_id;
        self.root_call(root, "proxy_on_tick", &[root as i32]);
        let state = self.vm.state();
        let now = state.env.clock.monotonic_ns();
        if let Some(t) = state.timer.as_mut() {
            t.next_ns = now + t.period_ns;
        }
    }

    fn grpc_event(&mut self, token: u32, event: GrpcEvent) {
        // A cancelled call or stream gets no more callbacks.
        let Some(context) = self.vm.state().grpc.get(&token).map(|h| h.context_id) else {
            return;
        };
        let (ctx, tok) = (context as i32, token as i32);
        let is_call = token & 1 == 1;
        match event {
            GrpcEvent::InitialMetadata(h) => {
                let n = h.len() as i32;
                self.vm.state().callback.grpc_initial_metadata = Some(h);
                self.root_call(
                    context,
                    "proxy_on_grpc_receive_initial_metadata",
                    &[ctx, tok, n],
                );
                self.vm.state().callback.grpc_initial_metadata = None;
            }
            GrpcEvent::Message(m) => {
                let n = m.len() as i32;
                self.vm.state().callback.grpc_message = Some(m);
                self.root_call(context, "proxy_on_grpc_receive", &[ctx, tok, n]);
                let state = self.vm.state();
                state.callback.grpc_message = None;
                if is_call {
                    state.grpc.remove(&token);
                }
            }
            GrpcEvent::TrailingMetadata(h) => {
                let n = h.len() as i32;
                self.vm.state().callback.grpc_trailing_metadata = Some(h);
                self.root_call(
                    context,
                    "proxy_on_grpc_receive_trailing_metadata",
                    &[ctx, tok, n],
                );
                self.vm.state().callback.grpc_trailing_metadata = None;
            }
            GrpcEvent::Close(code, message) => {
                self.vm.state().callback.status = (code, message);
                self.root_call(context, "proxy_on_grpc_close", &[ctx, tok, code as i32]);
                let state = self.vm.state();
                state.callback.status = (0, String::new());
                let local_closed = state.grpc.get(&token).is_some_and(|h| h.local_closed);
                if is_call || local_closed {
                    state.grpc.remove(&token);
                } else if let Some(h) = state.grpc.get_mut(&token) {
                    h.remote_closed = true;
                }
            }
        }
    }

    fn http_call_done(&mut self, token: u32, response: Option<HttpCallResponse>) {
        let Some(handle) = self.vm.state().http_calls.remove(&token) else {
            return;
        };
        let ctx = handle.context_id;
        let (h, b, t) = response.as_ref().map_or((0, 0, 0), |r| {
            (r.headers.len(), r.body.len(), r.trailers.len())
        });
        let state = self.vm.state();
        if response.is_none() {
            state.callback.status = (crate::abi::Status::BrokenConnection as u32, "reset".into());
        }
        state.callback.http_call_response = response;
        self.root_call(
            ctx,
            "proxy_on_http_call_response",
            &[ctx as i32, token as i32, h as i32, b as i32, t as i32],
        );
        let state = self.vm.state();
        state.callback.http_call_response = None;
        state.callback.status = (0, String::new());
    }

    fn start_stream(&mut self, req: HttpRequest, reply: oneshot::Sender<HttpResponse>) {
        let mut headers: Headers = vec![
            (":authority".into(), req.authority.clone()),
            (":path".into(), req.path.clone()),
            (":method".into(), req.method.clone()),
            (
                ":scheme".into(),
                if req.peer_identity.is_some() {
                    "https"
                } else {
                    "http"
                }
                .into(),
            ),
        ];
        headers.extend(req.headers.iter().cloned());
        // Envoy generates x-request-id when the client sent none.
        if !headers.iter().any(|(k, _)| k == "x-request-id") {
            headers.push(("x-request-id".into(), request_id()));
        }
        let request_id = headers
            .iter()
            .find(|(k, _)| k == "x-request-id")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let env = self.vm.state().env.clone();
        let id = self.vm.alloc_context_id();
        let stream = Stream {
            phase: Phase::RequestHeaders,
            paused: false,
            resume: false,
            local_reply: None,
            reset: false,
            bypass: false,
            local: false,
            request_headers: headers,
            request_body: req.body,
            request_trailers: req.trailers,
            response_headers: Vec::new(),
            response_body: Vec::new(),
            response_trailers: Vec::new(),
            meta: RequestMeta {
                peer_identity: req.peer_identity,
                source_address: req.source_address,
                start_ns: env.clock.now_ns(),
                request_id,
            },
            filter_state: Default::default(),
            upstream_request: None,
            details: None,
            guest_time: Default::default(),
            reply: Some(reply),
        };
        let state = self.vm.state();
        let root = state.root_context_id;
        state.streams.insert(id, stream);
        if self.vm.failed() {
            self.on_vm_failure(id);
        } else {
            // The HTTP context is created when request headers arrive.
            let _ = self
                .vm
                .call(id, "proxy_on_context_create", &[id as i32, root as i32]);
            self.failed.store(self.vm.failed(), Ordering::SeqCst);
            if self.vm.failed() {
                self.on_vm_failure(id);
            }
        }
        self.drive(id);
    }

    /// Envoy's CHECK_FAIL_HTTP: with a failed VM the stream is either let
    /// through without the filter (fail-open) or answered 503 `wasm_fail_stream`.
    fn on_vm_failure(&mut self, id: u32) {
        let fail_open = self.vm.state().env.fail_open;
        let Some(s) = self.vm.state().streams.get_mut(&id) else {
            return;
        };
        if s.bypass {
            return;
        }
        s.bypass = true;
        s.paused = false;
        if !fail_open {
            s.local_reply = Some(LocalReply {
                status: 503,
                details: "wasm_fail_stream".into(),
                body: Vec::new(),
                headers: Vec::new(),
            });
        }
    }

    /// Drives streams that a root-context callback resumed, answered or reset.
    fn drive_pending(&mut self) {
        let ids: Vec<u32> = self
            .vm
            .state()
            .streams
            .iter()
            .filter(|(_, s)| (s.paused && s.resume) || s.local_reply.is_some() || s.reset)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.drive(id);
        }
    }

    /// Runs the stream's callbacks until it pauses or completes.
    fn drive(&mut self, id: u32) {
        loop {
            let Some(s) = self.vm.state().streams.get_mut(&id) else {
                return;
            };
            if s.reset && s.phase != Phase::Log {
                s.phase = Phase::Log;
                s.details = Some("wasm_close_stream".into());
                s.response_headers.clear();
                continue;
            }
            if let Some(reply) = s.local_reply.take() {
                apply_local_reply(s, reply);
                continue;
            }
            if s.paused {
                if !s.resume {
                    return;
                }
                s.paused = false;
                s.resume = false;
                s.phase = next(s.phase);
                continue;
            }
            s.resume = false;
            let (id_, phase) = (id as i32, s.phase);
            let eos_req = s.request_trailers.is_empty();
            let eos_resp = s.response_trailers.is_empty();
            let call = match phase {
                Phase::RequestHeaders => Some((
                    "proxy_on_request_headers",
                    vec![
                        id_,
                        s.request_headers.len() as i32,
                        i32::from(s.request_body.is_empty() && eos_req),
                    ],
                )),
                Phase::RequestBody if !s.request_body.is_empty() => Some((
                    "proxy_on_request_body",
                    vec![id_, s.request_body.len() as i32, i32::from(eos_req)],
                )),
                Phase::RequestTrailers if !s.request_trailers.is_empty() => Some((
                    "proxy_on_request_trailers",
                    vec![id_, s.request_trailers.len() as i32],
                )),
                Phase::ResponseHeaders => Some((
                    "proxy_on_response_headers",
                    vec![
                        id_,
                        s.response_headers.len() as i32,
                        i32::from(s.response_body.is_empty() && eos_resp),
                    ],
                )),
                Phase::ResponseBody if !s.response_body.is_empty() => Some((
                    "proxy_on_response_body",
                    vec![id_, s.response_body.len() as i32, i32::from(eos_resp)],
                )),
                Phase::ResponseTrailers if !s.response_trailers.is_empty() => Some((
                    "proxy_on_response_trailers",
                    vec![id_, s.response_trailers.len() as i32],
                )),
                Phase::Upstream => {
                    self.forward_upstream(id);
                    continue;
                }
                Phase::Log => return self.complete(id),
                _ => None,
            };
            let Some((name, args)) = call else {
                s.phase = next(phase);
                continue;
            };
            if s.bypass {
                s.phase = next(phase);
                continue;
            }
            let result = self.vm.call(id, name, &args);
            self.failed.store(self.vm.failed(), Ordering::SeqCst);
            if result.is_err() {
                self.on_vm_failure(id);
                continue;
            }
            let Some(s) = self.vm.state().streams.get_mut(&id) else {
                return;
            };
            if result.ok().flatten().unwrap_or(0) == 0 || s.resume {
                s.resume = false;
                if s.local_reply.is_none() {
                    s.phase = next(phase);
                }
            } else {
                s.paused = true;
            }
        }
    }

    fn forward_upstream(&mut self, id: u32) {
        let state = self.vm.state();
        let upstream = state.env.upstream.clone();
        let Some(s) = state.streams.get_mut(&id) else {
            return;
        };
        let request = UpstreamRequest {
            headers: s.request_headers.clone(),
            body: s.request_body.clone(),
            trailers: s.request_trailers.clone(),
        };
        let response = upstream(&request);
        s.upstream_request = Some(request);
        s.response_headers = vec![(":status".into(), response.status.to_string())];
        s.response_headers.extend(response.headers);
        s.response_body = response.body;
        s.response_trailers = response.trailers;
        s.phase = Phase::ResponseHeaders;
    }

    /// The end of a stream: on_log, on_done, on_delete, then the client gets
    /// its response (after them, so tests see what the access log wrote).
    fn complete(&mut self, id: u32) {
        let run = self.vm.state().streams.get(&id).is_some_and(|s| !s.bypass) && !self.vm.failed();
        if run {
            for name in ["proxy_on_log", "proxy_on_done", "proxy_on_delete"] {
                if self.vm.call(id, name, &[id as i32]).is_err() {
                    self.failed.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        let Some(mut s) = self.vm.state().streams.remove(&id) else {
            return;
        };
        let status = if s.reset {
            0
        } else {
            status_of(&s.response_headers)
        };
        let response = HttpResponse {
            status,
            headers: s
                .response_headers
                .iter()
                .filter(|(k, _)| k != ":status")
                .cloned()
                .collect(),
            body: std::mem::take(&mut s.response_body),
            trailers: std::mem::take(&mut s.response_trailers),
            upstream_request: if s.local {
                None
            } else {
                s.upstream_request.take()
            },
            details: s.details.take(),
            reset: s.reset,
            filter_state: std::mem::take(&mut s.filter_state),
            worker: self.index,
            guest_time: s.guest_time,
        };
        if let Some(reply) = s.reply.take() {
            let _ = reply.send(response);
        }
    }
}

/// Applies `proxy_send_local_response` once the callback has returned. From
/// the request path the reply still passes the filter's response callbacks,
/// as Envoy's `sendLocalReply` runs the encoder filter chain.
fn apply_local_reply(s: &mut Stream, reply: LocalReply) {
    let mut headers: Headers = vec![(":status".into(), reply.status.to_string())];
    if !reply.body.is_empty() {
        if !reply.headers.iter().any(|(k, _)| k == "content-type") {
            headers.push(("content-type".into(), "text/plain".into()));
        }
        headers.push(("content-length".into(), reply.body.len().to_string()));
    }
    headers.extend(reply.headers);
    s.response_headers = headers;
    s.response_body = reply.body;
    s.response_trailers = Vec::new();
    s.details = Some(reply.details);
    s.paused = false;
    s.resume = false;
    if s.phase.is_request() {
        s.local = true;
        s.phase = Phase::ResponseHeaders;
    } else {
        s.phase = Phase::Log;
    }
}
