//! EvalRun controller: resolve (the target: a model URI or a job's output with an
//! optional adapter, a ModelDeployment's endpoint, or an endpoint with its API key
//! Secret; the Dataset split; the PromptVersion; the baseline run's metrics) -> build
//! (the eval Assignment) -> the shared batch steps -> status from results.json (metrics,
//! thresholds, baseline comparison, worst samples) and the Passed condition.

use std::collections::BTreeMap;

use kube::Api;
use llmops_crds::condition_types::{PASSED, SUCCEEDED};
use llmops_crds::evalrun::{
    BaselineComparison, EvalRunSpec, EvaluatedTarget, MetricResult, SampleResult, ThresholdResult,
};
use llmops_crds::{EvalRun, EvalRunStatus, Lineage, LineageInput, Resources};
use llmops_proto::v1;
use serde::Deserialize;

use super::batch::{BatchKind, Pinned, Plan, batch_accessors};
use super::deployment;
use super::{finished_job, resolve_dataset, resolve_model, resolve_prompt, spec_hash};
use crate::assignment::{self, ResolvedTarget};
use crate::conditions;
use crate::context::Context;
use crate::error::Result;
use crate::gateway::Observed;
use crate::job::SecretFile;
use crate::metrics::{Metrics, ObjectLabels};
use crate::models::Requester;
use crate::status::BatchState;
use crate::workload::{WorkloadKey, join_uri};

/// Whether an EvalRun's target refers to FineTuneJob `name`.
pub fn references_job(spec: &EvalRunSpec, name: &str) -> bool {
    let t = &spec.target;
    t.model.as_ref().and_then(|m| m.fine_tune_job.as_deref()) == Some(name)
        || t.adapter.as_ref().and_then(|a| a.fine_tune_job.as_deref()) == Some(name)
}

macro_rules! ready_or_wait {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(plan) => return Ok(plan),
        }
    };
}

impl BatchKind for EvalRun {
    const SUFFIX: &'static str = "eval";
    batch_accessors!(EvalRunStatus);

    async fn plan(&self, ctx: &Context, key: &WorkloadKey) -> Result<Plan> {
        let ns = &key.namespace;
        let spec = &self.spec;
        let mut lineage = Lineage { spec_hash: Some(spec_hash(spec)), inputs: Vec::new() };
        let mut secret_files = Vec::new();
        let t = &spec.target;
        let target = if let Some(model) = &t.model {
            let requester = Requester::of(key);
            let (model, model_lineage) = ready_or_wait!(resolve_model(ctx, requester, model).await?);
            lineage.inputs.push(model_lineage);
            let adapter = match &t.adapter {
                None => None,
                Some(a) => match (&a.uri, &a.fine_tune_job) {
                    (Some(uri), _) => {
                        let cached =
                            ready_or_wait!(crate::models::resolve(ctx, requester, uri, a.sha256.as_deref()).await?);
                        lineage.inputs.push(LineageInput {
                            kind: "Adapter".into(),
                            name: uri.clone(),
                            sha256: cached.sha256.clone(),
                        });
                        Some(cached)
                    }
                    (None, Some(job)) => {
                        let job = ready_or_wait!(finished_job(ctx, ns, job).await?);
                        let Some(artifact) = job.status.and_then(|s| s.artifact) else {
                            return Ok(Plan::wait("WaitingForFineTuneJob", "the adapter's FineTuneJob has no output"));
                        };
                        lineage.inputs.push(LineageInput {
                            kind: "FineTuneJob".into(),
                            name: a.fine_tune_job.clone().unwrap_or_default(),
                            sha256: artifact.sha256.clone(),
                        });
                        Some(v1::Artifact { uri: artifact.uri, sha256: artifact.sha256 })
                    }
                    (None, None) => {
                        return Ok(Plan::invalid("InvalidAdapter", "the adapter sets neither uri nor fineTuneJob"));
                    }
                },
            };
            ResolvedTarget::Local { model, adapter }
        } else if let Some(name) = &t.model_deployment {
            let served = ready_or_wait!(deployment::resolve_endpoint(ctx, ns, name).await?);
            lineage.inputs.push(LineageInput {
                kind: "ModelDeployment".into(),
                name: name.clone(),
                sha256: served.model_digest.clone(),
            });
            let api_key_file = served.api_key.as_ref().map(SecretFile::path).unwrap_or_default();
            secret_files.extend(served.api_key.clone());
            ResolvedTarget::Endpoint { url: served.url, model: name.clone(), api_key_file, revision: served.revision }
        } else if let Some(e) = &t.endpoint {
            let api_key_file = match &e.api_key_secret {
                Some(s) => {
                    let file = ready_or_wait!(crate::secrets::api_key_for(ctx, ns, s, &e.url).await?);
                    let path = file.path();
                    secret_files.push(file);
                    path
                }
                None => String::new(),
            };
            ResolvedTarget::Endpoint {
                url: e.url.clone(),
                model: e.model.clone(),
                api_key_file,
                revision: String::new(),
            }
        } else {
            return Ok(Plan::invalid("InvalidTarget", "the target sets none of model, modelDeployment or endpoint"));
        };
        if let Some(e) = spec.evaluation.judge.as_ref().and_then(|j| j.endpoint.as_ref())
            && let Some(s) = &e.api_key_secret
        {
            let file = ready_or_wait!(crate::secrets::api_key_for(ctx, ns, s, &e.url).await?);
            if !secret_files.contains(&file) {
                secret_files.push(file);
            }
        }
        let judge = match spec.evaluation.judge.as_ref().and_then(|j| j.model_deployment.as_ref()) {
            None => None,
            Some(name) => {
                let served = ready_or_wait!(deployment::resolve_endpoint(ctx, ns, name).await?);
                let api_key_file = served.api_key.as_ref().map(SecretFile::path).unwrap_or_default();
                if let Some(file) = &served.api_key
                    && !secret_files.contains(file)
                {
                    secret_files.push(file.clone());
                }
                Some(v1::EndpointTarget { url: served.url, model: name.clone(), api_key_file })
            }
        };

        let dataset = ready_or_wait!(resolve_dataset(ctx, ns, &spec.evaluation.dataset.name).await?);
        lineage.inputs.push(LineageInput {
            kind: "Dataset".into(),
            name: dataset.name.clone(),
            sha256: dataset.artifact.sha256.clone(),
        });
        let data = dataset.split(spec.evaluation.dataset.split);

        let prompt = match &spec.evaluation.prompt {
            None => None,
            Some(r) => {
                let (prompt, input) = ready_or_wait!(resolve_prompt(ctx, ns, &r.name).await?);
                lineage.inputs.push(input);
                Some(prompt)
            }
        };

        let baseline = match &spec.evaluation.baseline {
            None => None,
            Some(b) => {
                let api: Api<EvalRun> = Api::namespaced(ctx.client.clone(), ns);
                let Some(run) = api.get_opt(&b.eval_run).await? else {
                    return Ok(Plan::wait(
                        "BaselineNotFound",
                        format!("baseline EvalRun {} does not exist in namespace {ns}", b.eval_run),
                    ));
                };
                let status = run.status.clone().unwrap_or_default();
                if !conditions::is_true(&status.common.conditions, SUCCEEDED) {
                    return Ok(Plan::wait(
                        "WaitingForBaseline",
                        format!("waiting for baseline EvalRun {} to succeed", b.eval_run),
                    ));
                }
                Some(status.metrics.iter().map(|m| (metric_name(&m.metric), m.value)).collect::<BTreeMap<_, _>>())
            }
        };

        Ok(
            match assignment::eval(
                key,
                &ctx.config.store,
                spec,
                assignment::EvalInputs { target, data, prompt, baseline_metrics: baseline, judge_deployment: judge },
            ) {
                Ok(a) => Plan::Run { assignment: Box::new(a), lineage: Some(lineage), secret_files },
                Err(e) => e.into(),
            },
        )
    }

    fn export(s: &EvalRunStatus, _observed: Option<&Observed>, metrics: &Metrics, key: &WorkloadKey) {
        let values: Vec<(String, f64)> = s.metrics.iter().map(|m| (metric_name(&m.metric), m.value)).collect();
        metrics.set_eval_metrics(&key.namespace, &key.name, &values);
        let labels = ObjectLabels { namespace: key.namespace.clone(), name: key.name.clone() };
        Metrics::set_figure(&metrics.evalrun_passed, &labels, s.passed.map(|p| if p { 1.0 } else { 0.0 }));
    }

    fn figures(&self, s: &mut EvalRunStatus, observed: Option<&Observed>, _pinned: &Pinned, _key: &WorkloadKey) {
        let Some(result) = observed.and_then(|o| o.result.as_ref()) else { return };
        let generation = self.metadata.generation;
        let results: Results = serde_json::from_str::<serde_json::Value>(&result.manifest_json)
            .map(finite_only)
            .and_then(serde_json::from_value)
            .unwrap_or_default();
        if let Some(a) = &result.artifact {
            s.results_uri = Some(join_uri(&a.uri, "results.json"));
        }
        s.metrics = results.metrics;
        if s.metrics.is_empty() {
            s.metrics = result
                .metrics
                .iter()
                .filter(|(_, v)| v.is_finite())
                .filter_map(|(k, v)| {
                    serde_json::from_value(serde_json::Value::String(k.clone())).ok().map(|metric| MetricResult {
                        metric,
                        value: *v,
                        ci_low: None,
                        ci_high: None,
                    })
                })
                .collect();
            s.metrics.sort_by_key(|m| metric_name(&m.metric));
        }
        s.thresholds = results.thresholds;
        s.baseline = results.baseline;
        s.failing_samples = results.worst_samples.into_iter().take(5).collect();
        s.samples = results.samples;
        s.errors = results.errors;
        s.evaluated = results.evaluated;
        let passed = result.passed.or(results.passed);
        s.passed = passed;
        let now = conditions::now();
        let (ok, reason, message) = match passed {
            Some(true) => (true, "ThresholdsMet", "every threshold and the baseline comparison held".to_string()),
            Some(false) => (false, "ThresholdsNotMet", results.reason.unwrap_or_else(|| failed_thresholds(s))),
            None => (false, "NoVerdict", "the worker reported no verdict".to_string()),
        };
        conditions::set(&mut s.common.conditions, PASSED, ok, reason, message, generation, &now);
    }
}

fn failed_thresholds(s: &EvalRunStatus) -> String {
    let failed: Vec<String> = s
        .thresholds
        .iter()
        .filter(|t| !t.passed)
        .map(|t| format!("{} = {:.4}", metric_name(&t.metric), t.value))
        .chain(
            s.baseline
                .iter()
                .filter(|b| b.regressed)
                .map(|b| format!("{} regressed from {:.4} to {:.4}", metric_name(&b.metric), b.baseline, b.value)),
        )
        .collect();
    if failed.is_empty() { "the evaluation did not pass".into() } else { format!("failed: {}", failed.join(", ")) }
}

fn metric_name<T: serde::Serialize>(m: &T) -> String {
    serde_json::to_value(m).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// results.json without the figures that are not finite numbers (JSON writes NaN and
/// infinities as null): they never reach status as numbers. The verdict still says why.
fn finite_only(mut v: serde_json::Value) -> serde_json::Value {
    let number = |x: &serde_json::Value| x.as_f64().is_some_and(f64::is_finite);
    for list in ["metrics", "thresholds"] {
        if let Some(a) = v.get_mut(list).and_then(|x| x.as_array_mut()) {
            a.retain(|e| number(&e["value"]));
        }
    }
    // get_mut, not indexing: indexing a missing key would add it as null.
    if let Some(a) = v.get_mut("baseline").and_then(|x| x.as_array_mut()) {
        a.retain(|e| number(&e["value"]) && number(&e["baseline"]));
    }
    if let Some(a) = v.get_mut("worstSamples").and_then(|x| x.as_array_mut()) {
        for sample in a {
            if let Some(scores) = sample.get_mut("scores").and_then(|x| x.as_object_mut()) {
                scores.retain(|_, x| number(x));
            }
        }
    }
    v
}

/// The parts of results.json that go into status.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Results {
    passed: Option<bool>,
    samples: Option<i64>,
    errors: Option<i64>,
    metrics: Vec<MetricResult>,
    thresholds: Vec<ThresholdResult>,
    baseline: Vec<BaselineComparison>,
    worst_samples: Vec<SampleResult>,
    evaluated: Option<EvaluatedTarget>,
    reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::ResultRecord;

    #[test]
    fn results_json_fills_status_and_passed() {
        let run: EvalRun = serde_yaml_ng::from_str(include_str!("../../tests/fixtures/evalrun.yaml")).expect("fixture");
        let manifest = r#"{"passed": false, "samples": 20, "errors": 1,
            "metrics": [{"metric": "rougeL", "value": 0.21, "ciLow": 0.15, "ciHigh": 0.27}],
            "thresholds": [{"metric": "rougeL", "value": 0.21, "passed": false}],
            "baseline": [],
            "worstSamples": [{"index": 3, "input": "q", "expected": "a", "output": "b", "scores": {"rougeL": 0.0}}],
            "evaluated": {"modelDigest": "abc", "datasetDigest": "def"}}"#;
        let observed = Observed {
            result: Some(ResultRecord {
                pod: "p".into(),
                artifact: Some(v1::Artifact { uri: "store://ns/evalrun/e/u/output/".into(), sha256: "0".repeat(64) }),
                metrics: Default::default(),
                manifest_json: manifest.into(),
                passed: Some(false),
            }),
            ..Default::default()
        };
        let pinned =
            Pinned { token: String::new(), assignment: Default::default(), lineage: None, secret_files: vec![] };
        let key = WorkloadKey { namespace: "ns".into(), kind: "EvalRun".into(), name: "e".into(), uid: "u".into() };
        let mut status = EvalRunStatus::default();
        run.figures(&mut status, Some(&observed), &pinned, &key);
        assert_eq!(status.passed, Some(false));
        assert_eq!(status.samples, Some(20));
        assert_eq!(status.metrics[0].ci_low, Some(0.15));
        assert_eq!(status.failing_samples.len(), 1);
        assert_eq!(status.results_uri.as_deref(), Some("store://ns/evalrun/e/u/output/results.json"));
        let passed = conditions::get(&status.common.conditions, PASSED).expect("Passed");
        assert_eq!((passed.status.as_str(), passed.reason.as_str()), ("False", "ThresholdsNotMet"));
        assert!(passed.message.contains("rougeL"), "{}", passed.message);

        // Figures that are not numbers (null in JSON) never reach status, and the run
        // still reads as failed, with the worker's reason.
        let manifest = r#"{"passed": false, "samples": 20,
            "reason": "tokenF1 has no finite value (NaN), so its threshold cannot hold",
            "metrics": [{"metric": "tokenF1", "value": null}, {"metric": "rougeL", "value": 0.5}],
            "thresholds": [{"metric": "tokenF1", "value": null, "passed": false}],
            "worstSamples": [{"index": 1, "input": "q", "expected": "a", "output": "b",
                              "scores": {"tokenF1": null, "rougeL": 0.5}}]}"#;
        let mut observed = observed;
        if let Some(r) = observed.result.as_mut() {
            r.manifest_json = manifest.into();
            r.metrics = [("tokenF1".to_string(), f64::NAN)].into();
        }
        let parsed: std::result::Result<Results, _> =
            serde_json::from_value(finite_only(serde_json::from_str(manifest).expect("JSON")));
        assert!(parsed.is_ok(), "{parsed:?}");
        let mut status = EvalRunStatus::default();
        run.figures(&mut status, Some(&observed), &pinned, &key);
        assert_eq!(status.metrics.len(), 1, "only the finite rougeL: {:?}", status.metrics);
        assert!(status.thresholds.is_empty());
        assert_eq!(status.failing_samples[0].scores.len(), 1);
        let passed = conditions::get(&status.common.conditions, PASSED).expect("Passed");
        assert_eq!(passed.status, "False");
        assert!(passed.message.contains("no finite value"), "{}", passed.message);
    }
}
