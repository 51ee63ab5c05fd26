//! `llmops-worker agent`: the worker inside a pod. It reads who it works for from its
//! environment, fetches its Assignment from the operator's gateway (or reads it from
//! `LLMOPS_ASSIGNMENT_FILE`, a mounted ConfigMap, so that serving pods start and restart
//! without the operator), runs the mode, and keeps one session open to the gateway:
//! events up (phase, progress, checkpoints, the final result or failure), commands down
//! (cancel, checkpoint now). A lost connection is re-established with backoff and every
//! event not yet acknowledged is sent again, so the final result is never lost; the
//! agent exits only once the gateway has recorded it (or after a grace period, when the
//! gateway stays away). Nothing a mode does waits for the gateway: events queue while it
//! is away.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use llmops_proto::v1::worker_gateway_client::WorkerGatewayClient;
use llmops_proto::v1::{
    self, Assignment, FetchRequest, GatewayCommand, WorkerEvent, Workload, assignment::Mode, gateway_command::Command,
    worker_event::Event,
};
use llmops_proto::{Validate, validate::describe};
use serde_json::Value;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::report::{self, Interrupted, Report, Sink};
use crate::store::{file_sha256, local_path};

/// How long the agent keeps trying to fetch its Assignment.
const FETCH_PATIENCE: Duration = Duration::from_secs(300);
/// How long the agent keeps trying to deliver its final event once the mode ended.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(600);
/// How long a stopped server waits for its last event to be acknowledged: for serving,
/// the gateway is for reporting only, so a pod being stopped does not linger for it.
const SERVE_DELIVERY_PATIENCE: Duration = Duration::from_secs(10);
/// Progress events kept while the gateway is away (older ones are dropped: the status
/// only shows the newest).
const MAX_PENDING_PROGRESS: usize = 32;

/// Who the agent works for, from the pod's environment.
#[derive(Debug, Clone)]
pub struct AgentEnv {
    /// The gateway's URL (https://host:port with a CA, else http://host:port).
    pub gateway: String,
    /// PEM of the CA the gateway's certificate must chain to (`LLMOPS_GATEWAY_CA`); with
    /// it the agent speaks TLS and verifies the gateway's name, without it plaintext.
    pub gateway_ca: Option<String>,
    /// The workload.
    pub workload: Workload,
    /// The bearer token.
    pub token: String,
    /// This pod's name.
    pub pod: String,
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).with_context(|| format!("{name} is not set"))
}

impl AgentEnv {
    /// Reads `LLMOPS_GATEWAY`, `LLMOPS_WORKLOAD` (namespace/Kind/name/uid),
    /// `LLMOPS_TOKEN_FILE` and `LLMOPS_POD` (or `HOSTNAME`).
    pub fn from_env() -> Result<Self> {
        let gateway = env("LLMOPS_GATEWAY")?;
        let gateway_ca = env("LLMOPS_GATEWAY_CA").ok();
        let gateway = gateway_url(&gateway, gateway_ca.is_some());
        let workload = parse_workload(&env("LLMOPS_WORKLOAD")?)?;
        let token_file = PathBuf::from(env("LLMOPS_TOKEN_FILE")?);
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading the workload token from {}", token_file.display()))?
            .trim()
            .to_string();
        if token.is_empty() {
            bail!("{} is empty", token_file.display());
        }
        let pod = env("LLMOPS_POD").or_else(|_| env("HOSTNAME")).unwrap_or_else(|_| "local".into());
        Ok(Self { gateway, gateway_ca, workload, token, pod })
    }
}

/// `namespace/Kind/name/uid`.
pub fn parse_workload(text: &str) -> Result<Workload> {
    let parts: Vec<&str> = text.trim().split('/').collect();
    match parts.as_slice() {
        [namespace, kind, name, uid] if parts.iter().all(|p| !p.is_empty()) => Ok(Workload {
            namespace: namespace.to_string(),
            kind: kind.to_string(),
            name: name.to_string(),
            uid: uid.to_string(),
        }),
        _ => bail!("LLMOPS_WORKLOAD {text:?} is not namespace/Kind/name/uid"),
    }
}

fn with_token<T>(message: T, token: &str) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().context("the token is not valid header text")?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn now() -> pbjson_types::Timestamp {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 }
}

/// Exponential backoff from 0.5 s up to 15 s, with jitter.
struct Backoff {
    attempt: u32,
    jitter: crate::engine::sampling::SplitMix64,
}

impl Backoff {
    fn new() -> Self {
        Self { attempt: 0, jitter: crate::engine::sampling::SplitMix64(u64::from(std::process::id())) }
    }

    fn next(&mut self) -> Duration {
        let base = Duration::from_millis(500).saturating_mul(1 << self.attempt.min(5)).min(Duration::from_secs(15));
        self.attempt += 1;
        base.mul_f64(0.75 + 0.5 * self.jitter.next_f64())
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The URL of the gateway at `address` (`host:port` or a URL): https when it is to be
/// verified against a CA (a plain http URL is upgraded, never sent in the clear), else
/// http.
fn gateway_url(address: &str, tls: bool) -> String {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    if tls {
        format!("https://{rest}")
    } else if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{rest}")
    }
}

fn channel(env: &AgentEnv) -> Result<Channel> {
    let url = &env.gateway;
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("LLMOPS_GATEWAY {url:?} is not a URL"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if let Some(ca) = &env.gateway_ca {
        let host = endpoint.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(host);
        endpoint = endpoint.tls_config(tls).context("LLMOPS_GATEWAY_CA: the gateway's TLS settings")?;
    }
    Ok(endpoint.connect_lazy())
}

/// Fetches the Assignment, retrying while the gateway is unreachable or not ready; a
/// refused token ends it at once.
async fn fetch(env: &AgentEnv) -> Result<Assignment> {
    let mut client = WorkerGatewayClient::new(channel(env)?);
    let started = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        let request = FetchRequest {
            workload: Some(env.workload.clone()),
            pod: env.pod.clone(),
            worker_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let status = match client.fetch(with_token(request, &env.token)?).await {
            Ok(response) => {
                return response.into_inner().assignment.context("the gateway sent no assignment");
            }
            Err(status) => status,
        };
        use tonic::Code;
        if matches!(
            status.code(),
            Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument | Code::NotFound
        ) {
            bail!("the gateway refused to hand out the assignment: {:?}: {}", status.code(), status.message());
        }
        if started.elapsed() > FETCH_PATIENCE {
            bail!(
                "could not fetch the assignment from {} within {FETCH_PATIENCE:?}: {}",
                env.gateway,
                status.message()
            );
        }
        let wait = backoff.next();
        tracing::warn!(code = ?status.code(), error = status.message(), retry_in_ms = wait.as_millis() as u64, "fetching the assignment");
        tokio::time::sleep(wait).await;
    }
}

/// Forwards reports of the running mode into the session (None marks the end).
struct Forward(mpsc::UnboundedSender<Option<Event>>);

impl Sink for Forward {
    fn send(&self, report: Report) {
        let event = match report {
            Report::Phase { phase, message } => Event::Phase(v1::PhaseChange { phase, message }),
            Report::Progress { step, total, epoch, metrics, eta_seconds, message } => Event::Progress(v1::Progress {
                step,
                total_steps: total,
                epoch,
                metrics: metrics.into_iter().collect(),
                eta_seconds,
                message,
            }),
            Report::Checkpoint { uri, step } => Event::Checkpoint(v1::CheckpointWritten { uri, step }),
        };
        let _ = self.0.send(Some(event));
    }
}

/// Numbers of a manifest worth showing, flattened to dotted names (at most 64).
fn figures(manifest: &Value) -> BTreeMap<String, f64> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, f64>, depth: usize) {
        if out.len() >= 64 || depth > 3 {
            return;
        }
        match v {
            Value::Number(n) => {
                if let Some(f) = n.as_f64() {
                    out.insert(prefix.to_string(), f);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    if k == "spec" || k == "files" || k == "inputs" {
                        continue;
                    }
                    let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&name, v, out, depth + 1);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk("", manifest, &mut out, 0);
    out
}

/// The output directory of an assignment.
fn output_uri(assignment: &Assignment) -> Option<String> {
    let output = match assignment.mode.as_ref()? {
        Mode::Prepare(p) => p.output.as_ref(),
        Mode::Finetune(f) => f.output.as_ref(),
        Mode::Eval(e) => e.output.as_ref(),
        Mode::Serve(_) | Mode::Resolve(_) => None,
    };
    output.map(|o| o.uri.clone())
}

/// The Result event of a finished mode: the output directory (as `assignment` names
/// it) with the sha256 of its manifest.json (read where the mode wrote it, `ran`), the
/// figures, and the manifest (for eval, results.json) verbatim.
fn result_event(assignment: &Assignment, ran: &Assignment, outcome: &Value) -> Result<Event> {
    if let Some(Mode::Resolve(_)) = assignment.mode {
        // The cache entry and its digest; the record is the manifest.
        let text = |k: &str| outcome[k].as_str().map(String::from).with_context(|| format!("the resolver gave no {k}"));
        let mut metrics = BTreeMap::new();
        if let Some(bytes) = outcome["bytes"].as_f64() {
            metrics.insert("bytes".to_string(), bytes);
        }
        return Ok(Event::Result(v1::Result {
            artifact: Some(v1::Artifact { uri: text("uri")?, sha256: text("sha256")? }),
            metrics: metrics.into_iter().collect(),
            manifest_json: serde_json::to_string(outcome)?,
            passed: None,
        }));
    }
    let uri = output_uri(assignment).context("the assignment has no output")?;
    let written = output_uri(ran).context("the assignment has no output")?;
    let dir = local_path(&written, ran.store.as_ref())?;
    let manifest = dir.join("manifest.json");
    let sha256 = file_sha256(&manifest).with_context(|| format!("the mode wrote no {}", manifest.display()))?;
    let (metrics, passed, text) = match assignment.mode.as_ref() {
        Some(Mode::Eval(_)) => {
            let mut m = BTreeMap::new();
            for entry in outcome["metrics"].as_array().into_iter().flatten() {
                if let (Some(name), Some(value)) = (entry["metric"].as_str(), entry["value"].as_f64()) {
                    m.insert(name.to_string(), value);
                }
            }
            for key in ["samples", "errors"] {
                if let Some(v) = outcome[key].as_f64() {
                    m.insert(key.to_string(), v);
                }
            }
            let mut results = outcome.clone();
            if let Some(o) = results.as_object_mut() {
                o.remove("spec");
            }
            (m, outcome["passed"].as_bool(), serde_json::to_string(&results)?)
        }
        _ => (figures(outcome), None, std::fs::read_to_string(&manifest)?),
    };
    Ok(Event::Result(v1::Result {
        artifact: Some(v1::Artifact { uri, sha256 }),
        metrics: metrics.into_iter().collect(),
        manifest_json: text,
        passed,
    }))
}

/// The Failure event of a mode that ended with an error.
fn failure_event(error: &anyhow::Error) -> Event {
    let message = format!("{error:#}");
    let (reason, retryable) = if let Some(e) = error.downcast_ref::<crate::report::ModeFailure>() {
        (e.reason.to_string(), false)
    } else if let Some(i) = error.downcast_ref::<Interrupted>() {
        match i {
            Interrupted::Cancelled(_) => ("Cancelled".to_string(), false),
            Interrupted::Stopped(_) => ("Stopped".to_string(), true),
        }
    } else if message.contains("sha256") && message.contains("expects") {
        ("DigestMismatch".to_string(), false)
    } else if message.contains("not found") || message.contains("No such file") {
        ("InputNotFound".to_string(), false)
    } else {
        ("WorkerError".to_string(), false)
    };
    Event::Failure(v1::Failure { reason, message, retryable })
}

/// Runs the mode of `assignment` on this thread.
fn run_mode(assignment: &Assignment) -> Result<Option<Value>> {
    match &assignment.mode {
        Some(Mode::Prepare(_)) => crate::prepare::run(assignment).map(Some),
        Some(Mode::Finetune(_)) => crate::finetune::run(assignment).map(Some),
        Some(Mode::Eval(_)) => crate::eval::run(assignment).map(Some),
        Some(Mode::Resolve(_)) => crate::resolve::run(assignment).map(Some),
        Some(Mode::Serve(_)) => {
            report::phase("Serving", "serving the model");
            crate::serve::run_with(assignment, crate::serve::Options::AGENT).map(|()| None)
        }
        None => bail!("the assignment names no mode"),
    }
}

/// The session with the gateway: sends events in order with increasing sequence
/// numbers, resends the unacknowledged ones after reconnecting, applies commands, and
/// returns once `last` (the final event's sequence number, when known) is acknowledged.
struct Session {
    env: AgentEnv,
    next_seq: u64,
    pending: VecDeque<WorkerEvent>,
    last_phase: Option<v1::PhaseChange>,
    final_seq: Option<u64>,
    acked: u64,
}

impl Session {
    fn new(env: AgentEnv) -> Self {
        Self { env, next_seq: 1, pending: VecDeque::new(), last_phase: None, final_seq: None, acked: 0 }
    }

    fn wrap(&mut self, event: Event) -> WorkerEvent {
        if let Event::Phase(p) = &event {
            self.last_phase = Some(p.clone());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        WorkerEvent {
            workload: Some(self.env.workload.clone()),
            pod: self.env.pod.clone(),
            seq,
            time: Some(now()),
            event: Some(event),
        }
    }

    /// Queues an event; drops the oldest unacknowledged progress when too many pile up.
    fn queue(&mut self, event: Event, terminal: bool) -> WorkerEvent {
        let wrapped = self.wrap(event);
        if terminal {
            self.final_seq = Some(wrapped.seq);
        }
        self.pending.push_back(wrapped.clone());
        let progress = self.pending.iter().filter(|e| matches!(e.event, Some(Event::Progress(_)))).count();
        if progress > MAX_PENDING_PROGRESS
            && let Some(i) = self.pending.iter().position(|e| matches!(e.event, Some(Event::Progress(_))))
        {
            self.pending.remove(i);
        }
        wrapped
    }

    fn ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.pending.front().is_some_and(|e| e.seq <= seq) {
            self.pending.pop_front();
        }
    }

    fn delivered(&self) -> bool {
        self.final_seq.is_some_and(|f| self.acked >= f)
    }

    fn command(&self, command: GatewayCommand) {
        match command.command {
            Some(Command::Cancel(c)) => {
                tracing::warn!(reason = %c.reason, "the operator cancelled this run");
                report::control().request_cancel();
            }
            Some(Command::Checkpoint(c)) => {
                tracing::info!(stop = c.stop, "the operator asked for a checkpoint");
                report::control().request_checkpoint(c.stop);
            }
            Some(Command::Ack(_)) | None => {}
        }
    }

    /// Keeps the session up until the final event is acknowledged, `events` ends
    /// without one, or delivery takes longer than its patience.
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<(Event, bool)>) -> bool {
        let mut client = match channel(&self.env) {
            Ok(c) => WorkerGatewayClient::new(c),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "no gateway to report to");
                return false;
            }
        };
        let mut backoff = Backoff::new();
        let mut finished_at: Option<Instant> = None;
        let mut local_open = true;
        loop {
            if self.delivered() {
                return true;
            }
            if !local_open && self.final_seq.is_none() {
                return false;
            }
            if finished_at.is_some_and(|t| t.elapsed() > DELIVERY_PATIENCE) {
                tracing::error!("gave up delivering the final result to the gateway");
                return false;
            }
            if self.pending.is_empty() {
                // The first event of a session names the workload and the pod.
                let phase = self
                    .last_phase
                    .clone()
                    .unwrap_or(v1::PhaseChange { phase: "Running".into(), message: String::new() });
                self.queue(Event::Phase(phase), false);
            }
            let (up, rx) = mpsc::channel::<WorkerEvent>(256);
            for e in &self.pending {
                let _ = up.try_send(e.clone());
            }
            let request = match with_token(tokio_stream::wrappers::ReceiverStream::new(rx), &self.env.token) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot authenticate");
                    return false;
                }
            };
            let mut commands = match client.session(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    if matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) {
                        tracing::error!(error = status.message(), "the gateway refused this workload's token");
                        return false;
                    }
                    let wait = backoff.next();
                    tracing::warn!(
                        error = status.message(),
                        retry_in_ms = wait.as_millis() as u64,
                        "session with the gateway failed"
                    );
                    // Keep taking local events while waiting, so none is lost.
                    let deadline = tokio::time::sleep(wait);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            next = events.recv(), if local_open => match next {
                                Some((event, terminal)) => {
                                    self.queue(event, terminal);
                                    if terminal { finished_at.get_or_insert_with(Instant::now); }
                                }
                                None => local_open = false,
                            },
                        }
                    }
                    continue;
                }
            };
            backoff.reset();
            loop {
                tokio::select! {
                    next = events.recv(), if local_open => match next {
                        Some((event, terminal)) => {
                            let wrapped = self.queue(event, terminal);
                            if terminal { finished_at.get_or_insert_with(Instant::now); }
                            if up.send(wrapped).await.is_err() { break; }
                        }
                        None => local_open = false,
                    },
                    command = commands.message() => match command {
                        Ok(Some(c)) => {
                            if let Some(Command::Ack(a)) = &c.command {
                                self.ack(a.seq);
                                if self.delivered() { return true; }
                            }
                            self.command(c);
                        }
                        Ok(None) => { tracing::info!("the gateway closed the session"); break; }
                        Err(status) => { tracing::warn!(error = status.message(), "the session broke"); break; }
                    },
                }
                if !local_open && self.final_seq.is_none() {
                    return false;
                }
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }
}

/// `LLMOPS_ASSIGNMENT_FILE`: where the Assignment is mounted, when it is not fetched.
fn assignment_file() -> Option<PathBuf> {
    std::env::var_os("LLMOPS_ASSIGNMENT_FILE").filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Reads a mounted Assignment (its YAML or JSON form); warns when it names another
/// workload than the pod's environment does.
fn read_assignment_file(path: &Path, env: &AgentEnv) -> Result<Assignment, String> {
    let assignment = llmops_proto::read_assignment(path).map_err(|e| format!("{e}"))?;
    if let Some(w) = &assignment.workload {
        let ours = &env.workload;
        if (w.namespace.as_str(), w.kind.as_str(), w.name.as_str()) != (&ours.namespace, &ours.kind, &ours.name)
            || (!w.uid.is_empty() && w.uid != ours.uid)
        {
            tracing::warn!(file = ?w, env = ?ours, "the assignment file names another workload than LLMOPS_WORKLOAD");
        }
    }
    Ok(assignment)
}

/// Runs the agent: fetch (or read), run, report. Exits 0 when the mode succeeded (and the
/// gateway recorded it), 1 when it failed, 2 when the agent could not start.
pub fn run() -> Result<ExitCode> {
    let env = AgentEnv::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("llmops-agent")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let file = assignment_file();
    tracing::info!(gateway = %env.gateway, workload = ?env.workload, pod = %env.pod, assignment_file = ?file, "agent starting");
    // A mounted Assignment needs no gateway: the session starts beside the mode and
    // reports whenever the gateway is there.
    let (assignment, source) = match &file {
        Some(path) => match read_assignment_file(path, &env) {
            Ok(a) => (Ok(a), format!("the assignment file {} holds", path.display())),
            Err(e) => (Err(e), format!("the assignment file {}", path.display())),
        },
        None => (Ok(runtime.block_on(fetch(&env))?), "the gateway sent".to_string()),
    };
    // A ModelDeployment's pod is a server even when its assignment cannot be read.
    let serving = matches!(assignment.as_ref().map(|a| a.mode.as_ref()), Ok(Some(Mode::Serve(_))))
        || env.workload.kind == "ModelDeployment";
    let (tx, rx) = mpsc::unbounded_channel::<(Event, bool)>();
    let session = runtime.spawn(Session::new(env.clone()).run(rx));
    // The wait for the final event's acknowledgement: bounded for a server.
    let deliver = |session: tokio::task::JoinHandle<bool>| {
        runtime.block_on(async {
            if serving {
                tokio::time::timeout(SERVE_DELIVERY_PATIENCE, session).await.ok().and_then(Result::ok).unwrap_or(false)
            } else {
                session.await.unwrap_or(false)
            }
        })
    };
    let checked = match assignment {
        Ok(a) => {
            match a.validate().map_err(|errors| format!("{source} an invalid assignment:\n{}", describe(&errors))) {
                // The pod mounts only its part of the store; the worker holds itself to it
                // too, as it must with a bucket.
                Ok(()) => crate::store::check_tenancy(&a)
                    .map(|()| a)
                    .map_err(|e| format!("{source} an assignment outside this workload's store: {e:#}")),
                Err(message) => Err(message),
            }
        }
        Err(e) => Err(format!("cannot read {source}: {e}")),
    };
    let assignment = match checked {
        Ok(a) => a,
        Err(message) => {
            let _ = tx.send((
                Event::Failure(v1::Failure {
                    reason: "InvalidAssignment".into(),
                    message: message.clone(),
                    retryable: false,
                }),
                true,
            ));
            drop(tx);
            let _ = deliver(session);
            bail!(message);
        }
    };
    // With a bucket as the store, the mode runs on local copies.
    report::phase("Staging", "staging the inputs");
    let scratch = std::env::var_os("LLMOPS_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("llmops-{}", env.workload.uid));
    let staged = match runtime.block_on(crate::staging::stage(&assignment, &scratch)) {
        Ok(staged) => staged.map(Arc::new),
        Err(e) => {
            let message = format!("{e:#}");
            let failure = v1::Failure { reason: "StagingFailed".into(), message: message.clone(), retryable: true };
            let _ = tx.send((Event::Failure(failure), true));
            drop(tx);
            let _ = deliver(session);
            bail!(message);
        }
    };
    let (events, forward) = mpsc::unbounded_channel::<Option<Event>>();
    report::install(Box::new(Forward(events.clone())));
    // Reports of the mode flow into the session as non-final events; checkpoints reach
    // the store before they are announced.
    let relay = {
        let tx = tx.clone();
        let mut forward = forward;
        let staged = staged.clone();
        runtime.spawn(async move {
            while let Some(Some(mut e)) = forward.recv().await {
                if let (Event::Checkpoint(c), Some(staged)) = (&mut e, &staged) {
                    match staged.upload_checkpoint(Path::new(&c.uri)).await {
                        Ok(uri) => c.uri = uri,
                        Err(err) => tracing::error!(error = %format!("{err:#}"), "uploading a checkpoint failed"),
                    }
                }
                if tx.send((e, false)).is_err() {
                    break;
                }
            }
        })
    };
    report::phase(
        "Running",
        format!("running the {} mode", assignment.mode.as_ref().map(Mode::name).unwrap_or_default()),
    );
    let ran = Arc::new(staged.as_ref().map_or_else(|| assignment.clone(), |s| s.assignment.clone()));
    let worker = {
        let ran = ran.clone();
        std::thread::Builder::new()
            .name("llmops-mode".into())
            .spawn(move || run_mode(&ran))
            .context("starting the mode's thread")?
    };
    let mut outcome = worker.join().map_err(|_| anyhow::anyhow!("the mode's thread panicked"))?;
    // Let reports already emitted (and their checkpoint uploads) go out first.
    let _ = events.send(None);
    let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(300), relay).await });
    if let (Ok(Some(_)), Some(staged)) = (&outcome, &staged)
        && let Err(e) = runtime.block_on(staged.upload_output())
    {
        outcome = Err(e.context("uploading the output to the store"));
    }
    let stopping = |message: String| Event::Phase(v1::PhaseChange { phase: "Stopping".into(), message });
    let (final_event, ending) = match outcome {
        Ok(Some(value)) => match result_event(&assignment, &ran, &value) {
            Ok(event) => (event, Ending::Succeeded),
            Err(e) => (failure_event(&e), Ending::Failed),
        },
        Ok(None) => (stopping("the server stopped".into()), Ending::Succeeded),
        Err(e) if matches!(e.downcast_ref::<Interrupted>(), Some(Interrupted::Stopped(_))) => {
            (stopping(format!("{e:#}")), Ending::Stopped)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the mode failed");
            (failure_event(&e), Ending::Failed)
        }
    };
    let _ = tx.send((final_event, true));
    drop(tx);
    let delivered = deliver(session);
    if !delivered {
        tracing::error!("the gateway did not acknowledge the final event");
    }
    Ok(match ending {
        Ending::Succeeded => ExitCode::SUCCESS,
        Ending::Failed => ExitCode::from(1),
        Ending::Stopped => {
            // Exiting now would end the Job as complete before the operator suspends or
            // deletes it; the pod waits to be stopped instead.
            tracing::info!("checkpoint written; waiting for the pod to be stopped");
            let stopped = runtime
                .block_on(async { tokio::time::timeout(STOP_PATIENCE, crate::serve::shutdown_signal()).await.is_ok() });
            if stopped { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
    })
}

/// How a run ended, for the exit status.
enum Ending {
    Succeeded,
    Failed,
    Stopped,
}

/// How long a stopped worker waits to be terminated before it exits by itself (non-zero,
/// so the Job retries and the new pod resumes from the checkpoint).
const STOP_PATIENCE: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_parse_from_the_pod_env() {
        let w = parse_workload("team-a/Dataset/support/3f0c9a52").expect("parses");
        assert_eq!(
            (w.namespace.as_str(), w.kind.as_str(), w.name.as_str(), w.uid.as_str()),
            ("team-a", "Dataset", "support", "3f0c9a52")
        );
        assert!(parse_workload("team-a/Dataset/support").is_err());
        assert!(parse_workload("a//b/c").is_err());
    }

    #[test]
    fn with_a_ca_the_gateway_is_dialled_over_tls_only() {
        assert_eq!(gateway_url("gw.llmops:9090", true), "https://gw.llmops:9090");
        assert_eq!(gateway_url("http://gw.llmops:9090", true), "https://gw.llmops:9090");
        assert_eq!(gateway_url("gw.llmops:9090", false), "http://gw.llmops:9090");
        assert_eq!(gateway_url("https://gw.llmops:9090", false), "https://gw.llmops:9090");
    }

    #[test]
    fn sessions_resend_until_acknowledged_and_keep_order() {
        let env = AgentEnv {
            gateway: "http://127.0.0.1:1".into(),
            gateway_ca: None,
            workload: Workload::default(),
            token: "t".into(),
            pod: "p".into(),
        };
        let mut s = Session::new(env);
        let progress = |step| Event::Progress(v1::Progress { step, ..Default::default() });
        for step in 0..40 {
            s.queue(progress(step), false);
        }
        assert_eq!(s.pending.len(), MAX_PENDING_PROGRESS, "old progress is dropped while the gateway is away");
        let last = s.queue(Event::Failure(v1::Failure::default()), true);
        assert_eq!(last.seq, 41);
        assert!(!s.delivered());
        s.ack(40);
        assert_eq!(s.pending.len(), 1, "only the final event is left");
        s.ack(41);
        assert!(s.delivered());
        let seqs: Vec<u64> = (0..3).map(|_| s.queue(progress(0), false).seq).collect();
        assert_eq!(seqs, vec![42, 43, 44], "sequence numbers keep increasing");
    }

    #[test]
    fn figures_flatten_numbers_of_a_manifest() {
        let m = serde_json::json!({"counts": {"read": 10, "kept": 8}, "spec": {"x": 1}, "sha256": "ab", "metrics": {"steps": 6}});
        let f = figures(&m);
        assert_eq!(f.get("counts.read"), Some(&10.0));
        assert_eq!(f.get("metrics.steps"), Some(&6.0));
        assert!(!f.contains_key("spec.x"));
    }
}
