//! Deterministic grant sets and the requests the engines are compared on.
//!
//! The check shared by consent-core, Cedar and Rego is the token path of
//! [`consent_core::decide`]: the request names a grant (through a verified
//! token whose claims equal the grant's scope), a caller, a subject, a dataset,
//! an action, a purpose and a permission. It is allowed iff the grant exists,
//! its grantee is the caller, it is not revoked, `not_before <= now <
//! expires_at` (and the control plane has not marked it expired), the subject
//! is the grant's, and the dataset, action, purpose and permission are all in
//! the grant's sets.
//!
//! Delegation chains (child grants checked against every ancestor) are not in
//! the shared set: the Cedar and Rego versions would need entity hierarchies
//! or recursive rules to express them, which is a different comparison. Every
//! grant generated here is a root grant. The consent-core side still runs its
//! full `decide` (identity, sync state, token, ancestors, claims scope), so it
//! does strictly more work per request than the peer policies.

use std::collections::BTreeSet;

use consent_core::{ConsentClaims, Grant, Permission, Reason, Revocation, Status};

/// The clock every case is judged at unless it says otherwise (2025-06-15).
pub const NOW: i64 = 1_750_000_000;

const DAY: i64 = 24 * 3600;

/// Name pools. Every grant holds a strict subset of each, so each grant has
/// a dataset, an action, a purpose and a permission it does not cover.
pub const DATASETS: [&str; 8] = [
    "records", "labs", "imaging", "billing", "genomics", "claims", "notes", "vitals",
];
pub const ACTIONS: [&str; 4] = ["read", "list", "write", "export"];
pub const PURPOSES: [&str; 5] = ["care", "research", "billing", "audit", "quality"];
/// How many distinct grantees (services) the grants are spread over.
pub const GRANTEES: usize = 97;

/// A caller that is never any grant's grantee.
pub const INTRUDER: &str = "spiffe://mesh/ns/intruder/sa/scraper";
/// A subject that no grant is for.
pub const STRANGER: &str = "patient-stranger";
/// Issuer and audience of the tokens the claims stand for.
pub const ISSUER: &str = "consentd";
pub const AUDIENCE: &str = "consent-mesh";

/// The id of the `i`th generated grant.
pub fn grant_id(i: usize) -> String {
    format!("g{i:07}")
}

/// The `k`th grantee of the pool.
pub fn grantee(k: usize) -> String {
    format!("spiffe://mesh/ns/team{k}/sa/svc{k}")
}

/// A 64-bit mix of `i` (splitmix64): cheap, deterministic, well spread.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `count` consecutive names of `pool` starting at `start` (wrapping).
fn pick(pool: &[&str], start: u64, count: u64) -> BTreeSet<String> {
    let len = pool.len() as u64;
    (0..count)
        .map(|k| pool[((start + k) % len) as usize].to_owned())
        .collect()
}

/// What a grant's index makes of it: one in ten each revoked, past its
/// expiry, not yet valid; the rest in force. Grant 0 is always in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    InForce,
    Revoked,
    Expired,
    NotYetValid,
}

fn kind(i: usize) -> Kind {
    match i % 10 {
        3 => Kind::Expired,
        5 => Kind::NotYetValid,
        7 => Kind::Revoked,
        _ => Kind::InForce,
    }
}

/// The `i`th grant of every generated set (so `grants(n)` is a prefix of
/// `grants(m)` for `n < m`).
pub fn grant(i: usize) -> Grant {
    let h = mix(i as u64);
    let subject = format!("patient-{}", mix(h) % 250_000);
    let permissions_mask = 1 + (h >> 40) % 6; // 1..=6: never all three
    let permissions = Permission::ALL
        .iter()
        .enumerate()
        .filter(|(bit, _)| permissions_mask & (1 << bit) != 0)
        .map(|(_, p)| *p)
        .collect();
    let (mut not_before, mut expires_at) = (
        NOW - 30 * DAY - (h % (30 * DAY as u64)) as i64,
        NOW + 10 * DAY + ((h >> 24) % (200 * DAY as u64)) as i64,
    );
    let mut status = Status::Active;
    match kind(i) {
        Kind::InForce => {}
        Kind::Expired => {
            expires_at = NOW - 1 - ((h >> 24) % (5 * DAY as u64)) as i64;
            not_before = expires_at - 90 * DAY;
            // The control plane marks some expired grants; the clock alone
            // catches the others.
            if i % 20 == 3 {
                status = Status::Expired;
            }
        }
        Kind::NotYetValid => {
            not_before = NOW + 1 + ((h >> 24) % (10 * DAY as u64)) as i64;
            expires_at = not_before + 90 * DAY;
        }
        Kind::Revoked => {
            status = Status::Revoked(Revocation {
                revoked_by: subject.clone(),
                revoked_at: NOW - DAY,
                reason: "withdrawn".into(),
                cascaded_from: None,
            });
        }
    }
    Grant {
        id: grant_id(i),
        grantee: grantee((h >> 8) as usize % GRANTEES),
        issued_by: subject.clone(),
        subject,
        owner: "consent-team@example.org".into(),
        datasets: pick(&DATASETS, h >> 12, 1 + (h >> 16) % 3),
        actions: pick(&ACTIONS, h >> 20, 1 + (h >> 28) % 2),
        purposes: pick(&PURPOSES, h >> 32, 1 + (h >> 36) % 2),
        permissions,
        not_before,
        expires_at,
        parent: None,
        status,
        revision: 1 + (i as u64 % 1000),
    }
}

/// `n` root grants with varied subjects, grantees, datasets, actions,
/// purposes and permissions; about 10% each revoked, expired (some marked
/// by the control plane, most by the clock alone) and not yet valid.
/// Grant 0 is in force at [`NOW`]. About 1.4 s and 1.5 GiB for a million in
/// release.
pub fn grants(n: usize) -> Vec<Grant> {
    (0..n).map(grant).collect()
}

/// One request on the token path, and what consent-core must answer.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub grant_id: String,
    pub caller: String,
    pub subject: String,
    pub dataset: String,
    pub action: String,
    pub purpose: String,
    pub permission: Permission,
    /// The clock the request is judged at ([`NOW`] except at time boundaries).
    pub now: i64,
    pub expect_allow: bool,
    /// The deny reason consent-core gives (`None` when it allows). Cedar and
    /// Rego only answer allow or deny.
    pub expect_reason: Option<Reason>,
    /// The claims of the verified token the request carried: in the filter
    /// they come from the token cache, already verified, so they are part of
    /// the request rather than of the decision. They equal the scope of the
    /// grant they name. Only consent-core reads them; a Cedar or Rego
    /// deployment would verify the token before the engine sees the request.
    pub claims: ConsentClaims,
}

/// The claims a token issued from `grant` carries.
pub fn claims_for(grant: &Grant) -> ConsentClaims {
    ConsentClaims {
        issued_at: grant.not_before.max(NOW - 60),
        ..ConsentClaims::for_grant(grant, ISSUER, AUDIENCE, &format!("jti-{}", grant.id))
    }
}

fn first_of<T: Clone>(set: &BTreeSet<T>) -> T {
    set.iter()
        .next()
        .cloned()
        .expect("grant sets are never empty")
}

fn last_of<T: Clone>(set: &BTreeSet<T>) -> T {
    set.iter()
        .next_back()
        .cloned()
        .expect("grant sets are never empty")
}

fn missing_from(pool: &[&str], set: &BTreeSet<String>) -> String {
    let missing = pool.iter().find(|name| !set.contains(**name));
    (*missing.expect("grants never hold a whole pool")).to_owned()
}

fn missing_permission(set: &BTreeSet<Permission>) -> Permission {
    let missing = Permission::ALL.into_iter().find(|p| !set.contains(p));
    missing.expect("grants never hold every permission")
}

impl Case {
    /// A request that `grant` allows at `now` if it is in force then; `last`
    /// picks the last name of each set instead of the first.
    fn allowed_by(name: impl Into<String>, grant: &Grant, now: i64, last: bool) -> Case {
        let choose = if last { last_of } else { first_of };
        Case {
            name: name.into(),
            grant_id: grant.id.clone(),
            caller: grant.grantee.clone(),
            subject: grant.subject.clone(),
            dataset: choose(&grant.datasets),
            action: choose(&grant.actions),
            purpose: choose(&grant.purposes),
            permission: if last {
                last_of(&grant.permissions)
            } else {
                first_of(&grant.permissions)
            },
            now,
            expect_allow: true,
            expect_reason: None,
            claims: claims_for(grant),
        }
    }

    fn denied(mut self, name: impl Into<String>, reason: Reason) -> Case {
        self.name = name.into();
        self.expect_allow = false;
        self.expect_reason = Some(reason);
        self
    }

    /// The same request on behalf of a token for a grant the snapshot no
    /// longer holds (its claims still name the caller and the scope).
    fn for_unknown_grant(mut self, id: &str) -> Case {
        self.grant_id = id.to_owned();
        self.claims.grant_id = id.to_owned();
        self
    }
}

/// Picks a grant of the set (given grant 0 as well) for a shared case.
type GrantTest = fn(&Grant, &Grant) -> bool;

/// Why `grant` denies a request that is otherwise in scope, at `now`.
fn not_in_force_reason(grant: &Grant, now: i64) -> Option<Reason> {
    if grant.is_revoked() {
        Some(Reason::GrantRevoked)
    } else if now < grant.not_before {
        Some(Reason::GrantNotYetValid)
    } else if now >= grant.expires_at || grant.status == Status::Expired {
        Some(Reason::GrantExpired)
    } else {
        None
    }
}

/// The shared allow/deny cases: allows (including both time boundaries) and
/// one case per deny reason the three engines express — unknown grant,
/// revoked, expired, not yet valid, caller/grantee mismatch, subject
/// mismatch, dataset/action/purpose/permission out of scope. From one grant
/// (grant 0, in force) every reason but revocation can be shown, the time
/// ones by moving the clock to the grant's boundaries; with more grants,
/// revoked, expired (by status and by clock) and not-yet-valid grants of the
/// set are used too.
pub fn cases(grants: &[Grant]) -> Vec<Case> {
    let g0 = grants.first().expect("cases need at least one grant");
    assert!(
        not_in_force_reason(g0, NOW).is_none(),
        "the first grant must be in force at NOW"
    );
    let base = Case::allowed_by("allow", g0, NOW, false);
    let mut out = vec![
        base.clone(),
        Case::allowed_by("allow: last names of each set", g0, NOW, true),
        Case {
            now: g0.not_before,
            ..Case::allowed_by("allow: at not_before (inclusive)", g0, NOW, false)
        },
        Case {
            now: g0.expires_at - 1,
            ..Case::allowed_by("allow: a second before expires_at", g0, NOW, false)
        },
        base.clone()
            .for_unknown_grant("g-unknown")
            .denied("deny: unknown grant", Reason::GrantUnknown),
        Case {
            caller: INTRUDER.into(),
            ..base.clone()
        }
        .denied(
            "deny: caller is not the grantee",
            Reason::TokenGranteeMismatch,
        ),
        Case {
            subject: STRANGER.into(),
            ..base.clone()
        }
        .denied("deny: another subject", Reason::SubjectMismatch),
        Case {
            dataset: missing_from(&DATASETS, &g0.datasets),
            ..base.clone()
        }
        .denied("deny: dataset out of scope", Reason::DatasetOutOfScope),
        Case {
            action: missing_from(&ACTIONS, &g0.actions),
            ..base.clone()
        }
        .denied("deny: action out of scope", Reason::ActionOutOfScope),
        Case {
            purpose: missing_from(&PURPOSES, &g0.purposes),
            ..base.clone()
        }
        .denied("deny: purpose not granted", Reason::PurposeNotGranted),
        Case {
            permission: missing_permission(&g0.permissions),
            ..base.clone()
        }
        .denied("deny: permission missing", Reason::PermissionMissing),
        Case {
            now: g0.expires_at,
            ..base.clone()
        }
        .denied("deny: at expires_at (exclusive)", Reason::GrantExpired),
        Case {
            now: g0.not_before - 1,
            ..base.clone()
        }
        .denied("deny: a second before not_before", Reason::GrantNotYetValid),
    ];

    // Grants of the set that show a state on their own, found in the first
    // hundred so that the cases do not depend on the set's size beyond that.
    // Each test is given the grant and grant 0.
    let mut wanted: Vec<(&str, GrantTest)> = vec![
        ("in force, another grantee", |g, g0| {
            not_in_force_reason(g, NOW).is_none() && g.grantee != g0.grantee
        }),
        ("revoked", |g, _| g.is_revoked()),
        ("expired by the clock", |g, _| {
            g.status == Status::Active && g.expires_at <= NOW
        }),
        ("marked expired", |g, _| g.status == Status::Expired),
        ("not yet valid", |g, _| {
            g.not_before > NOW && !g.is_revoked()
        }),
    ];
    for g in grants.iter().skip(1).take(100) {
        let Some(at) = wanted.iter().position(|(_, test)| test(g, g0)) else {
            continue;
        };
        let (label, _) = wanted.remove(at);
        let case = Case::allowed_by(format!("allow: {label} ({})", g.id), g, NOW, true);
        out.push(match not_in_force_reason(g, NOW) {
            None => case,
            Some(reason) => case.denied(format!("deny: {label} ({})", g.id), reason),
        });
    }
    out
}

/// `count` requests spread over the whole set (a different grant for each,
/// strided by a hash so consecutive requests do not share cache lines or
/// tree paths): four in five are allows on a grant in force, the rest
/// rotate through unknown grant, caller mismatch, dataset out of scope, and
/// the natural deny of a revoked, expired or not-yet-valid grant.
pub fn timing_cases(grants: &[Grant], count: usize) -> Vec<Case> {
    assert!(!grants.is_empty(), "timing cases need grants");
    let n = grants.len();
    (0..count)
        .map(|k| {
            let start = (mix(!(k as u64)) % n as u64) as usize;
            let in_force = (0..n)
                .map(|step| &grants[(start + step) % n])
                .find(|g| not_in_force_reason(g, NOW).is_none())
                .expect("grant 0 is in force");
            let last = k % 2 == 1;
            let allow = Case::allowed_by(format!("t{k} allow"), in_force, NOW, last);
            if k % 5 != 4 {
                return allow;
            }
            match (k / 5) % 4 {
                0 => allow
                    .for_unknown_grant(&format!("g-gone-{k}"))
                    .denied(format!("t{k} unknown"), Reason::GrantUnknown),
                1 => Case {
                    caller: INTRUDER.into(),
                    ..allow
                }
                .denied(format!("t{k} caller"), Reason::TokenGranteeMismatch),
                2 => Case {
                    dataset: missing_from(&DATASETS, &in_force.datasets),
                    ..allow
                }
                .denied(format!("t{k} dataset"), Reason::DatasetOutOfScope),
                _ => {
                    let fallen = (0..n)
                        .map(|step| &grants[(start + step) % n])
                        .find_map(|g| not_in_force_reason(g, NOW).map(|r| (g, r)));
                    match fallen {
                        Some((g, reason)) => Case::allowed_by("", g, NOW, last)
                            .denied(format!("t{k} {}", reason.as_str()), reason),
                        None => allow,
                    }
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use consent_core::Limits;

    #[test]
    fn grants_are_valid_deterministic_and_varied() {
        let set = grants(1000);
        for g in &set {
            g.validate(&Limits::default()).unwrap();
        }
        assert_eq!(set, grants(1000));
        assert_eq!(set[..10], grants(10)[..]);
        let count = |f: fn(&Grant) -> bool| set.iter().filter(|g| f(g)).count();
        assert_eq!(count(|g| g.is_revoked()), 100);
        assert_eq!(count(|g| g.not_before > NOW), 100);
        assert_eq!(count(|g| g.expires_at <= NOW), 100);
        assert_eq!(count(|g| g.status == Status::Expired), 50);
        assert_eq!(count(|g| g.is_in_force(NOW)), 700);
        let grantees: BTreeSet<_> = set.iter().map(|g| &g.grantee).collect();
        assert_eq!(grantees.len(), GRANTEES);
        let subjects: BTreeSet<_> = set.iter().map(|g| &g.subject).collect();
        assert!(subjects.len() > 990, "{} subjects", subjects.len());
    }

    #[test]
    fn the_shared_cases_cover_every_reason_the_engines_express() {
        let expressed = [
            Reason::GrantUnknown,
            Reason::GrantRevoked,
            Reason::GrantExpired,
            Reason::GrantNotYetValid,
            Reason::TokenGranteeMismatch,
            Reason::SubjectMismatch,
            Reason::DatasetOutOfScope,
            Reason::ActionOutOfScope,
            Reason::PurposeNotGranted,
            Reason::PermissionMissing,
        ];
        let reasons = |cases: &[Case]| -> BTreeSet<Reason> {
            cases.iter().filter_map(|c| c.expect_reason).collect()
        };
        let one = cases(&grants(1));
        let mut without_revoked = expressed.to_vec();
        without_revoked.retain(|r| *r != Reason::GrantRevoked);
        assert_eq!(reasons(&one), without_revoked.into_iter().collect());
        let many = cases(&grants(1000));
        assert_eq!(reasons(&many), expressed.into_iter().collect());
        assert_eq!(many.len(), one.len() + 5);
        for case in &many {
            assert_eq!(case.expect_allow, case.expect_reason.is_none(), "{case:?}");
        }
        let names: BTreeSet<_> = many.iter().map(|c| &c.name).collect();
        assert_eq!(names.len(), many.len(), "case names are unique");
    }

    #[test]
    fn timing_cases_spread_over_the_set_and_mostly_allow() {
        let set = grants(10_000);
        let cases = timing_cases(&set, 1000);
        let allows = cases.iter().filter(|c| c.expect_allow).count();
        assert_eq!(allows, 800);
        let ids: BTreeSet<_> = cases.iter().map(|c| &c.grant_id).collect();
        assert!(ids.len() > 900, "{} distinct grants", ids.len());
        let denies: BTreeSet<_> = cases.iter().filter_map(|c| c.expect_reason).collect();
        assert!(denies.len() >= 5, "{denies:?}");
        assert_eq!(timing_cases(&grants(1), 10).len(), 10);
    }
}
