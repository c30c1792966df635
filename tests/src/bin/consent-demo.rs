//! The whole loop as a demo: consentd on SQLite, N sidecars running the real
//! filter, traffic from several grantees, then a revocation with wait, the
//! per-sidecar acknowledgement latency, the denials that follow, and the
//! audit trail of one request.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consent_core::wire::v1;
use consent_sim::mesh::{self, Consentd, eventually, grant_request, token_for};
use consent_sim::{HttpRequest, Sidecar};

const GRANTEES: [&str; 3] = [
    "spiffe://mesh/ns/analytics/sa/reader",
    "spiffe://mesh/ns/billing/sa/api",
    "spiffe://mesh/ns/partner/sa/lab",
];
const SUBJECTS: usize = 4;

struct Args {
    sidecars: usize,
    workers: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sidecars: 20,
        workers: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut number = |name: &str| -> anyhow::Result<usize> {
            let value = it
                .next()
                .with_context(|| format!("{name} needs a number"))?;
            let n: usize = value
                .parse()
                .with_context(|| format!("{name}: {value:?} is not a number"))?;
            if n == 0 || n > 500 {
                bail!("{name}: {n} is outside 1..=500");
            }
            Ok(n)
        };
        match flag.as_str() {
            "--sidecars" => args.sidecars = number("--sidecars")?,
            "--workers" => args.workers = number("--workers")?,
            "-h" | "--help" => {
                println!("consent-demo [--sidecars N (20)] [--workers N (2)]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

fn step(text: &str) {
    println!("\n\x1b[1m▶ {text}\x1b[0m");
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn request(subject: usize, grantee: &str, token: &str, id: &str) -> HttpRequest {
    HttpRequest::get(&format!("/records/patient-{subject}/items/1"))
        .header("x-purpose", "care")
        .header("x-consent-token", token)
        .header("x-request-id", id)
        .peer_identity(grantee)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consent-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("consentd.db");

    step("Starting consentd (SQLite, dev mode on loopback)");
    let consentd = Consentd::start(&db, 1000).await?;
    println!(
        "  consentd on {} · database {}",
        consentd.grpc,
        db.display()
    );
    let mut admin = consentd.admin().await?;

    step(&format!(
        "Creating {} grants: {} grantees × {SUBJECTS} patients",
        GRANTEES.len() * SUBJECTS,
        GRANTEES.len()
    ));
    let mut tokens = Vec::new();
    for (g, grantee) in GRANTEES.iter().enumerate() {
        for s in 0..SUBJECTS {
            let id = format!("g-{g}-{s}");
            let request = grant_request(&id, &format!("patient-{s}"), grantee, &["records"]);
            admin
                .create_grant(request)
                .await
                .with_context(|| format!("create {id}"))?;
            let token = token_for(&mut admin, &id, grantee).await?;
            tokens.push((id, s, *grantee, token.token));
        }
    }
    println!(
        "  {} grants active, one consent token issued for each",
        tokens.len()
    );

    step(&format!(
        "Starting {} sidecars × {} workers running consent_filter.wasm",
        args.sidecars, args.workers
    ));
    let started = Instant::now();
    let mut sidecars: Vec<(String, Sidecar)> = Vec::new();
    for i in 0..args.sidecars {
        let node = format!("sidecar-{i:02}");
        let sidecar =
            mesh::start_sidecar(&consentd, &node, &["records"], args.workers, 30, false).await?;
        sidecars.push((node, sidecar));
        print!("\r  started {}/{}", i + 1, args.sidecars);
        std::io::Write::flush(&mut std::io::stdout())?;
    }
    println!(" in {:.1} s", started.elapsed().as_secs_f64());
    let (first_id, first_subject, first_grantee, first_token) = tokens[0].clone();
    for (node, sidecar) in &sidecars {
        eventually(
            Duration::from_secs(60),
            &format!("{node} to sync"),
            || async {
                sidecar
                    .send(request(
                        first_subject,
                        first_grantee,
                        &first_token,
                        "warmup",
                    ))
                    .await
                    .is_ok_and(|r| r.status == 200)
            },
        )
        .await?;
    }
    println!("  every sidecar holds the snapshot");

    step("Traffic from every grantee through every sidecar");
    let mut allowed = 0;
    let mut sent = 0;
    for (n, (_, sidecar)) in sidecars.iter().enumerate() {
        for (k, (_, subject, grantee, token)) in tokens.iter().enumerate() {
            let worker = (n + k) % args.workers;
            let response = sidecar
                .send(request(*subject, grantee, token, &format!("before-{n}-{k}")).worker(worker))
                .await?;
            sent += 1;
            allowed += usize::from(response.status == 200);
        }
    }
    println!("  {allowed}/{sent} requests allowed");

    step(&format!(
        "patient-{first_subject} withdraws consent: revoking {first_id} and waiting for every sidecar"
    ));
    let revoked = admin
        .revoke_grant(v1::RevokeGrantRequest {
            id: first_id.clone(),
            actor: "consent-admin".into(),
            reason: "consent withdrawn".into(),
        })
        .await?
        .into_inner();
    let propagation = admin
        .wait_propagation(v1::PropagationRequest {
            revision: revoked.revision,
            datasets: revoked.datasets.clone(),
            timeout_ms: 10_000,
        })
        .await?
        .into_inner();
    let mut latencies: Vec<i64> = propagation
        .sidecars
        .iter()
        .filter(|s| s.acknowledged)
        .map(|s| s.latency_ms)
        .collect();
    latencies.sort_unstable();
    println!(
        "  revision {} · {}/{} sidecars acknowledged",
        revoked.revision,
        latencies.len(),
        propagation.sidecars.len()
    );
    println!(
        "  {:<12} {:>10} {:>12}",
        "sidecar", "revision", "ack latency"
    );
    for ack in &propagation.sidecars {
        let latency = if ack.acknowledged {
            format!("{} ms", ack.latency_ms)
        } else {
            "NOT ACKED".into()
        };
        println!(
            "  {:<12} {:>10} {:>12}",
            ack.node_id, ack.acked_revision, latency
        );
    }
    println!(
        "  ack latency: p50 {} ms · p99 {} ms · max {} ms",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0)
    );
    if !propagation.complete {
        bail!("not every sidecar acknowledged the revocation");
    }

    step("The same traffic again");
    let mut denied = Vec::new();
    let mut allowed = 0;
    for (n, (node, sidecar)) in sidecars.iter().enumerate() {
        for (k, (id, subject, grantee, token)) in tokens.iter().enumerate() {
            let worker = (n + k) % args.workers;
            let request_id = format!("after-{n}-{k}");
            let response = sidecar
                .send(request(*subject, grantee, token, &request_id).worker(worker))
                .await?;
            if response.status == 200 {
                allowed += 1;
            } else {
                denied.push((
                    node.clone(),
                    id.clone(),
                    response.status,
                    response.body_text(),
                    request_id,
                ));
            }
        }
    }
    println!("  {allowed} allowed, {} denied", denied.len());
    for (node, id, status, body, _) in denied.iter().take(5) {
        println!("  {node} {id} → {status} {body}");
    }
    if denied.len() > 5 {
        println!("  … and {} more, all for {first_id}", denied.len() - 5);
    }
    if denied.len() != sidecars.len() || denied.iter().any(|(_, id, ..)| *id != first_id) {
        bail!("expected exactly one denial per sidecar, all for {first_id}");
    }

    step("The audit trail of one denied request");
    let request_id = denied[0].4.clone();
    let records = mesh::audit_of_request(&mut admin, &request_id, Duration::from_secs(15)).await?;
    let grant_history = admin
        .query_audit(v1::QueryAuditRequest {
            grant_id: first_id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .records;
    let changes = grant_history
        .iter()
        .filter(|r| matches!(r.record, Some(v1::audit_record::Record::Change(_))));
    for record in changes.chain(&records) {
        match &record.record {
            Some(v1::audit_record::Record::Change(c)) if c.grant_id == first_id => {
                println!(
                    "  #{:<4} {:<12} {:<12} by {:<14} revision {} {}",
                    record.seq, "admin", c.kind, c.actor, c.revision, c.detail
                );
            }
            Some(v1::audit_record::Record::Decision(d)) if d.request_id == request_id => {
                println!(
                    "  #{:<4} {:<12} {:<12} grant {} jti {} caller {} subject {} route {} reason {} at revision {}",
                    record.seq,
                    d.node_id,
                    if d.outcome == v1::Outcome::Deny as i32 {
                        "deny"
                    } else {
                        "allow"
                    },
                    d.grant_id,
                    d.token_jti,
                    d.caller,
                    d.subject,
                    d.route,
                    d.reason,
                    d.snapshot_revision
                );
            }
            _ => {}
        }
    }
    println!("\nDone: the withdrawal reached every sidecar and is enforced on every worker.");
    for (_, sidecar) in sidecars {
        sidecar.stop();
    }
    Ok(())
}
