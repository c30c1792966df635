//! Sync inside the sidecar: workers elect a leader through a CAS lease in
//! shared data; the leader owns the one gRPC stream to consentd, applies
//! snapshots and deltas with consent-core's rules to the snapshot it holds in
//! memory, writes what changed into shared data, then acknowledges. A gap or
//! an undecodable message is nacked and the stream reopened asking for a full
//! snapshot. Nothing here traps: every failure becomes a reconnect.

use consent_core::wire::v1;
use consent_core::wire::v1::control_message::Msg as ControlMsg;
use consent_core::wire::v1::sidecar_message::Msg as SidecarMsg;
use consent_core::{Applied, Delta, Snapshot, SnapshotAssembler, Update};
use prost::Message;

use crate::audit::Outbox;
use crate::store::{Keys, Meta, SharedData, StoreError, Writer, load, read_meta};

pub const SERVICE: &str = "consent.v1.SidecarSync";
pub const METHOD: &str = "Stream";

/// The host's gRPC stream calls.
pub trait Stream {
    fn open(&mut self, metadata: &[(&str, &[u8])]) -> Result<u32, String>;
    fn send(&mut self, token: u32, message: &[u8]) -> Result<(), String>;
    fn cancel(&mut self, token: u32);
}

/// Settings the state machine needs, taken from the plugin config.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node_id: String,
    pub datasets: Vec<String>,
    pub credential: Option<String>,
    pub lease_ms: i64,
    pub heartbeat_ms: i64,
    pub backoff_initial_ms: i64,
    pub backoff_max_ms: i64,
}

/// Counters for the metrics, drained by the glue after each callback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub reconnects: u64,
    pub nacks: u64,
    pub audit_sent: u64,
    pub audit_dropped: u64,
}

/// The lease value: holder id and expiry, 16 bytes little-endian.
fn lease_bytes(holder: u64, expires_ms: i64) -> Vec<u8> {
    let mut out = holder.to_le_bytes().to_vec();
    out.extend_from_slice(&expires_ms.to_le_bytes());
    out
}

fn parse_lease(bytes: &[u8]) -> Option<(u64, i64)> {
    let holder = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let expires = i64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    Some((holder, expires))
}

/// Takes or renews the lease. Only the holder or, once it has expired,
/// anyone may write it, and only with the CAS it read; so of workers racing
/// for an expired lease exactly one wins.
pub fn try_lease(data: &impl SharedData, keys: &Keys, me: u64, now_ms: i64, lease_ms: i64) -> bool {
    let key = keys.lease();
    let value = lease_bytes(me, now_ms + lease_ms);
    match data.get(&key) {
        // A missing key takes any CAS, so confirm by reading back: of two
        // workers that both saw no lease, the later write wins.
        None => {
            data.set(&key, &value, 0).is_ok() && data.get(&key).is_some_and(|(v, _)| v == value)
        }
        Some((bytes, cas)) => match parse_lease(&bytes) {
            Some((holder, expires)) if holder != me && now_ms < expires => false,
            _ => data.set(&key, &value, cas).is_ok(),
        },
    }
}

struct Open {
    token: u32,
    last_rx_ms: i64,
}

/// What the leader holds: the published meta and the snapshot behind it.
struct Held {
    meta: Option<Meta>,
    snapshot: Snapshot,
}

pub struct Syncer {
    me: u64,
    keys: Keys,
    settings: Settings,
    leader: bool,
    held: Option<Held>,
    assembler: SnapshotAssembler,
    open: Option<Open>,
    next_attempt_ms: i64,
    backoff_ms: i64,
    /// After a nack the next Hello resumes from 0, asking for a full snapshot.
    resync: bool,
    pub outbox: Outbox,
    pub stats: Stats,
}

impl Syncer {
    pub fn new(me: u64, keys: Keys, settings: Settings, outbox: Outbox) -> Self {
        let backoff_ms = settings.backoff_initial_ms;
        Syncer {
            me,
            keys,
            settings,
            leader: false,
            held: None,
            assembler: SnapshotAssembler::default(),
            open: None,
            next_attempt_ms: 0,
            backoff_ms,
            resync: false,
            outbox,
            stats: Stats::default(),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    pub fn stream_token(&self) -> Option<u32> {
        self.open.as_ref().map(|o| o.token)
    }

    /// Runs on every worker's tick. `dequeue` drains the audit queue;
    /// `jitter` is a random number for the backoff.
    pub fn tick(
        &mut self,
        data: &impl SharedData,
        stream: &mut impl Stream,
        dequeue: &mut dyn FnMut() -> Option<Vec<u8>>,
        now_ms: i64,
        jitter: u64,
    ) {
        self.leader = try_lease(data, &self.keys, self.me, now_ms, self.settings.lease_ms);
        if !self.leader {
            // A worker that is not leader touches nothing but the lease.
            if let Some(open) = self.open.take() {
                stream.cancel(open.token);
            }
            self.held = None;
            return;
        }
        if self.held.is_none() {
            self.held = Some(match load(data, &self.keys) {
                Some((meta, snapshot)) => Held {
                    meta: Some(meta),
                    snapshot,
                },
                None => Held {
                    meta: read_meta(data, &self.keys).map(|(m, _)| m),
                    snapshot: Snapshot::new(),
                },
            });
        }
        if let Some(open) = &self.open
            && now_ms - open.last_rx_ms > 3 * self.settings.heartbeat_ms
        {
            // Silent for three heartbeats: the stream is dead even if the host
            // has not said so.
            self.drop_stream(stream, now_ms, jitter);
        }
        if self.open.is_none() && now_ms >= self.next_attempt_ms {
            self.connect(stream, now_ms, jitter);
        }
        self.pump_audit(stream, dequeue, now_ms, jitter);
    }

    fn connect(&mut self, stream: &mut impl Stream, now_ms: i64, jitter: u64) {
        let bearer = self
            .settings
            .credential
            .as_ref()
            .map(|c| format!("Bearer {c}"));
        let metadata: Vec<(&str, &[u8])> = bearer
            .as_ref()
            .map(|b| ("authorization", b.as_bytes()))
            .into_iter()
            .collect();
        let token = match stream.open(&metadata) {
            Ok(token) => token,
            Err(_) => {
                self.schedule_retry(now_ms, jitter);
                return;
            }
        };
        self.open = Some(Open {
            token,
            last_rx_ms: now_ms,
        });
        self.assembler = SnapshotAssembler::default();
        let (revision, digest) = match (&self.held, self.resync) {
            (Some(h), false) if h.snapshot.is_synced() => (
                h.snapshot.revision(),
                h.snapshot.digest().to_bytes().to_vec(),
            ),
            _ => (0, Vec::new()),
        };
        let hello = v1::Hello {
            node_id: self.settings.node_id.clone(),
            datasets: self.settings.datasets.clone(),
            resume_from_revision: revision,
            snapshot_digest: digest,
            filter_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.send(stream, SidecarMsg::Hello(hello), now_ms, jitter);
    }

    fn schedule_retry(&mut self, now_ms: i64, jitter: u64) {
        // Full jitter over the upper half, so workers of many sidecars that
        // lost consentd together do not reconnect in step.
        let half = (self.backoff_ms / 2).max(1);
        let delay = half + (jitter % half as u64) as i64;
        self.next_attempt_ms = now_ms + delay;
        self.backoff_ms = (self.backoff_ms * 2).min(self.settings.backoff_max_ms);
    }

    fn drop_stream(&mut self, stream: &mut impl Stream, now_ms: i64, jitter: u64) {
        if let Some(open) = self.open.take() {
            stream.cancel(open.token);
            self.stats.reconnects += 1;
        }
        self.schedule_retry(now_ms, jitter);
    }

    fn send(
        &mut self,
        stream: &mut impl Stream,
        msg: SidecarMsg,
        now_ms: i64,
        jitter: u64,
    ) -> bool {
        let Some(open) = &self.open else {
            return false;
        };
        let bytes = v1::SidecarMessage { msg: Some(msg) }.encode_to_vec();
        if stream.send(open.token, &bytes).is_err() {
            self.drop_stream(stream, now_ms, jitter);
            return false;
        }
        true
    }

    /// The host closed the stream (or failed to start it).
    pub fn on_close(&mut self, token: u32, now_ms: i64, jitter: u64) {
        if self.open.as_ref().is_some_and(|o| o.token == token) {
            self.open = None;
            self.stats.reconnects += 1;
            self.schedule_retry(now_ms, jitter);
        }
    }

    pub fn on_message(
        &mut self,
        data: &impl SharedData,
        stream: &mut impl Stream,
        token: u32,
        bytes: &[u8],
        now_ms: i64,
        jitter: u64,
    ) {
        match &mut self.open {
            Some(open) if open.token == token => open.last_rx_ms = now_ms,
            _ => return,
        }
        let now = now_ms.div_euclid(1000);
        let result = match v1::ControlMessage::decode(bytes) {
            Err(e) => Err(format!("undecodable control message: {e}")),
            Ok(v1::ControlMessage { msg: None }) => Err("empty control message".to_owned()),
            Ok(v1::ControlMessage { msg: Some(msg) }) => self.apply(data, msg, now),
        };
        match result {
            Ok(Some(ack)) => {
                self.backoff_ms = self.settings.backoff_initial_ms;
                self.resync = false;
                self.send(stream, SidecarMsg::Ack(ack), now_ms, jitter);
            }
            Ok(None) => self.backoff_ms = self.settings.backoff_initial_ms,
            Err(error) => {
                self.stats.nacks += 1;
                let revision = self.held.as_ref().map_or(0, |h| h.snapshot.revision());
                self.send(
                    stream,
                    SidecarMsg::Nack(v1::Nack { revision, error }),
                    now_ms,
                    jitter,
                );
                self.resync = true;
                self.drop_stream(stream, now_ms, jitter);
            }
        }
    }

    /// Applies one control message; `Ok(Some(ack))` when the state advanced
    /// or already held it, `Ok(None)` when nothing needs acknowledging.
    fn apply(
        &mut self,
        data: &impl SharedData,
        msg: ControlMsg,
        now: i64,
    ) -> Result<Option<v1::Ack>, String> {
        let Some(held) = self.held.as_mut() else {
            return Err("not leader".to_owned());
        };
        let writer = Writer {
            data,
            keys: &self.keys,
        };
        let store = |e: StoreError| e.to_string();
        match msg {
            ControlMsg::Heartbeat(_) => {
                if let Some(meta) = held.meta.filter(|_| held.snapshot.is_synced()) {
                    held.meta = Some(writer.touch(meta, now).map_err(store)?);
                    held.snapshot.touch(now);
                }
                Ok(None)
            }
            ControlMsg::Snapshot(chunk) => {
                let chunk = chunk
                    .try_into()
                    .map_err(|e: consent_core::wire::WireError| e.to_string())?;
                let Some(full) = self.assembler.push(chunk).map_err(|e| e.to_string())? else {
                    return Ok(None);
                };
                let before = held.snapshot.clone();
                match held
                    .snapshot
                    .apply(Update::Snapshot(full), now)
                    .map_err(|e| e.to_string())?
                {
                    Applied::Advanced { .. } => {
                        let meta = writer.write_full(held.meta, &before, &held.snapshot, now);
                        held.meta = Some(meta.map_err(store)?);
                    }
                    Applied::Duplicate => {}
                }
                Ok(Some(ack(&held.snapshot)))
            }
            ControlMsg::Delta(delta) => {
                let delta = Delta::try_from(delta).map_err(|e| e.to_string())?;
                let touched: Vec<String> = delta
                    .upserts
                    .iter()
                    .map(|g| g.id.clone())
                    .chain(delta.removals.iter().cloned())
                    .collect();
                let before = held.snapshot.clone();
                match held
                    .snapshot
                    .apply(Update::Delta(delta), now)
                    .map_err(|e| e.to_string())?
                {
                    Applied::Advanced { .. } => {
                        let Some(meta) = held.meta else {
                            return Err("a delta before any snapshot".to_owned());
                        };
                        let meta = writer.write_delta(meta, &before, &held.snapshot, &touched, now);
                        held.meta = Some(meta.map_err(store)?);
                    }
                    Applied::Duplicate => {}
                }
                Ok(Some(ack(&held.snapshot)))
            }
        }
    }

    fn pump_audit(
        &mut self,
        stream: &mut impl Stream,
        dequeue: &mut dyn FnMut() -> Option<Vec<u8>>,
        now_ms: i64,
        jitter: u64,
    ) {
        // Bounded per tick so a flood cannot stall the worker's event loop.
        for _ in 0..10_000 {
            let Some(bytes) = dequeue() else { break };
            self.stats.audit_dropped += self.outbox.push_encoded(&bytes);
        }
        while self.open.is_some() {
            let Some((n, msg)) = self.outbox.next_batch() else {
                break;
            };
            let Some(msg) = msg.msg else { break };
            if !self.send(stream, msg, now_ms, jitter) {
                break;
            }
            self.outbox.sent(n);
            self.stats.audit_sent += n as u64;
        }
    }
}

fn ack(snapshot: &Snapshot) -> v1::Ack {
    v1::Ack {
        revision: snapshot.revision(),
        digest: snapshot.digest().to_bytes().to_vec(),
    }
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
