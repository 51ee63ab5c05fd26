//! ModelDeployment controller, a long-running workload: dereference (the model, the
//! adapters' FineTuneJobs, the PromptVersion, the API key Secret) -> build (pure: the
//! candidate revision's serve Assignment, its ConfigMap, the Deployment, Service,
//! HorizontalPodAutoscaler and the promotion gate's EvalRun) -> apply -> status (ready
//! replicas, endpoint, revisions, the gate's verdict, lineage and the live figures the
//! serving pods report through the gateway).
//!
//! Which revision serves is derived from the owned objects, never kept in memory: the
//! Deployment's pod template carries the revision it runs, each revision's Assignment
//! lives in a ConfigMap named after it, and a gate's verdict is its EvalRun's status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior,
    HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, ContainerPort, EnvVar, HTTPGetAction, KeyToPath, Pod, Probe,
    ProjectedVolumeSource, Secret, SecretProjection, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use llmops_crds::condition_types::{AVAILABLE, FAILED, PASSED, PROGRESSING, READY, SUCCEEDED};
use llmops_crds::deployment::{AdapterLineage, GateStatus, Promotion, ServedLineage, ServingMetrics};
use llmops_crds::evalrun::{EvalRunSpec, EvalTarget};
use llmops_crds::{AdapterSource, EvalRun, ModelDeployment, ModelDeploymentStatus, ModelSource};
use llmops_proto::v1::{self, Assignment};

use super::batch::Plan;
use super::{finished_job, resolve_model, resolve_prompt};
use crate::assignment::{self, ResolvedServing, SERVING_PORT};
use crate::conditions::{self, Health};
use crate::context::Context;
use crate::error::{AtStep, Error, ReconcileError, Result, Step};
use crate::job::{self, SecretFile, TOKEN_KEY};
use crate::models::Requester;
use crate::workload::{FIELD_MANAGER, WORKER_LABEL, WorkloadKey, owner_reference};

/// Label of serving pods and revision ConfigMaps and gate EvalRuns: the revision.
pub const REVISION_LABEL: &str = "llmops.dev/revision";
/// Where the revision's Assignment ConfigMap is mounted in serving pods.
pub const ASSIGNMENT_DIR: &str = "/etc/llmops/assignment";
/// Where the API keys (the tenant's and the operator's) are mounted in serving pods.
pub const API_KEYS_DIR: &str = "/var/run/secrets/llmops-api-keys";
/// Key of the operator-managed API key in its Secret.
pub const OPERATOR_KEY: &str = "api-key";
/// File name of the operator-managed key among the serving pod's API keys.
const OPERATOR_KEY_FILE: &str = "llmops-operator-api-key";

/// Name of the Secret with the operator-managed API key of a deployment, which
/// EvalRuns that reach the deployment are given.
pub fn operator_key_secret(deployment: &str) -> String {
    crate::workload::child_name(deployment, "llmops-key")
}

/// Name of the ConfigMap that holds a revision's Assignment.
pub fn revision_config_map(deployment: &str, revision: &str) -> String {
    crate::workload::child_name(deployment, &format!("rev-{revision}"))
}

/// Name of the EvalRun that gates a revision with a gate: a changed gate (other
/// thresholds, another dataset) evaluates the revision again.
pub fn gate_name(deployment: &str, revision: &str, gate: &Promotion) -> String {
    let hash = super::spec_hash(gate);
    crate::workload::child_name(deployment, &format!("gate-{revision}-{}", &hash[..6]))
}

/// How to reach a ModelDeployment that serves.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// Base URL up to /v1.
    pub url: String,
    /// The serving revision.
    pub revision: String,
    /// sha256 of the model it serves.
    pub model_digest: String,
    /// The operator-managed API key, when the deployment requires keys.
    pub api_key: Option<SecretFile>,
}

/// A ModelDeployment that is Ready, with its endpoint, or what to wait for.
pub async fn resolve_endpoint(ctx: &Context, namespace: &str, name: &str) -> Result<std::result::Result<Served, Plan>> {
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(md) = api.get_opt(name).await? else {
        return Ok(Err(Plan::wait(
            "ModelDeploymentNotFound",
            format!("ModelDeployment {name} does not exist in namespace {namespace}"),
        )));
    };
    let status = md.status.clone().unwrap_or_default();
    let (Some(url), true) = (status.endpoint.clone(), conditions::is_true(&status.common.conditions, READY)) else {
        return Ok(Err(Plan::wait(
            "WaitingForModelDeployment",
            format!("waiting for ModelDeployment {name} to serve"),
        )));
    };
    let api_key =
        md.spec.api_keys.is_some().then(|| SecretFile { secret: operator_key_secret(name), key: OPERATOR_KEY.into() });
    Ok(Ok(Served {
        url,
        revision: status.serving_revision.unwrap_or_default(),
        model_digest: status.served_model_digest.unwrap_or_default(),
        api_key,
    }))
}

/// What the references of a ModelDeployment resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The model, adapters and prompt.
    pub serving: ResolvedServing,
    /// Their lineage (without the revision).
    pub lineage: ServedLineage,
}

/// Dereference: reads what the spec points at.
async fn dereference(ctx: &Context, md: &ModelDeployment, ns: &str) -> Result<std::result::Result<Resolved, Plan>> {
    if let Some(message) = crate::tenancy::reserved(ns) {
        return Ok(Err(Plan::invalid("ReservedNamespace", message)));
    }
    macro_rules! ready {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(plan) => return Ok(Err(plan)),
            }
        };
    }
    let spec = &md.spec;
    let name = md.name_any();
    let requester = Requester { kind: "ModelDeployment", namespace: ns, name: &name };
    // What is cheap to check (and can make the spec unservable) comes before the model,
    // whose first resolution downloads it.
    let (prompt, prompt_lineage) = match &spec.prompt {
        None => (None, None),
        Some(r) => {
            let (p, input) = ready!(resolve_prompt(ctx, ns, &r.name).await?);
            let api: Api<llmops_crds::PromptVersion> = Api::namespaced(ctx.client.clone(), ns);
            if let Some(pv) = api.get_opt(&r.name).await?
                && let Err(e) = pv.spec.served_messages()
            {
                return Ok(Err(Plan::invalid(
                    "PromptNotServable",
                    format!("PromptVersion {} cannot be served: {e}; give the variable a default", r.name),
                )));
            }
            (Some(p), Some(input))
        }
    };
    if let Some(keys) = &spec.api_keys {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        match secrets.get_opt(&keys.name).await? {
            None => {
                return Ok(Err(Plan::wait(
                    "ApiKeySecretNotFound",
                    format!("Secret {} (apiKeys) does not exist in namespace {ns}", keys.name),
                )));
            }
            Some(s) => {
                if let Some(k) = &keys.key
                    && !s.data.as_ref().is_some_and(|d| d.contains_key(k))
                {
                    return Ok(Err(Plan::wait("ApiKeySecretNotFound", format!("Secret {} has no key {k}", keys.name))));
                }
            }
        }
    }
    let (model, model_lineage) = ready!(resolve_model(ctx, requester, &spec.model).await?);
    let mut adapters = Vec::new();
    let mut adapter_lineage = Vec::new();
    for a in &spec.adapters {
        match (&a.source.uri, &a.source.fine_tune_job) {
            (Some(uri), _) => {
                let cached = ready!(crate::models::resolve(ctx, requester, uri, a.source.sha256.as_deref()).await?);
                adapter_lineage.push(AdapterLineage {
                    name: a.name.clone(),
                    sha256: cached.sha256.clone(),
                    uri: Some(uri.clone()),
                    ..Default::default()
                });
                adapters.push((a.name.clone(), cached));
            }
            (None, Some(job_name)) => {
                let job = ready!(finished_job(ctx, ns, job_name).await?);
                let status = job.status.clone().unwrap_or_default();
                let Some(artifact) = status.artifact else {
                    return Ok(Err(Plan::wait(
                        "WaitingForFineTuneJob",
                        format!("FineTuneJob {job_name} has no output yet"),
                    )));
                };
                if let Some(expected) = &a.source.sha256
                    && expected != &artifact.sha256
                {
                    return Ok(Err(Plan::invalid(
                        "AdapterDigestMismatch",
                        format!(
                            "adapter {}: FineTuneJob {job_name} produced sha256 {}, the spec expects {expected}",
                            a.name, artifact.sha256
                        ),
                    )));
                }
                adapters.push((
                    a.name.clone(),
                    v1::Artifact { uri: artifact.uri.clone(), sha256: artifact.sha256.clone() },
                ));
                adapter_lineage.push(AdapterLineage {
                    name: a.name.clone(),
                    sha256: artifact.sha256,
                    fine_tune_job: Some(job_name.clone()),
                    uri: Some(artifact.uri),
                    trained_on: status.lineage.map(|l| l.inputs).unwrap_or_default(),
                });
            }
            (None, None) => {
                return Ok(Err(Plan::invalid(
                    "InvalidAdapter",
                    format!("adapter {} sets neither uri nor fineTuneJob", a.name),
                )));
            }
        }
    }
    Ok(Ok(Resolved {
        serving: ResolvedServing { model, adapters, prompt },
        lineage: ServedLineage {
            revision: String::new(),
            model: model_lineage,
            adapters: adapter_lineage,
            prompt: prompt_lineage,
        },
    }))
}

// ---- build (pure) ----

/// Metadata of an object the deployment owns: its labels and controller reference.
fn owned_meta(key: &WorkloadKey, owner: &OwnerReference, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(key.namespace.clone()),
        labels: Some(key.labels()),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

/// Labels of the objects of one revision.
fn revision_labels(key: &WorkloadKey, revision: &str) -> BTreeMap<String, String> {
    let mut labels = key.labels();
    labels.insert(REVISION_LABEL.into(), revision.into());
    labels
}

/// The ConfigMap holding a revision's Assignment (what its pods run) and lineage.
pub fn build_config_map(
    key: &WorkloadKey,
    owner: &OwnerReference,
    revision: &str,
    assignment: &Assignment,
    lineage: &ServedLineage,
) -> std::result::Result<ConfigMap, serde_json::Error> {
    let data = BTreeMap::from([
        ("assignment.json".to_string(), serde_json::to_string_pretty(assignment)?),
        ("lineage.json".to_string(), serde_json::to_string_pretty(lineage)?),
    ]);
    Ok(ConfigMap {
        metadata: ObjectMeta {
            labels: Some(revision_labels(key, revision)),
            ..owned_meta(key, owner, &revision_config_map(&key.name, revision))
        },
        data: Some(data),
        ..Default::default()
    })
}

/// Number of serving pods the spec asks for.
pub fn desired_replicas(md: &ModelDeployment) -> i32 {
    md.spec.replicas.or(md.spec.autoscaling.as_ref().map(|a| a.min_replicas)).unwrap_or(1).max(0)
}

/// Label selector of a deployment's serving pods.
pub fn selector(key: &WorkloadKey) -> BTreeMap<String, String> {
    BTreeMap::from([(crate::workload::UID_LABEL.to_string(), key.uid.clone())])
}

/// The Deployment running `revision`: `llmops-worker agent` reading the revision's
/// Assignment from its ConfigMap (so pods start without the operator), reporting
/// through the gateway, ready when `/readyz` answers.
pub fn build_deployment(
    config: &crate::Config,
    md: &ModelDeployment,
    key: &WorkloadKey,
    owner: &OwnerReference,
    revision: &str,
    token_secret: &str,
) -> Deployment {
    let spec = &md.spec;
    let mut template = job::pod_template(config, key, token_secret, spec.resources.as_ref(), &[]);
    if let Some(meta) = template.metadata.as_mut() {
        let labels = meta.labels.get_or_insert_with(BTreeMap::new);
        labels.insert(REVISION_LABEL.into(), revision.into());
    }
    if let Some(pod) = template.spec.as_mut() {
        pod.restart_policy = Some("Always".into());
        pod.termination_grace_period_seconds = Some(30);
        let volumes = pod.volumes.get_or_insert_with(Vec::new);
        volumes.push(Volume {
            name: "llmops-assignment".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: revision_config_map(&key.name, revision),
                items: Some(vec![KeyToPath {
                    key: "assignment.json".into(),
                    path: "assignment.json".into(),
                    mode: None,
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let mut mounts = vec![VolumeMount {
            name: "llmops-assignment".into(),
            mount_path: ASSIGNMENT_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }];
        if let Some(keys) = &spec.api_keys {
            let tenant = SecretProjection {
                name: keys.name.clone(),
                items: keys.key.as_ref().map(|k| vec![KeyToPath { key: k.clone(), path: k.clone(), mode: None }]),
                optional: None,
            };
            let operator = SecretProjection {
                name: operator_key_secret(&key.name),
                items: Some(vec![KeyToPath { key: OPERATOR_KEY.into(), path: OPERATOR_KEY_FILE.into(), mode: None }]),
                optional: None,
            };
            volumes.push(Volume {
                name: "llmops-api-keys".into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![
                        VolumeProjection { secret: Some(tenant), ..Default::default() },
                        VolumeProjection { secret: Some(operator), ..Default::default() },
                    ]),
                    default_mode: Some(0o440),
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "llmops-api-keys".into(),
                mount_path: API_KEYS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        if let Some(c) = pod.containers.first_mut() {
            c.volume_mounts.get_or_insert_with(Vec::new).extend(mounts);
            c.env.get_or_insert_with(Vec::new).push(EnvVar {
                name: "LLMOPS_ASSIGNMENT_FILE".into(),
                value: Some(format!("{ASSIGNMENT_DIR}/assignment.json")),
                ..Default::default()
            });
            c.ports = Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: SERVING_PORT as i32,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]);
            c.readiness_probe = Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/readyz".into()),
                    port: IntOrString::String("http".into()),
                    ..Default::default()
                }),
                period_seconds: Some(5),
                timeout_seconds: Some(2),
                failure_threshold: Some(3),
                ..Default::default()
            });
        }
    }
    let propagated = job::Propagated::of(&md.metadata);
    if let Some(meta) = template.metadata.as_mut() {
        propagated.apply_to(meta);
    }
    let mut metadata = owned_meta(key, owner, &key.name);
    propagated.apply_to(&mut metadata);
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(desired_replicas(md)),
            selector: LabelSelector { match_labels: Some(selector(key)), ..Default::default() },
            template,
            // A new revision's pods must be ready before an old one goes: no gap in serving.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(3),
            ..Default::default()
        }),
        status: None,
    }
}

/// The Service in front of the serving pods (port `http`).
pub fn build_service(key: &WorkloadKey, owner: &OwnerReference) -> Service {
    Service {
        metadata: owned_meta(key, owner, &key.name),
        spec: Some(ServiceSpec {
            selector: Some(selector(key)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: SERVING_PORT as i32,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The HorizontalPodAutoscaler of `autoscaling`, scaling the ModelDeployment itself
/// through its scale subresource: on CPU, and on the serving queue depth per pod when
/// `targetQueueDepth` is set (which needs a metrics adapter exposing it).
pub fn build_hpa(md: &ModelDeployment, key: &WorkloadKey, owner: &OwnerReference) -> Option<HorizontalPodAutoscaler> {
    let a = md.spec.autoscaling.as_ref()?;
    let mut metrics = vec![MetricSpec {
        type_: "Resource".into(),
        resource: Some(ResourceMetricSource {
            name: "cpu".into(),
            target: MetricTarget {
                type_: "Utilization".into(),
                average_utilization: Some(a.target_cpu_utilization),
                ..Default::default()
            },
        }),
        ..Default::default()
    }];
    if let Some(depth) = a.target_queue_depth {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier { name: "llmops_worker_queue_depth".into(), selector: None },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(depth.to_string())),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    Some(HorizontalPodAutoscaler {
        metadata: owned_meta(key, owner, &key.name),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some(ModelDeployment::api_version(&()).into_owned()),
                kind: ModelDeployment::kind(&()).into_owned(),
                name: key.name.clone(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            // Loading a model takes a while: do not scale down on a short lull.
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules { stabilization_window_seconds: Some(300), ..Default::default() }),
                scale_up: None,
            }),
        }),
        status: None,
    })
}

/// The EvalRun that gates `revision`: the deployment's gate, evaluating the candidate
/// model itself (the base model, or the adapter the gate names) in a pod of its own.
pub fn build_gate(
    md: &ModelDeployment,
    key: &WorkloadKey,
    owner: &OwnerReference,
    revision: &str,
    resolved: &ResolvedServing,
) -> Option<EvalRun> {
    let promotion = md.spec.promotion.as_ref()?;
    let weights = resolved.model.weights.clone().unwrap_or_default();
    let model = match &md.spec.model.fine_tune_job {
        // A merged model from a FineTuneJob: the EvalRun resolves the same job.
        Some(job) => ModelSource { fine_tune_job: Some(job.clone()), ..md.spec.model.clone() },
        None => ModelSource {
            uri: Some(weights.uri.clone()),
            sha256: (!weights.sha256.is_empty()).then(|| weights.sha256.clone()),
            ..md.spec.model.clone()
        },
    };
    let adapter = promotion.model.as_ref().and_then(|name| {
        let job = md.spec.adapters.iter().find(|a| &a.name == name).and_then(|a| a.source.fine_tune_job.clone());
        resolved.adapters.iter().find(|(n, _)| n == name).map(|(_, a)| match job {
            // The adapter's FineTuneJob, as the deployment names it (its lineage follows).
            Some(job) => AdapterSource { uri: None, fine_tune_job: Some(job), sha256: None },
            None => AdapterSource {
                uri: Some(a.uri.clone()),
                fine_tune_job: None,
                sha256: (!a.sha256.is_empty()).then(|| a.sha256.clone()),
            },
        })
    });
    let mut evaluation = promotion.gate.clone();
    if evaluation.prompt.is_none() {
        evaluation.prompt = md.spec.prompt.clone();
    }
    let mut labels = revision_labels(key, revision);
    // The EvalRun is a workload of its own: its pods carry its own identity labels.
    labels.remove(crate::workload::UID_LABEL);
    labels.insert(crate::workload::KIND_LABEL.into(), "ModelDeploymentGate".into());
    let mut run = EvalRun::new(
        &gate_name(&key.name, revision, promotion),
        EvalRunSpec {
            target: EvalTarget { model: Some(model), adapter, model_deployment: None, endpoint: None },
            evaluation,
            resources: md.spec.resources.clone(),
            backoff_limit: 1,
        },
    );
    run.metadata.namespace = Some(key.namespace.clone());
    run.metadata.labels = Some(labels);
    run.metadata.owner_references = Some(vec![owner.clone()]);
    Some(run)
}

// ---- status (pure) ----

/// The gate's verdict on a revision, from its EvalRun.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Still evaluating (or not created yet).
    Pending(String),
    /// Passed.
    Passed(String),
    /// Failed: the message says why.
    Failed(String),
}

/// The verdict of a gate EvalRun on `revision`: Passed only when it carries exactly
/// that revision and its Passed condition is True.
pub fn verdict(run: Option<&EvalRun>, revision: &str) -> Verdict {
    let Some(run) = run else { return Verdict::Pending("the gate's EvalRun is being created".into()) };
    if run.labels().get(REVISION_LABEL).map(String::as_str) != Some(revision) {
        return Verdict::Pending("the gate's EvalRun is for another revision".into());
    }
    let conds = run.status.as_ref().map(|s| s.common.conditions.clone()).unwrap_or_default();
    let message = |t: &str| conditions::get(&conds, t).map(|c| c.message.clone()).unwrap_or_default();
    if conditions::is_true(&conds, PASSED) {
        return Verdict::Passed(message(PASSED));
    }
    if conditions::is_true(&conds, FAILED) {
        return Verdict::Failed(format!("the gate's EvalRun failed: {}", message(FAILED)));
    }
    if conditions::is_true(&conds, SUCCEEDED) {
        return Verdict::Failed(message(PASSED));
    }
    let progress = conditions::get(&conds, READY).map(|c| c.message.clone()).unwrap_or_default();
    Verdict::Pending(if progress.is_empty() { "evaluating".into() } else { progress })
}

/// Rounds `v` to `digits` decimals, so that status changes only when a figure does.
fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Live figures of a deployment from the latest report of each ready pod: rates and
/// feedback add up, medians are averaged by request rate, 95th percentiles take the
/// worst pod. Non-finite values are dropped, never shown as numbers.
pub fn aggregate(reports: &[&v1::Progress]) -> Option<ServingMetrics> {
    if reports.is_empty() {
        return None;
    }
    let get = |p: &v1::Progress, k: &str| p.metrics.get(k).copied().filter(|v| v.is_finite());
    let sum = |k: &str| reports.iter().filter_map(|p| get(p, k)).sum::<f64>();
    let any = |k: &str| reports.iter().any(|p| get(p, k).is_some());
    let max = |k: &str| {
        reports.iter().filter_map(|p| get(p, k)).fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    let rps = sum("requests_per_second");
    let weighted = |k: &str| -> Option<f64> {
        let pairs: Vec<(f64, f64)> =
            reports.iter().filter_map(|p| Some((get(p, k)?, get(p, "requests_per_second").unwrap_or(0.0)))).collect();
        if pairs.is_empty() {
            return None;
        }
        let w: f64 = pairs.iter().map(|(_, w)| w).sum();
        Some(if w > 0.0 {
            pairs.iter().map(|(v, w)| v * w).sum::<f64>() / w
        } else {
            pairs.iter().map(|(v, _)| v).sum::<f64>() / pairs.len() as f64
        })
    };
    let feedback_count = sum("feedback_count");
    Some(ServingMetrics {
        requests_per_second: any("requests_per_second").then(|| round(rps, 2)),
        tokens_per_second: any("tokens_per_second").then(|| round(sum("tokens_per_second"), 2)),
        time_to_first_token_ms: weighted("ttft_p50_ms").map(|v| round(v, 1)),
        time_to_first_token_p95_ms: max("ttft_p95_ms").map(|v| round(v, 1)),
        p95_latency_ms: max("latency_p95_ms").map(|v| round(v, 1)),
        error_rate: weighted("error_rate").map(|v| round(v, 3)),
        feedback_score: (feedback_count > 0.0).then(|| round(sum("feedback_sum") / feedback_count, 2)),
        feedback_count: any("feedback_count").then_some(feedback_count as i64),
    })
}

// ---- reconcile ----

/// Reconciles one ModelDeployment.
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> std::result::Result<Action, ReconcileError> {
    super::instrumented(&*md, &ctx, async {
        // Store keys of the spec are the namespace's own (crate::tenancy).
        let md = crate::tenancy::localized(&*md).at(Step::Dereference)?;
        reconcile_inner(&md, &ctx).await
    })
    .await
}

/// How a failed reconcile is retried.
pub fn error_policy(_md: Arc<ModelDeployment>, _error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(5))
}

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Whether `obj`'s controller is the object of uid `uid`.
fn controlled_by<K: Resource>(obj: &K, uid: &str) -> bool {
    obj.meta().owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == uid)
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().ok_or(Error::MissingMetadata("name"))?;
    Ok(api.patch(&name, &params(), &Patch::Apply(obj)).await?)
}

/// Reads the Secret `name`'s key `key`, creating the Secret with a random value first.
async fn ensure_secret(
    secrets: &Api<Secret>,
    key: &WorkloadKey,
    owner: &OwnerReference,
    name: &str,
    data_key: &str,
) -> Result<String> {
    if let Some(s) = secrets.get_opt(name).await?
        && let Some(v) = s.data.as_ref().and_then(|d| d.get(data_key))
    {
        return Ok(String::from_utf8_lossy(&v.0).into_owned());
    }
    let value = crate::gateway::tokens::generate().map_err(|e| Error::Random(e.to_string()))?;
    let secret = Secret {
        metadata: owned_meta(key, owner, name),
        data: Some(BTreeMap::from([(data_key.to_string(), ByteString(value.clone().into_bytes()))])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    let post = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match secrets.create(&post, &secret).await {
        Ok(_) => Ok(value),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = secrets.get(name).await?;
            s.data
                .and_then(|d| d.get(data_key).map(|v| String::from_utf8_lossy(&v.0).into_owned()))
                .ok_or(Error::MissingMetadata("secret data"))
        }
        Err(e) => Err(e.into()),
    }
}

async fn reconcile_inner(md: &ModelDeployment, ctx: &Context) -> std::result::Result<Action, ReconcileError> {
    let key = WorkloadKey::of(md).at(Step::Dereference)?;
    let ns = key.namespace.clone();
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    if md.meta().deletion_timestamp.is_some() {
        ctx.gateway.forget(&key.uid);
        return Ok(Action::await_change());
    }
    let generation = md.metadata.generation;
    let old = md.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let now = conditions::now();
    status.common.observed_generation = generation;
    status.selector = Some(format!("{}={}", crate::workload::UID_LABEL, key.uid));
    let owner = owner_reference(md).at(Step::Build)?;

    // Dereference and build the candidate revision.
    let resolved = dereference(ctx, md, &ns).await.at(Step::Dereference)?;
    let candidate = match resolved {
        Ok(r) => {
            let revision = assignment::revision(&md.spec, &r.serving);
            let keys_file = md.spec.api_keys.as_ref().map(|_| API_KEYS_DIR.to_string());
            match assignment::serve(&key, &ctx.config.store, &md.spec, &r.serving, keys_file, &revision) {
                Ok(a) => Ok((revision, a, r)),
                Err(e) => Err(Plan::from(e)),
            }
        }
        Err(plan) => Err(plan),
    };

    // What serves now: the revision the Deployment's pods carry.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let deployment = deployments.get_opt(&key.name).await.at(Step::Dereference)?;
    let current = deployment
        .as_ref()
        .filter(|d| d.owner_references().iter().any(|o| o.uid == key.uid))
        .and_then(|d| d.spec.as_ref()?.template.metadata.as_ref()?.labels.as_ref()?.get(REVISION_LABEL).cloned());

    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let runs: Api<EvalRun> = Api::namespaced(ctx.client.clone(), &ns);
    let mut serving = current.clone();
    let mut gate_verdict = None;
    let mut waiting: Option<(String, String, bool)> = None;
    match &candidate {
        Ok((revision, assignment, r)) => {
            let mut lineage = r.lineage.clone();
            lineage.revision = revision.clone();
            let cm = build_config_map(&key, &owner, revision, assignment, &lineage).at(Step::Build)?;
            apply(&config_maps, &cm).await.at(Step::Apply)?;
            let already_serves = current.as_deref() == Some(revision.as_str());
            match build_gate(md, &key, &owner, revision, &r.serving) {
                None => serving = Some(revision.clone()),
                Some(gate) => 'gate: {
                    let name = gate.name_any();
                    let found = runs.get_opt(&name).await.at(Step::Dereference)?;
                    // An EvalRun of the gate's name that this deployment does not control (a
                    // tenant may create one first, with a spec that passes) is never read as
                    // the gate's verdict, nor taken over.
                    if found.as_ref().is_some_and(|run| !controlled_by(run, &key.uid)) {
                        waiting = Some((
                            "GateNameTaken".into(),
                            format!(
                                "EvalRun {name} is not this deployment's gate (it has another controller, or none); the gate cannot run until it is deleted"
                            ),
                            false,
                        ));
                        break 'gate;
                    }
                    let existing = found.filter(|run| run.labels().get(REVISION_LABEL) == Some(revision));
                    // A revision that already serves keeps its verdict in status; its gate
                    // is not run again when its EvalRun was deleted.
                    let run = match existing {
                        Some(run) => Some(run),
                        None if already_serves => None,
                        None => Some(apply(&runs, &gate).await.at(Step::Apply)?),
                    };
                    if let Some(run) = run {
                        let v = verdict(Some(&run), revision);
                        if matches!(v, Verdict::Passed(_)) {
                            serving = Some(revision.clone());
                        }
                        gate_verdict = Some((revision.clone(), run.name_any(), v));
                    }
                }
            }
        }
        Err(Plan::Wait { reason, message }) => waiting = Some((reason.clone(), message.clone(), false)),
        Err(Plan::Invalid { reason, message }) => waiting = Some((reason.clone(), message.clone(), true)),
        Err(Plan::Run { .. }) => {}
    }

    // Apply what serves.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let token_secret = crate::workload::child_name(&key.name, "token");
    let mut ready_pods: Vec<String> = Vec::new();
    let mut rolled_out = true;
    if let Some(rev) = &serving {
        let token = ensure_secret(&secrets, &key, &owner, &token_secret, TOKEN_KEY).await.at(Step::Apply)?;
        if md.spec.api_keys.is_some() {
            ensure_secret(&secrets, &key, &owner, &operator_key_secret(&key.name), OPERATOR_KEY)
                .await
                .at(Step::Apply)?;
        }
        let cm = config_maps.get_opt(&revision_config_map(&key.name, rev)).await.at(Step::Dereference)?;
        let served: Option<(Assignment, ServedLineage)> = cm.and_then(|cm| {
            let data = cm.data?;
            Some((
                serde_json::from_str(data.get("assignment.json")?).ok()?,
                serde_json::from_str(data.get("lineage.json")?).ok()?,
            ))
        });
        if let Some((assignment, lineage)) = served {
            ctx.gateway.register(&key, &token, assignment);
            status.served_model_digest = Some(lineage.model.sha256.clone()).filter(|d| !d.is_empty());
            status.lineage = Some(lineage);
        }
        let built = build_deployment(&ctx.config, md, &key, &owner, rev, &token_secret);
        let applied = apply(&deployments, &built).await.at(Step::Apply)?;
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        apply(&services, &build_service(&key, &owner)).await.at(Step::Apply)?;
        let d = applied.status.clone().unwrap_or_default();
        let want = applied.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        rolled_out = d.observed_generation >= applied.metadata.generation
            && d.updated_replicas.unwrap_or(0) >= want
            && d.replicas.unwrap_or(0) <= want;
        status.replicas = Some(d.replicas.unwrap_or(0));
        status.ready_replicas = Some(d.ready_replicas.unwrap_or(0));
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let list = pods
            .list(&ListParams::default().labels(&format!("{}={}", crate::workload::UID_LABEL, key.uid)))
            .await
            .at(Step::Dereference)?;
        ready_pods = list
            .items
            .iter()
            .filter(|p| p.labels().get(REVISION_LABEL) == Some(rev) && crate::pods::is_ready(p))
            .map(|p| p.name_any())
            .collect();
        let ready_ips: Vec<String> = list
            .items
            .iter()
            .filter(|p| p.labels().get(REVISION_LABEL) == Some(rev) && crate::pods::is_ready(p))
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect();
        status.endpoint = endpoint(ctx, &key, &ready_ips).await.at(Step::Dereference)?;
    } else {
        status.replicas = Some(0);
        status.ready_replicas = Some(0);
        status.endpoint = None;
    }
    status.serving_revision = serving.clone();
    status.replicas_summary = Some(format!(
        "{}/{}",
        status.ready_replicas.unwrap_or(0),
        if serving.is_some() { desired_replicas(md) } else { 0 }
    ));

    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &ns);
    match build_hpa(md, &key, &owner) {
        Some(hpa) => {
            apply(&hpas, &hpa).await.at(Step::Apply)?;
        }
        None => {
            if let Some(h) = hpas.get_opt(&key.name).await.at(Step::Dereference)?
                && h.owner_references().iter().any(|o| o.uid == key.uid)
            {
                hpas.delete(&key.name, &DeleteParams::background()).await.at(Step::Apply)?;
            }
        }
    }

    // Garbage: revisions that neither serve nor wait for their gate.
    let candidate_rev = candidate.as_ref().ok().map(|(r, _, _)| r.clone());
    let keep: BTreeSet<String> = serving.iter().chain(candidate_rev.iter()).cloned().collect();
    collect_garbage(&config_maps, &runs, &key, &keep).await.at(Step::Apply)?;

    // Live figures of the ready pods of the serving revision.
    if let Some(observed) = ctx.gateway.observe(&key.uid) {
        let reports: Vec<&v1::Progress> = ready_pods.iter().filter_map(|p| observed.progress_by_pod.get(p)).collect();
        status.metrics = aggregate(&reports).or(status.metrics.take().filter(|_| !ready_pods.is_empty()));
        ctx.gateway.retain_pods(&key.uid, &ready_pods);
    }
    if ready_pods.is_empty() {
        status.metrics = None;
    }

    // Conditions.
    status.candidate_revision = candidate_rev.clone().filter(|c| Some(c) != serving.as_ref());
    status.gate = gate_verdict.as_ref().map(|(rev, run, v)| {
        let (verdict, message) = match v {
            Verdict::Pending(m) => ("Pending", m.clone()),
            Verdict::Passed(m) => ("Passed", m.clone()),
            Verdict::Failed(m) => ("Failed", m.clone()),
        };
        GateStatus { revision: rev.clone(), eval_run: run.clone(), verdict: verdict.into(), message: Some(message) }
    });
    let desired = desired_replicas(md);
    let ready = status.ready_replicas.unwrap_or(0);
    let c = &mut status.common.conditions;
    let serving_ready = serving.is_some() && ready > 0 && status.endpoint.is_some();
    let (ready_reason, ready_message) = if serving_ready {
        (
            "Serving".to_string(),
            format!(
                "revision {} serves on {} ({ready}/{desired} ready)",
                serving.clone().unwrap_or_default(),
                status.endpoint.clone().unwrap_or_default()
            ),
        )
    } else if let Some((reason, message, _)) = &waiting {
        (reason.clone(), message.clone())
    } else if let Some((rev, run, Verdict::Pending(m))) = &gate_verdict
        && serving.is_none()
    {
        ("Evaluating".to_string(), format!("revision {rev} waits for its gate (EvalRun {run}): {m}"))
    } else if let Some((rev, run, Verdict::Failed(m))) = &gate_verdict
        && serving.is_none()
    {
        ("GateFailed".to_string(), format!("revision {rev} failed its gate (EvalRun {run}), nothing serves: {m}"))
    } else if desired == 0 {
        ("ScaledToZero".to_string(), "replicas is 0".to_string())
    } else {
        ("Starting".to_string(), format!("waiting for a ready serving pod ({ready}/{desired} ready)"))
    };
    conditions::set(c, READY, serving_ready, &ready_reason, ready_message.clone(), generation, &now);
    conditions::set(c, AVAILABLE, serving_ready, &ready_reason, ready_message.clone(), generation, &now);

    let (progressing, progress_reason, progress_message, health) = if let Some((reason, message, invalid)) = &waiting {
        let h = if *invalid { Health::Stalled } else { Health::Reconciling };
        (false, reason.clone(), message.clone(), h)
    } else if let Some((rev, run, v)) = &gate_verdict
        && serving.as_ref() != Some(rev)
    {
        match v {
            Verdict::Failed(m) => (
                false,
                "GateFailed".to_string(),
                format!(
                    "revision {rev} failed its gate (EvalRun {run}); {}: {m}",
                    serving
                        .as_ref()
                        .map(|s| format!("revision {s} keeps serving"))
                        .unwrap_or_else(|| "nothing serves".into())
                ),
                Health::Stalled,
            ),
            _ => (
                true,
                "Evaluating".to_string(),
                format!("revision {rev} is being evaluated by EvalRun {run}"),
                Health::Reconciling,
            ),
        }
    } else if !rolled_out || (desired > 0 && (ready < desired || !serving_ready)) {
        (
            true,
            "RollingOut".to_string(),
            format!("{ready}/{desired} serving pods of revision {} ready", serving.clone().unwrap_or_default()),
            Health::Reconciling,
        )
    } else {
        (false, "Complete".to_string(), ready_message.clone(), Health::Settled)
    };
    conditions::set(c, PROGRESSING, progressing, &progress_reason, progress_message.clone(), generation, &now);
    conditions::set_health(c, health, &progress_reason, &progress_message, generation, &now);
    status.common.phase = Some(
        match (health, serving_ready) {
            (Health::Stalled, false) => "Failed",
            (Health::Stalled, true) => "Degraded",
            (_, true) if progressing => "Progressing",
            (_, true) => "Serving",
            _ if waiting.is_some() => "Waiting",
            _ => "Pending",
        }
        .into(),
    );

    let changed = super::batch::write_status::<ModelDeployment, ModelDeploymentStatus>(ctx, &api, &key, &old, &status)
        .await
        .at(Step::UpdateStatus)?;
    let old_reason = conditions::get(&old.common.conditions, PROGRESSING).map(|c| c.reason.clone());
    if changed && old_reason.as_deref() != Some(progress_reason.as_str()) {
        let warning = matches!(health, Health::Stalled);
        ctx.event(md, warning, &progress_reason, progress_message).await;
    }
    Ok(match (&waiting, health) {
        (Some((_, _, true)), _) => Action::await_change(),
        (Some(_), _) => Action::requeue(Duration::from_secs(30)),
        (None, Health::Reconciling) => Action::requeue(Duration::from_secs(10)),
        _ => Action::requeue(Duration::from_secs(300)),
    })
}

/// The endpoint of a deployment: its Service's DNS name, or a ready pod's IP when the
/// operator is told to address by pod IP: a ready address of the Service's
/// EndpointSlices, else a ready serving pod's IP (EndpointSlices refuse loopback
/// addresses, which a development node's pods have). None while nothing is ready.
async fn endpoint(ctx: &Context, key: &WorkloadKey, ready_ips: &[String]) -> Result<Option<String>> {
    if !ctx.config.address_by_pod_ip {
        return Ok(Some(format!("http://{}.{}.svc:{SERVING_PORT}/v1", key.name, key.namespace)));
    }
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let list = slices.list(&ListParams::default().labels(&format!("kubernetes.io/service-name={}", key.name))).await?;
    let mut addresses: Vec<String> = list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    if addresses.is_empty() {
        addresses = ready_ips.to_vec();
    }
    addresses.sort();
    Ok(addresses.first().map(|ip| format!("http://{ip}:{SERVING_PORT}/v1")))
}

/// Deletes the revision ConfigMaps and gate EvalRuns of revisions not in `keep`.
async fn collect_garbage(
    config_maps: &Api<ConfigMap>,
    runs: &Api<EvalRun>,
    key: &WorkloadKey,
    keep: &BTreeSet<String>,
) -> Result<()> {
    let selector = format!("{}={},{}", crate::workload::UID_LABEL, key.uid, REVISION_LABEL);
    for cm in config_maps.list(&ListParams::default().labels(&selector)).await?.items {
        if cm.labels().get(REVISION_LABEL).is_some_and(|r| !keep.contains(r)) {
            let _ = config_maps.delete(&cm.name_any(), &DeleteParams::background()).await;
        }
    }
    let gates = format!("{}=ModelDeploymentGate,{}", crate::workload::KIND_LABEL, REVISION_LABEL);
    for run in runs.list(&ListParams::default().labels(&gates)).await?.items {
        let ours = run.owner_references().iter().any(|o| o.uid == key.uid);
        if ours && run.labels().get(REVISION_LABEL).is_some_and(|r| !keep.contains(r)) {
            let _ = runs.delete(&run.name_any(), &DeleteParams::background()).await;
        }
    }
    Ok(())
}

/// Whether a pod is a serving pod of a deployment (for routing its changes).
pub fn is_serving_pod(pod: &Pod) -> bool {
    pod.labels().get(WORKER_LABEL).is_some() && pod.labels().contains_key(REVISION_LABEL)
}

#[cfg(test)]
mod tests;
