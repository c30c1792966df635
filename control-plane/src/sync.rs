//! The SidecarSync stream: one task per sidecar. After the Hello it sends a
//! chunked snapshot when the sidecar cannot resume, else the deltas since its
//! revision, then follows the head: at most one push waits for an
//! acknowledgement, later changes are coalesced into the next delta, and a
//! sidecar that stops acknowledging (or reading) is disconnected.

use std::collections::BTreeSet;
use std::sync::Arc;

use consent_core::grant::{check_id, check_name};
use consent_core::wire::v1;
use consent_core::wire::v1::{control_message, sidecar_message};
use consent_core::{Digest, Grant};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::hub::{Hub, blocking};
use crate::proto::sidecar_sync_server::SidecarSync;
use crate::status::invalid;
use crate::store::now_ms;

/// Messages queued toward one sidecar. With at most one unacknowledged push,
/// this bounds a stream's memory to a few chunks and heartbeats.
const OUTBOX: usize = 8;
/// Most datasets one sidecar may subscribe to.
const MAX_DATASETS: usize = 1024;
/// Most decision events in one batch.
const MAX_EVENTS: usize = 10_000;

type Outbox = mpsc::Sender<Result<v1::ControlMessage, Status>>;

#[derive(Debug)]
pub struct SyncService {
    hub: Arc<Hub>,
}

impl SyncService {
    pub fn new(hub: Arc<Hub>) -> Self {
        SyncService { hub }
    }
}

#[tonic::async_trait]
impl SidecarSync for SyncService {
    type StreamStream = ReceiverStream<Result<v1::ControlMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<v1::SidecarMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOX);
        let hub = self.hub.clone();
        tokio::spawn(async move {
            if let Err(status) = run(hub, inbound, &tx).await {
                if status.code() != tonic::Code::Cancelled {
                    tracing::info!(code = ?status.code(), "sync stream ends: {}", status.message());
                }
                let _ = tx.try_send(Err(status));
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

pub fn in_view(grant: &Grant, datasets: &BTreeSet<String>) -> bool {
    grant.datasets.iter().any(|d| datasets.contains(d))
}

fn check_hello(hello: &v1::Hello) -> Result<BTreeSet<String>, Status> {
    check_id("hello.node_id", &hello.node_id).map_err(|e| invalid(e.field, e.problem))?;
    if hello.datasets.is_empty() {
        return Err(invalid("hello.datasets", "must name at least one dataset"));
    }
    if hello.datasets.len() > MAX_DATASETS {
        return Err(invalid(
            "hello.datasets",
            format!("more than {MAX_DATASETS}"),
        ));
    }
    for d in &hello.datasets {
        check_name("hello.datasets", d).map_err(|e| invalid(e.field, e.problem))?;
    }
    if !hello.snapshot_digest.is_empty() && Digest::from_bytes(&hello.snapshot_digest).is_none() {
        return Err(invalid("hello.snapshot_digest", "must be 32 bytes"));
    }
    Ok(hello.datasets.iter().cloned().collect())
}

async fn run(
    hub: Arc<Hub>,
    mut inbound: Streaming<v1::SidecarMessage>,
    tx: &Outbox,
) -> Result<(), Status> {
    let first = tokio::time::timeout(hub.settings.hello_timeout, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Hello in time"))??;
    let hello = match first {
        None => return Ok(()),
        Some(v1::SidecarMessage {
            msg: Some(sidecar_message::Msg::Hello(h)),
        }) => h,
        Some(_) => return Err(invalid("hello", "the first message must be a Hello")),
    };
    let datasets = check_hello(&hello)?;
    let stream = hub.connect(&hello, &datasets);
    tracing::info!(node = %hello.node_id, ?datasets, resume = hello.resume_from_revision, "sidecar connected");
    let mut session = Session {
        hub: hub.clone(),
        tx: tx.clone(),
        node_id: hello.node_id.clone(),
        stream,
        datasets,
        sent: 0,
        digest: Digest::EMPTY,
        inflight: None,
    };
    let result = session.run(&mut inbound, &hello).await;
    hub.disconnect(&hello.node_id, stream);
    tracing::info!(node = %hello.node_id, "sidecar disconnected");
    result
}

struct Session {
    hub: Arc<Hub>,
    tx: Outbox,
    node_id: String,
    stream: u64,
    datasets: BTreeSet<String>,
    /// The revision of the last push: what the sidecar holds once it applies it.
    sent: u64,
    /// The digest of the sidecar's view at `sent`.
    digest: Digest,
    /// The push waiting for an acknowledgement, and when it was sent.
    inflight: Option<(u64, Instant)>,
}

impl Session {
    async fn run(
        &mut self,
        inbound: &mut Streaming<v1::SidecarMessage>,
        hello: &v1::Hello,
    ) -> Result<(), Status> {
        let mut head_rx = self.hub.head.subscribe();
        let mut shutdown = self.hub.shutdown.subscribe();
        head_rx.borrow_and_update();
        self.start(hello).await?;
        let period = self.hub.settings.heartbeat;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self
                .inflight
                .map(|(_, at)| at + self.hub.settings.ack_timeout);
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(m)) => self.on_message(m).await?,
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(Status::cancelled(format!("sidecar stream failed: {status}"))),
                },
                changed = head_rx.changed(), if self.inflight.is_none() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("consentd is shutting down"));
                    }
                    let head = *head_rx.borrow_and_update();
                    self.follow(head).await?;
                }
                _ = heartbeat.tick() => self.heartbeat()?,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let revision = self.inflight.map(|(r, _)| r).unwrap_or_default();
                    return Err(Status::deadline_exceeded(format!(
                        "revision {revision} not acknowledged within {:?}", self.hub.settings.ack_timeout
                    )));
                }
                _ = shutdown.changed() => return Err(Status::unavailable("consentd is shutting down")),
                _ = self.tx.closed() => return Ok(()),
            }
        }
    }

    /// Resumes from the sidecar's revision when the log still holds it and the
    /// digests agree; otherwise sends a snapshot.
    async fn start(&mut self, hello: &v1::Hello) -> Result<(), Status> {
        let head = self.hub.head();
        let resume = hello.resume_from_revision;
        let why = match Digest::from_bytes(&hello.snapshot_digest) {
            _ if resume == 0 => "the sidecar holds nothing",
            _ if resume > head => "the sidecar's revision is unknown",
            None => "the sidecar sent no digest",
            Some(theirs) => {
                let datasets = self.datasets.clone();
                let ours = blocking(&self.hub.store, move |s| {
                    if resume < s.floor()? {
                        return Ok(None);
                    }
                    let view = s.view(resume)?;
                    Ok(Some(Digest::of(
                        view.iter().filter(|g| in_view(g, &datasets)),
                    )))
                })
                .await?;
                match ours {
                    None => "the log no longer holds the sidecar's revision",
                    Some(ours) if ours != theirs => "the sidecar's digest does not match",
                    Some(_) => {
                        self.sent = resume;
                        self.digest = theirs;
                        if head > resume {
                            self.push_delta(head).await?;
                        } else {
                            // It already holds the head, as its digest proves.
                            self.hub.ack(&self.node_id, self.stream, resume);
                        }
                        return Ok(());
                    }
                }
            }
        };
        tracing::info!(node = %self.node_id, resume, head, "sending a snapshot: {why}");
        self.push_snapshot(head).await
    }

    async fn follow(&mut self, head: u64) -> Result<(), Status> {
        if self.inflight.is_none() && head > self.sent {
            self.push_delta(head).await?;
        }
        Ok(())
    }

    async fn send(&self, msg: control_message::Msg) -> Result<(), Status> {
        let message = v1::ControlMessage { msg: Some(msg) };
        match tokio::time::timeout(self.hub.settings.ack_timeout, self.tx.send(Ok(message))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Status::cancelled("the sidecar went away")),
            Err(_) => Err(Status::deadline_exceeded("the sidecar stopped reading")),
        }
    }

    fn heartbeat(&self) -> Result<(), Status> {
        let beat = v1::Heartbeat {
            revision: self.hub.head(),
            server_time_ms: now_ms(),
        };
        let message = v1::ControlMessage {
            msg: Some(control_message::Msg::Heartbeat(beat)),
        };
        match self.tx.try_send(Ok(message)) {
            // A full outbox means the sidecar is slow; the ack deadline deals with that.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Status::cancelled("the sidecar went away"))
            }
        }
    }

    async fn push_snapshot(&mut self, head: u64) -> Result<(), Status> {
        let datasets = self.datasets.clone();
        let (grants, keys) = blocking(&self.hub.store, move |s| {
            let grants: Vec<Grant> = s
                .view(head)?
                .into_iter()
                .filter(|g| in_view(g, &datasets))
                .collect();
            Ok((grants, s.key_set(head)?))
        })
        .await?;
        let digest = Digest::of(&grants);
        let size = self.hub.settings.snapshot_chunk.max(1);
        let total = grants.len().div_ceil(size).max(1);
        let mut chunks = grants.chunks(size);
        for index in 0..total {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = index + 1 == total;
            self.send(control_message::Msg::Snapshot(v1::SnapshotChunk {
                revision: head,
                index: index as u32,
                total: total as u32,
                grants: chunk.iter().map(v1::Grant::from).collect(),
                keys: last.then(|| v1::KeySet::from(&keys)),
                digest: if last {
                    digest.to_bytes().to_vec()
                } else {
                    Vec::new()
                },
            }))
            .await?;
        }
        self.sent = head;
        self.digest = digest;
        self.inflight = Some((head, Instant::now()));
        Ok(())
    }

    async fn push_delta(&mut self, to: u64) -> Result<(), Status> {
        let from = self.sent;
        // Shared with every other stream moving over the same range.
        let changes = self.hub.changes(from, to).await?;
        let mut digest = self.digest;
        let (mut upserts, mut removals) = (Vec::new(), Vec::new());
        for (old, new) in &changes.grants {
            let old = old.as_ref().filter(|g| in_view(g, &self.datasets));
            if let Some(old) = old {
                digest.remove(old);
            }
            if in_view(new, &self.datasets) {
                digest.add(new);
                upserts.push(v1::Grant::from(new));
            } else if old.is_some() {
                removals.push(new.id.clone());
            }
        }
        self.send(control_message::Msg::Delta(v1::Delta {
            from_revision: from,
            to_revision: to,
            upserts,
            removals,
            keys: changes.keys.as_ref().map(v1::KeySet::from),
            digest: digest.to_bytes().to_vec(),
        }))
        .await?;
        self.sent = to;
        self.digest = digest;
        self.inflight = Some((to, Instant::now()));
        Ok(())
    }

    async fn on_message(&mut self, message: v1::SidecarMessage) -> Result<(), Status> {
        match message.msg {
            Some(sidecar_message::Msg::Ack(ack)) => {
                if ack.revision > self.sent {
                    return Err(invalid(
                        "ack.revision",
                        format!("{} was never sent", ack.revision),
                    ));
                }
                if ack.revision == self.sent
                    && !ack.digest.is_empty()
                    && Digest::from_bytes(&ack.digest) != Some(self.digest)
                {
                    tracing::warn!(node = %self.node_id, revision = ack.revision, "acknowledged digest differs; resending a snapshot");
                    return self.push_snapshot(self.hub.head()).await;
                }
                if self.inflight.is_some_and(|(r, _)| r == ack.revision) {
                    self.inflight = None;
                }
                self.hub.ack(&self.node_id, self.stream, ack.revision);
                self.follow(self.hub.head()).await
            }
            Some(sidecar_message::Msg::Nack(nack)) => {
                tracing::warn!(node = %self.node_id, revision = nack.revision, error = %nack.error, "sidecar refused an update; resending a snapshot");
                self.push_snapshot(self.hub.head()).await
            }
            Some(sidecar_message::Msg::Events(batch)) => self.record_events(batch.events).await,
            Some(sidecar_message::Msg::Hello(_)) => {
                Err(invalid("hello", "sent twice on one stream"))
            }
            None => Err(invalid("msg", "empty message")),
        }
    }

    async fn record_events(&self, mut events: Vec<v1::DecisionEvent>) -> Result<(), Status> {
        if events.len() > MAX_EVENTS {
            return Err(invalid(
                "events",
                format!("more than {MAX_EVENTS} in one batch"),
            ));
        }
        for (i, e) in events.iter_mut().enumerate() {
            check_id("event_id", &e.event_id)
                .map_err(|err| invalid(&format!("events[{i}].event_id"), err.problem))?;
            if e.node_id.is_empty() {
                e.node_id = self.node_id.clone();
            }
        }
        let added = blocking(&self.hub.store, move |s| {
            s.append_decisions(&events, now_ms())
        })
        .await?;
        tracing::debug!(node = %self.node_id, added, "decision events recorded");
        Ok(())
    }
}
