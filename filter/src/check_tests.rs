use consent_core::{
    ConsentClaims, FullSnapshot, Permission, Revocation, SigningKey, Snapshot, Status, Update,
    issue,
};

use super::*;
use crate::route::{Lookup, split_path};
use crate::store::tests::{FakeShared, grant};
use crate::store::{SharedView, Writer};

const CALLER: &str = "spiffe://cluster.local/ns/analytics/sa/reader";

pub(crate) fn config(dry_run: bool) -> Config {
    let mode = if dry_run { "dry_run" } else { "enforce" };
    let json = format!(
        r#"{{
      "control_plane": {{"cluster": "consentd", "node_id": "n1", "max_staleness_secs": 30, "heartbeat_secs": 5}},
      "token": {{"issuer": "consentd", "audience": "records-api", "tolerance_secs": 0}},
      "mode": "{mode}",
      "routes": [
        {{"path": "/patients/{{subject}}/records/{{record}}", "dataset": "records", "action": "read",
         "permission": "access", "purpose": {{"fixed": "care"}}, "subject": {{"path_param": "subject"}}}},
        {{"path": "/open/{{subject}}", "dataset": "records", "action": "read", "permission": "access",
         "purpose": {{"fixed": "care"}}, "subject": {{"path_param": "subject"}}, "token_required": false,
         "on_stale": "allow"}}
      ],
      "default_deny_prefixes": ["/patients/"]
    }}"#
    );
    Config::parse(json.as_bytes(), "root", |_| None).unwrap()
}

struct World {
    data: FakeShared,
    keys: Keys,
    key: SigningKey,
    cache: TokenCache,
}

fn world(grants: Vec<consent_core::Grant>, contact: UnixSeconds) -> World {
    let data = FakeShared::default();
    let keys = Keys::new("c/");
    let key = SigningKey::generate("k1").unwrap();
    let keyset = consent_core::KeySet::new([key.verifying_key(0)]);
    let digest = consent_core::Digest::of(&grants);
    let mut snap = Snapshot::new();
    snap.apply(
        Update::Snapshot(FullSnapshot {
            revision: 3,
            grants,
            keys: keyset,
            digest,
        }),
        contact,
    )
    .unwrap();
    Writer {
        data: &data,
        keys: &keys,
    }
    .write_full(None, &Snapshot::new(), &snap, contact)
    .unwrap();
    World {
        data,
        keys,
        key,
        cache: TokenCache::new(16),
    }
}

fn token(w: &World, grant_id: &str, subject: &str) -> String {
    let claims = ConsentClaims {
        issuer: "consentd".into(),
        audience: "records-api".into(),
        subject: subject.into(),
        grantee: CALLER.into(),
        grant_id: grant_id.into(),
        purposes: ["care".to_owned()].into(),
        datasets: ["records".to_owned()].into(),
        actions: ["read".to_owned()].into(),
        permissions: [Permission::Access].into(),
        issued_at: 1_000,
        not_before: 1_000,
        expires_at: 90_000,
        jti: format!("jti-{grant_id}"),
    };
    issue(&w.key, &claims).unwrap()
}

fn run(w: &mut World, config: &Config, path: &str, token: Option<String>, now: i64) -> Checked {
    let (p, _) = split_path(path);
    let Lookup::Protected(route, params) = config.routes.lookup("GET", p) else {
        panic!("{path} is not protected");
    };
    let subject = params
        .iter()
        .find(|(n, _)| *n == "subject")
        .map(|(_, v)| v.to_string());
    let extracted = Extracted {
        caller: Some(CALLER.into()),
        subject,
        requested_purpose: Some("care".into()),
        purpose: Some("care".into()),
        token,
        request_id: None,
    };
    let view = SharedView::new(&w.data, &w.keys);
    refresh_keys(&mut w.cache, &w.data, &w.keys, view.meta());
    check(config, route, &extracted, &view, &mut w.cache, now)
}

fn reply_status(c: &Checked) -> Option<u16> {
    match c.enforcement {
        Enforcement::Continue => None,
        Enforcement::Reply { status, .. } => Some(status),
    }
}

#[test]
fn a_valid_token_allows_and_the_second_request_hits_the_cache() {
    let mut w = world(vec![grant("g1", "p1")], 2_000);
    let c = config(false);
    let t = token(&w, "g1", "p1");
    let first = run(
        &mut w,
        &c,
        "/patients/p1/records/r1",
        Some(t.clone()),
        2_010,
    );
    assert!(first.decision.is_allow(), "{first:?}");
    assert_eq!(first.decision.grant_id.as_deref(), Some("g1"));
    assert_eq!(first.decision.revision, Some(3));
    assert_eq!(first.jti.as_deref(), Some("jti-g1"));
    assert_eq!(first.token_source, Some(Source::Verified));
    let second = run(&mut w, &c, "/patients/p1/records/r1", Some(t), 2_011);
    assert_eq!(
        (second.enforcement, second.token_source),
        (Enforcement::Continue, Some(Source::Cache))
    );
}

#[test]
fn the_grant_state_wins_over_a_cached_token() {
    let mut w = world(vec![grant("g1", "p1")], 2_000);
    let c = config(false);
    let t = token(&w, "g1", "p1");
    assert!(
        run(
            &mut w,
            &c,
            "/patients/p1/records/r1",
            Some(t.clone()),
            2_010
        )
        .decision
        .is_allow()
    );
    // The leader writes a revocation into shared data.
    let mut revoked = grant("g1", "p1");
    revoked.status = Status::Revoked(Revocation {
        revoked_by: "admin".into(),
        revoked_at: 2_011,
        reason: "withdrawn".into(),
        cascaded_from: None,
    });
    let (meta, _) = crate::store::read_meta(&w.data, &w.keys).unwrap();
    w.data
        .set(
            &w.keys.grant(meta.generation, "g1"),
            &crate::store::encode_grant(&revoked),
            0,
        )
        .unwrap();
    let after = run(&mut w, &c, "/patients/p1/records/r1", Some(t), 2_012);
    assert_eq!(after.token_source, Some(Source::Cache));
    assert_eq!(
        after.enforcement,
        Enforcement::Reply {
            status: 403,
            reason: Reason::GrantRevoked
        }
    );
}

#[test]
fn denials_name_their_reason_and_status() {
    let mut w = world(vec![grant("g1", "p1")], 2_000);
    let c = config(false);
    let t = token(&w, "g1", "p1");
    let cases: Vec<(&str, Option<String>, i64, Reason)> = vec![
        ("/patients/p1/records/r1", None, 2_010, Reason::MissingToken),
        (
            "/patients/p1/records/r1",
            Some("not.a.token".into()),
            2_010,
            Reason::TokenInvalid,
        ),
        (
            "/patients/p2/records/r1",
            Some(t.clone()),
            2_010,
            Reason::SubjectMismatch,
        ),
        (
            "/patients/p1/records/r1",
            Some(t.clone()),
            2_031,
            Reason::SnapshotStale,
        ),
    ];
    for (path, token, now, reason) in cases {
        let got = run(&mut w, &c, path, token, now);
        assert_eq!(got.decision.reason(), Some(reason), "{path}");
        assert_eq!(reply_status(&got), Some(reason.http_status()));
    }
}

#[test]
fn an_unsynced_sidecar_answers_503_on_fail_closed_routes_and_allows_on_fail_open() {
    let mut w = world(vec![], 0);
    w.data = FakeShared::default();
    let c = config(false);
    let closed = run(&mut w, &c, "/patients/p1/records/r1", None, 10);
    assert_eq!(
        closed.enforcement,
        Enforcement::Reply {
            status: 503,
            reason: Reason::SnapshotUnavailable
        }
    );
    let open = run(&mut w, &c, "/open/p1", None, 10);
    assert_eq!(open.enforcement, Enforcement::Continue);
}

#[test]
fn token_less_routes_use_the_pair_index() {
    let mut w = world(vec![grant("g1", "p1")], 2_000);
    let c = config(false);
    let got = run(&mut w, &c, "/open/p1", None, 2_010);
    assert!(got.decision.is_allow());
    assert_eq!(got.decision.grant_id.as_deref(), Some("g1"));
    assert_eq!(
        run(&mut w, &c, "/open/p2", None, 2_010).decision.reason(),
        Some(Reason::GrantUnknown)
    );
}

#[test]
fn dry_run_records_the_denial_but_continues() {
    let mut w = world(vec![grant("g1", "p1")], 2_000);
    let c = config(true);
    let got = run(&mut w, &c, "/patients/p1/records/r1", None, 2_010);
    assert_eq!(got.decision.reason(), Some(Reason::MissingToken));
    assert_eq!(got.enforcement, Enforcement::Continue);
}

#[test]
fn undeclared_paths_under_a_default_deny_prefix_are_refused() {
    let w = world(vec![], 2_000);
    let c = config(false);
    assert_eq!(
        c.routes.lookup("GET", "/patients/p1/secrets"),
        Lookup::Undeclared
    );
    let view = SharedView::new(&w.data, &w.keys);
    let (d, e) = undeclared(&view, Mode::Enforce);
    assert_eq!(d.reason(), Some(Reason::DatasetOutOfScope));
    assert_eq!(
        e,
        Enforcement::Reply {
            status: 403,
            reason: Reason::DatasetOutOfScope
        }
    );
    assert_eq!(undeclared(&view, Mode::DryRun).1, Enforcement::Continue);
}
