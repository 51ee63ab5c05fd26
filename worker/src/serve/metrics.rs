//! The server's Prometheus metrics: requests and errors by type, tokens, and request
//! time split into queue, first token and the time between tokens.

use std::borrow::Cow;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

/// Labels of a counter: pairs of name and value.
pub type Labels = Vec<(&'static str, String)>;

/// Every metric the server exports, under `llmops_worker_`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint and model.
    pub requests: Family<Labels, Counter>,
    /// Failed requests by endpoint and error type (the `code` of the JSON error).
    pub errors: Family<Labels, Counter>,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Seconds from accepting a request to its first token.
    pub time_to_first_token: Histogram,
    /// Seconds between consecutive tokens of a sequence.
    pub inter_token_latency: Histogram,
    /// Seconds a request waited in the queue.
    pub queue_time: Histogram,
    /// Seconds from accepting a request to its last token.
    pub request_duration: Histogram,
    /// Sum of the feedback ratings (with `feedback`'s count, the average score).
    pub feedback_score: Counter,
    /// Requests waiting for a slot.
    pub queue_depth: Gauge,
    /// Sequences in the running batch.
    pub batch_size: Gauge,
    /// Sequences advanced by each decode step.
    pub decode_batch_size: Histogram,
    /// Feedback records by rating.
    pub feedback: Family<Labels, Counter>,
    /// Requests dropped because their client went away before they finished.
    pub cancelled: Counter,
}

impl Metrics {
    /// Registers every metric; `max_batch` sizes the batch histogram's buckets.
    pub fn new(max_batch: usize) -> Self {
        Self::with_labels(max_batch, &[])
    }

    /// Registers every metric, each series carrying `labels` (a deployment's namespace,
    /// name and revision, so that dashboards can tell deployments and revisions apart).
    pub fn with_labels(max_batch: usize, labels: &[(String, String)]) -> Self {
        let constant = labels.iter().map(|(k, v)| (Cow::Owned(k.clone()), Cow::Owned(v.clone())));
        let mut registry = Registry::with_prefix_and_labels("llmops_worker", constant);
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Requests by endpoint and model", requests.clone());
        let errors = Family::<Labels, Counter>::default();
        registry.register("request_errors", "Failed requests by endpoint and error type", errors.clone());
        let prompt_tokens = Counter::default();
        registry.register("prompt_tokens", "Prompt tokens processed", prompt_tokens.clone());
        let generated_tokens = Counter::default();
        registry.register("generated_tokens", "Tokens generated", generated_tokens.clone());
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from accepting a request to its first token",
            time_to_first_token.clone(),
        );
        let inter_token_latency = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "inter_token_latency_seconds",
            "Seconds between consecutive tokens of a sequence",
            inter_token_latency.clone(),
        );
        let queue_time = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("queue_time_seconds", "Seconds a request waited for a batch slot", queue_time.clone());
        let request_duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "request_duration_seconds",
            "Seconds from accepting a request to its last token",
            request_duration.clone(),
        );
        let feedback_score = Counter::default();
        registry.register("feedback_score", "Sum of the feedback ratings", feedback_score.clone());
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "Requests waiting for a batch slot", queue_depth.clone());
        let batch_size = Gauge::default();
        registry.register("batch_size", "Sequences in the running batch", batch_size.clone());
        let decode_batch_size =
            Histogram::new(linear_buckets(1.0, 1.0, u16::try_from(max_batch.max(1)).unwrap_or(u16::MAX)));
        registry.register(
            "decode_batch_size",
            "Sequences advanced together by each decode step",
            decode_batch_size.clone(),
        );
        let feedback = Family::<Labels, Counter>::default();
        registry.register("feedback", "Feedback records by rating", feedback.clone());
        let cancelled = Counter::default();
        registry.register("cancelled_requests", "Requests dropped because their client went away", cancelled.clone());
        Self {
            cancelled,
            registry,
            requests,
            errors,
            prompt_tokens,
            generated_tokens,
            time_to_first_token,
            inter_token_latency,
            queue_time,
            request_duration,
            feedback_score,
            queue_depth,
            batch_size,
            decode_batch_size,
            feedback,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
