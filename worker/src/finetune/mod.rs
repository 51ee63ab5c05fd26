//! `llmops-worker finetune`: LoRA or full fine-tuning with candle's autograd.
//!
//! Steps are optimizer steps of `gradient_accumulation_steps` micro-batches. The data
//! order of each epoch and every dropout mask come from the seed and the step, so a run
//! resumed from a checkpoint continues exactly as an uninterrupted one would.
//! Checkpoints are directories written under a temporary name, sealed with the digests
//! of their files and renamed into place; one whose digests do not match (a crash or a
//! partial copy) is skipped on resume.

pub mod data;
pub mod model;
pub mod optim;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use llmops_proto::v1::{Assignment, FinetuneAssignment, assignment::Mode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::data::{Example, batch, read_records, tokenize};
use self::model::{Method, Rng, TrainModel, masked_loss};
use self::optim::{AdamW, clip, learning_rate};
use crate::engine::{self, LoadedModel, WeightFormat};
use crate::report::{Interrupted, Report};
use crate::store::{file_sha256, local_path};

/// A progress event: what the gateway reporter forwards and the terminal shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressEvent {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps the run will take.
    pub total_steps: u64,
    /// Epoch (from 0) of the step.
    pub epoch: u64,
    /// Training loss of the step (token-weighted over its micro-batches).
    pub loss: f64,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second (all tokens of the batches).
    pub tokens_per_second: f64,
    /// Estimated seconds left.
    pub eta_seconds: f64,
    /// Validation loss, on steps that evaluated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
}

/// Everything a training run needs, resolved to local paths.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Base model: GGUF file or HF directory.
    pub base: PathBuf,
    /// Training split.
    pub train: PathBuf,
    /// Validation split.
    pub validation: Option<PathBuf>,
    /// LoRA or full.
    pub method: Method,
    /// Passes over the data.
    pub epochs: u64,
    /// Cap on optimizer steps (0: none).
    pub max_steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// cosine, linear or constant.
    pub schedule: String,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient-norm clipping (0: off).
    pub max_grad_norm: f64,
    /// Tokens per example at most.
    pub max_seq_length: usize,
    /// Pack examples into rows.
    pub packing: bool,
    /// Validate every this many steps (0: only at the end).
    pub eval_interval: u64,
    /// Seed of initialisation, data order and dropout.
    pub seed: u64,
    /// Checkpoint directory.
    pub checkpoints: Option<PathBuf>,
    /// Checkpoint every this many steps (0: never).
    pub checkpoint_interval: u64,
    /// Checkpoints kept.
    pub keep: usize,
    /// Continue from the newest valid checkpoint.
    pub resume: bool,
    /// Stop after this many evaluations without improvement (0: never).
    pub patience: u64,
    /// Least improvement that counts.
    pub min_delta: f64,
    /// Also write the merged model.
    pub merge: bool,
    /// Output directory.
    pub out: PathBuf,
}

/// What a run reached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Training loss of each step.
    pub losses: Vec<f64>,
    /// Wall seconds of each step.
    #[serde(default)]
    pub step_seconds: Vec<f64>,
    /// Input tokens (padding included) of each step.
    #[serde(default)]
    pub step_tokens: Vec<u64>,
    /// Last validation loss.
    pub validation_loss: Option<f64>,
    /// Best validation loss.
    pub best_validation_loss: Option<f64>,
    /// Evaluations in a row without improvement.
    pub bad_evaluations: u64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
}

/// Checkpoint state besides tensors.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    metrics: Metrics,
    optimizer_steps: u64,
}

fn method_of(f: &FinetuneAssignment) -> Result<Method> {
    Ok(match f.method.as_str() {
        "" | "lora" => {
            let l = f.lora.clone().unwrap_or_default();
            let targets = if l.target_modules.is_empty() {
                vec!["q_proj".to_string(), "v_proj".to_string()]
            } else {
                l.target_modules.clone()
            };
            for t in &targets {
                if !engine::adapter::TARGET_MODULES.contains(&t.as_str()) {
                    bail!("finetune.lora.targetModules: unknown module {t:?}");
                }
            }
            let rank = if l.rank == 0 { 8 } else { l.rank as usize };
            Method::Lora {
                rank,
                alpha: if l.alpha == 0.0 { 2.0 * rank as f64 } else { l.alpha },
                dropout: l.dropout,
                targets,
            }
        }
        "full" => Method::Full,
        other => bail!("finetune.method: unknown method {other:?} (lora or full)"),
    })
}

/// Resolves a finetune Assignment into options.
pub fn options(assignment: &Assignment) -> Result<TrainOptions> {
    let Some(Mode::Finetune(f)) = &assignment.mode else { bail!("not a finetune assignment") };
    let store = assignment.store.as_ref();
    let uri = |a: Option<&llmops_proto::v1::Artifact>| a.map(|a| a.uri.clone()).unwrap_or_default();
    let base = local_path(&uri(f.base_model.as_ref().and_then(|m| m.weights.as_ref())), store)?;
    let train = local_path(&uri(f.train.as_ref()), store)?;
    let validation = match f.validation.as_ref() {
        Some(v) if !v.uri.is_empty() => Some(local_path(&v.uri, store)?),
        _ => None,
    };
    let h = f.hyperparameters.clone().unwrap_or_default();
    let out = local_path(&f.output.as_ref().map(|o| o.uri.clone()).context("finetune.output.uri is required")?, store)?;
    let c = f.checkpoints.clone().unwrap_or_default();
    let checkpoints = if c.uri.is_empty() { None } else { Some(local_path(&c.uri, store)?) };
    let stopping = f.early_stopping.unwrap_or_default();
    Ok(TrainOptions {
        base,
        train,
        validation,
        method: method_of(f)?,
        epochs: u64::from(h.epochs.max(1)),
        max_steps: h.max_steps,
        batch_size: h.batch_size.max(1) as usize,
        accumulation: h.gradient_accumulation_steps.max(1) as usize,
        learning_rate: if h.learning_rate > 0.0 { h.learning_rate } else { 2e-4 },
        schedule: if h.lr_schedule.is_empty() { "cosine".into() } else { h.lr_schedule.clone() },
        warmup_steps: h.warmup_steps,
        weight_decay: h.weight_decay,
        max_grad_norm: h.max_grad_norm,
        max_seq_length: if h.max_seq_length == 0 { 1024 } else { h.max_seq_length as usize },
        packing: h.packing,
        eval_interval: h.eval_interval,
        seed: h.seed,
        checkpoints,
        checkpoint_interval: c.interval_steps,
        keep: (c.keep as usize).max(1),
        resume: c.resume,
        patience: u64::from(stopping.patience),
        min_delta: stopping.min_delta,
        merge: f.merge,
        out,
    })
}

/// Runs the finetune mode of `assignment`; returns the manifest it wrote.
pub fn run(assignment: &Assignment) -> Result<Value> {
    let opts = options(assignment)?;
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    train(&opts, assignment, &mut |e: &ProgressEvent| {
        let mut figures: std::collections::BTreeMap<String, f64> = [
            ("loss".to_string(), e.loss),
            ("learning_rate".to_string(), e.learning_rate),
            ("grad_norm".to_string(), e.grad_norm),
            ("tokens_per_second".to_string(), e.tokens_per_second),
        ]
        .into();
        if let Some(v) = e.validation_loss {
            figures.insert("eval_loss".to_string(), v);
        }
        crate::report::emit(Report::Progress {
            step: e.step,
            total: e.total_steps,
            epoch: e.epoch as f64,
            metrics: figures,
            eta_seconds: e.eta_seconds,
            message: format!("step {}/{} loss {:.4}", e.step, e.total_steps, e.loss),
        });
        let val = e.validation_loss.map(|v| format!(" val {v:.4}")).unwrap_or_default();
        if terminal {
            let width = 30usize;
            let done = (e.step as usize * width) / (e.total_steps.max(1) as usize);
            eprint!(
                "\r[{}{}] step {}/{} loss {:.4}{val} lr {:.2e} {:.0} tok/s eta {:.0}s   ",
                "#".repeat(done),
                " ".repeat(width - done),
                e.step,
                e.total_steps,
                e.loss,
                e.learning_rate,
                e.tokens_per_second,
                e.eta_seconds
            );
            if e.step == e.total_steps {
                eprintln!();
            }
        } else {
            tracing::info!(
                step = e.step,
                total_steps = e.total_steps,
                epoch = e.epoch,
                loss = e.loss,
                validation_loss = e.validation_loss,
                learning_rate = e.learning_rate,
                tokens_per_second = e.tokens_per_second.round(),
                eta_seconds = e.eta_seconds.round(),
                elapsed_seconds = started.elapsed().as_secs_f64().round(),
                "training progress"
            );
        }
    })
}

fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = Rng(seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn lora_scale(method: &Method) -> f64 {
    match method {
        Method::Lora { rank, alpha, .. } => alpha / *rank as f64,
        Method::Full => 1.0,
    }
}

/// Token-weighted mean loss over `examples` without dropout.
fn evaluate(model: &TrainModel, examples: &[Example], opts: &TrainOptions, pad: u32) -> Result<f64> {
    let device = candle_core::Device::Cpu;
    let (mut total, mut count) = (0f64, 0f64);
    for chunk in examples.chunks(opts.batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = batch(&refs, opts.max_seq_length, opts.packing, pad, &device)?;
        let logits = model.forward(&b.inputs, &b.positions, &b.segments, lora_scale(&opts.method), None)?;
        let (loss, n) = masked_loss(&logits, &b.targets, &b.weights)?;
        total += f64::from(loss.to_scalar::<f32>()?) * n;
        count += n;
    }
    Ok(total / count.max(1.0))
}

/// Trains as `opts` says, reporting each step; writes the output and returns the manifest.
pub fn train(opts: &TrainOptions, assignment: &Assignment, report: &mut dyn FnMut(&ProgressEvent)) -> Result<Value> {
    let device = candle_core::Device::Cpu;
    let loaded: LoadedModel = engine::load(&opts.base, &device, WeightFormat::Dense)?;
    let base_sha256 = if opts.base.is_file() { Some(file_sha256(&opts.base)?) } else { None };
    let model = TrainModel::from_loaded(&loaded, &opts.method, opts.seed)?;
    let named = model.variables();
    if named.is_empty() {
        bail!("nothing to train: no LoRA target module exists in this model");
    }
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let max_len = opts.max_seq_length.min(model.config.context_length);
    let tokenize_all = |path: &Path| -> Result<Vec<Example>> {
        read_records(path)?
            .iter()
            .map(|r| tokenize(&loaded, r, max_len))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("tokenizing {}", path.display()))
    };
    let train_set = tokenize_all(&opts.train)?;
    let validation_set = match &opts.validation {
        Some(p) => Some(tokenize_all(p)?),
        None => None,
    };
    let pad = loaded.tokenizer.eos.first().copied().unwrap_or(0);
    let per_step = opts.batch_size * opts.accumulation;
    let steps_per_epoch = train_set.len().div_ceil(per_step) as u64;
    let mut total = opts.epochs * steps_per_epoch;
    if opts.max_steps > 0 {
        total = total.min(opts.max_steps);
    }
    let mut optimizer = AdamW::new(&vars, opts.weight_decay)?;
    let mut metrics = Metrics {
        steps: 0,
        losses: Vec::new(),
        step_seconds: Vec::new(),
        step_tokens: Vec::new(),
        validation_loss: None,
        best_validation_loss: None,
        bad_evaluations: 0,
        stopped_early: false,
    };
    if opts.resume
        && let Some(dir) = &opts.checkpoints
        && let Some((path, state)) = newest_checkpoint(dir)?
    {
        load_checkpoint(&path, &named, &mut optimizer)?;
        optimizer.t = state.optimizer_steps;
        metrics = state.metrics;
        tracing::info!(checkpoint = %path.display(), step = metrics.steps, "resuming");
    }
    let scale = lora_scale(&opts.method);
    let dropout = match &opts.method {
        Method::Lora { dropout, .. } if *dropout > 0.0 => *dropout,
        _ => 0.0,
    };
    let started = Instant::now();
    let first_step = metrics.steps;
    let mut tokens_seen = 0usize;
    for step in first_step..total {
        if metrics.stopped_early {
            break;
        }
        let step_started = Instant::now();
        let tokens_before = tokens_seen;
        let epoch = step / steps_per_epoch;
        let within = (step % steps_per_epoch) as usize;
        let order = permutation(train_set.len(), opts.seed, epoch);
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut counted) = (0f64, 0f64);
        for micro in 0..opts.accumulation {
            let start = (within * opts.accumulation + micro) * opts.batch_size;
            if start >= order.len() {
                break;
            }
            let picked: Vec<&Example> =
                order[start..(start + opts.batch_size).min(order.len())].iter().map(|&i| &train_set[i]).collect();
            let b = batch(&picked, max_len, opts.packing, pad, &device)?;
            tokens_seen += b.inputs.elem_count();
            let mut rng =
                Rng(opts.seed ^ (step * opts.accumulation as u64 + micro as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25));
            let logits = model.forward(
                &b.inputs,
                &b.positions,
                &b.segments,
                scale,
                (dropout > 0.0).then_some((dropout, &mut rng)),
            )?;
            let (loss, n) = masked_loss(&logits, &b.targets, &b.weights)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?) * n;
            counted += n;
            // Gradients of the token-weighted sum, divided by all counted tokens below.
            let grads = (loss * n)?.backward()?;
            for (sum, var) in sums.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(s) => (s + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let mut grads: Vec<Tensor> = sums
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| match g {
                Some(g) => Ok((g / counted)?),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<_>>()?;
        let grad_norm = clip(&mut grads, opts.max_grad_norm)?;
        let lr = learning_rate(&opts.schedule, opts.learning_rate, step, opts.warmup_steps, total);
        // A loss or gradient that is not a finite number has diverged: stop before the
        // update, so the weights and the last checkpoint stay as they were.
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            return Err(crate::report::ModeFailure {
                reason: "TrainingDiverged",
                message: format!(
                    "the loss diverged at step {}/{total}: loss {}, gradient norm {grad_norm} (learning rate {lr:.2e}); \
                     lower learningRate, raise warmupSteps or set maxGradNorm",
                    step + 1,
                    loss_sum / counted.max(1.0)
                ),
            }
            .into());
        }
        optimizer.step(&vars, &grads, lr)?;
        let loss = loss_sum / counted.max(1.0);
        metrics.losses.push(loss);
        metrics.step_seconds.push(step_started.elapsed().as_secs_f64());
        metrics.step_tokens.push((tokens_seen - tokens_before) as u64);
        metrics.steps = step + 1;
        let mut validation_loss = None;
        let last = step + 1 == total;
        let evaluate_now = opts.eval_interval > 0 && (step + 1) % opts.eval_interval == 0;
        if let Some(v) = &validation_set
            && (evaluate_now || last)
        {
            let l = evaluate(&model, v, opts, pad)?;
            validation_loss = Some(l);
            metrics.validation_loss = Some(l);
            match metrics.best_validation_loss {
                Some(best) if l > best - opts.min_delta => metrics.bad_evaluations += 1,
                _ => {
                    metrics.best_validation_loss = Some(l);
                    metrics.bad_evaluations = 0;
                }
            }
            if opts.patience > 0 && metrics.bad_evaluations >= opts.patience {
                metrics.stopped_early = true;
                tracing::info!(step = step + 1, "early stopping: validation loss stopped improving");
            }
        }
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        let done = (step + 1 - first_step) as f64;
        report(&ProgressEvent {
            step: step + 1,
            total_steps: total,
            epoch,
            loss,
            learning_rate: lr,
            grad_norm,
            tokens_per_second: tokens_seen as f64 / seconds,
            eta_seconds: seconds / done * (total - step - 1) as f64,
            validation_loss,
        });
        let control = crate::report::control();
        if control.cancelled() {
            bail!(Interrupted::Cancelled(format!("training was cancelled after step {}", step + 1)));
        }
        let asked = control.take_checkpoint();
        if let Some(dir) = &opts.checkpoints
            && (asked
                || (opts.checkpoint_interval > 0
                    && ((step + 1) % opts.checkpoint_interval == 0 || last || metrics.stopped_early)))
        {
            if asked {
                crate::report::phase("Checkpointing", format!("writing a checkpoint at step {}, as asked", step + 1));
            }
            let written = save_checkpoint(dir, &named, &optimizer, &metrics, opts.keep)?;
            crate::report::emit(Report::Checkpoint { uri: written.display().to_string(), step: step + 1 });
        }
        if asked && control.stop_requested() && !last {
            if opts.checkpoints.is_none() {
                bail!(Interrupted::Cancelled("asked to stop, but the run has no checkpoint directory".into()));
            }
            bail!(Interrupted::Stopped(step + 1));
        }
    }
    write_output(opts, assignment, &loaded, &model, &metrics, base_sha256.as_deref())
}

const COMPLETE: &str = "COMPLETE.json";

/// Writes and seals a checkpoint; returns its directory.
fn save_checkpoint(
    dir: &Path,
    named: &[(String, Var)],
    opt: &AdamW,
    metrics: &Metrics,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("step-{:08}", metrics.steps);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let tensors: HashMap<String, Tensor> = named.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&tensors, tmp.join("trainable.safetensors"))?;
    let mut state: HashMap<String, Tensor> = HashMap::new();
    for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
        state.insert(format!("m.{i}"), m.clone());
        state.insert(format!("v.{i}"), v.clone());
    }
    candle_core::safetensors::save(&state, tmp.join("optimizer.safetensors"))?;
    let s = CheckpointState { metrics: metrics.clone(), optimizer_steps: opt.t };
    std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&s)?)?;
    let mut digests = serde_json::Map::new();
    for file in ["trainable.safetensors", "optimizer.safetensors", "state.json"] {
        digests.insert(file.into(), json!(file_sha256(&tmp.join(file))?));
    }
    // Written last: a checkpoint without it, or whose files do not match it, is torn.
    std::fs::write(tmp.join(COMPLETE), serde_json::to_vec_pretty(&json!({"files": digests}))?)?;
    let target = dir.join(&name);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&tmp, &target)?;
    let mut all = checkpoint_dirs(dir)?;
    all.reverse();
    for old in all.into_iter().skip(keep) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(target)
}

fn checkpoint_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Whether a checkpoint is whole: its seal exists and every file matches its digest.
fn intact(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path.join(COMPLETE)) else { return false };
    let Ok(seal) = serde_json::from_str::<Value>(&text) else { return false };
    let Some(files) = seal["files"].as_object() else { return false };
    !files.is_empty()
        && files
            .iter()
            .all(|(name, sha)| file_sha256(&path.join(name)).is_ok_and(|found| Some(found.as_str()) == sha.as_str()))
}

fn newest_checkpoint(dir: &Path) -> Result<Option<(PathBuf, CheckpointState)>> {
    for path in checkpoint_dirs(dir)?.into_iter().rev() {
        if !intact(&path) {
            tracing::warn!(checkpoint = %path.display(), "skipping a torn checkpoint");
            continue;
        }
        let state: CheckpointState = serde_json::from_str(&std::fs::read_to_string(path.join("state.json"))?)?;
        return Ok(Some((path, state)));
    }
    Ok(None)
}

fn load_checkpoint(path: &Path, named: &[(String, Var)], opt: &mut AdamW) -> Result<()> {
    let device = candle_core::Device::Cpu;
    let tensors = candle_core::safetensors::load(path.join("trainable.safetensors"), &device)?;
    for (name, var) in named {
        let t = tensors.get(name).with_context(|| format!("checkpoint {} lacks {name}", path.display()))?;
        var.set(t)?;
    }
    let state = candle_core::safetensors::load(path.join("optimizer.safetensors"), &device)?;
    for i in 0..opt.m.len() {
        opt.m[i] = state.get(&format!("m.{i}")).context("optimizer state is incomplete")?.clone();
        opt.v[i] = state.get(&format!("v.{i}")).context("optimizer state is incomplete")?.clone();
    }
    Ok(())
}

/// An HF config.json the engine's loader reads back.
fn hf_config(loaded: &LoadedModel, tied: bool) -> Value {
    let c = loaded.model.config();
    let qwen = c.arch == engine::model::Arch::Qwen2;
    json!({
        "model_type": if qwen { "qwen2" } else { "llama" },
        "architectures": [if qwen { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.context_length,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": loaded.tokenizer.bos,
        "eos_token_id": loaded.tokenizer.eos.first(),
        "torch_dtype": "float32",
    })
}

fn write_hf_model(dir: &Path, loaded: &LoadedModel, model: &TrainModel, scale: f64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let weights: HashMap<String, Tensor> = model.merged_weights(scale)?.into_iter().collect();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&hf_config(loaded, model.tied()))?)?;
    loaded.tokenizer.save(&dir.join("tokenizer.json"))?;
    let mut tc = json!({"add_bos_token": loaded.tokenizer.add_bos});
    if let Some(t) = &loaded.chat_template {
        tc["chat_template"] = json!(t);
    }
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_vec_pretty(&tc)?)?;
    Ok(())
}

fn write_output(
    opts: &TrainOptions,
    assignment: &Assignment,
    loaded: &LoadedModel,
    model: &TrainModel,
    metrics: &Metrics,
    base_sha256: Option<&str>,
) -> Result<Value> {
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let scale = lora_scale(&opts.method);
    let mut files = Vec::new();
    match &opts.method {
        Method::Lora { rank, alpha, dropout, targets } => {
            let tensors: HashMap<String, Tensor> = model
                .variables()
                .into_iter()
                .filter(|(n, _)| n.contains(".lora_"))
                .map(|(n, v)| (n, v.as_tensor().to_dtype(DType::F32).unwrap_or_else(|_| v.as_tensor().clone())))
                .collect();
            candle_core::safetensors::save(&tensors, out.join("adapter_model.safetensors"))?;
            let config = json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": dropout,
                "target_modules": targets,
                "bias": "none",
                "fan_in_fan_out": false,
                "use_rslora": false,
                "inference_mode": true,
                "base_model_name_or_path": opts.base.display().to_string(),
            });
            std::fs::write(out.join("adapter_config.json"), serde_json::to_vec_pretty(&config)?)?;
            files.extend(["adapter_model.safetensors", "adapter_config.json"].map(String::from));
            if opts.merge {
                write_hf_model(&out.join("merged"), loaded, model, scale)?;
                files.extend(["merged/model.safetensors", "merged/config.json"].map(String::from));
            }
        }
        Method::Full => {
            write_hf_model(out, loaded, model, 1.0)?;
            files.extend(
                ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"].map(String::from),
            );
        }
    }
    let mut digests = serde_json::Map::new();
    for f in &files {
        digests.insert(f.clone(), json!(file_sha256(&out.join(f))?));
    }
    let whole =
        crate::store::files_digest(digests.iter().map(|(name, sha)| (name.as_str(), sha.as_str().unwrap_or_default())));
    let input = |p: &Path| -> Result<Value> {
        let sha = if p.is_file() { Some(file_sha256(p)?) } else { None };
        Ok(json!({"path": p.display().to_string(), "sha256": sha}))
    };
    let Some(Mode::Finetune(spec)) = &assignment.mode else { bail!("not a finetune assignment") };
    let train_digest = spec.train.as_ref().map(|a| a.sha256.clone()).filter(|s| !s.is_empty());
    let mut inputs = json!({
        "base_model": {"path": opts.base.display().to_string(), "sha256": base_sha256},
        "train": input(&opts.train)?,
    });
    if let Some(d) = train_digest {
        inputs["train"]["datasetSha256"] = json!(d);
    }
    if let Some(v) = &opts.validation {
        inputs["validation"] = input(v)?;
    }
    let manifest = json!({
        "kind": "FineTuneJob",
        "workload": assignment.workload.as_ref().map(|w| json!({"namespace": w.namespace, "name": w.name, "uid": w.uid})),
        "sha256": whole,
        "method": match opts.method { Method::Full => "full", Method::Lora { .. } => "lora" },
        "files": digests,
        "inputs": inputs,
        "spec": serde_json::to_value(spec)?,
        "metrics": {
            "steps": metrics.steps,
            "finalLoss": metrics.losses.last(),
            "validationLoss": metrics.validation_loss,
            "bestValidationLoss": metrics.best_validation_loss,
            "stoppedEarly": metrics.stopped_early,
            "losses": metrics.losses,
            "stepSeconds": metrics.step_seconds,
            "stepTokens": metrics.step_tokens,
        },
    });
    let tmp = out.join(".manifest.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(&tmp, out.join("manifest.json"))?;
    tracing::info!(out = %out.display(), steps = metrics.steps, loss = metrics.losses.last(), "fine-tuning finished");
    Ok(manifest)
}
