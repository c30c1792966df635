//! Process-wide state shared by every VM of one sidecar: shared data with CAS,
//! shared queues, metrics and captured logs (proxy-wasm-cpp-host's
//! `shared_data.cc`, `shared_queue.cc`, and Envoy's stats store).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::Sender;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::abi::Status;
use crate::worker::Job;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What one VM id holds in shared data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedDataUsage {
    pub entries: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
}

/// Shared data keyed by (vm_id, key); CAS values come from one counter that
/// starts at 1 and never yields 0.
#[derive(Debug)]
pub struct SharedData {
    inner: Mutex<SharedDataInner>,
}

#[derive(Debug)]
struct SharedDataInner {
    next_cas: u32,
    entries: HashMap<(String, String), (Vec<u8>, u32)>,
}

impl Default for SharedData {
    fn default() -> Self {
        Self {
            inner: Mutex::new(SharedDataInner {
                next_cas: 1,
                entries: HashMap::new(),
            }),
        }
    }
}

impl SharedData {
    pub fn get(&self, vm_id: &str, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.inner)
            .entries
            .get(&(vm_id.to_string(), key.to_string()))
            .cloned()
    }

    /// How much is held under `vm_id`: entries, key bytes, value bytes.
    pub fn usage(&self, vm_id: &str) -> SharedDataUsage {
        let s = lock(&self.inner);
        let mut usage = SharedDataUsage::default();
        for ((vm, key), (value, _)) in &s.entries {
            if vm == vm_id {
                usage.entries += 1;
                usage.key_bytes += key.len();
                usage.value_bytes += value.len();
            }
        }
        usage
    }

    pub fn set(&self, vm_id: &str, key: &str, value: Vec<u8>, cas: u32) -> Result<(), Status> {
        let mut s = lock(&self.inner);
        let k = (vm_id.to_string(), key.to_string());
        if let Some((_, current)) = s.entries.get(&k)
            && cas != 0
            && cas != *current
        {
            return Err(Status::CasMismatch);
        }
        let next = s.next_cas;
        s.next_cas = s.next_cas.wrapping_add(1).max(1);
        s.entries.insert(k, (value, next));
        Ok(())
    }
}

/// Shared queues keyed by (vm_id, name). The last root context to register a
/// queue is the one told about new items, on its own worker.
#[derive(Debug, Default)]
pub struct SharedQueues {
    inner: Mutex<QueuesInner>,
}

#[derive(Debug, Default)]
struct QueuesInner {
    next_token: u32,
    by_name: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Vec<u8>>,
    context_id: u32,
    notify: Sender<Job>,
}

impl SharedQueues {
    pub fn register(&self, vm_id: &str, name: &str, context_id: u32, notify: Sender<Job>) -> u32 {
        let mut s = lock(&self.inner);
        let key = (vm_id.to_string(), name.to_string());
        if let Some(&token) = s.by_name.get(&key) {
            if let Some(q) = s.queues.get_mut(&token) {
                q.context_id = context_id;
                q.notify = notify;
            }
            return token;
        }
        s.next_token = s.next_token.wrapping_add(1).max(1);
        let token = s.next_token;
        s.by_name.insert(key, token);
        s.queues.insert(
            token,
            Queue {
                items: VecDeque::new(),
                context_id,
                notify,
            },
        );
        token
    }

    pub fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        lock(&self.inner)
            .by_name
            .get(&(vm_id.to_string(), name.to_string()))
            .copied()
    }

    pub fn enqueue(&self, token: u32, value: Vec<u8>) -> Result<(), Status> {
        let mut s = lock(&self.inner);
        let q = s.queues.get_mut(&token).ok_or(Status::NotFound)?;
        q.items.push_back(value);
        // A registrant whose worker has gone simply never hears about it.
        let _ = q.notify.send(Job::QueueReady {
            context_id: q.context_id,
            token,
        });
        Ok(())
    }

    pub fn dequeue(&self, token: u32) -> Result<Vec<u8>, Status> {
        let mut s = lock(&self.inner);
        let q = s.queues.get_mut(&token).ok_or(Status::NotFound)?;
        q.items.pop_front().ok_or(Status::Empty)
    }
}

/// The kind of a metric; its number is the low 2 bits of a metric id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

/// One stat as a test sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricValue {
    Counter(u64),
    Gauge(u64),
    /// Every recorded sample, oldest first.
    Histogram(Vec<u64>),
}

impl MetricValue {
    /// The value of a counter or gauge; the number of samples of a histogram.
    pub fn value(&self) -> u64 {
        match self {
            MetricValue::Counter(v) | MetricValue::Gauge(v) => *v,
            MetricValue::Histogram(s) => s.len() as u64,
        }
    }
}

/// Stats by name: every VM that defines the same name shares one stat, as
/// Envoy's stats store does.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<BTreeMap<String, MetricValue>>,
}

impl Metrics {
    pub fn define(&self, kind: MetricKind, name: &str) {
        lock(&self.inner)
            .entry(name.to_string())
            .or_insert(match kind {
                MetricKind::Counter => MetricValue::Counter(0),
                MetricKind::Gauge => MetricValue::Gauge(0),
                MetricKind::Histogram => MetricValue::Histogram(Vec::new()),
            });
    }

    pub fn update(&self, name: &str, f: impl FnOnce(&mut MetricValue)) {
        if let Some(m) = lock(&self.inner).get_mut(name) {
            f(m);
        }
    }

    pub fn get(&self, name: &str) -> Option<MetricValue> {
        lock(&self.inner).get(name).cloned()
    }

    pub fn snapshot(&self) -> BTreeMap<String, MetricValue> {
        lock(&self.inner).clone()
    }
}

/// Log levels of `proxy_log` (spdlog's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }
}

/// A log line written by a guest, through `proxy_log` or WASI stdout/stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
    /// Which VM wrote it: "canary", "main" or "worker N".
    pub vm: String,
}

#[derive(Debug, Default)]
pub struct Logs {
    inner: Mutex<Vec<LogEntry>>,
}

impl Logs {
    pub fn push(&self, entry: LogEntry) {
        tracing::debug!(vm = %entry.vm, level = ?entry.level, "wasm log: {}", entry.message);
        lock(&self.inner).push(entry);
    }

    pub fn snapshot(&self) -> Vec<LogEntry> {
        lock(&self.inner).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_starts_at_one_and_must_match() {
        let d = SharedData::default();
        assert_eq!(d.set("", "k", b"a".to_vec(), 7), Ok(()));
        assert_eq!(d.get("", "k"), Some((b"a".to_vec(), 1)));
        assert_eq!(d.set("", "k", b"b".to_vec(), 7), Err(Status::CasMismatch));
        assert_eq!(d.set("", "k", b"b".to_vec(), 1), Ok(()));
        assert_eq!(d.get("", "k"), Some((b"b".to_vec(), 2)));
        assert_eq!(d.get("other", "k"), None);
    }
}
