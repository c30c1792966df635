//! Decision cost of the same consent check in consent-core, Cedar and Rego,
//! on grant sets of 1 and 10k grants (and 1M with CONSENT_BENCH_LARGE=1).
//! Before an engine is timed it must give the expected answer on every
//! shared case and timing case, so the three agree with each other. Each
//! timed call is one `Engine::allows` on the next of 4096 requests spread
//! over the set.
//!
//! `cargo bench -p consent-benches --bench decision` (about 30 s; 1M adds
//! about a minute, most of it building and dropping Cedar's entity store,
//! and needs about 10 GiB).

use std::hint::black_box;
use std::time::Duration;

use consent_benches::engines::{
    CedarEngine, CoreEngine, Engine, LoadStats, RegoEngine, check_agreement, load_timed,
};
use consent_benches::fixtures::{Case, cases, grants, timing_cases};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};

const TIMING_CASES: usize = 4096;

fn sizes() -> Vec<usize> {
    let mut sizes = vec![1, 10_000];
    if std::env::var("CONSENT_BENCH_LARGE").is_ok_and(|v| v == "1") {
        sizes.push(1_000_000);
    }
    sizes
}

fn report(name: &str, n: usize, stats: &LoadStats) {
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "load {name:>12} n={n:<9} {:>9.1} ms  rss {:>+8.1} MiB",
        stats.elapsed.as_secs_f64() * 1e3,
        stats.rss_growth.map_or(f64::NAN, mib),
    );
}

/// Loads one engine, checks it against the expected answers (so the three
/// agree with each other before any is timed), times it and drops it: one
/// engine at a time keeps 1M within a few GiB.
fn bench_engine<E: Engine>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    n: usize,
    load: impl FnOnce() -> anyhow::Result<E>,
    shared: &[Case],
    requests: &[Case],
) {
    let (engine, stats) = load_timed(load).expect("the engine loads");
    report(engine.name(), n, &stats);
    let checked = [&engine as &dyn Engine];
    check_agreement(&checked, shared).expect("the engine agrees on the shared cases");
    check_agreement(&checked, requests).expect("the engine agrees on the timing cases");
    group.bench_function(engine.name(), |b| {
        let mut next = 0usize;
        b.iter(|| {
            let case = &requests[next % requests.len()];
            next = next.wrapping_add(1);
            black_box(engine.allows(black_box(case)))
        })
    });
}

fn decision(c: &mut Criterion) {
    for n in sizes() {
        let grants = grants(n);
        let shared = cases(&grants);
        let requests = timing_cases(&grants, TIMING_CASES);
        let mut group = c.benchmark_group(format!("decision/{n}"));
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(30);
        bench_engine(
            &mut group,
            n,
            || CoreEngine::load(&grants),
            &shared,
            &requests,
        );
        bench_engine(
            &mut group,
            n,
            || CedarEngine::load(&grants),
            &shared,
            &requests,
        );
        bench_engine(
            &mut group,
            n,
            || RegoEngine::load(&grants),
            &shared,
            &requests,
        );
        group.finish();
    }
}

criterion_group!(benches, decision);
criterion_main!(benches);
