//! EvalRun: evaluate a model or an endpoint on a Dataset split and gate on thresholds.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    AdapterSource, CommonStatus, DEPLOYMENT_NAME_PATTERN, GenerationParameters, JobTimes, LocalRef, MAX_COUNT,
    ModelSource, NAME_PATTERN, Resources, SecretKeyRef, nonblank_rules, regex_rules, url_rules,
};
use crate::dataset::default_backoff_limit;
use crate::finetune::SplitName;

/// Evaluates a model, a ModelDeployment or any OpenAI-compatible endpoint on a Dataset
/// split, computes metrics and sets the Passed condition when every threshold holds.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmops.dev",
    version = "v1alpha1",
    kind = "EvalRun",
    namespaced,
    status = "EvalRunStatus",
    shortname = "er",
    shortname = "eval",
    category = "llmops",
    doc = "EvalRun measures a model or endpoint on a Dataset and gates promotion on thresholds.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Passed", type_ = "string", json_path = ".status.conditions[?(@.type==\"Passed\")].status"),
    printcolumn(name = "Samples", type_ = "integer", json_path = ".status.samples", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct EvalRunSpec {
    /// What is evaluated.
    pub target: EvalTarget,
    /// How it is evaluated.
    #[serde(flatten)]
    pub evaluation: Evaluation,
    /// Resources of the evaluating pod (which also runs a local model target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Number of retries of a failed pod before the run is Failed.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: i32,
}

/// What is evaluated: exactly one of model, modelDeployment and endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.model), has(self.modelDeployment), has(self.endpoint)].exists_one(x, x)", "message": "exactly one of model, modelDeployment or endpoint must be set"},
    {"rule": "!has(self.adapter) || has(self.model)", "message": "adapter can only be set with model", "fieldPath": ".adapter", "reason": "FieldValueForbidden"}
]))]
pub struct EvalTarget {
    /// A model loaded by the evaluating pod itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSource>,
    /// A LoRA adapter applied to model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSource>,
    /// A ModelDeployment in this namespace, evaluated through its endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DEPLOYMENT_NAME_PATTERN))]
    pub model_deployment: Option<String>,
    /// Any OpenAI-compatible endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
}

/// An OpenAI-compatible endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Base URL, up to and including /v1, e.g. http://vllm.serving:8000/v1 (a port lies
    /// in 1..65535).
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^https?://\S+$"), extend("x-kubernetes-validations" = url_rules()))]
    pub url: String,
    /// Model name sent in each request.
    #[schemars(length(min = 1, max = 256), extend("x-kubernetes-validations" = nonblank_rules()))]
    pub model: String,
    /// Secret key holding the API key sent as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
}

/// How a target is evaluated; shared by EvalRun and a ModelDeployment's promotion gate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.thresholds.all(t, t.metric in self.metrics)", "message": "every threshold's metric must be listed in metrics", "fieldPath": ".thresholds", "reason": "FieldValueInvalid"},
    {"rule": "!('judge' in self.metrics) || has(self.judge)", "message": "judge settings are required when metrics lists judge", "fieldPath": ".judge", "reason": "FieldValueRequired"},
    {"rule": "!('regexMatch' in self.metrics) || has(self.regex)", "message": "regex is required when metrics lists regexMatch", "fieldPath": ".regex", "reason": "FieldValueRequired"}
]))]
pub struct Evaluation {
    /// The Dataset split that holds the samples.
    pub dataset: EvalDataset,
    /// PromptVersion that formats each sample before it is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<LocalRef>,
    /// Metrics to compute.
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "set"))]
    pub metrics: Vec<Metric>,
    /// Pass/fail bounds on metrics.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["metric"]))]
    pub thresholds: Vec<Threshold>,
    /// Fail when a metric regresses against another EvalRun by more than a margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// Settings of the judge metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<Judge>,
    /// Regular expression of the regexMatch metric (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), extend("x-kubernetes-validations" = regex_rules()))]
    pub regex: Option<String>,
    /// Evaluate at most this many samples (the first ones of the split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub sample_limit: Option<i64>,
    /// The run fails when more than this fraction of requests to the target fail.
    #[serde(default = "default_max_error_fraction")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_fraction: f64,
    /// Requests in flight at once against endpoint targets.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: i32,
    /// Generation parameters of each request (greedy by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationParameters>,
}

fn default_max_error_fraction() -> f64 {
    0.05
}
fn default_concurrency() -> i32 {
    4
}

/// The samples of an evaluation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalDataset {
    /// Name of the Dataset in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Split to evaluate on.
    #[serde(default = "default_eval_split")]
    pub split: SplitName,
}

fn default_eval_split() -> SplitName {
    SplitName::Test
}

/// An evaluation metric.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Metric {
    /// Token-weighted perplexity of the expected output (local model targets).
    Perplexity,
    /// Output equals the expected text.
    ExactMatch,
    /// Output equals the expected text after lowercasing and removing punctuation,
    /// articles and extra whitespace.
    NormalizedExactMatch,
    /// Output contains the expected text.
    Contains,
    /// Output matches the regular expression in regex.
    RegexMatch,
    /// Token-level F1 between output and expected text.
    TokenF1,
    /// ROUGE-L F-measure.
    RougeL,
    /// Corpus BLEU-4.
    Bleu,
    /// Accuracy of picking the right choice by log-likelihood (local model targets).
    MultipleChoice,
    /// Score given by another model with a rubric, normalised to 0..1.
    Judge,
}

/// Bounds on one metric. At least one of min and max is set, min does not exceed max,
/// and both lie in the metric's range: 0..1 for every metric but perplexity, which is
/// at least 1. A judge threshold must be able to fail.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.min) || has(self.max)", "message": "a threshold needs min or max"},
    {"rule": "!has(self.min) || !has(self.max) || self.min <= self.max", "message": "min must not exceed max", "fieldPath": ".min", "reason": "FieldValueInvalid"},
    {"rule": "self.metric == 'perplexity' || ((!has(self.min) || (self.min >= 0.0 && self.min <= 1.0)) && (!has(self.max) || (self.max >= 0.0 && self.max <= 1.0)))", "message": "min and max must lie in 0..1: every metric but perplexity (exactMatch, normalizedExactMatch, contains, regexMatch, tokenF1, rougeL, bleu, multipleChoice, judge) is a fraction", "reason": "FieldValueInvalid"},
    {"rule": "self.metric != 'perplexity' || ((!has(self.min) || self.min >= 1.0) && (!has(self.max) || self.max >= 1.0))", "message": "perplexity is at least 1: min and max below 1 can never hold", "reason": "FieldValueInvalid"},
    {"rule": "self.metric != 'judge' || (has(self.min) && self.min > 0.0) || (has(self.max) && self.max < 1.0)", "message": "this judge threshold passes every answer: judge scores lie in 0..1, so set min above 0 or max below 1", "reason": "FieldValueInvalid"}
]))]
pub struct Threshold {
    /// The metric bounded; it must be listed in metrics.
    pub metric: Metric,
    /// The metric must be at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The metric must be at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// Comparison with an earlier EvalRun.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    /// Name of the baseline EvalRun in this namespace; it must have Succeeded.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub eval_run: String,
    /// Largest allowed regression of each shared metric, in the metric's own units
    /// (lower is better for perplexity, higher for the others).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub max_regression: f64,
}

/// A judge model scoring each output with a rubric.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.modelDeployment) != has(self.endpoint)", "message": "exactly one of modelDeployment or endpoint must be set"}
]))]
pub struct Judge {
    /// A ModelDeployment in this namespace that judges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DEPLOYMENT_NAME_PATTERN))]
    pub model_deployment: Option<String>,
    /// An OpenAI-compatible endpoint that judges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// Rubric, a Jinja template with the variables input, expected and output; the judge
    /// answers with a score from 1 to maxScore.
    #[schemars(length(min = 1, max = 16384), extend("x-kubernetes-validations" = nonblank_rules()))]
    pub rubric: String,
    /// Highest score of the rubric, at least 2: a score s counts as (s - 1) / (maxScore -
    /// 1), so a scale of one score would pass every answer.
    #[serde(default = "default_max_score")]
    #[schemars(range(min = 2, max = 100))]
    pub max_score: i32,
}

fn default_max_score() -> i32 {
    5
}

/// Observed state of an EvalRun.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvalRunStatus {
    /// observedGeneration, conditions (Ready, Succeeded, Failed, Passed) and phase.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// When the run started and ended.
    #[serde(flatten)]
    pub times: JobTimes,
    /// What was evaluated, pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluated: Option<EvaluatedTarget>,
    /// Metric values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricResult>,
    /// Whether every threshold and the baseline comparison held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed: Option<bool>,
    /// Verdict of each threshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<ThresholdResult>,
    /// Comparison with the baseline, metric by metric.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline: Vec<BaselineComparison>,
    /// A few of the worst samples.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing_samples: Vec<SampleResult>,
    /// Samples evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<i64>,
    /// Requests to the target that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<i64>,
    /// URI of results.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_uri: Option<String>,
    /// Pods started for this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
}

/// What an EvalRun evaluated.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluatedTarget {
    /// sha256 of the model (and adapter) evaluated, for local targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_digest: Option<String>,
    /// Revision of the ModelDeployment evaluated, for deployment targets and gates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// URL of the endpoint evaluated, for endpoint targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// sha256 of the dataset evaluated on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_digest: Option<String>,
    /// sha256 of the PromptVersion used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_digest: Option<String>,
}

/// The value of one metric.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricResult {
    /// The metric.
    pub metric: Metric,
    /// Its value.
    pub value: f64,
    /// Lower end of the 95% bootstrap confidence interval, for means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_low: Option<f64>,
    /// Upper end of the 95% bootstrap confidence interval, for means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci_high: Option<f64>,
}

/// Verdict of one threshold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdResult {
    /// The metric.
    pub metric: Metric,
    /// Its value.
    pub value: f64,
    /// Whether it held.
    pub passed: bool,
}

/// One metric against the baseline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaselineComparison {
    /// The metric.
    pub metric: Metric,
    /// Value of the baseline run.
    pub baseline: f64,
    /// Value of this run.
    pub value: f64,
    /// Whether it regressed by more than maxRegression.
    pub regressed: bool,
}

/// One evaluated sample.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SampleResult {
    /// Position of the sample in the split.
    pub index: i64,
    /// The input sent (truncated).
    pub input: String,
    /// The expected output (truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// The output received (truncated), or the error.
    pub output: String,
    /// Per-sample scores.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scores: BTreeMap<String, f64>,
}
