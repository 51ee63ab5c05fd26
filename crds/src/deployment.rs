//! ModelDeployment: serve a model and its LoRA adapters with an OpenAI-compatible API.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    CommonStatus, LineageInput, LocalRef, ModelSource, NamedAdapter, Resources, SecretKeyRef, default_true,
};
use crate::dataset::RedactTransform;
use crate::evalrun::Evaluation;

/// Serves a model, and named LoRA adapters beside it, with an OpenAI-compatible REST API.
/// Owns a Deployment and a Service; with a promotion gate, each new revision is evaluated
/// before it takes traffic.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmops.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    status = "ModelDeploymentStatus",
    shortname = "md",
    shortname = "mdep",
    category = "llmops",
    doc = "ModelDeployment serves a model and its LoRA adapters with an OpenAI-compatible API.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicasSummary",
        description = "Ready replicas / desired replicas"
    ),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint", priority = 1),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.servingRevision", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.autoscaling) || !has(self.replicas) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)", "message": "replicas must lie within autoscaling.minReplicas and autoscaling.maxReplicas", "fieldPath": ".replicas", "reason": "FieldValueInvalid"},
    {"rule": "!has(self.promotion) || !has(self.promotion.model) || (has(self.adapters) && self.adapters.exists(a, a.name == self.promotion.model))", "message": "promotion.model must name one of adapters (or be absent for the base model)", "fieldPath": ".promotion.model", "reason": "FieldValueInvalid"},
    {"rule": "!has(self.autoscaling) || (has(self.resources) && has(self.resources.cpu))", "message": "autoscaling scales on CPU utilisation, a percentage of the CPU request: set resources.cpu", "fieldPath": ".resources", "reason": "FieldValueRequired"}
]))]
pub struct ModelDeploymentSpec {
    /// The base model served.
    pub model: ModelSource,
    /// LoRA adapters served beside the base model, each under its own model name. An
    /// adapter trained for another base model is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub adapters: Vec<NamedAdapter>,
    /// PromptVersion whose messages are the default system prompt, and whose parameters
    /// are the default generation parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<LocalRef>,
    /// Number of serving pods. Written by the HorizontalPodAutoscaler when autoscaling
    /// is set (scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Scale with load through an owned HorizontalPodAutoscaler; needs resources.cpu,
    /// which CPU utilisation is measured against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Resources of each serving pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Serving limits.
    #[serde(default)]
    pub serving: ServingLimits,
    /// Secret whose values are the accepted API keys. Requests without one of them get
    /// 401. When absent the API is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<SecretKeyRef>,
    /// Recording of completions and feedback into the traffic log.
    #[serde(default)]
    pub traffic: TrafficRecording,
    /// Evaluate each new revision before it takes traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

/// Autoscaling bounds and target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not exceed maxReplicas"}
]))]
pub struct Autoscaling {
    /// Fewest serving pods.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most serving pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Target average CPU utilisation in percent of the request.
    #[serde(default = "default_target_cpu")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
    /// Target average number of requests waiting per serving pod
    /// (`llmops_worker_queue_depth`). Needs a metrics adapter (such as prometheus-adapter)
    /// that serves that metric through the custom metrics API; without one the
    /// HorizontalPodAutoscaler scales on CPU alone and reports the metric as missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub target_queue_depth: Option<i32>,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_target_cpu() -> i32 {
    70
}

/// Serving limits of each pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingLimits {
    /// Sequences decoded together in one batch.
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: i32,
    /// Requests waiting for a batch slot; more are answered 429.
    #[serde(default = "default_max_queue")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_queue: i32,
    /// Context length in tokens; defaults to the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub context_length: Option<i32>,
    /// Largest request body in bytes.
    #[serde(default = "default_max_body")]
    #[schemars(range(min = 1024, max = 67108864))]
    pub max_request_bytes: i32,
}

fn default_max_batch() -> i32 {
    8
}
fn default_max_queue() -> i32 {
    64
}
fn default_max_body() -> i32 {
    1 << 20
}

impl Default for ServingLimits {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch(),
            max_queue: default_max_queue(),
            context_length: None,
            max_request_bytes: default_max_body(),
        }
    }
}

/// Traffic recording.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficRecording {
    /// Record each completion (id, revision, messages, output, time) into the traffic log.
    /// Feedback is recorded either way.
    #[serde(default = "default_true")]
    pub record: bool,
    /// Delete traffic records (completions and feedback) older than this many days;
    /// absent: keep them until the ModelDeployment is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub retention_days: Option<i32>,
    /// Redact personal data from recorded messages and outputs before they are written,
    /// with the same redactor (and placeholders) as a Dataset's `redact` transform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<RedactTransform>,
}

impl Default for TrafficRecording {
    fn default() -> Self {
        Self { record: true, retention_days: None, redact: None }
    }
}

/// Promotion of new revisions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Promotion {
    /// An evaluation without a target: each candidate revision gets an EvalRun owned by
    /// this deployment that evaluates the candidate model, and traffic moves to it only
    /// when that EvalRun Passed for exactly that revision.
    pub gate: Evaluation,
    /// The served model the gate evaluates: the name of one of `adapters`, or absent for
    /// the base model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub model: Option<String>,
}

/// Observed state of a ModelDeployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// observedGeneration, conditions (Ready, Available, Progressing) and phase.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Base URL of the OpenAI-compatible API, up to and including /v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Serving pods (scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Serving pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// "ready/desired", for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_summary: Option<String>,
    /// Label selector of the serving pods (scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Revision that takes traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_revision: Option<String>,
    /// Revision waiting for its gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_revision: Option<String>,
    /// Verdict of the promotion gate on the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStatus>,
    /// sha256 of the model (and adapters) the serving revision serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model_digest: Option<String>,
    /// Live serving figures, aggregated over ready pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<ServingMetrics>,
    /// What exactly serves, and what it was trained on: the model, each adapter with
    /// the FineTuneJob and inputs it came from, and the prompt, with their digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<ServedLineage>,
}

/// The digests behind a serving revision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServedLineage {
    /// Revision these inputs make.
    pub revision: String,
    /// The base model: its URI or FineTuneJob, and its sha256.
    pub model: LineageInput,
    /// The adapters served beside it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterLineage>,
    /// The PromptVersion used as the default system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<LineageInput>,
}

/// An adapter served, and what it was trained from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdapterLineage {
    /// Model name it is served under.
    pub name: String,
    /// sha256 of the adapter's manifest.
    pub sha256: String,
    /// The FineTuneJob that trained it; absent for an adapter given by URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fine_tune_job: Option<String>,
    /// The adapter's URI, for an adapter given by URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The FineTuneJob's own lineage: its base model, its Dataset and their digests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trained_on: Vec<LineageInput>,
}

/// Verdict of a promotion gate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// Revision evaluated.
    pub revision: String,
    /// Name of the EvalRun that evaluates it.
    pub eval_run: String,
    /// Pending, Passed or Failed.
    pub verdict: String,
    /// Why, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Live serving figures.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingMetrics {
    /// Completed requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Generated tokens per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Median time to first token, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_ms: Option<f64>,
    /// 95th percentile time to first token, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_p95_ms: Option<f64>,
    /// 95th percentile request latency, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_latency_ms: Option<f64>,
    /// Fraction of requests that failed over the last minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Mean feedback rating (1 to 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_score: Option<f64>,
    /// Feedback ratings received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_count: Option<i64>,
}
