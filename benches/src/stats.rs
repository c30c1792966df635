//! Samples and their summaries. Times are kept in nanoseconds; a summary is
//! what RESULTS.md prints and the plots draw.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// p50, p99 and max of a set of samples, with their count and mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Summarizes `samples` (any unit); `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        Some(Summary {
            count: sorted.len(),
            mean,
            p50: percentile(&sorted, 50.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// The nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// Times `f` in batches of `per_batch` calls and returns one sample per batch:
/// the mean nanoseconds per call. For operations too short to time one by one
/// (the clock read would be a large part of them). Runs one untimed batch first.
pub fn per_call_batched<T>(
    batches: usize,
    per_batch: usize,
    mut f: impl FnMut(usize) -> T,
) -> Vec<f64> {
    assert!(per_batch > 0, "empty batch");
    for i in 0..per_batch {
        black_box(f(i));
    }
    (0..batches)
        .map(|b| {
            let started = Instant::now();
            for i in 0..per_batch {
                black_box(f(b * per_batch + i));
            }
            nanos(started.elapsed()) / per_batch as f64
        })
        .collect()
}

/// Runs `f` until `budget` is spent (at least `min` times) and returns the
/// calls per batch that make one batch last about `target`.
pub fn calibrate<T>(target: Duration, mut f: impl FnMut(usize) -> T) -> usize {
    let mut n = 1usize;
    loop {
        let started = Instant::now();
        for i in 0..n {
            black_box(f(i));
        }
        let spent = started.elapsed();
        if spent >= target / 4 || n >= 1 << 24 {
            let per_call = spent.as_secs_f64() / n as f64;
            return ((target.as_secs_f64() / per_call.max(1e-9)) as usize).max(1);
        }
        n *= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&samples).expect("samples");
        assert_eq!((s.p50, s.p99, s.max, s.count), (50.0, 99.0, 100.0, 100));
        assert_eq!(s.mean, 50.5);
        let one = Summary::of(&[7.0]).expect("one");
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn batches_report_per_call_means() {
        let samples = per_call_batched(5, 10, |i| i * 2);
        assert_eq!(samples.len(), 5);
        assert!(samples.iter().all(|s| s.is_finite() && *s >= 0.0));
    }
}
