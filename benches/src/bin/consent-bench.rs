//! consent-bench: runs every benchmark section in one process, on one
//! machine, and writes RESULTS.md and its plots. `./scripts/bench.sh` builds
//! what it needs (release binaries, the wasm-release filter) and runs it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use consent_benches::machine::Machine;
use consent_benches::report::Results;
use consent_benches::{per_request, plot};

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

    results.wall_secs = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out)?;
    let decision_series: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    let mut references = Vec::new();
    if let Some(cached) = results.per_request.as_ref().and_then(|r| r.kinds.first()) {
        if let Some(s) = consent_benches::stats::Summary::of(&cached.decision_ns) {
            references.push(("filter, cached token (in wasm)".to_owned(), s.p50));
        }
        if let Some(s) = consent_benches::stats::Summary::of(&cached.ext_authz_ns) {
            references.push(("ext_authz round trip".to_owned(), s.p50));
        }
    }
    plot::decision(
        &args.out.join("decision.svg"),
        &decision_series,
        &references,
    )?;
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
