//! FineTuneJob: LoRA or full fine-tuning of a base model on a Dataset.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Artifact, CommonStatus, JobTimes, Lineage, MAX_COUNT, MAX_SAFE_INTEGER, ModelSource, NAME_PATTERN, Resources,
};
use crate::dataset::default_backoff_limit;

/// Fine-tunes a base model on a Dataset and writes a PEFT-compatible adapter (method
/// lora) or a full model (method full), with checkpoints that survive pod loss.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "llmops.dev",
    version = "v1alpha1",
    kind = "FineTuneJob",
    namespaced,
    status = "FineTuneJobStatus",
    shortname = "ftj",
    shortname = "ft",
    category = "llmops",
    doc = "FineTuneJob adapts a base model to a Dataset with LoRA or full fine-tuning.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Optimizer step / total steps"
    ),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.loss"),
    printcolumn(name = "Tokens/s", type_ = "number", json_path = ".status.tokensPerSecond", priority = 1),
    printcolumn(name = "ETA", type_ = "string", json_path = ".status.eta", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.method != 'lora' || has(self.lora)", "message": "lora settings are required when method is lora", "fieldPath": ".lora", "reason": "FieldValueRequired"},
    {"rule": "self.method != 'full' || !has(self.lora)", "message": "lora settings must not be set when method is full", "fieldPath": ".lora", "reason": "FieldValueForbidden"},
    {"rule": "self.method != 'full' || !has(self.merge) || !self.merge", "message": "merge applies to method lora only: method full already writes the whole model", "fieldPath": ".merge", "reason": "FieldValueForbidden"},
    {"rule": "!has(self.earlyStopping) || has(self.dataset.validationSplit)", "message": "earlyStopping watches the validation loss: set dataset.validationSplit", "fieldPath": ".earlyStopping", "reason": "FieldValueRequired"}
]))]
pub struct FineTuneJobSpec {
    /// The base model to adapt.
    pub model: ModelSource,
    /// The Dataset to train on. The job waits until it is Ready and pins its digest.
    pub dataset: DatasetInput,
    /// lora trains small low-rank adapters beside frozen base weights; full trains every
    /// weight (small models only).
    #[serde(default = "default_method")]
    pub method: FineTuneMethod,
    /// LoRA settings; required when method is lora.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// Optimisation settings.
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
    /// How often checkpoints are written to the artifact store.
    #[serde(default)]
    pub checkpoints: CheckpointSpec,
    /// Stop when the validation loss has not improved for a while; needs
    /// dataset.validationSplit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStopping>,
    /// Also write the base model with the adapter merged in (method lora only).
    #[serde(default)]
    pub merge: bool,
    /// Resources of the training pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Number of retries of a failed pod before the job is Failed; each retry resumes
    /// from the newest checkpoint.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 20))]
    pub backoff_limit: i32,
    /// Pause the job: the worker writes a checkpoint and stops; setting it back to false
    /// resumes from that checkpoint.
    #[serde(default)]
    pub suspend: bool,
}

fn default_method() -> FineTuneMethod {
    FineTuneMethod::Lora
}

/// The Dataset a job reads, and which of its splits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.validationSplit) || self.validationSplit != (has(self.trainSplit) ? self.trainSplit : 'train')", "message": "validationSplit must differ from trainSplit: a loss on the training data does not measure generalisation", "fieldPath": ".validationSplit", "reason": "FieldValueInvalid"}
]))]
pub struct DatasetInput {
    /// Name of the Dataset in this namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    /// Split to train on.
    #[serde(default = "default_train_split")]
    pub train_split: SplitName,
    /// Split to compute the validation loss on (not the train split); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_split: Option<SplitName>,
}

fn default_train_split() -> SplitName {
    SplitName::Train
}

/// A split of a prepared Dataset.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    /// The train split.
    #[default]
    Train,
    /// The validation split.
    Validation,
    /// The test split.
    Test,
}

impl SplitName {
    /// The file stem of the split in a Dataset's output.
    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::Train => "train",
            SplitName::Validation => "validation",
            SplitName::Test => "test",
        }
    }
}

/// Fine-tuning method.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FineTuneMethod {
    /// Low-rank adapters on chosen projections; base weights frozen.
    Lora,
    /// Every weight is trained.
    Full,
}

/// A linear projection of a Llama-family block.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    /// Attention query projection.
    QProj,
    /// Attention key projection.
    KProj,
    /// Attention value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MLP gate projection.
    GateProj,
    /// MLP up projection.
    UpProj,
    /// MLP down projection.
    DownProj,
}

/// LoRA settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// Rank of the low-rank update.
    #[serde(default = "default_rank")]
    #[schemars(range(min = 1, max = 256))]
    pub rank: i32,
    /// Scaling numerator: the update is scaled by alpha / rank.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.0, max = 1024.0), extend("exclusiveMinimum" = true))]
    pub alpha: f64,
    /// Dropout applied to the adapter's input during training.
    #[serde(default = "default_dropout")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMaximum" = true))]
    pub dropout: f64,
    /// Projections that get an adapter.
    #[serde(default = "default_target_modules")]
    #[schemars(length(min = 1, max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub target_modules: Vec<TargetModule>,
}

fn default_rank() -> i32 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_target_modules() -> Vec<TargetModule> {
    vec![TargetModule::QProj, TargetModule::KProj, TargetModule::VProj, TargetModule::OProj]
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            target_modules: default_target_modules(),
        }
    }
}

/// Learning-rate schedule after warmup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Cosine decay to zero.
    Cosine,
    /// Linear decay to zero.
    Linear,
    /// Constant.
    Constant,
}

/// Optimisation settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.warmupSteps) || !has(self.maxSteps) || self.warmupSteps <= self.maxSteps", "message": "warmupSteps must not exceed maxSteps"}
]))]
pub struct Hyperparameters {
    /// Passes over the train split.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: i32,
    /// Caps the run at this many optimizer steps, whatever epochs says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub max_steps: Option<i64>,
    /// Sequences per micro-batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1024))]
    pub batch_size: i32,
    /// Micro-batches accumulated per optimizer step.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 1024))]
    pub gradient_accumulation_steps: i32,
    /// Peak learning rate of AdamW.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub learning_rate: f64,
    /// Schedule after warmup.
    #[serde(default = "default_schedule")]
    pub lr_schedule: LrSchedule,
    /// Optimizer steps of linear warmup from zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_COUNT))]
    pub warmup_steps: Option<i64>,
    /// AdamW weight decay.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    #[serde(default = "default_max_grad_norm")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub max_grad_norm: f64,
    /// Tokens per sequence; longer records are truncated.
    #[serde(default = "default_max_seq_length")]
    #[schemars(range(min = 8, max = 131072))]
    pub max_seq_length: i32,
    /// Pack several short records into one sequence instead of padding each.
    #[serde(default)]
    pub packing: bool,
    /// Compute the validation loss every this many optimizer steps.
    #[serde(default = "default_eval_interval")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub eval_interval: i64,
    /// Seed of initialisation, dropout and data order.
    #[serde(default = "default_seed")]
    #[schemars(range(min = 0, max = MAX_SAFE_INTEGER))]
    pub seed: i64,
}

fn default_epochs() -> i32 {
    1
}
fn default_batch_size() -> i32 {
    4
}
fn default_one() -> i32 {
    1
}
fn default_learning_rate() -> f64 {
    2e-4
}
fn default_schedule() -> LrSchedule {
    LrSchedule::Cosine
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_max_seq_length() -> i32 {
    512
}
fn default_eval_interval() -> i64 {
    50
}
fn default_seed() -> i64 {
    42
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            epochs: default_epochs(),
            max_steps: None,
            batch_size: default_batch_size(),
            gradient_accumulation_steps: default_one(),
            learning_rate: default_learning_rate(),
            lr_schedule: default_schedule(),
            warmup_steps: None,
            weight_decay: 0.0,
            max_grad_norm: default_max_grad_norm(),
            max_seq_length: default_max_seq_length(),
            packing: false,
            eval_interval: default_eval_interval(),
            seed: default_seed(),
        }
    }
}

/// Checkpointing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Write a checkpoint every this many optimizer steps.
    #[serde(default = "default_checkpoint_interval")]
    #[schemars(range(min = 1, max = MAX_COUNT))]
    pub interval_steps: i64,
    /// Number of newest checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 100))]
    pub keep: i32,
}

fn default_checkpoint_interval() -> i64 {
    100
}
fn default_keep() -> i32 {
    2
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self { interval_steps: default_checkpoint_interval(), keep: default_keep() }
    }
}

/// Early stopping on the validation loss.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EarlyStopping {
    /// Validation rounds without improvement before training stops.
    #[schemars(range(min = 1, max = 1000))]
    pub patience: i32,
    /// Smallest decrease of the validation loss that counts as an improvement.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub min_delta: f64,
}

/// Observed state of a FineTuneJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FineTuneJobStatus {
    /// observedGeneration, conditions (Ready, Succeeded, Failed) and phase.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// When training started and ended.
    #[serde(flatten)]
    pub times: JobTimes,
    /// Optimizer steps done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
    /// Optimizer steps in the whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    /// "step/totalSteps", for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Fractional epoch reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// Training loss of the latest step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Latest validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    /// Learning rate of the latest step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    /// Training throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Estimated time left, e.g. "12m30s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// Pods started for this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// Newest checkpoint in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,
    /// The trained adapter (PEFT safetensors + adapter_config.json), or the full model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// The base model with the adapter merged in, when merge is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_model: Option<Artifact>,
    /// Digests of the base model, the dataset and the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
}

/// A checkpoint in the store.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Directory URI of the checkpoint.
    pub uri: String,
    /// Optimizer step it was taken at.
    pub step: i64,
}
