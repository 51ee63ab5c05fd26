//! The chart, installed for real: `helm install` of charts/llmops on the local control
//! plane, the operator's pod run by the development node (its command as a local
//! process, with exactly the chart's ServiceAccount token), a full pipeline reconciled by
//! it, and the apiserver's audit log read back: the ServiceAccount was never refused, and
//! the chart grants nothing the pipeline did not use (beyond the few rules named below,
//! each with the code path that needs it and the reason this pipeline cannot provoke it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use llmops_crds::{Dataset, EvalRun, FineTuneJob, ModelDeployment};
use llmops_tests::dev_node::{DevNode, DevNodeConfig, NODE_LABEL, NODE_TAINT, place_on};
use llmops_tests::{TestNamespace, apply, eventually, example, namespace_with_crds, repo_root, until_condition};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(240);
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Grants the pipeline below cannot use, with why the operator still needs them:
/// (namespace scope: "watched" or "release", apiGroup, resource, verb).
const NOT_PROVOKED: &[(&str, &str, &str, &str, &str)] = &[
    ("watched", "events.k8s.io", "events", "patch", "an event that recurs is patched (its series), not re-created"),
    (
        "release",
        "",
        "configmaps",
        "delete",
        "a failed model resolution is retried 2 minutes later by deleting its record",
    ),
    (
        "release",
        "",
        "secrets",
        "patch",
        "the generated gateway certificate is replaced only when --gateway-address changes",
    ),
];

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The logs the development node kept of a namespace's pods (`<ns>_<pod>/log`).
fn pod_logs(node_dir: &std::path::Path, namespace: &str) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir(node_dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{namespace}_")) {
            let log = std::fs::read_to_string(entry.path().join("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("--- {name}\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
    }
    out
}

/// (apiGroup, resource[/subresource], verb).
type Access = (String, String, String);

/// Every access a rule grants.
fn grants(rules: &[PolicyRule]) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn the_chart_installs_an_operator_that_runs_the_pipeline_with_exactly_the_rights_it_grants() -> Result<()> {
    let (client, ns) = namespace_with_crds("install").await?;
    let release_ns = TestNamespace::create(&client, "install-system").await?;
    let node_name = format!("dev-{}", ns.name);
    let work = std::env::temp_dir().join(format!("llmops-install-{}", ns.name));
    let store = work.join("store");
    std::fs::create_dir_all(store.join(&ns.name).join("imports"))?;
    let model = llmops_tests::test_model()?;
    std::fs::copy(&model, store.join(&ns.name).join("imports").join(MODEL_FILE))?;
    let smol = llmops_worker::engine::load(&model, &candle_core::Device::Cpu, Default::default())?;
    llmops_worker::engine::tiny::write_tiny_llama(&store.join(&ns.name).join("imports/tiny"), &smol, 3)?;

    // The development node runs the operator's container (image llmops-operator) as the
    // operator binary of this build, with the pod's service account token.
    let mut config = DevNodeConfig::new(node_name.clone(), llmops_tests::worker_binary()?, work.join("node"));
    config.binaries.insert("llmops-operator".into(), llmops_tests::operator_binary()?);
    config.apiserver = Some(llmops_tests::apiserver()?);
    let node = DevNode::start(client.clone(), config).await?;

    let (gateway, metrics) = (free_port()?, free_port()?);
    let placement = json!({NODE_LABEL: "true", "kubernetes.io/hostname": node_name});
    let values = json!({
        "watchNamespaces": [ns.name],
        "store": {"type": "hostPath", "mountPath": store, "hostPath": {"path": store}},
        "gateway": {"port": gateway, "advertisedAddress": format!("127.0.0.1:{gateway}")},
        "metrics": {"port": metrics},
        "operator": {
            "addressByPodIp": true,
            "progressInterval": "500ms",
            "modelResolver": {"nodeSelector": placement, "tolerateTaints": [NODE_TAINT]},
        },
        "nodeSelector": placement,
        "tolerations": [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
    });
    let values_file = work.join("values.yaml");
    std::fs::write(&values_file, serde_yaml_ng::to_string(&values)?)?;
    let kubeconfig = llmops_tests::kubeconfig()?;
    let out = std::process::Command::new(llmops_tests::helm_binary()?)
        .args(["install", "llmops"])
        .arg(repo_root().join("charts/llmops"))
        .args(["--namespace", &release_ns.name, "--skip-crds", "--values"])
        .arg(&values_file)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()?;
    if !out.status.success() {
        bail!("helm install failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    // The operator's pod runs here and becomes ready (its /readyz).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &release_ns.name);
    let operator_pod = eventually("the operator pod to be ready", WAIT, || async {
        let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=llmops")).await?.items;
        Ok(list.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        }))
    })
    .await
    .with_context(|| pod_logs(&work.join("node"), &release_ns.name))?;
    let sa = operator_pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).context("service account")?;
    let username = format!("system:serviceaccount:{}:{sa}", release_ns.name);

    // A full pipeline, and a deployment's second revision (and autoscaling removed), so
    // that the garbage a controller collects exists.
    let mut dataset = example("dataset.yaml")?;
    let mut tune = example("finetunejob.yaml")?;
    tune["spec"]["model"] = json!({"uri": "store://imports/tiny/", "format": "hf"});
    tune["spec"]["hyperparameters"] =
        json!({"epochs": 100, "maxSteps": 3, "batchSize": 2, "learningRate": 0.001, "maxSeqLength": 64});
    let mut eval = example("evalrun.yaml")?;
    eval["spec"]["target"]["model"] = json!({"uri": "store://imports/tiny/", "format": "hf"});
    eval["spec"]["metrics"] = json!(["perplexity"]);
    eval["spec"]["thresholds"] = json!([]);
    eval["spec"]["sampleLimit"] = json!(4);
    let mut md = json!({
        "apiVersion": "llmops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "chat"},
        "spec": {
            "model": {"uri": format!("store://imports/{MODEL_FILE}")},
            "prompt": {"name": "acme-support-v1"},
            "replicas": 1,
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targetCpuUtilization": 80},
            "promotion": {"gate": {"dataset": {"name": "acme-facts", "split": "train"}, "metrics": ["contains"],
                                   "sampleLimit": 4, "generation": {"maxTokens": 8},
                                   "thresholds": [{"metric": "contains", "min": 0.0}]}},
        },
    });
    for m in [&mut dataset, &mut tune, &mut eval, &mut md] {
        place_on(m, &node_name);
    }
    for m in [&dataset, &example("promptversion.yaml")?, &tune, &eval, &md] {
        apply(&client, &ns.name, m).await?;
    }
    until_condition(&Api::<Dataset>::namespaced(client.clone(), &ns.name), "acme-facts", "Succeeded", WAIT).await?;
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns.name);
    until_condition(&tunes, "acme-facts-lora", "Succeeded", WAIT).await?;
    until_condition(&Api::<EvalRun>::namespaced(client.clone(), &ns.name), "acme-facts-lora-eval", "Succeeded", WAIT)
        .await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let first = until_condition(&mds, "chat", "Ready", WAIT).await?;
    let first_revision = first.status.and_then(|s| s.serving_revision).context("serving revision")?;
    // An evaluation of the deployment's endpoint.
    let mut of_endpoint = example("evalrun.yaml")?;
    of_endpoint["metadata"]["name"] = json!("of-endpoint");
    of_endpoint["spec"]["target"] = json!({"modelDeployment": "chat"});
    of_endpoint["spec"]["metrics"] = json!(["contains"]);
    of_endpoint["spec"]["thresholds"] = json!([]);
    of_endpoint["spec"]["sampleLimit"] = json!(4);
    of_endpoint["spec"]["generation"] = json!({"maxTokens": 8, "temperature": 0.0});
    place_on(&mut of_endpoint, &node_name);
    apply(&client, &ns.name, &of_endpoint).await?;
    until_condition(&Api::<EvalRun>::namespaced(client.clone(), &ns.name), "of-endpoint", "Succeeded", WAIT).await?;
    let change = json!({"spec": {"serving": {"maxBatchSize": 2}, "autoscaling": null}});
    mds.patch("chat", &PatchParams::default(), &Patch::Merge(&change)).await?;
    eventually("the second revision to serve", WAIT, || async {
        let s = mds.get("chat").await?.status.unwrap_or_default();
        let serving = s.serving_revision.clone().unwrap_or_default();
        let ready = s.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        Ok((ready && !serving.is_empty() && serving != first_revision).then_some(()))
    })
    .await?;
    tunes.delete("acme-facts-lora", &Default::default()).await?;
    eventually("the FineTuneJob to go through its finalizer", WAIT, || async {
        Ok(tunes.get_opt("acme-facts-lora").await?.is_none().then_some(()))
    })
    .await?;

    // What the ServiceAccount did, from the audit log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let audit = kubeconfig.parent().context("cluster dir")?.join("logs/audit.log");
    let text = std::fs::read_to_string(&audit).with_context(|| format!("reading {}", audit.display()))?;
    let mut used: BTreeMap<String, BTreeSet<Access>> = BTreeMap::new();
    let mut forbidden = Vec::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else { continue };
        if e["user"]["username"] != username.as_str() || e["objectRef"].is_null() {
            continue;
        }
        let o = &e["objectRef"];
        let code = e["responseStatus"]["code"].as_i64().unwrap_or(0);
        if code == 403 {
            forbidden.push(line.to_string());
        }
        let resource = match o["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", o["resource"].as_str().unwrap_or_default()),
            None => o["resource"].as_str().unwrap_or_default().to_string(),
        };
        let scope = o["namespace"].as_str().unwrap_or_default().to_string();
        let verb = e["verb"].as_str().unwrap_or_default().to_string();
        let group = o["apiGroup"].as_str().unwrap_or_default().to_string();
        let entry = used.entry(scope).or_default();
        // A server-side apply that makes the object is a patch answered 201: it needed create too.
        if verb == "patch" && code == 201 {
            entry.insert((group.clone(), resource.clone(), "create".into()));
        }
        entry.insert((group, resource, verb));
    }
    assert!(forbidden.is_empty(), "the chart's ServiceAccount was refused:\n{}", forbidden.join("\n"));
    assert!(!used.is_empty(), "no audit events of {username} in {}", audit.display());

    // Every grant of the release's Roles (and ClusterRole) was used in its scope.
    let selector = ListParams::default().labels("app.kubernetes.io/instance=llmops");
    let mut scoped: Vec<(String, String, BTreeSet<Access>)> = Vec::new();
    for namespace in [&ns.name, &release_ns.name] {
        let roles: Api<Role> = Api::namespaced(client.clone(), namespace);
        for role in roles.list(&selector).await?.items {
            let label = if *namespace == ns.name { "watched" } else { "release" };
            scoped.push((namespace.clone(), label.into(), grants(&role.rules.unwrap_or_default())));
        }
    }
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let ours =
        |r: &ClusterRole| r.annotations().get("meta.helm.sh/release-namespace").is_some_and(|n| *n == release_ns.name);
    assert!(
        !cluster_roles.list(&ListParams::default()).await?.items.iter().any(ours),
        "with watchNamespaces set, the chart makes no ClusterRole"
    );
    assert!(scoped.len() >= 2, "a Role in the watched and in the release namespace: {scoped:?}");
    let mut unused = Vec::new();
    for (namespace, label, granted) in &scoped {
        let used_here = used.get(namespace).cloned().unwrap_or_default();
        for (group, resource, verb) in granted {
            let excused =
                NOT_PROVOKED.iter().any(|(l, g, r, v, _)| l == label && g == group && r == resource && v == verb);
            let was_used = used_here.contains(&(group.clone(), resource.clone(), verb.clone()));
            if !was_used && !excused {
                unused.push(format!("{label} namespace: {verb} {group}/{resource}"));
            }
            if !was_used && excused {
                eprintln!("not provoked by this pipeline (excused): {label} namespace: {verb} {group}/{resource}");
            }
        }
    }
    assert!(unused.is_empty(), "the chart grants rules the pipeline never used:\n{}", unused.join("\n"));

    let out = std::process::Command::new(llmops_tests::helm_binary()?)
        .args(["uninstall", "llmops", "--namespace", &release_ns.name, "--kubeconfig"])
        .arg(&kubeconfig)
        .output()?;
    assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    node.stop().await?;
    Ok(())
}
