//! `llmops-worker serve`: an OpenAI-compatible HTTP API over the engine, with continuous
//! batching, LoRA adapters selected by model name, a traffic log with user feedback,
//! optional API keys and Prometheus metrics.
//!
//! The listener starts before the model loads, so `/healthz` answers at once while
//! `/readyz` (and the API) wait for the model. Under `agent` the server also reports its
//! live figures (`live`) and needs nothing from the operator to start.

pub mod api;
pub mod batcher;
pub mod error;
pub mod live;
pub mod metrics;
pub mod prompt;
pub mod traffic;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llmops_crds::render::ChatMessage;
use llmops_proto::v1::{Assignment, GenerationParameters, ServeAssignment, Traffic, assignment::Mode, store::Backend};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use self::api::{ChatRequest, Common, CompletionRequest, FeedbackRequest, PromptIn, Usage};
use self::batcher::{Batcher, Event, Job, SubmitError};
use self::error::ApiError;
use self::live::{LiveFigures, Reporter};
use self::metrics::Metrics;
use self::prompt::PromptError;
use self::traffic::{CompletionRecord, FeedbackRecord, SegmentPolicy, TrafficLog};
use crate::engine::{self, Adapter, GenerateRequest, Generation, LoadedModel, WeightFormat};
use crate::prepare::transform::Redact;
use crate::store::local_path;

/// What a loaded server serves.
struct Loaded {
    model: Arc<LoadedModel>,
    batcher: Batcher,
    /// Adapters by served name; an adapter that does not fit the base model keeps the
    /// reason, so requests naming it get a clear error.
    adapters: BTreeMap<String, Result<Arc<Adapter>, String>>,
    context_length: usize,
}

/// Everything handlers share.
struct Shared {
    config: ServeAssignment,
    model_name: String,
    metrics: Arc<Metrics>,
    api_keys: Vec<String>,
    traffic: Option<Arc<TrafficLog>>,
    /// This process's figures, reported under `agent`.
    live: LiveFigures,
    /// The deployment's prompt, rendered: put before each chat request's messages.
    prompt_messages: Vec<ChatMessage>,
    max_request_bytes: usize,
    created: u64,
    pod: String,
    counter: AtomicU64,
    loaded: OnceLock<Loaded>,
}

type AppState = Arc<Shared>;

/// How the server runs beyond its Assignment.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The address to listen on when neither `LLMOPS_LISTEN_HOST` nor `serving.host`
    /// names one.
    pub default_host: &'static str,
    /// Report live figures as progress (under `agent`).
    pub live_figures: bool,
}

impl Options {
    /// The local command: loopback only, nothing reported.
    pub const CLI: Self = Self { default_host: "127.0.0.1", live_figures: false };
    /// In a pod: every interface, figures reported to the gateway.
    pub const AGENT: Self = Self { default_host: "0.0.0.0", live_figures: true };
}

/// Runs the server of `assignment` until SIGTERM or Ctrl-C, as the local command does.
pub fn run(assignment: &Assignment) -> Result<()> {
    run_with(assignment, Options::CLI)
}

/// Runs the server of `assignment` until SIGTERM or Ctrl-C.
pub fn run_with(assignment: &Assignment, options: Options) -> Result<()> {
    let Some(Mode::Serve(config)) = assignment.mode.clone() else { bail!("not a serve assignment") };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(assignment.clone(), config, options))
}

/// The host to listen on: `LLMOPS_LISTEN_HOST` (a development node gives each pod its
/// own loopback address), else `serving.host`, else `default`.
fn listen_host(configured: &str, default: &str) -> String {
    std::env::var("LLMOPS_LISTEN_HOST")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| Some(configured.trim().to_string()).filter(|h| !h.is_empty()))
        .unwrap_or_else(|| default.to_string())
}

/// `host:port`, with an IPv6 address in brackets.
fn socket_address(host: &str, port: u32) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// This pod's name: `LLMOPS_POD` (set for the agent), `POD_NAME`, else `HOSTNAME`.
fn pod_name() -> String {
    ["LLMOPS_POD", "POD_NAME", "HOSTNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        .unwrap_or_else(|| "local".to_string())
}

fn read_api_keys(path: &str, assignment: &Assignment) -> Result<Vec<String>> {
    api_keys_at(&local_path(path, assignment.store.as_ref())?)
}

/// The keys of a file (one per line; blank lines and `#` comments skipped), or of every
/// regular file in a directory, in name order: a projected Secret volume holds one key
/// per file. Hidden entries (the volume's `..data` links) are skipped; links to files
/// are followed.
fn api_keys_at(path: &Path) -> Result<Vec<String>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading API keys from {}", path.display()))?;
    let files = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading API keys from {}", path.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut keys = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading API keys from {}", file.display()))?;
        keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
    }
    if keys.is_empty() {
        bail!("{} holds no API keys; give one key per line, or no key file for an open API", path.display());
    }
    Ok(keys)
}

/// The traffic log: appended to in a volume store, or written in sealed segments under
/// local scratch (`LLMOPS_SCRATCH`, else the temporary directory) and uploaded when the
/// store is an S3 bucket.
fn open_traffic(traffic: &Traffic, assignment: &Assignment, pod: &str) -> Result<TrafficLog> {
    let redact = match &traffic.redact {
        Some(r) => {
            let custom: Vec<(String, String)> = r.custom.iter().map(|c| (c.name.clone(), c.pattern.clone())).collect();
            Some(Redact::new(&r.kinds, &custom).context("traffic.redact")?)
        }
        None => None,
    };
    let log = open_traffic_log(traffic, assignment, pod)?;
    Ok(log.with_retention(traffic.retention_days).with_redaction(redact))
}

fn open_traffic_log(traffic: &Traffic, assignment: &Assignment, pod: &str) -> Result<TrafficLog> {
    if let (Some(key), Some(Backend::S3(s3))) =
        (traffic.uri.strip_prefix("store://"), assignment.store.as_ref().and_then(|s| s.backend.as_ref()))
    {
        if key.split('/').any(|part| part == "..") {
            bail!("{}: a store key must not contain '..'", traffic.uri);
        }
        let bucket = crate::staging::Bucket::new(s3)?;
        let local = std::env::var_os("LLMOPS_SCRATCH")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("llmops-traffic-{pod}"));
        let policy = SegmentPolicy::from_env();
        tracing::info!(
            bucket = %s3.bucket, key = %key, records = policy.max_records, seconds = policy.max_age.as_secs_f64(),
            "the traffic log goes to the store in sealed segments"
        );
        return TrafficLog::open_segmented(&local, pod, traffic.record, bucket, key, policy);
    }
    TrafficLog::open(&local_path(&traffic.uri, assignment.store.as_ref())?, pod, traffic.record)
}

/// The deployment's prompt as it serves: its system messages, rendered with the declared
/// defaults by the shared renderer (a `template` prompt is one system message). Its
/// other messages format samples for evaluations.
fn prompt_messages(config: &ServeAssignment) -> Result<Vec<ChatMessage>> {
    let Some(prompt) = &config.prompt else { return Ok(Vec::new()) };
    let spec = crate::eval::samples::prompt_spec(prompt)?;
    spec.served_messages().with_context(|| {
        format!("prompt {}: a served prompt needs a default for every variable its system messages use", prompt.name)
    })
}

async fn serve(assignment: Assignment, config: ServeAssignment, options: Options) -> Result<()> {
    let serving = config.serving.clone().unwrap_or_default();
    let max_batch = (serving.max_batch_size as usize).max(1);
    // A deployment's pods label every series with its name and revision (the namespace
    // is the scrape target's own label).
    let labels: Vec<(String, String)> = match assignment.workload.as_ref().filter(|w| w.kind == "ModelDeployment") {
        Some(w) => vec![("deployment".into(), w.name.clone()), ("revision".into(), config.revision.clone())],
        None => Vec::new(),
    };
    let metrics = Arc::new(Metrics::with_labels(max_batch, &labels));
    let api_keys =
        if config.api_keys_file.is_empty() { Vec::new() } else { read_api_keys(&config.api_keys_file, &assignment)? };
    let traffic = match config.traffic.as_ref().filter(|t| !t.uri.is_empty()) {
        Some(t) => Some(Arc::new(open_traffic(t, &assignment, &pod_name())?)),
        None => None,
    };
    let prompt_messages = prompt_messages(&config)?;
    let model_name = if config.model_name.is_empty() { "model".to_string() } else { config.model_name.clone() };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let state: AppState = Arc::new(Shared {
        config: config.clone(),
        model_name,
        metrics: metrics.clone(),
        api_keys,
        traffic,
        live: LiveFigures::default(),
        prompt_messages,
        max_request_bytes: if serving.max_request_bytes == 0 { 1 << 20 } else { serving.max_request_bytes as usize },
        created,
        pod: pod_name(),
        counter: AtomicU64::new(0),
        loaded: OnceLock::new(),
    });
    let address = socket_address(&listen_host(&serving.host, options.default_host), serving.port);
    let listener = tokio::net::TcpListener::bind(&address).await.with_context(|| format!("listening on {address}"))?;
    tracing::info!(address = %listener.local_addr()?, "listening; loading the model");
    let mut background = Vec::new();
    if options.live_figures {
        background.push(tokio::spawn(report_figures(state.clone())));
    }
    if let Some(log) = state.traffic.clone()
        && let Some(policy) = log.segment_policy()
    {
        background.push(tokio::spawn(upload_segments(log, policy)));
    }
    if let Some(log) = state.traffic.clone() {
        background.push(tokio::spawn(keep_traffic(log)));
    }

    let (fail_tx, mut fail_rx) = mpsc::channel::<anyhow::Error>(1);
    {
        let state = state.clone();
        let assignment = assignment.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            match load(&assignment, &state.config, max_batch, state.metrics.clone()) {
                Ok(loaded) => {
                    tracing::info!(
                        seconds = started.elapsed().as_secs_f64(),
                        model = %state.model_name,
                        adapters = loaded.adapters.len(),
                        "model loaded; ready"
                    );
                    let _ = state.loaded.set(loaded);
                }
                Err(e) => {
                    let _ = fail_tx.blocking_send(e);
                }
            }
        });
    }
    let failure: Arc<std::sync::Mutex<Option<anyhow::Error>>> = Arc::default();
    let failure_slot = failure.clone();
    let shutdown = async move {
        tokio::select! {
            Some(e) = fail_rx.recv() => { *failure_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e); }
            _ = shutdown_signal() => { tracing::info!("shutting down"); }
        }
    };
    let served = axum::serve(listener, router(state.clone())).with_graceful_shutdown(shutdown).await;
    for task in background {
        task.abort();
    }
    // What was recorded up to the end goes to the store, even when serving failed.
    if let Some(log) = state.traffic.as_ref().filter(|l| l.is_segmented()) {
        match tokio::time::timeout(Duration::from_secs(20), log.close()).await {
            Ok(Ok(n)) => tracing::info!(segments = n, "sealed and uploaded the traffic log"),
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "uploading the traffic log failed"),
            Err(_) => tracing::error!("uploading the traffic log took too long; the rest stays in local scratch"),
        }
    }
    served.context("serving")?;
    if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e.context("loading the model"));
    }
    Ok(())
}

/// Every report interval, sends the live figures as progress when one changed beyond its
/// rounding (see `live`).
async fn report_figures(state: AppState) {
    let every = live::report_interval();
    let figures = |state: &Shared| state.live.snapshot(Instant::now(), state.metrics.queue_depth.get());
    let mut reporter = Reporter::starting_at(figures(&state));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(metrics) = reporter.next(figures(&state)) else { continue };
        let get = |k: &str| metrics.get(k).copied().unwrap_or(0.0);
        let message = format!(
            "{} req/s, {} tok/s, {} requests",
            get("requests_per_second"),
            get("tokens_per_second"),
            get("requests_total")
        );
        crate::report::emit(crate::report::Report::Progress {
            step: get("requests_total") as u64,
            total: 0,
            epoch: 0.0,
            metrics,
            eta_seconds: 0.0,
            message,
        });
    }
}

/// Seals segments that grew old and uploads the sealed ones, checking a few times per
/// segment age (at most every second); a store that fails is retried after 30 s while
/// the segments wait in local scratch.
async fn upload_segments(log: Arc<TrafficLog>, policy: SegmentPolicy) {
    let every = (policy.max_age / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut retry_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        log.tick();
        if retry_at.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        retry_at = match log.upload_sealed().await {
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "uploading traffic segments failed; retrying in 30 s");
                Some(Instant::now() + Duration::from_secs(30))
            }
        };
    }
}

/// How often expired traffic records are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Reads the traffic logs into the feedback index once, then deletes expired records
/// at start and every hour (when the log has a retention).
async fn keep_traffic(log: Arc<TrafficLog>) {
    if let Err(e) = log.refresh_index().await {
        tracing::warn!(error = %format!("{e:#}"), "reading the traffic log for the feedback index failed");
    }
    if log.retention().is_none() {
        return;
    }
    let mut ticks = tokio::time::interval(PRUNE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match log.prune(jiff::Timestamp::now()).await {
            Ok(p) if p == traffic::Pruned::default() => {}
            Ok(p) => tracing::info!(
                records = p.records,
                files = p.files,
                segments = p.segments,
                "deleted traffic records older than the retention"
            ),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "deleting expired traffic records failed"),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            return;
        }
    }
    let _ = ctrl_c.await;
}

fn load(assignment: &Assignment, config: &ServeAssignment, max_batch: usize, metrics: Arc<Metrics>) -> Result<Loaded> {
    let weights = config.model.as_ref().and_then(|m| m.weights.as_ref()).context("the assignment names no model")?;
    let path = local_path(&weights.uri, assignment.store.as_ref())?;
    let device = engine::device();
    let format = if device.is_cpu() && path.is_file() { WeightFormat::Hybrid } else { WeightFormat::AsStored };
    // The digest adapters are checked against.
    let (model, base_sha256) = engine::load_verified(&path, &weights.sha256, &device, format)?;
    let mut adapters = BTreeMap::new();
    for served in &config.adapters {
        let uri = served.adapter.as_ref().map(|a| a.uri.as_str()).unwrap_or_default();
        let dir: PathBuf = local_path(uri, assignment.store.as_ref())?;
        let adapter = Adapter::load(&dir, &model.model, base_sha256.as_deref()).map_err(|e| format!("{e:#}"));
        if let Err(why) = &adapter {
            tracing::error!(adapter = %served.name, error = %why, "adapter refused; requests for it will fail");
        }
        adapters.insert(served.name.clone(), adapter.map(Arc::new));
    }
    let native = model.model.config().context_length;
    let wanted = config.serving.as_ref().map(|s| s.context_length as usize).unwrap_or(0);
    if wanted > native {
        bail!("serving.contextLength {wanted} is longer than the model's context of {native} tokens");
    }
    let context_length = if wanted == 0 { native } else { wanted };
    let max_queue = config.serving.as_ref().map(|s| s.max_queue as usize).unwrap_or(64);
    let model = Arc::new(model);
    let batcher = Batcher::start(model.clone(), max_batch, max_queue, metrics);
    Ok(Loaded { model, batcher, adapters, context_length })
}

fn router(state: AppState) -> Router {
    let limit = state.max_request_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route_layer(middleware::from_fn_with_state(state.clone(), json_bodies))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(|request: Request| async move { ApiError::not_found(request.uri().path()) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Constant-time comparison, so response times do not reveal how much of a key matched.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(request).await;
    }
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| bearer_token(v.as_bytes()));
    match given {
        Some(key) if state.api_keys.iter().any(|k| same_key(k, key)) => next.run(request).await,
        _ => {
            let err = ApiError::invalid_api_key();
            count_error(&state, request.uri().path(), &err);
            err.into_response()
        }
    }
}

/// The key of an `Authorization: Bearer KEY` header (the scheme in any case, RFC 9110);
/// None for any other or malformed value.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// Whether a `Content-Type` names JSON: `application/json` or a `+json` type, with any
/// parameters. A request without the header is read as JSON too.
fn is_json_content_type(value: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Refuses a POST whose body is declared as something other than JSON.
async fn json_bodies(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST
        && let Some(kind) = request.headers().get(header::CONTENT_TYPE)
        && !is_json_content_type(kind.as_bytes())
    {
        let err = ApiError::unsupported_media_type(&String::from_utf8_lossy(kind.as_bytes()));
        count_error(&state, request.uri().path(), &err);
        return err.into_response();
    }
    next.run(request).await
}

fn count_error(state: &Shared, endpoint: &str, err: &ApiError) {
    state.metrics.errors.get_or_create(&vec![("endpoint", endpoint.to_string()), ("type", err.code.to_string())]).inc();
}

async fn ready(State(state): State<AppState>) -> Response {
    match state.loaded.get() {
        Some(_) => (StatusCode::OK, "ready").into_response(),
        None => ApiError::not_ready().into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
        .into_response()
}

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let loaded = state.loaded.get().ok_or_else(ApiError::not_ready)?;
    let mut data =
        vec![json!({"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llmops"})];
    for (name, adapter) in &loaded.adapters {
        if adapter.is_ok() {
            data.push(json!({
                "id": name, "object": "model", "created": state.created, "owned_by": "llmops", "parent": state.model_name
            }));
        }
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// Parses a JSON body, naming the field at fault.
fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::request_too_large(limit)
        } else {
            ApiError::invalid_json(rejection.body_text())
        }
    })?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid_json(format!("the request body is not valid JSON: {inner}"));
        }
        if path == "."
            && let Some(err) = shared_field_error(&body)
        {
            return err;
        }
        let mut err = ApiError::invalid_json(format!("the request body is not a valid request: {inner}"));
        if path != "." {
            err.param = Some(path);
        }
        err
    })
}

/// The fields both completion endpoints share are flattened into each request, which
/// hides the path of an error in them; reading them alone names the field.
fn shared_field_error(body: &[u8]) -> Option<ApiError> {
    let value: Value = serde_json::from_slice(body).ok()?;
    if !value.is_object() || value.get("model").is_none() {
        return None;
    }
    let e = serde_path_to_error::deserialize::<_, Common>(value).err()?;
    let path = e.path().to_string();
    let mut err = ApiError::invalid_json(format!("the request body is not a valid request: {}", e.into_inner()));
    err.param = Some(path).filter(|p| p != ".");
    Some(err)
}

/// A fresh response id.
fn response_id(state: &Shared, prefix: &str) -> String {
    let n = state.counter.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let digest = Sha256::digest(format!("{}/{}/{n}/{nanos}", state.pod, std::process::id()));
    format!("{prefix}-{}", &hex::encode(digest)[..24])
}

/// What a request resolved to, ready for the engine.
struct Prepared {
    id: String,
    model: String,
    adapter: Option<Arc<Adapter>>,
    request: GenerateRequest,
    stream: bool,
    include_usage: bool,
    /// For the traffic log.
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<String>,
    user: Option<String>,
}

fn resolve_model(state: &Shared, loaded: &Loaded, name: &str) -> Result<Option<Arc<Adapter>>, ApiError> {
    if name == state.model_name {
        return Ok(None);
    }
    match loaded.adapters.get(name) {
        Some(Ok(a)) => Ok(Some(a.clone())),
        Some(Err(why)) => Err(ApiError::adapter_base_mismatch(name, why)),
        None => {
            let mut served = vec![state.model_name.clone()];
            served.extend(loaded.adapters.iter().filter(|(_, a)| a.is_ok()).map(|(n, _)| n.clone()));
            Err(ApiError::model_not_found(name, &served))
        }
    }
}

fn generate_request(
    state: &Shared,
    loaded: &Loaded,
    common: &Common,
    max_tokens: Option<i64>,
    prompt: Vec<u32>,
    default_max: Option<usize>,
    prompt_param: &str,
) -> Result<GenerateRequest, ApiError> {
    let defaults: Option<&GenerationParameters> = state.config.prompt.as_ref().and_then(|p| p.parameters.as_ref());
    let n = state.counter.load(Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let random_seed = (u64::from(nanos) << 20) ^ n;
    let settings = api::settings(common, max_tokens, defaults, random_seed)?;
    if prompt.is_empty() {
        return Err(ApiError::invalid_parameter(prompt_param, "the prompt is empty"));
    }
    if prompt.len() >= loaded.context_length {
        return Err(ApiError::context_length_exceeded(prompt_param, prompt.len(), loaded.context_length));
    }
    let room = loaded.context_length - prompt.len();
    // A limit the request asks for must fit; the deployment's default and the endpoint's
    // own are shortened to what the context leaves.
    if let Some(asked) = max_tokens.or(common.max_tokens)
        && usize::try_from(asked).map_or(true, |asked| asked > room)
    {
        return Err(ApiError::max_tokens_beyond_context(prompt.len(), asked, loaded.context_length));
    }
    let max_tokens = settings.max_tokens.or(default_max).unwrap_or(room).min(room);
    Ok(GenerateRequest { prompt, max_tokens, sampling: settings.sampling, stop: settings.stop })
}

fn prepare_chat(state: &Shared, loaded: &Loaded, req: ChatRequest) -> Result<Prepared, ApiError> {
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid_parameter("logprobs", "logprobs are not supported"));
    }
    if req.top_logprobs.is_some_and(|n| n != 0) {
        return Err(ApiError::invalid_parameter("top_logprobs", "logprobs are not supported"));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid_parameter("tools", "tool calling is not supported"));
    }
    if let Some(format) = &req.response_format
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::invalid_parameter(
            "response_format",
            "only response_format {\"type\": \"text\"} is supported; structured output is not",
        ));
    }
    let adapter = resolve_model(state, loaded, &req.common.model)?;
    let asked = api::chat_messages(&req.messages)?;
    let has_system = asked.iter().any(|m| m.role == "system");
    let mut messages: Vec<ChatMessage> =
        state.prompt_messages.iter().filter(|m| !(has_system && m.role == "system")).cloned().collect();
    let kept_prompt = messages.len();
    messages.extend(asked);
    // Message contents are text: control-token text in them never becomes a control token.
    let prompt = prompt::encode_chat(&loaded.model, &messages).map_err(|e| match e {
        PromptError::Template(e) => ApiError::invalid_parameter("messages", format!("{e:#}")),
        PromptError::ControlText { index, .. } => {
            let message = e.to_string();
            match index.checked_sub(kept_prompt) {
                Some(i) => ApiError::invalid_parameter(&format!("messages[{i}].content"), message),
                None => ApiError::internal(format!("the deployment's prompt: {message}")),
            }
        }
        PromptError::Tokenizer(e) => ApiError::internal(format!("{e:#}")),
    })?;
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let request = generate_request(state, loaded, &req.common, max_tokens, prompt.ids, None, "messages")?;
    Ok(Prepared {
        id: response_id(state, "chatcmpl"),
        model: req.common.model.clone(),
        adapter,
        request,
        stream: req.common.stream,
        include_usage: req.common.stream_options.as_ref().is_some_and(|o| o.include_usage),
        messages: Some(messages),
        prompt: None,
        user: req.common.user.clone(),
    })
}

fn prepare_completion(state: &Shared, loaded: &Loaded, req: CompletionRequest) -> Result<Prepared, ApiError> {
    if req.echo == Some(true) {
        return Err(ApiError::invalid_parameter("echo", "echo is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_parameter("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    if req.logprobs.is_some() {
        return Err(ApiError::invalid_parameter("logprobs", "logprobs are not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid_parameter("best_of", "best_of must be 1"));
    }
    let adapter = resolve_model(state, loaded, &req.common.model)?;
    let tokenizer = &loaded.model.tokenizer;
    let batch_error =
        || ApiError::invalid_parameter("prompt", "send one prompt per request; batches of prompts are not supported");
    // A batch of one prompt is that prompt.
    let single = match req.prompt {
        PromptIn::Texts(mut v) if v.len() == 1 => PromptIn::Text(v.remove(0)),
        PromptIn::TokenLists(mut v) if v.len() == 1 => PromptIn::Tokens(v.remove(0)),
        other => other,
    };
    let (text, prompt) = match single {
        PromptIn::Text(t) => {
            let ids = tokenizer.encode_prompt(&t).map_err(|e| ApiError::internal(format!("{e:#}")))?;
            (t, ids)
        }
        PromptIn::Tokens(ids) => {
            let vocab = loaded.model.model.config().vocab_size as u32;
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(ApiError::invalid_parameter(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            (tokenizer.decode(&ids, false).unwrap_or_default(), ids)
        }
        PromptIn::Texts(_) | PromptIn::TokenLists(_) => return Err(batch_error()),
    };
    // OpenAI's completions endpoint generates 16 tokens unless told otherwise.
    let request = generate_request(state, loaded, &req.common, None, prompt, Some(16), "prompt")?;
    Ok(Prepared {
        id: response_id(state, "cmpl"),
        model: req.common.model.clone(),
        adapter,
        request,
        stream: req.common.stream,
        include_usage: req.common.stream_options.as_ref().is_some_and(|o| o.include_usage),
        messages: None,
        prompt: Some(text),
        user: req.common.user.clone(),
    })
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

async fn chat(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let loaded = state.loaded.get().ok_or_else(ApiError::not_ready)?;
        let req: ChatRequest = parse(body, state.max_request_bytes)?;
        let prepared = prepare_chat(&state, loaded, req)?;
        respond(state.clone(), loaded, prepared, Kind::Chat).await
    }
    .await;
    if result.is_err() {
        state.live.errored(Instant::now());
    }
    finish_response(&state, Kind::Chat.path(), result)
}

async fn completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let loaded = state.loaded.get().ok_or_else(ApiError::not_ready)?;
        let req: CompletionRequest = parse(body, state.max_request_bytes)?;
        let prepared = prepare_completion(&state, loaded, req)?;
        respond(state.clone(), loaded, prepared, Kind::Completion).await
    }
    .await;
    if result.is_err() {
        state.live.errored(Instant::now());
    }
    finish_response(&state, Kind::Completion.path(), result)
}

/// The response, or the error's: counted by endpoint and type, and logged when it is the
/// server's fault.
fn finish_response(state: &Shared, endpoint: &str, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(r) => r,
        Err(e) => {
            count_error(state, endpoint, &e);
            if e.status.is_server_error() {
                tracing::error!(code = e.code, message = %e.message, "request failed");
            }
            e.into_response()
        }
    }
}

/// Queues the request, then answers with the whole result or a stream of chunks. Each
/// request that finishes is one sample of the live figures (one that fails before it
/// streams is counted by its handler).
async fn respond(state: AppState, loaded: &Loaded, prepared: Prepared, kind: Kind) -> Result<Response, ApiError> {
    let started = Instant::now();
    state
        .metrics
        .requests
        .get_or_create(&vec![("endpoint", kind.path().to_string()), ("model", prepared.model.clone())])
        .inc();
    let (events, mut receiver) = mpsc::unbounded_channel();
    let job = Job {
        request: prepared.request.clone(),
        adapter: prepared.adapter.clone(),
        stream: prepared.stream,
        events,
        accepted: Instant::now(),
    };
    loaded.batcher.submit(job).map_err(|e| match e {
        SubmitError::Busy => ApiError::queue_full(),
        SubmitError::Stopped => ApiError::internal("the engine has stopped"),
    })?;
    if !prepared.stream {
        loop {
            match receiver.recv().await {
                Some(Event::Delta(_)) => continue,
                Some(Event::Done { generation, first_token, .. }) => {
                    state.live.completed(Instant::now(), generation.tokens.len(), first_token, started.elapsed());
                    record(&state, &prepared, &generation);
                    return Ok(Json(whole_response(&state, &prepared, &generation, kind)).into_response());
                }
                Some(Event::Failed(e)) => return Err(ApiError::internal(format!("generation failed: {e}"))),
                None => return Err(ApiError::internal("the engine dropped the request")),
            }
        }
    }
    // Chunks go through a second channel whose receiver is the response body: when the
    // client disconnects the body is dropped, the forwarding task ends, and with it the
    // engine's event receiver, which frees the request's batch slot.
    let (chunks, body) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |value: Value| {
            let chunks = chunks.clone();
            async move { chunks.send(Ok(SseEvent::default().data(value.to_string()))).await.is_ok() }
        };
        if kind == Kind::Chat
            && !send(chunk(&state, &prepared, kind, json!({"role": "assistant", "content": ""}), None)).await
        {
            return;
        }
        loop {
            match receiver.recv().await {
                Some(Event::Delta(text)) => {
                    if text.is_empty() {
                        continue;
                    }
                    if !send(chunk(&state, &prepared, kind, json!({"content": text}), None)).await {
                        return;
                    }
                }
                Some(Event::Done { generation, rest, first_token }) => {
                    state.live.completed(Instant::now(), generation.tokens.len(), first_token, started.elapsed());
                    record(&state, &prepared, &generation);
                    if !rest.is_empty() && !send(chunk(&state, &prepared, kind, json!({"content": rest}), None)).await {
                        return;
                    }
                    let finish = generation.finish_reason.as_str();
                    let empty = if kind == Kind::Chat { json!({}) } else { json!({"content": ""}) };
                    if !send(chunk(&state, &prepared, kind, empty, Some(finish))).await {
                        return;
                    }
                    if prepared.include_usage {
                        let usage = Usage::new(generation.prompt_tokens, generation.tokens.len());
                        let mut last = chunk(&state, &prepared, kind, json!({}), None);
                        last["choices"] = json!([]);
                        last["usage"] = json!(usage);
                        if !send(last).await {
                            return;
                        }
                    }
                    let _ = chunks.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    return;
                }
                Some(Event::Failed(e)) => {
                    state.live.errored(Instant::now());
                    let err = ApiError::internal(format!("generation failed: {e}"));
                    count_error(&state, kind.path(), &err);
                    let _ = chunks.send(Ok(SseEvent::default().data(err.body().to_string()))).await;
                    return;
                }
                None => return,
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(body)).into_response())
}

fn whole_response(state: &Shared, p: &Prepared, g: &Generation, kind: Kind) -> Value {
    let usage = Usage::new(g.prompt_tokens, g.tokens.len());
    let finish = g.finish_reason.as_str();
    match kind {
        Kind::Chat => json!({
            "id": p.id, "object": "chat.completion", "created": now_secs(), "model": p.model,
            "system_fingerprint": state.config.revision,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }),
        Kind::Completion => json!({
            "id": p.id, "object": "text_completion", "created": now_secs(), "model": p.model,
            "system_fingerprint": state.config.revision,
            "choices": [{"index": 0, "text": g.text, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }),
    }
}

/// One streamed chunk; `delta` is the chat delta (for completions its `content` is the text).
fn chunk(state: &Shared, p: &Prepared, kind: Kind, delta: Value, finish: Option<&str>) -> Value {
    match kind {
        Kind::Chat => json!({
            "id": p.id, "object": "chat.completion.chunk", "created": now_secs(), "model": p.model,
            "system_fingerprint": state.config.revision,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        }),
        Kind::Completion => json!({
            "id": p.id, "object": "text_completion", "created": now_secs(), "model": p.model,
            "system_fingerprint": state.config.revision,
            "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "logprobs": null, "finish_reason": finish}],
        }),
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Notes a finished completion in the traffic log; a log that cannot be written is
/// reported but does not fail the user's request.
fn record(state: &Shared, p: &Prepared, g: &Generation) {
    let Some(log) = &state.traffic else { return };
    let record = CompletionRecord {
        id: p.id.clone(),
        time: traffic::now(),
        revision: state.config.revision.clone(),
        model: p.model.clone(),
        messages: p.messages.clone(),
        prompt: p.prompt.clone(),
        output: g.text.clone(),
        finish_reason: g.finish_reason.as_str().to_string(),
        prompt_tokens: g.prompt_tokens,
        completion_tokens: g.tokens.len(),
        user: p.user.clone(),
    };
    if let Err(e) = log.completion(record) {
        tracing::error!(error = %format!("{e:#}"), "writing the traffic log failed");
    }
}

async fn feedback(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let req: FeedbackRequest = parse(body, state.max_request_bytes)?;
        if !(1..=5).contains(&req.rating) {
            return Err(ApiError::invalid_parameter("rating", format!("rating must be 1 to 5, got {}", req.rating)));
        }
        let Some(log) = &state.traffic else {
            return Err(ApiError::invalid_parameter(
                "id",
                "this server keeps no traffic log, so it cannot record feedback (start it with --traffic DIR)",
            ));
        };
        if req.id.len() > 256 {
            return Err(ApiError::unknown_completion(&req.id.chars().take(64).collect::<String>()));
        }
        let known =
            log.knows(&req.id).await.map_err(|e| ApiError::internal(format!("reading the traffic log: {e:#}")))?;
        if !known {
            return Err(ApiError::unknown_completion(&req.id));
        }
        let record = FeedbackRecord {
            id: req.id.clone(),
            time: traffic::now(),
            rating: req.rating as u8,
            correction: req.correction,
            comment: req.comment,
        };
        log.feedback(record).map_err(|e| ApiError::internal(format!("writing the traffic log: {e:#}")))?;
        state.metrics.feedback.get_or_create(&vec![("rating", req.rating.to_string())]).inc();
        state.metrics.feedback_score.inc_by(u64::try_from(req.rating).unwrap_or(0));
        state.live.feedback(req.rating as u8);
        Ok(Json(json!({"id": req.id, "object": "feedback", "recorded": true})).into_response())
    }
    .await;
    finish_response(&state, "/v1/feedback", result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_come_from_a_file_or_every_file_of_a_directory() {
        let dir = std::env::temp_dir().join(format!("llmops-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A projected Secret volume: each key a link into a hidden, timestamped directory.
        let data = dir.join("..2026_01_01_00_00_00.000000001");
        std::fs::create_dir_all(&data).expect("creates");
        std::fs::write(data.join("tenant"), "sk-tenant\n").expect("writes");
        std::fs::write(data.join("operator"), "# managed by llmops\n\nsk-operator-1\nsk-operator-2\n").expect("writes");
        std::fs::write(data.join("empty"), "\n").expect("writes");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("..2026_01_01_00_00_00.000000001", dir.join("..data")).expect("links");
            for name in ["tenant", "operator", "empty"] {
                std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("links");
            }
        }
        #[cfg(not(unix))]
        for name in ["tenant", "operator", "empty"] {
            std::fs::copy(data.join(name), dir.join(name)).expect("copies");
        }
        std::fs::create_dir_all(dir.join("nested")).expect("creates");
        std::fs::write(dir.join("nested/ignored"), "sk-nested\n").expect("writes");
        let keys = api_keys_at(&dir).expect("reads the directory");
        assert_eq!(keys, vec!["sk-operator-1", "sk-operator-2", "sk-tenant"], "files in name order, hidden skipped");
        assert_eq!(api_keys_at(&data.join("tenant")).expect("reads a file"), vec!["sk-tenant"]);
        assert!(api_keys_at(&data.join("empty")).is_err(), "a file without keys is refused");
        let bare = dir.join("nested");
        std::fs::remove_file(bare.join("ignored")).expect("removes");
        assert!(api_keys_at(&bare).is_err(), "a directory without keys is refused");
        std::fs::remove_dir_all(&dir).expect("cleans up");
    }

    fn parsed<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
        parse(Ok(Bytes::copy_from_slice(body)), 1 << 20)
    }

    #[test]
    fn a_bad_body_is_a_400_naming_the_field_even_in_shared_fields() {
        let err =
            parsed::<ChatRequest>(br#"{"model": "m", "messages": [], "max_tokens": 1e300}"#).expect_err("refused");
        assert_eq!((err.code, err.param.as_deref()), ("invalid_json", Some("max_tokens")));
        let err = parsed::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "stop": 3}"#).expect_err("refused");
        assert_eq!(err.param.as_deref(), Some("stop"));
        let err = parsed::<ChatRequest>(br#"{"model": "m", "messages": [{"role": 1}]}"#).expect_err("refused");
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err = parsed::<ChatRequest>(br#"{"model": "m", "messages": ["#).expect_err("refused");
        assert_eq!((err.code, err.param), ("invalid_json", None));
        // Nothing a body holds makes the parser panic.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let bodies: Vec<&[u8]> = vec![
            b"",
            b"null",
            b"\xff\xfe{",
            b"{\"model\": \"\\ud800\"}",
            br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}"#,
            br#"{"model": "m", "prompt": [[1, 2], [3]], "seed": -9223372036854775808}"#,
            br#"{"model": "m", "prompt": [4294967296]}"#,
            deep.as_bytes(),
        ];
        for body in bodies {
            let _ = parsed::<ChatRequest>(body);
            let _ = parsed::<CompletionRequest>(body);
            let _ = parsed::<FeedbackRequest>(body);
        }
    }

    #[test]
    fn authorization_and_content_type_headers_are_read_strictly() {
        assert_eq!(bearer_token(b"Bearer sk-1"), Some("sk-1"));
        assert_eq!(bearer_token(b"bearer   sk-1 "), Some("sk-1"));
        for bad in [&b""[..], b"Bearer", b"Bearer ", b"Basic c2stMQ==", b"sk-1", b"Bearer\xff\xfe", b"\xffBearer x"] {
            assert_eq!(bearer_token(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        for json in [
            &b"application/json"[..],
            b"application/json; charset=utf-8",
            b"Application/JSON",
            b"application/merge-patch+json",
        ] {
            assert!(is_json_content_type(json), "{:?}", String::from_utf8_lossy(json));
        }
        for other in
            [&b"application/x-www-form-urlencoded"[..], b"text/plain", b"multipart/form-data; boundary=x", b"", b"\xff"]
        {
            assert!(!is_json_content_type(other), "{:?}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn the_listening_host_falls_back_from_the_environment_to_the_assignment_to_the_default() {
        // LLMOPS_LISTEN_HOST is not set in the test environment.
        if std::env::var_os("LLMOPS_LISTEN_HOST").is_none() {
            assert_eq!(listen_host("", Options::AGENT.default_host), "0.0.0.0");
            assert_eq!(listen_host(" ", Options::CLI.default_host), "127.0.0.1");
            assert_eq!(listen_host("10.0.0.7", Options::AGENT.default_host), "10.0.0.7");
        }
        assert_eq!(socket_address("127.0.0.3", 8000), "127.0.0.3:8000");
        assert_eq!(socket_address("::1", 8000), "[::1]:8000");
    }
}
