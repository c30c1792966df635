//! Every admin operation, and its bad input refused with no partial write.

use consent_core::wire::v1;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_get_list_amend_and_revoke_cascading() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    let parent = create(&mut admin, grant("g-parent", &["labs", "records"])).await;
    assert_eq!(parent.status, v1::GrantStatus::Active as i32);
    let mut child_req = grant("g-child", &["labs"]);
    child_req.parent = "g-parent".into();
    child_req.grantee = "spiffe://mesh/ns/partner/sa/lab".into();
    child_req.permissions = vec![v1::Permission::Access as i32, v1::Permission::Share as i32];
    child_req.purposes = vec!["care".into()];
    child_req.expires_at = parent.expires_at - 120;
    let child = create(&mut admin, child_req).await;
    let mut grandchild_req = grant("g-grandchild", &["labs"]);
    grandchild_req.parent = "g-child".into();
    grandchild_req.permissions = vec![v1::Permission::Access as i32];
    grandchild_req.purposes = vec!["care".into()];
    grandchild_req.expires_at = parent.expires_at - 180;
    let grandchild = create(&mut admin, grandchild_req).await;
    let mut other = grant("g-other", &["billing"]);
    other.subject = "patient-2".into();
    other.issued_by = "patient-2".into();
    create(&mut admin, other).await;
    assert_eq!(
        (child.revision, grandchild.revision),
        (parent.revision + 1, parent.revision + 2)
    );

    let got = admin
        .get_grant(v1::GetGrantRequest {
            id: "g-child".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.grant.unwrap().parent, "g-parent");

    let list =
        |subject: &str, dataset: &str, status: v1::GrantStatus, page_size, page_token: &str| {
            v1::ListGrantsRequest {
                subject: subject.into(),
                dataset: dataset.into(),
                status: status as i32,
                page_size,
                page_token: page_token.into(),
                ..Default::default()
            }
        };
    let ids = |r: v1::ListGrantsResponse| r.grants.into_iter().map(|g| g.id).collect::<Vec<_>>();
    let all = admin
        .list_grants(list("", "", v1::GrantStatus::Unspecified, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(all), ["g-child", "g-grandchild", "g-other", "g-parent"]);
    let labs = admin
        .list_grants(list("patient-1", "labs", v1::GrantStatus::Active, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(labs), ["g-child", "g-grandchild", "g-parent"]);
    let page1 = admin
        .list_grants(list("", "", v1::GrantStatus::Unspecified, 3, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.next_page_token, "g-other");
    let page2 = admin
        .list_grants(list("", "", v1::GrantStatus::Unspecified, 3, "g-other"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ids(page2.clone()), page2.next_page_token),
        (vec!["g-parent".to_string()], String::new())
    );

    // Amend narrows; a widening is refused naming the field.
    let amended = admin
        .amend_grant(v1::AmendGrantRequest {
            id: "g-parent".into(),
            purposes: Some(v1::StringList {
                values: vec!["care".into(), "research".into()],
            }),
            expires_at: Some(parent.expires_at - 60),
            actor: "alice".into(),
            reason: "shorter".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(amended.expires_at, parent.expires_at - 60);
    let widen = admin
        .amend_grant(v1::AmendGrantRequest {
            id: "g-parent".into(),
            datasets: Some(v1::StringList {
                values: vec!["labs".into(), "records".into(), "billing".into()],
            }),
            actor: "alice".into(),
            ..Default::default()
        })
        .await;
    let (c, m) = code(widen);
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("datasets"), "{m}");
    // Narrowing below what a child uses is refused too.
    let (c, m) = code(
        admin
            .amend_grant(v1::AmendGrantRequest {
                id: "g-parent".into(),
                datasets: Some(v1::StringList {
                    values: vec!["records".into()],
                }),
                actor: "alice".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    assert!(m.contains("datasets") && m.contains("g-child"), "{m}");

    let revoked = revoke(&mut admin, "g-parent").await;
    assert_eq!(revoked.revoked, ["g-parent", "g-child", "g-grandchild"]);
    assert_eq!(revoked.datasets, ["labs", "records"]);
    for id in ["g-child", "g-grandchild"] {
        let g = admin
            .get_grant(v1::GetGrantRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .grant
            .unwrap();
        assert_eq!(g.status, v1::GrantStatus::Revoked as i32);
        assert_eq!(g.revision, revoked.revision);
        let r = g.revocation.unwrap();
        assert_eq!(
            (
                r.cascaded_from.as_str(),
                r.revoked_by.as_str(),
                r.reason.as_str()
            ),
            ("g-parent", "alice", "withdrawn")
        );
    }
    let revoked_list = admin
        .list_grants(list("", "", v1::GrantStatus::Revoked, 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(revoked_list), ["g-child", "g-grandchild", "g-parent"]);
    let (c, _) = code(
        admin
            .revoke_grant(v1::RevokeGrantRequest {
                id: "g-parent".into(),
                actor: "alice".into(),
                reason: "again".into(),
            })
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition);

    // The audit trail has every change with its revision.
    let audit = admin
        .query_audit(v1::QueryAuditRequest {
            grant_id: "g-parent".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<String> = audit
        .records
        .iter()
        .filter_map(|r| match &r.record {
            Some(v1::audit_record::Record::Change(c)) => Some(format!("{}@{}", c.kind, c.revision)),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds,
        [
            format!("create@{}", parent.revision),
            format!("amend@{}", amended.revision),
            format!("revoke@{}", revoked.revision)
        ]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    let first = create(&mut admin, grant("g-1", &["labs"])).await;

    type Mutate = fn(&mut v1::CreateGrantRequest);
    let cases: Vec<(&str, Code, Mutate)> = vec![
        ("datasets", Code::InvalidArgument, |r| {
            r.datasets = vec!["Not Valid".into()]
        }),
        ("datasets", Code::InvalidArgument, |r| {
            r.datasets = vec!["labs".into(), "labs".into()]
        }),
        ("purposes", Code::InvalidArgument, |r| r.purposes.clear()),
        ("permissions", Code::InvalidArgument, |r| {
            r.permissions = vec![0]
        }),
        ("subject", Code::InvalidArgument, |r| {
            r.subject = "has space".into()
        }),
        ("expires_at", Code::InvalidArgument, |r| {
            r.expires_at = r.not_before
        }),
        ("expires_at", Code::InvalidArgument, |r| {
            r.not_before = 1000;
            r.expires_at = 2000;
        }),
        ("actor", Code::InvalidArgument, |r| r.actor.clear()),
        ("parent", Code::InvalidArgument, |r| {
            r.parent = "g-missing".into()
        }),
        ("datasets", Code::InvalidArgument, |r| {
            r.parent = "g-1".into()
        }),
        ("g-1", Code::AlreadyExists, |r| {
            r.datasets = vec!["labs".into()]
        }),
    ];
    for (field, expected, mutate) in cases {
        let mut req = grant("g-2", &["labs", "records"]);
        if field == "g-1" {
            req.id = "g-1".into();
        }
        mutate(&mut req);
        let (c, m) = code(admin.create_grant(req).await);
        assert_eq!(c, expected, "{field}: {m}");
        assert!(m.contains(field), "{field}: {m}");
    }
    let not_found = [
        code(
            admin
                .get_grant(v1::GetGrantRequest {
                    id: "g-nope".into(),
                })
                .await,
        )
        .0,
        code(
            admin
                .revoke_grant(v1::RevokeGrantRequest {
                    id: "g-nope".into(),
                    actor: "a".into(),
                    reason: "r".into(),
                })
                .await,
        )
        .0,
        code(
            admin
                .amend_grant(v1::AmendGrantRequest {
                    id: "g-nope".into(),
                    expires_at: Some(now()),
                    actor: "a".into(),
                    ..Default::default()
                })
                .await,
        )
        .0,
    ];
    assert_eq!(not_found, [Code::NotFound; 3]);
    let (c, m) = code(
        admin
            .revoke_grant(v1::RevokeGrantRequest {
                id: "g-1".into(),
                actor: "a".into(),
                reason: "".into(),
            })
            .await,
    );
    assert_eq!(
        (c, m.contains("reason")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(
        admin
            .list_grants(v1::ListGrantsRequest {
                status: 42,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(
        (c, m.contains("status")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    let (c, m) = code(
        admin
            .propagation_status(v1::PropagationRequest {
                revision: 999,
                ..Default::default()
            })
            .await,
    );
    assert_eq!(
        (c, m.contains("revision")),
        (Code::InvalidArgument, true),
        "{m}"
    );

    // Nothing was written: g-1 is unchanged and the next write takes the next revision.
    let g1 = admin
        .get_grant(v1::GetGrantRequest { id: "g-1".into() })
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap();
    assert_eq!(g1, first);
    let all = admin
        .list_grants(v1::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.grants.len(), 1);
    let next = create(&mut admin, grant("g-3", &["labs"])).await;
    assert_eq!(next.revision, first.revision + 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_issued_for_active_grants_to_their_grantee() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    let g = create(&mut admin, grant("g-1", &["labs"])).await;
    let req = |grantee: &str, ttl| v1::IssueTokenRequest {
        grant_id: "g-1".into(),
        grantee: grantee.into(),
        audience: "labs-api".into(),
        ttl_seconds: ttl,
        actor: "alice".into(),
    };
    let issued = admin
        .issue_token(req(&g.grantee, 100_000))
        .await
        .unwrap()
        .into_inner();
    assert!(
        issued.expires_at <= now() + 900,
        "capped at the configured maximum"
    );

    // The key streamed to sidecars verifies it.
    let mut sidecar = server.sidecar("node-a", &["labs"]).await;
    sidecar.expect_update().await;
    let options = consent_core::VerifyOptions::new("consentd", "labs-api");
    let claims =
        consent_core::verify(&issued.token, sidecar.snapshot.keys(), &options, now()).unwrap();
    assert_eq!(
        (claims.grant_id.as_str(), claims.jti.as_str()),
        ("g-1", issued.jti.as_str())
    );

    let (c, m) = code(admin.issue_token(req("someone-else", 60)).await);
    assert_eq!(
        (c, m.contains("grantee")),
        (Code::InvalidArgument, true),
        "{m}"
    );
    revoke(&mut admin, "g-1").await;
    let (c, _) = code(admin.issue_token(req(&g.grantee, 60)).await);
    assert_eq!(c, Code::FailedPrecondition);

    // Rotation: the new key signs, the old one stays with a retirement time, and the key set streams as a delta.
    sidecar.ack().await;
    let rotated = admin
        .rotate_signing_key(v1::RotateSigningKeyRequest {
            actor: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let keys = rotated.keys.unwrap().keys;
    assert_eq!(keys.len(), 2);
    let old = keys.iter().find(|k| k.kid != rotated.kid).unwrap();
    assert!(old.retire_after >= now() + 900 + 60 - 5 && old.retire_after <= now() + 900 + 60 + 5);
    assert_eq!(
        keys.iter()
            .find(|k| k.kid == rotated.kid)
            .unwrap()
            .retire_after,
        0
    );
    loop {
        match sidecar.expect_update().await {
            Got::Delta { keys: true, .. } => break,
            _ => sidecar.ack().await,
        }
    }
    assert_eq!(sidecar.snapshot.keys().len(), 2);
    consent_core::verify(&issued.token, sidecar.snapshot.keys(), &options, now()).unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_events_are_audited_once_and_queryable() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    create(&mut admin, grant("g-1", &["labs"])).await;
    let mut sidecar = server.sidecar("node-a", &["labs"]).await;
    sidecar.expect_update().await;
    let event = |id: &str, request: &str| v1::DecisionEvent {
        event_id: id.into(),
        time_ms: consent_control_plane::store::now_ms(),
        grant_id: "g-1".into(),
        request_id: request.into(),
        subject: "patient-1".into(),
        outcome: v1::Outcome::Allow as i32,
        ..Default::default()
    };
    let batch = v1::DecisionEventBatch {
        events: vec![event("e-1", "req-1"), event("e-2", "req-2")],
    };
    for _ in 0..2 {
        sidecar
            .send(v1::sidecar_message::Msg::Events(batch.clone()))
            .await;
    }
    sidecar.ack().await;
    let query = v1::QueryAuditRequest {
        request_id: "req-1".into(),
        ..Default::default()
    };
    let mut found = Vec::new();
    for _ in 0..50 {
        found = admin
            .query_audit(query.clone())
            .await
            .unwrap()
            .into_inner()
            .records;
        if !found.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            found = admin
                .query_audit(query.clone())
                .await
                .unwrap()
                .into_inner()
                .records;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(found.len(), 1, "recorded once by event id");
    match &found[0].record {
        Some(v1::audit_record::Record::Decision(d)) => assert_eq!(d.node_id, "node-a"),
        other => panic!("{other:?}"),
    }
    let by_subject = admin
        .query_audit(v1::QueryAuditRequest {
            subject: "patient-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(by_subject.len(), 3, "the create and two decisions");
    let none = admin
        .query_audit(v1::QueryAuditRequest {
            grant_id: "g-1".into(),
            from_ms: 1,
            to_ms: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(none.is_empty());
    server.stop().await;
}
