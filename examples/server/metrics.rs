//! Prometheus text exposition (format 0.0.4) of the server's counters: runs, credits spent,
//! USD cost (micro-dollars), rejections by reason, a provider latency histogram, job runs.
//! Lock-free counters; the label sets are small and fixed at the call sites.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the provider latency buckets, in milliseconds (exposed in seconds).
const LATENCY_BUCKETS_MS: [u64; 12] = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000];

/// HTTP statuses are 100..=599: one counter each, indexed by `status - 100`.
const STATUSES: usize = 500;

pub struct Metrics {
    runs: Mutex<BTreeMap<(String, String), u64>>,
    credits_spent: AtomicU64,
    cost_micros: AtomicU64,
    rejections: Mutex<BTreeMap<String, u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    jobs: Mutex<BTreeMap<(String, String), u64>>,
    /// Per response, so lock-free: an atomic per status (a map behind a mutex costs every
    /// request a lock and a tree walk).
    http: Box<[AtomicU64]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            runs: Mutex::default(),
            credits_spent: AtomicU64::default(),
            cost_micros: AtomicU64::default(),
            rejections: Mutex::default(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::default(),
            latency_sum_micros: AtomicU64::default(),
            jobs: Mutex::default(),
            http: (0..STATUSES).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Metrics {
    /// A run that reached the provider: its outcome, model, credits, cost and latency.
    pub fn run(&self, model: &str, outcome: &str, credits: i64, cost_micros: i64, latency_ms: u64) {
        *self.runs.lock().unwrap().entry((model.to_owned(), outcome.to_owned())).or_default() += 1;
        self.credits_spent.fetch_add(credits.max(0) as u64, Ordering::Relaxed);
        self.cost_micros.fetch_add(cost_micros.max(0) as u64, Ordering::Relaxed);
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if latency_ms <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(latency_ms.saturating_mul(1000), Ordering::Relaxed);
    }

    pub fn rejection(&self, reason: &str) {
        *self.rejections.lock().unwrap().entry(reason.to_owned()).or_default() += 1;
    }

    pub fn job(&self, job: &str, result: &str) {
        *self.jobs.lock().unwrap().entry((job.to_owned(), result.to_owned())).or_default() += 1;
    }

    pub fn response(&self, status: u16) {
        // axum's `StatusCode` is always 100..=999; statuses past 599 are not HTTP's and are
        // counted as 599 rather than dropped.
        let i = usize::from(status.clamp(100, 599) - 100);
        self.http[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP prpm_runs_total Playground runs that reached the provider, by model and outcome.");
        let _ = writeln!(out, "# TYPE prpm_runs_total counter");
        for ((model, outcome), n) in self.runs.lock().unwrap().iter() {
            let _ = writeln!(out, "prpm_runs_total{{model=\"{}\",outcome=\"{}\"}} {n}", escape(model), escape(outcome));
        }
        let _ = writeln!(out, "# HELP prpm_credits_spent_total Credits charged.");
        let _ = writeln!(out, "# TYPE prpm_credits_spent_total counter");
        let _ = writeln!(out, "prpm_credits_spent_total {}", self.credits_spent.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP prpm_cost_usd_micros_total Provider cost in micro-dollars.");
        let _ = writeln!(out, "# TYPE prpm_cost_usd_micros_total counter");
        let _ = writeln!(out, "prpm_cost_usd_micros_total {}", self.cost_micros.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP prpm_rejections_total Refused requests, by reason.");
        let _ = writeln!(out, "# TYPE prpm_rejections_total counter");
        for (reason, n) in self.rejections.lock().unwrap().iter() {
            let _ = writeln!(out, "prpm_rejections_total{{reason=\"{}\"}} {n}", escape(reason));
        }
        let _ = writeln!(out, "# HELP prpm_provider_latency_seconds Latency of provider calls.");
        let _ = writeln!(out, "# TYPE prpm_provider_latency_seconds histogram");
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            let le = format!("{}.{:03}", bound / 1000, bound % 1000);
            let le = le.trim_end_matches('0').trim_end_matches('.');
            let _ = writeln!(out, "prpm_provider_latency_seconds_bucket{{le=\"{le}\"}} {}", self.latency_buckets[i].load(Ordering::Relaxed));
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "prpm_provider_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum_micros = self.latency_sum_micros.load(Ordering::Relaxed);
        let _ = writeln!(out, "prpm_provider_latency_seconds_sum {}.{:06}", sum_micros / 1_000_000, sum_micros % 1_000_000);
        let _ = writeln!(out, "prpm_provider_latency_seconds_count {count}");
        let _ = writeln!(out, "# HELP prpm_job_runs_total Maintenance job runs, by job and result.");
        let _ = writeln!(out, "# TYPE prpm_job_runs_total counter");
        for ((job, result), n) in self.jobs.lock().unwrap().iter() {
            let _ = writeln!(out, "prpm_job_runs_total{{job=\"{}\",result=\"{}\"}} {n}", escape(job), escape(result));
        }
        let _ = writeln!(out, "# HELP prpm_http_responses_total HTTP responses, by status.");
        let _ = writeln!(out, "# TYPE prpm_http_responses_total counter");
        for (i, n) in self.http.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "prpm_http_responses_total{{status=\"{}\"}} {n}", i + 100);
            }
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_counted_per_status() {
        let m = Metrics::default();
        for s in [200, 200, 402, 100, 599, 999] {
            m.response(s);
        }
        let out = m.render();
        assert!(out.contains("prpm_http_responses_total{status=\"200\"} 2\n"), "{out}");
        assert!(out.contains("prpm_http_responses_total{status=\"402\"} 1\n"), "{out}");
        assert!(out.contains("prpm_http_responses_total{status=\"100\"} 1\n"), "{out}");
        // A status past HTTP's range is counted at 599, never lost and never out of bounds.
        assert!(out.contains("prpm_http_responses_total{status=\"599\"} 2\n"), "{out}");
        assert_eq!(out.matches("prpm_http_responses_total{").count(), 4, "{out}");
    }
}
