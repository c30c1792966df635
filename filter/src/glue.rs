//! The proxy-wasm glue: adapts Envoy's callbacks to the pure modules. Every
//! host call goes through `proxy_wasm::hostcalls` and its `Result` is
//! handled (the SDK's trait helpers unwrap, and a trap breaks the worker).

use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use consent_core::{Enforcement, Verdict};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::audit::{EventIds, Facts, Outbox, event};
use crate::check::{check, refresh_keys, undeclared};
use crate::config::Config;
use crate::metrics::{self, Kind, MetricHost, Metrics};
use crate::request::{Extracted, RequestSource, request_id};
use crate::route::{Lookup, split_path};
use crate::store::{Keys, SharedData, SharedView, StoreError};
use crate::sync::{METHOD, SERVICE, Settings, Stream, Syncer};
use crate::token_cache::{Source, TokenCache};
use crate::{reply, request};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

fn now_ms() -> i64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A random number from the WASI `random_get` that seeds std's hasher keys.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ms());
    h.finish()
}

/// Shared data, queues and metrics of the host.
struct Host;

impl SharedData for Host {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) if !value.is_empty() => Some((value, cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let cas = (cas != 0).then_some(cas);
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|status| match status {
            proxy_wasm::types::Status::CasMismatch => StoreError::CasMismatch(key.to_owned()),
            status => StoreError::Host {
                key: key.to_owned(),
                status: format!("{status:?}"),
            },
        })
    }
}

impl MetricHost for Host {
    fn define(&self, kind: Kind, name: &str) -> Option<u32> {
        let kind = match kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        };
        hostcalls::define_metric(kind, name).ok()
    }
    fn increment(&self, id: u32, by: i64) {
        let _ = hostcalls::increment_metric(id, by);
    }
    fn record(&self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }
}

struct Grpc<'a> {
    upstream: &'a str,
}

impl Stream for Grpc<'_> {
    fn open(&mut self, metadata: &[(&str, &[u8])]) -> Result<u32, String> {
        hostcalls::open_grpc_stream(self.upstream, SERVICE, METHOD, metadata.to_vec())
            .map_err(|s| format!("{s:?}"))
    }
    fn send(&mut self, token: u32, message: &[u8]) -> Result<(), String> {
        hostcalls::send_grpc_stream_message(token, Some(message), false)
            .map_err(|s| format!("{s:?}"))
    }
    fn cancel(&mut self, token: u32) {
        let _ = hostcalls::cancel_grpc_stream(token);
    }
}

/// Per-VM state shared by the root context and its HTTP contexts (a VM is
/// single-threaded, so `Rc<RefCell>` is enough).
struct Vm {
    config: Rc<Config>,
    keys: Keys,
    cache: TokenCache,
    metrics: Metrics,
    ids: EventIds,
    queue: Option<u32>,
}

impl Vm {
    /// Registered on first use, never in `on_configure`: the canary VM that
    /// runs it is discarded.
    fn queue(&mut self) -> Option<u32> {
        if self.queue.is_none() {
            self.queue = hostcalls::register_shared_queue(&self.keys.queue()).ok();
        }
        self.queue
    }
}

#[derive(Default)]
struct Root {
    vm: Option<Rc<RefCell<Vm>>>,
    syncer: Option<Syncer>,
    worker: u64,
}

impl Context for Root {
    fn on_grpc_stream_initial_metadata(&mut self, _token: u32, _n: u32) {}

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let (Some(vm), Some(syncer)) = (&self.vm, &mut self.syncer) else {
            return;
        };
        let Ok(Some(bytes)) = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size) else {
            return;
        };
        let upstream = vm.borrow().config.control_plane.upstream.clone();
        syncer.on_message(
            &Host,
            &mut Grpc {
                upstream: &upstream,
            },
            token,
            &bytes,
            now_ms(),
            random(),
        );
        flush_stats(vm, syncer);
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        let (Some(vm), Some(syncer)) = (&self.vm, &mut self.syncer) else {
            return;
        };
        if syncer.stream_token() == Some(token) {
            log(
                LogLevel::Warn,
                &format!("consent: control-plane stream closed with grpc status {status}"),
            );
        }
        syncer.on_close(token, now_ms(), random());
        flush_stats(vm, syncer);
    }
}

fn flush_stats(vm: &Rc<RefCell<Vm>>, syncer: &mut Syncer) {
    let stats = std::mem::take(&mut syncer.stats);
    let mut vm = vm.borrow_mut();
    let m = &mut vm.metrics;
    m.count(&Host, metrics::STREAM_RECONNECTS, stats.reconnects);
    m.count(&Host, metrics::STREAM_NACKS, stats.nacks);
    m.count(&Host, metrics::AUDIT_SENT, stats.audit_sent);
    m.count(&Host, metrics::AUDIT_DROPPED, stats.audit_dropped);
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(Some(bytes)) => bytes,
            _ => {
                log(
                    LogLevel::Error,
                    "invalid plugin configuration: config: missing",
                );
                return false;
            }
        };
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "consent_filter".to_owned());
        let config = match Config::parse(&bytes, &root_id, |var| std::env::var(var).ok()) {
            Ok(config) => Rc::new(config),
            Err(e) => {
                log(LogLevel::Error, &e.to_string());
                return false;
            }
        };
        self.worker = random();
        let keys = Keys::new(&config.key_prefix);
        let vm = Vm {
            cache: TokenCache::new(config.token_cache_size),
            metrics: Metrics::default(),
            ids: EventIds::new(&config.control_plane.node_id, self.worker),
            queue: None,
            keys: keys.clone(),
            config: config.clone(),
        };
        let cp = &config.control_plane;
        let settings = Settings {
            node_id: cp.node_id.clone(),
            datasets: config.datasets.clone(),
            credential: cp.credential.clone(),
            lease_ms: i64::from(cp.lease_secs) * 1000,
            heartbeat_ms: i64::from(cp.heartbeat_secs) * 1000,
            backoff_initial_ms: i64::from(cp.backoff_initial_ms),
            backoff_max_ms: i64::from(cp.backoff_max_ms),
        };
        let outbox = Outbox::new(config.audit_max_buffered, config.audit_max_batch);
        // A reconfiguration drops the old stream: the new syncer opens its own.
        if let Some(token) = self.syncer.as_ref().and_then(Syncer::stream_token) {
            let _ = hostcalls::cancel_grpc_stream(token);
        }
        self.syncer = Some(Syncer::new(self.worker, keys, settings, outbox));
        self.vm = Some(Rc::new(RefCell::new(vm)));
        // Only the timer here: the stream opens from the first tick.
        if hostcalls::set_tick_period(Duration::from_millis(u64::from(cp.tick_ms))).is_err() {
            log(LogLevel::Error, "consent: cannot set the tick period");
            return false;
        }
        true
    }

    fn on_tick(&mut self) {
        let (Some(vm), Some(syncer)) = (&self.vm, &mut self.syncer) else {
            return;
        };
        let (upstream, queue, keys) = {
            let mut v = vm.borrow_mut();
            let queue = v.queue();
            (
                v.config.control_plane.upstream.clone(),
                queue,
                v.keys.clone(),
            )
        };
        let mut dequeue = || queue.and_then(|q| hostcalls::dequeue_shared_queue(q).ok().flatten());
        let now = now_ms();
        let was_leader = syncer.is_leader();
        syncer.tick(
            &Host,
            &mut Grpc {
                upstream: &upstream,
            },
            &mut dequeue,
            now,
            random(),
        );
        // Operators find the worker that holds the control-plane stream by this line.
        match (was_leader, syncer.is_leader()) {
            (false, true) => log(LogLevel::Info, "consent: this worker took the sync lease"),
            (true, false) => log(LogLevel::Info, "consent: this worker lost the sync lease"),
            _ => {}
        }
        if syncer.is_leader() {
            let view = SharedView::new(&Host, &keys);
            if let Some(meta) = view.meta() {
                let staleness = (now.div_euclid(1000) - meta.last_contact).max(0) as u64;
                let mut v = vm.borrow_mut();
                v.metrics
                    .gauge(&Host, metrics::SNAPSHOT_REVISION, meta.revision);
                v.metrics
                    .gauge(&Host, metrics::STALENESS_SECONDS, staleness);
            }
        }
        flush_stats(vm, syncer);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            vm: self.vm.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Request headers and properties, readable in the request-headers callback.
struct Headers;

impl RequestSource for Headers {
    fn header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }
}

struct Http {
    vm: Option<Rc<RefCell<Vm>>>,
}

impl Context for Http {}

fn set_state(name: &str, value: &str) {
    // Envoy stores these as filter state `wasm.<name>` for the access log.
    let _ = hostcalls::set_property(vec![name], Some(value.as_bytes()));
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let Some(vm) = &self.vm else {
            return Action::Continue;
        };
        let mut vm = vm.borrow_mut();
        let vm = &mut *vm;
        let config = vm.config.clone();
        // The grant header is ours: a client must never be able to forge it.
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, &config.grant_header);
        let Ok(Some(full_path)) = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path")
        else {
            return Action::Continue;
        };
        let method = Headers.header(":method").unwrap_or_default();
        let (path, query) = split_path(&full_path);
        let now_ms = now_ms();
        let now = now_ms.div_euclid(1000);
        let view = SharedView::new(&Host, &vm.keys);

        let (route, extracted, checked) = match config.routes.lookup(&method, path) {
            Lookup::Pass => return Action::Continue,
            Lookup::Undeclared => {
                let (decision, enforcement) = undeclared(&view, config.mode);
                let extracted = Extracted {
                    request_id: request_id(&Headers),
                    ..Default::default()
                };
                return finish(
                    vm,
                    &config,
                    None,
                    &extracted,
                    decision,
                    enforcement,
                    None,
                    now_ms,
                );
            }
            Lookup::Protected(route, params) => {
                let extracted =
                    request::extract(route, &params, query, &config.token_header, &Headers);
                refresh_keys(&mut vm.cache, &Host, &vm.keys, view.meta());
                let checked = check(&config, route, &extracted, &view, &mut vm.cache, now);
                (route, extracted, checked)
            }
        };
        match checked.token_source {
            Some(Source::Cache) => vm.metrics.count(&Host, metrics::TOKEN_CACHE_HITS, 1),
            Some(Source::Verified) => vm.metrics.count(&Host, metrics::TOKEN_CACHE_MISSES, 1),
            None => {}
        }
        let jti = checked.jti.clone();
        finish(
            vm,
            &config,
            Some(route),
            &extracted,
            checked.decision,
            checked.enforcement,
            jti,
            now_ms,
        )
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
fn finish(
    vm: &mut Vm,
    config: &Config,
    route: Option<&crate::config::Route>,
    extracted: &Extracted,
    decision: consent_core::Decision,
    enforcement: Enforcement,
    jti: Option<String>,
    now_ms: i64,
) -> Action {
    vm.metrics
        .count(&Host, &metrics::decision_name(&decision), 1);
    let (verdict, reason) = match decision.verdict {
        Verdict::Allow => ("allow", ""),
        Verdict::Deny(r) => ("deny", r.as_str()),
    };
    set_state("consent.decision", verdict);
    set_state("consent.reason", reason);
    set_state(
        "consent.grant_id",
        decision.grant_id.as_deref().unwrap_or(""),
    );

    if let Some(route) = route {
        let facts = Facts {
            node_id: &config.control_plane.node_id,
            event_id: vm.ids.next_id(),
            time_ms: now_ms,
            route,
            jti: jti.as_deref(),
            dry_run: config.mode == consent_core::Mode::DryRun,
        };
        let bytes = prost::Message::encode_to_vec(&event(facts, extracted, &decision));
        let queued = vm
            .queue()
            .is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(&bytes)).is_ok());
        if !queued {
            vm.metrics.count(&Host, metrics::AUDIT_DROPPED, 1);
        }
    }

    match enforcement {
        Enforcement::Continue => {
            if let (Verdict::Allow, Some(grant)) = (decision.verdict, decision.grant_id.as_deref())
            {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    &config.grant_header,
                    Some(grant),
                );
            }
            Action::Continue
        }
        Enforcement::Reply { reason, .. } => {
            let r = reply::deny(
                reason,
                decision.grant_id.as_deref(),
                extracted.request_id.as_deref(),
                config.retry_after_secs,
            );
            let headers: Vec<(&str, &str)> =
                r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let _ = hostcalls::send_http_response(u32::from(r.status), headers, Some(&r.body));
            Action::Pause
        }
    }
}
