//! Live figures of one serving process, for the operator: request and token rates over a
//! sliding window, latency percentiles over the last completed requests, the error rate,
//! the queue and the feedback received. Under `agent` they go out as progress reports
//! (see docs/serving.md, "Live figures"), but only when a figure changed beyond its
//! rounding, so an idle server falls silent once its rates have decayed to zero.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window rates and the error rate are taken over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Completed requests the latency percentiles are taken over.
pub const LATENCY_SAMPLES: usize = 1000;
/// How often figures are looked at by default (`LLMOPS_REPORT_INTERVAL_MS` overrides).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// One finished request in the rate window.
#[derive(Debug, Clone, Copy)]
struct Finished {
    at: Instant,
    tokens: u64,
    ok: bool,
}

#[derive(Debug, Default)]
struct Inner {
    window: VecDeque<Finished>,
    /// (time to first token, whole latency) in ms of the last completed requests.
    latencies: VecDeque<(f64, f64)>,
    requests_total: u64,
    feedback_count: u64,
    feedback_sum: u64,
}

/// The figures of one process; cheap to update from every request handler.
#[derive(Debug)]
pub struct LiveFigures {
    window: Duration,
    inner: Mutex<Inner>,
}

impl Default for LiveFigures {
    fn default() -> Self {
        Self::new(RATE_WINDOW)
    }
}

impl LiveFigures {
    /// Figures whose rates are taken over `window`.
    pub fn new(window: Duration) -> Self {
        Self { window: window.max(Duration::from_millis(1)), inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request that finished with an answer at `at`.
    pub fn completed(&self, at: Instant, tokens: usize, first_token: Duration, latency: Duration) {
        let mut inner = self.lock();
        inner.requests_total += 1;
        inner.window.push_back(Finished { at, tokens: tokens as u64, ok: true });
        if inner.latencies.len() >= LATENCY_SAMPLES {
            inner.latencies.pop_front();
        }
        inner.latencies.push_back((first_token.as_secs_f64() * 1e3, latency.as_secs_f64() * 1e3));
        self.expire(&mut inner, at);
    }

    /// A request that ended with an error at `at`.
    pub fn errored(&self, at: Instant) {
        let mut inner = self.lock();
        inner.requests_total += 1;
        inner.window.push_back(Finished { at, tokens: 0, ok: false });
        self.expire(&mut inner, at);
    }

    /// A rating received.
    pub fn feedback(&self, rating: u8) {
        let mut inner = self.lock();
        inner.feedback_count += 1;
        inner.feedback_sum += u64::from(rating);
    }

    /// Drops what left the window; samples arrive roughly in time order, so the front
    /// holds the oldest.
    fn expire(&self, inner: &mut Inner, now: Instant) {
        while inner.window.front().is_some_and(|f| now.saturating_duration_since(f.at) > self.window) {
            inner.window.pop_front();
        }
    }

    /// The figures at `now`, rounded as they are reported: rates to 2 decimals,
    /// milliseconds to 0.1. Percentiles are absent until a request completed.
    pub fn snapshot(&self, now: Instant, queue_depth: i64) -> BTreeMap<String, f64> {
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        let seconds = self.window.as_secs_f64();
        let (mut done, mut failed, mut tokens) = (0u64, 0u64, 0u64);
        for f in &inner.window {
            if f.ok {
                done += 1;
                tokens += f.tokens;
            } else {
                failed += 1;
            }
        }
        let mut out = BTreeMap::new();
        out.insert("requests_per_second".to_string(), round_to(done as f64 / seconds, 100.0));
        out.insert("tokens_per_second".to_string(), round_to(tokens as f64 / seconds, 100.0));
        let all = done + failed;
        let error_rate = if all == 0 { 0.0 } else { failed as f64 / all as f64 };
        out.insert("error_rate".to_string(), round_to(error_rate, 100.0));
        if !inner.latencies.is_empty() {
            let mut first: Vec<f64> = inner.latencies.iter().map(|l| l.0).collect();
            let mut whole: Vec<f64> = inner.latencies.iter().map(|l| l.1).collect();
            out.insert("ttft_p50_ms".to_string(), round_to(percentile(&mut first, 50.0), 10.0));
            out.insert("ttft_p95_ms".to_string(), round_to(percentile(&mut first, 95.0), 10.0));
            out.insert("latency_p95_ms".to_string(), round_to(percentile(&mut whole, 95.0), 10.0));
        }
        out.insert("queue_depth".to_string(), queue_depth.max(0) as f64);
        out.insert("requests_total".to_string(), inner.requests_total as f64);
        out.insert("feedback_count".to_string(), inner.feedback_count as f64);
        out.insert("feedback_sum".to_string(), inner.feedback_sum as f64);
        out
    }
}

/// `value` rounded to a multiple of 1/`per_unit`.
fn round_to(value: f64, per_unit: f64) -> f64 {
    (value * per_unit).round() / per_unit
}

/// The nearest-rank percentile `p` (0-100) of a non-empty sample (sorted in place).
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Remembers the last figures sent, and says whether new ones are worth sending.
#[derive(Debug, Default)]
pub struct Reporter {
    last: Option<BTreeMap<String, f64>>,
}

impl Reporter {
    /// Starts from `initial` (what a fresh server shows), so nothing is sent until a
    /// figure moves.
    pub fn starting_at(initial: BTreeMap<String, f64>) -> Self {
        Self { last: Some(initial) }
    }

    /// The figures to send, when they differ from the last ones sent (the figures are
    /// rounded, so a change within the rounding is no change).
    pub fn next(&mut self, figures: BTreeMap<String, f64>) -> Option<BTreeMap<String, f64>> {
        if self.last.as_ref() == Some(&figures) {
            return None;
        }
        self.last = Some(figures.clone());
        Some(figures)
    }
}

/// How often figures are looked at: `LLMOPS_REPORT_INTERVAL_MS`, else 5 s.
pub fn report_interval() -> Duration {
    std::env::var("LLMOPS_REPORT_INTERVAL_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(REPORT_INTERVAL, Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rates_count_the_window_and_decay_to_zero() {
        let live = LiveFigures::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..30 {
            live.completed(t0 + Duration::from_secs(i), 10, 20 * MS, 100 * MS);
        }
        live.errored(t0 + Duration::from_secs(30));
        let f = live.snapshot(t0 + Duration::from_secs(30), 3);
        assert_eq!(f["requests_per_second"], 0.5, "30 completed over 60 s");
        assert_eq!(f["tokens_per_second"], 5.0);
        assert_eq!(f["error_rate"], round_to(1.0 / 31.0, 100.0));
        assert_eq!(f["requests_total"], 31.0);
        assert_eq!(f["queue_depth"], 3.0);
        // At 75 s the completions of the first 15 s have left the window.
        let f = live.snapshot(t0 + Duration::from_secs(75), 0);
        assert_eq!(f["requests_per_second"], 0.25);
        // Long after, rates and the error rate are 0; totals and percentiles stay.
        let f = live.snapshot(t0 + Duration::from_secs(200), 0);
        assert_eq!((f["requests_per_second"], f["tokens_per_second"], f["error_rate"]), (0.0, 0.0, 0.0));
        assert_eq!(f["requests_total"], 31.0);
        assert_eq!(f["latency_p95_ms"], 100.0);
    }

    #[test]
    fn percentiles_cover_the_last_thousand_completions() {
        let live = LiveFigures::default();
        let now = Instant::now();
        assert!(!live.snapshot(now, 0).contains_key("ttft_p50_ms"), "absent before any completion");
        // 100 slow completions, then 1000 whose first token took 1..=1000 ms.
        for _ in 0..100 {
            live.completed(now, 1, 50_000 * MS, 60_000 * MS);
        }
        for i in 1..=1000u64 {
            live.completed(now, 1, Duration::from_millis(i), Duration::from_millis(2 * i) + Duration::from_micros(40));
        }
        let f = live.snapshot(now, 0);
        assert_eq!(f["ttft_p50_ms"], 500.0);
        assert_eq!(f["ttft_p95_ms"], 950.0);
        assert_eq!(f["latency_p95_ms"], 1900.0, "rounded to 0.1 ms");
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&mut [7.0], 95.0), 7.0);
    }

    #[test]
    fn feedback_is_counted_and_summed() {
        let live = LiveFigures::default();
        live.feedback(5);
        live.feedback(2);
        let f = live.snapshot(Instant::now(), 0);
        assert_eq!((f["feedback_count"], f["feedback_sum"]), (2.0, 7.0));
    }

    #[test]
    fn only_changes_beyond_the_rounding_are_sent() {
        let live = LiveFigures::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut reporter = Reporter::starting_at(live.snapshot(t0, 0));
        assert_eq!(reporter.next(live.snapshot(t0 + Duration::from_secs(5), 0)), None, "an idle server says nothing");
        live.completed(t0, 0, 10 * MS, 10 * MS);
        let sent = reporter.next(live.snapshot(t0, 0)).expect("a completion changes the figures");
        assert_eq!(sent["requests_per_second"], 0.02);
        // The rate moves by less than its rounding until the request leaves the window.
        assert_eq!(reporter.next(live.snapshot(t0 + Duration::from_secs(30), 0)), None);
        let decayed = reporter.next(live.snapshot(t0 + Duration::from_secs(61), 0)).expect("the rate decayed");
        assert_eq!(decayed["requests_per_second"], 0.0);
        assert_eq!(reporter.next(live.snapshot(t0 + Duration::from_secs(120), 0)), None, "silent again");
        assert_eq!(round_to(12.345_678, 10.0), 12.3);
        assert_eq!(round_to(0.005_1, 100.0), 0.01);
    }
}
