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
//!
//! Long-running (serving) pods get what a kubelet gives them:
//! - **Mount paths in files.** `LLMOPS_PATH_MAP` ([`PATH_MAP_ENV`]) maps each mount path
//!   to its local directory, for paths that a mounted Assignment names.
//! - **Listen address.** Every process has `LLMOPS_LISTEN_HOST` ([`LISTEN_HOST_ENV`]) set
//!   to its own 127.0.0.x, the pod IP. A server binds there rather than 0.0.0.0, so that
//!   several serving pods on one machine can use the same port, and others reach it at
//!   the pod IP as they would in a cluster. (Set before the container's env: the spec
//!   can override it or refer to it as `$(LLMOPS_LISTEN_HOST)`.)
//! - **Readiness.** With a `readinessProbe` of `httpGet` (HTTP; port a number or a
//!   named container port; host the pod IP unless given) or `tcpSocket`, the container
//!   is unready until the probe succeeds, probed as the kubelet does
//!   (`initialDelaySeconds`, `periodSeconds` 10, `timeoutSeconds` 1, `successThreshold`
//!   1, `failureThreshold` 3 by default; an answer from 200 to 399 succeeds). The
//!   `Ready` and `ContainersReady` conditions and `containerStatuses[].ready` follow,
//!   patched when readiness changes. Without a probe (or with an exec or gRPC probe,
//!   which cannot run here and is ignored with a warning) it is ready once started.
//! - **Restarts.** With `restartPolicy: Always` (or `OnFailure` and a non-zero exit) a
//!   process that exits is started again in the same pod, with the same address, after
//!   a back-off of 1 s doubling to 30 s (the kubelet's 10 s to 5 min would stall tests;
//!   a run of a minute starts it over). Between tries the container is `waiting` with
//!   reason `CrashLoopBackOff`; `restartCount` counts the restarts and
//!   `lastState.terminated` holds the previous exit (code, `Error`/`Completed`, the
//!   tail of that run's log); the phase stays Running. With `Never` (Jobs) the pod ends
//!   Succeeded or Failed with the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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
/// The env variable that tells each process its own 127.0.0.x address, the one to
/// listen on: serving pods that all bound 0.0.0.0 would collide on their port.
pub const LISTEN_HOST_ENV: &str = "LLMOPS_LISTEN_HOST";
/// Env of every process: a JSON object from each volume mount path of the container to
/// the directory the volume was materialised in (the worker maps Assignment paths with it).
pub const PATH_MAP_ENV: &str = "LLMOPS_PATH_MAP";
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
    /// Local binaries for other programs: a container whose command (or, without a
    /// command, whose image's last path segment before the tag) is a key runs that file.
    pub binaries: BTreeMap<String, PathBuf>,
    /// The apiserver as pods reach it. A pod that mounts a service account token at
    /// [`SERVICE_ACCOUNT_DIR`] gets a kubeconfig with that token (`KUBECONFIG`), since a
    /// process cannot have files at that fixed path, and `KUBERNETES_SERVICE_HOST`/`_PORT`.
    pub apiserver: Option<ApiServer>,
}

/// Where the apiserver is, for pods that talk to it.
#[derive(Debug, Clone)]
pub struct ApiServer {
    /// https://HOST:PORT
    pub url: String,
    /// The cluster CA (PEM file), when the pod's volume carries none.
    pub ca_file: PathBuf,
}

/// Where the kubelet mounts a pod's service account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Places a custom resource's pods on the development node named `node` (its node
/// selector and the toleration of its taint), with no GPU and requests a node of this
/// machine holds (250m CPU, 1Gi).
pub fn place_on(manifest: &mut serde_json::Value, node: &str) {
    manifest["spec"]["resources"] = serde_json::json!({
        "gpus": 0,
        "cpu": "250m",
        "memory": "1Gi",
        "nodeSelector": {NODE_LABEL: "true", "kubernetes.io/hostname": node},
        "tolerations": [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
    });
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
            binaries: BTreeMap::new(),
            apiserver: None,
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
        // The client's connection tasks may live on the runtime that is dropping this (a
        // current-thread test runtime cannot run them meanwhile): wait a few seconds at
        // most, rather than for ever.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let deleted = tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| {
                rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        Api::<Node>::all(client).delete(&name, &DeleteParams::default()),
                    )
                    .await
                })
            });
            let _ = done_tx.send(deleted.is_ok());
        });
        let _ = done_rx.recv_timeout(Duration::from_secs(6));
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

    let policy = pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into());
    let log_path = dir.join("log");
    let mut history = History { pod_started: now(), restarts: 0, last: None };
    let mut backoff = BACKOFF_START;
    loop {
        let run = run_container(ctx, pod, &prepared, &log_path, ip, &history, stop).await?;
        let stopping = *stop.borrow();
        let code = run.code;
        let restart = stopping.is_none()
            && match policy.as_str() {
                "Always" => true,
                "OnFailure" => code != 0,
                _ => false,
            };
        let reason = if code == 0 { "Completed" } else { "Error" };
        let message = if code == 0 { String::new() } else { log_tail(&log_path, run.log_offset) };
        if !restart {
            let phase = if code == 0 { "Succeeded" } else { "Failed" };
            let mut status =
                terminal_status(pod, Some((code, &run.started, &run.container_id)), phase, reason, &message);
            history.annotate(&mut status);
            if stopping == Some(Stop::Shutdown) {
                shut_down(&mut status);
            }
            report(&ctx.client, pod, status).await;
            return Ok(());
        }
        // Restarted in place, as a kubelet restarts a container: same pod, same address,
        // the previous exit kept as lastState, after a back-off that grows while it keeps
        // crashing.
        history.restarts += 1;
        history.last = Some(json!({"terminated": {
            "exitCode": code, "reason": reason, "message": message,
            "startedAt": run.started, "finishedAt": now(), "containerID": run.container_id,
        }}));
        if run.ran_for >= BACKOFF_RESET {
            backoff = BACKOFF_START;
        }
        let waiting = json!({"waiting": {
            "reason": CRASH_LOOP,
            "message": format!("back-off {}s restarting failed container={} pod={}_{}({})",
                backoff.as_secs(), container.name, pod.name_any(), pod.namespace().unwrap_or_default(),
                pod.uid().unwrap_or_default()),
        }});
        tracing::info!(pod = %key, code, restarts = history.restarts, ?backoff, "restarting after a back-off");
        report(&ctx.client, pod, history.status(&container, ip, None, false, waiting)).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            stopping = async { stop.wait_for(Option::is_some).await.ok().and_then(|s| *s) } => {
                if stopping == Some(Stop::Shutdown) {
                    let mut status = json!({"phase": "Failed", "conditions": ready_conditions(false, Some("PodFailed"))});
                    shut_down(&mut status);
                    report(&ctx.client, pod, status).await;
                }
                return Ok(());
            }
        }
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

/// The first back-off before a container is restarted; it doubles up to [`BACKOFF_CAP`].
/// The kubelet's are 10 s and 5 min; tests cannot wait that long.
const BACKOFF_START: Duration = Duration::from_secs(1);
/// The longest back-off.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A run at least this long starts the back-off over, as a kubelet forgets old crashes.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// The waiting reason of a container between restarts.
pub const CRASH_LOOP: &str = "CrashLoopBackOff";

/// Marks a status as ended by the dev node's own shutdown.
fn shut_down(status: &mut Value) {
    status["phase"] = "Failed".into();
    status["reason"] = "NodeShutdown".into();
    status["message"] = "the dev node stopped and terminated the pod".into();
}

/// What a pod's container has been through, carried across restarts.
struct History {
    /// The pod's `startTime`: its first start.
    pod_started: Time,
    restarts: i32,
    /// `lastState` of the container status: the previous exit.
    last: Option<Value>,
}

impl History {
    /// The status of a pod whose container is running or waiting to restart (phase
    /// Running), ready or not.
    fn status(&self, container: &Container, ip: &str, container_id: Option<&str>, ready: bool, state: Value) -> Value {
        let started = state.get("running").is_some();
        let mut status = json!({
            "name": container.name, "image": container.image.clone().unwrap_or_default(),
            "imageID": "", "ready": ready, "started": started, "restartCount": self.restarts, "state": state,
        });
        if let Some(id) = container_id {
            status["containerID"] = id.into();
        }
        if let Some(last) = &self.last {
            status["lastState"] = last.clone();
        }
        json!({
            "phase": "Running",
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": self.pod_started,
            "conditions": ready_conditions(ready, (!ready).then_some("ContainersNotReady")),
            "containerStatuses": [status],
        })
    }

    /// Adds the restarts to a terminal status (a pod that never restarted keeps exactly
    /// the status of a run-once pod).
    fn annotate(&self, status: &mut Value) {
        if self.restarts == 0 {
            return;
        }
        if let Some(c) = status.get_mut("containerStatuses").and_then(|c| c.get_mut(0)) {
            c["restartCount"] = self.restarts.into();
            if let Some(last) = &self.last {
                c["lastState"] = last.clone();
            }
        }
    }
}

/// One run of the container's process, ended.
struct Ran {
    code: i32,
    started: Time,
    container_id: String,
    ran_for: Duration,
    /// Where this run's output starts in the log.
    log_offset: u64,
}

/// Starts the process once, reports it Running (Ready at once, or when its readiness
/// probe says so), and waits until it exits or is stopped.
async fn run_container(
    ctx: &Ctx,
    pod: &Pod,
    prepared: &Prepared,
    log_path: &Path,
    ip: &str,
    history: &History,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Result<Ran> {
    let key = pod_key(pod);
    let container = container_of(pod).context("the pod has no container")?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path)?;
    let log_offset = log.metadata()?.len();
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
    let began = std::time::Instant::now();
    let mut child = Process(child);
    let pid = child.0.id() as i32;
    let container_id = format!("local-process://{pid}");
    let started = now();
    tracing::info!(pod = %key, pid, ip, program = %prepared.program.display(), "started");
    let mut probe = Readiness::of(container, ip);
    let mut ready = probe.is_none();
    let running = || json!({"running": {"startedAt": started}});
    report(&ctx.client, pod, history.status(container, ip, Some(&container_id), ready, running())).await;

    let exit = loop {
        let next_probe = probe.as_ref().map(|p| p.next);
        tokio::select! {
            exit = child.wait() => break exit?,
            stopping = async { stop.wait_for(Option::is_some).await.ok().and_then(|s| *s) } => {
                let grace = match stopping {
                    Some(Stop::Deleted { grace }) => grace,
                    _ => SHUTDOWN_GRACE,
                };
                tracing::info!(pod = %key, pid, ?grace, "stopping");
                child.signal(Signal::SIGTERM);
                break match tokio::time::timeout(grace, child.wait()).await {
                    Ok(exit) => exit?,
                    Err(_) => {
                        child.signal(Signal::SIGKILL);
                        child.wait().await?
                    }
                };
            }
            _ = tokio::time::sleep_until(next_probe.unwrap_or_else(tokio::time::Instant::now)), if next_probe.is_some() => {
                let Some(p) = probe.as_mut() else { continue };
                let now_ready = p.probe().await;
                if now_ready != ready {
                    ready = now_ready;
                    tracing::info!(pod = %key, ready, "readiness changed");
                    report(&ctx.client, pod, history.status(container, ip, Some(&container_id), ready, running())).await;
                }
            }
        }
    };
    // Whatever it left behind goes with it, as with a container.
    child.signal(Signal::SIGKILL);
    let code = exit.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&exit).unwrap_or(9));
    tracing::info!(pod = %key, pid, code, "exited");
    Ok(Ran { code, started, container_id, ran_for: began.elapsed(), log_offset })
}

/// What a readiness probe checks.
#[derive(Debug, Clone, PartialEq)]
enum ProbeTarget {
    /// An HTTP GET that succeeds with a status from 200 to 399.
    Http { host: String, port: u16, path: String, headers: Vec<(String, String)> },
    /// A TCP connection that opens.
    Tcp { host: String, port: u16 },
    /// A named port the container does not declare: fails, as the kubelet's does.
    Unresolved(String),
}

/// A container's readiness probe and its state, as the kubelet's prober keeps it.
#[derive(Debug)]
struct Readiness {
    target: ProbeTarget,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    /// When the next probe is due.
    next: tokio::time::Instant,
    successes: u32,
    failures: u32,
    ready: bool,
}

impl Readiness {
    /// The container's `readinessProbe` (httpGet or tcpSocket; the host defaults to the
    /// pod IP), with the kubelet's defaults; None without one. An exec or gRPC probe
    /// cannot be run here: it is left out with a warning, so the container is ready once
    /// started, as without a probe.
    fn of(container: &Container, ip: &str) -> Option<Self> {
        let probe = container.readiness_probe.as_ref()?;
        let port = |p: &IntOrString| -> Result<u16, String> {
            match p {
                IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is out of range")),
                IntOrString::String(name) => container
                    .ports
                    .iter()
                    .flatten()
                    .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                    .and_then(|cp| u16::try_from(cp.container_port).ok())
                    .ok_or_else(|| format!("the container has no port named {name}")),
            }
        };
        let host = |h: &Option<String>| h.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| ip.to_string());
        let target = if let Some(h) = &probe.http_get {
            if h.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case("HTTP")) {
                tracing::warn!(container = %container.name, scheme = ?h.scheme, "only HTTP probes run here; ignoring the probe");
                return None;
            }
            let path = h.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
            let path = if path.starts_with('/') { path } else { format!("/{path}") };
            let headers = h.http_headers.iter().flatten().map(|x| (x.name.clone(), x.value.clone())).collect();
            match port(&h.port) {
                Ok(port) => ProbeTarget::Http { host: host(&h.host), port, path, headers },
                Err(e) => ProbeTarget::Unresolved(e),
            }
        } else if let Some(t) = &probe.tcp_socket {
            match port(&t.port) {
                Ok(port) => ProbeTarget::Tcp { host: host(&t.host), port },
                Err(e) => ProbeTarget::Unresolved(e),
            }
        } else {
            tracing::warn!(container = %container.name, "only httpGet and tcpSocket probes run here; ignoring the probe");
            return None;
        };
        let seconds = |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
        Some(Self {
            target,
            period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
            next: tokio::time::Instant::now() + seconds(probe.initial_delay_seconds, 0),
            successes: 0,
            failures: 0,
            ready: false,
        })
    }

    /// Probes once, schedules the next probe, and returns the readiness.
    async fn probe(&mut self) -> bool {
        let outcome = check(&self.target, self.timeout).await;
        if let Err(e) = &outcome {
            tracing::debug!(target = ?self.target, error = %e, "readiness probe failed");
        }
        self.next = tokio::time::Instant::now() + self.period;
        self.record(outcome.is_ok())
    }

    /// Counts a result: `successThreshold` successes in a row make the container ready,
    /// `failureThreshold` failures in a row unready.
    fn record(&mut self, ok: bool) -> bool {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= self.success_threshold {
                self.ready = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.failure_threshold {
                self.ready = false;
            }
        }
        self.ready
    }
}

/// Runs one probe within `timeout`.
async fn check(target: &ProbeTarget, timeout: Duration) -> Result<()> {
    let target = target.clone();
    let blocking = tokio::task::spawn_blocking(move || match &target {
        ProbeTarget::Http { host, port, path, headers } => {
            let code = http_get(host, *port, path, headers, timeout)?;
            if (200..400).contains(&code) { Ok(()) } else { bail!("HTTP probe failed with statuscode: {code}") }
        }
        ProbeTarget::Tcp { host, port } => {
            connect(host, *port, timeout)?;
            Ok(())
        }
        ProbeTarget::Unresolved(why) => bail!("{why}"),
    });
    // The socket timeouts bound each step; this bounds the whole probe.
    match tokio::time::timeout(timeout + Duration::from_millis(500), blocking).await {
        Ok(joined) => joined?,
        Err(_) => bail!("the probe timed out after {timeout:?}"),
    }
}

fn connect(host: &str, port: u16, timeout: Duration) -> Result<std::net::TcpStream> {
    use std::net::ToSocketAddrs;
    let addr = (host, port).to_socket_addrs()?.next().with_context(|| format!("{host} has no address"))?;
    Ok(std::net::TcpStream::connect_timeout(&addr, timeout)?)
}

/// A plain HTTP/1.1 GET, as the kubelet's prober sends it; returns the status code.
fn http_get(host: &str, port: u16, path: &str, headers: &[(String, String)], timeout: Duration) -> Result<u16> {
    use std::io::{Read, Write};
    let mut stream = connect(host, port, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {host}:{port}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("user-agent")) {
        request.push_str("User-Agent: kube-probe/llmops-dev-node\r\n");
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("Accept: */*\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    // Only the status line matters.
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default();
    let mut fields = line.split_whitespace();
    match (fields.next(), fields.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => bail!("not an HTTP response: {line:?}"),
    }
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
            if sub.split('/').any(|part| part == ".." || part.is_empty()) || sub.starts_with('/') {
                return Err(pod_error("InvalidSubPath", format!("volume mount {}: subPath {sub:?}", m.name)));
            }
            local = local.join(sub);
            // Like the kubelet, which creates a missing subPath directory.
            if volume.host_path.is_some() || volume.empty_dir.is_some() {
                std::fs::create_dir_all(&local).with_context(|| format!("creating subPath {}", local.display()))?;
            }
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
    // Before the container's env, so that the spec can override it and refer to it.
    env.insert(LISTEN_HOST_ENV.into(), ip.to_string());
    // Paths the worker reads from its Assignment (not from env or arguments, which are
    // rewritten above) are mapped by the worker itself.
    let path_map: BTreeMap<&str, String> =
        mounts.iter().map(|(m, local)| (m.as_str(), local.to_string_lossy().into_owned())).collect();
    env.insert(PATH_MAP_ENV.into(), serde_json::to_string(&path_map)?);
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

    // In-cluster credentials: a kubeconfig of the mounted token, since the process
    // cannot have them at the fixed path client libraries read.
    if let (Some(api), Some((_, local))) =
        (&ctx.config.apiserver, mounts.iter().find(|(m, _)| m == SERVICE_ACCOUNT_DIR))
    {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, service_account_kubeconfig(api, local)?)?;
        env.insert("KUBECONFIG".into(), kubeconfig.to_string_lossy().into_owned());
        let authority = api.url.trim_start_matches("https://").trim_end_matches('/');
        let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "443"));
        env.insert("KUBERNETES_SERVICE_HOST".into(), host.to_string());
        env.insert("KUBERNETES_SERVICE_PORT".into(), port.to_string());
    }

    let command: Vec<String> = container.command.iter().flatten().cloned().collect();
    // Without a command, the image's entrypoint: known only for the images mapped to
    // local binaries (by the image's name).
    let image_program = || {
        let image = container.image.clone().unwrap_or_default();
        let name = image.rsplit('/').next().unwrap_or_default();
        let name = name.split(['@', ':']).next().unwrap_or_default().to_string();
        ctx.config.binaries.contains_key(&name).then_some(name)
    };
    let mut argv: Vec<String> = match (command.is_empty(), image_program()) {
        (true, Some(program)) => std::iter::once(program).chain(container.args.iter().flatten().cloned()).collect(),
        _ => command.into_iter().chain(container.args.iter().flatten().cloned()).collect(),
    };
    if argv.is_empty() {
        return Err(pod_error("NoCommand", "the container has no command; the dev node cannot run images"));
    }
    for a in argv.iter_mut() {
        *a = rewrite(&expand(a, &env));
    }
    let first = argv.remove(0);
    let base = first.rsplit('/').next().unwrap_or_default().to_string();
    let program = if base == "llmops-worker" {
        ctx.config.worker_binary.clone()
    } else if let Some(binary) = ctx.config.binaries.get(&base) {
        binary.clone()
    } else {
        PathBuf::from(first)
    };
    let working_dir = container.working_dir.as_deref().map(|w| PathBuf::from(rewrite(w))).unwrap_or(dir.to_path_buf());
    Ok(Prepared { program, args: argv, env, working_dir })
}

/// A kubeconfig that authenticates with the token file of a mounted service account
/// volume (`token`, `ca.crt`, `namespace`), against `api`.
fn service_account_kubeconfig(api: &ApiServer, volume: &Path) -> Result<String> {
    let ca = volume.join("ca.crt");
    let ca = if ca.is_file() { ca } else { api.ca_file.clone() };
    let namespace = std::fs::read_to_string(volume.join("namespace")).unwrap_or_else(|_| "default".into());
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {"server": api.url, "certificate-authority": ca}}],
        "users": [{"name": "service-account", "user": {"tokenFile": volume.join("token")}}],
        "contexts": [{"name": "in-cluster", "context": {
            "cluster": "in-cluster", "user": "service-account", "namespace": namespace.trim(),
        }}],
        "current-context": "in-cluster",
    });
    Ok(serde_yaml_ng::to_string(&config)?)
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

/// The last lines of a log written from byte `from` on (one run of a container that
/// restarts), at most [`MESSAGE_BYTES`].
fn log_tail(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let bytes = bytes.get(usize::try_from(from).unwrap_or(usize::MAX)..).unwrap_or_default();
    let text = String::from_utf8_lossy(bytes);
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

    fn text_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or_default()
    }

    #[test]
    fn references_expand_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("$(A)/y", &env), "x/y");
        assert_eq!(expand("$$(A) $(B) $", &env), "$(A) $(B) $");
    }

    #[test]
    fn readiness_needs_its_thresholds_in_a_row() {
        let container: Container = serde_json::from_value(json!({
            "name": "c", "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "http"}, "successThreshold": 2, "failureThreshold": 2},
        }))
        .expect("container");
        let mut r = Readiness::of(&container, "127.0.0.7").expect("a probe");
        let expected = ProbeTarget::Http { host: "127.0.0.7".into(), port: 8080, path: "/".into(), headers: vec![] };
        assert_eq!(r.target, expected);
        assert_eq!((r.period, r.timeout), (Duration::from_secs(10), Duration::from_secs(1)));
        assert!(!r.record(true), "one success of two");
        assert!(r.record(true));
        assert!(r.record(false), "one failure of two");
        assert!(!r.record(false));
        let no_probe: Container = serde_json::from_value(json!({"name": "c"})).expect("container");
        assert!(Readiness::of(&no_probe, "127.0.0.7").is_none());
    }

    #[test]
    fn http_probes_read_the_status_line() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            for (status, stream) in ["200 OK", "404 Not Found"].into_iter().zip(listener.incoming()) {
                let mut stream = stream.expect("accept");
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).expect("read");
                assert!(request[..n].starts_with(b"GET /x HTTP/1.1\r\n"));
                stream.write_all(format!("HTTP/1.0 {status}\r\n\r\n").as_bytes()).expect("write");
            }
        });
        let get = || http_get("127.0.0.1", port, "/x", &[], Duration::from_secs(5)).expect("get");
        assert_eq!(get(), 200);
        assert_eq!(get(), 404);
        server.join().expect("server");
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("llmops-dev-node-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("log");
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).expect("write");
        let tail = log_tail(&log, 0);
        assert!(tail.starts_with("line 30") && tail.ends_with("line 49"), "{tail}");
        let offset = text_len(&log) - "line 49\n".len() as u64;
        assert_eq!(log_tail(&log, offset), "line 49", "only what a run wrote from its offset on");
        let _ = std::fs::remove_dir_all(dir);
    }
}
