//! Types shared by several kinds: where a model comes from, artifacts, pod resources,
//! generation parameters, references and the status building blocks.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The regular expression every artifact or data URI must match.
pub const URI_PATTERN: &str = r"^(store|s3|https?|pvc|file)://\S+$";
/// The regular expression of a lowercase hex sha256 digest.
pub const SHA256_PATTERN: &str = r"^[a-f0-9]{64}$";
/// The regular expression of a Kubernetes object name (DNS-1123 subdomain).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";

/// On-disk layout of a model's weights.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// A single GGUF file; quantized weights stay quantized, the tokenizer and chat
    /// template come from its metadata.
    Gguf,
    /// A Hugging Face directory: config.json, tokenizer.json, tokenizer_config.json and
    /// *.safetensors.
    Hf,
}

/// Numeric type the weights are computed in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// bf16 on a GPU for HF checkpoints, f32 on a CPU; GGUF weights stay quantized.
    Auto,
    /// 32-bit floating point.
    F32,
    /// 16-bit floating point.
    F16,
    /// bfloat16.
    Bf16,
}

/// Where a model's weights come from: a URI, or the output of a FineTuneJob in the same
/// namespace. Exactly one of `uri` and `fineTuneJob` is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.uri) != has(self.fineTuneJob)", "message": "exactly one of uri or fineTuneJob must be set"}
]))]
pub struct ModelSource {
    /// URI of the weights: a GGUF file or an HF directory under store://KEY, s3://BUCKET/KEY,
    /// https://HOST/PATH, pvc://CLAIM/PATH or file://PATH. The operator resolves it once
    /// into the artifact store (models/sha256-DIGEST/) and every pod reads that copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = URI_PATTERN))]
    pub uri: Option<String>,
    /// Name of a FineTuneJob in this namespace whose output is the model: its merged model
    /// for method full, or its base model plus its adapter for method lora. The job must
    /// have Succeeded; its output digest is pinned when first resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = NAME_PATTERN))]
    pub fine_tune_job: Option<String>,
    /// Layout of the weights. Inferred from the URI when absent: a name ending in .gguf is
    /// gguf, anything else an HF directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ModelFormat>,
    /// Expected sha256 of the weights (64 lowercase hex digits). When set, a download that
    /// does not match is refused; when absent the digest found is recorded in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
    /// Numeric type to compute in. Defaults to auto: bf16 on a GPU for HF checkpoints,
    /// f32 on a CPU, GGUF weights kept quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DType>,
}

/// A LoRA adapter: a URI of a PEFT adapter directory, or the output of a FineTuneJob.
/// Exactly one of `uri` and `fineTuneJob` is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.uri) != has(self.fineTuneJob)", "message": "exactly one of uri or fineTuneJob must be set"}
]))]
pub struct AdapterSource {
    /// URI of a PEFT adapter directory (adapter_model.safetensors + adapter_config.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = URI_PATTERN))]
    pub uri: Option<String>,
    /// Name of a FineTuneJob (method lora) in this namespace whose adapter is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = NAME_PATTERN))]
    pub fine_tune_job: Option<String>,
    /// Expected sha256 of the adapter's manifest; a mismatch is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), regex(pattern = SHA256_PATTERN))]
    pub sha256: Option<String>,
}

/// A named LoRA adapter served beside the base model.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedAdapter {
    /// Model name clients use to select this adapter (the `model` field of a request).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$"))]
    pub name: String,
    /// Where the adapter comes from.
    #[serde(flatten)]
    pub source: AdapterSource,
}

/// A reference to another llmops object in the same namespace, by name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalRef {
    /// Name of the referenced object in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Key within the Secret. When absent, every key of the Secret is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// Compute resources and placement of the pod that does the work.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Number of NVIDIA GPUs for the pod (nvidia.com/gpu), 0 or 1. A pod with 0 GPUs runs
    /// the CPU worker image and sees no GPU at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0), extend("x-kubernetes-validations" = [
        {"rule": "self <= 1", "message": "gpus must be 0 or 1: a pod uses at most one GPU (data-parallel training is not supported yet)"}
    ]))]
    pub gpus: Option<i32>,
    /// CPU request and limit, e.g. "2" or "500m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, e.g. "8Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Node labels the pod must match, e.g. nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pod, e.g. for tainted GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
}

/// Default sampling parameters of a generation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenerationParameters {
    /// Sampling temperature; 0 is greedy decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens whose probabilities add up to topP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub top_p: Option<f64>,
    /// Keep only the topK most likely tokens; 0 disables the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub top_k: Option<i32>,
    /// Maximum number of tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<i32>,
    /// Penalty applied to tokens already generated; 1 disables it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0), extend("exclusiveMinimum" = true))]
    pub repetition_penalty: Option<f64>,
    /// Sequences that end the generation when produced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 256)))]
    pub stop: Vec<String>,
    /// Seed of the sampler, for reproducible sampled output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub seed: Option<i64>,
}

/// An artifact a job produced, content-addressed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Where the artifact lives, e.g. store://NS/dataset/NAME/UID/output/.
    pub uri: String,
    /// sha256 of the artifact's manifest.json, which lists the digest of every file.
    pub sha256: String,
}

/// One input an output was built from, with the digest it had when it was used.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LineageInput {
    /// Kind of the input: Dataset, FineTuneJob, PromptVersion, Model or Uri.
    pub kind: String,
    /// Name of the input object, or the URI for plain URIs.
    pub name: String,
    /// sha256 of the input as it was used.
    pub sha256: String,
}

/// Where an output came from: the digests of everything it was built from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lineage {
    /// sha256 of the spec that produced the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// The inputs and their digests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<LineageInput>,
}

/// Schema of a list of conditions: a list-map keyed by type, as Kubernetes does it.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
    schema
}

/// Fields every status has: observedGeneration, conditions and a display-only phase.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current state, one condition per type; every condition has a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// A one-word summary for display (kubectl get); decisions use conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

/// Times a batch job started and ended.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobTimes {
    /// When the worker started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// Condition types used across kinds.
pub mod condition_types {
    /// The object is usable: its output exists or it serves traffic.
    pub const READY: &str = "Ready";
    /// A job finished and produced its output.
    pub const SUCCEEDED: &str = "Succeeded";
    /// A job failed for good.
    pub const FAILED: &str = "Failed";
    /// A deployment has at least one ready replica of its serving revision.
    pub const AVAILABLE: &str = "Available";
    /// A deployment is rolling out or evaluating a new revision.
    pub const PROGRESSING: &str = "Progressing";
    /// An evaluation met every threshold and baseline.
    pub const PASSED: &str = "Passed";
    /// kstatus: the operator is working towards the spec (True while not done).
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the object failed and will not recover without a change of its spec or
    /// of what it references.
    pub const STALLED: &str = "Stalled";
}

/// Default for boolean fields that are on unless turned off.
pub(crate) fn default_true() -> bool {
    true
}
