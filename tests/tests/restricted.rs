//! Every kind runs in a namespace that enforces the `restricted` Pod Security Standard
//! (the apiserver's PodSecurity admission refuses any pod that runs as root, may
//! escalate privileges, keeps capabilities, lacks a seccomp profile, or mounts a
//! hostPath). The store is the S3-compatible test server, since restricted pods cannot
//! mount a node directory; the development node runs the pods.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use llmops_crds::{Dataset, EvalRun, FineTuneJob, ModelDeployment};
use llmops_tests::dev_node::{DevNode, DevNodeConfig, place_on};
use llmops_tests::s3::S3Server;
use llmops_tests::{Operator, apply, example, namespace_with_crds, until_condition};
use object_store::ObjectStoreExt;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(180);
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[tokio::test]
async fn every_kind_runs_in_a_namespace_that_enforces_the_restricted_standard() -> Result<()> {
    let (client, ns) = namespace_with_crds("restricted").await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }}});
    namespaces.patch(&ns.name, &PatchParams::default(), &Patch::Merge(&labels)).await?;

    // Admission really enforces it: a plain pod is refused.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let plain: Pod = serde_json::from_value(json!({
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "none"}]},
    }))?;
    let refused = pods.create(&PostParams::default(), &plain).await.expect_err("a plain pod must be refused");
    assert!(refused.to_string().contains("PodSecurity"), "{refused}");

    // The store: a bucket, with the worker pods' credentials in a Secret.
    let s3 = S3Server::start().await?;
    s3.create_bucket("artifacts").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let creds: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
    }))?;
    secrets.create(&PostParams::default(), &creds).await?;
    let bucket = s3.bucket("artifacts")?;
    let model = llmops_tests::test_model()?;
    let smol = llmops_worker::engine::load(&model, &candle_core::Device::Cpu, Default::default())?;
    let tiny = std::env::temp_dir().join(format!("llmops-tiny-{}", ns.name));
    llmops_worker::engine::tiny::write_tiny_llama(&tiny, &smol, 3)?;
    for entry in std::fs::read_dir(&tiny)? {
        let entry = entry?;
        let key = format!("llmops/{}/imports/tiny/{}", ns.name, entry.file_name().to_string_lossy());
        bucket.put(&key.as_str().into(), std::fs::read(entry.path())?.into()).await?;
    }
    let key = format!("llmops/{}/imports/{MODEL_FILE}", ns.name);
    bucket.put(&key.as_str().into(), std::fs::read(&model)?.into()).await?;

    let op = Operator::start_configured(&client, &ns.name, |c| {
        let mut store = s3.store_config("artifacts");
        if let llmops_operator::StoreConfig::S3 { credentials_secret, .. } = &mut store {
            *credentials_secret = Some("s3-credentials".into());
        }
        c.store = store;
        c.address_by_pod_ip = true;
    })
    .await?;
    let name = format!("dev-{}", ns.name);
    let work_dir = std::env::temp_dir().join(format!("llmops-dev-node-{}", ns.name));
    let node =
        DevNode::start(client.clone(), DevNodeConfig::new(name, llmops_tests::worker_binary()?, work_dir)).await?;

    let ns_key = |k: &str| format!("store://imports/{k}");
    let mut dataset = example("dataset.yaml")?;
    let mut tune = example("finetunejob.yaml")?;
    tune["spec"]["model"] = json!({"uri": ns_key("tiny/"), "format": "hf"});
    tune["spec"]["hyperparameters"] =
        json!({"epochs": 100, "maxSteps": 3, "batchSize": 2, "learningRate": 0.001, "maxSeqLength": 64});
    let mut eval = example("evalrun.yaml")?;
    eval["spec"]["target"]["model"] = json!({"uri": ns_key("tiny/"), "format": "hf"});
    eval["spec"]["metrics"] = json!(["perplexity"]);
    eval["spec"]["thresholds"] = json!([]);
    eval["spec"].as_object_mut().context("spec")?.remove("baseline");
    let mut md = json!({
        "apiVersion": "llmops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "restricted"},
        "spec": {"model": {"uri": ns_key(MODEL_FILE)}, "replicas": 1},
    });
    for m in [&mut dataset, &mut tune, &mut eval, &mut md] {
        place_on(m, &node.config.node_name);
    }
    for m in [&dataset, &example("promptversion.yaml")?, &tune, &eval, &md] {
        apply(&client, &ns.name, m).await?;
    }

    until_condition(&Api::<Dataset>::namespaced(client.clone(), &ns.name), "acme-facts", "Succeeded", WAIT).await?;
    until_condition(&Api::<FineTuneJob>::namespaced(client.clone(), &ns.name), "acme-facts-lora", "Succeeded", WAIT)
        .await?;
    until_condition(&Api::<EvalRun>::namespaced(client.clone(), &ns.name), "acme-facts-lora-eval", "Succeeded", WAIT)
        .await?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    until_condition(&mds, "restricted", "Ready", WAIT).await?;

    // Every pod the operator made (the resolver's too) passed admission and ran here.
    let made = pods.list(&ListParams::default().labels("llmops.dev/worker=true")).await?.items;
    let mut kinds: Vec<String> = made.iter().filter_map(|p| p.labels().get("llmops.dev/kind").cloned()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds, ["Dataset", "EvalRun", "FineTuneJob", "ModelDeployment", "ModelResolution"], "{kinds:?}");
    for pod in &made {
        let spec = pod.spec.clone().context("spec")?;
        let psc = spec.security_context.clone().context("pod securityContext")?;
        assert_eq!(psc.run_as_non_root, Some(true), "{}", pod.name_any());
        assert!(spec.volumes.iter().flatten().all(|v| v.host_path.is_none()), "{}: no hostPath", pod.name_any());
        let c = spec.containers[0].security_context.clone().context("container securityContext")?;
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(c.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]));
        assert!(ran(pod), "{} did not run: {:?}", pod.name_any(), pod.status.as_ref().map(|s| s.phase.clone()));
    }

    node.stop().await?;
    op.stop().await;
    Ok(())
}

/// A pod that ran: Succeeded, or Running (a server).
fn ran(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Running"))
}
