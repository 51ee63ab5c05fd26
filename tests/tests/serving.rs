//! ModelDeployments against the real control plane: the operator and a development node
//! run in-process, every serving pod is a real `llmops-worker agent` serving
//! SmolLM2-135M-Instruct, and every gate is a real EvalRun run by the real eval worker.
//!
//! Each test registers its own dev node and pins its pods to it; the tests take turns
//! (two dev nodes would hand out the same 127.0.0.x addresses).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use llmops_crds::{Dataset, EvalRun, ModelDeployment};
use llmops_operator::StoreConfig;
use llmops_tests::dev_node::{DevNode, DevNodeConfig, place_on};
use llmops_tests::{Operator, apply, condition, eventually, namespace_with_crds, repo_root};
use serde_json::{Value, json};

/// One dev node at a time in this test binary.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(60);
/// Loading the model, evaluating a gate: seconds, with a margin for a busy machine.
const RUN: Duration = Duration::from_secs(600);
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Logs of the operator and the dev node on stderr when `RUST_LOG` asks for them.
fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

async fn dev_node(client: &Client, ns: &str) -> Result<DevNode> {
    logs();
    let name = format!("dev-{ns}");
    let work_dir = std::env::temp_dir().join(format!("llmops-dev-node-{ns}"));
    DevNode::start(client.clone(), DevNodeConfig::new(name, llmops_tests::worker_binary()?, work_dir)).await
}

/// An operator that addresses deployments by pod IP (the local cluster has no DNS),
/// with its metrics served, and the test model copied into its store.
async fn operator(client: &Client, ns: &str) -> Result<(Operator, std::net::SocketAddr, PathBuf)> {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let op = Operator::start_configured(client, ns, |c| {
        c.address_by_pod_ip = true;
        c.metrics_listen = Some(metrics);
    })
    .await?;
    let StoreConfig::Local { mount_path: store, .. } = op.config.store.clone() else { bail!("a local store") };
    std::fs::create_dir_all(store.join(ns).join("imports"))?;
    std::fs::copy(llmops_tests::test_model()?, store.join(ns).join("imports").join(MODEL_FILE))?;
    Ok((op, metrics, store))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Pins a workload's pods to `node`, asking for a quarter of a core.
fn deployment_manifest(name: &str, node: &DevNode) -> Value {
    let mut md = json!({
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": format!("store://imports/{MODEL_FILE}")},
            "replicas": 1,
            "serving": {"maxBatchSize": 4, "maxQueue": 16, "contextLength": 1024},
        },
    });
    place_on(&mut md, &node.config.node_name);
    md
}

/// A path of a control-plane binary built by tests/cluster/build (kubectl, kstatus).
fn cluster_binary(name: &str) -> Result<PathBuf> {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source tests/cluster/lib.sh && bin_path {name}"))
        .current_dir(repo_root())
        .output()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !path.is_file() {
        bail!("{name} is not built; run tests/cluster/build {name}");
    }
    Ok(path)
}

fn kubectl(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(cluster_binary("kubectl")?)
        .arg("--kubeconfig")
        .arg(llmops_tests::kubeconfig()?)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn get_md(api: &Api<ModelDeployment>, name: &str) -> Result<ModelDeployment> {
    Ok(api.get(name).await?)
}

fn conds(md: &ModelDeployment) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    md.status.clone().map(|s| s.common.conditions).unwrap_or_default()
}

fn is_true(md: &ModelDeployment, t: &str) -> bool {
    condition(&conds(md), t).is_some_and(|c| c.status == "True")
}

/// Waits until the deployment is Ready, failing early when it is Stalled.
async fn ready_md(api: &Api<ModelDeployment>, name: &str, logs: impl Fn() -> String) -> Result<ModelDeployment> {
    eventually(&format!("ModelDeployment {name} to be Ready"), RUN, || async {
        let md = get_md(api, name).await?;
        if let Some(s) = condition(&conds(&md), "Stalled").filter(|c| c.status == "True") {
            bail!("{name} stalled: {}: {}\n{}", s.reason, s.message, logs());
        }
        Ok(is_true(&md, "Ready").then_some(md))
    })
    .await
}

/// The pod logs the dev node keeps, for failure messages.
fn logs_of(node: &DevNode) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(&node.config.work_dir).into_iter().flatten().flatten() {
        let log = std::fs::read_to_string(entry.path().join("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        text.push_str(&format!("--- {}\n", entry.file_name().to_string_lossy()));
        for line in tail.into_iter().rev() {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

async fn chat(endpoint: &str, model: &str, key: Option<&str>, question: &str) -> Result<(u16, Value)> {
    let client = reqwest::Client::new();
    let mut req = client.post(format!("{endpoint}/chat/completions")).json(&json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 24,
        "temperature": 0,
    }));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.timeout(Duration::from_secs(120)).send().await?;
    let code = resp.status().as_u16();
    Ok((code, resp.json().await.unwrap_or(Value::Null)))
}

async fn scrape(addr: &std::net::SocketAddr) -> Result<String> {
    Ok(reqwest::get(format!("http://{addr}/metrics")).await?.text().await?)
}

/// The operator's status writes of ModelDeployments so far.
async fn md_status_writes(addr: &std::net::SocketAddr) -> Result<f64> {
    let text = scrape(addr).await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("llmops_operator_status_writes_total{") && l.contains("kind=\"ModelDeployment\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

fn kstatus(md: &ModelDeployment) -> Result<String> {
    let value = serde_json::to_value(md)?;
    Ok(llmops_tests::kstatus(&value)?.0)
}

fn traffic_files(store: &Path, ns: &str, name: &str) -> Vec<PathBuf> {
    let dir = store.join(ns).join("modeldeployment").join(name).join("traffic");
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect()
}

#[tokio::test]
async fn a_model_deployment_serves_scales_autoscales_and_turns_feedback_into_a_dataset() -> Result<()> {
    let _turn = TURN.lock().await;
    let (client, ns) = namespace_with_crds("md-serves").await?;
    let (op, metrics, store) = operator(&client, &ns.name).await?;
    let node = dev_node(&client, &ns.name).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let keys: Secret = serde_json::from_value(json!({
        "metadata": {"name": "assistant-keys"},
        "stringData": {"keys": "tenant-key-1\n"},
    }))?;
    secrets.create(&PostParams::default(), &keys).await?;

    let mut manifest = deployment_manifest("assistant", &node);
    manifest["spec"]["apiKeys"] = json!({"name": "assistant-keys", "key": "keys"});
    apply(&client, &ns.name, &manifest).await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);

    // From its first reconcile it reads as in progress, never as healthy too early.
    let first = eventually("the first status", WAIT, || async {
        let md = get_md(&mds, "assistant").await?;
        Ok((!conds(&md).is_empty()).then_some(md))
    })
    .await?;
    if !is_true(&first, "Ready") {
        assert_eq!(kstatus(&first)?, "InProgress", "{:?}", conds(&first));
    }
    let md = ready_md(&mds, "assistant", || logs_of(&node)).await?;
    assert_eq!(kstatus(&md)?, "Current", "{:?}", conds(&md));
    let status = md.status.clone().context("status")?;
    let revision = status.serving_revision.clone().context("a serving revision")?;
    let endpoint = status.endpoint.clone().context("an endpoint")?;
    assert!(endpoint.starts_with("http://127.0.0.") && endpoint.ends_with(":8000/v1"), "{endpoint}");
    assert_eq!(status.selector.as_deref(), Some(format!("llmops.dev/uid={}", md.uid().context("uid")?).as_str()));
    assert_eq!(status.ready_replicas, Some(1));

    // The owned objects.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deployments.get("assistant").await?;
    let template = d.spec.clone().context("spec")?.template;
    assert_eq!(
        template.metadata.and_then(|m| m.labels).and_then(|l| l.get("llmops.dev/revision").cloned()),
        Some(revision.clone())
    );
    let container = &template.spec.context("pod spec")?.containers[0];
    assert_eq!(
        container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.as_deref()),
        Some("/readyz")
    );
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let svc = services.get("assistant").await?;
    assert_eq!(svc.spec.and_then(|s| s.ports).map(|p| p[0].name.clone()), Some(Some("http".to_string())));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let cm = cms.get(&format!("assistant-rev-{revision}")).await?;
    let assignment = cm.data.clone().unwrap_or_default().get("assignment.json").cloned().unwrap_or_default();
    assert!(assignment.contains(&revision), "{assignment}");

    // An idle deployment causes no status writes.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before = md_status_writes(&metrics).await?;
    let status_before = get_md(&mds, "assistant").await?.status;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = md_status_writes(&metrics).await?;
    let status_after = get_md(&mds, "assistant").await?.status;
    assert_eq!(
        before,
        after,
        "an idle ModelDeployment wrote its status {} times in a minute:\n{status_before:#?}\n{status_after:#?}",
        after - before
    );

    // It answers through the address the status gives, with a key only.
    let (code, _) = chat(&endpoint, "assistant", None, "Hi").await?;
    assert_eq!(code, 401);
    let (code, body) = chat(&endpoint, "assistant", Some("tenant-key-1"), "What is the capital of France?").await?;
    assert_eq!(code, 200, "{body}");
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    assert!(!answer.is_empty(), "{body}");
    let id = body["id"].as_str().context("a completion id")?.to_string();

    // Feedback lands in the traffic log, and a Dataset built from it.
    let resp = reqwest::Client::new()
        .post(format!("{endpoint}/feedback"))
        .bearer_auth("tenant-key-1")
        .json(&json!({"id": id, "rating": 5, "correction": "Paris is the capital of France."}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap_or_default());
    let files = traffic_files(&store, &ns.name, "assistant");
    let log: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap_or_default()).collect();
    assert!(log.contains(&id) && log.contains("\"feedback\""), "{files:?}: {log}");
    let mut dataset = json!({
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "from-feedback"},
        "spec": {
            "source": {"feedback": {"modelDeployment": "assistant", "minRating": 4}},
            "schema": "chat",
            "split": {"train": 1.0, "validation": 0.0, "test": 0.0, "seed": 1},
        },
    });
    place_on(&mut dataset, &node.config.node_name);
    apply(&client, &ns.name, &dataset).await?;
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), &ns.name);
    let ds = eventually("the feedback Dataset to succeed", RUN, || async {
        let d = datasets.get("from-feedback").await?;
        let c = d.status.clone().map(|s| s.common.conditions).unwrap_or_default();
        if let Some(f) = condition(&c, "Failed").filter(|c| c.status == "True") {
            bail!("the feedback Dataset failed: {}: {}", f.reason, f.message);
        }
        Ok(condition(&c, "Succeeded").is_some_and(|c| c.status == "True").then_some(d))
    })
    .await?;
    let records = ds.status.as_ref().and_then(|s| s.records.clone()).context("record counts")?;
    assert_eq!(records.output, 1, "{records:?}");

    // Live figures from the serving pod reach the status.
    let live = eventually("live figures in status", WAIT, || async {
        let md = get_md(&mds, "assistant").await?;
        Ok(md.status.and_then(|s| s.metrics).filter(|m| m.requests_per_second.is_some_and(|r| r > 0.0)))
    })
    .await?;
    assert_eq!(live.feedback_count, Some(1), "{live:?}");
    assert_eq!(live.feedback_score, Some(5.0), "{live:?}");
    assert!(live.time_to_first_token_ms.is_some_and(|t| t > 0.0), "{live:?}");
    // The pod's own metrics carry its deployment and revision, for dashboards.
    let text = reqwest::get(format!("{}/metrics", endpoint.trim_end_matches("/v1"))).await?.text().await?;
    let labels = format!("deployment=\"assistant\",revision=\"{revision}\"");
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(value("llmops_worker_feedback_score_total"), Some(5.0), "{text}");
    assert!(value("llmops_worker_request_duration_seconds_count").is_some_and(|n| n >= 1.0), "{text}");

    // kubectl scale goes through the scale subresource: two ready serving pods.
    kubectl(&["-n", &ns.name, "scale", "modeldeployment/assistant", "--replicas", "2"])?;
    let scaled = eventually("two ready replicas", RUN, || async {
        let md = get_md(&mds, "assistant").await?;
        Ok((md.status.as_ref().and_then(|s| s.ready_replicas) == Some(2)).then_some(md))
    })
    .await
    .with_context(|| logs_of(&node))?;
    assert_eq!(scaled.status.as_ref().and_then(|s| s.replicas_summary.clone()).as_deref(), Some("2/2"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let serving = pods.list(&ListParams::default().labels(&format!("llmops.dev/revision={revision}"))).await?.items;
    let ips: std::collections::BTreeSet<String> =
        serving.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
    assert_eq!(ips.len(), 2, "two pods with their own addresses: {ips:?}");
    let scale = kubectl(&[
        "-n",
        &ns.name,
        "get",
        "--raw",
        &format!("/apis/llmops.dev/v1alpha1/namespaces/{}/modeldeployments/assistant/scale", ns.name),
    ])?;
    let scale: Value = serde_json::from_str(&scale)?;
    assert_eq!(scale["status"]["replicas"], json!(2), "{scale}");

    // autoscaling yields an HPA that scales the ModelDeployment itself.
    let mut autoscaled = manifest.clone();
    autoscaled["spec"]["replicas"] = json!(2);
    autoscaled["spec"]["autoscaling"] = json!({"minReplicas": 1, "maxReplicas": 3, "targetCpuUtilization": 60});
    apply(&client, &ns.name, &autoscaled).await?;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns.name);
    let hpa = eventually("the HPA", WAIT, || async { Ok(hpas.get_opt("assistant").await?) }).await?;
    let target = hpa.spec.context("spec")?.scale_target_ref;
    assert_eq!((target.kind.as_str(), target.name.as_str()), ("ModelDeployment", "assistant"));
    assert_eq!(target.api_version.as_deref(), Some("llmops.dev/v1alpha1"));

    mds.delete("assistant", &DeleteParams::background()).await?;
    node.stop().await?;
    op.stop().await;
    Ok(())
}

/// A gated deployment: the chat prompt of each revision and the gate's questions.
fn gated_manifest(node: &DevNode, prompt: &str, expected_city: &str) -> Value {
    let mut md = deployment_manifest("gated", node);
    md["spec"]["prompt"] = json!({"name": prompt});
    md["spec"]["promotion"] = json!({"gate": {
        "dataset": {"name": "capitals", "split": "test"},
        "metrics": ["contains"],
        "thresholds": [{"metric": "contains", "min": 0.5}],
        "maxErrorFraction": 0.0,
    }});
    if expected_city != "Paris" {
        // A gate that cannot pass: the answers it expects are wrong.
        md["spec"]["promotion"]["gate"]["dataset"]["name"] =
            json!(format!("capitals-{}", expected_city.to_lowercase()));
    }
    md
}

fn capitals(name: &str, city: &str, node: &DevNode) -> Value {
    let mut ds = json!({
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name},
        "spec": {
            "source": {"inline": [
                {"question": "What is the capital of France?", "answer": city},
                {"question": "Which city is the capital of France?", "answer": city},
            ]},
            "schema": "completion",
            "mapping": {"prompt": "question", "completion": "answer"},
            "split": {"train": 0.0, "validation": 0.0, "test": 1.0, "seed": 1},
        },
    });
    place_on(&mut ds, &node.config.node_name);
    ds
}

fn prompt(name: &str, system: &str) -> Value {
    json!({
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "PromptVersion",
        "metadata": {"name": name},
        "spec": {"prompt": "assistant", "messages": [{"role": "system", "content": system}]},
    })
}

async fn deployment_revision(api: &Api<Deployment>, name: &str) -> Result<Option<String>> {
    Ok(api.get_opt(name).await?.and_then(|d| d.spec?.template.metadata?.labels?.get("llmops.dev/revision").cloned()))
}

#[tokio::test]
async fn a_gate_keeps_the_serving_revision_until_its_eval_passes_and_for_good_when_it_fails() -> Result<()> {
    let _turn = TURN.lock().await;
    let (client, ns) = namespace_with_crds("md-gate").await?;
    let (op, metrics, _store) = operator(&client, &ns.name).await?;
    let node = dev_node(&client, &ns.name).await?;
    for m in [
        capitals("capitals", "Paris", &node),
        capitals("capitals-berlin", "Berlin", &node),
        prompt("helpful", "You are a helpful assistant."),
        prompt("concise", "You are a helpful assistant. Answer in one short sentence."),
        prompt("terse", "You are a terse assistant."),
    ] {
        apply(&client, &ns.name, &m).await?;
    }
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let runs: Api<EvalRun> = Api::namespaced(client.clone(), &ns.name);

    // The first revision serves only once its gate passed.
    apply(&client, &ns.name, &gated_manifest(&node, "helpful", "Paris")).await?;
    let evaluating = eventually("the first gate", WAIT, || async {
        let md = get_md(&mds, "gated").await?;
        Ok(md.status.clone().and_then(|s| s.gate).map(|g| (md, g)))
    })
    .await?;
    let rev1 = evaluating.1.revision.clone();
    if evaluating.1.verdict == "Pending" {
        assert!(deployment_revision(&deployments, "gated").await?.is_none(), "nothing serves before the gate passes");
        assert_eq!(kstatus(&evaluating.0)?, "InProgress");
    }
    let md = ready_md(&mds, "gated", || logs_of(&node)).await?;
    assert_eq!(md.status.as_ref().and_then(|s| s.serving_revision.clone()), Some(rev1.clone()));
    let gate_run = runs.get(&evaluating.1.eval_run).await?;
    let run_status = gate_run.status.clone().context("the gate's status")?;
    assert_eq!(run_status.passed, Some(true), "{:?}", run_status.metrics);
    assert!(gate_run.spec.target.model.is_some() && gate_run.spec.target.model_deployment.is_none());

    // A new prompt is a new revision: the old one serves until its gate passes.
    apply(&client, &ns.name, &gated_manifest(&node, "concise", "Paris")).await?;
    let candidate = eventually("the second revision's gate", WAIT, || async {
        let s = get_md(&mds, "gated").await?.status.unwrap_or_default();
        Ok(s.gate.filter(|g| g.revision != rev1))
    })
    .await?;
    let rev2 = candidate.revision.clone();
    if candidate.verdict == "Pending" {
        assert_eq!(deployment_revision(&deployments, "gated").await?, Some(rev1.clone()), "the old revision serves");
    }
    eventually("the second revision to serve", RUN, || async {
        let md = get_md(&mds, "gated").await?;
        let s = md.status.clone().unwrap_or_default();
        if s.gate.as_ref().is_some_and(|g| g.verdict == "Failed") {
            bail!("the second gate failed: {:?}\n{}", s.gate, logs_of(&node));
        }
        let serving = s.serving_revision.as_deref() == Some(rev2.as_str()) && is_true(&md, "Ready");
        Ok((serving && deployment_revision(&deployments, "gated").await?.as_deref() == Some(rev2.as_str()))
            .then_some(()))
    })
    .await?;

    let gate = get_md(&mds, "gated").await?.status.and_then(|s| s.gate).context("the serving revision's gate")?;
    assert_eq!((gate.revision.as_str(), gate.verdict.as_str()), (rev2.as_str(), "Passed"), "{gate:?}");

    // A revision whose gate fails is refused for good: the serving one stays.
    apply(&client, &ns.name, &gated_manifest(&node, "terse", "Berlin")).await?;
    let failed = eventually("the third gate to fail", RUN, || async {
        let md = get_md(&mds, "gated").await?;
        let s = md.status.clone().unwrap_or_default();
        Ok(s.gate.clone().filter(|g| g.revision != rev2 && g.verdict == "Failed").map(|g| (md, g)))
    })
    .await?;
    let (md, gate) = failed;
    let s = md.status.clone().context("status")?;
    assert_eq!(s.serving_revision.as_deref(), Some(rev2.as_str()));
    assert_eq!(s.candidate_revision.as_deref(), Some(gate.revision.as_str()));
    assert_eq!(deployment_revision(&deployments, "gated").await?.as_deref(), Some(rev2.as_str()));
    let progressing = condition(&s.common.conditions, "Progressing").context("Progressing")?;
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("False", "GateFailed"));
    assert!(progressing.message.contains(&rev2), "{}", progressing.message);
    assert!(is_true(&md, "Ready"), "the serving revision still serves");
    assert_eq!(kstatus(&md)?, "Failed", "a refused revision reads as failed to GitOps tools");
    // Each gate's verdict and figures are operator metrics, per EvalRun.
    let text = scrape(&metrics).await?;
    let run = format!("namespace=\"{}\",name=\"{}\"", ns.name, gate.eval_run);
    let passed = text.lines().find(|l| l.starts_with("llmops_operator_evalrun_passed{") && l.contains(&run));
    assert_eq!(passed.and_then(|l| l.rsplit(' ').next()), Some("0.0"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("llmops_operator_evalrun_metric{")
            && l.contains(&run)
            && l.contains("metric=\"contains\"")),
        "{text}"
    );
    let endpoint = s.endpoint.clone().context("endpoint")?;
    let (code, body) = chat(&endpoint, "gated", None, "Hello").await?;
    assert_eq!(code, 200, "{body}");

    mds.delete("gated", &DeleteParams::background()).await?;
    node.stop().await?;
    op.stop().await;
    Ok(())
}
