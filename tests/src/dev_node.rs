//! The development node agent: a stand-in kubelet for machines without a container
//! runtime (tests and the quick start only, never the chart). It registers a Node,
//! keeps it Ready, and runs the first container of every pod bound to it as a local
//! process, with the pod's env and volumes made local, its own 127.0.0.x address, and
//! the pod status (phase, IPs, exit code, the tail of its log) reported like a kubelet.
//!
//! What a process cannot have is faked as little as possible and refused otherwise:
//! the image is ignored (a command of `llmops-worker` runs the local worker binary,
//! anything else must be on PATH or an absolute path); `secret`, `configMap`,
//! `emptyDir` and `hostPath` volumes are materialised under the pod's directory (a
//! hostPath is its own path); because the process cannot see the container's mount
//! paths, an env value, argument or working directory that starts with a mount path is
//! rewritten to where that volume was materialised. Any other volume kind fails the pod.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// Label of the dev node; pods select it with `nodeSelector`.
pub const NODE_LABEL: &str = "llmops.dev/dev-node";
/// Taint of the dev node (NoSchedule), so that only pods that tolerate it run here for
/// real and no other test's pod lands on it by chance.
pub const NODE_TAINT: &str = "llmops.dev/dev-node";
/// Field manager of what the dev node writes.
const MANAGER: &str = "llmops-dev-node";
/// Reason of pods that were running when the previous dev node process went away.
pub const NODE_RESTARTED: &str = "NodeRestarted";
/// How long a Node's Lease is valid; renewed every `heartbeat`.
const LEASE_SECONDS: i32 = 40;
/// Lines of a failed container's log that become its termination message.
const MESSAGE_LINES: usize = 20;
/// Bytes at most of a termination message (as the kubelet's).
const MESSAGE_BYTES: usize = 4096;
/// How long a process gets after SIGTERM when the dev node itself stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the dev node is and where it keeps its files.
#[derive(Debug, Clone)]
pub struct DevNodeConfig {
    /// Name of the Node.
    pub node_name: String,
    /// The local `llmops-worker` that a container command `llmops-worker` runs.
    pub worker_binary: PathBuf,
    /// Per-pod directories (`<namespace>_<pod>/`: volumes, scratch, `log`).
    pub work_dir: PathBuf,
    /// CPU capacity (a quantity).
    pub cpu: String,
    /// Memory capacity (a quantity).
    pub memory: String,
    /// Pod capacity.
    pub pods: u32,
    /// How often the Lease and the Ready condition are renewed.
    pub heartbeat: Duration,
    /// Extra labels of the Node.
    pub labels: BTreeMap<String, String>,
}

impl DevNodeConfig {
    /// A node named `node_name` with this machine's CPUs and memory as capacity.
    pub fn new(node_name: impl Into<String>, worker_binary: PathBuf, work_dir: PathBuf) -> Self {
        Self {
            node_name: node_name.into(),
            worker_binary,
            work_dir,
            cpu: host_cpus().to_string(),
            memory: host_memory(),
            pods: 110,
            heartbeat: Duration::from_secs(10),
            labels: BTreeMap::new(),
        }
    }
}

/// The number of CPUs of this machine.
pub fn host_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// This machine's memory as a quantity (`MemTotal` of /proc/meminfo), 4Gi when unknown.
pub fn host_memory() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .map(|kib| format!("{kib}Ki"))
        .unwrap_or_else(|| "4Gi".into())
}

/// Runs the dev node until Ctrl-C or SIGTERM, then stops every process it started.
pub async fn run(client: Client, config: DevNodeConfig) -> Result<()> {
    run_until(client, config, shutdown_signal()).await
}

/// A dev node running in the caller's runtime (for tests): [`DevNode::stop`] ends it
/// the way Ctrl-C does, and removes its Node.
pub struct DevNode {
    /// Its configuration.
    pub config: DevNodeConfig,
    client: Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl DevNode {
    /// Starts a dev node and waits until its Node is registered.
    pub async fn start(client: Client, config: DevNodeConfig) -> Result<Self> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_until(client.clone(), config.clone(), async {
            let _ = rx.await;
        }));
        let nodes: Api<Node> = Api::all(client.clone());
        let start = std::time::Instant::now();
        loop {
            if task.is_finished() {
                return match task.await? {
                    Ok(()) => Err(anyhow::anyhow!("the dev node stopped at once")),
                    Err(e) => Err(e),
                };
            }
            let ready = nodes.get_opt(&config.node_name).await?.and_then(|n| n.status).is_some_and(|s| {
                s.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if ready {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("node {} did not become Ready", config.node_name);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self { config, client, shutdown: Some(tx), task: Some(task) })
    }

    /// Stops every process, ends the dev node and deletes its Node.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        };
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes.delete(&self.config.node_name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        result
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        // Not stopped (a failed test): aborting drops the supervisors, whose processes
        // are killed on drop, and the Node is deleted from a thread with its own runtime,
        // since Drop cannot await.
        let Some(task) = self.task.take() else { return };
        task.abort();
        let client = self.client.clone();
        let name = self.config.node_name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async { Api::<Node>::all(client).delete(&name, &DeleteParams::default()).await })?;
            anyhow::Ok(())
        })
        .join();
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs the dev node until `shutdown` completes, then stops every process it started
/// (SIGTERM, SIGKILL after a grace period) and marks their pods Failed.
pub async fn run_until(
    client: Client,
    config: DevNodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("creating the work dir {}", config.work_dir.display()))?;
    let config = Arc::new(config);
    register(&client, &config).await?;
    tracing::info!(node = %config.node_name, "node registered");
    let heartbeat = tokio::spawn(heartbeat(client.clone(), config.clone()));
    let ctx =
        Arc::new(Ctx { client: client.clone(), config: config.clone(), addresses: Mutex::new((2..=254).collect()) });
    let result = watch_pods(ctx, shutdown).await;
    heartbeat.abort();
    tracing::info!(node = %config.node_name, "stopped");
    result
}

/// Shared by the pod supervisors.
struct Ctx {
    client: Client,
    config: Arc<DevNodeConfig>,
    /// Free last octets of 127.0.0.x.
    addresses: Mutex<BTreeSet<u8>>,
}

impl Ctx {
    fn take_address(&self) -> Option<u8> {
        let mut free = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let first = free.iter().next().copied()?;
        free.remove(&first);
        Some(first)
    }

    fn release_address(&self, octet: u8) {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner()).insert(octet);
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn node_status(config: &DevNodeConfig) -> Value {
    let t = now();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": t, "lastTransitionTime": t})
    };
    let resources = json!({"cpu": config.cpu, "memory": config.memory, "pods": config.pods.to_string()});
    json!({
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "llmops dev node"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "llmops dev node"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "llmops dev node"),
            condition("Ready", "True", "KubeletReady", "llmops dev node is running pods as local processes"),
        ],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": config.node_name}],
        "capacity": resources,
        "allocatable": resources,
        "nodeInfo": {
            "architecture": std::env::consts::ARCH, "operatingSystem": "linux", "osImage": "llmops dev node",
            "kubeletVersion": concat!("llmops-dev-node-", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "", "containerRuntimeVersion": "local-process://", "kernelVersion": "",
            "bootID": "", "machineID": "", "systemUUID": "",
        },
    })
}

/// Creates or takes over the Node, then writes its status.
async fn register(client: &Client, config: &DevNodeConfig) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = config.labels.clone();
    labels.insert(NODE_LABEL.into(), "true".into());
    labels.insert("kubernetes.io/hostname".into(), config.node_name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), if cfg!(target_arch = "aarch64") { "arm64" } else { "amd64" }.into());
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": config.node_name, "labels": labels},
        "spec": {"taints": [{"key": NODE_TAINT, "value": "true", "effect": "NoSchedule"}]},
    });
    let params = PatchParams::apply(MANAGER).force();
    nodes
        .patch(&config.node_name, &params, &Patch::Apply(&node))
        .await
        .with_context(|| format!("registering node {}", config.node_name))?;
    renew(client, config).await
}

/// Writes the Node's status (Ready, capacity) and renews its Lease.
async fn renew(client: &Client, config: &DevNodeConfig) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = json!({"status": node_status(config)});
    nodes
        .patch_status(&config.node_name, &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .context("writing the node status")?;
    let node_uid = nodes.get(&config.node_name).await?.uid().unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": config.node_name, "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": config.node_name, "uid": node_uid}]},
        "spec": {"holderIdentity": config.node_name, "leaseDurationSeconds": LEASE_SECONDS,
                 "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now())},
    });
    leases
        .patch(&config.node_name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&lease))
        .await
        .context("renewing the node lease")?;
    Ok(())
}

async fn heartbeat(client: Client, config: Arc<DevNodeConfig>) {
    let mut tick = tokio::time::interval(config.heartbeat);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = renew(&client, &config).await {
            tracing::warn!(error = %format!("{e:#}"), "heartbeat failed");
        }
    }
}

/// Why a process is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The pod is being deleted: finish the deletion afterwards.
    Deleted { grace: Duration },
    /// The dev node stops.
    Shutdown,
}

/// A pod this dev node knows.
struct Known {
    stop: watch::Sender<Option<Stop>>,
    /// Whether its supervisor has ended.
    done: bool,
}

/// Messages from supervisors to the watch loop.
enum Done {
    Pod(String),
}

async fn watch_pods(ctx: Arc<Ctx>, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let selector = format!("spec.nodeName={}", ctx.config.node_name);
    let mut events = std::pin::pin!(watcher(pods, watcher::Config::default().fields(&selector)));
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut supervisors = tokio::task::JoinSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut listed: Option<BTreeSet<String>> = None;
    let mut shutdown = std::pin::pin!(shutdown);
    let outcome: Result<()> = async {
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                event = events.next() => {
                    let Some(event) = event else { bail!("the pod watch ended") };
                    match event {
                        Ok(watcher::Event::Init) => listed = Some(BTreeSet::new()),
                        Ok(watcher::Event::InitApply(pod)) => {
                            if let Some(l) = listed.as_mut() { l.insert(pod.uid().unwrap_or_default()); }
                            on_pod(&ctx, &mut known, &mut supervisors, &done_tx, pod);
                        }
                        Ok(watcher::Event::InitDone) => {
                            // Pods that went away while the watch was down.
                            let present = listed.take().unwrap_or_default();
                            for (uid, k) in known.iter() {
                                if !present.contains(uid) && !k.done {
                                    let _ = k.stop.send(Some(Stop::Deleted { grace: Duration::ZERO }));
                                }
                            }
                            known.retain(|uid, k| present.contains(uid) || !k.done);
                        }
                        Ok(watcher::Event::Apply(pod)) => on_pod(&ctx, &mut known, &mut supervisors, &done_tx, pod),
                        Ok(watcher::Event::Delete(pod)) => {
                            let uid = pod.uid().unwrap_or_default();
                            if let Some(k) = known.get(&uid) {
                                if k.done {
                                    known.remove(&uid);
                                } else {
                                    let _ = k.stop.send(Some(Stop::Deleted { grace: Duration::ZERO }));
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "pod watch error; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                Some(Done::Pod(uid)) = done_rx.recv() => {
                    if let Some(k) = known.get_mut(&uid) { k.done = true; }
                }
                Some(joined) = supervisors.join_next(), if !supervisors.is_empty() => {
                    if let Err(e) = joined { tracing::error!(error = %e, "a pod supervisor panicked"); }
                }
            }
        }
    }
    .await;
    // Stop every process (each supervisor reports its pod as terminated), then wait.
    for k in known.values() {
        k.stop.send_if_modified(|s| s.is_none().then(|| *s = Some(Stop::Shutdown)).is_some());
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(10), async {
        while supervisors.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some pods did not stop in time; killing them");
        supervisors.shutdown().await;
    }
    outcome
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// Whether a previous incarnation of the dev node started this pod.
fn was_started(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    phase(pod) == "Running"
        || status.and_then(|s| s.pod_ip.as_ref()).is_some()
        || status.and_then(|s| s.container_statuses.as_ref()).is_some_and(|c| !c.is_empty())
}

fn on_pod(
    ctx: &Arc<Ctx>,
    known: &mut HashMap<String, Known>,
    supervisors: &mut tokio::task::JoinSet<()>,
    done: &mpsc::UnboundedSender<Done>,
    pod: Pod,
) {
    let uid = pod.uid().unwrap_or_default();
    let deleting = pod.metadata.deletion_timestamp.is_some();
    if let Some(k) = known.get(&uid) {
        if deleting && !k.done {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or_else(|| pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                .unwrap_or(30);
            let grace = Duration::from_secs(grace.max(0) as u64);
            k.stop.send_if_modified(|s| {
                if s.is_none() {
                    *s = Some(Stop::Deleted { grace });
                    true
                } else {
                    false
                }
            });
        } else if deleting {
            supervisors.spawn(finish_deletion(ctx.client.clone(), pod));
        }
        return;
    }
    let finished = matches!(phase(&pod), "Succeeded" | "Failed");
    let (stop, stop_rx) = watch::channel(None);
    if deleting {
        // Nothing runs for it here: finish the deletion at once.
        known.insert(uid, Known { stop, done: true });
        supervisors.spawn(finish_deletion(ctx.client.clone(), pod));
        return;
    }
    if finished {
        known.insert(uid, Known { stop, done: true });
        return;
    }
    if was_started(&pod) {
        known.insert(uid, Known { stop, done: true });
        let client = ctx.client.clone();
        supervisors.spawn(async move {
            let message = "the dev node restarted and lost this pod's process";
            tracing::warn!(pod = %pod_key(&pod), "{message}");
            kill_orphan(&pod);
            report(&client, &pod, terminal_status(&pod, None, "Failed", NODE_RESTARTED, message)).await;
        });
        return;
    }
    known.insert(uid.clone(), Known { stop, done: false });
    let ctx = ctx.clone();
    let done = done.clone();
    supervisors.spawn(async move {
        supervise(&ctx, pod, stop_rx).await;
        let _ = done.send(Done::Pod(uid));
    });
}

/// Kills the process group a killed dev node left behind for `pod`, if it still runs:
/// its pid is in the containerID, and its environment names the pod (so a reused pid is
/// left alone).
fn kill_orphan(pod: &Pod) {
    let Some(pid) = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.strip_prefix("local-process://"))
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    let marker = format!("HOSTNAME={}", pod.name_any());
    let ours = std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()));
    if ours {
        tracing::warn!(pod = %pod_key(pod), pid, "killing the process left from before the restart");
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Deletes a pod whose process has ended, as a kubelet finishes a graceful deletion.
async fn finish_deletion(client: Client, pod: Pod) {
    let pods: Api<Pod> = Api::namespaced(client, &pod.namespace().unwrap_or_default());
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: pod.uid(), resource_version: None }),
        ..Default::default()
    };
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => tracing::info!(pod = %pod_key(&pod), "deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %pod_key(&pod), error = %e, "could not finish the deletion"),
    }
}

/// Strategic-merge patches the pod's status; failures are logged (the next event retries).
async fn report(client: &Client, pod: &Pod, status: Value) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let patch = json!({"status": status});
    if let Err(e) = pods.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Strategic(&patch)).await {
        tracing::warn!(pod = %pod_key(pod), error = %e, "could not write the pod status");
    }
}

fn container_of(pod: &Pod) -> Option<&Container> {
    pod.spec.as_ref().and_then(|s| s.containers.first())
}

fn ready_conditions(ready: bool, reason: Option<&str>) -> Value {
    let t = now();
    let status = if ready { "True" } else { "False" };
    let reason = reason.map(Value::from).unwrap_or(Value::Null);
    json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
        {"type": "Initialized", "status": "True", "lastTransitionTime": t},
        {"type": "ContainersReady", "status": status, "reason": reason, "lastTransitionTime": t},
        {"type": "Ready", "status": status, "reason": reason, "lastTransitionTime": t},
    ])
}

/// The status of a pod whose container ended (or never ran, with `exit` None).
fn terminal_status(pod: &Pod, exit: Option<(i32, &Time, &str)>, phase: &str, reason: &str, message: &str) -> Value {
    let container = container_of(pod);
    let mut status = json!({
        "phase": phase,
        "conditions": ready_conditions(false, Some(if phase == "Succeeded" { "PodCompleted" } else { "PodFailed" })),
    });
    match exit {
        Some((code, started, container_id)) => {
            status["containerStatuses"] = json!([{
                "name": container.map(|c| c.name.clone()).unwrap_or_default(),
                "image": container.and_then(|c| c.image.clone()).unwrap_or_default(),
                "imageID": "", "containerID": container_id,
                "ready": false, "started": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": reason, "message": message,
                                         "startedAt": started, "finishedAt": now(), "containerID": container_id}},
            }]);
        }
        None => {
            status["reason"] = reason.into();
            status["message"] = message.into();
        }
    }
    status
}

/// Runs one pod from start to end.
async fn supervise(ctx: &Ctx, pod: Pod, mut stop: watch::Receiver<Option<Stop>>) {
    let key = pod_key(&pod);
    let dir = ctx.config.work_dir.join(format!("{}_{}", pod.namespace().unwrap_or_default(), pod.name_any()));
    let Some(octet) = ctx.take_address() else {
        let message = "all 127.0.0.2-254 addresses are taken";
        report(&ctx.client, &pod, terminal_status(&pod, None, "Failed", "OutOfAddresses", message)).await;
        return;
    };
    let ip = format!("127.0.0.{octet}");
    let outcome = run_pod(ctx, &pod, &dir, &ip, &mut stop).await;
    ctx.release_address(octet);
    let stopped = *stop.borrow();
    match outcome {
        Ok(()) => {}
        Err(e) => {
            let (reason, message) = match e.downcast_ref::<PodError>() {
                Some(p) => (p.reason, p.message.clone()),
                None => ("DevNodeError", format!("{e:#}")),
            };
            tracing::warn!(pod = %key, reason, message, "the pod cannot run here");
            if stopped.is_none() {
                report(&ctx.client, &pod, terminal_status(&pod, None, "Failed", reason, &message)).await;
            }
        }
    }
    if let Some(Stop::Deleted { .. }) = stopped {
        finish_deletion(ctx.client.clone(), pod).await;
    }
}

/// Why a pod cannot run on this node; becomes the pod's reason and message.
#[derive(Debug)]
struct PodError {
    reason: &'static str,
    message: String,
}

impl std::fmt::Display for PodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for PodError {}

fn pod_error(reason: &'static str, message: impl Into<String>) -> anyhow::Error {
    PodError { reason, message: message.into() }.into()
}

async fn run_pod(ctx: &Ctx, pod: &Pod, dir: &Path, ip: &str, stop: &mut watch::Receiver<Option<Stop>>) -> Result<()> {
    let key = pod_key(pod);
    let container = container_of(pod).context("the pod has no container")?.clone();
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("tmp"))?;
    // Secrets and ConfigMaps may appear a moment after the pod: wait like a kubelet,
    // with the reason in the container's waiting state.
    let prepared = loop {
        match prepare(ctx, pod, &container, dir, ip).await {
            Ok(p) => break p,
            Err(e) if e.downcast_ref::<PodError>().is_some_and(|p| p.reason == CONFIG_ERROR) => {
                let message = e.downcast_ref::<PodError>().map(|p| p.message.clone()).unwrap_or_default();
                let status = json!({
                    "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
                    "containerStatuses": [{"name": container.name, "image": container.image.clone().unwrap_or_default(),
                        "imageID": "", "ready": false, "started": false, "restartCount": 0,
                        "state": {"waiting": {"reason": CONFIG_ERROR, "message": message}}}],
                });
                report(&ctx.client, pod, status).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            Err(e) => return Err(e),
        }
    };

    let log_path = dir.join("log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut command = std::process::Command::new(&prepared.program);
    command
        .args(&prepared.args)
        .env_clear()
        .envs(&prepared.env)
        .current_dir(&prepared.working_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own process group, so that signals reach whatever it starts, and Ctrl-C in
    // the dev node's terminal reaches only the dev node.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let child = command
        .spawn()
        .map_err(|e| pod_error("StartError", format!("cannot start {}: {e}", prepared.program.display())))?;
    let mut child = Process(child);
    let pid = child.0.id() as i32;
    let container_id = format!("local-process://{pid}");
    let started = now();
    tracing::info!(pod = %key, pid, ip, program = %prepared.program.display(), "started");
    report(
        &ctx.client,
        pod,
        json!({
            "phase": "Running",
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": started,
            "conditions": ready_conditions(true, None),
            "containerStatuses": [{
                "name": container.name, "image": container.image.clone().unwrap_or_default(),
                "imageID": "", "containerID": container_id,
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            }],
        }),
    )
    .await;

    let exit = tokio::select! {
        exit = child.wait() => exit?,
        stopping = async { stop.wait_for(Option::is_some).await.ok().and_then(|s| *s) } => {
            let grace = match stopping {
                Some(Stop::Deleted { grace }) => grace,
                _ => SHUTDOWN_GRACE,
            };
            tracing::info!(pod = %key, pid, ?grace, "stopping");
            child.signal(Signal::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(exit) => exit?,
                Err(_) => {
                    child.signal(Signal::SIGKILL);
                    child.wait().await?
                }
            }
        }
    };
    // Whatever it left behind goes with it, as with a container.
    child.signal(Signal::SIGKILL);
    let code = exit.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&exit).unwrap_or(9));
    tracing::info!(pod = %key, pid, code, "exited");
    let (phase, reason) = if code == 0 { ("Succeeded", "Completed") } else { ("Failed", "Error") };
    let message = if code == 0 { String::new() } else { log_tail(&log_path) };
    let mut status = terminal_status(pod, Some((code, &started, &container_id)), phase, reason, &message);
    if *stop.borrow() == Some(Stop::Shutdown) {
        status["phase"] = "Failed".into();
        status["reason"] = "NodeShutdown".into();
        status["message"] = "the dev node stopped and terminated the pod".into();
    }
    report(&ctx.client, pod, status).await;
    Ok(())
}

/// A started process, leader of its own process group; the group is killed when this
/// is dropped (a test that fails, a dev node that is aborted).
struct Process(std::process::Child);

impl Process {
    fn signal(&self, signal: Signal) {
        let _ = killpg(Pid::from_raw(self.0.id() as i32), signal);
    }

    /// Waits for the exit, polling (tokio's process support is not compiled in here).
    async fn wait(&mut self) -> Result<std::process::ExitStatus> {
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.signal(Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

const CONFIG_ERROR: &str = "CreateContainerConfigError";

/// A container made local: what to run, with which env, where.
#[derive(Debug)]
struct Prepared {
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    working_dir: PathBuf,
}

/// Materialises the volumes and resolves command, env and working directory.
async fn prepare(ctx: &Ctx, pod: &Pod, container: &Container, dir: &Path, ip: &str) -> Result<Prepared> {
    let ns = pod.namespace().unwrap_or_default();
    let spec = pod.spec.as_ref().context("the pod has no spec")?;
    let volumes: HashMap<&str, &Volume> = spec.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let volume = volumes
            .get(m.name.as_str())
            .ok_or_else(|| pod_error("UnsupportedVolume", format!("volume mount {} names no volume", m.name)))?;
        let mut local = materialise(ctx, pod, volume, dir, ip).await?;
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            local = local.join(sub);
        }
        mounts.push((m.mount_path.trim_end_matches('/').to_string(), local));
    }
    // Longest mount path first, so /a/b wins over /a.
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let rewrite = |value: &str| -> String {
        for (mount, local) in &mounts {
            if mount.is_empty() {
                continue;
            }
            if value == mount {
                return local.to_string_lossy().into_owned();
            }
            if let Some(rest) = value.strip_prefix(mount.as_str()).and_then(|r| r.strip_prefix('/')) {
                return local.join(rest).to_string_lossy().into_owned();
            }
        }
        value.to_string()
    };

    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()));
    if let Ok(home) = std::env::var("HOME") {
        env.insert("HOME".into(), home);
    }
    env.insert("HOSTNAME".into(), pod.name_any());
    env.insert("TMPDIR".into(), dir.join("tmp").to_string_lossy().into_owned());
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(s) = &from.secret_ref {
            let optional = s.optional.unwrap_or(false);
            if let Some(data) = secret_data(ctx, &ns, &s.name, optional).await? {
                for (k, v) in data {
                    env.insert(format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                }
            }
        }
        if let Some(c) = &from.config_map_ref {
            let optional = c.optional.unwrap_or(false);
            if let Some(data) = config_map_data(ctx, &ns, &c.name, optional).await? {
                for (k, v) in data {
                    env.insert(format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
                }
            }
        }
    }
    for e in container.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            Some(expand(v, &env))
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                Some(field(pod, &f.field_path, ip)?)
            } else if let Some(s) = &from.secret_key_ref {
                let data = secret_data(ctx, &ns, &s.name, s.optional.unwrap_or(false)).await?;
                key_of(data, &s.key, &s.name, "Secret", s.optional.unwrap_or(false))?
            } else if let Some(c) = &from.config_map_key_ref {
                let data = config_map_data(ctx, &ns, &c.name, c.optional.unwrap_or(false)).await?;
                key_of(data, &c.key, &c.name, "ConfigMap", c.optional.unwrap_or(false))?
            } else {
                return Err(pod_error(
                    "UnsupportedEnv",
                    format!("env {}: only fieldRef, secretKeyRef and configMapKeyRef are supported", e.name),
                ));
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.insert(e.name.clone(), rewrite(&v));
        }
    }

    let mut argv: Vec<String> =
        container.command.iter().flatten().chain(container.args.iter().flatten()).cloned().collect();
    if argv.is_empty() {
        return Err(pod_error("NoCommand", "the container has no command; the dev node cannot run images"));
    }
    for a in argv.iter_mut() {
        *a = rewrite(&expand(a, &env));
    }
    let first = argv.remove(0);
    let program = if first == "llmops-worker" || first.ends_with("/llmops-worker") {
        ctx.config.worker_binary.clone()
    } else {
        PathBuf::from(first)
    };
    let working_dir = container.working_dir.as_deref().map(|w| PathBuf::from(rewrite(w))).unwrap_or(dir.to_path_buf());
    Ok(Prepared { program, args: argv, env, working_dir })
}

/// `$(NAME)` references to earlier variables, as the kubelet expands them (`$$` escapes).
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(v) = env.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field(pod: &Pod, path: &str, ip: &str) -> Result<String> {
    let meta = &pod.metadata;
    let lookup = |map: &Option<BTreeMap<String, String>>, key: &str| -> String {
        map.as_ref().and_then(|m| m.get(key).cloned()).unwrap_or_default()
    };
    let bracketed = |prefix: &str| path.strip_prefix(prefix).and_then(|r| r.strip_suffix("']")).map(str::to_string);
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "status.podIP" => ip.to_string(),
        "status.podIPs" => ip.to_string(),
        "status.hostIP" | "status.hostIPs" => "127.0.0.1".to_string(),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        _ => {
            if let Some(k) = bracketed("metadata.labels['") {
                lookup(&meta.labels, &k)
            } else if let Some(k) = bracketed("metadata.annotations['") {
                lookup(&meta.annotations, &k)
            } else {
                return Err(pod_error("UnsupportedEnv", format!("fieldRef {path} is not supported by the dev node")));
            }
        }
    })
}

fn key_of(
    data: Option<BTreeMap<String, Vec<u8>>>,
    key: &str,
    name: &str,
    kind: &str,
    optional: bool,
) -> Result<Option<String>> {
    match data.and_then(|d| d.get(key).cloned()) {
        Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
        None if optional => Ok(None),
        None => Err(pod_error(CONFIG_ERROR, format!("couldn't find key {key} in {kind} {name}"))),
    }
}

async fn secret_data(ctx: &Ctx, ns: &str, name: &str, optional: bool) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match api.get_opt(name).await? {
        Some(s) => {
            let mut data: BTreeMap<String, Vec<u8>> =
                s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            Ok(Some(data))
        }
        None if optional => Ok(None),
        None => Err(pod_error(CONFIG_ERROR, format!("secret \"{name}\" not found"))),
    }
}

async fn config_map_data(ctx: &Ctx, ns: &str, name: &str, optional: bool) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    match api.get_opt(name).await? {
        Some(c) => {
            let mut data: BTreeMap<String, Vec<u8>> =
                c.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            for (k, v) in c.binary_data.unwrap_or_default() {
                data.insert(k, v.0);
            }
            Ok(Some(data))
        }
        None if optional => Ok(None),
        None => Err(pod_error(CONFIG_ERROR, format!("configmap \"{name}\" not found"))),
    }
}

/// Writes `data` (all keys, or the listed items) as files into `target`.
fn write_files(
    target: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: Option<i32>,
    what: &str,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(target)?;
    let files: Vec<(String, String, Option<i32>)> = match items {
        Some(items) => items.iter().map(|i| (i.key.clone(), i.path.clone(), i.mode)).collect(),
        None => data.keys().map(|k| (k.clone(), k.clone(), None)).collect(),
    };
    for (key, path, mode) in files {
        if path.split('/').any(|p| p == "..") || path.starts_with('/') {
            return Err(pod_error("UnsupportedVolume", format!("{what}: path {path} leaves the volume")));
        }
        let bytes = data.get(&key).ok_or_else(|| pod_error(CONFIG_ERROR, format!("{what} has no key {key}")))?;
        let file = target.join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, bytes)?;
        // The process runs as this user, so keep the owner's read bit whatever the mode.
        let mode = mode.or(default_mode).unwrap_or(0o644) as u32 | 0o400;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Makes a volume local and returns where it is.
async fn materialise(ctx: &Ctx, pod: &Pod, volume: &Volume, dir: &Path, ip: &str) -> Result<PathBuf> {
    let ns = &pod.namespace().unwrap_or_default();
    let target = dir.join("volumes").join(&volume.name);
    if let Some(s) = &volume.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let optional = s.optional.unwrap_or(false);
        let data = secret_data(ctx, ns, &name, optional).await?.unwrap_or_default();
        write_files(&target, &data, s.items.as_ref(), s.default_mode, &format!("secret {name}"))?;
        return Ok(target);
    }
    if let Some(c) = &volume.config_map {
        let optional = c.optional.unwrap_or(false);
        let data = config_map_data(ctx, ns, &c.name, optional).await?.unwrap_or_default();
        write_files(&target, &data, c.items.as_ref(), c.default_mode, &format!("configmap {}", c.name))?;
        return Ok(target);
    }
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(&target)?;
        return Ok(target);
    }
    if let Some(h) = &volume.host_path {
        let path = PathBuf::from(&h.path);
        match h.type_.as_deref() {
            Some("DirectoryOrCreate") => {
                std::fs::create_dir_all(&path).with_context(|| format!("creating hostPath {}", path.display()))?
            }
            Some("Directory") if !path.is_dir() => {
                return Err(pod_error("HostPathMissing", format!("hostPath {} is not a directory", path.display())));
            }
            Some("File") if !path.is_file() => {
                return Err(pod_error("HostPathMissing", format!("hostPath {} is not a file", path.display())));
            }
            _ => {}
        }
        return Ok(path);
    }
    if let Some(p) = &volume.projected {
        std::fs::create_dir_all(&target)?;
        for source in p.sources.iter().flatten() {
            if let Some(s) = &source.secret {
                let optional = s.optional.unwrap_or(false);
                let data = secret_data(ctx, ns, &s.name, optional).await?.unwrap_or_default();
                write_files(&target, &data, s.items.as_ref(), p.default_mode, &format!("secret {}", s.name))?;
            } else if let Some(c) = &source.config_map {
                let optional = c.optional.unwrap_or(false);
                let data = config_map_data(ctx, ns, &c.name, optional).await?.unwrap_or_default();
                write_files(&target, &data, c.items.as_ref(), p.default_mode, &format!("configmap {}", c.name))?;
            } else if let Some(d) = &source.downward_api {
                let mut data = BTreeMap::new();
                let mut items = Vec::new();
                for item in d.items.iter().flatten() {
                    let Some(f) = &item.field_ref else {
                        return Err(pod_error("UnsupportedVolume", "downwardAPI items need a fieldRef here"));
                    };
                    data.insert(item.path.clone(), field(pod, &f.field_path, ip)?.into_bytes());
                    items.push(k8s_openapi::api::core::v1::KeyToPath {
                        key: item.path.clone(),
                        path: item.path.clone(),
                        mode: item.mode,
                    });
                }
                write_files(&target, &data, Some(&items), p.default_mode, "downwardAPI")?;
            } else if let Some(t) = &source.service_account_token {
                // The kube-api-access-* volume the apiserver adds: a real bound token.
                let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or("default".into());
                let request = k8s_openapi::api::authentication::v1::TokenRequest {
                    spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
                        audiences: t.audience.clone().into_iter().collect(),
                        expiration_seconds: t.expiration_seconds,
                        bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some(pod.name_any()),
                            uid: pod.uid(),
                        }),
                    },
                    ..Default::default()
                };
                let api: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
                let token = api
                    .create_token_request(&sa, &Default::default(), &request)
                    .await
                    .map_err(|e| pod_error(CONFIG_ERROR, format!("requesting a token of service account {sa}: {e}")))?;
                let data = [(t.path.clone(), token.status.map(|s| s.token).unwrap_or_default().into_bytes())].into();
                write_files(&target, &data, None, p.default_mode, "serviceAccountToken")?;
            } else {
                return Err(pod_error(
                    "UnsupportedVolume",
                    format!("projected volume {}: unsupported source", volume.name),
                ));
            }
        }
        return Ok(target);
    }
    let kind = serde_json::to_value(volume)
        .ok()
        .and_then(|v| v.as_object().and_then(|o| o.keys().find(|k| *k != "name").cloned()))
        .unwrap_or_else(|| "unknown".into());
    Err(pod_error(
        "UnsupportedVolume",
        format!(
            "volume {} is a {kind} volume; the dev node supports only secret, configMap, projected, emptyDir and hostPath \
             (use --store-host-path for the artifact store)",
            volume.name
        ),
    ))
}

/// The last lines of a log, at most [`MESSAGE_BYTES`].
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut tail = lines[lines.len().saturating_sub(MESSAGE_LINES)..].join("\n");
    if tail.len() > MESSAGE_BYTES {
        let mut cut = tail.len() - MESSAGE_BYTES;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        tail = tail[cut..].to_string();
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("$(A)/y", &env), "x/y");
        assert_eq!(expand("$$(A) $(B) $", &env), "$(A) $(B) $");
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("llmops-dev-node-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("log");
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).expect("write");
        let tail = log_tail(&log);
        assert!(tail.starts_with("line 30") && tail.ends_with("line 49"), "{tail}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
