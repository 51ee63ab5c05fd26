//! The worker gateway: a gRPC service inside the operator that worker pods report
//! through. Controllers register each workload's token and Assignment; workers `Fetch`
//! the Assignment and keep a `Session` open, sending events (recorded here, idempotent
//! per workload, pod and sequence number) and receiving commands. Recorded events ask
//! the workload's controller to reconcile: at once for a result or failure, at most
//! once per progress interval otherwise, so a chatty worker cannot flood the apiserver.
//! A result or failure is acknowledged only after the controller has written it to
//! status, so a worker that loses its connection resends it and nothing is lost.

pub mod service;
pub mod tls;
pub mod tokens;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llmops_proto::v1::{self, Assignment, GatewayCommand};
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::workload::WorkloadKey;
use tokens::{Refusal, TokenTable};

/// A reconcile request for a workload, routed to its kind's controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Namespace of the object.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
}

/// The final result a worker reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRecord {
    /// Pod that reported it.
    pub pod: String,
    /// The output artifact.
    pub artifact: Option<v1::Artifact>,
    /// Metrics.
    pub metrics: HashMap<String, f64>,
    /// The output's manifest.json.
    pub manifest_json: String,
    /// Verdict of an evaluation.
    pub passed: Option<bool>,
}

/// A failure a worker reported.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRecord {
    /// Pod that reported it.
    pub pod: String,
    /// CamelCase reason.
    pub reason: String,
    /// What happened.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

/// What the gateway knows about one workload, as a controller reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// The pod that reported last.
    pub pod: Option<String>,
    /// Latest phase change: (phase, message).
    pub phase: Option<(String, String)>,
    /// Latest progress.
    pub progress: Option<v1::Progress>,
    /// Latest progress of each pod (serving pods report their live figures this way).
    pub progress_by_pod: std::collections::BTreeMap<String, v1::Progress>,
    /// Latest checkpoint written.
    pub checkpoint: Option<v1::CheckpointWritten>,
    /// The result, once reported.
    pub result: Option<ResultRecord>,
    /// The latest failure.
    pub failure: Option<FailureRecord>,
    /// Bumped by every result or failure; pass it to [`Gateway::persisted`].
    pub terminal_version: u64,
    /// Whether a worker session is open.
    pub connected: bool,
}

struct WorkloadState {
    observed: Observed,
    /// Highest sequence number recorded per pod.
    seen: HashMap<String, u64>,
    /// Sessions open now, by id, with their command senders.
    sessions: HashMap<u64, mpsc::Sender<Result<GatewayCommand, tonic::Status>>>,
    persisted: watch::Sender<u64>,
    last_trigger: Option<Instant>,
    trigger_pending: bool,
}

impl WorkloadState {
    fn new() -> Self {
        Self {
            observed: Observed::default(),
            seen: HashMap::new(),
            sessions: HashMap::new(),
            persisted: watch::channel(0).0,
            last_trigger: None,
            trigger_pending: false,
        }
    }
}

struct Registration {
    assignment: Assignment,
}

/// The gateway's state, shared by the gRPC service and the controllers.
pub struct Gateway {
    tokens: Mutex<TokenTable>,
    registrations: Mutex<HashMap<String, Registration>>,
    workloads: Mutex<HashMap<String, WorkloadState>>,
    triggers: Mutex<HashMap<(String, String), mpsc::UnboundedSender<Trigger>>>,
    metrics: Arc<Metrics>,
    progress_interval: Duration,
    next_session: std::sync::atomic::AtomicU64,
    /// True once the operator is going away: open sessions end so workers reconnect to
    /// the next instance instead of waiting on this one.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The outcome of recording one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded (or already recorded); acknowledge at once.
    Ack,
    /// A result or failure: acknowledge once status holds this terminal version.
    AckWhenPersisted(u64),
}

impl Gateway {
    /// A gateway with no workloads.
    pub fn new(metrics: Arc<Metrics>, progress_interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            tokens: Mutex::new(TokenTable::default()),
            registrations: Mutex::new(HashMap::new()),
            workloads: Mutex::new(HashMap::new()),
            triggers: Mutex::new(HashMap::new()),
            metrics,
            progress_interval,
            next_session: std::sync::atomic::AtomicU64::new(1),
            stopping: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Ends every open session (workers reconnect and resend what was not acknowledged).
    pub fn shut_down(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`Self::shut_down`] was called.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|stopping| *stopping).await;
        }
    }

    /// The metrics the gateway counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Reconcile requests for workloads of `kind` in `namespace` (None: in every
    /// namespace without a subscriber of its own), for the controller that watches them.
    pub fn subscribe(&self, kind: &str, namespace: Option<&str>) -> mpsc::UnboundedReceiver<Trigger> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.triggers).insert((kind.to_string(), namespace.unwrap_or_default().to_string()), tx);
        rx
    }

    /// Makes `token` the token of `key` and `assignment` what its worker fetches.
    pub fn register(&self, key: &WorkloadKey, token: &str, assignment: Assignment) {
        lock(&self.tokens).insert(key.clone(), token);
        lock(&self.registrations).insert(key.uid.clone(), Registration { assignment });
    }

    /// Whether a workload is registered.
    pub fn is_registered(&self, uid: &str) -> bool {
        lock(&self.registrations).contains_key(uid)
    }

    /// Keeps the per-pod reports of `pods` only (the serving pods that are still ready).
    pub fn retain_pods(&self, uid: &str, pods: &[String]) {
        if let Some(w) = lock(&self.workloads).get_mut(uid) {
            w.observed.progress_by_pod.retain(|p, _| pods.contains(p));
        }
    }

    /// Forgets a workload: its token stops working and its records go.
    pub fn forget(&self, uid: &str) {
        lock(&self.tokens).remove(uid);
        lock(&self.registrations).remove(uid);
        lock(&self.workloads).remove(uid);
    }

    /// Checks a token against the workload a request names, counting refusals.
    pub fn authenticate(
        &self,
        token: Result<String, Refusal>,
        claimed: Option<&WorkloadKey>,
    ) -> Result<WorkloadKey, Refusal> {
        let result = token.and_then(|t| lock(&self.tokens).authenticate(&t, claimed));
        if let Err(refusal) = result {
            self.metrics.refuse(refusal.label());
            tracing::warn!(reason = refusal.label(), workload = ?claimed.map(ToString::to_string), "gateway refused a token");
        }
        result
    }

    /// The Assignment of a workload.
    pub fn assignment(&self, uid: &str) -> Option<Assignment> {
        lock(&self.registrations).get(uid).map(|r| r.assignment.clone())
    }

    /// What is known about a workload.
    pub fn observe(&self, uid: &str) -> Option<Observed> {
        lock(&self.workloads).get(uid).map(|w| {
            let mut o = w.observed.clone();
            o.connected = !w.sessions.is_empty();
            o
        })
    }

    /// Tells the gateway that status now holds the terminal events up to `version`, so
    /// their acknowledgements can be sent.
    pub fn persisted(&self, uid: &str, version: u64) {
        if let Some(w) = lock(&self.workloads).get(uid) {
            w.persisted.send_if_modified(|v| {
                let changed = version > *v;
                *v = (*v).max(version);
                changed
            });
        }
    }

    /// Waits until status holds terminal version `version` of a workload.
    pub async fn wait_persisted(&self, uid: &str, version: u64, timeout: Duration) -> bool {
        let rx = lock(&self.workloads).get(uid).map(|w| w.persisted.subscribe());
        let Some(mut rx) = rx else { return false };
        tokio::time::timeout(timeout, rx.wait_for(|v| *v >= version)).await.is_ok_and(|r| r.is_ok())
    }

    /// Sends a command to every open session of a workload; false when none is open.
    pub fn command(&self, uid: &str, command: v1::gateway_command::Command) -> bool {
        let senders: Vec<_> =
            lock(&self.workloads).get(uid).map(|w| w.sessions.values().cloned().collect()).unwrap_or_default();
        let mut sent = false;
        for s in senders {
            sent |= s.try_send(Ok(GatewayCommand { command: Some(command.clone()) })).is_ok();
        }
        sent
    }

    pub(crate) fn open_session(
        &self,
        key: &WorkloadKey,
        sender: mpsc::Sender<Result<GatewayCommand, tonic::Status>>,
    ) -> u64 {
        let id = self.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.workloads).entry(key.uid.clone()).or_insert_with(WorkloadState::new).sessions.insert(id, sender);
        self.metrics.gateway_sessions.inc();
        self.trigger(key);
        id
    }

    pub(crate) fn close_session(&self, key: &WorkloadKey, id: u64) {
        if let Some(w) = lock(&self.workloads).get_mut(&key.uid) {
            w.sessions.remove(&id);
        }
        self.metrics.gateway_sessions.dec();
        self.trigger(key);
    }

    /// Records one event of a workload's worker.
    pub fn record(
        self: &Arc<Self>,
        key: &WorkloadKey,
        pod: &str,
        seq: u64,
        event: &v1::worker_event::Event,
    ) -> Recorded {
        use v1::worker_event::Event;
        let name = match event {
            Event::Phase(_) => "phase",
            Event::Progress(_) => "progress",
            Event::Result(_) => "result",
            Event::Failure(_) => "failure",
            Event::Checkpoint(_) => "checkpoint",
        };
        let terminal = matches!(event, Event::Result(_) | Event::Failure(_));
        let mut workloads = lock(&self.workloads);
        let w = workloads.entry(key.uid.clone()).or_insert_with(WorkloadState::new);
        let last = w.seen.get(pod).copied().unwrap_or(0);
        if seq != 0 && seq <= last {
            // Resent after a reconnect: already recorded.
            return if terminal { Recorded::AckWhenPersisted(w.observed.terminal_version) } else { Recorded::Ack };
        }
        w.seen.insert(pod.to_string(), seq.max(last));
        self.metrics.gateway_events.get_or_create(&crate::metrics::EventLabel { event: name.to_string() }).inc();
        let o = &mut w.observed;
        o.pod = Some(pod.to_string());
        match event {
            Event::Phase(p) => o.phase = Some((p.phase.clone(), p.message.clone())),
            Event::Progress(p) => {
                o.progress = Some(p.clone());
                o.progress_by_pod.insert(pod.to_string(), p.clone());
            }
            Event::Checkpoint(c) => o.checkpoint = Some(c.clone()),
            Event::Result(r) => {
                o.result = Some(ResultRecord {
                    pod: pod.to_string(),
                    artifact: r.artifact.clone(),
                    metrics: r.metrics.clone(),
                    manifest_json: r.manifest_json.clone(),
                    passed: r.passed,
                });
                o.terminal_version += 1;
            }
            Event::Failure(f) => {
                o.failure = Some(FailureRecord {
                    pod: pod.to_string(),
                    reason: f.reason.clone(),
                    message: f.message.clone(),
                    retryable: f.retryable,
                });
                o.terminal_version += 1;
            }
        }
        let version = o.terminal_version;
        if terminal {
            w.last_trigger = Some(Instant::now());
            drop(workloads);
            self.trigger(key);
            return Recorded::AckWhenPersisted(version);
        }
        // Coalesce: one reconcile per progress interval, whatever the event rate.
        let now = Instant::now();
        let due = w.last_trigger.map(|t| t + self.progress_interval).unwrap_or(now);
        if due <= now {
            w.last_trigger = Some(now);
            drop(workloads);
            self.trigger(key);
        } else if !w.trigger_pending {
            w.trigger_pending = true;
            drop(workloads);
            let gateway = Arc::clone(self);
            let key = key.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(due.into()).await;
                if let Some(w) = lock(&gateway.workloads).get_mut(&key.uid) {
                    w.trigger_pending = false;
                    w.last_trigger = Some(Instant::now());
                }
                gateway.trigger(&key);
            });
        }
        Recorded::Ack
    }

    /// Asks the controller of `kind` to reconcile `namespace/name` (an object waiting for
    /// something that just settled).
    pub fn wake(&self, kind: &str, namespace: &str, name: &str) {
        let key = WorkloadKey { namespace: namespace.into(), kind: kind.into(), name: name.into(), uid: String::new() };
        self.trigger(&key);
    }

    fn trigger(&self, key: &WorkloadKey) {
        let triggers = lock(&self.triggers);
        let specific = triggers.get(&(key.kind.clone(), key.namespace.clone()));
        if let Some(tx) = specific.or_else(|| triggers.get(&(key.kind.clone(), String::new()))) {
            let _ = tx.send(Trigger { namespace: key.namespace.clone(), name: key.name.clone() });
        }
    }
}
