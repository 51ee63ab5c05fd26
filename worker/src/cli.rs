//! Command line: each mode reads its Assignment from `--assignment FILE` and/or builds
//! it from convenience flags (flags override the file's fields), then validates it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use llmops_crds::finetune::{CheckpointSpec, Hyperparameters, LoraSpec};
use llmops_proto::v1::{self, Assignment, assignment::Mode};
use llmops_proto::validate::describe;
use llmops_proto::{Validate, read_assignment, to_yaml};

/// Exit status of an Assignment that is invalid.
pub const EXIT_INVALID: u8 = 2;
/// Exit status of a run that failed without a verdict (e.g. a target failing requests).
pub const EXIT_FAILED: u8 = 1;
/// Exit status of an evaluation that ran and did not pass its gate.
pub const EXIT_GATE_FAILED: u8 = 3;

#[derive(Parser, Debug)]
#[command(name = "llmops-worker", version, about = "The llmops worker: prepare, finetune, eval and serve")]
pub struct Cli {
    #[command(subcommand)]
    mode: ModeCommand,
}

#[derive(Subcommand, Debug)]
enum ModeCommand {
    /// Prepare a Dataset: ingest, clean, deduplicate, redact, split, tokenize.
    Prepare(PrepareArgs),
    /// Fine-tune a model (LoRA or full) on prepared data.
    Finetune(FinetuneArgs),
    /// Evaluate a model or an endpoint.
    Eval(EvalArgs),
    /// Serve a model with an OpenAI-compatible API.
    Serve(ServeArgs),
    /// Measure prompt and decode speed, beside llama.cpp on the same model.
    Bench(llmops_worker::bench::BenchArgs),
    /// In a pod: fetch the Assignment from the operator's gateway, run it and report.
    /// Reads LLMOPS_GATEWAY, LLMOPS_WORKLOAD, LLMOPS_TOKEN_FILE and LLMOPS_POD.
    Agent,
}

#[derive(Args, Debug)]
struct Common {
    /// The Assignment (YAML or JSON); flags override its fields.
    #[arg(long, value_name = "FILE")]
    assignment: Option<PathBuf>,
    /// Only check the Assignment: print it as YAML, as flags and defaults made it, and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Args, Debug)]
struct PrepareArgs {
    #[command(flatten)]
    common: Common,
    /// Source file or directory (URI or path).
    #[arg(long, value_name = "URI")]
    input: Option<String>,
    /// Source format: jsonl, csv, parquet or text (inferred from the name when absent).
    #[arg(long)]
    format: Option<String>,
    /// Output schema: chat, completion or text.
    #[arg(long)]
    schema: Option<String>,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: Option<String>,
    /// Also write JSONL beside Parquet.
    #[arg(long)]
    jsonl: bool,
    /// Append Unicode (NFKC) and whitespace normalisation to the transforms.
    #[arg(long)]
    normalize: bool,
    /// Append redaction of emails, phone numbers, IP addresses and card numbers.
    #[arg(long)]
    redact: bool,
    /// Append exact and near-duplicate removal (5-word shingles, 128 permutations, 0.5).
    #[arg(long)]
    dedup: bool,
    /// Count tokens with this model's tokenizer (GGUF file or HF directory).
    #[arg(long, value_name = "MODEL")]
    tokenizer: Option<String>,
}

#[derive(Args, Debug)]
struct FinetuneArgs {
    #[command(flatten)]
    common: Common,
    /// Base model: a GGUF file or an HF directory.
    #[arg(long, value_name = "PATH")]
    model: Option<String>,
    /// Training records (Parquet or JSONL).
    #[arg(long, value_name = "FILE")]
    data: Option<String>,
    /// Validation records (Parquet or JSONL).
    #[arg(long, value_name = "FILE")]
    eval: Option<String>,
    /// Output directory of the adapter or model.
    #[arg(long, value_name = "DIR")]
    out: Option<String>,
    /// lora or full.
    #[arg(long)]
    method: Option<String>,
    /// Stop after this many optimizer steps, whatever the epochs say.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Passes over the training data.
    #[arg(long)]
    epochs: Option<u32>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Peak learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    /// LoRA rank.
    #[arg(long)]
    lora_rank: Option<u32>,
    /// Seed of initialisation and data order.
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint directory (default: OUT/checkpoints).
    #[arg(long, value_name = "DIR")]
    checkpoints: Option<String>,
    /// Continue from the newest valid checkpoint.
    #[arg(long)]
    resume: bool,
    /// Write a checkpoint every this many steps.
    #[arg(long, value_name = "STEPS")]
    checkpoint_interval: Option<u64>,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA target modules, comma-separated (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    lora_targets: Vec<String>,
    /// Longest example in tokens; longer ones are cut.
    #[arg(long)]
    max_seq_length: Option<u32>,
    /// Steps of linear warmup.
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    gradient_accumulation_steps: Option<u32>,
    /// Also write the base model with the adapter merged in (OUT/merged).
    #[arg(long)]
    merge: bool,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// Local model to evaluate (GGUF file or HF directory).
    #[arg(long, value_name = "PATH", conflicts_with = "endpoint")]
    model: Option<String>,
    /// LoRA adapter directory applied to --model.
    #[arg(long, value_name = "DIR", requires = "model")]
    adapter: Option<String>,
    /// OpenAI-compatible endpoint to evaluate, up to and including /v1.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Model name sent to --endpoint.
    #[arg(long, requires = "endpoint")]
    endpoint_model: Option<String>,
    /// Samples (a Dataset split, Parquet or JSONL).
    #[arg(long, value_name = "FILE")]
    data: Option<String>,
    /// A metric to compute (repeatable).
    #[arg(long = "metric", value_name = "NAME")]
    metrics: Vec<String>,
    /// Output directory of results.json.
    #[arg(long, value_name = "DIR")]
    out: Option<String>,
    /// A pass condition, METRIC>=VALUE or METRIC<=VALUE (repeatable).
    #[arg(long = "threshold", value_name = "BOUND")]
    thresholds: Vec<String>,
    /// Regular expression of the regexMatch metric.
    #[arg(long)]
    regex: Option<String>,
    /// Evaluate only the first N samples.
    #[arg(long, value_name = "N")]
    sample_limit: Option<u64>,
    /// Requests in flight at once (endpoints), or sequences decoded together (local).
    #[arg(long)]
    concurrency: Option<u32>,
    /// Fail the run when more than this fraction of samples fail against the target.
    #[arg(long)]
    max_error_fraction: Option<f64>,
    /// Most tokens generated per sample.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// File holding the API key of --endpoint.
    #[arg(long, value_name = "FILE", requires = "endpoint")]
    api_key_file: Option<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Model to serve: a GGUF file or an HF directory.
    #[arg(long, value_name = "PATH")]
    model: Option<String>,
    /// Name the base model is served under (default: the file or directory name).
    #[arg(long)]
    model_name: Option<String>,
    /// A LoRA adapter served as its own model name (repeatable).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// Address to listen on.
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on.
    #[arg(long)]
    port: Option<u32>,
    /// Sequences decoded together.
    #[arg(long)]
    max_batch_size: Option<u32>,
    /// Requests that may wait for a batch slot; more are answered 429.
    #[arg(long)]
    max_queue: Option<u32>,
    /// Directory of the traffic log (completions and feedback).
    #[arg(long, value_name = "DIR")]
    traffic: Option<String>,
    /// Record only feedback, not completions, in the traffic log.
    #[arg(long)]
    no_record: bool,
    /// File of accepted API keys, one per line; without it the API is open.
    #[arg(long, value_name = "FILE")]
    api_keys: Option<String>,
}

/// Turns a path given on the command line into a URI; URIs pass through.
fn to_uri(value: &str) -> String {
    if value.contains("://") {
        return value.to_string();
    }
    let path = Path::new(value);
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    format!("file://{}", absolute.display())
}

fn artifact(value: &str) -> v1::Artifact {
    v1::Artifact { uri: to_uri(value), sha256: String::new() }
}

fn model(value: &str) -> v1::Model {
    let format = if value.ends_with(".gguf") { "gguf" } else { "hf" };
    v1::Model { weights: Some(artifact(value)), format: format.into(), dtype: "auto".into() }
}

fn output(value: &str) -> v1::Output {
    v1::Output { uri: to_uri(value) }
}

/// Loads the Assignment file, or starts from an empty one for the mode.
fn load(common: &Common, empty: Mode) -> Result<Assignment> {
    let mut assignment = match &common.assignment {
        Some(path) => read_assignment(path)?,
        None => Assignment::default(),
    };
    match (&assignment.mode, &empty) {
        (None, _) => assignment.mode = Some(empty),
        (Some(found), wanted) if found.name() != wanted.name() => bail!(
            "the assignment is for mode {:?}, not {:?}; run `llmops-worker {} --assignment ...`",
            found.name(),
            wanted.name(),
            found.name()
        ),
        _ => {}
    }
    Ok(assignment)
}

fn hyperparameters_from_spec(h: &Hyperparameters) -> v1::Hyperparameters {
    let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
    v1::Hyperparameters {
        epochs: u32::try_from(h.epochs).unwrap_or(1),
        max_steps: h.max_steps.map(unsigned).unwrap_or(0),
        batch_size: u32::try_from(h.batch_size).unwrap_or(1),
        gradient_accumulation_steps: u32::try_from(h.gradient_accumulation_steps).unwrap_or(1),
        learning_rate: h.learning_rate,
        lr_schedule: serde_yaml_ng::to_string(&h.lr_schedule).unwrap_or_default().trim().to_string(),
        warmup_steps: h.warmup_steps.map(unsigned).unwrap_or(0),
        weight_decay: h.weight_decay,
        max_grad_norm: h.max_grad_norm,
        max_seq_length: u32::try_from(h.max_seq_length).unwrap_or(512),
        packing: h.packing,
        eval_interval: unsigned(h.eval_interval),
        seed: unsigned(h.seed),
    }
}

fn lora_from_spec(l: &LoraSpec) -> v1::Lora {
    v1::Lora {
        rank: u32::try_from(l.rank).unwrap_or(8),
        alpha: l.alpha,
        dropout: l.dropout,
        target_modules: l
            .target_modules
            .iter()
            .map(|m| serde_yaml_ng::to_string(m).unwrap_or_default().trim().to_string())
            .collect(),
    }
}

fn build_finetune(args: &FinetuneArgs) -> Result<Assignment> {
    let mut a = load(&args.common, Mode::Finetune(v1::FinetuneAssignment::default()))?;
    let Some(Mode::Finetune(f)) = a.mode.as_mut() else { unreachable!("load sets the mode") };
    if let Some(m) = &args.model {
        f.base_model = Some(model(m));
    }
    if let Some(d) = &args.data {
        f.train = Some(artifact(d));
    }
    if let Some(e) = &args.eval {
        f.validation = Some(artifact(e));
    }
    if let Some(o) = &args.out {
        f.output = Some(output(o));
    }
    if let Some(m) = &args.method {
        f.method = m.clone();
    }
    if f.method.is_empty() {
        f.method = "lora".into();
    }
    if f.method == "lora" && f.lora.is_none() {
        f.lora = Some(lora_from_spec(&LoraSpec::default()));
    }
    if let Some(lora) = f.lora.as_mut() {
        if let Some(rank) = args.lora_rank {
            lora.rank = rank;
        }
        if let Some(alpha) = args.lora_alpha {
            lora.alpha = alpha;
        }
        if !args.lora_targets.is_empty() {
            lora.target_modules = args.lora_targets.clone();
        }
    }
    f.merge |= args.merge;
    let h = f.hyperparameters.get_or_insert_with(|| hyperparameters_from_spec(&Hyperparameters::default()));
    if let Some(v) = args.max_steps {
        h.max_steps = v;
    }
    if let Some(v) = args.epochs {
        h.epochs = v;
    }
    if let Some(v) = args.batch_size {
        h.batch_size = v;
    }
    if let Some(v) = args.learning_rate {
        h.learning_rate = v;
    }
    if let Some(v) = args.seed {
        h.seed = v;
    }
    if let Some(v) = args.max_seq_length {
        h.max_seq_length = v;
    }
    if let Some(v) = args.warmup_steps {
        h.warmup_steps = v;
    }
    if let Some(v) = args.gradient_accumulation_steps {
        h.gradient_accumulation_steps = v;
    }
    let checkpoint_dir = args.checkpoints.clone().or_else(|| {
        let out = f.output.as_ref().map(|o| o.uri.trim_end_matches('/').to_string())?;
        Some(format!("{out}/checkpoints"))
    });
    if (f.checkpoints.is_none() || args.checkpoints.is_some())
        && let Some(dir) = checkpoint_dir
    {
        let defaults = CheckpointSpec::default();
        let ck = f.checkpoints.get_or_insert_with(|| v1::Checkpoints {
            uri: String::new(),
            interval_steps: u64::try_from(defaults.interval_steps).unwrap_or(100),
            keep: u32::try_from(defaults.keep).unwrap_or(2),
            resume: false,
        });
        ck.uri = to_uri(&dir);
    }
    if let Some(ck) = f.checkpoints.as_mut() {
        ck.resume |= args.resume;
        if let Some(n) = args.checkpoint_interval {
            ck.interval_steps = n;
        }
    }
    Ok(a)
}

fn build_prepare(args: &PrepareArgs) -> Result<Assignment> {
    let mut a = load(&args.common, Mode::Prepare(v1::PrepareAssignment::default()))?;
    let Some(Mode::Prepare(p)) = a.mode.as_mut() else { unreachable!("load sets the mode") };
    if let Some(input) = &args.input {
        p.source = Some(v1::DataSource { source: Some(v1::data_source::Source::Uri(to_uri(input))) });
    }
    if let Some(f) = &args.format {
        p.format = f.clone();
    }
    if let Some(s) = &args.schema {
        p.schema = s.clone();
    }
    if p.schema.is_empty() {
        p.schema = "chat".into();
    }
    if p.split.is_none() {
        let d = llmops_crds::dataset::Split::default();
        p.split = Some(v1::Split {
            train: d.train,
            validation: d.validation,
            test: d.test,
            seed: u64::try_from(d.seed).unwrap_or(0),
        });
    }
    if let Some(o) = &args.out {
        p.output = Some(output(o));
    }
    p.write_jsonl |= args.jsonl;
    use v1::transform::Transform as T;
    let mut push = |t: T| p.transforms.push(v1::Transform { transform: Some(t) });
    if args.normalize {
        push(T::Normalize(v1::Normalize { unicode: "NFKC".into(), whitespace: true }));
    }
    if args.redact {
        let kinds = ["email", "phone", "ipAddress", "creditCard"].iter().map(|k| k.to_string()).collect();
        push(T::Redact(v1::Redact { kinds, custom: Vec::new() }));
    }
    if args.dedup {
        push(T::ExactDedup(v1::ExactDedup { case_sensitive: false }));
        push(T::NearDedup(v1::NearDedup { shingle_size: 5, permutations: 128, threshold: 0.5, seed: 0 }));
    }
    if let Some(m) = &args.tokenizer {
        p.token_stats = Some(v1::TokenStats { tokenizer: Some(model(m)), histogram_buckets: 12 });
    }
    Ok(a)
}

fn build_eval(args: &EvalArgs) -> Result<Assignment> {
    let mut a = load(&args.common, Mode::Eval(v1::EvalAssignment::default()))?;
    let Some(Mode::Eval(e)) = a.mode.as_mut() else { unreachable!("load sets the mode") };
    if let Some(m) = &args.model {
        let local = v1::LocalTarget { model: Some(model(m)), adapter: args.adapter.as_deref().map(artifact) };
        let revision = e.target.as_ref().map(|t| t.revision.clone()).unwrap_or_default();
        e.target = Some(v1::EvalTarget { target: Some(v1::eval_target::Target::Local(local)), revision });
    }
    if let Some(url) = &args.endpoint {
        let endpoint = v1::EndpointTarget {
            url: url.clone(),
            model: args.endpoint_model.clone().unwrap_or_default(),
            api_key_file: args.api_key_file.as_deref().map(to_uri).unwrap_or_default(),
        };
        e.target =
            Some(v1::EvalTarget { target: Some(v1::eval_target::Target::Endpoint(endpoint)), revision: String::new() });
    }
    if let Some(d) = &args.data {
        e.data = Some(artifact(d));
    }
    if !args.metrics.is_empty() {
        e.metrics = args.metrics.clone();
    }
    if let Some(o) = &args.out {
        e.output = Some(output(o));
    }
    for bound in &args.thresholds {
        let threshold = parse_threshold(bound)?;
        e.thresholds.retain(|t| !(t.metric == threshold.metric && t.min.is_some() == threshold.min.is_some()));
        e.thresholds.push(threshold);
    }
    if let Some(r) = &args.regex {
        e.regex = r.clone();
    }
    if let Some(n) = args.sample_limit {
        e.sample_limit = n;
    }
    if let Some(c) = args.concurrency {
        e.concurrency = c;
    }
    if e.concurrency == 0 {
        e.concurrency = 4;
    }
    if let Some(f) = args.max_error_fraction {
        e.max_error_fraction = f;
    } else if args.common.assignment.is_none() {
        e.max_error_fraction = 0.05;
    }
    if let Some(m) = args.max_tokens {
        e.generation.get_or_insert_with(Default::default).max_tokens = Some(m);
    }
    Ok(a)
}

/// `METRIC>=VALUE` or `METRIC<=VALUE`.
fn parse_threshold(text: &str) -> Result<v1::Threshold> {
    let (metric, min, max) = if let Some((m, v)) = text.split_once(">=") {
        (m, Some(v), None)
    } else if let Some((m, v)) = text.split_once("<=") {
        (m, None, Some(v))
    } else {
        bail!("--threshold {text:?}: expected METRIC>=VALUE or METRIC<=VALUE");
    };
    let number = |v: &str| -> Result<f64> {
        v.trim().parse::<f64>().with_context(|| format!("--threshold {text:?}: {v:?} is not a number"))
    };
    Ok(v1::Threshold {
        metric: metric.trim().to_string(),
        min: min.map(number).transpose()?,
        max: max.map(number).transpose()?,
    })
}

fn build_serve(args: &ServeArgs) -> Result<Assignment> {
    let mut a = load(&args.common, Mode::Serve(v1::ServeAssignment::default()))?;
    let Some(Mode::Serve(s)) = a.mode.as_mut() else { unreachable!("load sets the mode") };
    if let Some(m) = &args.model {
        s.model = Some(model(m));
        if s.model_name.is_empty() && args.model_name.is_none() {
            let stem = Path::new(m).file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            s.model_name = stem;
        }
    }
    if let Some(n) = &args.model_name {
        s.model_name = n.clone();
    }
    for spec in &args.adapters {
        let (name, dir) = spec.split_once('=').with_context(|| format!("--adapter {spec:?}: expected NAME=DIR"))?;
        s.adapters.retain(|a| a.name != name);
        s.adapters.push(v1::ServedAdapter { name: name.to_string(), adapter: Some(artifact(dir)) });
    }
    let defaults = llmops_crds::deployment::ServingLimits::default();
    let serving = s.serving.get_or_insert_with(|| v1::Serving {
        host: "127.0.0.1".into(),
        port: 8000,
        max_batch_size: u32::try_from(defaults.max_batch_size).unwrap_or(8),
        max_queue: u32::try_from(defaults.max_queue).unwrap_or(64),
        context_length: 0,
        max_request_bytes: u32::try_from(defaults.max_request_bytes).unwrap_or(1 << 20),
    });
    if let Some(h) = &args.host {
        serving.host = h.clone();
    }
    if let Some(p) = args.port {
        serving.port = p;
    }
    if let Some(b) = args.max_batch_size {
        serving.max_batch_size = b;
    }
    if let Some(q) = args.max_queue {
        serving.max_queue = q;
    }
    if let Some(dir) = &args.traffic {
        s.traffic = Some(v1::Traffic { record: !args.no_record, uri: to_uri(dir), ..Default::default() });
    } else if args.no_record
        && let Some(t) = s.traffic.as_mut()
    {
        t.record = false;
    }
    if let Some(keys) = &args.api_keys {
        s.api_keys_file = to_uri(keys);
    }
    Ok(a)
}

impl Cli {
    /// Compute threads the command asks for, if it names a number.
    pub fn threads(&self) -> Option<usize> {
        match &self.mode {
            ModeCommand::Bench(b) => Some(b.threads()),
            _ => None,
        }
    }
}

/// Builds, validates and (for now) reports the Assignment of the chosen mode.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let (assignment, check) = match &cli.mode {
        ModeCommand::Prepare(a) => (build_prepare(a)?, a.common.check),
        ModeCommand::Finetune(a) => (build_finetune(a)?, a.common.check),
        ModeCommand::Eval(a) => (build_eval(a)?, a.common.check),
        ModeCommand::Serve(a) => (build_serve(a)?, a.common.check),
        ModeCommand::Bench(a) => {
            llmops_worker::bench::run(a)?;
            return Ok(ExitCode::SUCCESS);
        }
        ModeCommand::Agent => return llmops_worker::agent::run(),
    };
    if let Err(errors) = assignment.validate() {
        bail!("invalid assignment:\n{}", describe(&errors));
    }
    if check {
        print!("{}", to_yaml(&assignment)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &assignment.mode {
        Some(Mode::Serve(_)) => {
            llmops_worker::serve::run(&assignment)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Mode::Prepare(_)) => {
            llmops_worker::prepare::run(&assignment)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Mode::Finetune(_)) => {
            llmops_worker::finetune::run(&assignment)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Mode::Eval(_)) => return eval(&assignment),
        Some(Mode::Resolve(_)) => {
            let record = llmops_worker::resolve::run(&assignment)?;
            println!("{}", serde_json::to_string_pretty(&record)?);
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    bail!("the assignment names no mode")
}

/// Runs an evaluation and prints its summary. A failed gate exits with
/// [`EXIT_GATE_FAILED`]; a run without a verdict (a failing target) with
/// [`EXIT_FAILED`].
fn eval(assignment: &Assignment) -> Result<ExitCode> {
    let results = match llmops_worker::eval::run(assignment) {
        Ok(results) => results,
        Err(e) if e.downcast_ref::<llmops_worker::eval::EvalFailure>().is_some() => {
            eprintln!("error: the evaluation failed: {e:#}");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
        Err(e) => return Err(e),
    };
    let empty = Vec::new();
    for m in results["metrics"].as_array().unwrap_or(&empty) {
        let ci = match (m["ciLow"].as_f64(), m["ciHigh"].as_f64()) {
            (Some(low), Some(high)) => format!("  95% CI [{low:.4}, {high:.4}]"),
            _ => String::new(),
        };
        println!(
            "{:<22} {:>10.4}{ci}  ({} samples)",
            m["metric"].as_str().unwrap_or_default(),
            m["value"].as_f64().unwrap_or(f64::NAN),
            m["samples"]
        );
    }
    println!("samples {}, errors {}", results["samples"], results["errors"]);
    if results["passed"].as_bool() == Some(true) {
        println!("passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAILED: {}", results["reason"].as_str().unwrap_or("a threshold or the baseline did not hold"));
        Ok(ExitCode::from(EXIT_GATE_FAILED))
    }
}
