//! Runs the propagation and bootstrap sections alone and prints their
//! figures, without the rest of `consent-bench`:
//!
//! ```text
//! cargo build --release -p consent-control-plane --bin consentd
//! cargo build -p consent-filter --target wasm32-wasip1 --profile wasm-release
//! cargo run --release -p consent-benches --example propagation -- --sizes 1,100,1000 --grants 100000
//! ```
//!
//! `--sizes 0` skips propagation, `--grants 0` skips bootstrap. An example
//! lives in `target/release/examples/`, where `consent_sim::mesh` does not look:
//! set `CONSENTD_BIN=target/release/consentd` and `CARGO_TARGET_DIR=target`
//! (for the filter's `.wasm`) when running the built example directly.

use std::time::Duration;

use clap::Parser;
use consent_benches::bootstrap;
use consent_benches::propagation::{self, PropagationOptions};
use consent_benches::stats::Summary;

#[derive(Parser)]
struct Args {
    /// Sidecar counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    sizes: Vec<usize>,
    /// Measured revoke rounds per size (at least).
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Seconds consentd is watched idle with every stream connected.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Grants for the bootstrap section; 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    grants: usize,
}

fn line(what: &str, samples: &[f64]) {
    match Summary::of(samples) {
        Some(s) => println!(
            "  {what:<22} n={:<6} p50={:>8.2} p99={:>8.2} max={:>8.2} mean={:>8.2}",
            s.count, s.p50, s.p99, s.max, s.mean
        ),
        None => println!("  {what:<22} no samples"),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes: Vec<usize> = args.sizes.into_iter().filter(|n| *n > 0).collect();
    if !sizes.is_empty() {
        let opts = PropagationOptions {
            sizes,
            rounds: args.rounds,
            idle_window: Duration::from_secs(args.idle_secs),
            ..PropagationOptions::default()
        };
        let started = std::time::Instant::now();
        let report = propagation::run(&opts).await?;
        println!(
            "propagation ({:.1} s), milliseconds from RevokeGrant sent:",
            started.elapsed().as_secs_f64()
        );
        for r in &report.runs {
            println!(
                "N={} rounds={} (connect + snapshots {:.2} s)",
                r.sidecars, r.rounds, r.connect_secs
            );
            line("per-sidecar ack", &r.per_sidecar_ms);
            line("all acked", &r.all_acked_ms);
            line("WaitPropagation", &r.wait_propagation_ms);
            line("RevokeGrant returned", &r.revoke_rpc_ms);
            line("consentd latency_ms", &r.server_latency_ms);
            let c = &r.cost;
            println!(
                "  consentd RSS idle {} KiB, connected {} KiB, after {} KiB ({:.0} KiB per 1000 streams); threads {} / {} / {}",
                c.rss_idle_kib,
                c.rss_connected_kib,
                c.rss_after_kib,
                c.rss_per_1000_streams_kib(),
                c.threads_idle,
                c.threads_connected,
                c.threads_after
            );
            println!(
                "  consentd CPU: idle {:.4}/s no streams, {:.4}/s with {} streams ({:.4}/s per 1000); connect {:.2} s",
                c.idle_cpu_per_sec_no_streams,
                c.idle_cpu_per_sec,
                c.streams,
                c.idle_cpu_per_sec_per_1000(),
                c.connect_cpu_secs
            );
            println!(
                "  rounds: {:.2} s CPU over {:.2} s wall, {} revokes: {:.2} ms CPU per revoke ({:.2} ms per 1000 streams); bench process {:.2} s CPU",
                c.rounds_cpu_secs,
                c.rounds_wall_secs,
                c.revokes,
                c.cpu_per_revoke_secs() * 1e3,
                c.cpu_per_revoke_per_1000_secs() * 1e3,
                c.bench_cpu_secs_during_rounds
            );
            let threads: Vec<String> = c
                .rounds_cpu_by_thread
                .iter()
                .map(|t| format!("{} x{}: {:.2} s", t.name, t.threads, t.cpu_secs))
                .collect();
            println!("  consentd CPU by thread: {}", threads.join(", "));
        }
        for note in &report.notes {
            println!("  note: {note}");
        }
    }
    if args.grants > 0 {
        let r = bootstrap::run(args.grants).await?;
        println!(
            "bootstrap of {} grants (head {}), seeded in {:.1} s:",
            r.grants, r.head_revision, r.seed_secs
        );
        let rates: Vec<String> = r.seed_rates.iter().map(|g| format!("{g:.0}")).collect();
        println!("  CreateGrant/s by tenth: {}", rates.join(" "));
        println!(
            "  VM start {:.3} s, first tick {:?}, snapshot applied {:.3} s, consentd has the Ack {:.3} s",
            r.vm_start_secs, r.first_tick_secs, r.bootstrap_secs, r.acked_secs
        );
        println!(
            "  CPU: sim workers {:.2} s, bench tokio threads {:.2} s, consentd {:.2} s",
            r.sim_worker_cpu_secs, r.bench_runtime_cpu_secs, r.consentd_cpu_secs
        );
        println!(
            "  native client: first chunk {:.3} s, last chunk {:.3} s, applied {:.3} s ({} chunks)",
            r.native.first_chunk_secs,
            r.native.received_secs,
            r.native.applied_secs,
            r.native.chunks
        );
        println!(
            "  shared data: {} entries, {} key bytes, {} value bytes: {:.1} B/grant, values {:.1} B/grant",
            r.entries,
            r.key_bytes,
            r.value_bytes,
            r.bytes_per_grant(),
            r.value_bytes_per_grant()
        );
        for p in &r.parts {
            println!(
                "    {:<9} {:>7} entries, keys {:>9} B, values {:>9} B ({:.1} B/grant)",
                p.name,
                p.entries,
                p.key_bytes,
                p.value_bytes,
                (p.key_bytes + p.value_bytes) as f64 / r.grants as f64
            );
        }
        for note in &r.notes {
            println!("  note: {note}");
        }
    }
    Ok(())
}
