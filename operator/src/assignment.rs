//! Pure builders of the Assignments the gateway hands out: a spec plus what its
//! references resolved to (digests, store URIs, rendered prompts) becomes the fully
//! resolved Assignment of the protocol. Nothing here talks to the apiserver.

use std::collections::BTreeMap;

use llmops_crds::dataset::{DataFormat, DatasetSpec, PiiKind, RecordSchema, RedactTransform, UnicodeForm};
use llmops_crds::deployment::ModelDeploymentSpec;
use llmops_crds::evalrun::EvalRunSpec;
use llmops_crds::finetune::{FineTuneJobSpec, FineTuneMethod, SplitName};
use llmops_crds::prompt::PromptVersionSpec;
use llmops_crds::{Artifact, DType, GenerationParameters, ModelFormat, ModelSource};
use llmops_proto::v1::{self, Assignment, assignment::Mode};
use llmops_proto::{Validate, validate::describe};

use crate::config::StoreConfig;
use crate::workload::{WorkloadKey, join_uri, store_proto};

/// Why an Assignment cannot be built from what was resolved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct BuildError {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// What is wrong, for a person.
    pub message: String,
}

impl BuildError {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

fn finish(key: &WorkloadKey, store: &StoreConfig, mode: Mode) -> Result<Assignment, BuildError> {
    let assignment = Assignment { workload: Some(key.to_proto()), store: Some(store_proto(store)), mode: Some(mode) };
    assignment.validate().map_err(|errors| {
        BuildError::new("InvalidAssignment", format!("the built assignment is invalid: {}", describe(&errors)))
    })?;
    Ok(assignment)
}

fn lower<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn unsigned32(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// A model given by URI, as the protocol's Model.
pub fn model_from_uri(source: &ModelSource, uri: &str) -> v1::Model {
    let format = match source.format {
        Some(ModelFormat::Gguf) => "gguf",
        Some(ModelFormat::Hf) => "hf",
        None if uri.trim_end_matches('/').ends_with(".gguf") => "gguf",
        None => "hf",
    };
    let dtype = match source.dtype {
        Some(DType::F32) => "f32",
        Some(DType::F16) => "f16",
        Some(DType::Bf16) => "bf16",
        Some(DType::Auto) | None => "auto",
    };
    v1::Model {
        weights: Some(v1::Artifact { uri: uri.to_string(), sha256: source.sha256.clone().unwrap_or_default() }),
        format: format.into(),
        dtype: dtype.into(),
    }
}

/// A model source with a URI; a FineTuneJob source is resolved by the caller.
pub fn model_source(source: &ModelSource) -> Result<v1::Model, BuildError> {
    match &source.uri {
        Some(uri) => Ok(model_from_uri(source, uri)),
        None => Err(BuildError::new("UnsupportedModelSource", "this model must be given by uri")),
    }
}

/// Generation parameters of the CRDs as the protocol's.
pub fn generation(g: &GenerationParameters) -> v1::GenerationParameters {
    v1::GenerationParameters {
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k.map(unsigned32),
        max_tokens: g.max_tokens.map(unsigned32),
        repetition_penalty: g.repetition_penalty,
        stop: g.stop.clone(),
        seed: g.seed.map(unsigned),
    }
}

// ---- Dataset -> prepare ----

/// What a Dataset's references resolved to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResolvedDatasetInputs {
    /// For a feedback source: the traffic log directory of the ModelDeployment.
    pub feedback_uri: Option<String>,
    /// For a feedback source: the snapshot time (spec.until, or the first preparation's).
    pub feedback_until: Option<jiff::Timestamp>,
    /// The tokenizer model of tokenStats, resolved.
    pub tokenizer: Option<v1::Model>,
}

/// The prepare Assignment of a Dataset.
pub fn prepare(
    key: &WorkloadKey,
    store: &StoreConfig,
    spec: &DatasetSpec,
    inputs: &ResolvedDatasetInputs,
) -> Result<Assignment, BuildError> {
    use v1::data_source::Source;
    use v1::transform::Transform as T;
    let source = if let Some(uri) = &spec.source.uri {
        Source::Uri(uri.clone())
    } else if let Some(records) = &spec.source.inline {
        let records = records
            .iter()
            .map(|r| serde_json::from_value::<pbjson_types::Struct>(serde_json::Value::Object(r.0.clone())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BuildError::new("InvalidSource", format!("an inline record cannot be encoded: {e}")))?;
        Source::Inline(v1::InlineRecords { records })
    } else if let Some(f) = &spec.source.feedback {
        let uri = inputs.feedback_uri.clone().ok_or_else(|| {
            BuildError::new("WaitingForModelDeployment", format!("waiting for ModelDeployment {}", f.model_deployment))
        })?;
        let until = inputs
            .feedback_until
            .map(|t| pbjson_types::Timestamp { seconds: t.as_second(), nanos: t.subsec_nanosecond() });
        Source::Feedback(v1::FeedbackLog {
            uri,
            min_rating: unsigned32(f.min_rating),
            prefer_correction: f.prefer_correction,
            until,
        })
    } else {
        return Err(BuildError::new("InvalidSource", "source sets none of uri, inline or feedback"));
    };
    let format = match spec.format {
        Some(DataFormat::Jsonl) => "jsonl",
        Some(DataFormat::Csv) => "csv",
        Some(DataFormat::Parquet) => "parquet",
        Some(DataFormat::Text) => "text",
        None => "",
    };
    let schema = match spec.schema {
        RecordSchema::Chat => "chat",
        RecordSchema::Completion => "completion",
        RecordSchema::Text => "text",
    };
    let mapping = spec.mapping.as_ref().map(|m| v1::FieldMapping {
        messages: m.messages.clone().unwrap_or_default(),
        system: m.system.clone().unwrap_or_default(),
        prompt: m.prompt.clone().unwrap_or_default(),
        completion: m.completion.clone().unwrap_or_default(),
        text: m.text.clone().unwrap_or_default(),
    });
    let mut transforms = Vec::new();
    for t in &spec.transforms {
        let transform = if let Some(n) = &t.normalize {
            T::Normalize(v1::Normalize {
                unicode: match n.unicode {
                    UnicodeForm::Nfc => "NFC",
                    UnicodeForm::Nfkc => "NFKC",
                    UnicodeForm::None => "None",
                }
                .into(),
                whitespace: n.whitespace,
            })
        } else if let Some(f) = &t.filter {
            T::Filter(v1::Filter {
                min_chars: f.min_chars.map(unsigned),
                max_chars: f.max_chars.map(unsigned),
                min_tokens: f.min_tokens.map(unsigned),
                max_tokens: f.max_tokens.map(unsigned),
                keep_pattern: f.keep_pattern.clone().unwrap_or_default(),
                drop_pattern: f.drop_pattern.clone().unwrap_or_default(),
                max_symbol_ratio: f.max_symbol_ratio,
                max_repeated_line_ratio: f.max_repeated_line_ratio,
            })
        } else if let Some(r) = &t.redact {
            T::Redact(redact(r))
        } else if let Some(d) = &t.exact_dedup {
            T::ExactDedup(v1::ExactDedup { case_sensitive: d.case_sensitive })
        } else if let Some(d) = &t.near_dedup {
            T::NearDedup(v1::NearDedup {
                shingle_size: unsigned32(d.shingle_size),
                permutations: unsigned32(d.permutations),
                threshold: d.threshold,
                seed: unsigned(d.seed),
            })
        } else {
            return Err(BuildError::new("InvalidTransform", "a transform sets none of its kinds"));
        };
        transforms.push(v1::Transform { transform: Some(transform) });
    }
    let token_stats = match &spec.token_stats {
        Some(ts) => Some(v1::TokenStats {
            tokenizer: Some(match &inputs.tokenizer {
                Some(m) => m.clone(),
                None => model_source(&ts.model)?,
            }),
            histogram_buckets: unsigned32(ts.histogram_buckets),
        }),
        None => None,
    };
    let output = spec.output.as_ref();
    let p = v1::PrepareAssignment {
        source: Some(v1::DataSource { source: Some(source) }),
        format: format.into(),
        schema: schema.into(),
        mapping,
        transforms,
        split: Some(v1::Split {
            train: spec.split.train,
            validation: spec.split.validation,
            test: spec.split.test,
            seed: unsigned(spec.split.seed),
        }),
        token_stats,
        output: Some(v1::Output { uri: output.and_then(|o| o.uri.clone()).unwrap_or_else(|| key.output_uri()) }),
        write_jsonl: output.is_some_and(|o| o.jsonl),
    };
    finish(key, store, Mode::Prepare(p))
}

// ---- FineTuneJob -> finetune ----

/// A Dataset a job reads, as its status says.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedDataset {
    /// Name of the Dataset.
    pub name: String,
    /// Its output directory and manifest digest.
    pub artifact: Artifact,
    /// Records per split, when known.
    pub splits: Option<llmops_crds::dataset::SplitCounts>,
}

impl ResolvedDataset {
    /// The file of one split.
    pub fn split(&self, split: SplitName) -> v1::Artifact {
        v1::Artifact {
            uri: join_uri(&self.artifact.uri, &format!("{}.parquet", split.as_str())),
            sha256: String::new(),
        }
    }

    /// Whether a split has records (true when the counts are unknown).
    pub fn has(&self, split: SplitName) -> bool {
        match (&self.splits, split) {
            (None, _) => true,
            (Some(s), SplitName::Train) => s.train > 0,
            (Some(s), SplitName::Validation) => s.validation > 0,
            (Some(s), SplitName::Test) => s.test > 0,
        }
    }
}

/// The finetune Assignment of a FineTuneJob. Checkpoints always resume, so a pod
/// re-created after a failure, a suspend or a node loss continues where the last left.
pub fn finetune(
    key: &WorkloadKey,
    store: &StoreConfig,
    spec: &FineTuneJobSpec,
    base_model: v1::Model,
    dataset: &ResolvedDataset,
) -> Result<Assignment, BuildError> {
    let h = &spec.hyperparameters;
    let validation = spec.dataset.validation_split.filter(|s| dataset.has(*s)).map(|s| dataset.split(s));
    let lora = match spec.method {
        FineTuneMethod::Lora => {
            let l = spec.lora.clone().unwrap_or_default();
            Some(v1::Lora {
                rank: unsigned32(l.rank),
                alpha: l.alpha,
                dropout: l.dropout,
                target_modules: l.target_modules.iter().map(lower).collect(),
            })
        }
        FineTuneMethod::Full => None,
    };
    let early_stopping = match (&spec.early_stopping, &validation) {
        (Some(e), Some(_)) => Some(v1::EarlyStopping { patience: unsigned32(e.patience), min_delta: e.min_delta }),
        _ => None,
    };
    let f = v1::FinetuneAssignment {
        base_model: Some(base_model),
        train: Some(dataset.split(spec.dataset.train_split)),
        validation,
        method: lower(&spec.method),
        lora,
        hyperparameters: Some(v1::Hyperparameters {
            epochs: unsigned32(h.epochs).max(1),
            max_steps: h.max_steps.map(unsigned).unwrap_or(0),
            batch_size: unsigned32(h.batch_size).max(1),
            gradient_accumulation_steps: unsigned32(h.gradient_accumulation_steps).max(1),
            learning_rate: h.learning_rate,
            lr_schedule: lower(&h.lr_schedule),
            warmup_steps: h.warmup_steps.map(unsigned).unwrap_or(0),
            weight_decay: h.weight_decay,
            max_grad_norm: h.max_grad_norm,
            max_seq_length: unsigned32(h.max_seq_length),
            packing: h.packing,
            eval_interval: unsigned(h.eval_interval),
            seed: unsigned(h.seed),
        }),
        checkpoints: Some(v1::Checkpoints {
            uri: key.checkpoints_uri(),
            interval_steps: unsigned(spec.checkpoints.interval_steps),
            keep: unsigned32(spec.checkpoints.keep),
            resume: true,
        }),
        early_stopping,
        merge: spec.merge,
        output: Some(v1::Output { uri: key.output_uri() }),
    };
    finish(key, store, Mode::Finetune(f))
}

// ---- EvalRun -> eval ----

/// What an EvalRun's target resolved to.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolvedTarget {
    /// A model (and adapter) the evaluating pod loads.
    Local {
        /// The model.
        model: v1::Model,
        /// A LoRA adapter applied to it.
        adapter: Option<v1::Artifact>,
    },
    /// An OpenAI-compatible endpoint.
    Endpoint {
        /// Base URL up to /v1.
        url: String,
        /// Model name of requests.
        model: String,
        /// Path of the mounted API key file; empty without a key.
        api_key_file: String,
        /// Revision of a ModelDeployment; empty otherwise.
        revision: String,
    },
}

/// A PromptVersion as the protocol's Prompt.
pub fn prompt(name: &str, spec: &PromptVersionSpec, digest: &str) -> v1::Prompt {
    v1::Prompt {
        name: name.to_string(),
        sha256: digest.to_string(),
        messages: spec
            .messages
            .iter()
            .flatten()
            .map(|m| v1::ChatMessage { role: m.role.as_str().into(), content: m.content.clone() })
            .collect(),
        template: spec.template.clone().unwrap_or_default(),
        variables: spec
            .variables
            .iter()
            .map(|v| v1::PromptVariable { name: v.name.clone(), default: v.default.clone() })
            .collect(),
        parameters: spec.parameters.as_ref().map(generation),
    }
}

/// What an EvalRun's references resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalInputs {
    /// The target.
    pub target: ResolvedTarget,
    /// The split's file.
    pub data: v1::Artifact,
    /// The PromptVersion that formats samples.
    pub prompt: Option<v1::Prompt>,
    /// The baseline run's metrics.
    pub baseline_metrics: Option<BTreeMap<String, f64>>,
    /// The judge's ModelDeployment, as an endpoint.
    pub judge_deployment: Option<v1::EndpointTarget>,
}

/// The eval Assignment of an EvalRun.
pub fn eval(
    key: &WorkloadKey,
    store: &StoreConfig,
    spec: &EvalRunSpec,
    inputs: EvalInputs,
) -> Result<Assignment, BuildError> {
    use v1::eval_target::Target;
    let EvalInputs { target, data, prompt, baseline_metrics, judge_deployment } = inputs;
    let e = &spec.evaluation;
    let (target, revision) = match &target {
        ResolvedTarget::Local { model, adapter } => {
            (Target::Local(v1::LocalTarget { model: Some(model.clone()), adapter: adapter.clone() }), String::new())
        }
        ResolvedTarget::Endpoint { url, model, api_key_file, revision } => (
            Target::Endpoint(v1::EndpointTarget {
                url: url.clone(),
                model: model.clone(),
                api_key_file: api_key_file.clone(),
            }),
            revision.clone(),
        ),
    };
    let baseline = match (&e.baseline, baseline_metrics) {
        (Some(b), Some(metrics)) => Some(v1::Baseline {
            eval_run: b.eval_run.clone(),
            metrics: metrics.into_iter().collect(),
            max_regression: b.max_regression,
        }),
        (Some(b), None) => {
            return Err(BuildError::new("WaitingForBaseline", format!("waiting for baseline EvalRun {}", b.eval_run)));
        }
        (None, _) => None,
    };
    let judge = match &e.judge {
        Some(j) => {
            let endpoint = match (&j.endpoint, judge_deployment) {
                (Some(ep), _) => v1::EndpointTarget {
                    url: ep.url.clone(),
                    model: ep.model.clone(),
                    api_key_file: ep
                        .api_key_secret
                        .as_ref()
                        .map(|s| crate::job::SecretFile { secret: s.name.clone(), key: api_key_key(s) }.path())
                        .unwrap_or_default(),
                },
                (None, Some(served)) => served,
                (None, None) => {
                    return Err(BuildError::new(
                        "WaitingForModelDeployment",
                        "waiting for the judge's ModelDeployment to serve",
                    ));
                }
            };
            Some(v1::Judge { endpoint: Some(endpoint), rubric: j.rubric.clone(), max_score: unsigned32(j.max_score) })
        }
        None => None,
    };
    let a = v1::EvalAssignment {
        target: Some(v1::EvalTarget { target: Some(target), revision }),
        data: Some(data),
        prompt,
        metrics: e.metrics.iter().map(lower).collect(),
        thresholds: e
            .thresholds
            .iter()
            .map(|t| v1::Threshold { metric: lower(&t.metric), min: t.min, max: t.max })
            .collect(),
        baseline,
        judge,
        regex: e.regex.clone().unwrap_or_default(),
        sample_limit: e.sample_limit.map(unsigned).unwrap_or(0),
        max_error_fraction: e.max_error_fraction,
        concurrency: unsigned32(e.concurrency).max(1),
        generation: e.generation.as_ref().map(generation),
        output: Some(v1::Output { uri: key.output_uri() }),
    };
    finish(key, store, Mode::Eval(a))
}

// ---- ModelDeployment -> serve ----

/// Port every serving pod listens on (the Service's `http` port).
pub const SERVING_PORT: u32 = 8000;

/// What a ModelDeployment's references resolved to: the digests a revision is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedServing {
    /// The base model.
    pub model: v1::Model,
    /// Each adapter by its served name.
    pub adapters: Vec<(String, v1::Artifact)>,
    /// The default prompt.
    pub prompt: Option<v1::Prompt>,
}

/// The revision of a ModelDeployment: a hash of the model digest (its URI while no
/// digest is known), the adapters' digests, the prompt's digest and the serving
/// settings. Replicas, resources and placement are not part of it: they change pods,
/// not what the model answers.
pub fn revision(spec: &ModelDeploymentSpec, resolved: &ResolvedServing) -> String {
    use sha2::{Digest, Sha256};
    let artifact = |a: Option<&v1::Artifact>| -> String {
        a.map(|a| if a.sha256.is_empty() { a.uri.clone() } else { a.sha256.clone() }).unwrap_or_default()
    };
    let content = serde_json::json!({
        "model": artifact(resolved.model.weights.as_ref()),
        "format": resolved.model.format,
        "dtype": resolved.model.dtype,
        "adapters": resolved.adapters.iter().map(|(n, a)| (n.clone(), artifact(Some(a)))).collect::<Vec<_>>(),
        "prompt": resolved.prompt.as_ref().map(|p| p.sha256.clone()),
        "serving": spec.serving,
        "record": spec.traffic.record,
    });
    let digest = Sha256::digest(serde_json::to_vec(&content).unwrap_or_default());
    hex::encode(&digest[..5])
}

/// The serve Assignment of one revision of a ModelDeployment.
pub fn serve(
    key: &WorkloadKey,
    store: &StoreConfig,
    spec: &ModelDeploymentSpec,
    resolved: &ResolvedServing,
    api_keys_file: Option<String>,
    revision: &str,
) -> Result<Assignment, BuildError> {
    let s = &spec.serving;
    let a = v1::ServeAssignment {
        model: Some(resolved.model.clone()),
        adapters: resolved
            .adapters
            .iter()
            .map(|(name, a)| v1::ServedAdapter { name: name.clone(), adapter: Some(a.clone()) })
            .collect(),
        prompt: resolved.prompt.clone(),
        serving: Some(v1::Serving {
            // Empty: every address of the pod (the development node narrows it to the pod's).
            host: String::new(),
            port: SERVING_PORT,
            max_batch_size: unsigned32(s.max_batch_size),
            max_queue: unsigned32(s.max_queue),
            context_length: s.context_length.map(unsigned32).unwrap_or(0),
            max_request_bytes: unsigned32(s.max_request_bytes),
        }),
        api_keys_file: api_keys_file.unwrap_or_default(),
        traffic: Some(v1::Traffic {
            record: spec.traffic.record,
            uri: traffic_uri(key),
            retention_days: spec.traffic.retention_days.map(unsigned32).unwrap_or(0),
            redact: spec.traffic.redact.as_ref().map(redact),
        }),
        revision: revision.to_string(),
        model_name: key.name.clone(),
    };
    finish(key, store, Mode::Serve(a))
}

/// A redaction of the CRDs as the protocol's.
fn redact(r: &RedactTransform) -> v1::Redact {
    v1::Redact {
        kinds: r
            .kinds
            .iter()
            .map(|k| match k {
                PiiKind::Email => "email",
                PiiKind::Phone => "phone",
                PiiKind::IpAddress => "ipAddress",
                PiiKind::CreditCard => "creditCard",
            })
            .map(String::from)
            .collect(),
        custom: r
            .custom
            .iter()
            .map(|c| v1::CustomPattern { name: c.name.clone(), pattern: c.pattern.clone() })
            .collect(),
    }
}

/// The traffic log directory of a ModelDeployment (DESIGN.md's store layout).
pub fn traffic_uri(key: &WorkloadKey) -> String {
    format!("store://{}/modeldeployment/{}/traffic/", key.namespace, key.name)
}

/// The key of an API key Secret: the one named, else `api-key`.
pub fn api_key_key(secret: &llmops_crds::SecretKeyRef) -> String {
    secret.key.clone().unwrap_or_else(|| "api-key".to_string())
}

#[cfg(test)]
mod tests;
