//! The same consent check in three engines: consent-core's `decide`, a Cedar
//! policy over entities, and a Rego policy over data. Each loads a grant set
//! once (what a deployment does at startup or on a snapshot) and then answers
//! one request per [`Engine::allows`] call (what it does per request), which
//! is what the benches time.

use std::time::{Duration, Instant};

use crate::fixtures::Case;

pub mod cedar;
pub mod core;
pub mod rego;

pub use self::cedar::CedarEngine;
pub use self::core::CoreEngine;
pub use self::rego::RegoEngine;

/// One engine answering the shared consent check.
pub trait Engine {
    fn name(&self) -> &'static str;
    /// The whole per-request work of a deployment: build the engine's request
    /// from `case`, evaluate it, read the answer. Nothing done once at load.
    fn allows(&self, case: &Case) -> bool;
}

/// Checks that every engine answers `expect_allow` on every case. The error
/// lists each case some engine got wrong, with the engines that did.
pub fn check_agreement(engines: &[&dyn Engine], cases: &[Case]) -> anyhow::Result<()> {
    let disagreements: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            let wrong: Vec<&str> = engines
                .iter()
                .filter(|engine| engine.allows(case) != case.expect_allow)
                .map(|engine| engine.name())
                .collect();
            let expected = if case.expect_allow { "allow" } else { "deny" };
            (!wrong.is_empty()).then(|| {
                format!(
                    "case {:?} (expected {expected}): {} disagreed",
                    case.name,
                    wrong.join(", ")
                )
            })
        })
        .collect();
    if disagreements.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} cases disagree:\n{}",
            disagreements.len(),
            cases.len(),
            disagreements.join("\n")
        )
    }
}

/// What loading a grant set into an engine cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadStats {
    pub elapsed: Duration,
    /// Resident-set growth over the load in bytes (Linux only; allocator
    /// reuse makes it a lower bound when memory was freed just before).
    pub rss_growth: Option<i64>,
    /// The process's peak resident set after the load, in bytes.
    pub peak_rss: Option<u64>,
}

/// Runs `load` and reports its wall time and resident-set growth.
pub fn load_timed<E>(load: impl FnOnce() -> anyhow::Result<E>) -> anyhow::Result<(E, LoadStats)> {
    let before = rss_bytes();
    let started = Instant::now();
    let engine = load()?;
    let elapsed = started.elapsed();
    let after = rss_bytes();
    let rss_growth = before.zip(after).map(|(b, a)| a as i64 - b as i64);
    Ok((
        engine,
        LoadStats {
            elapsed,
            rss_growth,
            peak_rss: status_kib("VmHWM:").map(|kib| kib * 1024),
        },
    ))
}

/// The process's current resident set in bytes, from `/proc/self/status`.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|kib| kib * 1024)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Case, cases, grants};
    use consent_core::{Grant, Permission};

    fn load_all(grants: &[Grant]) -> (CoreEngine, CedarEngine, RegoEngine) {
        (
            CoreEngine::load(grants).unwrap(),
            CedarEngine::load(grants).unwrap(),
            RegoEngine::load(grants).unwrap(),
        )
    }

    fn agree_on(grants: &[Grant]) {
        let (core, cedar, rego) = load_all(grants);
        let cases = cases(grants);
        check_agreement(&[&core, &cedar, &rego], &cases).unwrap();
        for case in &cases {
            let decision = core.decide(case);
            assert_eq!(decision.reason(), case.expect_reason, "{}", case.name);
        }
    }

    #[test]
    fn the_three_engines_agree_on_one_grant() {
        agree_on(&grants(1));
    }

    #[test]
    fn the_three_engines_agree_on_a_thousand_grants() {
        agree_on(&grants(1000));
    }

    #[test]
    fn the_three_engines_agree_on_timing_cases() {
        let set = grants(2000);
        let (core, cedar, rego) = load_all(&set);
        let cases = crate::fixtures::timing_cases(&set, 500);
        check_agreement(&[&core, &cedar, &rego], &cases).unwrap();
        for case in &cases {
            assert_eq!(
                core.decide(case).reason(),
                case.expect_reason,
                "{}",
                case.name
            );
        }
    }

    /// The agreement check can fail: engines loaded from a set where the
    /// allowing grant lost its permission deny, and each is named.
    #[test]
    fn an_engine_loaded_from_an_altered_grant_disagrees_and_is_named() {
        let set = grants(1000);
        let cases = cases(&set);
        let mut altered = set.clone();
        let g0 = &mut altered[0];
        let allowed: Vec<&Case> = cases
            .iter()
            .filter(|c| c.expect_allow && c.grant_id == g0.id)
            .collect();
        let permission = allowed[0].permission;
        g0.permissions = Permission::ALL
            .into_iter()
            .filter(|p| *p != permission)
            .collect();

        let (core, cedar, rego) = load_all(&set);
        let (core_x, cedar_x, rego_x) = load_all(&altered);
        for wrong in [&core_x as &dyn Engine, &cedar_x, &rego_x] {
            let err = check_agreement(&[&core, &cedar, &rego, wrong], &cases)
                .unwrap_err()
                .to_string();
            let first = err.lines().nth(1).unwrap();
            assert_eq!(
                first,
                format!(
                    "case {:?} (expected allow): {} disagreed",
                    allowed[0].name,
                    wrong.name()
                ),
                "{err}"
            );
            assert!(
                !err.contains("consent-core, "),
                "only the altered engine is named: {err}"
            );
        }
        let err = check_agreement(&[&core_x, &cedar_x, &rego_x], &cases)
            .unwrap_err()
            .to_string();
        assert!(err.contains("consent-core, cedar, rego disagreed"), "{err}");
    }

    #[test]
    fn load_timed_reports_time_and_memory() {
        let (v, stats) = load_timed(|| Ok(vec![1u8; 64 << 20])).unwrap();
        assert_eq!(v.len(), 64 << 20);
        assert!(stats.elapsed > Duration::ZERO);
        if cfg!(target_os = "linux") {
            assert!(stats.rss_growth.unwrap() >= 32 << 20, "{stats:?}");
            assert!(stats.peak_rss.unwrap() > 0);
        }
    }
}
