//! The state the services share: the store, the head revision (watched by every
//! stream), the sidecar registry with recent acknowledgements (watched by
//! propagation waits), metrics and the shutdown signal.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consent_core::wire::v1;
use tokio::sync::{OnceCell, watch};

use crate::metrics::Metrics;
use crate::store::{Changes, Commit, Result, SidecarRecord, Store, StoreError, now_ms};

/// Recent acknowledgements kept per sidecar, to tell when it reached a revision.
const ACK_HISTORY: usize = 512;
/// Revision ranges whose changes are kept for the streams that still need them.
/// Streams following the head mostly ask for the same one or two ranges.
const SHARED_RANGES: usize = 32;

/// One read of a revision range, shared by the streams asking for it.
type SharedChanges = Arc<OnceCell<Arc<Changes>>>;

/// The tunables of the sync stream and the admin API.
#[derive(Clone, Debug)]
pub struct Settings {
    pub heartbeat: Duration,
    pub ack_timeout: Duration,
    pub hello_timeout: Duration,
    pub snapshot_chunk: usize,
    pub max_token_ttl_secs: i64,
    pub token_tolerance_secs: i64,
    pub issuer: String,
    pub max_wait: Duration,
    pub limits: consent_core::Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            snapshot_chunk: 500,
            max_token_ttl_secs: 900,
            token_tolerance_secs: 60,
            issuer: "consentd".into(),
            max_wait: Duration::from_secs(60),
            limits: consent_core::Limits::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SidecarState {
    pub record: SidecarRecord,
    /// The stream holding this node id; a newer stream replaces an older one.
    pub stream: u64,
    pub acks: VecDeque<(u64, i64)>,
}

pub struct Hub {
    pub store: Arc<dyn Store>,
    pub settings: Settings,
    pub head: watch::Sender<u64>,
    /// Bumped on every acknowledgement, connection and disconnection.
    pub acks: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    pub sidecars: Mutex<HashMap<String, SidecarState>>,
    pub metrics: Metrics,
    next_stream: std::sync::atomic::AtomicU64,
    /// Recently read `(from, to]` ranges keyed by `(to, from)`, oldest first.
    ranges: Mutex<BTreeMap<(u64, u64), SharedChanges>>,
    /// Sidecar records to persist, written in order by one thread so that a
    /// disconnect is never overwritten by the connect before it.
    persist: std::sync::mpsc::Sender<SidecarRecord>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("head", &*self.head.borrow())
            .finish_non_exhaustive()
    }
}

/// Runs a blocking store call off the async runtime.
pub async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(StoreError::internal)?
}

fn intersects(a: &[String], b: &BTreeSet<String>) -> bool {
    b.is_empty() || a.iter().any(|d| b.contains(d))
}

impl Hub {
    /// Loads the head and the known sidecars (all disconnected: no stream survives a restart).
    pub fn open(store: Arc<dyn Store>, settings: Settings) -> Result<Arc<Hub>> {
        let head = store.head()?;
        let now = now_ms();
        let mut sidecars = HashMap::new();
        for mut record in store.sidecars()? {
            if record.connected {
                record.connected = false;
                record.since_ms = now;
                store.save_sidecar(&record)?;
            }
            let acks = VecDeque::from([(record.acked_revision, record.acked_at_ms)]);
            sidecars.insert(
                record.node_id.clone(),
                SidecarState {
                    record,
                    stream: 0,
                    acks,
                },
            );
        }
        let (persist, queue) = std::sync::mpsc::channel::<SidecarRecord>();
        let writer = store.clone();
        std::thread::Builder::new()
            .name("consentd-sidecars".into())
            .spawn(move || {
                // Ends when the hub, and with it the sender, is dropped.
                while let Ok(record) = queue.recv() {
                    // Sidecar bookkeeping is advisory: a failure is logged, never fatal to a stream.
                    if let Err(e) = writer.save_sidecar(&record) {
                        tracing::warn!(node = %record.node_id, "cannot record sidecar: {e}");
                    }
                }
            })
            .map_err(StoreError::internal)?;
        Ok(Arc::new(Hub {
            persist,
            store,
            settings,
            head: watch::Sender::new(head),
            acks: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            sidecars: Mutex::new(sidecars),
            metrics: Metrics::default(),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            ranges: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Publishes a commit to every stream. Writes finish out of order across
    /// tasks, so the head only ever moves forward.
    pub fn committed(&self, commit: &Commit) {
        self.head.send_if_modified(|h| {
            let moved = commit.revision > *h;
            *h = (*h).max(commit.revision);
            moved
        });
    }

    /// The changes in `(from, to]`, read from the store once however many
    /// streams ask for the same range at once: the first reads, the others
    /// wait for its result. A committed range never changes, so a result is
    /// kept for later askers until newer ranges evict it; a failed read is not
    /// kept, and the next asker tries again.
    pub async fn changes(&self, from: u64, to: u64) -> Result<Arc<Changes>> {
        let cell = {
            let mut ranges = self.ranges.lock().expect("ranges");
            let cell = ranges.entry((to, from)).or_default().clone();
            while ranges.len() > SHARED_RANGES {
                ranges.pop_first();
            }
            cell
        };
        cell.get_or_try_init(|| async {
            blocking(&self.store, move |s| s.changes(from, to))
                .await
                .map(Arc::new)
        })
        .await
        .cloned()
    }

    fn bump_acks(&self) {
        self.acks.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn persist(&self, record: SidecarRecord) {
        let _ = self.persist.send(record);
    }

    pub fn connect(&self, hello: &v1::Hello, datasets: &BTreeSet<String>) -> u64 {
        let stream = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = now_ms();
        let record = {
            let mut map = self.sidecars.lock().expect("sidecars");
            let entry = map
                .entry(hello.node_id.clone())
                .or_insert_with(|| SidecarState {
                    record: SidecarRecord {
                        node_id: hello.node_id.clone(),
                        ..Default::default()
                    },
                    stream,
                    acks: VecDeque::new(),
                });
            entry.stream = stream;
            entry.record.datasets = datasets.iter().cloned().collect();
            entry.record.connected = true;
            entry.record.since_ms = now;
            entry.record.filter_version = hello.filter_version.clone();
            entry.record.clone()
        };
        self.persist(record);
        self.bump_acks();
        stream
    }

    pub fn disconnect(&self, node_id: &str, stream: u64) {
        let record = {
            let mut map = self.sidecars.lock().expect("sidecars");
            match map.get_mut(node_id) {
                Some(s) if s.stream == stream => {
                    s.record.connected = false;
                    s.record.since_ms = now_ms();
                    s.stream = 0;
                    Some(s.record.clone())
                }
                _ => None,
            }
        };
        if let Some(record) = record {
            self.persist(record);
            self.bump_acks();
        }
    }

    pub fn ack(&self, node_id: &str, stream: u64, revision: u64) {
        let now = now_ms();
        let record = {
            let mut map = self.sidecars.lock().expect("sidecars");
            match map.get_mut(node_id) {
                Some(s) if s.stream == stream && revision > s.record.acked_revision => {
                    s.record.acked_revision = revision;
                    s.record.acked_at_ms = now;
                    s.acks.push_back((revision, now));
                    if s.acks.len() > ACK_HISTORY {
                        s.acks.pop_front();
                    }
                    Some(s.record.clone())
                }
                _ => None,
            }
        };
        if let Some(record) = record {
            self.persist(record);
            self.bump_acks();
        }
    }

    pub fn list_sidecars(&self) -> Vec<SidecarRecord> {
        let map = self.sidecars.lock().expect("sidecars");
        let mut out: Vec<_> = map.values().map(|s| s.record.clone()).collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Whether `propagation(revision, datasets, committed_ms).complete` holds,
    /// by the same rules, without allocating or sorting: cheap enough to check
    /// on every acknowledgement.
    pub fn is_propagated(
        &self,
        revision: u64,
        datasets: &BTreeSet<String>,
        committed_ms: i64,
    ) -> bool {
        let map = self.sidecars.lock().expect("sidecars");
        for s in map.values() {
            if !intersects(&s.record.datasets, datasets) {
                continue;
            }
            if !s.record.connected && s.record.since_ms < committed_ms {
                continue;
            }
            if s.record.connected && s.record.acked_revision < revision {
                return false;
            }
        }
        true
    }

    /// Who has acknowledged `revision` among the sidecars subscribed to any of
    /// `datasets` (all when empty): every connected one, and those that
    /// disconnected after it committed, since they may hold the state before it.
    pub fn propagation(
        &self,
        revision: u64,
        datasets: &BTreeSet<String>,
        committed_ms: i64,
    ) -> v1::PropagationResponse {
        let map = self.sidecars.lock().expect("sidecars");
        let mut sidecars = Vec::new();
        let mut complete = true;
        let mut ids: Vec<&String> = map.keys().collect();
        ids.sort();
        for id in ids {
            let s = &map[id];
            if !intersects(&s.record.datasets, datasets) {
                continue;
            }
            if !s.record.connected && s.record.since_ms < committed_ms {
                continue;
            }
            let acknowledged = s.record.acked_revision >= revision;
            let acked_at_ms = if acknowledged {
                s.acks
                    .iter()
                    .find(|(r, _)| *r >= revision)
                    .map(|(_, t)| *t)
                    .unwrap_or(s.record.acked_at_ms)
            } else {
                0
            };
            if s.record.connected && !acknowledged {
                complete = false;
            }
            sidecars.push(v1::SidecarAck {
                node_id: s.record.node_id.clone(),
                acknowledged,
                acked_revision: s.record.acked_revision,
                acked_at_ms,
                latency_ms: if acknowledged {
                    (acked_at_ms - committed_ms).max(0)
                } else {
                    0
                },
                connected: s.record.connected,
            });
        }
        v1::PropagationResponse {
            revision,
            complete,
            sidecars,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn hub(dir: &tempfile::TempDir) -> Arc<Hub> {
        let store = SqliteStore::open(dir.path().join("consentd.db")).unwrap();
        Hub::open(Arc::new(store), Settings::default()).unwrap()
    }

    fn put(hub: &Hub, node: &str, datasets: &[&str], acked: u64, connected: bool, since: i64) {
        let record = SidecarRecord {
            node_id: node.into(),
            datasets: datasets.iter().map(|d| d.to_string()).collect(),
            acked_revision: acked,
            acked_at_ms: 1_000 + acked as i64,
            connected,
            since_ms: since,
            filter_version: String::new(),
        };
        let acks = VecDeque::from([(acked, record.acked_at_ms)]);
        hub.sidecars.lock().unwrap().insert(
            node.into(),
            SidecarState {
                record,
                stream: 1,
                acks,
            },
        );
    }

    #[test]
    fn is_propagated_agrees_with_propagation() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        let labs: BTreeSet<String> = ["labs".to_string()].into();
        let billing: BTreeSet<String> = ["billing".to_string()].into();
        let all = BTreeSet::new();
        let committed = 500;
        let check = |revision: u64, datasets: &BTreeSet<String>| {
            let full = hub.propagation(revision, datasets, committed).complete;
            assert_eq!(
                hub.is_propagated(revision, datasets, committed),
                full,
                "revision {revision}, datasets {datasets:?}"
            );
            full
        };
        // No sidecars: trivially complete.
        assert!(check(7, &all));
        put(&hub, "a", &["labs"], 7, true, 0);
        put(&hub, "b", &["billing"], 6, true, 0);
        assert!(check(7, &labs));
        assert!(!check(7, &billing));
        assert!(!check(7, &all));
        assert!(check(6, &all));
        // Disconnected sidecars never hold a propagation back, before or after the commit.
        put(&hub, "b", &["billing"], 6, false, 400);
        assert!(check(7, &billing));
        assert!(check(7, &all));
        put(&hub, "b", &["billing"], 6, false, 600);
        assert!(check(7, &all));
        // A connected one behind on a dataset in both sets holds it back.
        put(&hub, "c", &["labs", "billing"], 5, true, 0);
        assert!(!check(7, &labs));
        assert!(!check(7, &billing));
        assert!(!check(6, &all));
        assert!(check(5, &all));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_share_one_read_of_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let hub = hub(&dir);
        let reads: Vec<_> = (0..16)
            .map(|_| {
                let hub = hub.clone();
                tokio::spawn(async move { hub.changes(0, 0).await.unwrap() })
            })
            .collect();
        let mut shared = Vec::new();
        for r in reads {
            shared.push(r.await.unwrap());
        }
        assert!(shared.iter().all(|c| Arc::ptr_eq(c, &shared[0])));
        // Later askers for the same range get it too; older ranges are evicted.
        assert!(Arc::ptr_eq(&hub.changes(0, 0).await.unwrap(), &shared[0]));
        for to in 1..=SHARED_RANGES as u64 {
            hub.changes(0, to).await.unwrap();
        }
        assert_eq!(hub.ranges.lock().unwrap().len(), SHARED_RANGES);
        assert!(!Arc::ptr_eq(&hub.changes(0, 0).await.unwrap(), &shared[0]));
    }
}
