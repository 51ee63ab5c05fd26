//! Condition bookkeeping shared by every controller: set a condition keeping its
//! lastTransitionTime when its status did not change, and decide whether a new status
//! differs from the stored one in anything but timestamps.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

/// The current time as a Kubernetes timestamp (second precision, as the apiserver keeps it).
pub fn now() -> Time {
    let ts = jiff::Timestamp::now();
    Time(jiff::Timestamp::from_second(ts.as_second()).unwrap_or(ts))
}

/// Sets condition `type_` in `conditions`. lastTransitionTime changes only when the
/// status changes; reason and message are always updated.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.clone();
                c.status = status;
            }
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
    conditions.sort_by(|a, b| order(&a.type_).cmp(&order(&b.type_)).then_with(|| a.type_.cmp(&b.type_)));
}

fn order(type_: &str) -> usize {
    ["Ready", "Succeeded", "Failed", "Passed", "Available", "Progressing", "Reconciling", "Stalled"]
        .iter()
        .position(|t| *t == type_)
        .unwrap_or(9)
}

/// Where an object stands for the tools that compute health from conditions (kstatus:
/// Flux, cli-utils; Argo CD health checks): the `Reconciling` and `Stalled` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Work is in progress (waiting for an input, a pod, a rollout, a gate).
    Reconciling,
    /// Failed, and will not recover without a change.
    Stalled,
    /// Done: nothing left to do until something changes.
    Settled,
}

/// Sets `Reconciling` and `Stalled` for `health`, both with `reason` and `message`.
pub fn set_health(
    conditions: &mut Vec<Condition>,
    health: Health,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    use llmops_crds::condition_types::{RECONCILING, STALLED};
    set(conditions, RECONCILING, health == Health::Reconciling, reason, message, generation, now);
    set(conditions, STALLED, health == Health::Stalled, reason, message, generation, now);
}

/// The condition of `type_`, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Whether `new` differs from `old` in anything but condition transition times. A
/// status write is skipped when it does not (start and completion times are set once,
/// so they never differ by themselves).
pub fn changed<S: Serialize>(old: Option<&S>, new: &S) -> bool {
    let Some(old) = old else { return true };
    let (Ok(mut a), Ok(mut b)) = (serde_json::to_value(old), serde_json::to_value(new)) else { return true };
    strip_timestamps(&mut a);
    strip_timestamps(&mut b);
    a != b
}

fn strip_timestamps(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("lastTransitionTime");
            map.values_mut().for_each(strip_timestamps);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_timestamps),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmops_crds::CommonStatus;

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).expect("valid"))
    }

    #[test]
    fn transition_time_is_kept_when_status_does_not_change() {
        let mut conditions = Vec::new();
        set(&mut conditions, "Ready", false, "Pending", "waiting", Some(1), &at(100));
        set(&mut conditions, "Ready", false, "Running", "step 3", Some(1), &at(200));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(100));
        assert_eq!(conditions[0].reason, "Running");
        set(&mut conditions, "Ready", true, "Succeeded", "done", Some(1), &at(300));
        assert_eq!(conditions[0].last_transition_time, at(300));
    }

    #[test]
    fn conditions_are_ordered_ready_first() {
        let mut conditions = Vec::new();
        set(&mut conditions, "Failed", false, "Running", "", None, &at(1));
        set(&mut conditions, "Succeeded", false, "Running", "", None, &at(1));
        set(&mut conditions, "Ready", false, "Running", "", None, &at(1));
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Succeeded", "Failed"]);
    }

    #[test]
    fn only_timestamps_changed_means_no_write() {
        let mut a = CommonStatus::default();
        set(&mut a.conditions, "Ready", false, "Pending", "waiting", Some(1), &at(100));
        let mut b = a.clone();
        b.conditions[0].last_transition_time = at(500);
        assert!(!changed(Some(&a), &b));
        b.conditions[0].message = "other".into();
        assert!(changed(Some(&a), &b));
        assert!(changed(None, &b));
    }
}
