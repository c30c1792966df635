//! The test-facing sidecar: starts the canary, main and worker VMs the way
//! Envoy does and routes requests, clock moves and inspection to them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::clock::SimClock;
use crate::error::SimError;
use crate::exchange::{HttpRequest, HttpResponse, Upstream, echo_upstream};
use crate::properties::node_bytes;
use crate::shared::{
    LogEntry, LogLevel, Logs, MetricValue, Metrics, SharedData, SharedDataUsage, SharedQueues,
};
use crate::state::{Env, VmRole};
use crate::vm::{self, Vm};
use crate::worker::{Job, Worker};

/// Where the plugin's code comes from.
#[derive(Debug, Clone)]
pub enum Wasm {
    /// A `.wasm` file.
    Path(PathBuf),
    /// Module bytes.
    Bytes(Vec<u8>),
    /// WebAssembly text, compiled with the `wat` crate.
    Wat(String),
}

impl Wasm {
    fn bytes(&self) -> Result<Vec<u8>, SimError> {
        match self {
            Wasm::Path(p) => std::fs::read(p).map_err(|source| SimError::ReadModule {
                path: p.display().to_string(),
                source,
            }),
            Wasm::Bytes(b) => Ok(b.clone()),
            Wasm::Wat(text) => wat::parse_str(text).map_err(|e| SimError::Compile(e.to_string())),
        }
    }
}

/// How to start a sidecar. Build with [`SidecarConfig::new`] and struct update
/// syntax: `SidecarConfig { workers: 1, ..SidecarConfig::new(wasm) }`.
#[derive(Clone)]
pub struct SidecarConfig {
    pub wasm: Wasm,
    /// Plugin configuration (buffer 7), readable in `on_configure`.
    pub plugin_config: String,
    /// VM configuration (buffer 6); its size is passed to `on_vm_start`.
    pub vm_config: String,
    /// WASI environment variables (Envoy's `vm_config.environment_variables`).
    pub env: Vec<(String, String)>,
    /// Empty by default, as Istio's WasmPlugin leaves it.
    pub vm_id: String,
    pub root_id: String,
    pub plugin_name: String,
    pub workers: usize,
    /// Cluster name → `http://127.0.0.1:port`, for gRPC and HTTP callouts.
    pub clusters: Vec<(String, String)>,
    /// On a failed VM, let requests through instead of answering 503.
    pub fail_open: bool,
    pub clock: SimClock,
    /// Lowest level captured from the guest (`--component-log-level wasm:…`).
    pub log_level: LogLevel,
    /// The simulated upstream; an echo server by default.
    pub upstream: Upstream,
    /// How long `send` waits for a response.
    pub request_timeout: Duration,
    /// `xds.node` id.
    pub node_id: String,
}

impl std::fmt::Debug for SidecarConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarConfig")
            .field("plugin_config", &self.plugin_config)
            .field("vm_id", &self.vm_id)
            .field("root_id", &self.root_id)
            .field("workers", &self.workers)
            .field("clusters", &self.clusters)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

impl SidecarConfig {
    pub fn new(wasm: Wasm) -> Self {
        Self {
            wasm,
            plugin_config: String::new(),
            vm_config: String::new(),
            env: Vec::new(),
            vm_id: String::new(),
            root_id: String::new(),
            plugin_name: "consent-sim".into(),
            workers: 2,
            clusters: Vec::new(),
            fail_open: false,
            clock: SimClock::new(),
            log_level: LogLevel::Trace,
            upstream: echo_upstream(),
            request_timeout: Duration::from_secs(10),
            node_id: "sidecar~10.0.0.1~app.default~default.svc.cluster.local".into(),
        }
    }
}

struct WorkerHandle {
    jobs: Sender<Job>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A running sidecar: one canary run at start, one main-thread VM, and one VM
/// per worker thread, sharing shared data, queues, metrics and logs.
pub struct Sidecar {
    env: Arc<Env>,
    workers: Vec<WorkerHandle>,
    next_worker: AtomicUsize,
    request_timeout: Duration,
    /// Envoy keeps a VM on the main thread that is started but never given a
    /// root context for an HTTP filter.
    _main_vm: Mutex<Vm>,
}

impl Sidecar {
    /// Starts the sidecar: compiles the module, runs the canary (`on_vm_start`
    /// and `on_configure` on a throw-away VM), then starts the main VM and each
    /// worker's VM with its root context. Must run inside a tokio runtime,
    /// which carries the callouts.
    pub async fn start(config: SidecarConfig) -> Result<Sidecar, SimError> {
        if config.workers == 0 {
            return Err(SimError::Config("at least one worker is needed".into()));
        }
        let bytes = config.wasm.bytes()?;
        let module = vm::compile(&bytes)?;
        let env = Arc::new(Env {
            vm_id: config.vm_id,
            root_id: config.root_id,
            plugin_name: config.plugin_name,
            vm_config: config.vm_config.into_bytes(),
            plugin_config: config.plugin_config.into_bytes(),
            env_vars: config.env,
            clusters: config.clusters.into_iter().collect::<HashMap<_, _>>(),
            clock: config.clock,
            log_level: config.log_level,
            fail_open: config.fail_open,
            node: node_bytes(&config.node_id, "consent-sim"),
            upstream: config.upstream,
            runtime: tokio::runtime::Handle::current(),
            shared_data: SharedData::default(),
            queues: SharedQueues::default(),
            metrics: Metrics::default(),
            logs: Logs::default(),
        });

        let (canary_module, canary_env) = (module.clone(), env.clone());
        let main_vm = tokio::task::spawn_blocking(move || -> Result<Vm, SimError> {
            // The canary's jobs go nowhere: whatever it opens dies with it.
            let (jobs, _) = channel();
            let mut canary = Vm::start(&canary_module, canary_env.clone(), VmRole::Canary, jobs)?;
            canary.configure_root()?;
            drop(canary);
            let (jobs, _) = channel();
            Vm::start(&canary_module, canary_env, VmRole::Main, jobs)
        })
        .await
        .map_err(|e| SimError::Config(format!("canary thread: {e}")))??;

        let mut workers = Vec::with_capacity(config.workers);
        let mut ready = Vec::with_capacity(config.workers);
        for index in 0..config.workers {
            let (jobs, rx) = channel();
            let failed = Arc::new(AtomicBool::new(false));
            let (ready_tx, ready_rx) = oneshot::channel();
            let (module, env, own_jobs, flag) =
                (module.clone(), env.clone(), jobs.clone(), failed.clone());
            let thread = std::thread::Builder::new()
                .name(format!("sim-worker-{index}"))
                .spawn(move || {
                    let started = Vm::start(&module, env, VmRole::Worker(index), own_jobs)
                        .and_then(|mut vm| vm.configure_root().map(|()| vm));
                    match started {
                        Ok(vm) => {
                            let _ = ready_tx.send(Ok(()));
                            Worker {
                                index,
                                vm,
                                failed: flag,
                            }
                            .run(rx);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| SimError::Config(format!("cannot spawn worker: {e}")))?;
            workers.push(WorkerHandle {
                jobs,
                failed,
                thread: Some(thread),
            });
            ready.push(ready_rx);
        }
        let sidecar = Sidecar {
            env,
            workers,
            next_worker: AtomicUsize::new(0),
            request_timeout: config.request_timeout,
            _main_vm: Mutex::new(main_vm),
        };
        for r in ready {
            r.await.map_err(|_| SimError::Stopped)??;
        }
        Ok(sidecar)
    }

    fn worker(&self, index: usize) -> Result<&WorkerHandle, SimError> {
        self.workers.get(index).ok_or(SimError::NoSuchWorker(index))
    }

    /// Sends a request through the filter on its worker (round-robin unless
    /// the request names one) and waits for the response.
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, SimError> {
        let index = request.worker.unwrap_or_else(|| {
            self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len()
        });
        let (reply, rx) = oneshot::channel();
        self.worker(index)?
            .jobs
            .send(Job::Http { request, reply })
            .map_err(|_| SimError::Stopped)?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(SimError::Stopped),
            Err(_) => Err(SimError::Timeout(self.request_timeout)),
        }
    }

    /// Waits until every worker has handled everything posted so far and run
    /// its due timers.
    pub async fn sync(&self) -> Result<(), SimError> {
        for w in &self.workers {
            let (done, rx) = oneshot::channel();
            w.jobs
                .send(Job::Sync(done))
                .map_err(|_| SimError::Stopped)?;
            rx.await.map_err(|_| SimError::Stopped)?;
        }
        Ok(())
    }

    /// Moves the clock forward, then lets every worker fire due timers.
    pub async fn advance(&self, by: Duration) -> Result<(), SimError> {
        self.env.clock.advance(by);
        self.sync().await
    }

    pub fn clock(&self) -> &SimClock {
        &self.env.clock
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Counter and gauge values, and histogram sample counts, by name.
    pub fn metrics(&self) -> BTreeMap<String, u64> {
        self.env
            .metrics
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k, v.value()))
            .collect()
    }

    /// One metric with its kind (histograms keep every sample).
    pub fn metric(&self, name: &str) -> Option<MetricValue> {
        self.env.metrics.get(name)
    }

    /// Everything the guests logged so far, in order.
    pub fn logs(&self) -> Vec<LogEntry> {
        self.env.logs.snapshot()
    }

    /// Whether any log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs().iter().any(|l| l.message.contains(needle))
    }

    /// Shared data under the sidecar's vm_id: value and CAS.
    pub fn shared_data_get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.env.shared_data.get(&self.env.vm_id, key)
    }

    /// Entries and bytes held in shared data under the sidecar's vm_id.
    pub fn shared_data_usage(&self) -> SharedDataUsage {
        self.env.shared_data.usage(&self.env.vm_id)
    }

    /// Writes shared data as another plugin in the process could.
    pub fn shared_data_set(&self, key: &str, value: &[u8]) {
        let _ = self
            .env
            .shared_data
            .set(&self.env.vm_id, key, value.to_vec(), 0);
    }

    /// Enqueues onto a shared queue as another plugin could; NOT_FOUND-like `false` if unknown.
    pub fn enqueue(&self, vm_id: &str, queue: &str, value: &[u8]) -> bool {
        self.env
            .queues
            .resolve(vm_id, queue)
            .is_some_and(|token| self.env.queues.enqueue(token, value.to_vec()).is_ok())
    }

    /// Breaks worker `index`'s VM as a trap would: from now on it gets no
    /// callbacks and its requests answer 503 (or bypass it when fail-open).
    pub async fn inject_trap(&self, index: usize) -> Result<(), SimError> {
        let worker = self.workers.get(index).ok_or(SimError::Stopped)?;
        let (done, rx) = oneshot::channel();
        worker
            .jobs
            .send(Job::Trap(done))
            .map_err(|_| SimError::Stopped)?;
        rx.await.map_err(|_| SimError::Stopped)
    }

    /// Whether a trap has broken this worker's VM.
    pub fn worker_failed(&self, index: usize) -> bool {
        self.workers
            .get(index)
            .is_some_and(|w| w.failed.load(Ordering::SeqCst))
    }

    /// Stops every worker and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for w in &self.workers {
            let _ = w.jobs.send(Job::Stop);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown();
    }
}
