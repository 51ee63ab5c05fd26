//! Prometheus metrics of the operator (`llmops_operator_*`) and the small HTTP server
//! that serves them with `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Dataset, FineTuneJob, EvalRun or PromptVersion.
    pub kind: String,
}

/// Labels of the reconcile error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The kind reconciled.
    pub kind: String,
    /// The reconcile step that failed: Dereference, Validate, Build, Apply, UpdateStatus.
    pub step: String,
    /// The error's category (the event reason is the step followed by it).
    pub category: String,
}

/// Label of the refused-token counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    /// missing, malformed, unknown or foreign.
    pub reason: String,
}

/// Label of the gateway event counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// phase, progress, result, failure or checkpoint.
    pub event: String,
}

/// Labels of a per-object figure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ObjectLabels {
    /// Namespace of the object.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Labels of an evaluation's metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvalLabels {
    /// Namespace of the EvalRun.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The metric (perplexity, tokenF1, ...).
    pub metric: String,
}

/// A gauge of floating-point values.
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Every metric of the operator, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started, by kind.
    pub reconciles: Family<KindLabel, Counter>,
    /// Reconciles that failed, by kind and error category.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations, by kind.
    pub reconcile_duration: Family<KindLabel, Histogram>,
    /// Reconciles running or requested by the gateway and not yet started, by kind.
    pub queue_depth: Family<KindLabel, Gauge>,
    /// Status writes sent to the apiserver, by kind.
    pub status_writes: Family<KindLabel, Counter>,
    /// Open gateway sessions.
    pub gateway_sessions: Gauge,
    /// Gateway requests refused for their token, by reason.
    pub refused_tokens: Family<RefusalLabel, Counter>,
    /// Worker events recorded by the gateway, by event type.
    pub gateway_events: Family<EventLabel, Counter>,
    /// Latest training loss of each FineTuneJob.
    pub finetune_loss: Family<ObjectLabels, FloatGauge>,
    /// Latest training throughput of each FineTuneJob.
    pub finetune_tokens_per_second: Family<ObjectLabels, FloatGauge>,
    /// Estimated seconds left of each running FineTuneJob.
    pub finetune_eta_seconds: Family<ObjectLabels, FloatGauge>,
    /// Steps done over total steps of each FineTuneJob.
    pub finetune_progress_ratio: Family<ObjectLabels, FloatGauge>,
    /// Metric values of each finished EvalRun.
    pub evalrun_metric: Family<EvalLabels, FloatGauge>,
    /// 1 when an EvalRun passed its thresholds, 0 when it did not.
    pub evalrun_passed: Family<ObjectLabels, FloatGauge>,
    evalrun_metric_names:
        std::sync::Mutex<std::collections::BTreeMap<ObjectLabels, std::collections::BTreeSet<String>>>,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Drops the per-object series of an object that went away.
    pub fn forget_object(&self, namespace: &str, name: &str) {
        let labels = ObjectLabels { namespace: namespace.into(), name: name.into() };
        for family in [
            &self.finetune_loss,
            &self.finetune_tokens_per_second,
            &self.finetune_eta_seconds,
            &self.finetune_progress_ratio,
            &self.evalrun_passed,
        ] {
            family.remove(&labels);
        }
        let names = crate::lock(&self.evalrun_metric_names).remove(&labels).unwrap_or_default();
        for metric in names {
            self.evalrun_metric.remove(&EvalLabels { namespace: namespace.into(), name: name.into(), metric });
        }
    }

    /// Sets the metric values of an EvalRun (non-finite values are left out).
    pub fn set_eval_metrics(&self, namespace: &str, name: &str, values: &[(String, f64)]) {
        let labels = ObjectLabels { namespace: namespace.into(), name: name.into() };
        let mut known = crate::lock(&self.evalrun_metric_names);
        let names = known.entry(labels).or_default();
        for (metric, value) in values {
            let l = EvalLabels { namespace: namespace.into(), name: name.into(), metric: metric.clone() };
            if value.is_finite() {
                self.evalrun_metric.get_or_create(&l).set(*value);
                names.insert(metric.clone());
            } else {
                self.evalrun_metric.remove(&l);
                names.remove(metric);
            }
        }
    }

    /// Sets a per-object gauge when the value is a finite number, and removes the series
    /// otherwise: a NaN must never read as a figure.
    pub fn set_figure(family: &Family<ObjectLabels, FloatGauge>, labels: &ObjectLabels, value: Option<f64>) {
        match value.filter(|v| v.is_finite()) {
            Some(v) => {
                family.get_or_create(labels).set(v);
            }
            None => {
                family.remove(labels);
            }
        }
    }

    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmops_operator");
        let reconciles = Family::<KindLabel, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Family::<KindLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.005, 2.0, 14))) as fn() -> Histogram,
        );
        let queue_depth = Family::<KindLabel, Gauge>::default();
        let status_writes = Family::<KindLabel, Counter>::default();
        let gateway_sessions = Gauge::default();
        let refused_tokens = Family::<RefusalLabel, Counter>::default();
        let gateway_events = Family::<EventLabel, Counter>::default();
        registry.register("reconcile", "Reconciles started", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by error category", reconcile_errors.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", reconcile_duration.clone());
        registry.register(
            "queue_depth",
            "Reconciles running or requested by the gateway and not yet started",
            queue_depth.clone(),
        );
        registry.register("status_writes", "Status writes sent to the apiserver", status_writes.clone());
        registry.register("gateway_sessions", "Open worker sessions on the gateway", gateway_sessions.clone());
        registry.register("gateway_refused_tokens", "Gateway requests refused for their token", refused_tokens.clone());
        registry.register("gateway_events", "Worker events recorded by the gateway", gateway_events.clone());
        let finetune_loss = Family::<ObjectLabels, FloatGauge>::default();
        let finetune_tokens_per_second = Family::<ObjectLabels, FloatGauge>::default();
        let finetune_eta_seconds = Family::<ObjectLabels, FloatGauge>::default();
        let finetune_progress_ratio = Family::<ObjectLabels, FloatGauge>::default();
        let evalrun_metric = Family::<EvalLabels, FloatGauge>::default();
        let evalrun_passed = Family::<ObjectLabels, FloatGauge>::default();
        registry.register("finetune_loss", "Latest training loss of a FineTuneJob", finetune_loss.clone());
        registry.register(
            "finetune_tokens_per_second",
            "Latest training throughput of a FineTuneJob",
            finetune_tokens_per_second.clone(),
        );
        registry.register(
            "finetune_eta_seconds",
            "Estimated seconds left of a running FineTuneJob",
            finetune_eta_seconds.clone(),
        );
        registry.register(
            "finetune_progress_ratio",
            "Steps done over total steps of a FineTuneJob",
            finetune_progress_ratio.clone(),
        );
        registry.register("evalrun_metric", "Metric values of a finished EvalRun", evalrun_metric.clone());
        registry.register("evalrun_passed", "1 when an EvalRun passed its thresholds, else 0", evalrun_passed.clone());
        // Registry adds `_total` to counters: llmops_operator_reconcile_total and so on.
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            queue_depth,
            status_writes,
            gateway_sessions,
            refused_tokens,
            gateway_events,
            finetune_loss,
            finetune_tokens_per_second,
            finetune_eta_seconds,
            finetune_progress_ratio,
            evalrun_metric,
            evalrun_passed,
            evalrun_metric_names: Default::default(),
            ready: AtomicBool::new(false),
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts a refused token.
    pub fn refuse(&self, reason: &str) {
        self.refused_tokens.get_or_create(&RefusalLabel { reason: reason.to_string() }).inc();
    }

    /// Total refused tokens of one reason.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refused_tokens.get_or_create(&RefusalLabel { reason: reason.to_string() }).get()
    }

    /// Marks the operator ready (controllers and gateway started).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the operator is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Starts timing a reconcile of `kind`; the guard records duration when dropped.
    pub fn reconcile_started(self: &Arc<Self>, kind: &str) -> ReconcileTimer {
        let label = KindLabel { kind: kind.to_string() };
        self.reconciles.get_or_create(&label).inc();
        self.queue_depth.get_or_create(&label).inc();
        ReconcileTimer { metrics: self.clone(), label, start: Instant::now() }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, kind: &str, error: &crate::error::ReconcileError) {
        let labels = ErrorLabels {
            kind: kind.into(),
            step: error.step().as_str().into(),
            category: error.source_error().category().into(),
        };
        self.reconcile_errors.get_or_create(&labels).inc();
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    label: KindLabel,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics.reconcile_duration.get_or_create(&self.label).observe(self.start.elapsed().as_secs_f64());
        self.metrics.queue_depth.get_or_create(&self.label).dec();
    }
}

/// Serves /metrics, /healthz and /readyz on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m = metrics.clone();
    let r = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    if r.is_ready() { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_object_figures_appear_finite_only_and_go_with_their_object() {
        let metrics = Metrics::new();
        let tune = ObjectLabels { namespace: "ns".into(), name: "tune".into() };
        Metrics::set_figure(&metrics.finetune_loss, &tune, Some(1.25));
        Metrics::set_figure(&metrics.finetune_tokens_per_second, &tune, Some(f64::NAN));
        metrics.set_eval_metrics("ns", "run", &[("tokenF1".into(), 0.5), ("perplexity".into(), f64::INFINITY)]);
        Metrics::set_figure(
            &metrics.evalrun_passed,
            &ObjectLabels { namespace: "ns".into(), name: "run".into() },
            Some(1.0),
        );
        let text = metrics.encode();
        assert!(text.contains("llmops_operator_finetune_loss{namespace=\"ns\",name=\"tune\"} 1.25"), "{text}");
        assert!(!text.contains("llmops_operator_finetune_tokens_per_second{"), "a NaN is never a figure:\n{text}");
        assert!(text.contains("metric=\"tokenF1\"} 0.5"), "{text}");
        assert!(!text.contains("metric=\"perplexity\""), "{text}");
        metrics.forget_object("ns", "tune");
        metrics.forget_object("ns", "run");
        let text = metrics.encode();
        assert!(!text.contains("name=\"tune\"") && !text.contains("name=\"run\""), "{text}");
    }

    #[test]
    fn metric_names_carry_the_prefix() {
        let metrics = Arc::new(Metrics::new());
        drop(metrics.reconcile_started("Dataset"));
        let error =
            crate::error::ReconcileError::at(crate::error::Step::Apply, crate::error::Error::MissingMetadata("uid"));
        metrics.reconcile_failed("Dataset", &error);
        metrics.refuse("foreign");
        let text = metrics.encode();
        for name in [
            "llmops_operator_reconcile_total",
            "llmops_operator_reconcile_errors_total",
            "llmops_operator_reconcile_duration_seconds",
            "llmops_operator_queue_depth",
            "llmops_operator_gateway_sessions",
            "llmops_operator_gateway_refused_tokens_total",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
            assert!(text.contains("step=\"Apply\""), "the error counter names the step:\n{text}");
        }
        assert_eq!(metrics.refused("foreign"), 1);
    }
}
