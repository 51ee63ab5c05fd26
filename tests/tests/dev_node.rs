//! The development node agent against the real control plane: the operator and a dev
//! node run in-process, and every worker pod runs for real as a local `llmops-worker
//! agent` process — no hand-played kubelet or worker.
//!
//! Each test registers its own dev node (named after its namespace) and pins its pods
//! to it with a nodeSelector on the hostname plus the dev node's toleration, so a quick
//! start's dev node on the same cluster takes none of them. The tests take turns: two
//! dev nodes would hand out the same 127.0.0.x addresses.
//!
//! What long-running serving pods need (restarts with back-off, readiness probes, the
//! listen address) is checked with bare pods running `sh` and `python3`, no worker.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use llmops_crds::{Dataset, EvalRun, FineTuneJob, PromptVersion};
use llmops_operator::StoreConfig;
use llmops_tests::dev_node::{DevNode, DevNodeConfig, NODE_LABEL, NODE_TAINT};
use llmops_tests::{Operator, TestNamespace, apply, condition, eventually, example, namespace_with_crds};
use serde_json::{Value, json};

/// One dev node at a time in this test binary.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(60);
/// Training and evaluating the tiny model take seconds; the margin is for a busy machine.
const RUN: Duration = Duration::from_secs(600);

async fn dev_node(client: &Client, ns: &str) -> Result<DevNode> {
    let name = format!("dev-{ns}");
    let work_dir = std::env::temp_dir().join(format!("llmops-dev-node-{ns}"));
    DevNode::start(client.clone(), DevNodeConfig::new(name, llmops_tests::worker_binary()?, work_dir)).await
}

/// A dev node for pods that run plain commands (no worker needed).
async fn process_node(client: &Client, ns: &str) -> Result<DevNode> {
    let name = format!("dev-{ns}");
    let work_dir = std::env::temp_dir().join(format!("llmops-dev-node-{ns}"));
    let worker = llmops_tests::worker_binary().unwrap_or_else(|_| "llmops-worker".into());
    DevNode::start(client.clone(), DevNodeConfig::new(name, worker, work_dir)).await
}

/// A bare pod on `node` running `sh -c script` (restartPolicy Always, as the apiserver
/// defaults it), with `container` merged into its container.
fn bare_pod(name: &str, node: &DevNode, script: &str, container: Value) -> Result<Pod> {
    let mut c = json!({"name": "main", "image": "none", "command": ["sh", "-c", script],
                       "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}});
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), container) {
        c.extend(extra);
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "nodeSelector": {NODE_LABEL: "true", "kubernetes.io/hostname": node.config.node_name},
            "tolerations": [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [c],
        },
    }))?)
}

fn container_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first())
}

/// The pod's Ready condition is True.
fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Deletes the pods and waits until the dev node has finished their deletion.
async fn delete_pods(pods: &Api<Pod>, names: &[&str]) -> Result<()> {
    for name in names {
        pods.delete(name, &DeleteParams::default()).await?;
    }
    eventually("the pods to go", WAIT, || async {
        for name in names {
            if pods.get_opt(name).await?.is_some() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

/// Pins a workload's pod to `node`.
fn place_on(manifest: &mut Value, node: &DevNode) {
    manifest["spec"]["resources"]["nodeSelector"] =
        json!({NODE_LABEL: "true", "kubernetes.io/hostname": node.config.node_name});
    manifest["spec"]["resources"]["tolerations"] =
        json!([{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]);
}

async fn pods_of(client: &Client, ns: &str, uid: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods.list(&ListParams::default().labels(&format!("llmops.dev/uid={uid}"))).await?.items)
}

fn pod_ip(pod: &Pod) -> String {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default()
}

fn exit_code(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map(|t| t.exit_code)
}

/// The pid of a running pod's process (its containerID is `local-process://<pid>`).
fn pid(pod: &Pod) -> Option<u32> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.as_deref())
        .and_then(|id| id.strip_prefix("local-process://"))
        .and_then(|p| p.parse().ok())
}

/// The pod log the dev node keeps, for failure messages.
fn log_of(node: &DevNode, pod: &Pod) -> String {
    let dir = node.config.work_dir.join(format!("{}_{}", pod.namespace().unwrap_or_default(), pod.name_any()));
    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
}

/// Waits until `get` returns an object whose `done` condition is True, failing early
/// when its `Failed` condition is.
async fn finished<T>(
    what: &str,
    get: impl AsyncFn() -> Result<T>,
    conditions: impl Fn(&T) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    done: &str,
) -> Result<T> {
    eventually(what, RUN, || async {
        let obj = get().await?;
        let conds = conditions(&obj);
        if let Some(f) = condition(&conds, "Failed").filter(|c| c.status == "True") {
            anyhow::bail!("{what}: failed: {}: {}", f.reason, f.message);
        }
        Ok(condition(&conds, done).is_some_and(|c| c.status == "True").then_some(obj))
    })
    .await
}

#[tokio::test]
async fn a_failing_worker_ends_its_pod_failed_with_the_workers_reason() -> Result<()> {
    let _turn = TURN.lock().await;
    let (client, ns) = namespace_with_crds("dev-node-failure").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let node = dev_node(&client, &ns.name).await?;
    let mut ds = example("dataset.yaml")?;
    ds["spec"]["source"] = json!({"uri": "store://imports/no-such-file.jsonl"});
    ds["spec"]["backoffLimit"] = json!(0);
    place_on(&mut ds, &node);
    apply(&client, &ns.name, &ds).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let uid = eventually("the Dataset", WAIT, || async { Ok(datasets.get_opt("acme-facts").await?) })
        .await?
        .uid()
        .context("uid")?;

    let failed = eventually("the Dataset to fail", RUN, || async {
        let conds = datasets.get("acme-facts").await?.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&conds, "Failed").filter(|c| c.status == "True").cloned())
    })
    .await?;
    // The reason is the worker's, sent through the gateway, not a pod exit code.
    assert_ne!(failed.reason, "WorkerExited", "{failed:?}");
    assert!(failed.message.contains("no-such-file.jsonl"), "{failed:?}");

    let pod = eventually("the pod to end", WAIT, || async {
        Ok(pods_of(&client, &ns.name, &uid).await?.into_iter().find(|p| exit_code(p).is_some()))
    })
    .await?;
    let status = pod.status.clone().context("pod status")?;
    assert_eq!(status.phase.as_deref(), Some("Failed"), "{}", log_of(&node, &pod));
    assert_eq!(exit_code(&pod), Some(1), "{}", log_of(&node, &pod));
    let terminated = status.container_statuses.as_ref().and_then(|c| c.first()).and_then(|c| c.state.clone());
    let message = terminated.and_then(|s| s.terminated).and_then(|t| t.message).unwrap_or_default();
    assert!(message.contains("no-such-file.jsonl"), "the termination message is the log's tail: {message}");
    assert!(pod_ip(&pod).starts_with("127.0.0."), "{status:?}");
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(pod.spec.and_then(|s| s.node_name), Some(node.config.node_name.clone()));

    node.stop().await?;
    op.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_whole_pipeline_runs_for_real_on_the_dev_node() -> Result<()> {
    let _turn = TURN.lock().await;
    let (client, ns) = namespace_with_crds("dev-node-pipeline").await?;
    let op = Operator::start(&client, &ns.name).await?;
    let StoreConfig::Local { mount_path: store, .. } = &op.config.store else { anyhow::bail!("a local store") };
    let smol =
        llmops_worker::engine::load(&llmops_tests::test_model()?, &candle_core::Device::Cpu, Default::default())?;
    llmops_worker::engine::tiny::write_tiny_llama(&store.join(&ns.name).join("imports/tiny"), &smol, 3)?;
    let node = dev_node(&client, &ns.name).await?;

    let mut dataset = example("dataset.yaml")?;
    let mut tune = example("finetunejob.yaml")?;
    tune["spec"]["model"] = json!({"uri": "store://imports/tiny/", "format": "hf"});
    tune["spec"]["hyperparameters"] = json!({
        "epochs": 100, "maxSteps": 6, "batchSize": 2, "learningRate": 0.001, "maxSeqLength": 64, "evalInterval": 3,
    });
    tune["spec"]["checkpoints"] = json!({"intervalSteps": 3});
    let prompt = example("promptversion.yaml")?;
    let mut eval = example("evalrun.yaml")?;
    eval["spec"]["target"]["model"] = json!({"uri": "store://imports/tiny/", "format": "hf"});
    eval["spec"]["metrics"] = json!(["perplexity", "contains"]);
    // A random model's perplexity is huge (around 1e12) and it contains no answer: a bar
    // that a model which learned anything would clear, so this verdict must be a failure,
    // computed for real (a gate that cannot fail would pass here).
    eval["spec"]["thresholds"] = json!([{"metric": "contains", "min": 0.5}]);
    for m in [&mut dataset, &mut tune, &mut eval] {
        place_on(m, &node);
    }
    // In reverse order: each waits for what it references.
    for m in [&eval, &tune, &prompt, &dataset] {
        apply(&client, &ns.name, m).await?;
    }

    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns.name);
    let prompts: Api<PromptVersion> = Api::namespaced(client.clone(), &ns.name);
    let evals: Api<EvalRun> = Api::namespaced(client.clone(), &ns.name);
    let ds = finished(
        "the Dataset to succeed",
        async || Ok(datasets.get("acme-facts").await?),
        |d: &Dataset| d.status.clone().map(|s| s.common.conditions).unwrap_or_default(),
        "Succeeded",
    )
    .await?;
    assert!(ds.status.as_ref().and_then(|s| s.artifact.as_ref()).is_some_and(|a| a.sha256.len() == 64));
    finished(
        "the PromptVersion to be Ready",
        async || Ok(prompts.get("acme-support-v1").await?),
        |p: &PromptVersion| p.status.clone().map(|s| s.common.conditions).unwrap_or_default(),
        "Ready",
    )
    .await?;
    let ft = finished(
        "the FineTuneJob to succeed",
        async || Ok(tunes.get("acme-facts-lora").await?),
        |f: &FineTuneJob| f.status.clone().map(|s| s.common.conditions).unwrap_or_default(),
        "Succeeded",
    )
    .await?;
    let ft_status = ft.status.clone().context("status")?;
    assert_eq!(ft_status.progress.as_deref(), Some("6/6"), "{ft_status:?}");
    let run = finished(
        "the EvalRun to succeed",
        async || Ok(evals.get("acme-facts-lora-eval").await?),
        |e: &EvalRun| e.status.clone().map(|s| s.common.conditions).unwrap_or_default(),
        "Succeeded",
    )
    .await?;
    let status = run.status.clone().context("status")?;
    let passed = condition(&status.common.conditions, "Passed").context("Passed")?;
    assert_eq!((passed.status.as_str(), passed.reason.as_str()), ("False", "ThresholdsNotMet"), "{passed:?}");
    assert!(passed.message.contains("contains"), "the message names the failed threshold: {}", passed.message);
    assert_eq!(status.passed, Some(false));
    let perplexity = status.metrics.iter().find(|m| format!("{:?}", m.metric).eq_ignore_ascii_case("perplexity"));
    assert!(perplexity.is_some_and(|m| m.value.is_finite() && m.value > 1.0), "{:?}", status.metrics);
    assert!(ready(&status.common.conditions));

    // Every worker pod ran here as a process with its own loopback address, and ended 0.
    // The result is acknowledged (and in status) before the worker exits, so the last pod
    // may still be finishing when the EvalRun reads Succeeded: wait for all three to end.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let workers = eventually("every worker pod to end", WAIT, || async {
        let all = pods.list(&ListParams::default().labels("llmops.dev/worker=true")).await?.items;
        Ok(all.iter().all(|p| exit_code(p).is_some()).then_some(all))
    })
    .await?;
    let kinds: Vec<String> = {
        let mut k: Vec<String> = workers.iter().filter_map(|p| p.labels().get("llmops.dev/kind").cloned()).collect();
        k.sort();
        k
    };
    // The FineTuneJob and the EvalRun read the same base model: it was resolved once.
    assert_eq!(kinds, ["Dataset", "EvalRun", "FineTuneJob", "ModelResolution"], "one pod each");
    let digest = llmops_worker::store::dir_digest(&store.join(&ns.name).join("imports/tiny"))?;
    let model_input = |inputs: &[llmops_crds::LineageInput]| {
        inputs.iter().find(|i| i.kind == "Model").map(|i| (i.name.clone(), i.sha256.clone()))
    };
    // Lineage names the store key the spec's namespace-relative URI resolved to.
    let expected = Some((format!("store://{}/imports/tiny/", ns.name), digest.clone()));
    assert_eq!(model_input(&ft_status.lineage.clone().context("lineage")?.inputs), expected);
    let evaluated = status.evaluated.clone().context("evaluated")?;
    assert_eq!(evaluated.model_digest.as_deref(), Some(digest.as_str()), "the EvalRun read the same cached copy");
    assert!(store.join(format!("models/sha256-{digest}/config.json")).is_file(), "the cached copy");
    for pod in &workers {
        assert!(pod_ip(pod).starts_with("127.0.0."), "{}: {:?}", pod.name_any(), pod.status);
        assert_eq!(exit_code(pod), Some(0), "{}", log_of(&node, pod));
        assert_eq!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded"));
    }

    // Deleting a running workload stops its process and the pod goes.
    let mut long = tune.clone();
    long["metadata"]["name"] = json!("long-run");
    long["spec"]["hyperparameters"]["maxSteps"] = json!(100_000);
    long["spec"]["checkpoints"] = json!({"intervalSteps": 100_000});
    apply(&client, &ns.name, &long).await?;
    let uid = eventually("the long FineTuneJob", WAIT, || async { Ok(tunes.get_opt("long-run").await?) })
        .await?
        .uid()
        .context("uid")?;
    let running = eventually("its pod to run", WAIT, || async {
        Ok(pods_of(&client, &ns.name, &uid).await?.into_iter().find(|p| pid(p).is_some() && exit_code(p).is_none()))
    })
    .await?;
    let pid = pid(&running).context("pid")?;
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the process runs");
    eventually("training progress", WAIT, || async {
        let s = tunes.get("long-run").await?.status.unwrap_or_default();
        Ok(s.progress.filter(|p| !p.starts_with("0/")).map(|_| ()))
    })
    .await
    .with_context(|| log_of(&node, &running))?;
    tunes.delete("long-run", &DeleteParams::background()).await?;
    eventually("the FineTuneJob, its pod and its process to go", RUN, || async {
        let gone = tunes.get_opt("long-run").await?.is_none()
            && pods.get_opt(&running.name_any()).await?.is_none()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists();
        Ok(gone.then_some(()))
    })
    .await
    .with_context(|| log_of(&node, &running))?;

    // The finalizer needs the operator: remove the finished job too, so the namespace can go.
    tunes.delete("acme-facts-lora", &DeleteParams::background()).await?;
    eventually("the FineTuneJob to go", WAIT, || async {
        Ok(tunes.get_opt("acme-facts-lora").await?.is_none().then_some(()))
    })
    .await?;
    node.stop().await?;
    op.stop().await;
    Ok(())
}

fn ready(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    condition(conds, "Ready").is_some_and(|c| c.status == "True")
}

#[tokio::test]
async fn a_crashing_pod_with_restart_policy_always_is_restarted_with_back_off() -> Result<()> {
    let _turn = TURN.lock().await;
    let client = llmops_tests::client().await?;
    let ns = TestNamespace::create(&client, "dev-node-restarts").await?;
    let node = process_node(&client, &ns.name).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let pod = bare_pod("crasher", &node, "echo crashing now; exit 3", json!({}))?;
    pods.create(&Default::default(), &pod).await?;

    // Back-offs of 1 s and 2 s: the second restart comes after about 3 s.
    let crashed = eventually("two restarts", WAIT, || async {
        let pod = pods.get("crasher").await?;
        Ok(container_status(&pod).is_some_and(|c| c.restart_count >= 2).then_some(pod))
    })
    .await?;
    let status = crashed.status.clone().context("status")?;
    let c = container_status(&crashed).context("container status")?;
    assert_eq!(status.phase.as_deref(), Some("Running"), "a restarting pod stays Running: {status:?}");
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()).context("lastState.terminated")?;
    assert_eq!(last.exit_code, 3, "{c:?}");
    assert_eq!(last.reason.as_deref(), Some("Error"));
    assert_eq!(last.message.as_deref(), Some("crashing now"), "the tail of that run's log only: {c:?}");
    assert!(!c.ready, "{c:?}");
    // Between tries the container waits in CrashLoopBackOff.
    eventually("a CrashLoopBackOff wait", WAIT, || async {
        let pod = pods.get("crasher").await?;
        let reason = container_status(&pod)
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone());
        Ok((reason.as_deref() == Some("CrashLoopBackOff")).then_some(()))
    })
    .await?;

    delete_pods(&pods, &["crasher"]).await?;
    node.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_readiness_probe_decides_when_a_serving_pod_is_ready() -> Result<()> {
    let _turn = TURN.lock().await;
    let client = llmops_tests::client().await?;
    let ns = TestNamespace::create(&client, "dev-node-readiness").await?;
    let node = process_node(&client, &ns.name).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // Each pod listens on its own 127.0.0.x, so both can use the same port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    // The server starts 2 s late, so the pod runs unready first.
    let script = format!(r#"sleep 2; exec python3 -m http.server {port} --bind "$LLMOPS_LISTEN_HOST""#);
    let probe = |path: &str| {
        json!({
            "ports": [{"name": "http", "containerPort": port}],
            "readinessProbe": {"httpGet": {"path": path, "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
        })
    };
    pods.create(&Default::default(), &bare_pod("serving", &node, &script, probe("/"))?).await?;
    pods.create(&Default::default(), &bare_pod("missing", &node, &script, probe("/no-such-page"))?).await?;

    let unready = eventually("the pod to run, not ready yet", WAIT, || async {
        let pod = pods.get("serving").await?;
        let running = pid(&pod).is_some() && exit_code(&pod).is_none();
        Ok(running.then_some(pod))
    })
    .await?;
    assert!(!pod_ready(&unready), "not ready before the probe succeeds: {:?}", unready.status);
    assert!(!container_status(&unready).context("container status")?.ready);

    let ready = eventually("the pod to become Ready", WAIT, || async {
        let pod = pods.get("serving").await?;
        Ok(pod_ready(&pod).then_some(pod))
    })
    .await
    .with_context(|| format!("{:?}", unready.status))?;
    assert!(container_status(&ready).context("container status")?.ready);
    let conditions = ready.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    assert!(conditions.iter().any(|c| c.type_ == "ContainersReady" && c.status == "True"), "{conditions:?}");
    // It answers on its own address, the one LLMOPS_LISTEN_HOST named.
    let ip = pod_ip(&ready);
    assert!(ip.starts_with("127.0.0."), "{ip}");
    std::net::TcpStream::connect((ip.as_str(), port)).context("the server listens on the pod IP")?;

    // The other one serves too (on its own address, the same port), but its probe gets a 404.
    let other_ip = eventually("the second pod's address", WAIT, || async {
        Ok(Some(pod_ip(&pods.get("missing").await?)).filter(|ip| !ip.is_empty()))
    })
    .await?;
    assert_ne!(other_ip, ip);
    eventually("the second server to answer", WAIT, || async {
        Ok(std::net::TcpStream::connect((other_ip.as_str(), port)).ok().map(|_| ()))
    })
    .await?;
    // A few more probe periods: still not Ready.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let missing = pods.get("missing").await?;
    assert_eq!(missing.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Running"));
    assert!(!pod_ready(&missing), "a probe that gets 404 keeps it unready: {:?}", missing.status);
    assert!(!container_status(&missing).context("container status")?.ready);

    delete_pods(&pods, &["serving", "missing"]).await?;
    node.stop().await?;
    Ok(())
}
