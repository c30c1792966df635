//! Snapshot bootstrap with the real filter: a consentd holding `grants`
//! grants on one dataset, then ONE consent-sim sidecar running the release
//! `consent_filter.wasm` subscribed to it. Measured from `Sidecar::start`
//! until the filter has published the snapshot in shared data (its `meta`
//! names consentd's head revision), and until consentd has its Ack; then the
//! shared data the snapshot occupies, per grant.
//!
//! The `meta` key is polled every millisecond rather than the
//! `consent.snapshot.revision` gauge, which the filter only sets on its next
//! tick (every `tick_ms`, 100 ms in the example configuration).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consent_core::wire::v1;
use consent_sim::mesh;
use consent_sim::{Sidecar, SidecarConfig, SimClock, Wasm};
use futures::StreamExt as _;

use crate::propagation::{
    ConsentdProcess, DATASET, EmulatedSidecar, ProcSample, SIDECAR_TOKEN, clk_tck, grant_request,
    thread_ticks, ticks_secs,
};

/// The plugin's root id; the filter's default key prefix is `consent/{root_id}/`.
const ROOT_ID: &str = "consent";
const PREFIX: &str = "consent/consent/";
/// consentd's heartbeat, equal to the example plugin configuration's
/// `heartbeat_secs` (the filter drops a stream silent for three of them).
const HEARTBEAT_MS: u64 = 1000;
/// Admin channels and calls in flight while seeding.
const SEED_CHANNELS: usize = 4;
const SEED_IN_FLIGHT: usize = 64;
const WAIT: Duration = Duration::from_secs(120);

/// Shared data held by one part of the filter's layout (`filter/src/store.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedDataPart {
    /// `grants` (`g{G}/{id}`), `pairs` (`p{G}/{grantee}\0{subject}`),
    /// `id lists` (`i{G}/{n}`), `other` (meta, lease, key set).
    pub name: &'static str,
    pub entries: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
}

/// The same snapshot received by a native tonic client that applies it with
/// consent-core (no wasm, no sim bridge): what consentd and the transport cost.
#[derive(Clone, Debug, PartialEq)]
pub struct NativeBootstrap {
    /// Connect → first snapshot chunk (consentd reads and encodes the view).
    pub first_chunk_secs: f64,
    /// Connect → last chunk received.
    pub received_secs: f64,
    /// Connect → snapshot applied (digest checked) and Ack sent.
    pub applied_secs: f64,
    pub chunks: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BootstrapReport {
    pub grants: usize,
    /// consentd's head once seeded: the revision the sidecar must reach.
    pub head_revision: u64,
    /// Seeding through concurrent CreateGrant calls (not the measured figure).
    pub seed_secs: f64,
    /// CreateGrant throughput (grants/s) over each tenth of the seeding, in order.
    pub seed_rates: Vec<f64>,
    /// `Sidecar::start` returned: module compiled, canary, main and worker VMs configured.
    pub vm_start_secs: f64,
    /// The sync lease appeared in shared data: the first tick, which opens the stream.
    pub first_tick_secs: Option<f64>,
    /// Sidecar start → the filter's `meta` names the head revision (snapshot applied).
    pub bootstrap_secs: f64,
    /// Sidecar start → consentd holds the Ack (WaitPropagation answered complete).
    pub acked_secs: f64,
    pub entries: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub parts: Vec<SharedDataPart>,
    /// CPU of the sim's worker threads (the wasm guest and its host calls)
    /// from sidecar start to the Ack.
    pub sim_worker_cpu_secs: f64,
    /// CPU of this process's tokio threads over the same time (the sim's gRPC
    /// bridge, the poll loop).
    pub bench_runtime_cpu_secs: f64,
    /// consentd's CPU over the same time.
    pub consentd_cpu_secs: f64,
    pub native: NativeBootstrap,
    pub notes: Vec<String>,
}

impl BootstrapReport {
    /// All shared data (keys and values, layout overhead included) per grant.
    pub fn bytes_per_grant(&self) -> f64 {
        (self.key_bytes + self.value_bytes) as f64 / self.grants.max(1) as f64
    }

    /// Values only, per grant.
    pub fn value_bytes_per_grant(&self) -> f64 {
        self.value_bytes as f64 / self.grants.max(1) as f64
    }
}

/// Seeds `grants` grants, then bootstraps one real-filter sidecar.
pub async fn run(grants: usize) -> anyhow::Result<BootstrapReport> {
    anyhow::ensure!(grants > 0, "bootstrap of no grants measures nothing");
    let (clk_tck, tck_note) = clk_tck();
    let wasm = mesh::filter_wasm()?;
    let consentd = ConsentdProcess::start(Some(HEARTBEAT_MS)).await?;

    let seed_started = Instant::now();
    let (seeded, seed_rates) = seed(&consentd, grants).await?;
    let seed_secs = seed_started.elapsed().as_secs_f64();
    let head = seeded.iter().map(|g| g.revision).max().unwrap_or(0);

    let mut admin = consentd.admin().await?;
    let me = std::process::id();
    let threads_before = thread_ticks(me);
    let consentd_before = ProcSample::take(consentd.pid)?;
    let started = Instant::now();
    let sidecar = Sidecar::start(sidecar_config(&consentd, wasm)?).await?;
    let vm_start_secs = started.elapsed().as_secs_f64();

    let mut first_tick = None;
    let bootstrap_secs = loop {
        if first_tick.is_none() && sidecar.shared_data_get(&format!("{PREFIX}lease")).is_some() {
            first_tick = Some(started.elapsed().as_secs_f64());
        }
        if meta(&sidecar).is_some_and(|m| m.revision >= head) {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > WAIT {
            bail!(
                "the filter did not apply revision {head} within {WAIT:?}; its last logs: {:?}",
                sidecar
                    .logs()
                    .iter()
                    .rev()
                    .take(5)
                    .map(|l| l.message.clone())
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let propagation = admin
        .wait_propagation(v1::PropagationRequest {
            revision: head,
            datasets: vec![DATASET.into()],
            timeout_ms: WAIT.as_millis() as u32,
        })
        .await
        .context("WaitPropagation")?
        .into_inner();
    let acked_secs = started.elapsed().as_secs_f64();
    if !propagation.complete {
        bail!("consentd never saw the sidecar acknowledge revision {head}");
    }
    let consentd_after = ProcSample::take(consentd.pid)?;
    let threads_after = thread_ticks(me);
    let cpu_of = |prefix: &str| {
        let sum = |m: &std::collections::BTreeMap<String, (usize, u64)>| -> u64 {
            m.iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .map(|(_, (_, t))| *t)
                .sum()
        };
        ticks_secs(
            sum(&threads_after).saturating_sub(sum(&threads_before)),
            clk_tck,
        )
    };
    let sim_worker_cpu_secs = cpu_of("sim-worker");
    let bench_runtime_cpu_secs = cpu_of("tokio-runtime");

    let usage = sidecar.shared_data_usage();
    let parts = layout(&sidecar, &seeded, usage);
    sidecar.stop();

    let native = native_bootstrap(&consentd, head).await?;
    let notes = vec![
        format!(
            "consentd's database on {}; {grants} grants on one dataset, one per subject, \
             8 grantees, server-allocated ids",
            if consentd.db_on_tmpfs {
                "tmpfs (/dev/shm)"
            } else {
                "the default temp dir"
            }
        ),
        "the sidecar runs the example plugin configuration (consent_sim::mesh::plugin_config: \
         2 workers, tick_ms 100, so the stream opens on the first tick up to 100 ms after start) \
         plus the sidecar bearer credential"
            .into(),
        format!("CPU from /proc stat at {clk_tck} ticks/s ({tck_note})"),
    ];
    Ok(BootstrapReport {
        grants,
        head_revision: head,
        seed_secs,
        seed_rates,
        vm_start_secs,
        first_tick_secs: first_tick,
        bootstrap_secs,
        acked_secs,
        entries: usage.entries,
        key_bytes: usage.key_bytes,
        value_bytes: usage.value_bytes,
        parts,
        sim_worker_cpu_secs,
        bench_runtime_cpu_secs,
        consentd_cpu_secs: ticks_secs(
            consentd_after
                .cpu_ticks
                .saturating_sub(consentd_before.cpu_ticks),
            clk_tck,
        ),
        native,
        notes,
    })
}

/// Creates `grants` grants with concurrent CreateGrant calls over a few
/// connections; returns them as created, and the throughput of each tenth.
async fn seed(
    consentd: &ConsentdProcess,
    grants: usize,
) -> anyhow::Result<(Vec<v1::Grant>, Vec<f64>)> {
    let mut clients = Vec::with_capacity(SEED_CHANNELS);
    for _ in 0..SEED_CHANNELS {
        clients.push(consentd.admin().await?);
    }
    let mut created = Vec::with_capacity(grants);
    let tenth = grants.div_ceil(10);
    let (mut rates, mut mark) = (Vec::new(), Instant::now());
    let mut calls = futures::stream::iter(0..grants)
        .map(|i| {
            let mut client = clients[i % SEED_CHANNELS].clone();
            async move {
                let request = grant_request(&format!("patient-{i:06}"), i);
                client.create_grant(request).await
            }
        })
        .buffer_unordered(SEED_IN_FLIGHT);
    while let Some(response) = calls.next().await {
        let grant = response
            .context("CreateGrant while seeding")?
            .into_inner()
            .grant
            .context("CreateGrant returned no grant")?;
        created.push(grant);
        if created.len() % tenth == 0 || created.len() == grants {
            let done = (created.len() - 1) % tenth + 1;
            rates.push(done as f64 / mark.elapsed().as_secs_f64());
            mark = Instant::now();
        }
    }
    Ok((created, rates))
}

/// The example operator configuration (`mesh::plugin_config`) with the
/// sidecar credential consentd requires.
fn sidecar_config(
    consentd: &ConsentdProcess,
    wasm: std::path::PathBuf,
) -> anyhow::Result<SidecarConfig> {
    let node = "bench-bootstrap";
    let mut plugin: serde_json::Value =
        serde_json::from_str(&mesh::plugin_config(node, &[DATASET], 30, false))?;
    plugin["control_plane"]["credential"] = SIDECAR_TOKEN.into();
    Ok(SidecarConfig {
        plugin_config: plugin.to_string(),
        root_id: ROOT_ID.into(),
        plugin_name: ROOT_ID.into(),
        node_id: node.into(),
        workers: 2,
        clusters: vec![(mesh::CONTROL_PLANE_CLUSTER.into(), consentd.url())],
        clock: SimClock::new(),
        ..SidecarConfig::new(Wasm::Path(wasm))
    })
}

/// The fields of the filter's `meta` value the benchmark reads; the layout is
/// `Meta::encode` in `filter/src/store.rs` (72 bytes, little-endian).
struct Meta {
    generation: u32,
    revision: u64,
    id_chunks: u32,
}

fn meta(sidecar: &Sidecar) -> Option<Meta> {
    let (bytes, _) = sidecar.shared_data_get(&format!("{PREFIX}meta"))?;
    if bytes.len() != 72 {
        return None;
    }
    let u32_at = |i: usize| Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
    let u64_at = |i: usize| Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
    Some(Meta {
        generation: u32_at(0)?,
        revision: u64_at(4)?,
        id_chunks: u32_at(28)?,
    })
}

/// Splits the shared-data usage by part of the filter's layout, reading the
/// keys the filter writes for the grants it holds.
fn layout(
    sidecar: &Sidecar,
    grants: &[v1::Grant],
    usage: consent_sim::SharedDataUsage,
) -> Vec<SharedDataPart> {
    let Some(meta) = meta(sidecar) else {
        return Vec::new();
    };
    let g = meta.generation;
    let part = |name, keys: &mut dyn Iterator<Item = String>| {
        let mut p = SharedDataPart {
            name,
            entries: 0,
            key_bytes: 0,
            value_bytes: 0,
        };
        for key in keys {
            if let Some((value, _)) = sidecar.shared_data_get(&key) {
                p.entries += 1;
                p.key_bytes += key.len();
                p.value_bytes += value.len();
            }
        }
        p
    };
    let grant_keys = part(
        "grants",
        &mut grants.iter().map(|gr| format!("{PREFIX}g{g}/{}", gr.id)),
    );
    // One grant per (grantee, subject) here, so one pair key per grant.
    let pair_keys = part(
        "pairs",
        &mut grants
            .iter()
            .map(|gr| format!("{PREFIX}p{g}/{}\0{}", gr.grantee, gr.subject)),
    );
    let id_lists = part(
        "id lists",
        &mut (0..meta.id_chunks).map(|n| format!("{PREFIX}i{g}/{n}")),
    );
    let known = [&grant_keys, &pair_keys, &id_lists];
    let other = SharedDataPart {
        name: "other",
        entries: usage.entries - known.iter().map(|p| p.entries).sum::<usize>(),
        key_bytes: usage.key_bytes - known.iter().map(|p| p.key_bytes).sum::<usize>(),
        value_bytes: usage.value_bytes - known.iter().map(|p| p.value_bytes).sum::<usize>(),
    };
    vec![grant_keys, pair_keys, id_lists, other]
}

/// A native client receives and applies the same snapshot (diagnostic).
async fn native_bootstrap(
    consentd: &ConsentdProcess,
    head: u64,
) -> anyhow::Result<NativeBootstrap> {
    let started = Instant::now();
    let mut sidecar =
        EmulatedSidecar::connect(&consentd.url(), 0, "bench-bootstrap-native", &[DATASET]).await?;
    let (mut first_chunk, mut chunks) = (None, 0);
    loop {
        let Some(msg) = tokio::time::timeout(WAIT, sidecar.next())
            .await
            .context("no snapshot in time")??
        else {
            bail!("the stream ended before the snapshot");
        };
        let is_chunk = matches!(msg, v1::control_message::Msg::Snapshot(_));
        if is_chunk {
            chunks += 1;
            first_chunk.get_or_insert_with(|| started.elapsed().as_secs_f64());
        }
        let received_secs = started.elapsed().as_secs_f64();
        match sidecar.apply(msg) {
            Ok(Some(ack)) if ack.revision >= head => {
                sidecar.send(v1::sidecar_message::Msg::Ack(ack)).await?;
                return Ok(NativeBootstrap {
                    first_chunk_secs: first_chunk.unwrap_or(received_secs),
                    received_secs,
                    applied_secs: started.elapsed().as_secs_f64(),
                    chunks,
                });
            }
            Ok(_) => {}
            Err(e) => bail!("the native client refused the snapshot: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real consentd with 50 grants and the real filter in consent-sim.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_grants_bootstrap_into_the_real_filter() {
        let report = run(50).await.expect("the bootstrap benchmark runs");
        assert_eq!(report.grants, 50);
        assert_eq!(report.seed_rates.len(), 10, "{report:?}");
        assert!(report.seed_rates.iter().all(|r| *r > 0.0), "{report:?}");
        assert!(report.head_revision >= 51, "{report:?}");
        assert!(report.vm_start_secs > 0.0);
        assert!(report.bootstrap_secs >= report.vm_start_secs, "{report:?}");
        assert!(report.acked_secs >= report.bootstrap_secs, "{report:?}");
        assert!(report.bytes_per_grant() > report.value_bytes_per_grant());
        assert!(report.value_bytes_per_grant() > 0.0);
        let grants = report.parts.iter().find(|p| p.name == "grants").unwrap();
        assert_eq!(grants.entries, 50, "{report:?}");
        let sum: usize = report.parts.iter().map(|p| p.entries).sum();
        assert_eq!(sum, report.entries);
        assert!(report.native.chunks >= 1 && report.native.applied_secs > 0.0);
    }
}
