//! consent-bench: runs every benchmark section in one process, on one
//! machine, and writes RESULTS.md and its plots. `./scripts/bench.sh` builds
//! what it needs (release binaries, the wasm-release filter) and runs it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use consent_benches::engines::{
    CedarEngine, CoreEngine, Engine, RegoEngine, check_agreement, load_timed,
};
use consent_benches::machine::Machine;
use consent_benches::report::{DecisionRow, Results};
use consent_benches::stats::{Summary, calibrate, per_call_batched};
use consent_benches::{bootstrap, fixtures, per_request, plot, propagation};

#[derive(Parser, Debug)]
#[command(about = "Measure consent-mesh and write RESULTS.md with its plots")]
struct Args {
    /// Directory for RESULTS.md, decision.svg and propagation.svg.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR")))]
    out: PathBuf,
    /// Small sizes everywhere: checks the whole run works in seconds; its
    /// figures are not worth reading.
    #[arg(long)]
    quick: bool,
    /// The command line to print in RESULTS.md.
    #[arg(long, default_value = "./scripts/bench.sh")]
    command: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut results = Results {
        command: args.command.clone(),
        machine: Machine::read(),
        ..Results::default()
    };

    let sizes: &[usize] = if args.quick {
        &[1, 1_000]
    } else {
        &[1, 10_000, 1_000_000]
    };
    for &n in sizes {
        eprintln!("consent-bench: decision cost at {n} grants (consent-core, Cedar, Rego)");
        decision_at(n, &mut results)?;
    }

    eprintln!("consent-bench: per-request cost in the filter and through ext_authz");
    let options = if args.quick {
        per_request::Options {
            grants: 200,
            hot_grants: 20,
            requests: 200,
            first_seen: 20,
        }
    } else {
        per_request::Options::default()
    };
    results.per_request = Some(
        per_request::run(&options)
            .await
            .context("per-request section")?,
    );

    eprintln!("consent-bench: revocation propagation to emulated sidecars");
    let options = if args.quick {
        propagation::PropagationOptions {
            sizes: vec![1, 20],
            rounds: 5,
            min_per_sidecar_samples: 20,
            warmup_rounds: 1,
            idle_window: std::time::Duration::from_secs(1),
            idle_window_no_streams: std::time::Duration::from_millis(500),
            ..Default::default()
        }
    } else {
        propagation::PropagationOptions::default()
    };
    results.propagation = Some(
        propagation::run(&options)
            .await
            .context("propagation section")?,
    );

    let grants = if args.quick { 500 } else { 100_000 };
    eprintln!("consent-bench: snapshot bootstrap of {grants} grants");
    results.bootstrap = Some(bootstrap::run(grants).await.context("bootstrap section")?);

    results.wall_secs = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out)?;
    let mut decision_series: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    for row in &results.decision {
        let p50 = Summary::of(&row.per_call_ns).map_or(f64::NAN, |s| s.p50);
        match decision_series
            .iter_mut()
            .find(|(name, _)| name == row.engine)
        {
            Some((_, points)) => points.push((row.grants, p50)),
            None => decision_series.push((row.engine.to_owned(), vec![(row.grants, p50)])),
        }
    }
    let mut references = Vec::new();
    if let Some(cached) = results.per_request.as_ref().and_then(|r| r.kinds.first()) {
        if let Some(s) = Summary::of(&cached.decision_ns) {
            references.push(("filter, cached token (in wasm)".to_owned(), s.p50));
        }
        if let Some(s) = Summary::of(&cached.ext_authz_ns) {
            references.push(("ext_authz round trip".to_owned(), s.p50));
        }
    }
    plot::decision(
        &args.out.join("decision.svg"),
        &decision_series,
        &references,
    )?;
    if let Some(p) = &results.propagation {
        let series: Vec<(String, Vec<f64>)> = p
            .runs
            .iter()
            .map(|r| {
                (
                    format!("N = {} sidecars", r.sidecars),
                    r.per_sidecar_ms.clone(),
                )
            })
            .collect();
        plot::latency_cdf(
            &args.out.join("propagation.svg"),
            "Revocation: each sidecar's acknowledgement after the revoke",
            &series,
        )?;
    }
    let results_md = args.out.join("RESULTS.md");
    std::fs::write(&results_md, results.to_markdown())
        .with_context(|| format!("writing {}", results_md.display()))?;
    eprintln!(
        "consent-bench: wrote {} in {:.0} s",
        results_md.display(),
        results.wall_secs
    );
    Ok(())
}

/// Loads `n` grants into each engine, checks they agree on the shared cases,
/// then times one decision per engine over a spread of timing cases.
fn decision_at(n: usize, results: &mut Results) -> anyhow::Result<()> {
    let grants = fixtures::grants(n);
    let cases = fixtures::cases(&grants);
    let timing = fixtures::timing_cases(&grants, 4096);
    let (core, core_load) = load_timed(|| CoreEngine::load(&grants))?;
    let (cedar, cedar_load) = load_timed(|| CedarEngine::load(&grants))?;
    let (rego, rego_load) = load_timed(|| RegoEngine::load(&grants))?;
    drop(grants);
    let engines: [(&dyn Engine, f64); 3] = [
        (&core, core_load.elapsed.as_secs_f64()),
        (&cedar, cedar_load.elapsed.as_secs_f64()),
        (&rego, rego_load.elapsed.as_secs_f64()),
    ];
    check_agreement(&engines.map(|(e, _)| e), &cases)
        .with_context(|| format!("the engines disagree at {n} grants; nothing was timed"))?;
    results.agreement.push((n, cases.len()));
    for (engine, load_secs) in engines {
        let per_batch = calibrate(std::time::Duration::from_millis(2), |i| {
            engine.allows(&timing[i % timing.len()])
        });
        let per_call_ns =
            per_call_batched(150, per_batch, |i| engine.allows(&timing[i % timing.len()]));
        results.decision.push(DecisionRow {
            engine: engine.name(),
            grants: n,
            load_secs,
            per_call_ns,
        });
    }
    Ok(())
}
