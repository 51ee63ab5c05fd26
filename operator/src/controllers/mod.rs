//! The controllers, one per kind, and the helpers their resolve steps share. Each
//! controller watches its kind in the configured namespaces, the objects it owns, the
//! worker pods of its workloads, the objects it references, and the gateway's reconcile
//! requests.

pub mod batch;
pub mod dataset;
pub mod deployment;
pub mod evalrun;
pub mod finetune;
pub mod prompt;

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use llmops_crds::condition_types::{FAILED, READY, SUCCEEDED};
use llmops_crds::finetune::FineTuneMethod;
use llmops_crds::{Dataset, EvalRun, FineTuneJob, LineageInput, ModelDeployment, ModelSource, PromptVersion};
use llmops_proto::v1;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::assignment::{ResolvedDataset, model_from_uri};
use crate::conditions;
use crate::context::Context;
use crate::error::{ReconcileError, Result};
use crate::models::Requester;
use crate::workload::{MANAGED_BY, WORKLOAD_ANNOTATION, WorkloadKey};
use batch::Plan;

/// Runs one reconcile of `obj` with its duration measured, and a failure counted by step
/// and category, logged, and published as an event whose reason names the step.
pub async fn instrumented<K, F>(obj: &K, ctx: &Context, reconcile: F) -> std::result::Result<Action, ReconcileError>
where
    K: kube::Resource<DynamicType = ()>,
    F: std::future::Future<Output = std::result::Result<Action, ReconcileError>>,
{
    let kind = K::kind(&()).into_owned();
    let _timer = ctx.metrics.reconcile_started(&kind);
    let result = reconcile.await;
    if let Err(e) = &result {
        let reason = e.reason();
        ctx.metrics.reconcile_failed(&kind, e);
        tracing::warn!(kind, name = %obj.name_any(), namespace = ?obj.namespace(), %reason, error = %e, "reconcile failed");
        ctx.event(obj, true, &reason, e.to_string()).await;
    }
    result
}

/// sha256 of a spec's JSON form.
pub fn spec_hash<T: Serialize>(spec: &T) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(spec).unwrap_or_default()))
}

/// A model source resolved to the protocol's Model, or what to wait for. A model given by
/// URI is read from the model cache, where the resolver copies it once (see
/// [`crate::models`]); its lineage records the digest found there.
pub async fn resolve_model(
    ctx: &Context,
    requester: Requester<'_>,
    source: &ModelSource,
) -> Result<std::result::Result<(v1::Model, LineageInput), Plan>> {
    let namespace = requester.namespace;
    if let Some(uri) = &source.uri {
        let cached = match crate::models::resolve(ctx, requester, uri, source.sha256.as_deref()).await? {
            Ok(a) => a,
            Err(plan) => return Ok(Err(plan)),
        };
        let lineage = LineageInput { kind: "Model".into(), name: uri.clone(), sha256: cached.sha256.clone() };
        // The format is the one the spec's URI says; the weights are the cached copy.
        let mut model = model_from_uri(source, uri);
        model.weights = Some(cached);
        return Ok(Ok((model, lineage)));
    }
    let Some(name) = &source.fine_tune_job else {
        return Ok(Err(Plan::invalid("InvalidModelSource", "the model sets neither uri nor fineTuneJob")));
    };
    let job = match finished_job(ctx, namespace, name).await? {
        Ok(job) => job,
        Err(plan) => return Ok(Err(plan)),
    };
    let status = job.status.clone().unwrap_or_default();
    let artifact = match (job.spec.method, &status.merged_model, &status.artifact) {
        (FineTuneMethod::Full, _, Some(a)) => a.clone(),
        (FineTuneMethod::Lora, Some(merged), _) => merged.clone(),
        (FineTuneMethod::Lora, None, _) => {
            return Ok(Err(Plan::wait(
                "UnsupportedModelSource",
                format!(
                    "FineTuneJob {name} trained a LoRA adapter without merge; use it as an adapter, or set merge: true"
                ),
            )));
        }
        (_, _, None) => {
            return Ok(Err(Plan::wait("WaitingForFineTuneJob", format!("FineTuneJob {name} has no output"))));
        }
    };
    let with_digest = ModelSource {
        sha256: Some(artifact.sha256.clone()),
        format: Some(llmops_crds::ModelFormat::Hf),
        ..source.clone()
    };
    let lineage = LineageInput { kind: "FineTuneJob".into(), name: name.clone(), sha256: artifact.sha256.clone() };
    Ok(Ok((model_from_uri(&with_digest, &artifact.uri), lineage)))
}

/// A FineTuneJob that Succeeded, or what to wait for.
pub async fn finished_job(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<std::result::Result<FineTuneJob, Plan>> {
    let api: Api<FineTuneJob> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(job) = api.get_opt(name).await? else {
        return Ok(Err(Plan::wait(
            "FineTuneJobNotFound",
            format!("FineTuneJob {name} does not exist in namespace {namespace}"),
        )));
    };
    let conds = job.status.as_ref().map(|s| s.common.conditions.clone()).unwrap_or_default();
    if conditions::is_true(&conds, FAILED) {
        return Ok(Err(Plan::wait("FineTuneJobFailed", format!("FineTuneJob {name} Failed"))));
    }
    if !conditions::is_true(&conds, SUCCEEDED) {
        return Ok(Err(Plan::wait("WaitingForFineTuneJob", format!("waiting for FineTuneJob {name} to succeed"))));
    }
    Ok(Ok(job))
}

/// A PromptVersion that is Ready, as the protocol's Prompt with its lineage, or what to
/// wait for.
pub async fn resolve_prompt(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<std::result::Result<(v1::Prompt, LineageInput), Plan>> {
    let api: Api<PromptVersion> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(pv) = api.get_opt(name).await? else {
        return Ok(Err(Plan::wait(
            "PromptVersionNotFound",
            format!("PromptVersion {name} does not exist in namespace {namespace}"),
        )));
    };
    let status = pv.status.clone().unwrap_or_default();
    let (Some(digest), true) = (status.digest, conditions::is_true(&status.common.conditions, READY)) else {
        return Ok(Err(Plan::wait("WaitingForPromptVersion", format!("waiting for PromptVersion {name} to be Ready"))));
    };
    let input = LineageInput { kind: "PromptVersion".into(), name: name.to_string(), sha256: digest.clone() };
    Ok(Ok((crate::assignment::prompt(name, &pv.spec, &digest), input)))
}

/// A Dataset that is Ready, or what to wait for.
pub async fn resolve_dataset(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<std::result::Result<ResolvedDataset, Plan>> {
    let api: Api<Dataset> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(ds) = api.get_opt(name).await? else {
        return Ok(Err(Plan::wait(
            "DatasetNotFound",
            format!("Dataset {name} does not exist in namespace {namespace}"),
        )));
    };
    let status = ds.status.clone().unwrap_or_default();
    if conditions::is_true(&status.common.conditions, FAILED) {
        return Ok(Err(Plan::wait("DatasetFailed", format!("Dataset {name} Failed"))));
    }
    match (&status.artifact, conditions::is_true(&status.common.conditions, READY)) {
        (Some(artifact), true) => Ok(Ok(ResolvedDataset {
            name: name.to_string(),
            artifact: artifact.clone(),
            splits: status.splits.clone(),
        })),
        _ => Ok(Err(Plan::wait("WaitingForDataset", format!("waiting for Dataset {name} to be Ready")))),
    }
}

fn apis<K>(ctx: &Context) -> Vec<Api<K>>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    if ctx.config.namespaces.is_empty() {
        vec![Api::all(ctx.client.clone())]
    } else {
        ctx.config.namespaces.iter().map(|ns| Api::namespaced(ctx.client.clone(), ns)).collect()
    }
}

/// The workload a worker pod belongs to, for routing its changes to a controller.
fn pod_owner<K>(pod: &Pod, kind: &str) -> Option<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()>,
{
    let key = WorkloadKey::parse(pod.annotations().get(WORKLOAD_ANNOTATION)?)?;
    (key.kind == kind).then(|| ObjectRef::new(&key.name).within(&key.namespace))
}

fn trigger_stream<K>(
    ctx: &Context,
    kind: &str,
    namespace: Option<&str>,
) -> impl futures::Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + 'static,
{
    UnboundedReceiverStream::new(ctx.gateway.subscribe(kind, namespace))
        .map(|t| ObjectRef::new(&t.name).within(&t.namespace))
}

fn owned_config(kind: &str) -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "{}={},{}={kind}",
        MANAGED_BY.0,
        MANAGED_BY.1,
        crate::workload::KIND_LABEL
    ))
}

async fn drain<S, T, E>(stream: S, kind: &'static str)
where
    S: futures::Stream<Item = std::result::Result<T, E>>,
    E: std::fmt::Display,
{
    stream
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(kind, error = %e, "controller event");
            }
        })
        .await;
}

/// Runs every controller until the future is dropped.
pub async fn run(ctx: Arc<Context>) {
    // A JoinSet aborts every controller when this future is dropped (an operator stop).
    let mut tasks = tokio::task::JoinSet::new();
    for api in apis::<Dataset>(&ctx) {
        let (jobs, pods) = scoped(&ctx, &api);
        let c = Controller::new(api.clone(), watcher::Config::default())
            .owns(jobs, owned_config("Dataset"))
            .watches(pods, owned_config("Dataset"), |p| pod_owner::<Dataset>(&p, "Dataset"))
            .reconcile_on(trigger_stream::<Dataset>(&ctx, "Dataset", api.namespace()));
        let s = c.run(batch::reconcile::<Dataset>, batch::error_policy, ctx.clone());
        tasks.spawn(drain(s, "Dataset"));
    }
    for api in apis::<FineTuneJob>(&ctx) {
        let (jobs, pods) = scoped(&ctx, &api);
        let c = Controller::new(api.clone(), watcher::Config::default());
        let store = c.store();
        let datasets: Api<Dataset> = same_scope(&ctx, &api);
        let mut c = c
            .owns(jobs, owned_config("FineTuneJob"))
            .watches(pods, owned_config("FineTuneJob"), |p| pod_owner::<FineTuneJob>(&p, "FineTuneJob"))
            .watches(datasets, watcher::Config::default(), move |ds: Dataset| {
                let ns = ds.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|f| f.namespace() == ns && f.spec.dataset.name == ds.name_any())
                    .map(|f| ObjectRef::from_obj(&*f))
                    .collect::<Vec<_>>()
            });
        c = c.reconcile_on(trigger_stream::<FineTuneJob>(&ctx, "FineTuneJob", api.namespace()));
        let s = c.run(batch::reconcile::<FineTuneJob>, batch::error_policy, ctx.clone());
        tasks.spawn(drain(s, "FineTuneJob"));
    }
    for api in apis::<EvalRun>(&ctx) {
        let (jobs, pods) = scoped(&ctx, &api);
        let c = Controller::new(api.clone(), watcher::Config::default());
        let (s1, s2, s3, s4) = (c.store(), c.store(), c.store(), c.store());
        let deployments: Api<ModelDeployment> = same_scope(&ctx, &api);
        let datasets: Api<Dataset> = same_scope(&ctx, &api);
        let tunes: Api<FineTuneJob> = same_scope(&ctx, &api);
        let prompts: Api<PromptVersion> = same_scope(&ctx, &api);
        let mut c = c
            .owns(jobs, owned_config("EvalRun"))
            .watches(pods, owned_config("EvalRun"), |p| pod_owner::<EvalRun>(&p, "EvalRun"))
            .watches(datasets, watcher::Config::default(), move |ds: Dataset| {
                referencing(&s1, ds.namespace(), |e| e.spec.evaluation.dataset.name == ds.name_any())
            })
            .watches(tunes, watcher::Config::default(), move |f: FineTuneJob| {
                let name = f.name_any();
                referencing(&s2, f.namespace(), |e| evalrun::references_job(&e.spec, &name))
            })
            .watches(prompts, watcher::Config::default(), move |p: PromptVersion| {
                referencing(&s3, p.namespace(), |e| {
                    e.spec.evaluation.prompt.as_ref().is_some_and(|r| r.name == p.name_any())
                })
            })
            .watches(deployments, watcher::Config::default(), move |m: ModelDeployment| {
                let name = m.name_any();
                referencing(&s4, m.namespace(), |e| {
                    e.spec.target.model_deployment.as_deref() == Some(name.as_str())
                        || e.spec.evaluation.judge.as_ref().and_then(|j| j.model_deployment.as_deref())
                            == Some(name.as_str())
                })
            });
        c = c.reconcile_on(trigger_stream::<EvalRun>(&ctx, "EvalRun", api.namespace()));
        let s = c.run(batch::reconcile::<EvalRun>, batch::error_policy, ctx.clone());
        tasks.spawn(drain(s, "EvalRun"));
    }
    for api in apis::<ModelDeployment>(&ctx) {
        let c = Controller::new(api.clone(), watcher::Config::default());
        let (s1, s2) = (c.store(), c.store());
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = same_scope(&ctx, &api);
        let runs: Api<EvalRun> = same_scope(&ctx, &api);
        let pods: Api<Pod> = same_scope(&ctx, &api);
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> = same_scope(&ctx, &api);
        let tunes: Api<FineTuneJob> = same_scope(&ctx, &api);
        let prompts: Api<PromptVersion> = same_scope(&ctx, &api);
        let gates = watcher::Config::default().labels(&format!("{}=ModelDeploymentGate", crate::workload::KIND_LABEL));
        let mut c = c
            .owns(deployments, owned_config("ModelDeployment"))
            .owns(runs, gates)
            .watches(pods, owned_config("ModelDeployment"), |p| pod_owner::<ModelDeployment>(&p, "ModelDeployment"))
            // A Service's EndpointSlices carry its labels: a pod that became an address.
            .watches(slices, owned_config("ModelDeployment"), |s| {
                let service = s.labels().get("kubernetes.io/service-name")?.clone();
                Some(ObjectRef::<ModelDeployment>::new(&service).within(&s.namespace()?))
            })
            .watches(tunes, watcher::Config::default(), move |f: FineTuneJob| {
                let name = f.name_any();
                referencing(&s1, f.namespace(), |m| {
                    m.spec.model.fine_tune_job.as_deref() == Some(name.as_str())
                        || m.spec.adapters.iter().any(|a| a.source.fine_tune_job.as_deref() == Some(name.as_str()))
                })
            })
            .watches(prompts, watcher::Config::default(), move |p: PromptVersion| {
                let name = p.name_any();
                referencing(&s2, p.namespace(), |m| m.spec.prompt.as_ref().is_some_and(|r| r.name == name))
            });
        c = c.reconcile_on(trigger_stream::<ModelDeployment>(&ctx, "ModelDeployment", api.namespace()));
        let s = c.run(deployment::reconcile, deployment::error_policy, ctx.clone());
        tasks.spawn(drain(s, "ModelDeployment"));
    }
    for api in apis::<PromptVersion>(&ctx) {
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = same_scope(&ctx, &api);
        let s = Controller::new(api, watcher::Config::default()).owns(cms, owned_config("PromptVersion")).run(
            prompt::reconcile,
            prompt::error_policy,
            ctx.clone(),
        );
        tasks.spawn(drain(s, "PromptVersion"));
    }
    tasks.spawn(crate::models::run(ctx.clone()));
    ctx.metrics.set_ready(true);
    while tasks.join_next().await.is_some() {}
}

fn referencing<K>(
    store: &kube::runtime::reflector::Store<K>,
    namespace: Option<String>,
    pred: impl Fn(&K) -> bool,
) -> Vec<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .into_iter()
        .filter(|o| o.meta().namespace == namespace && pred(o))
        .map(|o| ObjectRef::from_obj(&*o))
        .collect()
}

fn same_scope<K, O>(ctx: &Context, api: &Api<K>) -> Api<O>
where
    K: kube::Resource,
    O: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match api.namespace() {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    }
}

fn scoped<K: kube::Resource>(ctx: &Context, api: &Api<K>) -> (Api<Job>, Api<Pod>) {
    (same_scope(ctx, api), same_scope(ctx, api))
}
