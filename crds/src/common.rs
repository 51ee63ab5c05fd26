//! Types shared by several kinds: where a model comes from, artifacts, pod resources,
//! generation parameters, references and the status building blocks.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The regular expression every artifact or data URI must match. `file://` and `pvc://`
/// pass it so that [`uri_rules`] can refuse them with a message that says why.
pub const URI_PATTERN: &str = r"^(store|s3|https?|pvc|file)://\S+$";
/// The regular expression of a lowercase hex sha256 digest.
pub const SHA256_PATTERN: &str = r"^[a-f0-9]{64}$";
/// The regular expression of a Kubernetes object name (DNS-1123 subdomain).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
/// The regular expression of a ModelDeployment's name (and of references to one): a
/// DNS-1035 label, because the Service in front of it carries the same name.
pub const DEPLOYMENT_NAME_PATTERN: &str = r"^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// The regular expression of a Kubernetes label value (without the 63-character limit).
pub const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// Largest JSON integer that every client reads back exactly (2^53 - 1): the bound of
/// seeds and other 64-bit counts.
pub const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;
/// Bound of step counts and record limits.
pub const MAX_COUNT: i64 = 1_000_000_000;

/// The CEL regular expression of a port from 1 to 65535.
const PORT_RE: &str = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";

/// CEL rule of an http(s) URL: when it names a port, the port lies in 1..65535.
fn port_rule() -> serde_json::Value {
    serde_json::json!({
        "rule": format!(
            "!self.matches('^https?://[^/?#]*:[0-9]*([/?#].*)?$') || self.matches('^https?://[^/?#]*:{PORT_RE}([/?#].*)?$')"
        ),
        "message": "the port of the URL must be between 1 and 65535"
    })
}

/// The CEL rules of every URI a user gives (sources, models, adapters, outputs):
/// - `file://` is refused: in a pod it reads the pod's own files (such as its
///   service-account token); local files belong to the CLI, which uploads them;
/// - `pvc://` is refused: no workload mounts claims named in a spec;
/// - no `.` or `..` path segments, so a key cannot climb out of its prefix, and a
///   `store://` key is relative (no leading `/`, no empty segments);
/// - an http(s) port lies in 1..65535.
pub fn uri_rules() -> serde_json::Value {
    serde_json::json!([
        {"rule": "!self.startsWith('file://')", "message": "file:// URIs are refused: in a pod they read the pod's own files (such as its service-account token); put the file in the artifact store and use store://KEY, s3:// or https://"},
        {"rule": "!self.startsWith('pvc://')", "message": "pvc:// URIs are not supported: copy the data into the artifact store (store://KEY) or an S3 bucket (s3://BUCKET/KEY)"},
        {"rule": "!self.matches('/[.][.]?(/|$)')", "message": "the URI must not contain . or .. path segments"},
        {"rule": "!self.matches('^store://(/|.*//)')", "message": "a store:// key is relative to the namespace's store: no leading / and no empty segments"},
        port_rule()
    ])
}

/// The CEL rules of an endpoint URL (http:// or https://, checked by its pattern).
pub fn url_rules() -> serde_json::Value {
    serde_json::json!([port_rule()])
}

/// The CEL rule of a regular expression: it must compile with RE2 (the apiserver's
/// engine, whose syntax the worker's engine shares; the operator compiles it again with
/// the worker's engine before any pod starts).
pub fn regex_rules() -> serde_json::Value {
    serde_json::json!([
        {"rule": "type(''.matches(self)) == bool", "message": "must be a valid regular expression (RE2 syntax: no look-around or back-references)"}
    ])
}

/// The CEL rule of a text that must say something: not empty, not only whitespace.
pub fn nonblank_rules() -> serde_json::Value {
    serde_json::json!([
        {"rule": "self.trim() != ''", "message": "must not be empty or only whitespace"}
    ])
}

/// A Kubernetes qualified name (label or taint key): an optional DNS subdomain prefix
/// and `/`, then a name of up to 63 characters.
fn qualified_name_rule(var: &str) -> String {
    format!(
        "{var}.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$') \
         && ({var}.contains('/') ? ({var}.split('/')[0].size() <= 253 && {var}.split('/')[1].size() <= 63) : {var}.size() <= 63)"
    )
}

/// Schema of a CPU or memory quantity: an integer or a Kubernetes quantity string
/// greater than zero (`500m`, `0.5`, `2`, `2Gi`; not `32GB` or `-2`).
fn quantity_schema(what: &str, examples: &str) -> schemars::Schema {
    let value = serde_json::json!({
        "nullable": true,
        "x-kubernetes-int-or-string": true,
        "x-kubernetes-validations": [{
            "rule": "type(self) == int ? self > 0 : (isQuantity(self) && quantity(self).isGreaterThan(quantity('0')))",
            "message": format!("{what} must be a Kubernetes quantity greater than 0, such as {examples}")
        }]
    });
    schemars::Schema::try_from(value).unwrap_or_default()
}

fn cpu_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    quantity_schema("cpu", "500m, 0.5 or 2")
}

fn memory_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    quantity_schema("memory", "512Mi or 8Gi (32GB is not one: write 32G or 32Gi)")
}

/// Schema of node-selector labels: keys are qualified names, values label values.
fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let value = serde_json::json!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, {})", qualified_name_rule("k")),
            "message": "every nodeSelector key must be a label key: an optional DNS subdomain prefix and /, then up to 63 letters, digits, -, _ or . that start and end with a letter or digit"
        }]
    });
    schemars::Schema::try_from(value).unwrap_or_default()
}

/// Schema of tolerations, checked as Kubernetes checks a pod's: operators Exists or
/// Equal, effects NoSchedule, PreferNoSchedule or NoExecute, keys label keys.
fn tolerations_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let value = serde_json::json!({
        "type": "array",
        "maxItems": 32,
        "items": {
            "type": "object",
            "description": "A taint the pod tolerates.",
            "properties": {
                "key": {"type": "string", "maxLength": 317, "description": "Taint key; empty (with operator Exists) matches every key."},
                "operator": {"type": "string", "enum": ["Exists", "Equal", ""], "description": "Exists or Equal (the default)."},
                "value": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN, "description": "Taint value, for operator Equal."},
                "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute", ""], "description": "Taint effect; empty matches every effect."},
                "tolerationSeconds": {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2147483647, "description": "Seconds a NoExecute taint is tolerated before eviction."}
            },
            "x-kubernetes-validations": [
                {"rule": format!("!has(self.key) || self.key == '' || ({})", qualified_name_rule("self.key")), "message": "key must be a label key: an optional DNS subdomain prefix and /, then up to 63 letters, digits, -, _ or .", "fieldPath": ".key", "reason": "FieldValueInvalid"},
                {"rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')", "message": "an empty key needs operator Exists", "fieldPath": ".operator", "reason": "FieldValueInvalid"},
                {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''", "message": "value must be empty when operator is Exists", "fieldPath": ".value", "reason": "FieldValueInvalid"},
                {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')", "message": "tolerationSeconds needs effect NoExecute", "fieldPath": ".tolerationSeconds", "reason": "FieldValueInvalid"}
            ]
        }
    });
    schemars::Schema::try_from(value).unwrap_or_default()
}

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
    {"rule": "has(self.uri) != has(self.fineTuneJob)", "message": "exactly one of uri or fineTuneJob must be set"},
    {"rule": "!has(self.uri) || !self.uri.startsWith('http://') || has(self.sha256)", "message": "an http:// download needs sha256: plain HTTP can be altered on the way", "fieldPath": ".sha256", "reason": "FieldValueRequired"}
]))]
pub struct ModelSource {
    /// URI of the weights: a GGUF file or an HF directory under store://KEY, s3://BUCKET/KEY
    /// or https://HOST/PATH (http:// only with sha256). The operator resolves it once
    /// into the artifact store (models/sha256-DIGEST/) and every pod reads that copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = URI_PATTERN), extend("x-kubernetes-validations" = uri_rules()))]
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
    {"rule": "has(self.uri) != has(self.fineTuneJob)", "message": "exactly one of uri or fineTuneJob must be set"},
    {"rule": "!has(self.uri) || !self.uri.startsWith('http://') || has(self.sha256)", "message": "an http:// download needs sha256: plain HTTP can be altered on the way", "fieldPath": ".sha256", "reason": "FieldValueRequired"}
]))]
pub struct AdapterSource {
    /// URI of a PEFT adapter directory (adapter_model.safetensors + adapter_config.json):
    /// store://KEY, s3://BUCKET/KEY or https://HOST/PATH (http:// only with sha256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = URI_PATTERN), extend("x-kubernetes-validations" = uri_rules()))]
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
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: Option<String>,
}

/// Compute resources and placement of the pod that does the work.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Number of NVIDIA GPUs for the pod (nvidia.com/gpu), 0 or 1. A pod with 0 GPUs runs
    /// the CPU worker image and sees no GPU at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1), extend("x-kubernetes-validations" = [
        {"rule": "self <= 1", "message": "gpus must be 0 or 1: a pod uses at most one GPU (data-parallel training is not supported yet)"}
    ]))]
    pub gpus: Option<i32>,
    /// CPU request and limit, a Kubernetes quantity greater than 0, e.g. "2", "0.5" or
    /// "500m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "cpu_schema")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, a Kubernetes quantity greater than 0, e.g. "8Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "memory_schema")]
    pub memory: Option<Quantity>,
    /// Node labels the pod must match, e.g. nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3.
    /// Keys are label keys and values label values, as Kubernetes checks them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "node_selector_schema")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the pod, e.g. for tainted GPU nodes: operator Exists or Equal,
    /// effect NoSchedule, PreferNoSchedule or NoExecute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "tolerations_schema")]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = NAME_PATTERN))]
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
    #[schemars(range(min = 0, max = 1048576))]
    pub top_k: Option<i32>,
    /// Maximum number of tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
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
    #[schemars(range(min = 0, max = MAX_SAFE_INTEGER))]
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
