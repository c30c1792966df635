//! One request's check, host-free: verify the token (through the per-VM
//! cache), decide with consent-core over the shared-data view, and turn the
//! decision into an action for the mode.

use consent_core::{
    ConsentClaims, Decision, Enforcement, GrantView, Mode, Reason, Request, RoutePolicy,
    TokenEvidence, UnixSeconds, Verdict, decide, enforce,
};

use crate::config::{Config, Route};
use crate::request::Extracted;
use crate::store::{Keys, Meta, SharedData, read_key_set};
use crate::token_cache::{Source, TokenCache};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    pub decision: Decision,
    pub enforcement: Enforcement,
    pub jti: Option<String>,
    /// Whether a token was served from the cache (`None` without a token).
    pub token_source: Option<Source>,
}

/// Re-reads the key set when the published version moved since this VM
/// last read it (one extra shared-data read per key rotation, not per request).
pub fn refresh_keys(
    cache: &mut TokenCache,
    data: &impl SharedData,
    keys: &Keys,
    meta: Option<Meta>,
) {
    if let Some(meta) = meta
        && meta.keys_version != cache.keys_version()
    {
        cache.set_keys(meta.keys_version, read_key_set(data, keys));
    }
}

pub fn check(
    config: &Config,
    route: &Route,
    extracted: &Extracted,
    view: &impl GrantView,
    cache: &mut TokenCache,
    now: UnixSeconds,
) -> Checked {
    let mut token_source = None;
    let verified: Option<Result<ConsentClaims, Reason>> =
        extracted
            .token
            .as_deref()
            .map(|token| match cache.verify(token, &config.verify, now) {
                Ok((claims, source)) => {
                    token_source = Some(source);
                    Ok(claims)
                }
                Err(e) => {
                    token_source = Some(Source::Verified);
                    Err(e.reason())
                }
            });
    let token = match &verified {
        None => TokenEvidence::Absent,
        Some(Ok(claims)) => TokenEvidence::Verified(claims),
        Some(Err(reason)) => TokenEvidence::Rejected(*reason),
    };
    let request = Request {
        caller: extracted.caller.as_deref(),
        subject: extracted.subject.as_deref(),
        dataset: &route.dataset,
        action: &route.action,
        purpose: extracted.purpose.as_deref(),
        permission: route.permission,
        token,
        policy: RoutePolicy {
            token_required: route.token_required,
            on_stale: route.on_stale,
            max_staleness_secs: config.control_plane.max_staleness_secs,
        },
    };
    let decision = decide(view, &request, now);
    let jti = match &verified {
        Some(Ok(claims)) => Some(claims.jti.clone()),
        _ => None,
    };
    Checked {
        enforcement: enforce(&decision, config.mode),
        decision,
        jti,
        token_source,
    }
}

/// A path under a default-deny prefix that no route declares serves no
/// declared dataset, so whatever it serves is out of scope.
pub fn undeclared(view: &impl GrantView, mode: Mode) -> (Decision, Enforcement) {
    let decision = Decision {
        verdict: Verdict::Deny(Reason::DatasetOutOfScope),
        grant_id: None,
        revision: view.sync_state().map(|s| s.revision),
    };
    let enforcement = enforce(&decision, mode);
    (decision, enforcement)
}

#[cfg(test)]
#[path = "check_tests.rs"]
pub(crate) mod tests;
