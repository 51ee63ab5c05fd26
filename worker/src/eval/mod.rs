//! The eval mode: measures a model or an endpoint on a prepared split, with confidence
//! intervals, and decides pass or fail from thresholds and a baseline. A target that
//! fails more requests than allowed fails the run; it never passes on the few samples
//! that worked.

pub mod metrics;
pub mod samples;
pub mod target;

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use llmops_crds::evalrun::Metric;
use llmops_proto::v1::{
    Assignment, EvalAssignment, EvalTarget, GenerationParameters, Store, assignment::Mode, eval_target,
};
use serde_json::{Value, json};

use self::metrics::BleuStats;
use self::samples::{Input, Sample};
use self::target::{Endpoint, Local, RequestFailure, Settings};
use crate::engine::{self, Adapter, WeightFormat};
use crate::report::{self, Report};
use crate::store::{dir_digest, file_sha256, files_digest, local_path};

/// Bootstrap resamples behind every confidence interval.
const RESAMPLES: usize = 1000;
/// Seed of the bootstrap, fixed so the same outputs give the same intervals.
const BOOTSTRAP_SEED: u64 = 0x00E7_A1B0_075E_ED00;
/// Samples shown in the results as the worst ones.
const WORST: usize = 5;
/// Characters of input, expected and output text kept per shown sample.
const SHOWN_CHARS: usize = 500;
/// Time limit of one request to an endpoint.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Why an evaluation could not produce a verdict (TargetErrors, JudgeErrors,
/// DigestMismatch, NothingToScore).
pub use crate::report::ModeFailure as EvalFailure;

/// Everything the run needs, resolved.
struct Plan<'a> {
    spec: &'a EvalAssignment,
    store: Option<&'a Store>,
    metrics: Vec<Metric>,
    settings: Settings,
    regex: Option<regex::Regex>,
    out: PathBuf,
}

/// What happened to one sample.
#[derive(Debug, Default, Clone)]
struct Outcome {
    /// The target's output, or why there is none; None when not asked.
    output: Option<Result<String, String>>,
    /// Negative log-likelihood and tokens of the expected output.
    nll: Option<Result<(f64, u64), String>>,
    /// Whether the right choice was picked.
    choice: Option<Result<bool, String>>,
    /// The judge's normalised score.
    judge: Option<Result<f64, String>>,
}

impl Outcome {
    fn error(&self) -> Option<&str> {
        [self.output.as_ref().and_then(|r| r.as_ref().err()), self.nll.as_ref().and_then(|r| r.as_ref().err())]
            .into_iter()
            .chain([self.choice.as_ref().and_then(|r| r.as_ref().err())])
            .flatten()
            .next()
            .map(String::as_str)
    }
}

fn metric_name(m: Metric) -> String {
    serde_json::to_value(m).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn parse_metric(name: &str) -> Result<Metric> {
    serde_json::from_value(Value::String(name.to_string())).with_context(|| format!("unknown metric {name:?}"))
}

/// Generation settings: the prompt's parameters, overridden by the assignment's.
fn settings(prompt: Option<&GenerationParameters>, own: Option<&GenerationParameters>) -> Settings {
    let mut s = Settings::default();
    for p in [prompt, own].into_iter().flatten() {
        if let Some(t) = p.temperature {
            s.temperature = t;
        }
        if p.top_p.is_some() {
            s.top_p = p.top_p;
        }
        if p.top_k.is_some() {
            s.top_k = p.top_k;
        }
        if let Some(m) = p.max_tokens {
            s.max_tokens = m;
        }
        if p.repetition_penalty.is_some() {
            s.repetition_penalty = p.repetition_penalty;
        }
        if !p.stop.is_empty() {
            s.stop = p.stop.clone();
        }
        if p.seed.is_some() {
            s.seed = p.seed;
        }
    }
    s
}

fn lower_is_better(m: Metric) -> bool {
    m == Metric::Perplexity
}

fn needs_output(m: Metric) -> bool {
    !matches!(m, Metric::Perplexity | Metric::MultipleChoice)
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= SHOWN_CHARS {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(SHOWN_CHARS).collect();
    cut.push('…');
    cut
}

/// The digest a split file is pinned by: the file's own sha256, or its Dataset's (the
/// sha256 of the output's manifest.json, or the manifest's own `sha256`). A given digest
/// must be one of these.
fn dataset_digest(path: &Path, expected: &str) -> Result<String> {
    let own = file_sha256(path)?;
    if expected.is_empty() {
        return Ok(own);
    }
    let mut accepted = vec![own.clone()];
    if let Some(manifest) = path.parent().map(|d| d.join("manifest.json")).filter(|m| m.is_file()) {
        accepted.push(file_sha256(&manifest)?);
        let text = std::fs::read_to_string(&manifest)?;
        if let Some(sha) =
            serde_json::from_str::<Value>(&text).ok().and_then(|v| v["sha256"].as_str().map(String::from))
        {
            accepted.push(sha);
        }
    }
    if accepted.iter().any(|a| a.eq_ignore_ascii_case(expected)) {
        Ok(expected.to_lowercase())
    } else {
        Err(EvalFailure {
            reason: "DigestMismatch",
            message: format!(
                "{} has sha256 {own} (and its dataset manifest another), but the assignment pins {expected}",
                path.display()
            ),
        }
        .into())
    }
}

/// Progress on the terminal (a redrawn line) or in the log, and to the report sink.
struct Progress {
    total: usize,
    started: Instant,
    last: Option<Instant>,
    terminal: bool,
    what: &'static str,
}

impl Progress {
    fn new(total: usize, what: &'static str) -> Self {
        Self { total, started: Instant::now(), last: None, terminal: std::io::stderr().is_terminal(), what }
    }

    fn update(&mut self, done: usize, errors: usize) {
        let finished = done >= self.total;
        if !finished && self.last.is_some_and(|l| l.elapsed() < Duration::from_secs(2)) {
            return;
        }
        self.last = Some(Instant::now());
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = done as f64 / elapsed.max(1e-9);
        let eta = if done == 0 { 0.0 } else { (self.total - done.min(self.total)) as f64 / rate };
        if self.terminal {
            eprint!("\r{} {done}/{} samples, {errors} errors, {rate:.2}/s, eta {eta:.0}s   ", self.what, self.total);
            if finished {
                eprintln!();
            }
        } else {
            tracing::info!(
                stage = self.what,
                done,
                total = self.total,
                errors,
                per_second = rate,
                eta_seconds = eta.round(),
                "evaluation progress"
            );
        }
        report::emit(Report::Progress {
            step: done as u64,
            total: self.total as u64,
            epoch: 0.0,
            metrics: BTreeMap::from([("samples".to_string(), done as f64), ("errors".to_string(), errors as f64)]),
            eta_seconds: eta,
            message: format!("{}: {done}/{} samples", self.what, self.total),
        });
    }
}

/// Runs the eval mode of `assignment`; writes results.json and manifest.json and returns
/// the results. A run that ends without a verdict returns an [`EvalFailure`] (after
/// writing what it knows into results.json).
pub fn run(assignment: &Assignment) -> Result<Value> {
    let Some(Mode::Eval(spec)) = &assignment.mode else { bail!("not an eval assignment") };
    let store = assignment.store.as_ref();
    let started = Instant::now();
    let metrics: Vec<Metric> = spec.metrics.iter().map(|m| parse_metric(m)).collect::<Result<_>>()?;
    let regex = if spec.regex.is_empty() {
        None
    } else {
        Some(regex::Regex::new(&spec.regex).with_context(|| format!("eval.regex {:?}", spec.regex))?)
    };
    let out_uri = spec.output.as_ref().map(|o| o.uri.as_str()).context("eval.output.uri is required")?;
    let out = local_path(out_uri, store)?;
    let prompt = spec.prompt.as_ref().map(samples::prompt_spec).transpose()?;
    let prompt_digest = spec.prompt.as_ref().map(|p| {
        if p.sha256.is_empty() { prompt.as_ref().map(|s| s.digest()).unwrap_or_default() } else { p.sha256.clone() }
    });
    let plan = Plan {
        spec,
        store,
        settings: settings(spec.prompt.as_ref().and_then(|p| p.parameters.as_ref()), spec.generation.as_ref()),
        metrics,
        regex,
        out,
    };

    report::phase("Staging", "reading samples and loading the target");
    let data = spec.data.as_ref().context("eval.data is required")?;
    let data_path = local_path(&data.uri, store)?;
    let dataset_digest = dataset_digest(&data_path, &data.sha256)?;
    let set = samples::read(&data_path, spec.sample_limit as usize, prompt.as_ref())?;
    if set.invalid_count > 0 {
        tracing::warn!(
            skipped = set.invalid_count,
            first = set.invalid.first().map(String::as_str).unwrap_or_default(),
            "rows that are not usable samples were skipped"
        );
    }
    let samples = set.samples;
    check_scorable(&plan, &samples)?;

    let target = spec.target.as_ref().and_then(|t| t.target.as_ref()).context("eval.target is required")?;
    let mut evaluated = json!({"datasetDigest": dataset_digest});
    if let Some(digest) = prompt_digest {
        evaluated["promptDigest"] = json!(digest);
    }
    if let Some(revision) = spec.target.as_ref().map(|t: &EvalTarget| t.revision.clone()).filter(|r| !r.is_empty()) {
        evaluated["revision"] = json!(revision);
    }
    report::phase("Running", format!("evaluating {} samples", samples.len()));
    let (outcomes, aborted) = match target {
        eval_target::Target::Local(local) => {
            let weights =
                local.model.as_ref().and_then(|m| m.weights.as_ref()).context("eval.target.local.model is required")?;
            let path = local_path(&weights.uri, store)?;
            let device = engine::device();
            let (model, model_digest) =
                engine::load_verified(&path, &weights.sha256, &device, weight_format(&plan, &path, &device))?;
            evaluated["modelDigest"] = json!(model_digest.clone().map_or_else(|| dir_digest(&path), Ok)?);
            let adapter = match &local.adapter {
                Some(a) => {
                    let dir = local_path(&a.uri, store)?;
                    let digest = dir_digest(&dir)?;
                    if !a.sha256.is_empty() && !a.sha256.eq_ignore_ascii_case(&digest) {
                        return Err(EvalFailure {
                            reason: "DigestMismatch",
                            message: format!(
                                "adapter {} has digest {digest}, but the assignment pins {}",
                                dir.display(),
                                a.sha256
                            ),
                        }
                        .into());
                    }
                    evaluated["adapterDigest"] = json!(digest);
                    Some(Arc::new(Adapter::load(&dir, &model.model, model_digest.as_deref())?))
                }
                None => None,
            };
            let local = Local { model: Arc::new(model), adapter };
            (run_local(&plan, &local, &samples)?, false)
        }
        eval_target::Target::Endpoint(ep) => {
            let key = read_key(&ep.api_key_file, store)?;
            let endpoint = Endpoint::new(&ep.url, &ep.model, key, REQUEST_TIMEOUT)?;
            evaluated["endpoint"] = json!(ep.url);
            run_endpoint(&plan, &endpoint, &samples)?
        }
    };
    let mut outcomes = outcomes;
    let n = samples.len();
    let errors = outcomes.iter().filter(|o| o.error().is_some()).count();
    let allowed = (spec.max_error_fraction * n as f64).floor() as usize;
    let mut results = json!({
        "samples": n,
        "skippedRows": set.invalid_count,
        "errors": errors,
        "maxErrorFraction": spec.max_error_fraction,
        "evaluated": evaluated,
    });
    if errors > allowed || aborted {
        let first = outcomes.iter().find_map(|o| o.error().map(String::from)).unwrap_or_default();
        let failure = EvalFailure {
            reason: "TargetErrors",
            message: format!(
                "{errors} of {n} samples failed against the target (at most {allowed} allowed by maxErrorFraction {}){}; first error: {first}",
                spec.max_error_fraction,
                if aborted { ", so the run stopped early" } else { "" }
            ),
        };
        return fail(&plan, results, &samples, &outcomes, failure, started);
    }

    if plan.metrics.contains(&Metric::Judge) {
        let judge_errors = run_judge(&plan, &samples, &mut outcomes)?;
        let judged = outcomes.iter().filter(|o| o.judge.is_some()).count();
        results["judgeErrors"] = json!(judge_errors);
        if judge_errors > (spec.max_error_fraction * judged as f64).floor() as usize {
            let first = outcomes
                .iter()
                .find_map(|o| o.judge.as_ref().and_then(|j| j.as_ref().err()).cloned())
                .unwrap_or_default();
            let failure = EvalFailure {
                reason: "JudgeErrors",
                message: format!("the judge failed on {judge_errors} of {judged} samples; first error: {first}"),
            };
            return fail(&plan, results, &samples, &outcomes, failure, started);
        }
    }

    let (values, per_sample) = score(&plan, &samples, &outcomes)?;
    let verdict = verdict(spec, &values);
    results["passed"] = json!(verdict.passed);
    if let Some(reason) = &verdict.reason {
        results["reason"] = json!(reason);
    }
    results["metrics"] = json!(values.iter().map(|v| v.to_json()).collect::<Vec<_>>());
    results["thresholds"] = json!(verdict.thresholds);
    if let Some(b) = &spec.baseline {
        results["baselineEvalRun"] = json!(b.eval_run);
        results["baseline"] = json!(verdict.baseline);
    }
    results["worstSamples"] = json!(worst(&plan, &samples, &outcomes, &per_sample));
    results["durationSeconds"] = json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    results["spec"] = serde_json::to_value(spec)?;
    write(&plan, &results)?;
    Ok(results)
}

/// How a local model's weights are held. Log-likelihood metrics keep a GGUF's quantized
/// arithmetic everywhere (their values then match llama.cpp's); generation alone uses the
/// layout `serve` uses on a CPU (dense weights for prompts, quantized for decoding), so
/// an evaluation sees the outputs the deployment would serve, with prompts processed
/// several times faster.
fn weight_format(plan: &Plan<'_>, path: &Path, device: &candle_core::Device) -> WeightFormat {
    let scores = plan.metrics.iter().any(|m| matches!(m, Metric::Perplexity | Metric::MultipleChoice));
    if !scores && device.is_cpu() && path.is_file() { WeightFormat::Hybrid } else { WeightFormat::AsStored }
}

fn read_key(file: &str, store: Option<&Store>) -> Result<Option<String>> {
    if file.is_empty() {
        return Ok(None);
    }
    let path = local_path(file, store)?;
    let key = std::fs::read_to_string(&path).with_context(|| format!("reading the API key from {}", path.display()))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("{} holds no API key", path.display());
    }
    Ok(Some(key.to_string()))
}

/// Refuses metrics no sample can be scored on, before any work is done.
fn check_scorable(plan: &Plan<'_>, samples: &[Sample]) -> Result<()> {
    for &m in &plan.metrics {
        let usable = match m {
            Metric::MultipleChoice => samples.iter().any(|s| s.choices.is_some()),
            Metric::RegexMatch | Metric::Judge => true,
            _ => samples.iter().any(|s| s.expected.is_some()),
        };
        if !usable {
            let needs = if m == Metric::MultipleChoice {
                "rows with choices and answer"
            } else {
                "rows with an expected output (a chat's last assistant turn, completion, text or expected)"
            };
            return Err(EvalFailure {
                reason: "NothingToScore",
                message: format!("{} needs {needs}; the split has none", metric_name(m)),
            }
            .into());
        }
    }
    let unanswerable = samples.iter().filter(|s| s.input.is_empty()).count();
    if unanswerable > 0 && plan.metrics.iter().any(|&m| needs_output(m)) {
        tracing::warn!(count = unanswerable, "text rows have no input to answer; they count for perplexity only");
    }
    Ok(())
}

/// Whether a sample is sent to the target for an output.
fn wants_output(plan: &Plan<'_>, sample: &Sample) -> bool {
    !sample.input.is_empty() && plan.metrics.iter().any(|&m| needs_output(m))
}

fn run_local(plan: &Plan<'_>, local: &Local, samples: &[Sample]) -> Result<Vec<Outcome>> {
    let mut outcomes = vec![Outcome::default(); samples.len()];
    let position: HashMap<usize, usize> = samples.iter().enumerate().map(|(p, s)| (s.index, p)).collect();
    let scoring = plan.metrics.contains(&Metric::Perplexity) || plan.metrics.contains(&Metric::MultipleChoice);
    if scoring {
        let mut progress = Progress::new(samples.len(), "scoring");
        let mut errors = 0;
        for (p, sample) in samples.iter().enumerate() {
            if report::control().cancelled() {
                bail!(report::Interrupted::Cancelled("the evaluation was cancelled".into()));
            }
            if plan.metrics.contains(&Metric::Perplexity) && sample.expected.is_some() {
                outcomes[p].nll = Some(local.nll(sample).map_err(|e| format!("{e:#}")));
            }
            if plan.metrics.contains(&Metric::MultipleChoice)
                && let Some(choices) = &sample.choices
            {
                outcomes[p].choice = Some(
                    local
                        .choose(&sample.input, choices)
                        .map(|(pick, _)| pick == choices.answer)
                        .map_err(|e| format!("{e:#}")),
                );
            }
            errors += usize::from(outcomes[p].error().is_some());
            progress.update(p + 1, errors);
        }
    }
    let asked: Vec<&Sample> = samples.iter().filter(|s| wants_output(plan, s)).collect();
    if !asked.is_empty() {
        let mut progress = Progress::new(asked.len(), "generating");
        let (mut done, mut errors) = (0, 0);
        let batch = (plan.spec.concurrency as usize).clamp(1, 16);
        local.generate(&asked, &plan.settings, batch, |index, output| {
            done += 1;
            errors += usize::from(output.is_err());
            if let Some(&p) = position.get(&index) {
                outcomes[p].output = Some(output);
            }
            progress.update(done, errors);
        })?;
    }
    Ok(outcomes)
}

/// Sends the samples to the endpoint, `concurrency` at a time; stops sending once more
/// samples failed than the run may lose. Returns the outcomes and whether it stopped.
fn run_endpoint(plan: &Plan<'_>, endpoint: &Endpoint, samples: &[Sample]) -> Result<(Vec<Outcome>, bool)> {
    let asked: Vec<(usize, Sample)> =
        samples.iter().enumerate().filter(|(_, s)| wants_output(plan, s)).map(|(p, s)| (p, s.clone())).collect();
    let allowed = (plan.spec.max_error_fraction * samples.len() as f64).floor() as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let results: Vec<(usize, Result<String, RequestFailure>)> = runtime.block_on(async {
        let semaphore = Arc::new(tokio::sync::Semaphore::new((plan.spec.concurrency as usize).max(1)));
        let budget = Arc::new(Budget::new(allowed));
        let mut tasks = tokio::task::JoinSet::new();
        let mut positions = HashMap::new();
        for (p, sample) in asked.iter().cloned() {
            let (semaphore, budget) = (semaphore.clone(), budget.clone());
            let (endpoint, settings) = (endpoint.clone(), plan.settings.clone());
            let task = tasks.spawn(async move {
                let Ok(_permit) = semaphore.acquire_owned().await else { return None };
                if budget.stopped() || report::control().cancelled() {
                    return None;
                }
                let result = endpoint.complete(&sample.input, &settings, sample.index).await;
                if result.is_err() {
                    budget.failed();
                }
                Some((p, result))
            });
            positions.insert(task.id(), p);
        }
        let mut progress = Progress::new(asked.len(), "generating");
        join_requests(tasks, &positions, &budget, |done, failed| progress.update(done, failed)).await
    });
    if report::control().cancelled() {
        bail!(report::Interrupted::Cancelled("the evaluation was cancelled".into()));
    }
    let aborted = results.len() < asked.len();
    let mut outcomes = vec![Outcome::default(); samples.len()];
    for (p, result) in results {
        outcomes[p].output = Some(result.map_err(|f| f.describe()));
    }
    Ok((outcomes, aborted))
}

/// How many requests may fail before no more are sent.
struct Budget {
    allowed: usize,
    failed: AtomicUsize,
    stop: AtomicBool,
}

impl Budget {
    fn new(allowed: usize) -> Self {
        Self { allowed, failed: AtomicUsize::new(0), stop: AtomicBool::new(false) }
    }

    /// Counts a failed request; past the allowance, no more are sent.
    fn failed(&self) {
        if self.failed.fetch_add(1, Ordering::SeqCst) + 1 > self.allowed {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Waits for every request task (`positions`: each task's sample position). A task that
/// panicked does not vanish: its sample fails with the panic's message and counts against
/// `budget` like any failed request. Tasks that sent nothing (the budget was spent) give
/// no result.
async fn join_requests(
    mut tasks: tokio::task::JoinSet<Option<(usize, Result<String, RequestFailure>)>>,
    positions: &HashMap<tokio::task::Id, usize>,
    budget: &Budget,
    mut progress: impl FnMut(usize, usize),
) -> Vec<(usize, Result<String, RequestFailure>)> {
    let mut results: Vec<(usize, Result<String, RequestFailure>)> = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Some(result)) => {
                errors += usize::from(result.1.is_err());
                results.push(result);
            }
            Ok(None) => {}
            Err(e) => {
                let Some(&p) = positions.get(&e.id()) else { continue };
                let message = if e.is_panic() {
                    format!("the request task panicked: {}", panic_message(e.into_panic()))
                } else {
                    "the request task was cancelled".to_string()
                };
                budget.failed();
                errors += 1;
                results.push((p, Err(RequestFailure { message, attempts: 0 })));
            }
        }
        progress(results.len(), errors);
    }
    results
}

/// The text a panic carried.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => payload.downcast_ref::<&str>().map_or_else(|| "(no message)".to_string(), |s| s.to_string()),
    }
}

/// Scores every output with the judge; returns how many could not be judged.
fn run_judge(plan: &Plan<'_>, samples: &[Sample], outcomes: &mut [Outcome]) -> Result<usize> {
    let judge = plan.spec.judge.as_ref().context("eval.judge is required when metrics lists judge")?;
    let ep = judge.endpoint.as_ref().context("eval.judge.endpoint is required")?;
    let key = read_key(&ep.api_key_file, plan.store)?;
    let endpoint = Endpoint::new(&ep.url, &ep.model, key, REQUEST_TIMEOUT)?;
    let env = llmops_crds::render::environment();
    let rubric = env.template_from_str(&judge.rubric).context("eval.judge.rubric does not parse")?;
    let settings = Settings { temperature: 0.0, max_tokens: 256, ..Settings::default() };
    let max_score = judge.max_score.max(1);
    let mut asks = Vec::new();
    for (p, (sample, outcome)) in samples.iter().zip(outcomes.iter()).enumerate() {
        let Some(Ok(output)) = &outcome.output else { continue };
        let text = rubric
            .render(minijinja::context! {
                input => sample.input.display(),
                expected => sample.expected.clone().unwrap_or_default(),
                output => output,
            })
            .with_context(|| "rendering eval.judge.rubric (it may use input, expected and output)")?;
        let message = llmops_crds::render::ChatMessage { role: "user".into(), content: text };
        asks.push((p, Input::Chat(vec![message])));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let answers: Vec<(usize, Result<String, RequestFailure>)> = runtime.block_on(async {
        let semaphore = Arc::new(tokio::sync::Semaphore::new((plan.spec.concurrency as usize).max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut positions = HashMap::new();
        for (p, input) in asks.iter().cloned() {
            let (semaphore, endpoint, settings) = (semaphore.clone(), endpoint.clone(), settings.clone());
            let task = tasks.spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                Some((p, endpoint.complete(&input, &settings, p).await))
            });
            positions.insert(task.id(), p);
        }
        let mut progress = Progress::new(asks.len(), "judging");
        // Judging never stops early: every output is judged, and the errors are counted after.
        let budget = Budget::new(usize::MAX);
        join_requests(tasks, &positions, &budget, |done, failed| progress.update(done, failed)).await
    });
    let mut errors = 0;
    for (p, answer) in answers {
        let score = match answer {
            Ok(text) => metrics::parse_judge_score(&text, max_score)
                .ok_or_else(|| format!("no score from 1 to {max_score} in the judge's answer: {}", truncate(&text))),
            Err(f) => Err(format!("judge request failed: {}", f.describe())),
        };
        errors += usize::from(score.is_err());
        outcomes[p].judge = Some(score);
    }
    Ok(errors)
}

/// One sample's score per metric name.
type Scores = BTreeMap<String, f64>;

/// A metric's value over the run.
#[derive(Debug, Clone, PartialEq)]
struct MetricValue {
    metric: Metric,
    value: f64,
    ci: Option<(f64, f64)>,
    samples: usize,
}

impl MetricValue {
    fn to_json(&self) -> Value {
        let mut v = json!({"metric": metric_name(self.metric), "value": self.value, "samples": self.samples});
        if let Some((low, high)) = self.ci {
            v["ciLow"] = json!(low);
            v["ciHigh"] = json!(high);
        }
        v
    }
}

/// Metric values with their intervals, and each sample's scores (by position).
fn score(plan: &Plan<'_>, samples: &[Sample], outcomes: &[Outcome]) -> Result<(Vec<MetricValue>, Vec<Scores>)> {
    let mut per_sample: Vec<Scores> = vec![BTreeMap::new(); samples.len()];
    let mut values = Vec::new();
    for &m in &plan.metrics {
        let name = metric_name(m);
        let (value, ci, count) = match m {
            Metric::Perplexity => {
                let mut scored = Vec::new();
                for (p, o) in outcomes.iter().enumerate() {
                    if let Some(Ok((nll, tokens))) = o.nll {
                        scored.push((nll, tokens));
                        per_sample[p].insert(name.clone(), (nll / tokens.max(1) as f64).exp());
                    }
                }
                let (v, low, high) =
                    metrics::perplexity_with_ci(&scored, RESAMPLES, BOOTSTRAP_SEED).context("no sample scored")?;
                (v, Some((low, high)), scored.len())
            }
            Metric::Bleu => {
                let mut stats: Vec<BleuStats> = Vec::new();
                for (p, (s, o)) in samples.iter().zip(outcomes).enumerate() {
                    if let (Some(Ok(output)), Some(expected)) = (&o.output, &s.expected) {
                        let st = metrics::bleu_stats(output, expected);
                        per_sample[p].insert(name.clone(), metrics::bleu(&st));
                        stats.push(st);
                    }
                }
                let (v, low, high) =
                    metrics::bleu_with_ci(&stats, RESAMPLES, BOOTSTRAP_SEED).context("no sample scored")?;
                (v, Some((low, high)), stats.len())
            }
            _ => {
                let mut scores = Vec::new();
                for (p, (s, o)) in samples.iter().zip(outcomes).enumerate() {
                    let value = sample_score(plan, m, s, o);
                    if let Some(v) = value {
                        per_sample[p].insert(name.clone(), v);
                        scores.push(v);
                    }
                }
                let (v, low, high) =
                    metrics::mean_with_ci(&scores, RESAMPLES, BOOTSTRAP_SEED).context("no sample scored")?;
                (v, Some((low, high)), scores.len())
            }
        };
        values.push(MetricValue { metric: m, value, ci, samples: count });
    }
    Ok((values, per_sample))
}

/// One sample's score on a per-sample metric, when it has one.
fn sample_score(plan: &Plan<'_>, m: Metric, s: &Sample, o: &Outcome) -> Option<f64> {
    match m {
        Metric::MultipleChoice => o.choice.as_ref()?.as_ref().ok().map(|&right| f64::from(u8::from(right))),
        Metric::Judge => o.judge.as_ref()?.as_ref().ok().copied(),
        _ => {
            let output = o.output.as_ref()?.as_ref().ok()?;
            if m == Metric::RegexMatch {
                return plan.regex.as_ref().map(|re| metrics::regex_match(re, output));
            }
            let expected = s.expected.as_deref()?;
            Some(match m {
                Metric::ExactMatch => metrics::exact_match(output, expected),
                Metric::NormalizedExactMatch => metrics::normalized_exact_match(output, expected),
                Metric::Contains => metrics::contains(output, expected),
                Metric::TokenF1 => metrics::token_f1(output, expected),
                Metric::RougeL => metrics::rouge_l(output, expected),
                _ => return None,
            })
        }
    }
}

/// Pass or fail, and why.
struct Verdict {
    passed: bool,
    reason: Option<String>,
    thresholds: Vec<Value>,
    baseline: Vec<Value>,
}

fn verdict(spec: &EvalAssignment, values: &[MetricValue]) -> Verdict {
    let value_of = |name: &str| values.iter().find(|v| metric_name(v.metric) == name).map(|v| v.value);
    let mut reasons = Vec::new();
    let mut thresholds = Vec::new();
    for t in &spec.thresholds {
        // A threshold on a metric without a finite value fails: nothing was shown to hold.
        let value = value_of(&t.metric).unwrap_or(f64::NAN);
        if !value.is_finite() {
            reasons.push(format!("{} has no finite value ({value}), so its threshold cannot hold", t.metric));
            let mut v = json!({"metric": t.metric, "value": null, "passed": false});
            if let Some(min) = t.min {
                v["min"] = json!(min);
            }
            if let Some(max) = t.max {
                v["max"] = json!(max);
            }
            thresholds.push(v);
            continue;
        }
        let low = t.min.filter(|&min| value < min || !min.is_finite());
        let high = t.max.filter(|&max| value > max || !max.is_finite());
        if let Some(min) = low {
            reasons.push(format!("{} {value:.4} is below the minimum {min}", t.metric));
        }
        if let Some(max) = high {
            reasons.push(format!("{} {value:.4} is above the maximum {max}", t.metric));
        }
        let mut v = json!({"metric": t.metric, "value": value, "passed": low.is_none() && high.is_none()});
        if let Some(min) = t.min {
            v["min"] = json!(min);
        }
        if let Some(max) = t.max {
            v["max"] = json!(max);
        }
        thresholds.push(v);
    }
    let mut baseline = Vec::new();
    if let Some(b) = &spec.baseline {
        for (name, &base) in &b.metrics {
            let Some(value) = value_of(name) else { continue };
            let Ok(metric) = parse_metric(name) else { continue };
            // A comparison with a value that is not a finite number is a regression: it
            // cannot show that nothing got worse.
            let comparable = value.is_finite() && base.is_finite() && b.max_regression.is_finite();
            let regressed = !comparable
                || if lower_is_better(metric) {
                    value > base + b.max_regression
                } else {
                    value < base - b.max_regression
                };
            if !comparable {
                reasons.push(format!(
                    "{name} cannot be compared with the baseline ({value} against {base}): not a finite number"
                ));
            } else if regressed {
                reasons.push(format!(
                    "{name} regressed from {base:.4} ({}) to {value:.4}, more than the allowed {}",
                    if b.eval_run.is_empty() { "baseline" } else { &b.eval_run },
                    b.max_regression
                ));
            }
            baseline.push(json!({"metric": name, "baseline": base, "value": value, "regressed": regressed}));
        }
    }
    Verdict {
        passed: reasons.is_empty(),
        reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
        thresholds,
        baseline,
    }
}

/// The samples that did worst: failed ones first, then the lowest scores on the first
/// listed metric (the highest perplexity).
fn worst(
    plan: &Plan<'_>,
    samples: &[Sample],
    outcomes: &[Outcome],
    per_sample: &[BTreeMap<String, f64>],
) -> Vec<Value> {
    let key = plan.metrics.first().map(|&m| (metric_name(m), lower_is_better(m)));
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let rank = |p: usize| -> (u8, f64) {
        if outcomes[p].error().is_some() {
            return (0, 0.0);
        }
        match key.as_ref().and_then(|(name, lower)| per_sample[p].get(name).map(|v| if *lower { -v } else { *v })) {
            Some(v) => (1, v),
            None => (2, 0.0),
        }
    };
    order.sort_by(|&a, &b| {
        let (ra, rb) = (rank(a), rank(b));
        ra.0.cmp(&rb.0).then(ra.1.total_cmp(&rb.1)).then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(WORST)
        .map(|p| {
            let (s, o) = (&samples[p], &outcomes[p]);
            let output = match (&o.output, o.error()) {
                (_, Some(e)) => format!("error: {e}"),
                (Some(Ok(text)), None) => text.clone(),
                _ => String::new(),
            };
            let mut v = json!({
                "index": s.index,
                "input": truncate(&s.input.display()),
                "output": truncate(&output),
                "scores": per_sample[p],
            });
            if let Some(e) = &s.expected {
                v["expected"] = json!(truncate(e));
            }
            v
        })
        .collect()
}

/// Writes what is known of a run that ended without a verdict, then returns its failure.
fn fail(
    plan: &Plan<'_>,
    mut results: Value,
    samples: &[Sample],
    outcomes: &[Outcome],
    failure: EvalFailure,
    started: Instant,
) -> Result<Value> {
    results["passed"] = json!(false);
    results["failure"] = json!({"reason": failure.reason, "message": failure.message});
    let none = vec![BTreeMap::new(); samples.len()];
    results["worstSamples"] = json!(worst(plan, samples, outcomes, &none));
    results["durationSeconds"] = json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    results["spec"] = serde_json::to_value(plan.spec)?;
    write(plan, &results)?;
    Err(failure.into())
}

/// Writes results.json, then manifest.json with its digest; both replace older ones
/// whole (written beside, then renamed).
fn write(plan: &Plan<'_>, results: &Value) -> Result<()> {
    std::fs::create_dir_all(&plan.out).with_context(|| format!("creating {}", plan.out.display()))?;
    let place = |name: &str, value: &Value| -> Result<String> {
        let path = plan.out.join(name);
        let staging = plan.out.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&staging, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", staging.display()))?;
        std::fs::rename(&staging, &path)?;
        file_sha256(&path)
    };
    let sha = place("results.json", results)?;
    let manifest = json!({
        "kind": "EvalRun",
        "sha256": files_digest([("results.json", sha.as_str())]),
        "files": {"results.json": sha},
        "inputs": results["evaluated"],
        "passed": results["passed"],
    });
    place("manifest.json", &manifest)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmops_proto::v1::{Baseline, Threshold};

    fn value(metric: Metric, value: f64) -> MetricValue {
        MetricValue { metric, value, ci: None, samples: 10 }
    }

    #[test]
    fn thresholds_and_baseline_decide_the_verdict() {
        let spec = EvalAssignment {
            thresholds: vec![
                Threshold { metric: "rougeL".into(), min: Some(0.35), max: None },
                Threshold { metric: "perplexity".into(), min: None, max: Some(20.0) },
            ],
            baseline: Some(Baseline {
                eval_run: "base".into(),
                metrics: [("rougeL".to_string(), 0.40), ("perplexity".to_string(), 12.0)].into(),
                max_regression: 0.02,
            }),
            ..Default::default()
        };
        let pass = verdict(&spec, &[value(Metric::RougeL, 0.39), value(Metric::Perplexity, 12.01)]);
        assert!(pass.passed, "{:?}", pass.reason);
        let fail = verdict(&spec, &[value(Metric::RougeL, 0.30), value(Metric::Perplexity, 25.0)]);
        assert!(!fail.passed);
        let reason = fail.reason.expect("a reason");
        assert!(reason.contains("rougeL 0.3000 is below the minimum 0.35"), "{reason}");
        assert!(reason.contains("perplexity 25.0000 is above the maximum 20"), "{reason}");
        assert!(reason.contains("perplexity regressed from 12.0000 (base)"), "{reason}");
        assert_eq!(fail.baseline.len(), 2);
        // Lower perplexity is better: it does not regress by going down.
        let better = verdict(&spec, &[value(Metric::RougeL, 0.5), value(Metric::Perplexity, 3.0)]);
        assert!(better.passed, "{:?}", better.reason);
    }

    #[test]
    fn a_value_that_is_not_a_number_never_passes() {
        let spec = EvalAssignment {
            thresholds: vec![
                Threshold { metric: "tokenF1".into(), min: Some(0.5), max: None },
                Threshold { metric: "perplexity".into(), min: None, max: Some(20.0) },
            ],
            ..Default::default()
        };
        let nan = verdict(&spec, &[value(Metric::TokenF1, f64::NAN), value(Metric::Perplexity, f64::INFINITY)]);
        assert!(!nan.passed);
        let reason = nan.reason.expect("a reason");
        assert!(reason.contains("tokenF1 has no finite value"), "{reason}");
        assert!(reason.contains("perplexity has no finite value"), "{reason}");
        // A threshold on a metric that was not computed fails too.
        let missing = verdict(&spec, &[value(Metric::TokenF1, 0.9)]);
        assert!(!missing.passed, "a threshold without a value cannot pass");
        // A baseline comparison with a NaN on either side fails.
        let spec = EvalAssignment {
            baseline: Some(Baseline {
                eval_run: "base".into(),
                metrics: [("rougeL".to_string(), f64::NAN)].into(),
                max_regression: 0.0,
            }),
            ..Default::default()
        };
        let against_nan = verdict(&spec, &[value(Metric::RougeL, 0.9)]);
        assert!(!against_nan.passed);
        assert!(against_nan.reason.unwrap_or_default().contains("cannot be compared"));
    }

    #[test]
    fn prompt_parameters_are_overridden_by_the_assignment() {
        let prompt = GenerationParameters {
            temperature: Some(0.7),
            max_tokens: Some(64),
            stop: vec!["\n".into()],
            ..Default::default()
        };
        let own = GenerationParameters { temperature: Some(0.0), ..Default::default() };
        let s = settings(Some(&prompt), Some(&own));
        assert_eq!((s.temperature, s.max_tokens, s.stop), (0.0, 64, vec!["\n".to_string()]));
    }

    #[test]
    fn a_panicking_request_task_is_a_failed_sample_counted_against_the_budget() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let (results, stopped) = runtime.block_on(async {
            let budget = Budget::new(0);
            let mut tasks = tokio::task::JoinSet::new();
            let mut positions = HashMap::new();
            let ok = tasks.spawn(async { Some((0, Ok("fine".to_string()))) });
            positions.insert(ok.id(), 0);
            let boom = tasks.spawn(async { panic!("index out of bounds in a response") });
            positions.insert(boom.id(), 7);
            let mut seen = Vec::new();
            let results = join_requests(tasks, &positions, &budget, |done, errors| seen.push((done, errors))).await;
            assert_eq!(seen.last(), Some(&(2, 1)), "progress counts the panic as an error: {seen:?}");
            (results, budget.stopped())
        });
        let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
        assert_eq!(failed.len(), 1, "{results:?}");
        let (p, Err(failure)) = failed[0] else { unreachable!() };
        assert_eq!(*p, 7, "the failure lands on the panicking task's sample");
        assert!(failure.describe().contains("panicked: index out of bounds in a response"), "{failure:?}");
        assert!(stopped, "with no errors allowed, the panic spends the budget and stops the run");
        assert!(results.iter().any(|(p, r)| *p == 0 && r.as_deref() == Ok("fine")));
    }
}
