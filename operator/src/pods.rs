//! Why a worker pod is not doing its work, read from the pod's status: unschedulable
//! (with the scheduler's message), image pull failures, OOMKilled, a worker that exited
//! with an error. These become condition messages and events, so nobody has to read
//! pod descriptions to find the cause.

use k8s_openapi::api::core::v1::Pod;

/// A problem of a worker pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProblem {
    /// CamelCase reason for the condition.
    pub reason: String,
    /// What happened, with the pod's name.
    pub message: String,
}

/// The newest pod of a list (by creation time, then name).
pub fn newest(pods: &[Pod]) -> Option<&Pod> {
    pods.iter().max_by(|a, b| {
        let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ta.cmp(&tb).then_with(|| a.metadata.name.cmp(&b.metadata.name))
    })
}

/// Whether a pod is Ready (its readiness probe passes) and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether the pod's phase is Running.
pub fn is_running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// The problem of a pod, if it has one.
pub fn problem(pod: &Pod) -> Option<PodProblem> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let status = pod.status.as_ref()?;
    let found = |reason: &str, message: String| {
        Some(PodProblem { reason: reason.into(), message: format!("pod {name}: {message}") })
    };
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable") {
            let message = c.message.clone().unwrap_or_else(|| "no node fits the pod".into());
            return found("Unschedulable", message);
        }
    }
    for cs in status.container_statuses.iter().flatten().chain(status.init_container_statuses.iter().flatten()) {
        let Some(state) = &cs.state else { continue };
        if let Some(w) = &state.waiting {
            let reason = w.reason.as_deref().unwrap_or_default();
            let message = w.message.clone().unwrap_or_default();
            match reason {
                "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
                    return found("ImagePullFailed", format!("cannot pull image {}: {reason}: {message}", cs.image));
                }
                "CreateContainerConfigError" | "CreateContainerError" | "CrashLoopBackOff" | "RunContainerError" => {
                    return found(reason, message);
                }
                _ => {}
            }
        }
        if let Some(t) = &state.terminated {
            let detail = t.message.as_deref().map(str::trim).filter(|m| !m.is_empty());
            if t.reason.as_deref() == Some("OOMKilled") {
                let limit = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.iter().find(|c| c.name == cs.name))
                    .and_then(|c| c.resources.as_ref())
                    .and_then(|r| r.limits.as_ref())
                    .and_then(|l| l.get("memory"))
                    .map(|q| format!(" (memory limit {})", q.0))
                    .unwrap_or_default();
                return found("OOMKilled", format!("the worker ran out of memory{limit}; raise resources.memory"));
            }
            if t.exit_code != 0 {
                let text = detail.map(|d| format!(": {d}")).unwrap_or_default();
                return found("WorkerExited", format!("the worker exited with code {}{text}", t.exit_code));
            }
        }
    }
    if status.phase.as_deref() == Some("Failed") {
        let reason = status.reason.clone().unwrap_or_else(|| "PodFailed".into());
        return found(&reason, status.message.clone().unwrap_or_else(|| "the pod failed".into()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml_ng::from_str(yaml).expect("pod yaml")
    }

    #[test]
    fn unschedulable_carries_the_scheduler_message() {
        let p = pod(r#"
metadata: {name: p1}
status:
  phase: Pending
  conditions:
  - {type: PodScheduled, status: "False", reason: Unschedulable, message: "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
"#);
        let problem = problem(&p).expect("problem");
        assert_eq!(problem.reason, "Unschedulable");
        assert!(problem.message.contains("Insufficient nvidia.com/gpu"), "{}", problem.message);
        assert!(problem.message.contains("p1"));
    }

    #[test]
    fn oom_and_image_pull_and_exit_codes() {
        let oom = pod(r#"
metadata: {name: p2}
spec:
  containers: [{name: worker, resources: {limits: {memory: 1Gi}}}]
status:
  phase: Failed
  containerStatuses:
  - {name: worker, image: w, imageID: "", ready: false, restartCount: 0, state: {terminated: {exitCode: 137, reason: OOMKilled}}}
"#);
        let p = problem(&oom).expect("oom");
        assert_eq!(p.reason, "OOMKilled");
        assert!(p.message.contains("1Gi"));
        let pull = pod(r#"
metadata: {name: p3}
status:
  phase: Pending
  containerStatuses:
  - {name: worker, image: nope:1, imageID: "", ready: false, restartCount: 0, state: {waiting: {reason: ImagePullBackOff, message: "Back-off pulling image"}}}
"#);
        assert_eq!(problem(&pull).map(|p| p.reason), Some("ImagePullFailed".to_string()));
        let exited = pod(r#"
metadata: {name: p4}
status:
  phase: Failed
  containerStatuses:
  - {name: worker, image: w, imageID: "", ready: false, restartCount: 0, state: {terminated: {exitCode: 2, message: "bad input"}}}
"#);
        let p = problem(&exited).expect("exit");
        assert_eq!(p.reason, "WorkerExited");
        assert!(p.message.contains("code 2") && p.message.contains("bad input"), "{}", p.message);
        let running = pod("metadata: {name: p5}\nstatus: {phase: Running}\n");
        assert_eq!(problem(&running), None);
        assert!(is_running(&running));
    }
}
