//! End to end: the release `consent_filter.wasm` in consent-sim sidecars, a
//! real consentd process on SQLite over loopback, and the admin API. Each test
//! proves one promise of the system from the outside.

use std::time::Duration;

use consent_control_plane::proto::consent_admin_client::ConsentAdminClient;
use consent_core::wire::v1;
use consent_filter::store::{Keys, Meta};
use consent_sim::mesh::{self, Consentd, eventually, grant_request, token_for, unix_now};
use consent_sim::{HttpRequest, HttpResponse, Sidecar};
use serde_json::Value;
use tonic::transport::Channel;

type Admin = ConsentAdminClient<Channel>;

const READER: &str = "spiffe://mesh/ns/analytics/sa/reader";
const PARTNER: &str = "spiffe://mesh/ns/partner/sa/lab";
const PREFIX: &str = "consent/consent/";
const WAIT: Duration = Duration::from_secs(20);

struct World {
    consentd: Consentd,
    admin: Admin,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let consentd = Consentd::start(&dir.path().join("consentd.db"), 200)
        .await
        .unwrap();
    let admin = consentd.admin().await.unwrap();
    World {
        consentd,
        admin,
        _dir: dir,
    }
}

async fn create(admin: &mut Admin, request: v1::CreateGrantRequest) -> v1::Grant {
    admin
        .create_grant(request)
        .await
        .unwrap()
        .into_inner()
        .grant
        .unwrap()
}

async fn sidecar(w: &World, node: &str, datasets: &[&str], workers: usize) -> Sidecar {
    mesh::start_sidecar(&w.consentd, node, datasets, workers, 30, false)
        .await
        .unwrap()
}

fn meta(sidecar: &Sidecar) -> Option<Meta> {
    let (bytes, _) = sidecar.shared_data_get(&Keys::new(PREFIX).meta())?;
    Meta::decode(&bytes)
}

/// Waits until the sidecar has applied `revision`.
async fn synced(sidecar: &Sidecar, revision: u64) {
    eventually(
        WAIT,
        &format!("the sidecar to apply revision {revision}"),
        || async { meta(sidecar).is_some_and(|m| m.revision >= revision) },
    )
    .await
    .unwrap();
}

fn read(subject: &str, caller: &str, token: Option<&str>) -> HttpRequest {
    read_for("care", subject, caller, token)
}

fn read_for(purpose: &str, subject: &str, caller: &str, token: Option<&str>) -> HttpRequest {
    let mut request = HttpRequest::get(&format!("/records/{subject}/items/7"))
        .header("x-purpose", purpose)
        .peer_identity(caller);
    if let Some(token) = token {
        request = request.header("x-consent-token", token);
    }
    request
}

fn reason(response: &HttpResponse) -> String {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    body["reason"].as_str().unwrap_or("").to_owned()
}

async fn send(sidecar: &Sidecar, request: HttpRequest) -> HttpResponse {
    sidecar.send(request).await.unwrap()
}

async fn revoke_and_wait(admin: &mut Admin, id: &str) -> v1::PropagationResponse {
    let revoked = admin
        .revoke_grant(v1::RevokeGrantRequest {
            id: id.into(),
            actor: "e2e".into(),
            reason: "withdrawn".into(),
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .wait_propagation(v1::PropagationRequest {
            revision: revoked.revision,
            datasets: revoked.datasets,
            timeout_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_is_allowed_and_a_forged_grant_header_is_replaced() {
    let mut w = world().await;
    let grant = create(
        &mut w.admin,
        grant_request("g-allow", "patient-1", READER, &["records"]),
    )
    .await;
    let sc = sidecar(&w, "node-a", &["records"], 2).await;
    synced(&sc, grant.revision).await;
    let token = token_for(&mut w.admin, "g-allow", READER).await.unwrap();

    let response = send(
        &sc,
        read("patient-1", READER, Some(&token.token)).header("x-consent-grant", "forged"),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body_text());
    let upstream = response.upstream_request.expect("forwarded upstream");
    assert_eq!(upstream.header("x-consent-grant"), Some("g-allow"));
    // Unprotected routes pass untouched.
    let response = send(&sc, HttpRequest::get("/healthz")).await;
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_reason_reachable_from_outside_is_named() {
    let mut w = world().await;
    create(
        &mut w.admin,
        grant_request("g-1", "patient-1", READER, &["records"]),
    )
    .await;
    let other = create(
        &mut w.admin,
        grant_request("g-other", "patient-2", PARTNER, &["records"]),
    )
    .await;
    let sc = sidecar(&w, "node-a", &["records"], 1).await;
    synced(&sc, other.revision).await;
    let token = token_for(&mut w.admin, "g-1", READER).await.unwrap().token;

    let cases: Vec<(HttpRequest, u16, &str)> = vec![
        (
            HttpRequest::get("/records/patient-1/items/7")
                .header("x-consent-token", &token)
                .header("x-purpose", "care"),
            401,
            "missing_identity",
        ),
        (read("patient-1", READER, None), 403, "missing_token"),
        (
            read("patient-1", READER, Some("not.a.token")),
            403,
            "token_invalid",
        ),
        (
            read("patient-1", PARTNER, Some(&token)),
            403,
            "token_grantee_mismatch",
        ),
        (
            read("patient-2", READER, Some(&token)),
            403,
            "subject_mismatch",
        ),
        (
            read_for("marketing", "patient-1", READER, Some(&token)),
            403,
            "purpose_not_granted",
        ),
    ];
    for (request, status, expected) in cases {
        let response = send(&sc, request).await;
        assert_eq!(
            (response.status, reason(&response).as_str()),
            (status, expected),
            "{}",
            response.body_text()
        );
        let body: Value = serde_json::from_slice(&response.body).unwrap();
        assert!(
            body["error"].is_string() && body["request_id"].is_string(),
            "{body}"
        );
    }
    let metrics = sc.metrics();
    assert!(
        metrics
            .get("consent.decision.deny.missing_token")
            .copied()
            .unwrap_or(0)
            >= 1,
        "{metrics:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_once_acknowledged_denies_on_every_worker() {
    let mut w = world().await;
    let grant = create(
        &mut w.admin,
        grant_request("g-rev", "patient-1", READER, &["records"]),
    )
    .await;
    let sc = sidecar(&w, "node-a", &["records"], 3).await;
    synced(&sc, grant.revision).await;
    let token = token_for(&mut w.admin, "g-rev", READER)
        .await
        .unwrap()
        .token;
    for worker in 0..3 {
        assert_eq!(
            send(&sc, read("patient-1", READER, Some(&token)).worker(worker))
                .await
                .status,
            200
        );
    }

    let propagation = revoke_and_wait(&mut w.admin, "g-rev").await;
    assert!(propagation.complete, "{propagation:?}");
    let node = propagation
        .sidecars
        .iter()
        .find(|s| s.node_id == "node-a")
        .expect("node-a listed");
    assert!(node.acknowledged && node.acked_revision >= propagation.revision);
    // Acknowledged means applied: every worker denies from now on.
    for worker in 0..3 {
        let response = send(&sc, read("patient-1", READER, Some(&token)).worker(worker)).await;
        assert_eq!(
            (response.status, reason(&response).as_str()),
            (403, "grant_revoked"),
            "worker {worker}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_expires_by_the_sidecar_clock_without_a_message() {
    let mut w = world().await;
    let mut request = grant_request("g-exp", "patient-1", READER, &["records"]);
    request.expires_at = unix_now() + 20;
    let grant = create(&mut w.admin, request).await;
    let sc = sidecar(&w, "node-a", &["records"], 2).await;
    synced(&sc, grant.revision).await;
    let token = token_for(&mut w.admin, "g-exp", READER)
        .await
        .unwrap()
        .token;
    assert_eq!(
        send(&sc, read("patient-1", READER, Some(&token)))
            .await
            .status,
        200
    );

    // The token (capped at the grant's expiry) is still inside its clock
    // tolerance; the grant itself is over.
    sc.advance(Duration::from_secs(25)).await.unwrap();
    let response = send(&sc, read("patient-1", READER, Some(&token))).await;
    assert_eq!(
        (response.status, reason(&response).as_str()),
        (403, "grant_expired")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_fails_closed_after_max_staleness_and_resumes_with_deltas() {
    let mut w = world().await;
    let grant = create(
        &mut w.admin,
        grant_request("g-cut", "patient-1", READER, &["records"]),
    )
    .await;
    let sc = sidecar(&w, "node-a", &["records"], 2).await;
    synced(&sc, grant.revision).await;
    let token = token_for(&mut w.admin, "g-cut", READER)
        .await
        .unwrap()
        .token;
    let generation = meta(&sc).unwrap().generation;

    w.consentd.kill();
    sc.advance(Duration::from_secs(31)).await.unwrap();
    let response = send(&sc, read("patient-1", READER, Some(&token))).await;
    assert_eq!(
        (response.status, reason(&response).as_str()),
        (503, "snapshot_stale")
    );
    assert!(response.header("retry-after").is_some());
    // A fail-open (token-less) route still decides with what it holds.
    let open = send(
        &sc,
        HttpRequest::get("/open/records/patient-1").peer_identity(READER),
    )
    .await;
    assert_eq!(open.status, 200, "{}", open.body_text());

    w.consentd.restart().await.unwrap();
    let mut admin = w.consentd.admin().await.unwrap();
    eventually(WAIT, "node-a to reconnect", || {
        let mut admin = admin.clone();
        async move {
            let listed = admin.list_sidecars(v1::ListSidecarsRequest {}).await;
            listed.is_ok_and(|r| {
                r.into_inner()
                    .sidecars
                    .iter()
                    .any(|s| s.node_id == "node-a" && s.connected)
            })
        }
    })
    .await
    .unwrap();
    let propagation = revoke_and_wait(&mut admin, "g-cut").await;
    let node = propagation.sidecars.iter().find(|s| s.node_id == "node-a");
    assert!(
        propagation.complete && node.is_some_and(|n| n.acknowledged),
        "{propagation:?}"
    );
    let response = send(&sc, read("patient-1", READER, Some(&token))).await;
    assert_eq!(reason(&response), "grant_revoked");
    assert_eq!(
        meta(&sc).unwrap().generation,
        generation,
        "resumed with deltas, no full snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_records_the_decision_and_never_blocks() {
    let w = world().await;
    let sc = mesh::start_sidecar(&w.consentd, "node-dry", &["records"], 1, 30, true)
        .await
        .unwrap();
    let mut admin = w.consentd.admin().await.unwrap();
    let grant = create(
        &mut admin,
        grant_request("g-dry", "patient-1", READER, &["records"]),
    )
    .await;
    synced(&sc, grant.revision).await;
    let response = send(&sc, read("patient-1", READER, None)).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        sc.metrics()
            .get("consent.decision.deny.missing_token")
            .copied(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_a_key_rotation_and_new_keys_reach_the_sidecar() {
    let mut w = world().await;
    let grant = create(
        &mut w.admin,
        grant_request("g-key", "patient-1", READER, &["records"]),
    )
    .await;
    let sc = sidecar(&w, "node-a", &["records"], 2).await;
    synced(&sc, grant.revision).await;
    let old = token_for(&mut w.admin, "g-key", READER).await.unwrap();

    let rotated = w
        .admin
        .rotate_signing_key(v1::RotateSigningKeyRequest {
            actor: "e2e".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.kid, old.kid);
    let new = token_for(&mut w.admin, "g-key", READER).await.unwrap();
    assert_eq!(new.kid, rotated.kid);
    eventually(WAIT, "the new key to reach the sidecar", || async {
        send(&sc, read("patient-1", READER, Some(&new.token)))
            .await
            .status
            == 200
    })
    .await
    .unwrap();
    assert_eq!(
        send(&sc, read("patient-1", READER, Some(&old.token)))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_parent_revokes_what_was_shared_onward() {
    let mut w = world().await;
    create(
        &mut w.admin,
        grant_request("g-parent", "patient-1", READER, &["records"]),
    )
    .await;
    let mut child = grant_request("g-child", "patient-1", PARTNER, &["records"]);
    child.parent = "g-parent".into();
    child.actions = vec!["read".into()];
    child.purposes = vec!["research".into()];
    child.permissions = vec![v1::Permission::Access as i32];
    child.expires_at -= 60;
    let child = create(&mut w.admin, child).await;
    let sc = sidecar(&w, "node-a", &["records"], 2).await;
    synced(&sc, child.revision).await;
    let token = token_for(&mut w.admin, "g-child", PARTNER)
        .await
        .unwrap()
        .token;
    let as_partner = || read_for("research", "patient-1", PARTNER, Some(&token));
    assert_eq!(send(&sc, as_partner()).await.status, 200);

    let propagation = revoke_and_wait(&mut w.admin, "g-parent").await;
    assert!(propagation.complete);
    let response = send(&sc, as_partner()).await;
    assert_eq!(
        (response.status, reason(&response).as_str()),
        (403, "parent_revoked")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sidecar_receives_only_the_grants_of_its_datasets() {
    let mut w = world().await;
    create(
        &mut w.admin,
        grant_request("g-labs", "patient-1", READER, &["labs"]),
    )
    .await;
    let records = create(
        &mut w.admin,
        grant_request("g-records", "patient-1", READER, &["records"]),
    )
    .await;
    let labs_sc = sidecar(&w, "node-labs", &["labs"], 1).await;
    let records_sc = sidecar(&w, "node-records", &["records"], 1).await;
    synced(&labs_sc, records.revision).await;
    synced(&records_sc, records.revision).await;
    let keys = Keys::new(PREFIX);
    let held = |sc: &Sidecar, id: &str| {
        let generation = meta(sc).unwrap().generation;
        sc.shared_data_get(&keys.grant(generation, id))
            .is_some_and(|(v, _)| !v.is_empty())
    };
    assert!(held(&labs_sc, "g-labs") && !held(&labs_sc, "g-records"));
    assert!(held(&records_sc, "g-records") && !held(&records_sc, "g-labs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_events_reach_the_audit_log_linked_to_grant_token_and_request() {
    let mut w = world().await;
    let grant = create(
        &mut w.admin,
        grant_request("g-audit", "patient-1", READER, &["records"]),
    )
    .await;
    let sc = sidecar(&w, "node-a", &["records"], 2).await;
    synced(&sc, grant.revision).await;
    let token = token_for(&mut w.admin, "g-audit", READER).await.unwrap();
    let request =
        read("patient-1", READER, Some(&token.token)).header("x-request-id", "req-audit-1");
    assert_eq!(send(&sc, request).await.status, 200);

    let records = mesh::audit_of_request(&mut w.admin, "req-audit-1", WAIT)
        .await
        .unwrap();
    let found = records.into_iter().find_map(|r| match r.record {
        Some(v1::audit_record::Record::Decision(d)) => Some(d),
        _ => None,
    });
    let event = found.unwrap();
    assert_eq!(
        (event.grant_id.as_str(), event.token_jti.as_str()),
        ("g-audit", token.jti.as_str())
    );
    assert_eq!(
        (event.caller.as_str(), event.subject.as_str()),
        (READER, "patient-1")
    );
    assert_eq!(event.outcome, v1::Outcome::Allow as i32);
    assert_eq!(event.node_id, "node-a");
}

/// The worker that last logged taking the sync lease.
fn leader_worker(sidecar: &Sidecar) -> Option<usize> {
    sidecar
        .logs()
        .iter()
        .rev()
        .find(|e| e.message.contains("took the sync lease"))
        .and_then(|e| e.vm.strip_prefix("worker ")?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapped_leader_is_replaced_and_the_new_leader_resumes_from_shared_data() {
    let mut w = world().await;
    let grant = create(
        &mut w.admin,
        grant_request("g-lead", "patient-1", READER, &["records"]),
    )
    .await;
    let sc = sidecar(&w, "node-a", &["records"], 3).await;
    synced(&sc, grant.revision).await;
    let token = token_for(&mut w.admin, "g-lead", READER)
        .await
        .unwrap()
        .token;
    let generation = meta(&sc).unwrap().generation;
    let leader = leader_worker(&sc).expect("a worker logged taking the lease");

    sc.inject_trap(leader).await.unwrap();
    let response = send(&sc, read("patient-1", READER, Some(&token)).worker(leader)).await;
    assert_eq!(response.status, 503, "a trapped worker fails closed");
    // The lease is 2 s: another worker must take over within two periods.
    eventually(
        Duration::from_secs(5),
        "another worker to take the lease",
        || async { leader_worker(&sc).is_some_and(|w| w != leader) },
    )
    .await
    .unwrap();

    let propagation = revoke_and_wait(&mut w.admin, "g-lead").await;
    let node = propagation.sidecars.iter().find(|s| s.node_id == "node-a");
    assert!(
        propagation.complete && node.is_some_and(|n| n.acknowledged),
        "{propagation:?}"
    );
    for worker in (0..3).filter(|&i| i != leader) {
        let response = send(&sc, read("patient-1", READER, Some(&token)).worker(worker)).await;
        assert_eq!(reason(&response), "grant_revoked", "worker {worker}");
    }
    assert_eq!(
        meta(&sc).unwrap().generation,
        generation,
        "the new leader resumed, no full snapshot"
    );
}
