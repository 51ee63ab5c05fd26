//! `logs`: the logs of the worker pods that ran an object (labelled `llmops.dev/uid`),
//! read through the kubelet log API, and a clear word instead when the pod's node has no
//! kubelet API to ask, as the development node has not.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, LogParams};
use kube::{Client, ResourceExt};

use crate::objects::{Kind, ObjectRef};

/// The label every worker pod carries: the uid of the object it works for.
pub const UID_LABEL: &str = "llmops.dev/uid";
/// The label of the development node (`llmops-dev-node`).
pub const DEV_NODE_LABEL: &str = "llmops.dev/dev-node";
/// The container runtime the development node reports: processes, not containers.
pub const DEV_NODE_RUNTIME: &str = "local-process://";

/// Why logs could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// The object does not exist.
    #[error("{object} not found in namespace {namespace}")]
    NotFound {
        /// The object.
        object: ObjectRef,
        /// Its namespace.
        namespace: String,
    },
    /// PromptVersions are reconciled by the operator alone.
    #[error("{object} runs no pods: a PromptVersion is checked by the operator itself (see `kubectl llmops status`)")]
    NoWorkload {
        /// The object.
        object: ObjectRef,
    },
    /// No pod carries the object's uid.
    #[error(
        "no pod of {object} in namespace {namespace} (label {selector}): the operator has not started one yet, \
         or they were deleted"
    )]
    NoPods {
        /// The object.
        object: ObjectRef,
        /// Its namespace.
        namespace: String,
        /// The label selector looked for.
        selector: String,
    },
    /// The pod is not bound to a node, so no kubelet has its logs.
    #[error("pod {pod} is not scheduled to a node yet{}: it has no logs", phase.as_ref().map(|p| format!(" (phase {p})")).unwrap_or_default())]
    NotScheduled {
        /// `namespace/name` of the pod.
        pod: String,
        /// Its phase.
        phase: Option<String>,
    },
    /// The node publishes no kubelet endpoint: the apiserver has nowhere to fetch logs.
    #[error("{}", no_kubelet_message(pod, node, dev_node.as_ref()))]
    NoKubelet {
        /// `namespace/name` of the pod.
        pod: String,
        /// The node it ran on.
        node: String,
        /// For the development node: where it keeps the pod's log.
        dev_node: Option<DevNodeLog>,
    },
    /// The node the pod ran on is gone, and its logs with it.
    #[error(
        "pod {pod} ran on node {node}, which no longer exists: the cluster has no logs of it{}",
        local.as_ref().map(|p| format!("\na development node's log file of the pod is on this machine: {}", p.display())).unwrap_or_default()
    )]
    NodeGone {
        /// `namespace/name` of the pod.
        pod: String,
        /// The node.
        node: String,
        /// A development node's log file of the pod, found on this machine.
        local: Option<PathBuf>,
    },
    /// The apiserver could not get the logs from the node's kubelet.
    #[error("cannot read the logs of pod {pod} from the kubelet of node {node}: {message}")]
    Kubelet {
        /// `namespace/name` of the pod.
        pod: String,
        /// The node.
        node: String,
        /// What the apiserver said.
        message: String,
    },
    /// Any other API failure.
    #[error("{what}")]
    Api {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The followed stream broke off.
    #[error("reading the logs of pod {pod}")]
    Stream {
        /// `namespace/name` of the pod.
        pod: String,
        /// What broke.
        #[source]
        source: std::io::Error,
    },
    /// Writing to stdout failed (a closed pipe).
    #[error("writing the logs: {0}")]
    Output(#[from] std::io::Error),
}

/// Where the development node keeps a pod's log, and whether this machine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevNodeLog {
    /// `<namespace>_<pod>/log`, relative to the dev node's `--work-dir`.
    pub relative: String,
    /// The file on this machine, when found, and how it was found.
    pub found: Option<(PathBuf, Found)>,
    /// Whether the user asked to follow.
    pub follow: bool,
}

/// How the log file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The pod's process runs on this machine and writes to it.
    RunningProcess,
    /// It exists in one of the work dirs the dev node is usually started with.
    UsualWorkDir,
}

fn no_kubelet_message(pod: &str, node: &str, dev_node: Option<&DevNodeLog>) -> String {
    let mut text = format!(
        "cannot read the logs of pod {pod}: node {node} serves no kubelet API (its status publishes no kubelet \
         endpoint), so the apiserver cannot fetch container logs from it"
    );
    let Some(dev) = dev_node else { return text };
    text.push_str(&format!(
        "\nnode {node} is an llmops development node (llmops-dev-node): it runs each pod as a local process and \
         writes the pod's output to <work-dir>/{rel} on the machine it runs on\n\
         <work-dir> is its --work-dir: $LLMOPS_CACHE/quickstart/pods (~/.cache/llmops/quickstart/pods) for \
         scripts/quickstart, $TMPDIR/llmops-dev-node-<namespace> for the cluster tests, else ./llmops-dev-node \
         where it was started",
        rel = dev.relative
    ));
    let reader = if dev.follow { "tail -f" } else { "cat" };
    match &dev.found {
        Some((path, how)) => {
            let how = match how {
                Found::RunningProcess => "the pod's process writes to it",
                Found::UsualWorkDir => "in a usual work dir",
            };
            text.push_str(&format!(
                "\nthe log file on this machine: {} ({how})\nread it with: {reader} {}",
                path.display(),
                path.display()
            ));
        }
        None => text.push_str(&format!(
            "\nit is in none of those places on this machine; where the dev node runs: {reader} <work-dir>/{}",
            dev.relative
        )),
    }
    text
}

/// The label selector of the pods that worked for the object with `uid`.
pub fn selector(uid: &str) -> String {
    format!("{UID_LABEL}={uid}")
}

/// Pods oldest first (creation time, then name), so that retries read in order and the
/// newest is last.
pub fn oldest_first(pods: &mut [Pod]) {
    pods.sort_by(|a, b| {
        let key = |p: &Pod| (p.metadata.creation_timestamp.as_ref().map(|t| t.0), p.name_any());
        key(a).cmp(&key(b))
    });
}

/// The port of the node's kubelet API, when its status publishes one.
pub fn kubelet_port(node: &Node) -> Option<i32> {
    node.status
        .as_ref()
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .map(|k| k.port)
        .filter(|p| *p > 0)
}

/// Whether the node is an llmops development node.
pub fn is_dev_node(node: &Node) -> bool {
    node.labels().get(DEV_NODE_LABEL).is_some_and(|v| v == "true")
        || node
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .is_some_and(|i| i.container_runtime_version.starts_with(DEV_NODE_RUNTIME))
}

/// The file the development node writes `pod`'s output to, looked up on this machine:
/// through the running process (`containerID` is `local-process://<pid>`, and its
/// stdout is the log file), else in the usual work dirs.
pub fn find_dev_node_log(pod: &Pod, candidates: &[PathBuf]) -> Option<(PathBuf, Found)> {
    let ns = pod.namespace().unwrap_or_default();
    let relative = Path::new(&format!("{ns}_{}", pod.name_any())).join("log");
    let pid = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.strip_prefix(DEV_NODE_RUNTIME))
        .and_then(|pid| pid.parse::<u32>().ok());
    if let Some(pid) = pid
        && let Ok(out) = std::fs::read_link(format!("/proc/{pid}/fd/1"))
        && out.ends_with(&relative)
        && out.is_file()
    {
        return Some((out, Found::RunningProcess));
    }
    candidates.iter().map(|dir| dir.join(&relative)).find(|p| p.is_file()).map(|p| (p, Found::UsualWorkDir))
}

/// The work dirs the development node is usually started with: the quick start's, the
/// cluster tests' for this namespace, and its default under the current directory.
pub fn usual_work_dirs(namespace: &str) -> Vec<PathBuf> {
    let cache = std::env::var_os("LLMOPS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llmops")));
    let mut dirs = Vec::new();
    if let Some(cache) = cache {
        dirs.push(cache.join("quickstart/pods"));
    }
    dirs.push(std::env::temp_dir().join(format!("llmops-dev-node-{namespace}")));
    dirs.push(PathBuf::from("llmops-dev-node"));
    dirs
}

/// What `logs` was asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The object.
    pub object: ObjectRef,
    /// Its namespace.
    pub namespace: String,
    /// Keep streaming the newest pod's log.
    pub follow: bool,
    /// Every pod, not only the newest.
    pub all_pods: bool,
    /// Only the last lines.
    pub tail: Option<i64>,
    /// The container, when a pod has several.
    pub container: Option<String>,
}

/// Writes the logs to `out`; the first pod that cannot give any ends it with the reason.
pub async fn show(client: &Client, req: &Request, out: &mut impl Write) -> Result<(), LogsError> {
    if req.object.kind == Kind::PromptVersion {
        return Err(LogsError::NoWorkload { object: req.object.clone() });
    }
    let api_error = |what: String| move |source| LogsError::Api { what, source };
    let meta = crate::objects::get_metadata(client, &req.namespace, &req.object)
        .await
        .map_err(api_error(format!("reading {}", req.object)))?
        .ok_or_else(|| LogsError::NotFound { object: req.object.clone(), namespace: req.namespace.clone() })?;
    let uid = meta.uid.unwrap_or_default();
    let selector = selector(&uid);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &req.namespace);
    let mut pods = pods_api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(api_error(format!("listing the pods of {}", req.object)))?
        .items;
    if pods.is_empty() {
        return Err(LogsError::NoPods { object: req.object.clone(), namespace: req.namespace.clone(), selector });
    }
    oldest_first(&mut pods);
    let chosen: Vec<Pod> = if req.all_pods { pods } else { pods.split_off(pods.len() - 1) };
    let count = chosen.len();
    for (i, pod) in chosen.iter().enumerate() {
        let last = i + 1 == count;
        if req.all_pods {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_else(|| "-".into());
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_else(|| "-".into());
            writeln!(out, "==> pod/{} (node {node}, {phase}; {} of {count}) <==", pod.name_any(), i + 1)?;
        }
        one_pod(client, &pods_api, pod, req, req.follow && last, out).await?;
        out.flush()?;
    }
    Ok(())
}

async fn one_pod(
    client: &Client,
    api: &Api<Pod>,
    pod: &Pod,
    req: &Request,
    follow: bool,
    out: &mut impl Write,
) -> Result<(), LogsError> {
    let name = pod.name_any();
    let full_name = format!("{}/{name}", req.namespace);
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        return Err(LogsError::NotScheduled { pod: full_name, phase });
    };
    let params = LogParams { follow, tail_lines: req.tail, container: req.container.clone(), ..LogParams::default() };
    let failure = if follow {
        match api.log_stream(&name, &params).await {
            Ok(stream) => {
                let mut lines = std::pin::pin!(stream.lines());
                loop {
                    match lines.try_next().await {
                        Ok(Some(line)) => {
                            writeln!(out, "{line}")?;
                            out.flush()?;
                        }
                        Ok(None) => return Ok(()),
                        Err(source) => return Err(LogsError::Stream { pod: full_name, source }),
                    }
                }
            }
            Err(e) => e,
        }
    } else {
        match api.logs(&name, &params).await {
            Ok(text) => {
                out.write_all(text.as_bytes())?;
                return Ok(());
            }
            Err(e) => e,
        }
    };
    Err(explain(client, pod, full_name, node, failure, follow).await)
}

/// Why the log call failed, judged from the node the pod ran on.
async fn explain(
    client: &Client,
    pod: &Pod,
    full_name: String,
    node: String,
    failure: kube::Error,
    follow: bool,
) -> LogsError {
    let message = match &failure {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    };
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.get_opt(&node).await {
        Ok(None) => {
            let local = find_dev_node_log(pod, &usual_work_dirs(&pod.namespace().unwrap_or_default())).map(|f| f.0);
            LogsError::NodeGone { pod: full_name, node, local }
        }
        Ok(Some(n)) if kubelet_port(&n).is_none() => {
            let dev_node = is_dev_node(&n).then(|| DevNodeLog {
                relative: format!("{}_{}/log", pod.namespace().unwrap_or_default(), pod.name_any()),
                found: find_dev_node_log(pod, &usual_work_dirs(&pod.namespace().unwrap_or_default())),
                follow,
            });
            LogsError::NoKubelet { pod: full_name, node, dev_node }
        }
        // A kubelet that is there but did not answer, or a node we may not read: what
        // the apiserver said is all there is.
        Ok(Some(_)) | Err(_) => LogsError::Kubelet { pod: full_name, node, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(value: serde_json::Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    fn pod(name: &str, created: &str, container_id: Option<&str>) -> Pod {
        let mut status = json!({"phase": "Running"});
        if let Some(id) = container_id {
            status["containerStatuses"] = json!([{"name": "worker", "image": "w", "imageID": "", "ready": true,
                "restartCount": 0, "containerID": id}]);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "team", "creationTimestamp": created},
            "spec": {"containers": [{"name": "worker"}], "nodeName": "llmops-dev"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_node_without_a_kubelet_endpoint_is_told_apart_and_the_dev_node_recognised() {
        let kubelet = node(
            json!({"metadata": {"name": "n"}, "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}}),
        );
        assert_eq!(kubelet_port(&kubelet), Some(10250));
        assert!(!is_dev_node(&kubelet));
        let dev = node(json!({"metadata": {"name": "llmops-dev", "labels": {"llmops.dev/dev-node": "true"}},
                              "status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": 0}}}}));
        assert_eq!(kubelet_port(&dev), None);
        assert!(is_dev_node(&dev));
        let by_runtime = node(json!({"metadata": {"name": "x"}, "status": {"nodeInfo": {
            "architecture": "", "bootID": "", "containerRuntimeVersion": "local-process://", "kernelVersion": "",
            "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "", "operatingSystem": "", "osImage": "",
            "systemUUID": ""}}}));
        assert!(is_dev_node(&by_runtime));
        assert_eq!(kubelet_port(&by_runtime), None);
    }

    #[test]
    fn pods_are_taken_oldest_first() {
        let mut pods = vec![
            pod("b", "2026-01-01T00:00:02Z", None),
            pod("a", "2026-01-01T00:00:01Z", None),
            pod("c", "2026-01-01T00:00:02Z", None),
        ];
        oldest_first(&mut pods);
        let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn the_dev_node_log_is_found_in_a_usual_work_dir() {
        let dir = std::env::temp_dir().join(format!("kubectl-llmops-logs-{}", std::process::id()));
        let log = dir.join("team_p").join("log");
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(&log, "hello\n").unwrap();
        // No such process: the pid is not ours to read, so the work dirs are looked at.
        let p = pod("p", "2026-01-01T00:00:00Z", Some("local-process://4194303"));
        assert_eq!(
            find_dev_node_log(&p, &[PathBuf::from("/nonexistent"), dir.clone()]),
            Some((log, Found::UsualWorkDir))
        );
        assert_eq!(find_dev_node_log(&pod("q", "2026-01-01T00:00:00Z", None), std::slice::from_ref(&dir)), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_no_kubelet_message_names_the_node_and_where_the_dev_node_keeps_the_log() {
        let plain = LogsError::NoKubelet { pod: "team/p".into(), node: "edge-1".into(), dev_node: None };
        assert_eq!(
            plain.to_string(),
            "cannot read the logs of pod team/p: node edge-1 serves no kubelet API (its status publishes no kubelet \
             endpoint), so the apiserver cannot fetch container logs from it"
        );
        let dev = LogsError::NoKubelet {
            pod: "team/p".into(),
            node: "llmops-dev".into(),
            dev_node: Some(DevNodeLog {
                relative: "team_p/log".into(),
                found: Some((PathBuf::from("/w/team_p/log"), Found::RunningProcess)),
                follow: true,
            }),
        };
        let text = dev.to_string();
        assert!(text.contains("node llmops-dev is an llmops development node"), "{text}");
        assert!(text.contains("<work-dir>/team_p/log"), "{text}");
        assert!(
            text.ends_with(
                "\nthe log file on this machine: /w/team_p/log (the pod's process writes to it)\n\
                 read it with: tail -f /w/team_p/log"
            ),
            "{text}"
        );
        let elsewhere = LogsError::NoKubelet {
            pod: "team/p".into(),
            node: "llmops-dev".into(),
            dev_node: Some(DevNodeLog { relative: "team_p/log".into(), found: None, follow: false }),
        };
        assert!(elsewhere.to_string().ends_with("where the dev node runs: cat <work-dir>/team_p/log"));
    }
}
