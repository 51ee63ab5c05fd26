//! The reconcile pipeline shared by the batch kinds (Dataset, FineTuneJob, EvalRun):
//! resolve and build (per kind, once: the result is pinned in the workload's token
//! Secret, so later changes of the inputs do not change a started job) -> apply (token
//! Secret, Job) -> observe (Job, newest pod, gateway) -> status, written only when it
//! changed in more than timestamps.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use llmops_crds::condition_types::READY;
use llmops_crds::{Lineage, Resources};
use llmops_proto::v1::{self, Assignment};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::conditions;
use crate::context::Context;
use crate::error::{AtStep, Error, ReconcileError, Result, Step};
use crate::gateway::Observed;
use crate::job::{self, SecretFile, TOKEN_KEY, WorkerJob};
use crate::pods;
use crate::status::{self, BatchState, JobView, Observation};
use crate::workload::{FIELD_MANAGER, WorkloadKey, owner_reference};

/// Finalizer of kinds whose worker checkpoints before its pod goes.
pub const FINALIZER: &str = "llmops.dev/checkpoint";

/// What resolving a workload's references gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// A reference is missing or not ready: requeue, it may change.
    Wait {
        /// CamelCase reason, e.g. WaitingForDataset.
        reason: String,
        /// For a person.
        message: String,
    },
    /// The spec can never work as it is: Failed and Stalled until it changes.
    Invalid {
        /// CamelCase reason, e.g. UnsupportedJudge.
        reason: String,
        /// For a person.
        message: String,
    },
    /// Everything resolved: run the worker with this.
    Run {
        /// The Assignment.
        assignment: Box<Assignment>,
        /// Digests of the inputs.
        lineage: Option<Lineage>,
        /// Secret keys the worker reads as files.
        secret_files: Vec<SecretFile>,
    },
}

impl Plan {
    /// A Wait plan.
    pub fn wait(reason: &str, message: impl Into<String>) -> Self {
        Plan::Wait { reason: reason.into(), message: message.into() }
    }

    /// An Invalid plan.
    pub fn invalid(reason: &str, message: impl Into<String>) -> Self {
        Plan::Invalid { reason: reason.into(), message: message.into() }
    }
}

impl From<crate::assignment::BuildError> for Plan {
    /// A builder's refusal: waiting when it waits for another object, otherwise a spec
    /// that cannot work.
    fn from(e: crate::assignment::BuildError) -> Self {
        if e.reason.starts_with("WaitingFor") {
            Plan::wait(e.reason, e.message)
        } else {
            Plan::invalid(e.reason, e.message)
        }
    }
}

/// What a started workload was pinned to, kept in its token Secret.
#[derive(Debug, Clone, PartialEq)]
pub struct Pinned {
    /// The bearer token.
    pub token: String,
    /// The Assignment.
    pub assignment: Assignment,
    /// Digests of the inputs.
    pub lineage: Option<Lineage>,
    /// Secret keys the worker reads as files.
    pub secret_files: Vec<SecretFile>,
}

/// The members of [`BatchKind`] every batch kind implements alike: its status type,
/// the shared part of the status (conditions, times, attempts), and the spec's
/// `resources` and `backoffLimit`.
macro_rules! batch_accessors {
    ($status:ty) => {
        type Status = $status;

        fn status_ref(&self) -> Option<&$status> {
            self.status.as_ref()
        }

        fn batch(s: &$status) -> BatchState {
            BatchState { common: s.common.clone(), times: s.times.clone(), attempts: s.attempts }
        }

        fn set_batch(s: &mut $status, state: BatchState) {
            s.common = state.common;
            s.times = state.times;
            s.attempts = state.attempts;
        }

        fn resources(&self) -> Option<&Resources> {
            self.spec.resources.as_ref()
        }

        fn backoff_limit(&self) -> i32 {
            self.spec.backoff_limit
        }
    };
}
pub(crate) use batch_accessors;

/// A batch kind.
pub trait BatchKind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Suffix of the Job's name.
    const SUFFIX: &'static str;
    /// Whether suspend and deletion first ask the worker for a checkpoint.
    const CHECKPOINT_ON_STOP: bool = false;
    /// The status type.
    type Status: Serialize + Clone + Default + Send + Sync + std::fmt::Debug;
    /// The stored status.
    fn status_ref(&self) -> Option<&Self::Status>;
    /// The shared part of a status.
    fn batch(status: &Self::Status) -> BatchState;
    /// Writes the shared part into a status.
    fn set_batch(status: &mut Self::Status, state: BatchState);
    /// Resources of the pod.
    fn resources(&self) -> Option<&Resources>;
    /// Retries of the pod.
    fn backoff_limit(&self) -> i32;
    /// Whether the spec asks to suspend.
    fn suspend(&self) -> bool {
        false
    }
    /// Resolve, validate and build.
    fn plan(&self, ctx: &Context, key: &WorkloadKey) -> impl Future<Output = Result<Plan>> + Send;
    /// Adds the kind's own figures (progress, artifact, metrics) to a status.
    fn figures(&self, status: &mut Self::Status, observed: Option<&Observed>, pinned: &Pinned, key: &WorkloadKey);
    /// Exports the kind's figures of a status as per-object metrics.
    fn export(
        _status: &Self::Status,
        _observed: Option<&Observed>,
        _metrics: &crate::metrics::Metrics,
        _key: &WorkloadKey,
    ) {
    }
}

/// Reconciles one batch object, counting metrics and reporting errors as events.
pub async fn reconcile<K: BatchKind>(
    obj: std::sync::Arc<K>,
    ctx: std::sync::Arc<Context>,
) -> std::result::Result<Action, ReconcileError> {
    super::instrumented(&*obj, &ctx, async {
        let key = WorkloadKey::of(&*obj).at(Step::Dereference)?;
        reconcile_inner(&*obj, &ctx, &key).await
    })
    .await
}

/// The plan of `obj` as its namespace's tenant: store keys of its spec localized (see
/// [`crate::tenancy`]), and nothing at all in a reserved namespace.
async fn tenant_plan<K: BatchKind>(obj: &K, ctx: &Context, key: &WorkloadKey) -> Result<Plan> {
    if let Some(message) = crate::tenancy::reserved(&key.namespace) {
        return Ok(Plan::invalid("ReservedNamespace", message));
    }
    crate::tenancy::localized(obj)?.plan(ctx, key).await
}

/// How a failed reconcile is retried.
pub fn error_policy<K>(_obj: std::sync::Arc<K>, _error: &ReconcileError, _ctx: std::sync::Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_inner<K: BatchKind>(
    obj: &K,
    ctx: &Context,
    key: &WorkloadKey,
) -> std::result::Result<Action, ReconcileError> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let generation = obj.meta().generation;
    let old_status = obj.status_ref().cloned().unwrap_or_default();
    let old = K::batch(&old_status);
    let job_name = key.child_name(K::SUFFIX);
    let secret_name = format!("{job_name}-token");
    let now = conditions::now();

    if obj.meta().deletion_timestamp.is_some() {
        if has_finalizer(obj) {
            if !stop_worker(ctx, key).await {
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            remove_finalizer(&api, obj).await.at(Step::Apply)?;
        }
        ctx.gateway.forget(&key.uid);
        ctx.metrics.forget_object(&key.namespace, &key.name);
        return Ok(Action::await_change());
    }
    if K::CHECKPOINT_ON_STOP && !old.finished() && !has_finalizer(obj) {
        add_finalizer(&api, obj).await.at(Step::Apply)?;
    }

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let seal_key = crate::seal::key(ctx).await.at(Step::Dereference)?;
    let read = read_pinned(&secrets, &secret_name, &seal_key, &key.uid).await.at(Step::Dereference)?;
    let read = match read {
        Err(refused) => {
            // Edited outside the operator, or left by another object: never acted on.
            let why = match refused {
                crate::seal::Refused::NotOwned => "is not controlled by this object (left by an earlier one?)",
                crate::seal::Refused::BadSeal => "was changed outside the operator (its seal does not verify)",
            };
            let message = format!(
                "the Secret {secret_name} holding this object's pinned inputs {why}; delete it and the operator \
                 pins the inputs again"
            );
            let state = status::invalid(&old, "PinnedStateRefused", &message, generation, &now);
            let mut new_status = old_status.clone();
            K::set_batch(&mut new_status, state);
            write_status(ctx, &api, key, &old_status, &new_status).await.at(Step::UpdateStatus)?;
            ctx.gateway.forget(&key.uid);
            tracing::warn!(workload = %key, secret = %secret_name, "refusing pinned state: {message}");
            ctx.event(obj, true, "PinnedStateRefused", message).await;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Ok(read) => read,
    };
    let pinned = match read {
        Some(p) => p,
        // Finished without inputs pinned means an invalid spec: only a new generation
        // can change that.
        None if old.finished() && old.common.observed_generation == generation => return Ok(Action::await_change()),
        None => match tenant_plan(obj, ctx, key).await.at(Step::Dereference)? {
            plan @ (Plan::Wait { .. } | Plan::Invalid { .. }) => {
                let invalid = matches!(plan, Plan::Invalid { .. });
                let (Plan::Wait { reason, message } | Plan::Invalid { reason, message }) = plan else {
                    unreachable!("matched above")
                };
                let state = if invalid {
                    status::invalid(&old, &reason, &message, generation, &now)
                } else {
                    status::waiting(&old, &reason, &message, generation, &now)
                };
                let mut new_status = old_status.clone();
                K::set_batch(&mut new_status, state);
                write_status(ctx, &api, key, &old_status, &new_status).await.at(Step::UpdateStatus)?;
                let old_reason = conditions::get(&old.common.conditions, READY).map(|c| c.reason.as_str());
                if old_reason != Some(reason.as_str()) {
                    tracing::info!(workload = %key, %reason, %message, invalid, "cannot start");
                    ctx.event(obj, invalid, &reason, message).await;
                }
                // An invalid spec waits for a change of the object; a missing input is looked
                // for again (and its own changes trigger a reconcile too).
                return Ok(if invalid { Action::await_change() } else { Action::requeue(Duration::from_secs(30)) });
            }
            Plan::Run { assignment, lineage, secret_files } => {
                let pinned = Pinned {
                    token: crate::gateway::tokens::generate()
                        .map_err(|e| Error::Random(e.to_string()))
                        .at(Step::Build)?,
                    assignment: *assignment,
                    lineage,
                    secret_files,
                };
                create_pinned(&secrets, obj, key, &secret_name, pinned, &seal_key).await.at(Step::Apply)?
            }
        },
    };
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let pod_list = pods_api.list(&ListParams::default().labels(&key.selector())).await.at(Step::Dereference)?.items;
    // Tokens expire with their workload: once its outcome is in status (the worker got
    // the acknowledgement of its result when it was written), its token is refused.
    if old.finished() {
        ctx.gateway.forget(&key.uid);
    } else {
        ctx.gateway.register(key, &pinned.token, pinned.assignment.clone());
    }

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let mut job = jobs.get_opt(&job_name).await.at(Step::Dereference)?;
    let desired_suspend = obj.suspend();
    let mut soon = false;
    match &job {
        None if !old.finished() => {
            let built = job::build(
                &ctx.config,
                &WorkerJob {
                    key,
                    job_name: job_name.clone(),
                    token_secret: secret_name.clone(),
                    resources: obj.resources(),
                    backoff_limit: obj.backoff_limit(),
                    suspend: desired_suspend,
                    owner: owner_reference(obj).at(Step::Build)?,
                    secret_files: pinned.secret_files.clone(),
                    propagated: job::Propagated::of(obj.meta()),
                },
            );
            let params = PatchParams::apply(FIELD_MANAGER).force();
            job = Some(jobs.patch(&job_name, &params, &Patch::Apply(&built)).await.at(Step::Apply)?);
            tracing::info!(workload = %key, job = %job_name, "job applied");
        }
        None => {}
        Some(j) => {
            let current = j.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
            if desired_suspend && !current && !old.finished() {
                if !K::CHECKPOINT_ON_STOP || stop_worker(ctx, key).await {
                    job = Some(patch_suspend(&jobs, &job_name, true).await.at(Step::Apply)?);
                } else {
                    soon = true;
                }
            } else if !desired_suspend && current && !queued(j) {
                job = Some(patch_suspend(&jobs, &job_name, false).await.at(Step::Apply)?);
                crate::lock(&ctx.stop_requests).remove(&key.uid);
            }
        }
    }

    let newest = pods::newest(&pod_list);
    let observation = Observation {
        job: job.as_ref().map(job_view),
        pod_problem: newest.and_then(pods::problem),
        pod_running: newest.is_some_and(pods::is_running),
        gateway: ctx.gateway.observe(&key.uid),
        suspend: desired_suspend,
    };
    let state = status::compute(&old, &observation, generation, &now);
    let mut new_status = old_status.clone();
    K::set_batch(&mut new_status, state.clone());
    obj.figures(&mut new_status, observation.gateway.as_ref(), &pinned, key);
    K::export(&new_status, observation.gateway.as_ref(), &ctx.metrics, key);
    write_status(ctx, &api, key, &old_status, &new_status).await.at(Step::UpdateStatus)?;
    if let Some(g) = &observation.gateway {
        ctx.gateway.persisted(&key.uid, g.terminal_version);
    }

    let old_ready = conditions::get(&old.common.conditions, READY).cloned();
    let new_ready = conditions::get(&state.common.conditions, READY).cloned();
    if let Some(ready) = new_ready
        && old_ready.as_ref().map(|c| (&c.reason, &c.message)) != Some((&ready.reason, &ready.message))
        && old_ready.as_ref().map(|c| &c.reason) != Some(&ready.reason)
    {
        let warning = !matches!(ready.reason.as_str(), "Running" | "Pending" | "Succeeded" | "Suspended");
        tracing::info!(workload = %key, reason = %ready.reason, message = %ready.message, "condition changed");
        ctx.event(obj, warning, &ready.reason, ready.message.clone()).await;
    }

    Ok(if soon {
        Action::requeue(Duration::from_secs(2))
    } else if state.finished() {
        Action::requeue(Duration::from_secs(600))
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

fn job_view(job: &Job) -> JobView {
    let status = job.status.clone().unwrap_or_default();
    let failed_condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .map(|c| (c.reason.clone().unwrap_or_else(|| "JobFailed".into()), c.message.clone().unwrap_or_default()));
    JobView {
        active: status.active.unwrap_or(0),
        succeeded: status.succeeded.unwrap_or(0),
        failed: status.failed.unwrap_or(0),
        start_time: status.start_time,
        failed_condition,
        suspended: job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false),
        queue: job.labels().get(job::QUEUE_LABEL).cloned(),
    }
}

/// Whether a Job waits for a queue (Kueue) to admit it: the queue unsuspends it.
fn queued(job: &Job) -> bool {
    job.labels().contains_key(job::QUEUE_LABEL)
}

async fn patch_suspend(jobs: &Api<Job>, name: &str, suspend: bool) -> Result<Job> {
    let patch = serde_json::json!({"spec": {"suspend": suspend}});
    Ok(jobs.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?)
}

/// Asks the worker of a workload to checkpoint and stop; true once it has stopped (its
/// session closed), there is no worker connected, or the grace period is over.
pub async fn stop_worker(ctx: &Context, key: &WorkloadKey) -> bool {
    let connected = ctx.gateway.observe(&key.uid).is_some_and(|o| o.connected);
    if !connected {
        return true;
    }
    let asked = crate::lock(&ctx.stop_requests).get(&key.uid).copied();
    match asked {
        None => {
            let sent =
                ctx.gateway.command(&key.uid, v1::gateway_command::Command::Checkpoint(v1::Checkpoint { stop: true }));
            tracing::info!(workload = %key, sent, "asked the worker to checkpoint and stop");
            crate::lock(&ctx.stop_requests).insert(key.uid.clone(), Instant::now());
            !sent
        }
        Some(at) => at.elapsed() >= ctx.config.checkpoint_grace,
    }
}

fn has_finalizer<K: Resource>(obj: &K) -> bool {
    obj.meta().finalizers.iter().flatten().any(|f| f == FINALIZER)
}

async fn add_finalizer<K: BatchKind>(api: &Api<K>, obj: &K) -> Result<()> {
    let mut finalizers = obj.meta().finalizers.clone().unwrap_or_default();
    finalizers.push(FINALIZER.to_string());
    let patch =
        serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.meta().resource_version}});
    api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

async fn remove_finalizer<K: BatchKind>(api: &Api<K>, obj: &K) -> Result<()> {
    let finalizers: Vec<String> =
        obj.meta().finalizers.iter().flatten().filter(|f| f.as_str() != FINALIZER).cloned().collect();
    let patch =
        serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.meta().resource_version}});
    match api.patch(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The pinned inputs of the object `uid`: none yet, the verified ones, or why the Secret
/// there is refused.
async fn read_pinned(
    secrets: &Api<Secret>,
    name: &str,
    seal_key: &[u8],
    uid: &str,
) -> Result<std::result::Result<Option<Pinned>, crate::seal::Refused>> {
    let Some(secret) = secrets.get_opt(name).await? else { return Ok(Ok(None)) };
    if let Err(refused) = crate::seal::verify(seal_key, uid, &secret) {
        return Ok(Err(refused));
    }
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let (Some(token), Some(assignment)) = (text(TOKEN_KEY), text("assignment.json")) else { return Ok(Ok(None)) };
    Ok(Ok(Some(Pinned {
        token,
        assignment: serde_json::from_str(&assignment)?,
        lineage: text("lineage.json").map(|t| serde_json::from_str(&t)).transpose()?,
        secret_files: text("secret-files.json").map(|t| serde_json::from_str(&t)).transpose()?.unwrap_or_default(),
    })))
}

async fn create_pinned<K: BatchKind>(
    secrets: &Api<Secret>,
    obj: &K,
    key: &WorkloadKey,
    name: &str,
    pinned: Pinned,
    seal_key: &[u8],
) -> Result<Pinned> {
    let mut data = std::collections::BTreeMap::new();
    data.insert(TOKEN_KEY.to_string(), ByteString(pinned.token.clone().into_bytes()));
    data.insert("assignment.json".into(), ByteString(serde_json::to_vec(&pinned.assignment)?));
    if let Some(l) = &pinned.lineage {
        data.insert("lineage.json".into(), ByteString(serde_json::to_vec(l)?));
    }
    data.insert("secret-files.json".into(), ByteString(serde_json::to_vec(&pinned.secret_files)?));
    let seal = crate::seal::seal(seal_key, &key.uid, &data);
    data.insert(crate::seal::SEAL_KEY.into(), ByteString(seal.into_bytes()));
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(key.namespace.clone()),
            labels: Some(key.labels()),
            owner_references: Some(vec![owner_reference(obj)?]),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match secrets.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &secret).await
    {
        Ok(_) => {
            tracing::info!(workload = %key, secret = name, "token secret created; inputs pinned");
            Ok(pinned)
        }
        // Another reconcile (or an operator before a restart) created it first: use its.
        Err(kube::Error::Api(s)) if s.code == 409 => read_pinned(secrets, name, seal_key, &key.uid)
            .await?
            .ok()
            .flatten()
            .ok_or(Error::MissingMetadata("a sealed token Secret of this object")),
        Err(e) => Err(e.into()),
    }
}

/// Writes a status by server-side apply when it changed in more than timestamps.
pub async fn write_status<K, S>(ctx: &Context, api: &Api<K>, key: &WorkloadKey, old: &S, new: &S) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    if !conditions::changed(Some(old), new) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": new,
    });
    api.patch_status(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.metrics.status_writes.get_or_create(&crate::metrics::KindLabel { kind: key.kind.clone() }).inc();
    Ok(true)
}
