//! The decision: allow a request only if every check passes; the first failing
//! check names the reason. `decide` is pure: the caller brings the grants (a
//! [`GrantView`]), the verified token evidence and the clock.

use std::borrow::Cow;

use crate::grant::{Grant, Permission, Status, UnixSeconds};
use crate::reason::Reason;
use crate::token::ConsentClaims;

/// How far the sync state goes: what revision is held and when the control
/// plane was last heard from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncState {
    pub revision: u64,
    pub last_contact: UnixSeconds,
}

/// Where the grants come from: an in-memory [`crate::Snapshot`] in the control
/// plane and tests, shared data inside the filter.
pub trait GrantView {
    fn grant(&self, id: &str) -> Option<Cow<'_, Grant>>;
    /// Ids of the grants held for this grantee and subject, for routes that
    /// accept requests without a token.
    fn grant_ids_for(&self, grantee: &str, subject: &str) -> Vec<String>;
    /// `None` until a first snapshot has been applied.
    fn sync_state(&self) -> Option<SyncState>;
}

/// What a route does when the snapshot is older than `max_staleness` or was
/// never received.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnStale {
    /// Fail closed: 503 until the control plane is heard again.
    #[default]
    Deny,
    /// Fail open: decide with what is held; with nothing held, allow.
    Allow,
}

/// The per-route rules that shape a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutePolicy {
    pub token_required: bool,
    pub on_stale: OnStale,
    pub max_staleness_secs: i64,
}

/// What the token said, once the caller has verified it (or failed to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenEvidence<'a> {
    Absent,
    Verified(&'a ConsentClaims),
    Rejected(Reason),
}

/// One request to a protected route, as the filter extracted it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The authenticated caller (mTLS SPIFFE id or a verified header).
    pub caller: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub dataset: &'a str,
    pub action: &'a str,
    pub purpose: Option<&'a str>,
    pub permission: Permission,
    pub token: TokenEvidence<'a>,
    pub policy: RoutePolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Reason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The grant that allowed, or the one that was found and denied.
    pub grant_id: Option<String>,
    /// The snapshot revision the decision read; `None` when nothing is held.
    pub revision: Option<u64>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    pub fn reason(&self) -> Option<Reason> {
        match self.verdict {
            Verdict::Allow => None,
            Verdict::Deny(reason) => Some(reason),
        }
    }
}

/// Whether the filter blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    /// Decide and record everything, never block.
    DryRun,
}

/// What the filter does with a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    Continue,
    Reply { status: u16, reason: Reason },
}

/// Turns a decision into an action. Dry-run changes this, never the decision.
pub fn enforce(decision: &Decision, mode: Mode) -> Enforcement {
    match (decision.verdict, mode) {
        (Verdict::Deny(reason), Mode::Enforce) => Enforcement::Reply {
            status: reason.http_status(),
            reason,
        },
        _ => Enforcement::Continue,
    }
}

/// Parent chains longer than this are treated as broken rather than walked.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Decides `request` against the grants in `view` at `now`.
pub fn decide(view: &impl GrantView, request: &Request<'_>, now: UnixSeconds) -> Decision {
    let sync = view.sync_state();
    let revision = sync.map(|s| s.revision);
    let deny = |reason, grant_id: Option<&str>| Decision {
        verdict: Verdict::Deny(reason),
        grant_id: grant_id.map(str::to_owned),
        revision,
    };

    let Some(caller) = request.caller.filter(|c| !c.is_empty()) else {
        return deny(Reason::MissingIdentity, None);
    };
    let fail_open = request.policy.on_stale == OnStale::Allow;
    match sync {
        None if fail_open => {
            return Decision {
                verdict: Verdict::Allow,
                grant_id: None,
                revision,
            };
        }
        None => return deny(Reason::SnapshotUnavailable, None),
        Some(s) if !fail_open && now - s.last_contact > request.policy.max_staleness_secs => {
            return deny(Reason::SnapshotStale, None);
        }
        Some(_) => {}
    }

    match request.token {
        TokenEvidence::Rejected(reason) => deny(reason, None),
        TokenEvidence::Absent if request.policy.token_required => deny(Reason::MissingToken, None),
        TokenEvidence::Verified(claims) => {
            if claims.grantee != caller {
                return deny(Reason::TokenGranteeMismatch, Some(&claims.grant_id));
            }
            match check_grant(view, &claims.grant_id, caller, request, Some(claims), now) {
                Ok(()) => Decision {
                    verdict: Verdict::Allow,
                    grant_id: Some(claims.grant_id.clone()),
                    revision,
                },
                Err(reason) => deny(reason, Some(&claims.grant_id)),
            }
        }
        TokenEvidence::Absent => {
            // Token-less route: any grant held for this caller and subject may allow.
            let Some(subject) = request.subject else {
                return deny(Reason::SubjectMismatch, None);
            };
            let mut ids = view.grant_ids_for(caller, subject);
            ids.sort();
            let mut first_denial = None;
            for id in &ids {
                match check_grant(view, id, caller, request, None, now) {
                    Ok(()) => {
                        return Decision {
                            verdict: Verdict::Allow,
                            grant_id: Some(id.clone()),
                            revision,
                        };
                    }
                    Err(reason) => {
                        first_denial.get_or_insert((reason, id.as_str()));
                    }
                }
            }
            match first_denial {
                Some((reason, id)) => deny(reason, Some(id)),
                None => deny(Reason::GrantUnknown, None),
            }
        }
    }
}

fn check_grant(
    view: &impl GrantView,
    grant_id: &str,
    caller: &str,
    request: &Request<'_>,
    claims: Option<&ConsentClaims>,
    now: UnixSeconds,
) -> Result<(), Reason> {
    let grant = view.grant(grant_id).ok_or(Reason::GrantUnknown)?;
    if grant.grantee != caller {
        return Err(Reason::TokenGranteeMismatch);
    }
    if let Status::Revoked(revocation) = &grant.status {
        return Err(match revocation.cascaded_from {
            Some(_) => Reason::ParentRevoked,
            None => Reason::GrantRevoked,
        });
    }
    check_ancestors(view, &grant)?;
    check_time(&grant, now)?;

    // The snapshot's grant wins, and the token can only narrow it further.
    let subject_ok = request.subject == Some(grant.subject.as_str())
        && claims.is_none_or(|c| c.subject == grant.subject);
    if !subject_ok {
        return Err(Reason::SubjectMismatch);
    }
    check_scope(&grant, request)?;
    if let Some(claims) = claims {
        check_claims_scope(claims, request)?;
    }
    Ok(())
}

fn check_time(grant: &Grant, now: UnixSeconds) -> Result<(), Reason> {
    if now < grant.not_before {
        return Err(Reason::GrantNotYetValid);
    }
    if now >= grant.expires_at || grant.status == Status::Expired {
        return Err(Reason::GrantExpired);
    }
    Ok(())
}

fn check_scope(grant: &Grant, request: &Request<'_>) -> Result<(), Reason> {
    if !grant.datasets.contains(request.dataset) {
        return Err(Reason::DatasetOutOfScope);
    }
    if !grant.actions.contains(request.action) {
        return Err(Reason::ActionOutOfScope);
    }
    if !request.purpose.is_some_and(|p| grant.purposes.contains(p)) {
        return Err(Reason::PurposeNotGranted);
    }
    if !grant.permissions.contains(&request.permission) {
        return Err(Reason::PermissionMissing);
    }
    Ok(())
}

fn check_claims_scope(claims: &ConsentClaims, request: &Request<'_>) -> Result<(), Reason> {
    if !claims.datasets.contains(request.dataset) {
        return Err(Reason::DatasetOutOfScope);
    }
    if !claims.actions.contains(request.action) {
        return Err(Reason::ActionOutOfScope);
    }
    if !request.purpose.is_some_and(|p| claims.purposes.contains(p)) {
        return Err(Reason::PurposeNotGranted);
    }
    if !claims.permissions.contains(&request.permission) {
        return Err(Reason::PermissionMissing);
    }
    Ok(())
}

/// A child is only as good as every grant above it: a revoked ancestor
/// revokes it, and an ancestor that lost `share` can no longer back it. Scope
/// and time are bounded at creation and re-checked through the child's own
/// fields, which never exceed the parent's.
fn check_ancestors(view: &impl GrantView, grant: &Grant) -> Result<(), Reason> {
    let mut next = grant.parent.clone();
    for _ in 0..MAX_CHAIN_DEPTH {
        let Some(parent_id) = next else {
            return Ok(());
        };
        let parent = view.grant(&parent_id).ok_or(Reason::ParentRevoked)?;
        if parent.is_revoked() {
            return Err(Reason::ParentRevoked);
        }
        if parent.status == Status::Expired {
            return Err(Reason::GrantExpired);
        }
        if !parent.permissions.contains(&Permission::Share) {
            return Err(Reason::PermissionMissing);
        }
        if !grant.datasets.is_subset(&parent.datasets)
            || !grant.actions.is_subset(&parent.actions)
            || !grant.purposes.is_subset(&parent.purposes)
            || grant.expires_at > parent.expires_at
            || grant.not_before < parent.not_before
        {
            // A child wider than its parent was never valid; deny it as out of scope.
            return Err(Reason::DatasetOutOfScope);
        }
        next = parent.parent.clone();
    }
    Err(Reason::ParentRevoked)
}

#[cfg(test)]
#[path = "decision_tests.rs"]
mod tests;
