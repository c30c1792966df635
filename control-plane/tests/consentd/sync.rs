//! The sync stream: snapshots, resumable deltas, dataset filtering, digests,
//! coalescing for slow sidecars, disconnection of stuck ones, propagation.

use std::time::Duration;

use consent_core::wire::v1;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_get_only_their_datasets_in_snapshots_and_deltas() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    for (id, ds) in [
        ("g-1", "labs"),
        ("g-2", "labs"),
        ("g-3", "billing"),
        ("g-4", "labs"),
    ] {
        create(&mut admin, grant(id, &[ds])).await;
    }
    let mut labs = server.sidecar("node-labs", &["labs"]).await;
    let mut billing = server.sidecar("node-billing", &["billing"]).await;
    let head = 5; // the first signing key, then four grants
    assert_eq!(
        labs.expect_update().await,
        Got::Snapshot {
            revision: head,
            chunks: 2
        }
    );
    assert_eq!(
        billing.expect_update().await,
        Got::Snapshot {
            revision: head,
            chunks: 1
        }
    );
    assert_eq!(labs.ids(), ["g-1", "g-2", "g-4"]);
    assert_eq!(billing.ids(), ["g-3"]);
    assert_eq!(labs.snapshot.keys().len(), 1);
    labs.ack().await;
    billing.ack().await;

    create(&mut admin, grant("g-5", &["labs", "billing"])).await;
    let got = labs.expect_update().await;
    assert_eq!(
        got,
        Got::Delta {
            from: head,
            to: head + 1,
            upserts: vec!["g-5".into()],
            removals: vec![],
            keys: false
        }
    );
    assert_eq!(billing.expect_update().await, got);
    labs.ack().await;
    billing.ack().await;

    // A change outside a sidecar's datasets still moves its revision, with an empty delta.
    create(&mut admin, grant("g-6", &["billing"])).await;
    let got = labs.expect_update().await;
    assert_eq!(
        got,
        Got::Delta {
            from: head + 1,
            to: head + 2,
            upserts: vec![],
            removals: vec![],
            keys: false
        }
    );
    labs.ack().await;

    // Narrowing a grant's datasets removes it from the sidecars that no longer see it.
    admin
        .amend_grant(v1::AmendGrantRequest {
            id: "g-5".into(),
            datasets: Some(v1::StringList {
                values: vec!["billing".into()],
            }),
            actor: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = labs.expect_update().await;
    assert_eq!(
        got,
        Got::Delta {
            from: head + 2,
            to: head + 3,
            upserts: vec![],
            removals: vec!["g-5".into()],
            keys: false
        }
    );
    assert_eq!(labs.ids(), ["g-1", "g-2", "g-4"]);
    labs.ack().await;

    // A revoke is an upsert of the revoked state, cascading in the same delta.
    revoke(&mut admin, "g-1").await;
    let got = labs.expect_update().await;
    assert!(
        matches!(got, Got::Delta { ref upserts, .. } if upserts == &["g-1".to_string()]),
        "{got:?}"
    );
    assert!(
        labs.snapshot
            .grants()
            .find(|g| g.id == "g-1")
            .unwrap()
            .is_revoked()
    );
    assert!(
        labs.heartbeats > 0
            || billing.heartbeats > 0
            || labs.next_update(Duration::from_millis(500)).await.is_none()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_on_different_datasets_each_get_their_own_delta_of_one_revoke() {
    // consentd reads a revision range once for all the streams following the
    // head; each must still filter it by its own datasets.
    let server = Server::start().await;
    let mut admin = server.admin().await;
    create(&mut admin, grant("g-1", &["labs"])).await;
    create(&mut admin, grant("g-2", &["billing"])).await;
    let head = 3;
    let mut sidecars = Vec::new();
    for (node, ds) in [
        ("labs-1", "labs"),
        ("billing-1", "billing"),
        ("labs-2", "labs"),
    ] {
        let mut s = server.sidecar(node, &[ds]).await;
        s.sync_to(head).await;
        sidecars.push(s);
    }
    revoke(&mut admin, "g-1").await;
    for s in &mut sidecars {
        let labs = s.ids() == ["g-1"];
        assert_eq!(
            s.expect_update().await,
            Got::Delta {
                from: head,
                to: head + 1,
                upserts: if labs { vec!["g-1".into()] } else { vec![] },
                removals: vec![],
                keys: false
            }
        );
        s.ack().await;
    }
    assert!(sidecars[0].snapshot.grants().all(|g| g.is_revoked()));
    assert!(sidecars[1].snapshot.grants().all(|g| !g.is_revoked()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_sends_deltas_when_the_log_holds_the_revision_else_a_snapshot() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    create(&mut admin, grant("g-1", &["labs"])).await;
    let mut first = server.sidecar("node-a", &["labs"]).await;
    first.sync_to(2).await;
    let held = first.snapshot.clone();
    drop(first);
    create(&mut admin, grant("g-2", &["labs"])).await;
    create(&mut admin, grant("g-3", &["labs"])).await;

    let url = server.url();
    let mut resumed = Sidecar::connect(
        &url,
        SIDECAR_TOKEN,
        "node-a",
        &["labs"],
        2,
        Some(held.clone()),
    )
    .await
    .unwrap();
    let got = resumed.expect_update().await;
    assert_eq!(
        got,
        Got::Delta {
            from: 2,
            to: 4,
            upserts: vec!["g-2".into(), "g-3".into()],
            removals: vec![],
            keys: false
        }
    );
    assert_eq!(resumed.ids(), ["g-1", "g-2", "g-3"]);

    // An unknown revision (ahead of the head) gets a snapshot.
    let mut ahead = Sidecar::connect(&url, SIDECAR_TOKEN, "node-b", &["labs"], 99, None)
        .await
        .unwrap();
    assert!(matches!(
        ahead.expect_update().await,
        Got::Snapshot { revision: 4, .. }
    ));

    // A digest that does not match the revision gets a snapshot.
    let mut tampered = held.clone();
    let mut wrong = consent_core::Snapshot::new();
    std::mem::swap(&mut tampered, &mut wrong);
    let mut mismatch =
        Sidecar::connect(&url, SIDECAR_TOKEN, "node-c", &["labs"], 2, Some(tampered))
            .await
            .unwrap();
    // The empty snapshot has the empty digest, not the digest of revision 2.
    match mismatch.next_update(WAIT).await {
        Some(Got::Snapshot { revision: 4, .. }) => {}
        other => panic!("expected a snapshot, got {other:?}"),
    }

    // Once the log is compacted past the revision, it gets a snapshot too.
    let store = server.store.clone();
    tokio::task::spawn_blocking(move || store.compact(3))
        .await
        .unwrap()
        .unwrap();
    let mut compacted = Sidecar::connect(&url, SIDECAR_TOKEN, "node-a", &["labs"], 2, Some(held))
        .await
        .unwrap();
    assert!(matches!(
        compacted.expect_update().await,
        Got::Snapshot { revision: 4, .. }
    ));
    assert_eq!(compacted.ids(), ["g-1", "g-2", "g-3"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sidecar_gets_one_push_at_a_time_and_changes_coalesce() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    let mut slow = server.sidecar("node-slow", &["labs"]).await;
    assert!(matches!(
        slow.expect_update().await,
        Got::Snapshot { revision: 1, .. }
    ));
    // Not acknowledged: twenty changes must not be pushed.
    for i in 0..20 {
        create(&mut admin, grant(&format!("g-{i:02}"), &["labs"])).await;
    }
    assert_eq!(
        slow.next_update(Duration::from_millis(600)).await,
        None,
        "nothing beyond heartbeats"
    );
    assert!(slow.heartbeats > 0);
    slow.ack().await;
    match slow.expect_update().await {
        Got::Delta {
            from: 1,
            to: 21,
            upserts,
            ..
        } => assert_eq!(upserts.len(), 20),
        other => panic!("expected one coalesced delta, got {other:?}"),
    }
    assert_eq!(slow.snapshot.len(), 20);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_stops_acknowledging_is_disconnected() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    let mut stuck = server.sidecar("node-stuck", &["labs"]).await;
    stuck.expect_update().await;
    create(&mut admin, grant("g-1", &["labs"])).await;
    // Never acknowledges: within the ack timeout (2 s) plus slack, the stream ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let status = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck sidecar still connected"
        );
        match stuck.raw(Duration::from_secs(1)).await {
            Err(status) => break status,
            Ok(_) => continue,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let sidecars = admin
        .list_sidecars(v1::ListSidecarsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sidecars;
    let s = sidecars.iter().find(|s| s.node_id == "node-stuck").unwrap();
    assert!(!s.connected);
    assert_eq!(s.acked_revision, 0);

    // A sidecar that does not even read is disconnected as well, and the server stays responsive.
    let _silent = server.sidecar("node-silent", &["labs"]).await;
    for i in 0..30 {
        create(&mut admin, grant(&format!("g-burst-{i}"), &["labs"])).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sidecars = admin
        .list_sidecars(v1::ListSidecarsRequest {})
        .await
        .unwrap()
        .into_inner()
        .sidecars;
    assert!(
        !sidecars
            .iter()
            .find(|s| s.node_id == "node-silent")
            .unwrap()
            .connected
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_propagation_reports_who_acknowledged_a_revoke() {
    let server = Server::start().await;
    let mut admin = server.admin().await;
    create(&mut admin, grant("g-1", &["labs"])).await;
    let fast = auto_ack(server.sidecar("node-fast", &["labs"]).await);
    let mut lagging = server.sidecar("node-lagging", &["labs"]).await;
    let _other = auto_ack(server.sidecar("node-billing", &["billing"]).await);
    lagging.expect_update().await;
    lagging.ack().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let r = revoke(&mut admin, "g-1").await;
    let wait = |timeout_ms| v1::PropagationRequest {
        revision: r.revision,
        datasets: r.datasets.clone(),
        timeout_ms,
    };
    let p = admin
        .wait_propagation(wait(800))
        .await
        .unwrap()
        .into_inner();
    assert!(!p.complete);
    let nodes: Vec<(&str, bool)> = p
        .sidecars
        .iter()
        .map(|s| (s.node_id.as_str(), s.acknowledged))
        .collect();
    assert_eq!(
        nodes,
        [("node-fast", true), ("node-lagging", false)],
        "only sidecars subscribed to labs"
    );
    let fast_ack = &p.sidecars[0];
    assert!(fast_ack.acked_at_ms > 0 && fast_ack.latency_ms >= 0 && fast_ack.connected);

    lagging.sync_to(r.revision).await;
    let p = admin
        .wait_propagation(wait(5000))
        .await
        .unwrap()
        .into_inner();
    assert!(p.complete, "{p:?}");
    assert!(p.sidecars.iter().all(|s| s.acknowledged));
    let status = admin
        .propagation_status(wait(0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status, p);
    fast.abort();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hello_is_refused() {
    let server = Server::start().await;
    let url = server.url();
    let mut bad = Sidecar::connect(&url, SIDECAR_TOKEN, "has space", &["labs"], 0, None)
        .await
        .unwrap();
    let err = bad.raw(WAIT).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node_id"), "{err:?}");
    let mut bad = Sidecar::connect(&url, SIDECAR_TOKEN, "node-a", &[], 0, None)
        .await
        .unwrap();
    let err = bad.raw(WAIT).await.unwrap_err();
    assert!(err.message().contains("datasets"), "{err:?}");
    server.stop().await;
}
