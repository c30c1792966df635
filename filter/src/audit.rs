//! Audit: every decision on a protected route becomes a `DecisionEvent`.
//! Workers enqueue encoded events on a shared queue (never blocking); the
//! leader drains it into a bounded outbox and sends batches on the stream.
//! When the outbox is full, events are dropped and counted, never waited on.

use std::collections::VecDeque;

use consent_core::wire::v1;
use consent_core::{Decision, Verdict};
use prost::Message;

use crate::config::Route;
use crate::request::Extracted;

/// Makes event ids unique across workers and restarts of one VM: node id,
/// a random worker id drawn at VM start, and a per-VM counter.
#[derive(Debug)]
pub struct EventIds {
    prefix: String,
    next: u64,
}

impl EventIds {
    pub fn new(node_id: &str, worker: u64) -> Self {
        EventIds {
            prefix: format!("{node_id}-{worker:016x}-"),
            next: 0,
        }
    }

    pub fn next_id(&mut self) -> String {
        self.next += 1;
        format!("{}{}", self.prefix, self.next)
    }
}

/// What is known about one decision beyond the request.
pub struct Facts<'a> {
    pub node_id: &'a str,
    pub event_id: String,
    pub time_ms: i64,
    pub route: &'a Route,
    pub jti: Option<&'a str>,
    pub dry_run: bool,
}

pub fn event(facts: Facts<'_>, request: &Extracted, decision: &Decision) -> v1::DecisionEvent {
    let (outcome, reason) = match decision.verdict {
        Verdict::Allow => (v1::Outcome::Allow, String::new()),
        Verdict::Deny(r) => (v1::Outcome::Deny, r.as_str().to_owned()),
    };
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    v1::DecisionEvent {
        event_id: facts.event_id,
        node_id: facts.node_id.to_owned(),
        time_ms: facts.time_ms,
        grant_id: decision.grant_id.clone().unwrap_or_default(),
        token_jti: facts.jti.unwrap_or_default().to_owned(),
        request_id: text(&request.request_id),
        caller: text(&request.caller),
        subject: text(&request.subject),
        route: facts.route.name.clone(),
        dataset: facts.route.dataset.clone(),
        action: facts.route.action.clone(),
        purpose: text(&request.requested_purpose),
        outcome: outcome as i32,
        reason,
        snapshot_revision: decision.revision.unwrap_or(0),
        dry_run: facts.dry_run,
    }
}

/// The leader's bounded buffer of events waiting for the stream.
#[derive(Debug)]
pub struct Outbox {
    events: VecDeque<v1::DecisionEvent>,
    capacity: usize,
    max_batch: usize,
}

impl Outbox {
    pub fn new(capacity: usize, max_batch: usize) -> Self {
        Outbox {
            events: VecDeque::new(),
            capacity,
            max_batch,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Takes one encoded event from the queue. Returns how many were
    /// dropped: 1 when it does not decode or the outbox is full.
    pub fn push_encoded(&mut self, bytes: &[u8]) -> u64 {
        match v1::DecisionEvent::decode(bytes) {
            Ok(event) if self.events.len() < self.capacity => {
                self.events.push_back(event);
                0
            }
            _ => 1,
        }
    }

    /// The next batch to send, as a `SidecarMessage`; the events stay held
    /// until [`Outbox::sent`] confirms the host accepted the message.
    pub fn next_batch(&self) -> Option<(usize, v1::SidecarMessage)> {
        if self.events.is_empty() {
            return None;
        }
        let n = self.events.len().min(self.max_batch);
        let events = self.events.iter().take(n).cloned().collect();
        let msg = v1::SidecarMessage {
            msg: Some(v1::sidecar_message::Msg::Events(v1::DecisionEventBatch {
                events,
            })),
        };
        Some((n, msg))
    }

    pub fn sent(&mut self, n: usize) {
        self.events.drain(..n.min(self.events.len()));
    }
}

#[cfg(test)]
mod tests {
    use consent_core::Reason;

    use super::*;

    #[test]
    fn ids_are_unique_per_worker_and_counter() {
        let mut a = EventIds::new("node", 1);
        let mut b = EventIds::new("node", 2);
        let ids = [a.next_id(), a.next_id(), b.next_id()];
        assert_eq!(ids[0], "node-0000000000000001-1");
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2]);
    }

    fn encoded(id: &str) -> Vec<u8> {
        v1::DecisionEvent {
            event_id: id.into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn the_outbox_is_bounded_and_batches_until_sent() {
        let mut out = Outbox::new(3, 2);
        assert!(out.next_batch().is_none());
        let dropped: u64 = ["a", "b", "c", "d"]
            .iter()
            .map(|id| out.push_encoded(&encoded(id)))
            .sum();
        assert_eq!((dropped, out.len()), (1, 3));
        assert_eq!(
            out.push_encoded(&[0xff, 0xff]),
            1,
            "garbage is dropped, not kept"
        );
        let (n, msg) = out.next_batch().unwrap();
        let Some(v1::sidecar_message::Msg::Events(batch)) = msg.msg else {
            panic!()
        };
        assert_eq!(n, 2);
        assert_eq!(batch.events[0].event_id, "a");
        out.sent(n);
        assert_eq!(out.len(), 1);
        let (n, _) = out.next_batch().unwrap();
        out.sent(n);
        assert!(out.is_empty());
    }

    #[test]
    fn events_carry_the_decision() {
        let config = crate::check::tests::config(false);
        let route = &config.routes.routes()[0];
        let request = Extracted {
            caller: Some("svc".into()),
            subject: Some("p1".into()),
            requested_purpose: Some("care".into()),
            purpose: Some("care".into()),
            token: None,
            request_id: Some("r1".into()),
        };
        let decision = Decision {
            verdict: Verdict::Deny(Reason::GrantRevoked),
            grant_id: Some("g1".into()),
            revision: Some(4),
        };
        let facts = Facts {
            node_id: "n1",
            event_id: "e1".into(),
            time_ms: 5,
            route,
            jti: Some("j1"),
            dry_run: true,
        };
        let e = event(facts, &request, &decision);
        assert_eq!(e.outcome, v1::Outcome::Deny as i32);
        assert_eq!(e.reason, "grant_revoked");
        assert_eq!((e.grant_id.as_str(), e.token_jti.as_str()), ("g1", "j1"));
        assert_eq!((e.snapshot_revision, e.dry_run), (4, true));
        assert_eq!((e.dataset.as_str(), e.action.as_str()), ("records", "read"));
        assert_eq!(e.request_id, "r1");
    }
}
