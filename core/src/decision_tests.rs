//! The decision table: one line per case through `check`, and property tests
//! for the invariants that must hold for any grant set.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::grant::Revocation;
use crate::grant::tests::{names, sample, set};
use crate::snapshot::{Delta, Snapshot, Update};

const CALLER: &str = "spiffe://mesh/ns/analytics/sa/reader";
const PARTNER: &str = "spiffe://mesh/ns/partner/sa/lab";
const NOW: UnixSeconds = 50_000;

fn revoked(by_cascade_from: Option<&str>) -> Status {
    Status::Revoked(Revocation {
        revoked_by: "admin".into(),
        revoked_at: 40_000,
        reason: "withdrawn".into(),
        cascaded_from: by_cascade_from.map(str::to_owned),
    })
}

/// The parent grant `g1` (see `sample`) and a child `g2` shared onward to PARTNER.
fn child() -> Grant {
    Grant {
        id: "g2".into(),
        grantee: PARTNER.into(),
        parent: Some("g1".into()),
        datasets: names(&["labs"]),
        actions: names(&["read"]),
        purposes: names(&["research"]),
        permissions: set(&[Permission::Access]),
        ..sample()
    }
}

fn snapshot_of(grants: Vec<Grant>, last_contact: UnixSeconds) -> Snapshot {
    let mut snapshot = Snapshot::new();
    let delta = Delta {
        from_revision: 0,
        to_revision: 7,
        upserts: grants,
        ..Delta::default()
    };
    snapshot.apply(Update::Delta(delta), last_contact).unwrap();
    snapshot
}

fn claims_for(grant: &Grant) -> ConsentClaims {
    ConsentClaims {
        issued_at: NOW - 10,
        not_before: NOW - 10,
        expires_at: NOW + 300,
        ..ConsentClaims::for_grant(grant, "consentd", "records-api", "jti-1")
    }
}

/// A request as the filter builds it; `Token` picks the evidence.
#[derive(Clone, Debug)]
struct Req {
    caller: Option<&'static str>,
    subject: Option<&'static str>,
    dataset: &'static str,
    action: &'static str,
    purpose: Option<&'static str>,
    permission: Permission,
    token: Token,
    policy: RoutePolicy,
    now: UnixSeconds,
}

#[derive(Clone, Debug)]
enum Token {
    None,
    For(&'static str),
    Edited(&'static str, fn(&mut ConsentClaims)),
    Rejected(Reason),
}

fn req() -> Req {
    Req {
        caller: Some(CALLER),
        subject: Some("patient-1"),
        dataset: "records",
        action: "read",
        purpose: Some("care"),
        permission: Permission::Access,
        token: Token::For("g1"),
        policy: RoutePolicy {
            token_required: true,
            on_stale: OnStale::Deny,
            max_staleness_secs: 30,
        },
        now: NOW,
    }
}

/// Decides `r` against `grants` (last heard from at `NOW - 1`, or never when
/// `grants` is `None`) and compares the verdict.
fn check(grants: Option<Vec<Grant>>, r: Req, expected: Verdict) {
    let snapshot = match grants {
        Some(grants) => snapshot_of(grants, NOW - 1),
        None => Snapshot::new(),
    };
    let all: Vec<Grant> = snapshot.grants().cloned().chain([sample()]).collect();
    let find = |id: &str| {
        all.iter()
            .find(|g| g.id == id)
            .cloned()
            .unwrap_or_else(sample)
    };
    let claims = match &r.token {
        Token::For(id) => Some(claims_for(&find(id))),
        Token::Edited(id, edit) => {
            let mut c = claims_for(&find(id));
            edit(&mut c);
            Some(c)
        }
        _ => None,
    };
    let token = match (&r.token, &claims) {
        (Token::None, _) => TokenEvidence::Absent,
        (Token::Rejected(reason), _) => TokenEvidence::Rejected(*reason),
        (_, Some(c)) => TokenEvidence::Verified(c),
        (_, None) => unreachable!("claims are built for every token case"),
    };
    let request = Request {
        caller: r.caller,
        subject: r.subject,
        dataset: r.dataset,
        action: r.action,
        purpose: r.purpose,
        permission: r.permission,
        token,
        policy: r.policy,
    };
    let decision = decide(&snapshot, &request, r.now);
    assert_eq!(decision.verdict, expected, "{request:?}");
}

fn deny(reason: Reason) -> Verdict {
    Verdict::Deny(reason)
}

fn with(mutate: fn(&mut Grant)) -> Grant {
    let mut g = sample();
    mutate(&mut g);
    g
}

#[test]
fn decision_table() {
    use Reason::*;
    use Verdict::Allow;
    let g = || Some(vec![sample()]);
    let family = |parent: Grant, child: Grant| Some(vec![parent, child]);
    let tokenless = RoutePolicy {
        token_required: false,
        ..req().policy
    };
    let fail_open = RoutePolicy {
        on_stale: OnStale::Allow,
        ..req().policy
    };

    check(g(), req(), Allow);
    check(
        g(),
        Req {
            caller: None,
            ..req()
        },
        deny(MissingIdentity),
    );
    check(
        g(),
        Req {
            caller: Some(""),
            ..req()
        },
        deny(MissingIdentity),
    );
    check(None, req(), deny(SnapshotUnavailable));
    check(
        None,
        Req {
            policy: fail_open,
            ..req()
        },
        Allow,
    );
    check(
        g(),
        Req {
            now: NOW + 30,
            ..req()
        },
        deny(SnapshotStale),
    );
    check(
        g(),
        Req {
            now: NOW + 29,
            ..req()
        },
        Allow,
    );
    check(
        g(),
        Req {
            now: NOW + 90,
            policy: fail_open,
            ..req()
        },
        Allow,
    );
    check(
        g(),
        Req {
            token: Token::None,
            ..req()
        },
        deny(MissingToken),
    );
    check(
        g(),
        Req {
            token: Token::Rejected(TokenInvalid),
            ..req()
        },
        deny(TokenInvalid),
    );
    check(
        g(),
        Req {
            token: Token::Rejected(TokenExpired),
            ..req()
        },
        deny(TokenExpired),
    );
    check(
        g(),
        Req {
            token: Token::Rejected(TokenNotYetValid),
            ..req()
        },
        deny(TokenNotYetValid),
    );
    check(
        g(),
        Req {
            token: Token::Rejected(TokenWrongAudience),
            ..req()
        },
        deny(TokenWrongAudience),
    );
    check(
        g(),
        Req {
            caller: Some(PARTNER),
            ..req()
        },
        deny(TokenGranteeMismatch),
    );
    check(
        g(),
        Req {
            token: Token::Edited("g1", |c| c.grantee = PARTNER.into()),
            caller: Some(PARTNER),
            ..req()
        },
        deny(TokenGranteeMismatch),
    );
    check(
        g(),
        Req {
            token: Token::Edited("g1", |c| c.grant_id = "g404".into()),
            ..req()
        },
        deny(GrantUnknown),
    );
    check(
        Some(vec![with(|g| g.status = revoked(None))]),
        req(),
        deny(GrantRevoked),
    );
    check(
        Some(vec![with(|g| g.status = revoked(Some("g0")))]),
        req(),
        deny(ParentRevoked),
    );
    check(
        family(with(|g| g.status = revoked(None)), child()),
        Req {
            caller: Some(PARTNER),
            token: Token::For("g2"),
            dataset: "labs",
            purpose: Some("research"),
            ..req()
        },
        deny(ParentRevoked),
    );
    check(
        family(sample(), child()),
        Req {
            caller: Some(PARTNER),
            token: Token::For("g2"),
            dataset: "labs",
            purpose: Some("research"),
            ..req()
        },
        Allow,
    );
    check(
        Some(vec![child()]),
        Req {
            caller: Some(PARTNER),
            token: Token::For("g2"),
            dataset: "labs",
            purpose: Some("research"),
            ..req()
        },
        deny(ParentRevoked),
    );
    check(
        family(
            with(|g| g.permissions = set(&[Permission::Access])),
            child(),
        ),
        Req {
            caller: Some(PARTNER),
            token: Token::For("g2"),
            dataset: "labs",
            purpose: Some("research"),
            ..req()
        },
        deny(PermissionMissing),
    );
    check(
        Some(vec![with(|g| g.not_before = NOW + 1)]),
        req(),
        deny(GrantNotYetValid),
    );
    check(
        Some(vec![with(|g| g.expires_at = NOW)]),
        req(),
        deny(GrantExpired),
    );
    check(Some(vec![with(|g| g.expires_at = NOW + 1)]), req(), Allow);
    check(
        Some(vec![with(|g| g.status = Status::Expired)]),
        req(),
        deny(GrantExpired),
    );
    check(
        g(),
        Req {
            subject: Some("patient-2"),
            ..req()
        },
        deny(SubjectMismatch),
    );
    check(
        g(),
        Req {
            subject: None,
            ..req()
        },
        deny(SubjectMismatch),
    );
    check(
        g(),
        Req {
            token: Token::Edited("g1", |c| c.subject = "patient-2".into()),
            ..req()
        },
        deny(SubjectMismatch),
    );
    check(
        g(),
        Req {
            dataset: "billing",
            ..req()
        },
        deny(DatasetOutOfScope),
    );
    check(
        g(),
        Req {
            token: Token::Edited("g1", |c| c.datasets = names(&["labs"])),
            ..req()
        },
        deny(DatasetOutOfScope),
    );
    check(
        g(),
        Req {
            action: "delete",
            ..req()
        },
        deny(ActionOutOfScope),
    );
    check(
        g(),
        Req {
            token: Token::Edited("g1", |c| c.actions = names(&["write"])),
            ..req()
        },
        deny(ActionOutOfScope),
    );
    check(
        g(),
        Req {
            purpose: Some("marketing"),
            ..req()
        },
        deny(PurposeNotGranted),
    );
    check(
        g(),
        Req {
            purpose: None,
            ..req()
        },
        deny(PurposeNotGranted),
    );
    check(
        g(),
        Req {
            token: Token::Edited("g1", |c| c.purposes = names(&["research"])),
            ..req()
        },
        deny(PurposeNotGranted),
    );
    check(
        g(),
        Req {
            permission: Permission::Process,
            ..req()
        },
        deny(PermissionMissing),
    );
    check(
        g(),
        Req {
            token: Token::Edited("g1", |c| c.permissions = set(&[Permission::Share])),
            ..req()
        },
        deny(PermissionMissing),
    );
    // Token-less routes find the grant by (caller, subject).
    check(
        g(),
        Req {
            token: Token::None,
            policy: tokenless,
            ..req()
        },
        Allow,
    );
    check(
        g(),
        Req {
            token: Token::None,
            policy: tokenless,
            subject: Some("patient-9"),
            ..req()
        },
        deny(GrantUnknown),
    );
    check(
        g(),
        Req {
            token: Token::None,
            policy: tokenless,
            caller: Some(PARTNER),
            ..req()
        },
        deny(GrantUnknown),
    );
    check(
        Some(vec![with(|g| g.status = revoked(None))]),
        Req {
            token: Token::None,
            policy: tokenless,
            ..req()
        },
        deny(GrantRevoked),
    );
    check(
        Some(vec![
            with(|g| g.status = revoked(None)),
            with(|g| g.id = "g9".into()),
        ]),
        Req {
            token: Token::None,
            policy: tokenless,
            ..req()
        },
        Allow,
    );
}

/// Every reason of the closed set is produced by some line of the table above;
/// this guards against adding a reason without a case.
#[test]
fn every_reason_is_reachable() {
    let source = include_str!("decision_tests.rs");
    let table = &source[source.find("fn decision_table").unwrap()
        ..source.find("fn every_reason_is_reachable").unwrap()];
    for reason in Reason::ALL {
        let name = format!("{reason:?}");
        let produced = table.contains(&format!("deny({name})"));
        assert!(produced, "no decision_table line denies with {reason}");
    }
}

#[test]
fn enforcement_follows_the_mode_and_the_reason() {
    let denied = Decision {
        verdict: deny(Reason::GrantRevoked),
        grant_id: None,
        revision: Some(3),
    };
    let stale = Decision {
        verdict: deny(Reason::SnapshotStale),
        grant_id: None,
        revision: Some(3),
    };
    let allowed = Decision {
        verdict: Verdict::Allow,
        grant_id: Some("g1".into()),
        revision: Some(3),
    };
    assert_eq!(
        enforce(&denied, Mode::Enforce),
        Enforcement::Reply {
            status: 403,
            reason: Reason::GrantRevoked
        }
    );
    assert_eq!(
        enforce(&stale, Mode::Enforce),
        Enforcement::Reply {
            status: 503,
            reason: Reason::SnapshotStale
        }
    );
    assert_eq!(enforce(&denied, Mode::DryRun), Enforcement::Continue);
    assert_eq!(enforce(&allowed, Mode::Enforce), Enforcement::Continue);
}

// ---- properties ----

fn arb_names(pool: &'static [&'static str]) -> impl Strategy<Value = BTreeSet<String>> {
    proptest::sample::subsequence(pool, 1..=pool.len())
        .prop_map(|v| v.into_iter().map(str::to_owned).collect())
}

fn arb_permissions() -> impl Strategy<Value = BTreeSet<Permission>> {
    proptest::sample::subsequence(&Permission::ALL[..], 1..=3).prop_map(|v| v.into_iter().collect())
}

const DATASETS: &[&str] = &["records", "labs", "billing"];
const ACTIONS: &[&str] = &["read", "write"];
const PURPOSES: &[&str] = &["care", "research", "marketing"];

prop_compose! {
    fn arb_grant()(
        datasets in arb_names(DATASETS),
        actions in arb_names(ACTIONS),
        purposes in arb_names(PURPOSES),
        permissions in arb_permissions(),
        not_before in 0i64..200,
        lifetime in 1i64..200,
        status in 0u8..3,
    ) -> Grant {
        let status = match status {
            0 => Status::Active,
            1 => revoked(None),
            _ => Status::Expired,
        };
        Grant { datasets, actions, purposes, permissions, not_before, expires_at: not_before + lifetime, status, ..sample() }
    }
}

prop_compose! {
    fn arb_request()(
        dataset in proptest::sample::select(DATASETS),
        action in proptest::sample::select(ACTIONS),
        purpose in proptest::sample::select(PURPOSES),
        permission in proptest::sample::select(&Permission::ALL[..]),
        now in 0i64..400,
        token_required in any::<bool>(),
    ) -> (Req, UnixSeconds) {
        let policy = RoutePolicy { token_required, on_stale: OnStale::Deny, max_staleness_secs: 1_000 };
        let token = if token_required { Token::For("g1") } else { Token::None };
        (Req { dataset, action, purpose: Some(purpose), permission, token, policy, now, ..req() }, now)
    }
}

fn decide_with(grants: Vec<Grant>, r: &Req, token_grant: &Grant) -> Decision {
    let snapshot = snapshot_of(grants, r.now);
    let claims = claims_for(token_grant);
    let token = match r.token {
        Token::None => TokenEvidence::Absent,
        _ => TokenEvidence::Verified(&claims),
    };
    let request = Request {
        caller: r.caller,
        subject: r.subject,
        dataset: r.dataset,
        action: r.action,
        purpose: r.purpose,
        permission: r.permission,
        token,
        policy: r.policy,
    };
    decide(&snapshot, &request, r.now)
}

/// A child drawn inside `parent`: subsets of its sets, a window inside its own.
fn arb_child_of(
    parent: Grant,
    id: &'static str,
    grantee: &'static str,
) -> impl Strategy<Value = Grant> {
    let pick = |set: &BTreeSet<String>| {
        let items: Vec<String> = set.iter().cloned().collect();
        let n = items.len();
        proptest::sample::subsequence(items, 1..=n)
            .prop_map(|v| v.into_iter().collect::<BTreeSet<_>>())
    };
    let perms: Vec<Permission> = parent.permissions.iter().copied().collect();
    let n = perms.len();
    (
        pick(&parent.datasets),
        pick(&parent.actions),
        pick(&parent.purposes),
        proptest::sample::subsequence(perms, 1..=n),
        0..=(parent.expires_at - parent.not_before - 1),
        1i64..200,
    )
        .prop_map(move |(datasets, actions, purposes, perms, start, len)| {
            let not_before = parent.not_before + start;
            Grant {
                id: id.into(),
                grantee: grantee.into(),
                parent: Some(parent.id.clone()),
                datasets,
                actions,
                purposes,
                permissions: perms.into_iter().collect(),
                not_before,
                expires_at: (not_before + len).min(parent.expires_at),
                status: Status::Active,
                ..parent.clone()
            }
        })
}

proptest! {
    #[test]
    fn a_grant_not_in_force_never_allows(grant in arb_grant(), (r, now) in arb_request()) {
        let decision = decide_with(vec![grant.clone()], &r, &grant);
        if !grant.is_in_force(now) {
            prop_assert!(!decision.is_allow(), "{grant:?} allowed at {now}");
        }
    }

    #[test]
    fn a_child_never_allows_what_its_parent_would_not(
        (parent, child) in arb_grant().prop_flat_map(|p| (Just(p.clone()), arb_child_of(p, "g2", PARTNER))),
        (r, _) in arb_request(),
    ) {
        let as_child = Req { caller: Some(PARTNER), ..r.clone() };
        let child_decision = decide_with(vec![parent.clone(), child.clone()], &as_child, &child);
        let parent_decision = decide_with(vec![parent.clone(), child.clone()], &r, &parent);
        if child_decision.is_allow() {
            prop_assert!(parent_decision.is_allow(), "child allowed, parent denied: {parent_decision:?}");
            prop_assert!(parent.permissions.contains(&Permission::Share));
        }
    }

    #[test]
    fn revoking_an_ancestor_denies_every_descendant(depth in 1usize..6, revoke_at in 0usize..6, (r, _) in arb_request()) {
        const IDS: [&str; 6] = ["c0", "c1", "c2", "c3", "c4", "c5"];
        let revoke_at = revoke_at % depth;
        let mut chain = Vec::new();
        for (level, id) in IDS.iter().take(depth).enumerate() {
            let mut g = Grant { id: (*id).into(), expires_at: 1_000, not_before: 0, ..sample() };
            g.permissions = Permission::ALL.into_iter().collect();
            g.parent = level.checked_sub(1).map(|p| IDS[p].to_owned());
            if level == revoke_at {
                g.status = revoked(None);
            }
            chain.push(g);
        }
        let r = Req { token: Token::For("c0"), policy: RoutePolicy { token_required: true, ..r.policy }, ..r };
        for (level, grant) in chain.iter().enumerate().skip(revoke_at) {
            let decision = decide_with(chain.clone(), &r, grant);
            let expected = if level == revoke_at { Reason::GrantRevoked } else { Reason::ParentRevoked };
            prop_assert_eq!(decision.reason(), Some(expected), "level {} under a revocation at {}", level, revoke_at);
        }
    }

    #[test]
    fn dry_run_changes_enforcement_never_the_decision(grant in arb_grant(), (r, _) in arb_request()) {
        let decision = decide_with(vec![grant.clone()], &r, &grant);
        prop_assert_eq!(enforce(&decision, Mode::DryRun), Enforcement::Continue);
        let enforced = enforce(&decision, Mode::Enforce);
        prop_assert_eq!(enforced == Enforcement::Continue, decision.is_allow());
    }
}
