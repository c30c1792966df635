//! Revocation propagation: how long from a committed revoke until every
//! sidecar subscribed to the grant's dataset has acknowledged it, and what
//! consentd spends (RSS, CPU) per stream and per revoke fanned out.
//!
//! A real `consentd` process (the built binary, with bearer tokens as in
//! production, its SQLite file on tmpfs) serves N emulated sidecars. Each is
//! one SidecarSync stream on its own HTTP/2 connection and speaks what the
//! filter speaks (`filter/src/sync.rs`): a Hello with node id, datasets and
//! the bearer credential; snapshot chunks and deltas applied with
//! consent-core's `Snapshot` rules (so digests are checked); an Ack with the
//! revision and digest after every applied update; a Nack on a refused one.
//!
//! Per round: t0 just before `RevokeGrant` is sent; the RPC's return is the
//! commit; each sidecar stamps when it handed its Ack of a revision at or
//! past the revoke's to its stream; `WaitPropagation` (consentd's own view
//! that all N acknowledged) is timed from t0 too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use consent_control_plane::proto::consent_admin_client::ConsentAdminClient;
use consent_control_plane::proto::sidecar_sync_client::SidecarSyncClient;
use consent_core::snapshot::SnapshotChunk;
use consent_core::wire::v1;
use consent_core::wire::v1::{control_message, sidecar_message};
use consent_core::{Applied, Snapshot, SnapshotAssembler, Update};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Bearer tokens the benchmark's consentd requires (not dev mode: the auth
/// interceptor runs on every call, as in production).
pub(crate) const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";
pub(crate) const SIDECAR_TOKEN: &str = "bench-sidecar-token-0123456789abcdef";
/// The actor the benchmark's admin calls are recorded under.
pub(crate) const ACTOR: &str = "consent-bench";
/// The dataset every emulated sidecar protects and every grant names.
pub(crate) const DATASET: &str = "records";
/// Longest wait for any one step (a round, a catch-up) before giving up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What to measure.
#[derive(Clone, Debug)]
pub struct PropagationOptions {
    /// Sidecar counts, one consentd per count.
    pub sizes: Vec<usize>,
    /// Measured revoke rounds per size (at least).
    pub rounds: usize,
    /// Raises the rounds of small sizes so each gets at least this many
    /// per-sidecar samples (N = 1 would otherwise have `rounds` samples).
    pub min_per_sidecar_samples: usize,
    /// Unmeasured rounds before the measured ones.
    pub warmup_rounds: usize,
    /// Pause after each round, so rounds do not coalesce into one delta.
    pub pause: Duration,
    /// How long consentd is watched idle with N streams (heartbeats only).
    pub idle_window: Duration,
    /// How long consentd is watched idle with no stream.
    pub idle_window_no_streams: Duration,
    /// consentd's `--heartbeat-ms`; `None` keeps its default (5 s).
    pub heartbeat_ms: Option<u64>,
    /// Sidecars connecting at once.
    pub connect_concurrency: usize,
}

impl Default for PropagationOptions {
    fn default() -> Self {
        PropagationOptions {
            sizes: vec![1, 100, 1000],
            rounds: 50,
            min_per_sidecar_samples: 500,
            warmup_rounds: 3,
            pause: Duration::from_millis(25),
            idle_window: Duration::from_secs(10),
            idle_window_no_streams: Duration::from_secs(2),
            heartbeat_ms: None,
            connect_concurrency: 32,
        }
    }
}

impl PropagationOptions {
    /// The measured rounds for `sidecars` streams.
    pub fn rounds_for(&self, sidecars: usize) -> usize {
        self.rounds
            .max(self.min_per_sidecar_samples.div_ceil(sidecars.max(1)))
            .max(1)
    }
}

/// CPU seconds of consentd's threads of one name over the revoke rounds.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadCpu {
    pub name: String,
    /// Threads of that name alive at the end of the rounds.
    pub threads: usize,
    pub cpu_secs: f64,
}

/// consentd's cost for one size, from `/proc/<pid>/{stat,status}`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsentdCost {
    pub streams: usize,
    /// Clock ticks per second used to convert utime + stime.
    pub clk_tck: u64,
    /// VmRSS with no stream, after the grants were created.
    pub rss_idle_kib: u64,
    /// VmRSS with every stream connected and caught up.
    pub rss_connected_kib: u64,
    /// VmRSS after the revoke rounds.
    pub rss_after_kib: u64,
    pub threads_idle: usize,
    pub threads_connected: usize,
    pub threads_after: usize,
    /// CPU seconds per second with no stream.
    pub idle_cpu_per_sec_no_streams: f64,
    /// CPU seconds per second with every stream connected (heartbeats only).
    pub idle_cpu_per_sec: f64,
    /// CPU seconds spent accepting the streams and sending their snapshots.
    pub connect_cpu_secs: f64,
    /// CPU seconds over the measured rounds (pauses included).
    pub rounds_cpu_secs: f64,
    pub rounds_wall_secs: f64,
    /// Revokes in the rounds window (the warm-up rounds included).
    pub revokes: usize,
    /// CPU seconds of this (benchmark) process over the rounds: the emulated
    /// sidecars share the machine's cores with consentd.
    pub bench_cpu_secs_during_rounds: f64,
    /// consentd's CPU over the rounds by thread name, most first.
    pub rounds_cpu_by_thread: Vec<ThreadCpu>,
}

impl ConsentdCost {
    /// Resident memory added by 1000 connected streams.
    pub fn rss_per_1000_streams_kib(&self) -> f64 {
        let added = self.rss_connected_kib as f64 - self.rss_idle_kib as f64;
        added * 1000.0 / self.streams.max(1) as f64
    }

    /// CPU seconds per revoke fanned out to this size's streams, with the
    /// idle (heartbeat) CPU over the same wall time taken out.
    pub fn cpu_per_revoke_secs(&self) -> f64 {
        let busy = self.rounds_cpu_secs - self.idle_cpu_per_sec * self.rounds_wall_secs;
        busy.max(0.0) / self.revokes.max(1) as f64
    }

    /// `cpu_per_revoke_secs` scaled to 1000 streams.
    pub fn cpu_per_revoke_per_1000_secs(&self) -> f64 {
        self.cpu_per_revoke_secs() * 1000.0 / self.streams.max(1) as f64
    }

    /// Idle CPU per second scaled to 1000 streams (above the no-stream idle).
    pub fn idle_cpu_per_sec_per_1000(&self) -> f64 {
        let added = (self.idle_cpu_per_sec - self.idle_cpu_per_sec_no_streams).max(0.0);
        added * 1000.0 / self.streams.max(1) as f64
    }
}

/// One size's samples. Times are milliseconds from t0 (just before the
/// RevokeGrant RPC was sent).
#[derive(Clone, Debug, PartialEq)]
pub struct PropagationRun {
    pub sidecars: usize,
    pub rounds: usize,
    /// Every sidecar's Ack of the revoke, every round: N × rounds samples.
    pub per_sidecar_ms: Vec<f64>,
    /// Per round, the last sidecar's Ack.
    pub all_acked_ms: Vec<f64>,
    /// Per round, when WaitPropagation (sent as soon as RevokeGrant returned)
    /// answered complete.
    pub wait_propagation_ms: Vec<f64>,
    /// Per round, when RevokeGrant returned: the commit.
    pub revoke_rpc_ms: Vec<f64>,
    /// consentd's own commit → ack latencies (`SidecarAck.latency_ms`, whole
    /// milliseconds by its clock), every sidecar every round.
    pub server_latency_ms: Vec<f64>,
    /// From the first connection until every sidecar acknowledged its snapshot.
    pub connect_secs: f64,
    pub cost: ConsentdCost,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PropagationReport {
    pub runs: Vec<PropagationRun>,
    /// How the figures were taken and what would differ in production.
    pub notes: Vec<String>,
}

/// Runs every size in `opts.sizes`, each against a fresh consentd.
pub async fn run(opts: &PropagationOptions) -> anyhow::Result<PropagationReport> {
    let (clk_tck, tck_note) = clk_tck();
    let largest = opts.sizes.iter().copied().max().unwrap_or(0);
    check_fd_limit(largest)?;
    let mut notes = vec![
        "consentd's SQLite file is on tmpfs (/dev/shm) unless noted: on disk, synchronous=FULL \
         makes every commit (the revoke, and each sidecar record the hub persists per ack) \
         wait for an fsync"
            .to_owned(),
        format!(
            "emulated sidecars (one tonic stream and HTTP/2 connection each) run in this process \
             and share the machine's {} cores with consentd; load average at start: {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        format!(
            "CPU from /proc/<pid>/stat utime+stime at {clk_tck} ticks/s ({tck_note}); \
             resolution {} ms",
            1000 / clk_tck.max(1)
        ),
    ];
    if opts.heartbeat_ms.is_none() {
        notes.push("consentd runs with its default heartbeat (5 s) and ack timeout (30 s)".into());
    }
    let mut runs = Vec::new();
    for &n in &opts.sizes {
        let run = run_size(opts, n, clk_tck).await?;
        runs.push(run);
    }
    if let Some(tmpfs) = LAST_DB_ON_TMPFS.get()
        && !tmpfs
    {
        notes.push("/dev/shm was not usable: the database was in the default temp dir".into());
    }
    Ok(PropagationReport { runs, notes })
}

static LAST_DB_ON_TMPFS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

async fn run_size(
    opts: &PropagationOptions,
    n: usize,
    clk_tck: u64,
) -> anyhow::Result<PropagationRun> {
    anyhow::ensure!(n > 0, "a size of 0 sidecars measures nothing");
    let rounds = opts.rounds_for(n);
    let consentd = ConsentdProcess::start(opts.heartbeat_ms).await?;
    let _ = LAST_DB_ON_TMPFS.set(consentd.db_on_tmpfs);
    let mut admin = consentd.admin().await?;

    // One grant per round (a revoked grant cannot be revoked again).
    let total = rounds + opts.warmup_rounds;
    let mut ids = Vec::with_capacity(total);
    for i in 0..total {
        let grant = admin
            .create_grant(grant_request(&format!("p-{i:06}"), i))
            .await
            .context("CreateGrant")?
            .into_inner()
            .grant
            .context("CreateGrant returned no grant")?;
        ids.push(grant.id);
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle0 = ProcSample::take(consentd.pid)?;
    tokio::time::sleep(opts.idle_window_no_streams).await;
    let idle0_end = ProcSample::take(consentd.pid)?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut tracker = Tracker::new(n, events_rx);
    let connect_started = Instant::now();
    let handles = connect_sidecars(
        &consentd.url(),
        n,
        opts.connect_concurrency,
        &events_tx,
        "bench-sidecar",
    )
    .await?;
    drop(events_tx);
    let head = ids_head(&mut admin, &ids).await?;
    tracker.wait_all(head, STEP_TIMEOUT).await?;
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let connected = ProcSample::take(consentd.pid)?;
    tokio::time::sleep(opts.idle_window).await;
    let idle_n = ProcSample::take(consentd.pid)?;
    let threads_before = thread_ticks(consentd.pid);
    let bench_before = ProcSample::take(std::process::id())?;

    let mut run = PropagationRun {
        sidecars: n,
        rounds,
        per_sidecar_ms: Vec::with_capacity(n * rounds),
        all_acked_ms: Vec::with_capacity(rounds),
        wait_propagation_ms: Vec::with_capacity(rounds),
        revoke_rpc_ms: Vec::with_capacity(rounds),
        server_latency_ms: Vec::with_capacity(n * rounds),
        connect_secs,
        cost: ConsentdCost {
            streams: n,
            clk_tck,
            rss_idle_kib: idle0_end.rss_kib,
            rss_connected_kib: connected.rss_kib,
            rss_after_kib: 0,
            threads_idle: idle0_end.threads,
            threads_connected: connected.threads,
            threads_after: 0,
            idle_cpu_per_sec_no_streams: idle0_end.cpu_per_sec_since(&idle0, clk_tck),
            idle_cpu_per_sec: idle_n.cpu_per_sec_since(&connected, clk_tck),
            connect_cpu_secs: ticks_secs(connected.cpu_ticks - idle0_end.cpu_ticks, clk_tck),
            rounds_cpu_secs: 0.0,
            rounds_wall_secs: 0.0,
            revokes: rounds,
            bench_cpu_secs_during_rounds: 0.0,
            rounds_cpu_by_thread: Vec::new(),
        },
    };

    for (k, id) in ids.iter().enumerate() {
        let measured = k >= opts.warmup_rounds;
        let round = revoke_round(&mut admin, &mut tracker, id, n).await?;
        if measured {
            run.per_sidecar_ms.extend(&round.per_sidecar_ms);
            run.all_acked_ms.push(
                round
                    .per_sidecar_ms
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max),
            );
            run.wait_propagation_ms.push(round.wait_ms);
            run.revoke_rpc_ms.push(round.commit_ms);
            run.server_latency_ms.extend(&round.server_latency_ms);
        }
        tokio::time::sleep(opts.pause).await;
    }
    // The warm-up rounds fall inside this window too: count them as revokes.
    let after = ProcSample::take(consentd.pid)?;
    let bench_after = ProcSample::take(std::process::id())?;
    let threads_after = thread_ticks(consentd.pid);
    run.cost.revokes = total;
    run.cost.rounds_cpu_secs = ticks_secs(after.cpu_ticks - idle_n.cpu_ticks, clk_tck);
    run.cost.rounds_wall_secs = after.at.duration_since(idle_n.at).as_secs_f64();
    run.cost.rss_after_kib = after.rss_kib;
    run.cost.threads_after = after.threads;
    run.cost.bench_cpu_secs_during_rounds = ticks_secs(
        bench_after.cpu_ticks.saturating_sub(bench_before.cpu_ticks),
        clk_tck,
    );
    run.cost.rounds_cpu_by_thread = thread_diff(&threads_before, &threads_after, clk_tck);

    for h in &handles {
        h.abort();
    }
    drop(consentd);
    Ok(run)
}

/// The head revision once every grant exists: the last grant's revision.
async fn ids_head(admin: &mut Admin, ids: &[String]) -> anyhow::Result<u64> {
    let last = ids.last().context("no grants")?;
    let grant = admin
        .get_grant(v1::GetGrantRequest { id: last.clone() })
        .await?
        .into_inner()
        .grant
        .context("GetGrant returned no grant")?;
    Ok(grant.revision)
}

struct Round {
    per_sidecar_ms: Vec<f64>,
    wait_ms: f64,
    commit_ms: f64,
    server_latency_ms: Vec<f64>,
}

async fn revoke_round(
    admin: &mut Admin,
    tracker: &mut Tracker,
    id: &str,
    n: usize,
) -> anyhow::Result<Round> {
    let request = v1::RevokeGrantRequest {
        id: id.to_owned(),
        actor: ACTOR.into(),
        reason: "propagation benchmark".into(),
    };
    let t0 = Instant::now();
    let revoked = admin
        .revoke_grant(request)
        .await
        .context("RevokeGrant")?
        .into_inner();
    let committed = Instant::now();
    let mut waiter = admin.clone();
    let wait_request = v1::PropagationRequest {
        revision: revoked.revision,
        datasets: revoked.datasets.clone(),
        timeout_ms: STEP_TIMEOUT.as_millis() as u32,
    };
    let wait = tokio::spawn(async move {
        let response = waiter.wait_propagation(wait_request).await;
        (Instant::now(), response)
    });
    let acks = tracker.wait_all(revoked.revision, STEP_TIMEOUT).await?;
    let (wait_done, response) = wait.await.context("WaitPropagation task")?;
    let response = response.context("WaitPropagation")?.into_inner();
    let acknowledged = response.sidecars.iter().filter(|s| s.acknowledged).count();
    if !response.complete || acknowledged != n {
        bail!(
            "WaitPropagation for revision {}: complete={} with {acknowledged} of {n} acknowledged",
            revoked.revision,
            response.complete
        );
    }
    let ms = |at: Instant| at.duration_since(t0).as_secs_f64() * 1e3;
    Ok(Round {
        per_sidecar_ms: acks.into_iter().map(ms).collect(),
        wait_ms: ms(wait_done),
        commit_ms: ms(committed),
        server_latency_ms: response
            .sidecars
            .iter()
            .map(|s| s.latency_ms as f64)
            .collect(),
    })
}

/// A grant on [`DATASET`] for subject `subject`, one of a few grantees.
pub(crate) fn grant_request(subject: &str, i: usize) -> v1::CreateGrantRequest {
    let grantee = format!("spiffe://mesh/ns/app-{}/sa/reader", i % 8);
    let mut request = consent_sim::mesh::grant_request("", subject, &grantee, &[DATASET]);
    request.actor = ACTOR.into();
    request
}

/// What an emulated sidecar reports.
enum Event {
    Ack {
        sidecar: usize,
        revision: u64,
        at: Instant,
    },
    Ended {
        sidecar: usize,
        error: String,
    },
}

/// Follows every sidecar's acknowledgements.
struct Tracker {
    acked: Vec<u64>,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Tracker {
    fn new(n: usize, rx: mpsc::UnboundedReceiver<Event>) -> Self {
        Tracker {
            acked: vec![0; n],
            rx,
        }
    }

    /// Waits until every sidecar has acknowledged `revision` (or later) and
    /// returns when each first did; acks of earlier revisions only advance.
    async fn wait_all(&mut self, revision: u64, timeout: Duration) -> anyhow::Result<Vec<Instant>> {
        let mut first: Vec<Option<Instant>> = vec![None; self.acked.len()];
        let mut missing = first.len();
        let deadline = tokio::time::Instant::now() + timeout;
        while missing > 0 {
            let event = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => bail!("every emulated sidecar has stopped"),
                Err(_) => {
                    let behind = self.acked.iter().filter(|r| **r < revision).count();
                    bail!(
                        "{behind} sidecars did not acknowledge revision {revision} within {timeout:?}"
                    )
                }
            };
            match event {
                Event::Ack {
                    sidecar,
                    revision: acked,
                    at,
                } => {
                    self.acked[sidecar] = self.acked[sidecar].max(acked);
                    if acked >= revision && first[sidecar].is_none() {
                        first[sidecar] = Some(at);
                        missing -= 1;
                    }
                }
                Event::Ended { sidecar, error } => {
                    bail!("emulated sidecar {sidecar} stopped: {error}")
                }
            }
        }
        Ok(first.into_iter().flatten().collect())
    }
}

/// Opens `n` streams, each on its own connection, `concurrency` at a time.
async fn connect_sidecars(
    url: &str,
    n: usize,
    concurrency: usize,
    events: &mpsc::UnboundedSender<Event>,
    prefix: &str,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut connecting = Vec::with_capacity(n);
    for i in 0..n {
        let (gate, url, node) = (gate.clone(), url.to_owned(), format!("{prefix}-{i:05}"));
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            EmulatedSidecar::connect(&url, i, &node, &[DATASET]).await
        }));
    }
    let mut handles = Vec::with_capacity(n);
    for (i, c) in connecting.into_iter().enumerate() {
        let sidecar = c
            .await
            .context("connect task")?
            .with_context(|| format!("emulated sidecar {i} cannot connect"))?;
        let events = events.clone();
        handles.push(tokio::spawn(async move {
            let index = sidecar.index;
            if let Err(e) = sidecar.run(&events).await {
                let _ = events.send(Event::Ended {
                    sidecar: index,
                    error: format!("{e:#}"),
                });
            }
        }));
    }
    Ok(handles)
}

/// Unix seconds by the real clock, as the filter reads Envoy's.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// One sidecar as the filter's sync leader behaves on its stream.
pub(crate) struct EmulatedSidecar {
    index: usize,
    tx: mpsc::Sender<v1::SidecarMessage>,
    rx: tonic::Streaming<v1::ControlMessage>,
    pub(crate) snapshot: Snapshot,
    assembler: SnapshotAssembler,
}

impl EmulatedSidecar {
    /// A new connection, then the stream with the Hello as its first message.
    pub(crate) async fn connect(
        url: &str,
        index: usize,
        node_id: &str,
        datasets: &[&str],
    ) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let mut client = SidecarSyncClient::with_interceptor(channel, Bearer::new(SIDECAR_TOKEN))
            .max_decoding_message_size(64 << 20);
        let (tx, outbound) = mpsc::channel(16);
        tx.send(v1::SidecarMessage {
            msg: Some(sidecar_message::Msg::Hello(v1::Hello {
                node_id: node_id.to_owned(),
                datasets: datasets.iter().map(|d| d.to_string()).collect(),
                resume_from_revision: 0,
                snapshot_digest: Vec::new(),
                filter_version: concat!("consent-benches-", env!("CARGO_PKG_VERSION")).into(),
            })),
        })
        .await
        .ok()
        .context("the outbound stream closed")?;
        let rx = client
            .stream(ReceiverStream::new(outbound))
            .await
            .context("SidecarSync.Stream")?
            .into_inner();
        Ok(EmulatedSidecar {
            index,
            tx,
            rx,
            snapshot: Snapshot::new(),
            assembler: SnapshotAssembler::default(),
        })
    }

    /// Applies one control message to this sidecar's snapshot (see [`apply_control`]).
    pub(crate) fn apply(&mut self, msg: control_message::Msg) -> Result<Option<v1::Ack>, String> {
        apply_control(&mut self.snapshot, &mut self.assembler, msg)
    }

    /// The next control message; `None` when the stream ended cleanly.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<control_message::Msg>> {
        match self.rx.message().await {
            Ok(Some(m)) => Ok(Some(m.msg.context("empty control message")?)),
            Ok(None) => Ok(None),
            Err(status) => Err(status.into()),
        }
    }

    pub(crate) async fn send(&self, msg: sidecar_message::Msg) -> anyhow::Result<()> {
        self.tx
            .send(v1::SidecarMessage { msg: Some(msg) })
            .await
            .ok()
            .context("the outbound stream closed")
    }

    /// Applies and acknowledges until the stream ends; an Ack is stamped once
    /// it is handed to the stream.
    async fn run(mut self, events: &mpsc::UnboundedSender<Event>) -> anyhow::Result<()> {
        while let Some(msg) = self.next().await? {
            match self.apply(msg) {
                Ok(Some(ack)) => {
                    let revision = ack.revision;
                    self.send(sidecar_message::Msg::Ack(ack)).await?;
                    let at = Instant::now();
                    let _ = events.send(Event::Ack {
                        sidecar: self.index,
                        revision,
                        at,
                    });
                }
                Ok(None) => {}
                Err(error) => {
                    let revision = self.snapshot.revision();
                    let nack = v1::Nack {
                        revision,
                        error: error.clone(),
                    };
                    self.send(sidecar_message::Msg::Nack(nack)).await?;
                    bail!("refused an update: {error}");
                }
            }
        }
        Ok(())
    }
}

/// Applies one control message to `snapshot` as the filter does: `Some(ack)`
/// when an update was applied (or already held), `None` for a heartbeat or a
/// partial snapshot; an error is what the filter would Nack.
pub(crate) fn apply_control(
    snapshot: &mut Snapshot,
    assembler: &mut SnapshotAssembler,
    msg: control_message::Msg,
) -> Result<Option<v1::Ack>, String> {
    let now = unix_now();
    let update = match msg {
        control_message::Msg::Heartbeat(_) => {
            if snapshot.is_synced() {
                snapshot.touch(now);
            }
            return Ok(None);
        }
        control_message::Msg::Snapshot(chunk) => {
            let chunk = SnapshotChunk::try_from(chunk).map_err(|e| e.to_string())?;
            match assembler.push(chunk).map_err(|e| e.to_string())? {
                Some(full) => Update::Snapshot(full),
                None => return Ok(None),
            }
        }
        control_message::Msg::Delta(delta) => {
            Update::Delta(consent_core::Delta::try_from(delta).map_err(|e| e.to_string())?)
        }
    };
    match snapshot.apply(update, now).map_err(|e| e.to_string())? {
        Applied::Advanced { .. } | Applied::Duplicate => Ok(Some(v1::Ack {
            revision: snapshot.revision(),
            digest: snapshot.digest().to_bytes().to_vec(),
        })),
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub(crate) fn new(token: &str) -> Self {
        Bearer(
            format!("Bearer {token}")
                .parse()
                .expect("a bearer token is ASCII"),
        )
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub(crate) type Admin = ConsentAdminClient<InterceptedService<Channel, Bearer>>;

/// A consentd process started by the benchmark: production mode (bearer
/// tokens), ephemeral loopback ports, its database in a directory on tmpfs.
pub(crate) struct ConsentdProcess {
    child: Child,
    pub(crate) pid: u32,
    pub(crate) grpc: SocketAddr,
    pub(crate) db_on_tmpfs: bool,
    log: PathBuf,
    _stdout: ChildStdout,
    _dir: tempfile::TempDir,
}

impl ConsentdProcess {
    pub(crate) async fn start(heartbeat_ms: Option<u64>) -> anyhow::Result<Self> {
        let bin = consent_sim::mesh::consentd_bin()?;
        let (dir, db_on_tmpfs) = match tempfile::Builder::new()
            .prefix("consent-bench-")
            .tempdir_in("/dev/shm")
        {
            Ok(dir) => (dir, true),
            Err(_) => (tempfile::tempdir()?, false),
        };
        let log = dir.path().join("consentd.log");
        let mut command = Command::new(&bin);
        command
            .arg("--db")
            .arg(dir.path().join("consentd.db"))
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args(["--log", "warn"])
            .env_remove("CONSENTD_DEV")
            .env_remove("CONSENTD_CONFIG")
            .env("CONSENTD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("CONSENTD_SIDECAR_TOKEN", SIDECAR_TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        if let Some(ms) = heartbeat_ms {
            command.arg("--heartbeat-ms").arg(ms.to_string());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("consentd stdout")?;
        // consentd prints one line naming its bound ports.
        let (line_tx, line_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line).map(|_| line);
            let _ = line_tx.send((read, reader.into_inner()));
        });
        let started = tokio::time::timeout(Duration::from_secs(30), line_rx).await;
        let (line, stdout) = match started {
            Ok(Ok((Ok(line), stdout))) if !line.is_empty() => (line, stdout),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "consentd did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                );
            }
        };
        let grpc = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected first line from consentd: {line:?}"))?;
        let process = ConsentdProcess {
            child,
            pid,
            grpc,
            db_on_tmpfs,
            log,
            _stdout: stdout,
            _dir: dir,
        };
        // The listener is bound before the line; wait until it answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match process.admin().await {
                Ok(mut admin) => {
                    let probe = admin.list_sidecars(v1::ListSidecarsRequest {}).await;
                    if probe.is_ok() {
                        break;
                    }
                }
                Err(_) if Instant::now() < deadline => {}
                Err(e) => return Err(e.context(process.log_tail())),
            }
            if Instant::now() > deadline {
                bail!("consentd does not answer: {}", process.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(process)
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// An admin client on its own connection.
    pub(crate) async fn admin(&self) -> anyhow::Result<Admin> {
        let channel = Endpoint::from_shared(self.url())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(ConsentAdminClient::with_interceptor(
            channel,
            Bearer::new(ADMIN_TOKEN),
        ))
    }

    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ConsentdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One reading of a process's CPU, RSS and thread count.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProcSample {
    pub(crate) at: Instant,
    /// utime + stime, in clock ticks.
    pub(crate) cpu_ticks: u64,
    pub(crate) rss_kib: u64,
    pub(crate) threads: usize,
}

impl ProcSample {
    pub(crate) fn take(pid: u32) -> anyhow::Result<Self> {
        let at = Instant::now();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        let cpu_ticks = stat_ticks(&stat).context("unexpected /proc/<pid>/stat")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        Ok(ProcSample {
            at,
            cpu_ticks,
            rss_kib: field("VmRSS:").context("no VmRSS")?,
            threads: field("Threads:").unwrap_or(0) as usize,
        })
    }

    pub(crate) fn cpu_per_sec_since(&self, earlier: &ProcSample, clk_tck: u64) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        ticks_secs(self.cpu_ticks.saturating_sub(earlier.cpu_ticks), clk_tck) / wall.max(1e-9)
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/.../stat` line; the command
/// name in parentheses may itself contain spaces or parentheses.
fn stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn stat_comm(stat: &str) -> Option<&str> {
    Some(&stat[stat.find('(')? + 1..stat.rfind(')')?])
}

/// CPU ticks by thread name (with the number of threads of that name).
pub(crate) fn thread_ticks(pid: u32) -> BTreeMap<String, (usize, u64)> {
    let mut out: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let (Some(name), Some(ticks)) = (stat_comm(&stat), stat_ticks(&stat)) {
            let entry = out.entry(name.to_owned()).or_default();
            entry.0 += 1;
            entry.1 += ticks;
        }
    }
    out
}

/// CPU seconds per thread name between two readings, most first. Threads
/// that exited in between are missing from both sides' sum for that name.
pub(crate) fn thread_diff(
    before: &BTreeMap<String, (usize, u64)>,
    after: &BTreeMap<String, (usize, u64)>,
    clk_tck: u64,
) -> Vec<ThreadCpu> {
    let mut out: Vec<ThreadCpu> = after
        .iter()
        .map(|(name, (threads, ticks))| {
            let earlier = before.get(name).map_or(0, |(_, t)| *t);
            ThreadCpu {
                name: name.clone(),
                threads: *threads,
                cpu_secs: ticks_secs(ticks.saturating_sub(earlier), clk_tck),
            }
        })
        .filter(|t| t.cpu_secs > 0.0)
        .collect();
    out.sort_by(|a, b| b.cpu_secs.total_cmp(&a.cpu_secs));
    out
}

pub(crate) fn ticks_secs(ticks: u64, clk_tck: u64) -> f64 {
    ticks as f64 / clk_tck.max(1) as f64
}

/// `getconf CLK_TCK`, or Linux's usual 100 when it cannot be asked.
pub(crate) fn clk_tck() -> (u64, &'static str) {
    let asked = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|t| *t > 0);
    match asked {
        Some(t) => (t, "from getconf CLK_TCK"),
        None => (100, "getconf failed: assumed 100"),
    }
}

/// Each stream holds one socket here (and one in consentd, which inherits
/// the limit). Raising the limit needs a syscall this crate does not make
/// (no libc dependency, no unsafe code), so a low limit is an error.
fn check_fd_limit(streams: usize) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    let needed = streams + 256;
    match soft {
        Some(soft) if soft < needed => bail!(
            "{streams} streams need about {needed} file descriptors but the soft limit is {soft}: \
             raise it first (`ulimit -n {}`)",
            needed.max(4096)
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Summary;

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        let line = "42 (tokio (rt) w) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 9 0 100 0 0";
        assert_eq!(stat_ticks(line), Some(175));
        assert_eq!(stat_comm(line), Some("tokio (rt) w"));
    }

    /// A real consentd and two emulated sidecars, two measured rounds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_sidecars_acknowledge_two_revokes() {
        let opts = PropagationOptions {
            sizes: vec![2],
            rounds: 2,
            min_per_sidecar_samples: 0,
            warmup_rounds: 1,
            pause: Duration::from_millis(5),
            idle_window: Duration::from_millis(300),
            idle_window_no_streams: Duration::from_millis(100),
            heartbeat_ms: Some(100),
            connect_concurrency: 2,
        };
        let report = run(&opts).await.expect("the propagation benchmark runs");
        assert_eq!(report.runs.len(), 1);
        let r = &report.runs[0];
        assert_eq!((r.sidecars, r.rounds), (2, 2));
        assert_eq!(r.per_sidecar_ms.len(), 4);
        assert_eq!(r.server_latency_ms.len(), 4);
        for samples in [&r.all_acked_ms, &r.wait_propagation_ms, &r.revoke_rpc_ms] {
            assert_eq!(samples.len(), 2);
        }
        let all = r.per_sidecar_ms.iter().chain(&r.all_acked_ms);
        assert!(all.clone().all(|ms| ms.is_finite() && *ms > 0.0), "{r:?}");
        assert!(r.revoke_rpc_ms.iter().all(|ms| *ms > 0.0), "{r:?}");
        let s = Summary::of(&r.per_sidecar_ms).expect("samples");
        assert!(s.max < 10_000.0, "{s:?}");
        assert!(r.cost.rss_connected_kib > 0 && r.cost.clk_tck > 0);
        assert_eq!(r.cost.revokes, 3);
        assert!(!report.notes.is_empty());
    }
}
