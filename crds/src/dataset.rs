//! Dataset: ingest records, clean, deduplicate, redact, split and count tokens.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Artifact, CommonStatus, DEPLOYMENT_NAME_PATTERN, JobTimes, Lineage, MAX_COUNT, MAX_SAFE_INTEGER, ModelSource,
    Resources, URI_PATTERN, default_true, regex_rules, uri_rules,
};

/// Prepares a versioned, content-addressed dataset: reads records from a source, applies
/// the transforms in order, splits them into train/validation/test and writes Parquet.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmops.dev",
    version = "v1alpha1",
    kind = "Dataset",
    namespaced,
    status = "DatasetStatus",
    shortname = "dset",
    category = "llmops",
    doc = "Dataset prepares training and evaluation data: ingest, clean, deduplicate, redact, split and tokenize.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Records",
        type_ = "integer",
        json_path = ".status.records.output",
        description = "Records written after all transforms"
    ),
    printcolumn(name = "Digest", type_ = "string", json_path = ".status.artifact.sha256", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.transforms) || has(self.tokenStats) || !self.transforms.exists(t, has(t.filter) && (has(t.filter.minTokens) || has(t.filter.maxTokens)))", "message": "a filter with minTokens or maxTokens needs tokenStats.model, whose tokenizer counts the tokens", "fieldPath": ".tokenStats", "reason": "FieldValueRequired"},
    {"rule": "!has(self.mapping) || (self.schema == 'chat' && !has(self.mapping.prompt) && !has(self.mapping.completion) && !has(self.mapping.text)) || (self.schema == 'completion' && !has(self.mapping.messages) && !has(self.mapping.system) && !has(self.mapping.text)) || (self.schema == 'text' && !has(self.mapping.messages) && !has(self.mapping.system) && !has(self.mapping.prompt) && !has(self.mapping.completion))", "message": "mapping names a field the schema never reads: chat reads messages and system, completion reads prompt and completion, text reads text", "fieldPath": ".mapping", "reason": "FieldValueInvalid"}
]))]
pub struct DatasetSpec {
    /// Where the records come from.
    pub source: DatasetSource,
    /// File format of the source. Inferred from the file name when absent (.jsonl, .json,
    /// .csv, .parquet, .txt, optionally followed by .gz or .zst).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// Shape of the records written: chat (messages), completion (prompt/completion) or
    /// text.
    #[serde(default = "default_schema")]
    pub schema: RecordSchema,
    /// Field names of the source records, when they differ from the schema's own names.
    /// Only the fields the schema reads may be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<FieldMapping>,
    /// Transforms applied to every record, in this order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub transforms: Vec<Transform>,
    /// How records are divided into train, validation and test.
    #[serde(default)]
    pub split: Split,
    /// Count tokens with a model's tokenizer (totals, per split, histogram).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_stats: Option<TokenStats>,
    /// Where the output is written and in which formats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<DatasetOutput>,
    /// Resources of the preparing pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Number of retries of a failed preparation before the Dataset is Failed.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: i32,
}

fn default_schema() -> RecordSchema {
    RecordSchema::Chat
}

pub(crate) fn default_backoff_limit() -> i32 {
    3
}

/// Where the records come from: exactly one of uri, inline and feedback.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.uri), has(self.inline), has(self.feedback)].exists_one(x, x)", "message": "exactly one of uri, inline or feedback must be set"}
]))]
pub struct DatasetSource {
    /// URI of a file or a directory of files: store://KEY, s3://BUCKET/PREFIX or
    /// https://HOST/PATH (file:// and pvc:// are refused; no . or .. segments). A
    /// trailing glob (e.g. s3://corpus/2026/*.jsonl.gz) selects several files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = URI_PATTERN), extend("x-kubernetes-validations" = uri_rules()))]
    pub uri: Option<String>,
    /// Records written in the manifest itself, each an object in the source format's
    /// field names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1000))]
    pub inline: Option<Vec<InlineRecord>>,
    /// The traffic log of a ModelDeployment: rated completions become training records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackSource>,
}

/// One inline record: any JSON object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(transparent)]
pub struct InlineRecord(
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true, "type" = "object"))]
    pub  serde_json::Map<String, serde_json::Value>,
);

/// Completions served by a ModelDeployment and rated through its /v1/feedback endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackSource {
    /// Name of the ModelDeployment in this namespace whose traffic log is read.
    #[schemars(length(min = 1, max = 63), regex(pattern = DEPLOYMENT_NAME_PATTERN))]
    pub model_deployment: String,
    /// Keep completions rated at least this (1 to 5).
    #[serde(default = "default_min_rating")]
    #[schemars(range(min = 1, max = 5))]
    pub min_rating: i32,
    /// Use the user's correction instead of the model's output when one was given.
    #[serde(default = "default_true")]
    pub prefer_correction: bool,
    /// Read the log up to this time. When absent, the time of the first preparation is
    /// recorded in status and used for every retry, so the snapshot does not move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
}

fn default_min_rating() -> i32 {
    4
}

/// File format of the source.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
    /// Plain text, one record per line.
    Text,
}

/// Shape of the records a Dataset writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecordSchema {
    /// `messages`: a list of {role, content}.
    Chat,
    /// `prompt` and `completion` strings.
    Completion,
    /// A single `text` string.
    Text,
}

/// Source field names for each field of the output schema.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldMapping {
    /// Source field holding the chat messages (schema chat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub messages: Option<String>,
    /// Source field holding a system prompt prepended to the messages (schema chat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub system: Option<String>,
    /// Source field holding the prompt (schema completion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub prompt: Option<String>,
    /// Source field holding the completion (schema completion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub completion: Option<String>,
    /// Source field holding the text (schema text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub text: Option<String>,
}

/// One transform: exactly one of its fields is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.normalize), has(self.filter), has(self.redact), has(self.exactDedup), has(self.nearDedup)].exists_one(x, x)", "message": "each transform sets exactly one of normalize, filter, redact, exactDedup or nearDedup"}
]))]
pub struct Transform {
    /// Unicode normalisation and whitespace cleanup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<NormalizeTransform>,
    /// Drop records by length, pattern or quality heuristics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterTransform>,
    /// Replace personal data with placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redact: Option<RedactTransform>,
    /// Drop records whose normalised text was already seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_dedup: Option<ExactDedupTransform>,
    /// Drop near-duplicates found with MinHash and locality-sensitive hashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_dedup: Option<NearDedupTransform>,
}

/// Unicode normalisation form.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum UnicodeForm {
    /// Canonical composition.
    #[serde(rename = "NFC")]
    Nfc,
    /// Compatibility composition (folds ligatures, full-width forms).
    #[serde(rename = "NFKC")]
    Nfkc,
    /// Leave the text as it is.
    #[serde(rename = "None")]
    None,
}

/// Unicode normalisation and whitespace cleanup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NormalizeTransform {
    /// Unicode normalisation form.
    #[serde(default = "default_unicode_form")]
    pub unicode: UnicodeForm,
    /// Collapse runs of spaces and tabs, trim lines and drop control characters.
    #[serde(default = "default_true")]
    pub whitespace: bool,
}

fn default_unicode_form() -> UnicodeForm {
    UnicodeForm::Nfkc
}

/// Drop records by length, pattern or quality heuristics. A record is kept when it
/// passes every check that is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.minChars) || !has(self.maxChars) || self.minChars <= self.maxChars", "message": "minChars must not exceed maxChars"},
    {"rule": "!has(self.minTokens) || !has(self.maxTokens) || self.minTokens <= self.maxTokens", "message": "minTokens must not exceed maxTokens"}
]))]
pub struct FilterTransform {
    /// Minimum number of characters of the record's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_COUNT))]
    pub min_chars: Option<i64>,
    /// Maximum number of characters of the record's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub max_chars: Option<i64>,
    /// Minimum number of tokens (needs tokenStats.model, refused without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_COUNT))]
    pub min_tokens: Option<i64>,
    /// Maximum number of tokens (needs tokenStats.model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub max_tokens: Option<i64>,
    /// Keep only records matching this regular expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), extend("x-kubernetes-validations" = regex_rules()))]
    pub keep_pattern: Option<String>,
    /// Drop records matching this regular expression (RE2 syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), extend("x-kubernetes-validations" = regex_rules()))]
    pub drop_pattern: Option<String>,
    /// Drop records in which more than this fraction of characters are neither letters,
    /// digits nor whitespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_symbol_ratio: Option<f64>,
    /// Drop records in which more than this fraction of lines repeat an earlier line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_repeated_line_ratio: Option<f64>,
}

/// A kind of personal data that can be redacted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PiiKind {
    /// E-mail addresses.
    Email,
    /// Telephone numbers.
    Phone,
    /// IPv4 and IPv6 addresses.
    IpAddress,
    /// Payment card numbers that pass the Luhn check.
    CreditCard,
}

/// Replace personal data with placeholders such as <EMAIL>.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedactTransform {
    /// Built-in kinds to redact.
    #[serde(default = "default_pii_kinds")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub kinds: Vec<PiiKind>,
    /// Further patterns to redact, each replaced by <NAME>.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub custom: Vec<CustomPattern>,
}

fn default_pii_kinds() -> Vec<PiiKind> {
    vec![PiiKind::Email, PiiKind::Phone, PiiKind::IpAddress, PiiKind::CreditCard]
}

/// A named regular expression to redact.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomPattern {
    /// Name of the pattern, used in the placeholder and the redaction counts.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z][A-Za-z0-9_]*$"))]
    pub name: String,
    /// Regular expression (RE2 syntax: no look-around or back-references).
    #[schemars(length(min = 1, max = 1024), extend("x-kubernetes-validations" = regex_rules()))]
    pub pattern: String,
}

/// Drop records whose normalised text (lowercased, whitespace collapsed) was already seen.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExactDedupTransform {
    /// Compare texts exactly as they are, without lowercasing or collapsing whitespace.
    #[serde(default)]
    pub case_sensitive: bool,
}

/// Drop near-duplicates: records whose estimated Jaccard similarity of word shingles to
/// an earlier record is at least the threshold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NearDedupTransform {
    /// Words per shingle.
    #[serde(default = "default_shingle_size")]
    #[schemars(range(min = 1, max = 32))]
    pub shingle_size: i32,
    /// Number of MinHash permutations (signature length).
    #[serde(default = "default_permutations")]
    #[schemars(range(min = 16, max = 1024))]
    pub permutations: i32,
    /// Jaccard similarity at and above which two records are duplicates.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub threshold: f64,
    /// Seed of the hash permutations.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_SAFE_INTEGER))]
    pub seed: i64,
}

fn default_shingle_size() -> i32 {
    5
}
fn default_permutations() -> i32 {
    128
}
fn default_threshold() -> f64 {
    0.5
}

/// Fractions of records per split; they add up to 1. Records of one near-duplicate
/// cluster always land in the same split.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.train + self.validation + self.test > 0.999999 && self.train + self.validation + self.test < 1.000001", "message": "train + validation + test must add up to 1"}
]))]
pub struct Split {
    /// Fraction of records in the train split.
    #[serde(default = "default_train")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub train: f64,
    /// Fraction of records in the validation split.
    #[serde(default = "default_validation")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub validation: f64,
    /// Fraction of records in the test split.
    #[serde(default = "default_test")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub test: f64,
    /// Seed of the assignment of records to splits.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_SAFE_INTEGER))]
    pub seed: i64,
}

fn default_train() -> f64 {
    0.9
}
fn default_validation() -> f64 {
    0.05
}
fn default_test() -> f64 {
    0.05
}

impl Default for Split {
    fn default() -> Self {
        Self { train: default_train(), validation: default_validation(), test: default_test(), seed: 0 }
    }
}

/// Token statistics computed with a model's tokenizer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStats {
    /// The model whose tokenizer counts tokens.
    pub model: ModelSource,
    /// Number of buckets of the token-length histogram.
    #[serde(default = "default_histogram_buckets")]
    #[schemars(range(min = 1, max = 64))]
    pub histogram_buckets: i32,
}

fn default_histogram_buckets() -> i32 {
    16
}

/// Where a Dataset's output goes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetOutput {
    /// Directory URI of the output. Defaults to the artifact store:
    /// store://NAMESPACE/dataset/NAME/UID/output/.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), regex(pattern = URI_PATTERN), extend("x-kubernetes-validations" = uri_rules()))]
    pub uri: Option<String>,
    /// Also write each split as JSONL beside the Parquet file.
    #[serde(default)]
    pub jsonl: bool,
}

/// Observed state of a Dataset.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    /// observedGeneration, conditions (Ready, Succeeded, Failed) and phase.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// When the preparation started and ended.
    #[serde(flatten)]
    pub times: JobTimes,
    /// The prepared dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// Record counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<RecordCounts>,
    /// Records dropped by each transform, in spec order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drops: Vec<TransformDrops>,
    /// Redactions per kind of personal data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redactions: BTreeMap<String, i64>,
    /// Records per split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splits: Option<SplitCounts>,
    /// Token counts, when tokenStats is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenCounts>,
    /// For a feedback source: the time up to which the traffic log was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_time: Option<Time>,
    /// Digests of the source and the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
    /// Number of pods started for this preparation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
}

/// Record counts of a preparation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordCounts {
    /// Records read from the source.
    pub input: i64,
    /// Records written to the splits.
    pub output: i64,
    /// Rows that could not be parsed, with the first few line numbers in the manifest.
    #[serde(default)]
    pub parse_errors: i64,
}

/// How many records one transform dropped.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransformDrops {
    /// Position of the transform in spec.transforms.
    pub index: i32,
    /// Kind of the transform: normalize, filter, redact, exactDedup or nearDedup.
    pub transform: String,
    /// Records dropped.
    pub dropped: i64,
}

/// Records per split.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SplitCounts {
    /// Records in train.
    pub train: i64,
    /// Records in validation.
    pub validation: i64,
    /// Records in test.
    pub test: i64,
}

/// Token counts of the prepared dataset.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenCounts {
    /// Tokens in all splits.
    pub total: i64,
    /// Tokens in each split.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_split: BTreeMap<String, i64>,
}
