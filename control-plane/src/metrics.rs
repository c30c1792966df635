//! Prometheus metrics in the text exposition format, written by hand: the few
//! series consentd exports do not justify a metrics dependency.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Latency buckets of admin requests, in seconds.
const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

#[derive(Default)]
pub struct Metrics {
    /// (method, gRPC code) → count and latency.
    admin: Mutex<BTreeMap<(&'static str, String), Series>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn observe_admin(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        let mut map = self.admin.lock().expect("metrics");
        let series = map.entry((method, format!("{code:?}"))).or_default();
        let secs = elapsed.as_secs_f64();
        series.count += 1;
        series.sum += secs;
        for (bucket, bound) in series.buckets.iter_mut().zip(BUCKETS) {
            if secs <= bound {
                *bucket += 1;
            }
        }
    }

    /// Renders every series; `streams` and `lags` come from the sidecar registry.
    pub fn render(&self, head: u64, streams: usize, lags: &[(String, u64)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP consentd_head_revision The newest committed revision."
        );
        let _ = writeln!(out, "# TYPE consentd_head_revision gauge");
        let _ = writeln!(out, "consentd_head_revision {head}");
        let _ = writeln!(
            out,
            "# HELP consentd_connected_streams Sidecar sync streams now connected."
        );
        let _ = writeln!(out, "# TYPE consentd_connected_streams gauge");
        let _ = writeln!(out, "consentd_connected_streams {streams}");
        let _ = writeln!(
            out,
            "# HELP consentd_sidecar_ack_lag_revisions Head revision minus the sidecar's acknowledged one."
        );
        let _ = writeln!(out, "# TYPE consentd_sidecar_ack_lag_revisions gauge");
        for (node, lag) in lags {
            let _ = writeln!(
                out,
                "consentd_sidecar_ack_lag_revisions{{node_id=\"{}\"}} {lag}",
                escape(node)
            );
        }
        let map = self.admin.lock().expect("metrics");
        let _ = writeln!(
            out,
            "# HELP consentd_admin_requests_total Admin API requests by method and gRPC code."
        );
        let _ = writeln!(out, "# TYPE consentd_admin_requests_total counter");
        for ((method, code), s) in map.iter() {
            let _ = writeln!(
                out,
                "consentd_admin_requests_total{{method=\"{method}\",code=\"{code}\"}} {}",
                s.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP consentd_admin_request_duration_seconds Admin API request latency."
        );
        let _ = writeln!(
            out,
            "# TYPE consentd_admin_request_duration_seconds histogram"
        );
        let mut by_method: BTreeMap<&str, Series> = BTreeMap::new();
        for ((method, _), s) in map.iter() {
            let m = by_method.entry(method).or_default();
            m.count += s.count;
            m.sum += s.sum;
            for (a, b) in m.buckets.iter_mut().zip(s.buckets) {
                *a += b;
            }
        }
        for (method, s) in by_method {
            for (bound, n) in BUCKETS.iter().zip(s.buckets) {
                let _ = writeln!(
                    out,
                    "consentd_admin_request_duration_seconds_bucket{{method=\"{method}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "consentd_admin_request_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "consentd_admin_request_duration_seconds_sum{{method=\"{method}\"}} {}",
                s.sum
            );
            let _ = writeln!(
                out,
                "consentd_admin_request_duration_seconds_count{{method=\"{method}\"}} {}",
                s.count
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
