//! kill -9 of the consentd binary during a burst of writes, then a restart:
//! every acknowledged write is there, revisions are dense, sidecars resume with
//! deltas. Also consentctl against the binary.

use std::process::Stdio;
use std::time::Duration;

use consent_core::wire::v1;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::*;

struct Daemon {
    child: Child,
    url: String,
}

async fn spawn_consentd(db: &std::path::Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_consentd"))
        .args([
            "--db",
            db.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--heartbeat-ms",
            "200",
            "--ack-timeout-ms",
            "5000",
            "--log",
            "warn",
        ])
        .env("CONSENTD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("CONSENTD_SIDECAR_TOKEN", SIDECAR_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("consentd starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("consentd prints its address")
        .unwrap()
        .unwrap();
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .expect("grpc= in the banner")
        .to_owned();
    Daemon {
        child,
        url: format!("http://{grpc}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_burst_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consentd.db");
    let mut daemon = spawn_consentd(&db).await;
    let mut admin = admin_client(&daemon.url, Some(ADMIN_TOKEN)).await;
    create(&mut admin, grant("g-seed", &["labs"])).await;
    let mut sidecar = Sidecar::connect(&daemon.url, SIDECAR_TOKEN, "node-a", &["labs"], 0, None)
        .await
        .unwrap();
    sidecar.sync_to(2).await;
    let held = sidecar.snapshot.clone();
    drop(sidecar);

    // Writers record every write the server acknowledged; the process dies under them.
    let url = daemon.url.clone();
    let burst = tokio::spawn(async move {
        let mut admin = admin_client(&url, Some(ADMIN_TOKEN)).await;
        let mut created = Vec::new();
        let mut revoked = Vec::new();
        for i in 0.. {
            let id = format!("g-{i:04}");
            match admin.create_grant(grant(&id, &["labs"])).await {
                Ok(r) => created.push((id.clone(), r.into_inner().grant.unwrap().revision)),
                Err(_) => break,
            }
            if i % 3 == 0 {
                let req = v1::RevokeGrantRequest {
                    id: id.clone(),
                    actor: "alice".into(),
                    reason: "burst".into(),
                };
                match admin.revoke_grant(req).await {
                    Ok(r) => revoked.push((id, r.into_inner().revision)),
                    Err(_) => break,
                }
            }
        }
        (created, revoked)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.child.start_kill().unwrap(); // SIGKILL
    daemon.child.wait().await.unwrap();
    let (created, revoked) = tokio::time::timeout(WAIT, burst).await.unwrap().unwrap();
    assert!(
        created.len() > 5,
        "the burst made progress before the kill ({})",
        created.len()
    );

    let daemon = spawn_consentd(&db).await;
    let mut admin = admin_client(&daemon.url, Some(ADMIN_TOKEN)).await;
    for (id, _) in &created {
        let g = admin
            .get_grant(v1::GetGrantRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .grant
            .unwrap();
        // An acknowledged revoke must survive. A revoke in flight at the kill
        // may have committed without its reply reaching us: either state is
        // then correct.
        let acknowledged_revoke = revoked.iter().any(|(r, _)| r == id);
        if acknowledged_revoke {
            assert_eq!(
                g.status,
                v1::GrantStatus::Revoked as i32,
                "{id}: acknowledged revoke lost"
            );
        }
    }
    // Revisions are dense: 1..=head, each with its commit time.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let revisions: Vec<i64> = conn
        .prepare("SELECT revision FROM revisions ORDER BY revision")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let head = *revisions.last().unwrap();
    assert_eq!(revisions, (1..=head).collect::<Vec<_>>());
    let acked_max = created
        .iter()
        .map(|c| c.1)
        .chain(revoked.iter().map(|r| r.1))
        .max()
        .unwrap();
    assert!(head as u64 >= acked_max);

    // The sidecar resumes from its revision with a delta, not a snapshot.
    let mut resumed = Sidecar::connect(
        &daemon.url,
        SIDECAR_TOKEN,
        "node-a",
        &["labs"],
        2,
        Some(held),
    )
    .await
    .unwrap();
    match resumed.expect_update().await {
        Got::Delta { from: 2, to, .. } => assert_eq!(to, head as u64),
        other => panic!("expected a delta, got {other:?}"),
    }
    let holds: Vec<String> = resumed.ids();
    for (id, _) in &created {
        assert!(holds.contains(id), "{id} missing after resume");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consentctl_revoke_wait_reports_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = spawn_consentd(&dir.path().join("consentd.db")).await;
    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_consentctl"))
            .args(["--server", &daemon.url])
            .args(args)
            .env("CONSENTCTL_TOKEN", ADMIN_TOKEN)
            .env("CONSENTCTL_ACTOR", "alice")
            .output()
            .unwrap()
    };
    let create_args = |id: &str| {
        vec![
            "create".to_string(),
            "--id".into(),
            id.into(),
            "--subject".into(),
            "patient-1".into(),
            "--grantee".into(),
            "spiffe://mesh/ns/a/sa/reader".into(),
            "--purposes".into(),
            "care".into(),
            "--datasets".into(),
            "labs".into(),
            "--actions".into(),
            "read".into(),
            "--permissions".into(),
            "access".into(),
            "--expires-at".into(),
            "+1d".into(),
        ]
    };
    let args = create_args("g-1");
    let out =
        tokio::task::block_in_place(|| ctl(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("g-1"));

    let sidecar = Sidecar::connect(&daemon.url, SIDECAR_TOKEN, "node-a", &["labs"], 0, None)
        .await
        .unwrap();
    let acking = auto_ack(sidecar);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = tokio::task::block_in_place(|| {
        ctl(&[
            "revoke",
            "g-1",
            "--reason",
            "withdrawn",
            "--wait",
            "--timeout",
            "5s",
        ])
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("node-a") && stdout.contains(" ms"),
        "{stdout}"
    );
    acking.abort();

    // A subscribed sidecar that does not acknowledge makes --wait fail.
    let args = create_args("g-2");
    let out =
        tokio::task::block_in_place(|| ctl(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(out.status.success());
    let mut mute = Sidecar::connect(&daemon.url, SIDECAR_TOKEN, "node-mute", &["labs"], 0, None)
        .await
        .unwrap();
    mute.expect_update().await;
    let out = tokio::task::block_in_place(|| {
        ctl(&[
            "revoke",
            "g-2",
            "--reason",
            "withdrawn",
            "--wait",
            "--timeout",
            "1s",
        ])
    });
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node-mute") && stderr.lines().count() == 1,
        "{stderr}"
    );

    let out = tokio::task::block_in_place(|| ctl(&["-o", "json", "audit", "--grant", "g-1"]));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["create", "revoke"]);

    let out = tokio::task::block_in_place(|| ctl(&["get", "g-missing"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("consentctl: NotFound"));
}
