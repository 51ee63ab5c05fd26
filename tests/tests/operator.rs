//! The operator against the real control plane: each test runs its own operator
//! in-process, watching only the test's namespace, with its gateway on a free port of
//! 127.0.0.1. Most tests play the worker over real gRPC with the token from the Secret
//! the operator created, to drive exact event sequences; the others start a real
//! `llmops-worker agent` with the pod's env, as a kubelet would.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, Resource, ResourceExt};
use llmops_crds::{Dataset, EvalRun, FineTuneJob, PromptVersion};
use llmops_operator::{Config, StoreConfig};
use llmops_proto::v1::{self, FetchRequest, WorkerEvent, gateway_command::Command, worker_event::Event};
use llmops_tests::s3::S3Server;
use llmops_tests::{Operator, apply, condition, eventually, example, namespace_with_crds};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn workload<K: Resource<DynamicType = ()>>(obj: &K) -> v1::Workload {
    v1::Workload {
        namespace: obj.meta().namespace.clone().unwrap_or_default(),
        kind: K::kind(&()).into_owned(),
        name: obj.meta().name.clone().unwrap_or_default(),
        uid: obj.meta().uid.clone().unwrap_or_default(),
    }
}

/// The health Flux and cli-utils compute from an object (kstatus): Current, InProgress,
/// Failed.
fn health<K: serde::Serialize>(obj: &K) -> Result<String> {
    Ok(llmops_tests::kstatus(&serde_json::to_value(obj)?)?.0)
}

async fn read_token(client: &Client, ns: &str, secret: &str) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = eventually(&format!("secret {secret}"), WAIT, || async { Ok(secrets.get_opt(secret).await?) }).await?;
    let bytes = s.data.unwrap_or_default().get("token").cloned().context("secret without token")?;
    Ok(String::from_utf8(bytes.0)?)
}

async fn pod_of(client: &Client, ns: &str, uid: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually("the worker pod", WAIT, || async {
        Ok(pods.list(&ListParams::default().labels(&format!("llmops.dev/uid={uid}"))).await?.items.into_iter().next())
    })
    .await
}

fn bearer<T>(body: T, token: &str) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(r)
}

/// Plays a worker: sends `events` in one session and waits for each acknowledgement.
async fn report(
    op: &Operator,
    token: &str,
    w: &v1::Workload,
    pod: &str,
    first_seq: u64,
    events: Vec<Event>,
) -> Result<()> {
    let mut client = op.client().await?;
    let messages: Vec<WorkerEvent> = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| WorkerEvent {
            workload: Some(w.clone()),
            pod: pod.into(),
            seq: first_seq + i as u64,
            time: None,
            event: Some(e),
        })
        .collect();
    let last = messages.last().map(|m| m.seq).unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in messages {
        tx.send(m).await?;
    }
    let mut commands =
        client.session(bearer(tokio_stream::wrappers::ReceiverStream::new(rx), token)?).await?.into_inner();
    loop {
        match commands.message().await?.and_then(|c| c.command) {
            Some(Command::Ack(a)) if a.seq >= last => return Ok(()),
            Some(_) => {}
            None => bail!("the session ended before seq {last} was acknowledged"),
        }
    }
}

fn dataset_result(w: &v1::Workload) -> Event {
    let manifest = serde_json::json!({
        "sha256": "d".repeat(64),
        "counts": {"read": 10, "invalid": 0, "written": 10, "splits": {"train": 8, "validation": 1, "test": 1}},
        "drops": [{"index": 0, "transform": "normalize", "dropped": 0}, {"index": 1, "transform": "exactDedup", "dropped": 0}],
    });
    Event::Result(v1::Result {
        artifact: Some(v1::Artifact {
            uri: format!("store://{}/dataset/{}/{}/output/", w.namespace, w.name, w.uid),
            sha256: "e".repeat(64),
        }),
        metrics: Default::default(),
        manifest_json: manifest.to_string(),
        passed: None,
    })
}

/// Applies the example Dataset and plays its worker to a result.
async fn ready_dataset(client: &Client, ns: &str, op: &Operator) -> Result<Dataset> {
    apply(client, ns, &example("dataset.yaml")?).await?;
    let api: Api<Dataset> = Api::namespaced(client.clone(), ns);
    let ds = api.get("acme-facts").await?;
    let uid = ds.uid().context("uid")?;
    let token = read_token(client, ns, "acme-facts-prepare-token").await?;
    let pod = pod_of(client, ns, &uid).await?;
    report(op, &token, &workload(&ds), &pod.name_any(), 1, vec![dataset_result(&workload(&ds))]).await?;
    Ok(api.get("acme-facts").await?)
}

#[tokio::test]
async fn dataset_becomes_a_job_and_its_result_comes_from_the_gateway() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-dataset").await?;
    let op = Operator::start(&client, &ns.name).await?;
    apply(&client, &ns.name, &example("dataset.yaml")?).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let ds = datasets.get("acme-facts").await?;
    let uid = ds.uid().context("uid")?;

    // The owned Job, its pod spec and the token Secret.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let job = eventually("the Job", WAIT, || async { Ok(jobs.get_opt("acme-facts-prepare").await?) }).await?;
    let owner = job.owner_references().first().cloned().context("owner reference")?;
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("Dataset", uid.as_str(), Some(true)));
    let spec = job.spec.clone().context("job spec")?;
    assert_eq!(spec.backoff_limit, Some(3));
    let pod_spec = spec.template.spec.context("pod spec")?;
    let c = &pod_spec.containers[0];
    assert_eq!(c.command.clone().unwrap_or_default(), ["llmops-worker", "agent"]);
    let env: BTreeMap<String, Option<String>> =
        c.env.clone().unwrap_or_default().into_iter().map(|e| (e.name, e.value)).collect();
    assert_eq!(env["LLMOPS_GATEWAY"].as_deref(), Some(op.addr.as_str()));
    assert_eq!(env["LLMOPS_WORKLOAD"].clone(), Some(format!("{}/Dataset/acme-facts/{uid}", ns.name)));
    assert_eq!(env["LLMOPS_TOKEN_FILE"].as_deref(), Some("/var/run/secrets/llmops/token"));
    assert_eq!(env["NVIDIA_VISIBLE_DEVICES"].as_deref(), Some("void"));
    assert!(env.contains_key("LLMOPS_POD"));
    let limits = c.resources.clone().and_then(|r| r.limits).unwrap_or_default();
    assert_eq!(limits.get("cpu").map(|q| q.0.as_str()), Some("1"));
    assert!(!limits.contains_key("nvidia.com/gpu"));
    let token = read_token(&client, &ns.name, "acme-facts-prepare-token").await?;
    let secret: Secret = Api::namespaced(client.clone(), &ns.name).get("acme-facts-prepare-token").await?;
    assert_eq!(secret.owner_references().first().map(|o| o.uid.clone()), Some(uid.clone()));

    let pod = pod_of(&client, &ns.name, &uid).await?;
    eventually("the Running condition", WAIT, || async {
        let ds = datasets.get("acme-facts").await?;
        let conds = ds.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Ready").filter(|c| c.reason == "Running").map(|_| ()))
    })
    .await?;
    assert_eq!(health(&datasets.get("acme-facts").await?)?, "InProgress", "a running job is in progress");

    // The worker's side: fetch the Assignment, report progress and the result.
    let mut gw = op.client().await?;
    let fetched = gw
        .fetch(bearer(
            FetchRequest { workload: Some(workload(&ds)), pod: pod.name_any(), worker_version: "test".into() },
            &token,
        )?)
        .await?
        .into_inner();
    let Some(v1::assignment::Mode::Prepare(prepare)) = fetched.assignment.and_then(|a| a.mode) else {
        bail!("no prepare assignment")
    };
    assert_eq!(prepare.output.map(|o| o.uri), Some(format!("store://{}/dataset/acme-facts/{uid}/output/", ns.name)));
    let progress = Event::Progress(v1::Progress {
        step: 4,
        total_steps: 10,
        metrics: [("records".to_string(), 4.0)].into(),
        message: "reading".into(),
        ..Default::default()
    });
    report(&op, &token, &workload(&ds), &pod.name_any(), 1, vec![progress]).await?;
    eventually("progress in the condition", WAIT, || async {
        let ds = datasets.get("acme-facts").await?;
        let conds = ds.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Ready").filter(|c| c.message.contains("step 4/10")).map(|_| ()))
    })
    .await?;
    report(&op, &token, &workload(&ds), &pod.name_any(), 2, vec![dataset_result(&workload(&ds))]).await?;
    let ds = datasets.get("acme-facts").await?;
    let status = ds.status.clone().context("status")?;
    assert_eq!(status.artifact.map(|a| a.sha256), Some("e".repeat(64)), "the result is in status once acknowledged");
    assert!(condition(&status.common.conditions, "Ready").is_some_and(|c| c.status == "True"));
    assert!(condition(&status.common.conditions, "Succeeded").is_some_and(|c| c.status == "True"));
    assert_eq!(status.records.map(|r| r.output), Some(10));
    assert_eq!(status.splits.map(|s| s.train), Some(8));
    assert_eq!(status.common.observed_generation, ds.metadata.generation);
    assert_eq!(health(&ds)?, "Current", "a succeeded job is current");

    // Delete: the Job and the Secret go with the Dataset (garbage collection).
    datasets.delete("acme-facts", &DeleteParams::foreground()).await?;
    eventually("the Job and Secret to be collected", WAIT, || async {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
        let gone = jobs.get_opt("acme-facts-prepare").await?.is_none()
            && secrets.get_opt("acme-facts-prepare-token").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn pinned_state_edited_or_planted_by_a_tenant_is_refused() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-tamper").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let refused = |name: &'static str| {
        let datasets = datasets.clone();
        async move {
            eventually("the pinned state to be refused", WAIT, || async {
                let conds = datasets.get(name).await?.status.map(|s| s.common.conditions).unwrap_or_default();
                let stalled = condition(&conds, "Stalled").is_some_and(|c| c.status == "True");
                Ok(condition(&conds, "Ready").filter(|c| stalled && c.reason == "PinnedStateRefused").cloned())
            })
            .await
        }
    };

    // Edited: the Assignment in the pinned Secret of a started Dataset is changed.
    apply(&client, &ns.name, &example("dataset.yaml")?).await?;
    let secret =
        eventually("the pinned Secret", WAIT, || async { Ok(secrets.get_opt("acme-facts-prepare-token").await?) })
            .await?;
    let data = secret.data.clone().unwrap_or_default();
    assert!(data.contains_key("seal"), "the operator seals what it pins");
    let mut assignment: Value = serde_json::from_slice(&data["assignment.json"].0)?;
    assignment["prepare"]["source"] = serde_json::json!({"uri": "store://other-tenant/dataset/x/output/train.jsonl"});
    let patch = serde_json::json!({"stringData": {"assignment.json": assignment.to_string()}});
    secrets
        .patch("acme-facts-prepare-token", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await?;
    let touch = serde_json::json!({"metadata": {"annotations": {"touched": "1"}}});
    datasets.patch("acme-facts", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&touch)).await?;
    let ready = refused("acme-facts").await?;
    assert!(ready.message.contains("changed outside the operator"), "{}", ready.message);

    // Planted: a Secret of the pinned Secret's name made before the object exists.
    let planted: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "planted-prepare-token"},
        "stringData": {"token": "mine", "assignment.json": "{}", "seal": "00"},
    }))?;
    secrets.create(&Default::default(), &planted).await?;
    let mut ds = example("dataset.yaml")?;
    ds["metadata"]["name"] = serde_json::json!("planted");
    apply(&client, &ns.name, &ds).await?;
    let ready = refused("planted").await?;
    assert!(ready.message.contains("not controlled by this object"), "{}", ready.message);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    assert!(jobs.get_opt("planted-prepare").await?.is_none(), "no Job runs planted inputs");
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn wrong_and_foreign_tokens_are_refused() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-tokens").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let mut second = example("dataset.yaml")?;
    second["metadata"]["name"] = "other".into();
    apply(&client, &ns.name, &example("dataset.yaml")?).await?;
    apply(&client, &ns.name, &second).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let ds = datasets.get("acme-facts").await?;
    let own = read_token(&client, &ns.name, "acme-facts-prepare-token").await?;
    let foreign = read_token(&client, &ns.name, "other-prepare-token").await?;
    let request = || FetchRequest { workload: Some(workload(&ds)), pod: "p".into(), worker_version: "test".into() };
    let mut gw = op.client().await?;
    eventually("the assignment", WAIT, || async {
        Ok(op.client().await?.fetch(bearer(request(), &own)?).await.ok().map(|_| ()))
    })
    .await?;
    let wrong = gw.fetch(bearer(request(), "0123456789abcdef")?).await.expect_err("a wrong token is refused");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    let foreign = gw.fetch(bearer(request(), &foreign)?).await.expect_err("a foreign token is refused");
    assert_eq!(foreign.code(), tonic::Code::PermissionDenied);
    let missing = gw.fetch(tonic::Request::new(request())).await.expect_err("no token is refused");
    assert_eq!(missing.code(), tonic::Code::Unauthenticated);
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_failing_worker_shows_its_reason() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-failure").await?;
    let op = Operator::start(&client, &ns.name).await?;
    apply(&client, &ns.name, &example("dataset.yaml")?).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let ds = datasets.get("acme-facts").await?;
    let token = read_token(&client, &ns.name, "acme-facts-prepare-token").await?;
    let pod = pod_of(&client, &ns.name, &ds.uid().context("uid")?).await?;
    let failure = Event::Failure(v1::Failure {
        reason: "NoRecords".into(),
        message: "none of the 10 rows could be read as completion records".into(),
        retryable: false,
    });
    report(&op, &token, &workload(&ds), &pod.name_any(), 1, vec![failure]).await?;
    let status = datasets.get("acme-facts").await?.status.context("status")?;
    let failed = condition(&status.common.conditions, "Failed").context("Failed condition")?;
    assert_eq!((failed.status.as_str(), failed.reason.as_str()), ("True", "NoRecords"));
    assert!(failed.message.contains("could be read as completion records"), "{}", failed.message);
    assert_eq!(status.common.phase.as_deref(), Some("Failed"));
    let stalled = condition(&status.common.conditions, "Stalled").context("Stalled condition")?;
    assert_eq!((stalled.status.as_str(), stalled.reason.as_str()), ("True", "NoRecords"));
    assert_eq!(health(&datasets.get("acme-facts").await?)?, "Failed", "a failed Dataset reads as Failed");
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn finetune_waits_for_its_dataset_then_runs_on_a_gpu_node() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-finetune").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let store = TestStore::Local(store_of(&op.config)?);
    stand_in_model(&store, &ns.name).await?;
    let _resolvers = run_resolvers(&client, &ns.name, &store);
    let mut ftj = example("finetunejob.yaml")?;
    ftj["spec"]["resources"] = serde_json::json!({"gpus": 1, "cpu": "2", "memory": "6Gi"});
    apply(&client, &ns.name, &ftj).await?;
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns.name);
    eventually("the job to wait for its Dataset", WAIT, || async {
        let conds = tunes.get("acme-facts-lora").await?.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Ready").filter(|c| c.reason == "DatasetNotFound").map(|_| ()))
    })
    .await?;
    assert_eq!(health(&tunes.get("acme-facts-lora").await?)?, "InProgress", "waiting for an input is in progress");
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    assert!(jobs.get_opt("acme-facts-lora-finetune").await?.is_none(), "no Job before the Dataset is Ready");

    let ds = ready_dataset(&client, &ns.name, &op).await?;
    let job =
        eventually("the FineTuneJob's Job", WAIT, || async { Ok(jobs.get_opt("acme-facts-lora-finetune").await?) })
            .await?;
    let container = job.spec.and_then(|s| s.template.spec).map(|p| p.containers[0].clone()).context("container")?;
    let limits = container.resources.and_then(|r| r.limits).unwrap_or_default();
    assert_eq!(limits.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("1"));
    let tune = tunes.get("acme-facts-lora").await?;
    let pod = pod_of(&client, &ns.name, &tune.uid().context("uid")?).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let node = eventually("the pod to be scheduled", WAIT, || async {
        Ok(pods.get(&pod.name_any()).await?.spec.and_then(|s| s.node_name))
    })
    .await?;
    assert!(node.starts_with("gpu-node-"), "scheduled onto {node}");

    // The pinned Dataset digest is in the Assignment and the lineage.
    let token = read_token(&client, &ns.name, "acme-facts-lora-finetune-token").await?;
    let fetched = op
        .client()
        .await?
        .fetch(bearer(
            FetchRequest { workload: Some(workload(&tune)), pod: pod.name_any(), worker_version: "t".into() },
            &token,
        )?)
        .await?
        .into_inner();
    let Some(v1::assignment::Mode::Finetune(f)) = fetched.assignment.and_then(|a| a.mode) else {
        bail!("no finetune assignment")
    };
    let ds_uri = ds.status.and_then(|s| s.artifact).map(|a| a.uri).context("dataset artifact")?;
    assert_eq!(f.train.map(|t| t.uri), Some(format!("{ds_uri}train.parquet")));
    assert!(f.checkpoints.is_some_and(|c| c.resume));
    let progress = Event::Progress(v1::Progress {
        step: 40,
        total_steps: 120,
        epoch: 2.0,
        metrics: [("loss".to_string(), 1.25), ("tokens_per_second".to_string(), 900.0)].into(),
        eta_seconds: 90.0,
        ..Default::default()
    });
    report(&op, &token, &workload(&tune), &pod.name_any(), 1, vec![progress]).await?;
    let status = eventually("training figures in status", WAIT, || async {
        let s = tunes.get("acme-facts-lora").await?.status.unwrap_or_default();
        Ok((s.progress.as_deref() == Some("40/120")).then_some(s))
    })
    .await?;
    assert_eq!(status.loss, Some(1.25));
    assert_eq!(status.eta.as_deref(), Some("1m30s"));
    let lineage = status.lineage.context("lineage")?;
    assert!(lineage.inputs.iter().any(|i| i.kind == "Dataset" && i.sha256 == "e".repeat(64)));

    // Deletion goes through the finalizer; the owned objects are collected.
    tunes.delete("acme-facts-lora", &DeleteParams::background()).await?;
    eventually("the FineTuneJob and its Job to go", WAIT, || async {
        let gone = tunes.get_opt("acme-facts-lora").await?.is_none()
            && jobs.get_opt("acme-facts-lora-finetune").await?.is_none();
        Ok(gone.then_some(()))
    })
    .await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_unschedulable_finetune_shows_the_schedulers_message() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-unschedulable").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let store = TestStore::Local(store_of(&op.config)?);
    stand_in_model(&store, &ns.name).await?;
    let _resolvers = run_resolvers(&client, &ns.name, &store);
    ready_dataset(&client, &ns.name, &op).await?;
    // gpus is at most 1 (CEL), so ask for a GPU model no node has.
    let mut ftj = example("finetunejob.yaml")?;
    ftj["spec"]["resources"] =
        serde_json::json!({"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-B200"}});
    apply(&client, &ns.name, &ftj).await?;
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns.name);
    let ready = eventually("the Unschedulable condition", WAIT, || async {
        let conds = tunes.get("acme-facts-lora").await?.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Ready").filter(|c| c.reason == "Unschedulable").cloned())
    })
    .await?;
    assert!(ready.message.contains("node affinity/selector"), "{}", ready.message);
    delete_finetunes(&client, &ns.name).await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_operator_restart_mid_job_continues_without_duplicates() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-restart").await?;
    let op = Operator::start(&client, &ns.name).await?;
    apply(&client, &ns.name, &example("dataset.yaml")?).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let ds = datasets.get("acme-facts").await?;
    let uid = ds.uid().context("uid")?;
    let token_before = read_token(&client, &ns.name, "acme-facts-prepare-token").await?;
    let pod = pod_of(&client, &ns.name, &uid).await?;
    let progress = Event::Progress(v1::Progress { step: 1, total_steps: 4, ..Default::default() });
    report(&op, &token_before, &workload(&ds), &pod.name_any(), 1, vec![progress]).await?;

    let config = op.stop().await;
    let op = Operator::start_with(&client, config).await?;
    let token_after = read_token(&client, &ns.name, "acme-facts-prepare-token").await?;
    assert_eq!(token_before, token_after, "the token survives a restart");
    let progress = Event::Progress(v1::Progress { step: 3, total_steps: 4, ..Default::default() });
    eventually("the restarted gateway to know the workload", WAIT, || async {
        Ok(report(&op, &token_after, &workload(&ds), &pod.name_any(), 2, vec![progress.clone()]).await.ok())
    })
    .await?;
    eventually("progress after the restart", WAIT, || async {
        let conds = datasets.get("acme-facts").await?.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Ready").filter(|c| c.message.contains("step 3/4")).map(|_| ()))
    })
    .await?;
    report(&op, &token_after, &workload(&ds), &pod.name_any(), 3, vec![dataset_result(&workload(&ds))]).await?;
    let status = datasets.get("acme-facts").await?.status.context("status")?;
    assert!(condition(&status.common.conditions, "Succeeded").is_some_and(|c| c.status == "True"));

    let selector = ListParams::default().labels(&format!("llmops.dev/uid={uid}"));
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(jobs.list(&selector).await?.items.len(), 1, "one Job");
    assert_eq!(secrets.list(&selector).await?.items.len(), 1, "one token Secret");
    assert_eq!(pods.list(&selector).await?.items.len(), 1, "one pod");
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_pipeline_applied_in_reverse_order_converges() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-pipeline").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let store = TestStore::Local(store_of(&op.config)?);
    stand_in_model(&store, &ns.name).await?;
    let _resolvers = run_resolvers(&client, &ns.name, &store);
    for file in ["evalrun.yaml", "finetunejob.yaml", "promptversion.yaml"] {
        apply(&client, &ns.name, &example(file)?).await?;
    }
    let evals: Api<EvalRun> = Api::namespaced(client.clone(), &ns.name);
    eventually("the EvalRun to wait", WAIT, || async {
        let conds = evals.get("acme-facts-lora-eval").await?.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Ready")
            .filter(|c| c.reason.starts_with("WaitingFor") || c.reason.ends_with("NotFound"))
            .map(|_| ()))
    })
    .await?;
    let prompts: Api<PromptVersion> = Api::namespaced(client.clone(), &ns.name);
    let pv = eventually("the PromptVersion to be Ready", WAIT, || async {
        let p = prompts.get("acme-support-v1").await?;
        let ready = p
            .status
            .as_ref()
            .is_some_and(|s| condition(&s.common.conditions, "Ready").is_some_and(|c| c.status == "True"));
        Ok(ready.then_some(p))
    })
    .await?;
    let digest = pv.status.and_then(|s| s.digest).context("digest")?;

    ready_dataset(&client, &ns.name, &op).await?;
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns.name);
    let tune = tunes.get("acme-facts-lora").await?;
    let token = read_token(&client, &ns.name, "acme-facts-lora-finetune-token").await?;
    let pod = pod_of(&client, &ns.name, &tune.uid().context("uid")?).await?;
    let w = workload(&tune);
    let result = Event::Result(v1::Result {
        artifact: Some(v1::Artifact {
            uri: format!("store://{}/finetunejob/{}/{}/output/", w.namespace, w.name, w.uid),
            sha256: "f".repeat(64),
        }),
        metrics: [("loss".to_string(), 0.5)].into(),
        manifest_json: "{}".into(),
        passed: None,
    });
    report(&op, &token, &w, &pod.name_any(), 1, vec![result]).await?;

    // The EvalRun now runs with the adapter, the dataset split and the prompt resolved.
    let run = evals.get("acme-facts-lora-eval").await?;
    let token = read_token(&client, &ns.name, "acme-facts-lora-eval-eval-token").await?;
    let pod = pod_of(&client, &ns.name, &run.uid().context("uid")?).await?;
    let fetched = op
        .client()
        .await?
        .fetch(bearer(
            FetchRequest { workload: Some(workload(&run)), pod: pod.name_any(), worker_version: "t".into() },
            &token,
        )?)
        .await?
        .into_inner();
    let Some(v1::assignment::Mode::Eval(e)) = fetched.assignment.and_then(|a| a.mode) else {
        bail!("no eval assignment")
    };
    assert_eq!(e.prompt.map(|p| p.sha256), Some(digest));
    let Some(v1::eval_target::Target::Local(local)) = e.target.and_then(|t| t.target) else { bail!("no local target") };
    assert_eq!(local.adapter.map(|a| a.sha256), Some("f".repeat(64)));
    let results = serde_json::json!({
        "passed": true, "samples": 8, "errors": 0,
        "metrics": [{"metric": "rougeL", "value": 0.62}],
        "thresholds": [{"metric": "rougeL", "value": 0.62, "passed": true}],
    });
    let w = workload(&run);
    let result = Event::Result(v1::Result {
        artifact: Some(v1::Artifact {
            uri: format!("store://{}/evalrun/{}/{}/output/", w.namespace, w.name, w.uid),
            sha256: "a".repeat(64),
        }),
        metrics: [("rougeL".to_string(), 0.62)].into(),
        manifest_json: results.to_string(),
        passed: Some(true),
    });
    report(&op, &token, &w, &pod.name_any(), 1, vec![result]).await?;
    let status = evals.get("acme-facts-lora-eval").await?.status.context("status")?;
    let passed = condition(&status.common.conditions, "Passed").context("Passed")?;
    assert_eq!(passed.status, "True");
    assert_eq!(status.metrics.first().map(|m| m.value), Some(0.62));
    assert_eq!(health(&evals.get("acme-facts-lora-eval").await?)?, "Current");
    delete_finetunes(&client, &ns.name).await?;
    op.stop().await;
    Ok(())
}

/// A real `llmops-worker agent` process with the env of a worker pod, started the way a
/// kubelet would start the pod's container: env values from the pod spec, the pod name
/// from the downward API, the token file from the Secret volume.
struct Agent {
    child: std::process::Child,
    log: PathBuf,
}

impl Agent {
    /// `extra`: environment a pod would get from Secrets.
    async fn start_with_env(
        client: &Client,
        ns: &str,
        pod: &Pod,
        secret: &str,
        extra: &[(&str, &str)],
    ) -> Result<Self> {
        let token = read_token(client, ns, secret).await?;
        let dir = std::env::temp_dir().join(format!("llmops-agent-{ns}-{}", pod.name_any()));
        std::fs::create_dir_all(&dir)?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, token)?;
        let container = pod.spec.as_ref().map(|s| s.containers[0].clone()).context("pod without container")?;
        let mut command = std::process::Command::new(llmops_tests::worker_binary()?);
        command.arg("agent").env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for e in container.env.unwrap_or_default() {
            if let Some(value) = e.value {
                command.env(&e.name, value);
            }
        }
        command.envs(extra.iter().copied());
        let log = dir.join("agent.log");
        command
            .env("LLMOPS_POD", pod.name_any())
            .env("LLMOPS_TOKEN_FILE", &token_file)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        Ok(Self { child: command.spawn()?, log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet sends when the pod is deleted.
    fn terminate(&self) -> Result<()> {
        let status = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        Ok(())
    }

    async fn exited(&mut self) -> Result<std::process::ExitStatus> {
        let log = self.log.clone();
        let child = &mut self.child;
        eventually("the agent to exit", Duration::from_secs(120), || {
            let polled = child.try_wait();
            let log = log.clone();
            async move {
                polled.map_err(anyhow::Error::from).with_context(|| std::fs::read_to_string(log).unwrap_or_default())
            }
        })
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs each model resolver pod of the test's namespace with a real agent, as a node
/// would (the resolver pods wait for a development node that these tests do not start).
/// Stops them when dropped.
struct Resolvers(tokio::task::JoinHandle<()>);

impl Drop for Resolvers {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn run_resolvers(client: &Client, ns: &str, store: &TestStore) -> Resolvers {
    let (client, ns, store) = (client.clone(), ns.to_string(), store.clone());
    Resolvers(tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let mut agents: Vec<Agent> = Vec::new();
        let mut started = std::collections::BTreeSet::new();
        loop {
            let listed = pods.list(&ListParams::default().labels("llmops.dev/kind=ModelResolution")).await;
            for pod in listed.map(|l| l.items).unwrap_or_default() {
                let Some(record) = pod.labels().get("llmops.dev/name").cloned() else { continue };
                if started.contains(&pod.name_any()) {
                    continue;
                }
                let env = store.env(&pod.name_any());
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                if let Ok(agent) = Agent::start_with_env(&client, &ns, &pod, &format!("{record}-token"), &env).await {
                    started.insert(pod.name_any());
                    agents.push(agent);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }))
}

/// Puts stand-in bytes where the examples' base model is expected: the tests that play
/// the worker never load it, but the resolver copies and digests what is there.
async fn stand_in_model(store: &TestStore, ns: &str) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("llmops-stand-in-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"), b"stand-in weights; never loaded")?;
    // Where `store://imports/…` of a spec in `ns` lies: the namespace's part of the store.
    store.put_dir(&dir, &format!("{ns}/imports")).await
}

async fn scrape(addr: &std::net::SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

fn store_of(config: &Config) -> Result<PathBuf> {
    match &config.store {
        StoreConfig::Local { mount_path, .. } => Ok(mount_path.clone()),
        StoreConfig::S3 { .. } => bail!("the test store is local"),
    }
}

/// Runs the Dataset's worker pod with a real agent to its end.
async fn prepare_with_agent(client: &Client, ns: &str, store: &TestStore) -> Result<(Dataset, Agent)> {
    apply(client, ns, &example("dataset.yaml")?).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), ns);
    let uid = datasets.get("acme-facts").await?.uid().context("uid")?;
    let pod = pod_of(client, ns, &uid).await?;
    let env = store.env(&pod.name_any());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut agent = Agent::start_with_env(client, ns, &pod, "acme-facts-prepare-token", &env).await?;
    let exit = agent.exited().await?;
    if !exit.success() {
        bail!("the agent exited with {exit}:\n{}", agent.log_text());
    }
    Ok((datasets.get("acme-facts").await?, agent))
}

#[tokio::test]
async fn a_real_agent_prepares_the_dataset_and_its_digest_reaches_the_status() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-agent").await?;
    let metrics: std::net::SocketAddr =
        format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()).parse()?;
    // The gateway speaks TLS with a certificate the operator generates; the pod is told
    // the CA and the agent verifies the gateway with it.
    let op = Operator::start_configured(&client, &ns.name, |c| {
        c.metrics_listen = Some(metrics);
        c.gateway_tls = llmops_operator::GatewayTls::Generate;
    })
    .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let tls = secrets.get("llmops-gateway-tls").await.context("the generated certificate is kept")?;
    let ca = String::from_utf8(tls.data.clone().unwrap_or_default().get("ca.crt").context("ca.crt")?.0.clone())?;
    // A plaintext client gets nowhere.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", op.config.gateway_address))?
        .connect()
        .await
        .map(llmops_proto::v1::worker_gateway_client::WorkerGatewayClient::new);
    if let Ok(mut c) = plain {
        let fetch = FetchRequest { workload: None, pod: "p".into(), worker_version: "t".into() };
        assert!(c.fetch(fetch).await.is_err(), "plaintext h2c is not served");
    }
    let (ds, agent) = prepare_with_agent(&client, &ns.name, &TestStore::Local(store_of(&op.config)?)).await?;
    let pod = pod_of(&client, &ns.name, &ds.uid().context("uid")?).await?;
    let env = pod.spec.context("spec")?.containers[0].env.clone().unwrap_or_default();
    assert_eq!(
        env.iter().find(|e| e.name == "LLMOPS_GATEWAY_CA").and_then(|e| e.value.clone()),
        Some(ca.clone()),
        "the pod trusts the CA of the gateway's certificate"
    );
    let status = ds.status.clone().context("status")?;
    assert!(
        condition(&status.common.conditions, "Succeeded").is_some_and(|c| c.status == "True"),
        "{:?}\n{}",
        status.common.conditions,
        agent.log_text()
    );
    let uid = ds.uid().context("uid")?;
    let out = store_of(&op.config)?.join(&ns.name).join("dataset/acme-facts").join(&uid).join("output");
    let manifest_sha = llmops_worker::store::file_sha256(&out.join("manifest.json"))?;
    let artifact = status.artifact.context("artifact")?;
    assert_eq!(artifact.sha256, manifest_sha, "the status pins the manifest the worker wrote");
    assert_eq!(artifact.uri, format!("store://{}/dataset/acme-facts/{uid}/output/", ns.name));
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    assert_eq!(status.records.map(|r| r.input), manifest["counts"]["read"].as_i64());
    assert!(out.join("train.parquet").is_file());
    // The agent's progress went through the gateway.
    let text = scrape(&metrics).await?;
    let progress = text
        .lines()
        .find(|l| l.contains("gateway_events_total") && l.contains("event=\"progress\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(progress >= 1.0, "no progress event was recorded:\n{text}");
    // The workload finished and its pod is gone: its token expired with it. (A client
    // that trusts the CA and dials the name the certificate carries gets that far.)
    let token = read_token(&client, &ns.name, "acme-facts-prepare-token").await?;
    let port = op.config.gateway_address.rsplit(':').next().context("port")?.to_string();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(tls)?
        .connect()
        .await?;
    let verified = llmops_proto::v1::worker_gateway_client::WorkerGatewayClient::new(channel);
    let w = llmops_proto::v1::Workload {
        namespace: ns.name.clone(),
        kind: "Dataset".into(),
        name: "acme-facts".into(),
        uid: ds.uid().context("uid")?,
    };
    let refused = eventually("the finished workload's token to expire", WAIT, || {
        let mut verified = verified.clone();
        let request = FetchRequest { workload: Some(w.clone()), pod: "p".into(), worker_version: "t".into() };
        let token = token.clone();
        async move { Ok(verified.fetch(bearer(request, &token)?).await.err()) }
    })
    .await?;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    op.stop().await;
    Ok(())
}

/// Where a test's store is, as the test sees it.
#[derive(Clone)]
enum TestStore {
    /// A directory (the pods' hostPath).
    Local(PathBuf),
    /// A bucket of the S3 server, with the operator's prefix, and the agents' scratch.
    S3 { bucket: object_store::aws::AmazonS3, prefix: String, scratch: PathBuf },
}

impl TestStore {
    /// Copies a local directory to the store key.
    async fn put_dir(&self, dir: &std::path::Path, key: &str) -> Result<()> {
        use object_store::ObjectStoreExt;
        match self {
            TestStore::Local(root) => {
                let target = root.join(key);
                std::fs::create_dir_all(&target)?;
                for entry in std::fs::read_dir(dir)? {
                    let entry = entry?;
                    std::fs::copy(entry.path(), target.join(entry.file_name()))?;
                }
            }
            TestStore::S3 { bucket, prefix, .. } => {
                for entry in std::fs::read_dir(dir)? {
                    let entry = entry?;
                    let path = format!("{prefix}/{key}/{}", entry.file_name().to_string_lossy());
                    bucket.put(&path.as_str().into(), std::fs::read(entry.path())?.into()).await?;
                }
            }
        }
        Ok(())
    }

    /// Steps of the sealed checkpoints under a key, oldest first.
    async fn sealed(&self, key: &str) -> Result<Vec<u64>> {
        use futures::StreamExt;
        let names: Vec<String> = match self {
            TestStore::Local(root) => std::fs::read_dir(root.join(key))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().join("COMPLETE.json").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            TestStore::S3 { bucket, prefix, .. } => {
                use object_store::ObjectStore;
                let base = format!("{prefix}/{key}");
                let mut listing = bucket.list(Some(&base.as_str().into()));
                let mut names = Vec::new();
                while let Some(meta) = listing.next().await {
                    let location = meta?.location.to_string();
                    if let Some(rest) = location.strip_prefix(&format!("{base}/"))
                        && let Some(dir) = rest.strip_suffix("/COMPLETE.json")
                    {
                        names.push(dir.to_string());
                    }
                }
                names
            }
        };
        let mut steps: Vec<u64> =
            names.iter().filter_map(|n| n.strip_prefix("step-").and_then(|n| n.parse().ok())).collect();
        steps.sort();
        Ok(steps)
    }

    /// What an agent's pod gets besides the pod spec's values: credentials (from the
    /// Secret named by --s3-credentials-secret) and a scratch directory of its own.
    fn env(&self, pod: &str) -> Vec<(String, String)> {
        match self {
            TestStore::Local(_) => Vec::new(),
            TestStore::S3 { scratch, .. } => vec![
                ("AWS_ACCESS_KEY_ID".into(), "test".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
                ("LLMOPS_SCRATCH".into(), scratch.join(pod).display().to_string()),
            ],
        }
    }
}

#[tokio::test]
async fn suspending_a_finetune_checkpoints_and_the_next_pod_resumes() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-suspend").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let store = TestStore::Local(store_of(&op.config)?);
    suspend_resume_delete(&client, &ns.name, &store).await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn with_an_s3_store_a_suspended_finetune_resumes_from_the_uploaded_checkpoint() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-s3-suspend").await?;
    let s3 = S3Server::start().await?;
    s3.create_bucket("artifacts").await?;
    let op = Operator::start_configured(&client, &ns.name, |c| c.store = s3.store_config("artifacts")).await?;
    let store = TestStore::S3 {
        bucket: s3.bucket("artifacts")?,
        prefix: "llmops".into(),
        scratch: std::env::temp_dir().join(format!("llmops-scratch-{}", ns.name)),
    };
    suspend_resume_delete(&client, &ns.name, &store).await?;
    op.stop().await;
    Ok(())
}

/// A FineTuneJob on the tiny model, run by real agents: suspended mid-run (a checkpoint,
/// then the pod stops), resumed in a new pod from that step, deleted (another checkpoint
/// through the finalizer).
async fn suspend_resume_delete(client: &Client, ns: &str, store: &TestStore) -> Result<()> {
    let client = client.clone();
    prepare_with_agent(&client, ns, store).await?;
    let smol =
        llmops_worker::engine::load(&llmops_tests::test_model()?, &candle_core::Device::Cpu, Default::default())?;
    let tiny = std::env::temp_dir().join(format!("llmops-tiny-{ns}"));
    llmops_worker::engine::tiny::write_tiny_llama(&tiny, &smol, 3)?;
    store.put_dir(&tiny, &format!("{ns}/imports/tiny")).await?;
    let _resolvers = run_resolvers(&client, ns, store);
    let mut ftj = example("finetunejob.yaml")?;
    ftj["spec"]["model"] = serde_json::json!({"uri": "store://imports/tiny/", "format": "hf"});
    ftj["spec"]["dataset"] = serde_json::json!({"name": "acme-facts"});
    ftj["spec"]["hyperparameters"] =
        serde_json::json!({"epochs": 1000, "maxSteps": 600, "batchSize": 2, "learningRate": 0.001, "maxSeqLength": 64});
    ftj["spec"]["checkpoints"] = serde_json::json!({"intervalSteps": 100000});
    apply(&client, ns, &ftj).await?;
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    let uid = eventually("the FineTuneJob", WAIT, || async { Ok(tunes.get_opt("acme-facts-lora").await?) })
        .await?
        .uid()
        .context("uid")?;
    let agent = |pod: Pod| {
        let client = client.clone();
        async move {
            let env = store.env(&pod.name_any());
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Agent::start_with_env(&client, ns, &pod, "acme-facts-lora-finetune-token", &env).await
        }
    };
    let first_pod = pod_of(&client, ns, &uid).await?;
    let mut first = agent(first_pod.clone()).await?;
    eventually("training progress in status", WAIT, || async {
        let s = tunes.get("acme-facts-lora").await?.status.unwrap_or_default();
        let step: u64 =
            s.progress.as_deref().and_then(|p| p.split('/').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok((step >= 3).then_some(()))
    })
    .await
    .with_context(|| first.log_text())?;

    // Suspend: the worker writes a checkpoint and stops; the Job is suspended.
    let patch = serde_json::json!({"spec": {"suspend": true}});
    tunes.patch("acme-facts-lora", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    let checkpoints = format!("{ns}/finetunejob/acme-facts-lora/{uid}/checkpoints");
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    eventually("the Job to be suspended", WAIT, || async {
        let job = jobs.get("acme-facts-lora-finetune").await?;
        Ok(job.spec.and_then(|s| s.suspend).filter(|s| *s).map(|_| ()))
    })
    .await
    .with_context(|| first.log_text())?;
    let stopped_at = *store
        .sealed(&checkpoints)
        .await?
        .last()
        .with_context(|| format!("no checkpoint written:\n{}", first.log_text()))?;
    assert!(stopped_at < 600, "the run stopped early, at step {stopped_at}");
    first.terminate()?;
    assert!(first.exited().await?.success(), "{}", first.log_text());
    let status = tunes.get("acme-facts-lora").await?.status.context("status")?;
    let ready = condition(&status.common.conditions, "Ready").context("Ready")?;
    assert_eq!(ready.reason, "Suspended", "{ready:?}");

    // Resume: a new pod continues from the checkpoint.
    let patch = serde_json::json!({"spec": {"suspend": false}});
    tunes.patch("acme-facts-lora", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let second_pod = eventually("a new worker pod", WAIT, || async {
        let list = pods.list(&ListParams::default().labels(&format!("llmops.dev/uid={uid}"))).await?;
        Ok(list
            .items
            .into_iter()
            .find(|p| p.name_any() != first_pod.name_any() && p.metadata.deletion_timestamp.is_none()))
    })
    .await?;
    let mut second = agent(second_pod).await?;
    eventually("training to continue past the checkpoint", WAIT, || async {
        let s = tunes.get("acme-facts-lora").await?.status.unwrap_or_default();
        let step: u64 =
            s.progress.as_deref().and_then(|p| p.split('/').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok((step > stopped_at).then_some(()))
    })
    .await
    .with_context(|| second.log_text())?;
    let log = second.log_text();
    assert!(log.contains("resuming") && log.contains(&format!("step={stopped_at}")), "{log}");

    // Deletion goes through the finalizer: one more checkpoint, then the object goes.
    tunes.delete("acme-facts-lora", &DeleteParams::background()).await?;
    eventually("the FineTuneJob to go", WAIT, || async {
        Ok(tunes.get_opt("acme-facts-lora").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| second.log_text())?;
    let last = *store.sealed(&checkpoints).await?.last().context("checkpoints")?;
    assert!(last > stopped_at, "deletion wrote a checkpoint after the resumed steps ({last} <= {stopped_at})");
    second.terminate()?;
    second.exited().await?;
    Ok(())
}

#[tokio::test]
async fn with_an_s3_store_the_agent_stages_inputs_and_uploads_the_output() -> Result<()> {
    use object_store::ObjectStoreExt;
    use sha2::Digest;
    let (client, ns) = namespace_with_crds("op-s3").await?;
    let s3 = S3Server::start().await?;
    s3.create_bucket("artifacts").await?;
    let bucket = s3.bucket("artifacts")?;
    let rows: String = (0..12)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"question": format!("What is {i} plus {i}?"), "answer": format!("{}", 2 * i)})
            )
        })
        .collect();
    let rows_sha = hex::encode(sha2::Sha256::digest(rows.as_bytes()));
    bucket.put(&format!("llmops/{}/imports/sums.jsonl", ns.name).as_str().into(), rows.into_bytes().into()).await?;

    let op = Operator::start_configured(&client, &ns.name, |c| c.store = s3.store_config("artifacts")).await?;
    let mut ds = example("dataset.yaml")?;
    ds["spec"]["source"] = serde_json::json!({"uri": "store://imports/sums.jsonl"});
    apply(&client, &ns.name, &ds).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let uid = datasets.get("acme-facts").await?.uid().context("uid")?;
    let pod = pod_of(&client, &ns.name, &uid).await?;
    // The pod would get these from --s3-credentials-secret; moto accepts any.
    let scratch = std::env::temp_dir().join(format!("llmops-scratch-{}", ns.name));
    let mut agent = Agent::start_with_env(
        &client,
        &ns.name,
        &pod,
        "acme-facts-prepare-token",
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("LLMOPS_SCRATCH", scratch.to_str().context("utf-8")?),
        ],
    )
    .await?;
    let exit = agent.exited().await?;
    assert!(exit.success(), "{}", agent.log_text());
    let status = datasets.get("acme-facts").await?.status.context("status")?;
    assert!(
        condition(&status.common.conditions, "Succeeded").is_some_and(|c| c.status == "True"),
        "{}",
        agent.log_text()
    );
    let artifact = status.artifact.context("artifact")?;
    let key = format!("{}/dataset/acme-facts/{uid}/output", ns.name);
    assert_eq!(artifact.uri, format!("store://{key}/"));
    let manifest = bucket.get(&format!("llmops/{key}/manifest.json").as_str().into()).await?.bytes().await?;
    assert_eq!(artifact.sha256, hex::encode(sha2::Sha256::digest(&manifest)), "the status pins the uploaded manifest");
    let manifest: Value = serde_json::from_slice(&manifest)?;
    assert_eq!(manifest["counts"]["read"], 12, "{manifest:#}");
    // The source URI's digest, as the worker read it (over its files' digests), is in the lineage.
    let source =
        status.lineage.context("lineage")?.inputs.into_iter().find(|i| i.kind == "Uri").context("Uri input")?;
    assert_eq!(source.name, format!("store://{}/imports/sums.jsonl", ns.name));
    assert_eq!(source.sha256, hex::encode(sha2::Sha256::digest(rows_sha.as_bytes())));
    bucket.head(&format!("llmops/{key}/train.parquet").as_str().into()).await.context("train.parquet was uploaded")?;
    op.stop().await;
    Ok(())
}

/// Deletes the namespace's FineTuneJobs while the operator still runs, so their
/// finalizer does not keep the test namespace from going.
async fn delete_finetunes(client: &Client, ns: &str) -> Result<()> {
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    tunes.delete_collection(&DeleteParams::background(), &ListParams::default()).await?;
    eventually("the FineTuneJobs to go", WAIT, || async {
        Ok(tunes.list(&ListParams::default()).await?.items.is_empty().then_some(()))
    })
    .await
}

#[tokio::test]
async fn a_prompt_version_gets_its_digest_and_config_map_and_a_bad_one_says_why() -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (client, ns) = namespace_with_crds("op-prompt").await?;
    let op = Operator::start(&client, &ns.name).await?;
    apply(&client, &ns.name, &example("promptversion.yaml")?).await?;
    let prompts: Api<PromptVersion> = Api::namespaced(client.clone(), &ns.name);
    let pv = eventually("the PromptVersion to be Ready", WAIT, || async {
        let p = prompts.get("acme-support-v1").await?;
        let ready = p.status.as_ref().and_then(|s| condition(&s.common.conditions, "Ready").cloned());
        Ok(ready.filter(|c| c.status == "True").map(|_| p))
    })
    .await?;
    let status = pv.status.clone().context("status")?;
    assert_eq!(status.digest.as_deref(), Some(pv.spec.digest().as_str()), "the digest is the shared renderer's");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let cm = cms.get(status.config_map.as_deref().context("configMap in status")?).await?;
    assert_eq!(cm.owner_references().first().map(|o| o.uid.clone()), pv.uid());
    let data = cm.data.unwrap_or_default();
    let examples: Value = serde_json::from_str(data.get("examples.json").context("examples.json")?)?;
    assert_eq!(
        examples["robot"]["messages"][1]["content"], "What is the name of Acme's support robot?",
        "the example is rendered: {examples:#}"
    );
    let prompt: Value = serde_json::from_str(data.get("prompt.json").context("prompt.json")?)?;
    assert_eq!(prompt["sha256"].as_str(), status.digest.as_deref());
    assert_eq!(health(&pv)?, "Current");

    // An example that leaves a required variable out: not Ready, and it says which.
    let mut bad = example("promptversion.yaml")?;
    bad["metadata"]["name"] = "acme-support-broken".into();
    bad["spec"]["examples"] = serde_json::json!([{"name": "empty", "variables": {}}]);
    apply(&client, &ns.name, &bad).await?;
    let ready = eventually("the broken PromptVersion's verdict", WAIT, || async {
        let p = prompts.get("acme-support-broken").await?;
        Ok(p.status.and_then(|s| condition(&s.common.conditions, "Ready").cloned()))
    })
    .await?;
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ExampleFailed"), "{ready:?}");
    assert!(ready.message.contains("\"prompt\" is required"), "{}", ready.message);
    assert_eq!(health(&prompts.get("acme-support-broken").await?)?, "Failed", "an immutable broken prompt is stalled");

    // Deleting the PromptVersion takes its ConfigMap with it.
    prompts.delete("acme-support-v1", &DeleteParams::foreground()).await?;
    let name = status.config_map.clone().unwrap_or_default();
    eventually("the ConfigMap to be collected", WAIT, || async {
        Ok(cms.get_opt(&name).await?.is_none().then_some(()))
    })
    .await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_eval_run_of_an_endpoint_gets_a_job_with_its_api_key_and_goes_with_it() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-evalrun").await?;
    let op = Operator::start(&client, &ns.name).await?;
    ready_dataset(&client, &ns.name, &op).await?;
    // A Secret that has not opted in to being sent anywhere.
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vendor-key"},
        "stringData": {"token": "sk-test"}
    });
    apply(&client, &ns.name, &secret).await?;
    let run = serde_json::json!({
        "apiVersion": "llmops.dev/v1alpha1", "kind": "EvalRun", "metadata": {"name": "vendor-eval"},
        "spec": {
            "target": {"endpoint": {"url": "https://api.example.com/v1", "model": "vendor-small",
                                    "apiKeySecret": {"name": "vendor-key", "key": "token"}}},
            "dataset": {"name": "acme-facts", "split": "test"},
            "metrics": ["contains", "tokenF1"],
            "thresholds": [{"metric": "tokenF1", "min": 0.5}],
            "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"}
        }
    });
    apply(&client, &ns.name, &run).await?;
    let evals: Api<EvalRun> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let refused = |allowed: Option<&'static str>| {
        let evals = evals.clone();
        async move {
            eventually("the EvalRun to wait for the Secret's consent", WAIT, || async {
                let status = evals.get("vendor-eval").await?.status.unwrap_or_default();
                Ok(condition(&status.common.conditions, "Ready")
                    .filter(|c| c.reason == "SecretNotAllowed" && allowed.is_none_or(|u| c.message.contains(u)))
                    .map(|c| c.message.clone()))
            })
            .await
        }
    };
    let message = refused(None).await?;
    assert!(message.contains("llmops.dev/allowed-urls"), "{message}");
    // The EvalRun looks again every 30 s, or at once when it changes: touch it.
    let touch = |n: u32| {
        let client = client.clone();
        let ns = ns.name.clone();
        async move {
            let label = serde_json::json!({"apiVersion": "llmops.dev/v1alpha1", "kind": "EvalRun",
                "metadata": {"name": "vendor-eval", "labels": {"touched": n.to_string()}}});
            let evals: Api<EvalRun> = Api::namespaced(client, &ns);
            evals.patch("vendor-eval", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&label)).await
        }
    };
    // Opted in, but for another URL.
    let mut secret = secret;
    secret["metadata"]["annotations"] = serde_json::json!({"llmops.dev/allowed-urls": "https://other.example.com/v1"});
    apply(&client, &ns.name, &secret).await?;
    touch(1).await?;
    let message = refused(Some("other.example.com")).await?;
    assert!(message.contains("not to https://api.example.com/v1"), "{message}");
    assert!(jobs.get_opt("vendor-eval-eval").await?.is_none(), "no pod gets a Secret that did not consent");
    secret["metadata"]["annotations"] =
        serde_json::json!({"llmops.dev/allowed-urls": "https://other.example.com/v1 https://api.example.com/v1"});
    apply(&client, &ns.name, &secret).await?;
    touch(2).await?;
    let job = eventually("the EvalRun's Job", WAIT, || async { Ok(jobs.get_opt("vendor-eval-eval").await?) }).await?;
    let uid = evals.get("vendor-eval").await?.uid().context("uid")?;
    assert_eq!(job.owner_references().first().map(|o| o.uid.clone()), Some(uid.clone()));
    let pod = job.spec.and_then(|s| s.template.spec).context("pod spec")?;
    let container = &pod.containers[0];
    let env: BTreeMap<String, Option<String>> =
        container.env.clone().unwrap_or_default().into_iter().map(|e| (e.name, e.value)).collect();
    assert_eq!(env["LLMOPS_WORKLOAD"].clone(), Some(format!("{}/EvalRun/vendor-eval/{uid}", ns.name)));
    assert_eq!(env["NVIDIA_VISIBLE_DEVICES"].as_deref(), Some("void"));
    let mounted = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .any(|v| v.secret.is_some_and(|s| s.secret_name.as_deref() == Some("vendor-key")));
    assert!(mounted, "the API key Secret is mounted");

    // The worker is handed the endpoint and the key file, never the key itself.
    let token = read_token(&client, &ns.name, "vendor-eval-eval-token").await?;
    let w = workload(&evals.get("vendor-eval").await?);
    let fetched = op
        .client()
        .await?
        .fetch(bearer(FetchRequest { workload: Some(w), pod: "p".into(), worker_version: "t".into() }, &token)?)
        .await?
        .into_inner();
    let Some(v1::assignment::Mode::Eval(e)) = fetched.assignment.and_then(|a| a.mode) else { bail!("no eval") };
    let Some(v1::eval_target::Target::Endpoint(endpoint)) = e.target.and_then(|t| t.target) else {
        bail!("no endpoint target")
    };
    assert_eq!(endpoint.url, "https://api.example.com/v1");
    assert!(endpoint.api_key_file.ends_with("/vendor-key/token"), "{}", endpoint.api_key_file);
    assert!(e.data.is_some_and(|d| d.uri.ends_with("/test.parquet")));

    evals.delete("vendor-eval", &DeleteParams::foreground()).await?;
    eventually("the Job to be collected", WAIT, || async {
        Ok(jobs.get_opt("vendor-eval-eval").await?.is_none().then_some(()))
    })
    .await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_real_agent_rides_out_an_operator_restart_and_its_result_lands() -> Result<()> {
    let (client, ns) = namespace_with_crds("op-agent-restart").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let store = TestStore::Local(store_of(&op.config)?);
    prepare_with_agent(&client, &ns.name, &store).await?;
    let smol =
        llmops_worker::engine::load(&llmops_tests::test_model()?, &candle_core::Device::Cpu, Default::default())?;
    let tiny = std::env::temp_dir().join(format!("llmops-tiny-{}", ns.name));
    llmops_worker::engine::tiny::write_tiny_llama(&tiny, &smol, 5)?;
    store.put_dir(&tiny, &format!("{}/imports/tiny", ns.name)).await?;
    let _resolvers = run_resolvers(&client, &ns.name, &store);
    let mut ftj = example("finetunejob.yaml")?;
    ftj["spec"]["model"] = serde_json::json!({"uri": "store://imports/tiny/", "format": "hf"});
    ftj["spec"]["dataset"] = serde_json::json!({"name": "acme-facts"});
    ftj["spec"]["hyperparameters"] =
        serde_json::json!({"epochs": 1000, "maxSteps": 150, "batchSize": 2, "learningRate": 0.001, "maxSeqLength": 64});
    apply(&client, &ns.name, &ftj).await?;
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns.name);
    let uid = eventually("the FineTuneJob", WAIT, || async { Ok(tunes.get_opt("acme-facts-lora").await?) })
        .await?
        .uid()
        .context("uid")?;
    let pod = pod_of(&client, &ns.name, &uid).await?;
    let mut agent = Agent::start_with_env(&client, &ns.name, &pod, "acme-facts-lora-finetune-token", &[]).await?;
    eventually("training progress in status", WAIT, || async {
        let s = tunes.get("acme-facts-lora").await?.status.unwrap_or_default();
        Ok(s.progress.is_some().then_some(()))
    })
    .await
    .with_context(|| agent.log_text())?;

    // The operator goes away mid-run and comes back on the same address.
    let config = op.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let op = Operator::start_with(&client, config).await?;
    let exit = agent.exited().await?;
    assert!(exit.success(), "{}", agent.log_text());
    assert!(
        agent.log_text().contains("the operator is shutting down"),
        "the session ended with the operator:\n{}",
        agent.log_text()
    );
    let status = tunes.get("acme-facts-lora").await?.status.context("status")?;
    assert!(
        condition(&status.common.conditions, "Succeeded").is_some_and(|c| c.status == "True"),
        "{:?}\n{}",
        status.common.conditions,
        agent.log_text()
    );
    let out = store_of(&op.config)?.join(&ns.name).join("finetunejob/acme-facts-lora").join(&uid).join("output");
    let manifest = llmops_worker::store::file_sha256(&out.join("manifest.json"))?;
    assert_eq!(status.artifact.map(|a| a.sha256), Some(manifest), "the result reached the status");
    let selector = ListParams::default().labels(&format!("llmops.dev/uid={uid}"));
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(jobs.list(&selector).await?.items.len(), 1, "one Job");
    assert_eq!(pods.list(&selector).await?.items.len(), 1, "one pod");
    delete_finetunes(&client, &ns.name).await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn with_leader_election_one_replica_works_and_the_other_takes_over() -> Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    let (client, ns) = namespace_with_crds("op-leader").await?;
    let replica = |identity: &str| -> Result<llmops_operator::Config> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = Config::new(addr.parse()?, addr);
        config.namespaces = vec![ns.name.clone()];
        config.resolver_namespace = ns.name.clone();
        let mut election = llmops_operator::leader::LeaderElection::new(&ns.name, "llmops-operator", identity);
        election.lease_duration = Duration::from_secs(3);
        election.renew_interval = Duration::from_secs(1);
        config.leader_election = Some(election);
        Ok(config)
    };
    let (a, b) = (replica("replica-a")?, replica("replica-b")?);
    let first = tokio::spawn(llmops_operator::run(client.clone(), a.clone()));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = |lease: &Lease| lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).unwrap_or_default();
    eventually("replica a to lead", WAIT, || async {
        Ok(leases.get_opt("llmops-operator").await?.filter(|l| holder(l) == "replica-a").map(|_| ()))
    })
    .await?;
    let second = tokio::spawn(llmops_operator::run(client.clone(), b.clone()));
    apply(&client, &ns.name, &example("dataset.yaml")?).await?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    eventually("the leader to create the Job", WAIT, || async { Ok(jobs.get_opt("acme-facts-prepare").await?) })
        .await?;
    assert!(tokio::net::TcpStream::connect(&b.gateway_address).await.is_err(), "the waiting replica serves no gateway");

    // The leader goes away without a word; after its Lease runs out the other works.
    first.abort();
    let _ = first.await;
    let lease = eventually("replica b to take over", WAIT, || async {
        Ok(leases.get_opt("llmops-operator").await?.filter(|l| holder(l) == "replica-b"))
    })
    .await?;
    assert_eq!(lease.spec.and_then(|s| s.lease_transitions), Some(1));
    eventually("the new leader's gateway", WAIT, || async {
        Ok(tokio::net::TcpStream::connect(&b.gateway_address).await.ok().map(|_| ()))
    })
    .await?;
    // It took over the Dataset: its token and Assignment are served, nothing is created twice.
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let ds = datasets.get("acme-facts").await?;
    let token = read_token(&client, &ns.name, "acme-facts-prepare-token").await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", b.gateway_address))?.connect().await?;
    let gw = llmops_proto::v1::worker_gateway_client::WorkerGatewayClient::new(channel);
    eventually("the assignment from the new leader", WAIT, || {
        let request = FetchRequest { workload: Some(workload(&ds)), pod: "p".into(), worker_version: "t".into() };
        let mut gw = gw.clone();
        let token = token.clone();
        async move { Ok(gw.fetch(bearer(request, &token)?).await.ok().map(|_| ())) }
    })
    .await?;
    let selector = ListParams::default().labels(&format!("llmops.dev/uid={}", ds.uid().context("uid")?));
    assert_eq!(jobs.list(&selector).await?.items.len(), 1, "one Job");
    second.abort();
    let _ = second.await;
    Ok(())
}

#[tokio::test]
async fn a_deployment_whose_spec_cannot_work_is_stalled_and_starts_nothing() -> Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    let (client, ns) = namespace_with_crds("op-md-stalled").await?;
    let op = Operator::start(&client, &ns.name).await?;
    // Serving puts the prompt's system message before each request: its variable needs
    // a default, and this one has none.
    let prompt = serde_json::json!({
        "apiVersion": "llmops.dev/v1alpha1", "kind": "PromptVersion", "metadata": {"name": "per-topic"},
        "spec": {"prompt": "topic", "messages": [{"role": "system", "content": "You only talk about {{ topic }}."}],
                 "variables": [{"name": "topic"}]},
    });
    apply(&client, &ns.name, &prompt).await?;
    let md = serde_json::json!({
        "apiVersion": "llmops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "unservable"},
        "spec": {"model": {"uri": "store://imports/m.gguf"}, "prompt": {"name": "per-topic"}},
    });
    apply(&client, &ns.name, &md).await?;
    let mds: Api<llmops_crds::ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let stalled = eventually("the deployment to stall", WAIT, || async {
        let m = mds.get("unservable").await?;
        let conds = m.status.clone().map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Stalled").filter(|c| c.status == "True").cloned().map(|c| (m, c)))
    })
    .await?;
    assert_eq!(stalled.1.reason, "PromptNotServable", "{:?}", stalled.1);
    assert!(stalled.1.message.contains("topic"), "{}", stalled.1.message);
    assert_eq!(health(&stalled.0)?, "Failed");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(deployments.get_opt("unservable").await?.is_none(), "nothing is started for a spec that cannot work");
    op.stop().await;
    Ok(())
}
