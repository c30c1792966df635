//! Metric names and a small registry over the host's metric calls. Envoy
//! encodes tags in the name, so a decision's result and reason are part of
//! it: `consent.decision.allow`, `consent.decision.deny.grant_revoked`.
//! Envoy prefixes guest metrics with `wasmcustom.`.

use std::collections::HashMap;

use consent_core::{Decision, Verdict};

pub const SNAPSHOT_REVISION: &str = "consent.snapshot.revision";
pub const STALENESS_SECONDS: &str = "consent.snapshot.staleness_seconds";
pub const STREAM_RECONNECTS: &str = "consent.stream.reconnects";
pub const STREAM_NACKS: &str = "consent.stream.nacks";
pub const AUDIT_SENT: &str = "consent.audit.sent";
pub const AUDIT_DROPPED: &str = "consent.audit.dropped";
pub const TOKEN_CACHE_HITS: &str = "consent.token_cache.hits";
pub const TOKEN_CACHE_MISSES: &str = "consent.token_cache.misses";

pub fn decision_name(decision: &Decision) -> String {
    match decision.verdict {
        Verdict::Allow => "consent.decision.allow".to_owned(),
        Verdict::Deny(reason) => format!("consent.decision.deny.{}", reason.as_str()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// The host's metric calls; every failure is swallowed by the caller's
/// choice, never a trap.
pub trait MetricHost {
    fn define(&self, kind: Kind, name: &str) -> Option<u32>;
    fn increment(&self, id: u32, by: i64);
    fn record(&self, id: u32, value: u64);
}

/// Defines each metric once per VM, on first use, and remembers its id.
#[derive(Debug, Default)]
pub struct Metrics {
    ids: HashMap<String, u32>,
}

impl Metrics {
    fn id(&mut self, host: &impl MetricHost, kind: Kind, name: &str) -> Option<u32> {
        if let Some(&id) = self.ids.get(name) {
            return Some(id);
        }
        let id = host.define(kind, name)?;
        self.ids.insert(name.to_owned(), id);
        Some(id)
    }

    pub fn count(&mut self, host: &impl MetricHost, name: &str, by: u64) {
        // Envoy refuses increments <= 0.
        if by == 0 {
            return;
        }
        if let Some(id) = self.id(host, Kind::Counter, name) {
            host.increment(id, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }

    pub fn gauge(&mut self, host: &impl MetricHost, name: &str, value: u64) {
        if let Some(id) = self.id(host, Kind::Gauge, name) {
            host.record(id, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use consent_core::Reason;

    use super::*;

    #[derive(Default)]
    struct Host {
        defined: RefCell<Vec<(Kind, String)>>,
        values: RefCell<HashMap<u32, i64>>,
    }

    impl MetricHost for Host {
        fn define(&self, kind: Kind, name: &str) -> Option<u32> {
            let mut d = self.defined.borrow_mut();
            d.push((kind, name.to_owned()));
            Some(d.len() as u32)
        }
        fn increment(&self, id: u32, by: i64) {
            *self.values.borrow_mut().entry(id).or_default() += by;
        }
        fn record(&self, id: u32, value: u64) {
            self.values.borrow_mut().insert(id, value as i64);
        }
    }

    #[test]
    fn names_carry_result_and_reason_and_are_defined_once() {
        let allow = Decision {
            verdict: Verdict::Allow,
            grant_id: None,
            revision: None,
        };
        let deny = Decision {
            verdict: Verdict::Deny(Reason::GrantRevoked),
            ..allow.clone()
        };
        assert_eq!(decision_name(&allow), "consent.decision.allow");
        assert_eq!(decision_name(&deny), "consent.decision.deny.grant_revoked");

        let host = Host::default();
        let mut m = Metrics::default();
        m.count(&host, "consent.decision.allow", 1);
        m.count(&host, "consent.decision.allow", 2);
        m.count(&host, "consent.decision.allow", 0);
        m.gauge(&host, SNAPSHOT_REVISION, 7);
        m.gauge(&host, SNAPSHOT_REVISION, 9);
        assert_eq!(host.defined.borrow().len(), 2);
        assert_eq!(host.values.borrow()[&1], 3);
        assert_eq!(host.values.borrow()[&2], 9);
    }
}
