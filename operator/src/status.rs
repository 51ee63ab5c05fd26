//! The status of a batch workload computed from what was observed: the Job, its newest
//! pod and what the worker reported through the gateway. Pure; the kinds add their own
//! figures on top.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use llmops_crds::condition_types::{FAILED, READY, SUCCEEDED};
use llmops_crds::{CommonStatus, JobTimes};

use crate::conditions::{self, Health};
use crate::gateway::Observed;
use crate::pods::PodProblem;

/// The status fields every batch kind has.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchState {
    /// observedGeneration, conditions and phase.
    pub common: CommonStatus,
    /// Start and completion times.
    pub times: JobTimes,
    /// Pods started.
    pub attempts: Option<i32>,
}

impl BatchState {
    /// Whether the workload Succeeded.
    pub fn succeeded(&self) -> bool {
        conditions::is_true(&self.common.conditions, SUCCEEDED)
    }

    /// Whether the workload Failed for good.
    pub fn failed(&self) -> bool {
        conditions::is_true(&self.common.conditions, FAILED)
    }

    /// Whether the workload finished, either way.
    pub fn finished(&self) -> bool {
        self.succeeded() || self.failed()
    }
}

/// What the Job says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobView {
    /// Pods running.
    pub active: i32,
    /// Pods that succeeded.
    pub succeeded: i32,
    /// Pods that failed.
    pub failed: i32,
    /// When the Job started.
    pub start_time: Option<Time>,
    /// The Job's Failed condition: (reason, message).
    pub failed_condition: Option<(String, String)>,
    /// Whether the Job is suspended.
    pub suspended: bool,
    /// The queue (Kueue) that admits the Job, when it has one.
    pub queue: Option<String>,
}

/// Everything a status is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// The Job, when it exists.
    pub job: Option<JobView>,
    /// The newest pod's problem.
    pub pod_problem: Option<PodProblem>,
    /// Whether the newest pod runs.
    pub pod_running: bool,
    /// What the gateway recorded.
    pub gateway: Option<Observed>,
    /// Whether the spec asks for suspension.
    pub suspend: bool,
}

fn phase_set(state: &mut BatchState, phase: &str) {
    state.common.phase = Some(phase.to_string());
}

/// Formats seconds as "1h2m3s", "12m30s" or "45s".
pub fn format_eta(seconds: f64) -> String {
    let total = seconds.max(0.0).round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// A one-line summary of progress for a condition message.
pub fn progress_message(observed: &Observed) -> String {
    let Some(p) = &observed.progress else {
        return match &observed.phase {
            Some((phase, message)) if !message.is_empty() => format!("{phase}: {message}"),
            Some((phase, _)) => phase.clone(),
            None => "the worker is running".into(),
        };
    };
    let mut parts = Vec::new();
    if p.total_steps > 0 {
        parts.push(format!("step {}/{}", p.step, p.total_steps));
    } else if p.step > 0 {
        parts.push(format!("step {}", p.step));
    }
    if let Some(records) = p.metrics.get("records") {
        parts.push(format!("{records} records"));
    }
    if let Some(loss) = p.metrics.get("loss") {
        parts.push(format!("loss {loss:.4}"));
    }
    if p.eta_seconds > 0.0 {
        parts.push(format!("ETA {}", format_eta(p.eta_seconds)));
    }
    if !p.message.is_empty() {
        parts.push(p.message.clone());
    }
    if parts.is_empty() { "the worker is running".into() } else { parts.join(", ") }
}

/// Computes the shared status of a batch workload. Returns the new state; the caller
/// compares it with the old one to decide on a write and on events.
pub fn compute(old: &BatchState, obs: &Observation, generation: Option<i64>, now: &Time) -> BatchState {
    let mut s = old.clone();
    s.common.observed_generation = generation;
    if let Some(job) = &obs.job {
        let attempts = job.active + job.succeeded + job.failed;
        s.attempts = Some(s.attempts.unwrap_or(0).max(attempts));
        if s.times.start_time.is_none() && (obs.pod_running || obs.gateway.as_ref().is_some_and(|g| g.pod.is_some())) {
            s.times.start_time = Some(job.start_time.clone().unwrap_or_else(|| now.clone()));
        }
    }
    let gateway = obs.gateway.clone().unwrap_or_default();

    let finish = |s: &mut BatchState, ok: bool, reason: &str, message: String| {
        let c = &mut s.common.conditions;
        conditions::set(c, READY, ok, reason, message.clone(), generation, now);
        conditions::set(c, SUCCEEDED, ok, reason, message.clone(), generation, now);
        conditions::set(c, FAILED, !ok, reason, message.clone(), generation, now);
        let health = if ok { Health::Settled } else { Health::Stalled };
        conditions::set_health(c, health, reason, &message, generation, now);
        phase_set(s, if ok { "Succeeded" } else { "Failed" });
        if s.times.completion_time.is_none() {
            s.times.completion_time = Some(now.clone());
        }
    };

    // A result from the gateway is the only way to succeed.
    if let Some(result) = &gateway.result {
        let digest = result.artifact.as_ref().map(|a| a.sha256.clone()).unwrap_or_default();
        if !old.succeeded() {
            finish(&mut s, true, "Succeeded", format!("the worker reported its result (sha256 {digest})"));
        }
        return s;
    }
    if old.finished() {
        return s;
    }
    if let Some(f) = gateway.failure.as_ref().filter(|f| !f.retryable) {
        finish(&mut s, false, &f.reason, format!("{} (reported by pod {})", f.message, f.pod));
        return s;
    }
    if let Some(job) = &obs.job {
        if let Some((job_reason, job_message)) = &job.failed_condition {
            let (reason, message) = match (&gateway.failure, &obs.pod_problem) {
                (Some(f), _) => (f.reason.clone(), format!("{} (last attempt, pod {})", f.message, f.pod)),
                (None, Some(p)) => (p.reason.clone(), p.message.clone()),
                (None, None) => (job_reason.clone(), job_message.clone()),
            };
            let attempts = s.attempts.unwrap_or(0);
            finish(&mut s, false, &reason, format!("{message}; gave up after {attempts} attempts"));
            return s;
        }
        if job.succeeded > 0 {
            finish(
                &mut s,
                false,
                "NoResult",
                "the worker pod exited successfully but never reported a result to the gateway".into(),
            );
            return s;
        }
    }
    let queued = obs.job.as_ref().filter(|j| j.suspended).and_then(|j| j.queue.clone());
    let (ready_reason, message, phase) = if obs.suspend {
        ("Suspended".to_string(), "suspended: the worker was asked to checkpoint and stop".to_string(), "Suspended")
    } else if let Some(queue) = queued {
        ("Queued".to_string(), format!("waiting for queue {queue} to admit the Job"), "Pending")
    } else {
        match (&obs.pod_problem, &gateway.failure) {
            (Some(p), Some(f)) if p.reason == "WorkerExited" => {
                (f.reason.clone(), format!("{}; retrying (attempt {})", f.message, s.attempts.unwrap_or(1)), "Retrying")
            }
            (Some(p), _) => {
                let phase =
                    if p.reason == "Unschedulable" || p.reason == "ImagePullFailed" { "Pending" } else { "Retrying" };
                (p.reason.clone(), p.message.clone(), phase)
            }
            (None, Some(f)) => (f.reason.clone(), format!("{}; retrying", f.message), "Retrying"),
            (None, None) if obs.pod_running || gateway.connected || gateway.progress.is_some() => {
                ("Running".to_string(), progress_message(&gateway), "Running")
            }
            (None, None) => ("Pending".to_string(), "waiting for the worker pod to start".to_string(), "Pending"),
        }
    };
    let conds = &mut s.common.conditions;
    conditions::set(conds, READY, false, &ready_reason, message.clone(), generation, now);
    conditions::set(conds, SUCCEEDED, false, &ready_reason, message.clone(), generation, now);
    conditions::set(conds, FAILED, false, &ready_reason, message.clone(), generation, now);
    // A suspended workload is not being worked on: it waits for the user.
    let health = if obs.suspend { Health::Settled } else { Health::Reconciling };
    conditions::set_health(conds, health, &ready_reason, &message, generation, now);
    phase_set(&mut s, phase);
    s
}

/// The state of a workload that cannot start: a reference is missing or not ready, or
/// the spec cannot work. Not a failure: it changes when the reference does.
pub fn waiting(old: &BatchState, reason: &str, message: &str, generation: Option<i64>, now: &Time) -> BatchState {
    let mut s = old.clone();
    s.common.observed_generation = generation;
    for t in [READY, SUCCEEDED, FAILED] {
        conditions::set(&mut s.common.conditions, t, false, reason, message, generation, now);
    }
    conditions::set_health(&mut s.common.conditions, Health::Reconciling, reason, message, generation, now);
    phase_set(&mut s, "Waiting");
    s
}

/// The state of a workload whose spec can never work as it is (an invalid transform, an
/// unsupported judge): Failed and Stalled until the spec changes. No pod is started.
pub fn invalid(old: &BatchState, reason: &str, message: &str, generation: Option<i64>, now: &Time) -> BatchState {
    let mut s = old.clone();
    s.common.observed_generation = generation;
    let c = &mut s.common.conditions;
    conditions::set(c, READY, false, reason, message, generation, now);
    conditions::set(c, SUCCEEDED, false, reason, message, generation, now);
    conditions::set(c, FAILED, true, reason, message, generation, now);
    conditions::set_health(c, Health::Stalled, reason, message, generation, now);
    phase_set(&mut s, "Failed");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{FailureRecord, ResultRecord};

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).expect("valid"))
    }

    fn running_job() -> JobView {
        JobView { active: 1, ..Default::default() }
    }

    fn reason(s: &BatchState, t: &str) -> (String, String) {
        let c = conditions::get(&s.common.conditions, t).expect("condition");
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn a_job_held_by_its_queue_reads_queued_until_admitted() {
        let held = JobView { suspended: true, queue: Some("team-a".into()), ..Default::default() };
        let s =
            compute(&BatchState::default(), &Observation { job: Some(held), ..Default::default() }, Some(1), &at(1));
        assert_eq!(reason(&s, "Ready"), ("False".into(), "Queued".into()));
        assert_eq!(reason(&s, "Reconciling"), ("True".into(), "Queued".into()), "in progress, not stalled");
        let msg = conditions::get(&s.common.conditions, "Ready").map(|c| c.message.clone()).unwrap_or_default();
        assert!(msg.contains("team-a"), "{msg}");
        let admitted = JobView { active: 1, queue: Some("team-a".into()), ..Default::default() };
        let s = compute(&s, &Observation { job: Some(admitted), ..Default::default() }, Some(1), &at(2));
        assert_eq!(reason(&s, "Ready"), ("False".into(), "Pending".into()));
    }

    #[test]
    fn pending_then_running_then_succeeded() {
        let obs = Observation { job: Some(running_job()), ..Default::default() };
        let s1 = compute(&BatchState::default(), &obs, Some(1), &at(10));
        assert_eq!(reason(&s1, "Ready"), ("False".into(), "Pending".into()));
        let obs = Observation { job: Some(running_job()), pod_running: true, ..Default::default() };
        let s2 = compute(&s1, &obs, Some(1), &at(20));
        assert_eq!(reason(&s2, "Ready"), ("False".into(), "Running".into()));
        assert_eq!(s2.times.start_time, Some(at(20)));
        // Ready stayed False: its transition time is kept.
        assert_eq!(
            conditions::get(&s2.common.conditions, "Ready").map(|c| c.last_transition_time.clone()),
            Some(at(10))
        );
        let gateway = Observed {
            result: Some(ResultRecord {
                pod: "p".into(),
                artifact: None,
                metrics: Default::default(),
                manifest_json: String::new(),
                passed: None,
            }),
            ..Default::default()
        };
        let obs =
            Observation { job: Some(running_job()), pod_running: true, gateway: Some(gateway), ..Default::default() };
        let s3 = compute(&s2, &obs, Some(1), &at(30));
        assert_eq!(reason(&s3, "Ready"), ("True".into(), "Succeeded".into()));
        assert_eq!(reason(&s3, "Failed"), ("False".into(), "Succeeded".into()));
        assert_eq!(reason(&s2, "Reconciling"), ("True".into(), "Running".into()));
        assert_eq!(reason(&s3, "Reconciling").0, "False");
        assert_eq!(reason(&s3, "Stalled").0, "False");
        assert_eq!(s3.common.phase.as_deref(), Some("Succeeded"));
        assert_eq!(s3.times.completion_time, Some(at(30)));
        // Recomputing a finished state changes nothing but may be asked again.
        let s4 = compute(&s3, &Observation::default(), Some(1), &at(40));
        assert!(!conditions::changed(Some(&s3.common), &s4.common));
    }

    #[test]
    fn a_worker_failure_shows_its_reason() {
        let gateway = Observed {
            failure: Some(FailureRecord {
                pod: "p".into(),
                reason: "DigestMismatch".into(),
                message: "train.parquet does not match".into(),
                retryable: false,
            }),
            ..Default::default()
        };
        let obs = Observation { job: Some(running_job()), gateway: Some(gateway), ..Default::default() };
        let s = compute(&BatchState::default(), &obs, Some(2), &at(5));
        assert_eq!(reason(&s, "Failed"), ("True".into(), "DigestMismatch".into()));
        assert_eq!(reason(&s, "Stalled"), ("True".into(), "DigestMismatch".into()));
        assert_eq!(reason(&s, "Reconciling").0, "False");
        let msg = &conditions::get(&s.common.conditions, "Ready").expect("ready").message;
        assert!(msg.contains("train.parquet does not match"), "{msg}");
        assert_eq!(s.common.observed_generation, Some(2));
    }

    #[test]
    fn unschedulable_and_no_result() {
        let obs = Observation {
            job: Some(running_job()),
            pod_problem: Some(PodProblem {
                reason: "Unschedulable".into(),
                message: "0/3 nodes: Insufficient nvidia.com/gpu".into(),
            }),
            ..Default::default()
        };
        let s = compute(&BatchState::default(), &obs, None, &at(1));
        assert_eq!(reason(&s, "Ready"), ("False".into(), "Unschedulable".into()));
        assert_eq!(s.common.phase.as_deref(), Some("Pending"));
        let obs = Observation { job: Some(JobView { succeeded: 1, ..Default::default() }), ..Default::default() };
        let s = compute(&BatchState::default(), &obs, None, &at(1));
        assert_eq!(reason(&s, "Failed"), ("True".into(), "NoResult".into()));
    }

    #[test]
    fn waiting_reconciles_and_an_invalid_spec_stalls() {
        let w = waiting(&BatchState::default(), "WaitingForDataset", "waiting", Some(1), &at(1));
        assert_eq!(reason(&w, "Reconciling"), ("True".into(), "WaitingForDataset".into()));
        assert_eq!(reason(&w, "Stalled").0, "False");
        assert!(!w.finished());
        let i = invalid(&w, "UnsupportedJudge", "no", Some(2), &at(2));
        assert_eq!(reason(&i, "Stalled"), ("True".into(), "UnsupportedJudge".into()));
        assert_eq!(reason(&i, "Reconciling").0, "False");
        assert!(i.failed());
        assert_eq!(i.common.phase.as_deref(), Some("Failed"));
    }

    #[test]
    fn eta_is_readable() {
        assert_eq!(format_eta(45.0), "45s");
        assert_eq!(format_eta(750.0), "12m30s");
        assert_eq!(format_eta(3723.0), "1h2m3s");
    }
}
