//! The pure steps of the ModelDeployment controller, from a YAML fixture: revisions, the
//! serve Assignment, the owned objects, the gate's verdict and the live figures.

use std::collections::HashMap;

use llmops_crds::{EvalRunStatus, ModelDeployment};
use llmops_proto::v1;

use super::*;
use crate::config::{Config, StoreConfig, StoreVolume};

fn md() -> ModelDeployment {
    serde_yaml_ng::from_str(include_str!("../../../tests/fixtures/modeldeployment.yaml")).expect("fixture")
}

fn key() -> WorkloadKey {
    WorkloadKey::of(&md()).expect("key")
}

fn config() -> Config {
    let mut c = Config::new("127.0.0.1:9090".parse().expect("addr"), "gw.llmops:9090");
    c.store = StoreConfig::Local { mount_path: "/store".into(), volume: StoreVolume::Pvc("llmops-store".into()) };
    c
}

fn resolved() -> ResolvedServing {
    ResolvedServing {
        model: v1::Model {
            weights: Some(v1::Artifact { uri: "store://imports/m.gguf".into(), sha256: "a".repeat(64) }),
            format: "gguf".into(),
            dtype: "auto".into(),
        },
        adapters: vec![(
            "support-lora".into(),
            v1::Artifact { uri: "store://team-a/finetunejob/support-tune/u/output/".into(), sha256: "b".repeat(64) },
        )],
        prompt: Some(v1::Prompt { name: "support-v1".into(), sha256: "c".repeat(64), ..Default::default() }),
    }
}

#[test]
fn the_revision_follows_digests_and_serving_settings_not_replicas() {
    let m = md();
    let r = resolved();
    let base = assignment::revision(&m.spec, &r);
    assert_eq!(base.len(), 10);
    assert_eq!(base, assignment::revision(&m.spec, &r), "stable");
    let mut other_prompt = r.clone();
    other_prompt.prompt.as_mut().expect("prompt").sha256 = "d".repeat(64);
    assert_ne!(base, assignment::revision(&m.spec, &other_prompt));
    let mut other_adapter = r.clone();
    other_adapter.adapters[0].1.sha256 = "e".repeat(64);
    assert_ne!(base, assignment::revision(&m.spec, &other_adapter));
    let mut settings = m.clone();
    settings.spec.serving.max_batch_size = 8;
    assert_ne!(base, assignment::revision(&settings.spec, &r));
    let mut scaled = m.clone();
    scaled.spec.replicas = Some(5);
    scaled.spec.resources = None;
    assert_eq!(base, assignment::revision(&scaled.spec, &r), "replicas and resources change pods, not the revision");
}

#[test]
fn the_serve_assignment_names_the_revision_traffic_log_and_keys() {
    let m = md();
    let rev = assignment::revision(&m.spec, &resolved());
    let a = assignment::serve(&key(), &config().store, &m.spec, &resolved(), Some(API_KEYS_DIR.into()), &rev)
        .expect("valid");
    let Some(v1::assignment::Mode::Serve(s)) = &a.mode else { panic!("serve mode") };
    assert_eq!(s.revision, rev);
    assert_eq!(s.model_name, "support");
    assert_eq!(s.adapters[0].name, "support-lora");
    assert_eq!(s.api_keys_file, API_KEYS_DIR);
    let traffic = s.traffic.as_ref().expect("traffic");
    assert_eq!(traffic.uri, "store://team-a/modeldeployment/support/traffic/");
    assert!(traffic.record);
    assert_eq!(s.serving.as_ref().map(|x| (x.port, x.max_batch_size)), Some((SERVING_PORT, 4)));
}

#[test]
fn the_deployment_runs_the_revision_from_its_config_map_and_probes_readyz() {
    let m = md();
    let k = key();
    let owner = owner_reference(&m).expect("owner");
    let d = build_deployment(&config(), &m, &k, &owner, "abc123", "support-token");
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.selector.match_labels, Some(selector(&k)));
    let template = spec.template;
    let labels = template.metadata.and_then(|m| m.labels).expect("labels");
    assert_eq!(labels.get(REVISION_LABEL).map(String::as_str), Some("abc123"));
    assert_eq!(labels.get(crate::workload::UID_LABEL), Some(&k.uid));
    let pod = template.spec.expect("pod");
    assert_eq!(pod.restart_policy.as_deref(), Some("Always"));
    assert_eq!(pod.node_selector.as_ref().and_then(|n| n.get("pool")).map(String::as_str), Some("cpu"));
    let c = &pod.containers[0];
    assert_eq!(c.command.as_deref(), Some(&["llmops-worker".to_string(), "agent".to_string()][..]));
    let env: HashMap<_, _> =
        c.env.iter().flatten().map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default())).collect();
    assert_eq!(env["LLMOPS_ASSIGNMENT_FILE"], "/etc/llmops/assignment/assignment.json");
    assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], "void");
    assert_eq!(env["LLMOPS_WORKLOAD"], k.to_string());
    let probe = c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    assert_eq!(c.ports.as_ref().map(|p| p[0].container_port), Some(SERVING_PORT as i32));
    let requests = c.resources.as_ref().and_then(|r| r.requests.clone()).expect("requests");
    assert_eq!(requests["cpu"].0, "250m");
    let volumes = pod.volumes.expect("volumes");
    let cm = volumes.iter().find_map(|v| v.config_map.as_ref()).expect("assignment volume");
    assert_eq!(cm.name, revision_config_map("support", "abc123"));
    let keys = volumes.iter().find_map(|v| v.projected.as_ref()).expect("api keys volume");
    let names: Vec<_> =
        keys.sources.iter().flatten().filter_map(|s| s.secret.as_ref()).map(|s| s.name.clone()).collect();
    assert_eq!(names, vec!["support-keys".to_string(), operator_key_secret("support")]);
}

#[test]
fn service_hpa_and_config_map_are_owned_and_target_the_deployment() {
    let m = md();
    let k = key();
    let owner = owner_reference(&m).expect("owner");
    let svc = build_service(&k, &owner);
    let port = &svc.spec.as_ref().and_then(|s| s.ports.clone()).expect("ports")[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("http"), SERVING_PORT as i32));
    let hpa = build_hpa(&m, &k, &owner).expect("autoscaling");
    let spec = hpa.spec.expect("spec");
    assert_eq!(spec.scale_target_ref.kind, "ModelDeployment");
    assert_eq!(spec.scale_target_ref.api_version.as_deref(), Some("llmops.dev/v1alpha1"));
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 4));
    let metrics = spec.metrics.expect("metrics");
    assert_eq!(metrics[0].resource.as_ref().map(|r| r.name.as_str()), Some("cpu"));
    assert_eq!(metrics[1].pods.as_ref().map(|p| p.metric.name.as_str()), Some("llmops_worker_queue_depth"));
    let mut fixed = m.clone();
    fixed.spec.autoscaling = None;
    assert!(build_hpa(&fixed, &k, &owner).is_none());
    let a = v1::Assignment::default();
    let cm = build_config_map(&k, &owner, "abc123", &a, &ServedLineage::default()).expect("config map");
    assert_eq!(cm.metadata.owner_references.expect("owner")[0].uid, k.uid);
    assert!(cm.data.expect("data").contains_key("assignment.json"));
}

#[test]
fn the_gate_evaluates_the_candidate_model_itself() {
    let m = md();
    let k = key();
    let owner = owner_reference(&m).expect("owner");
    let gate = build_gate(&m, &k, &owner, "abc123", &resolved()).expect("a gate");
    let promotion = m.spec.promotion.clone().expect("promotion");
    assert_eq!(gate.metadata.name.as_deref(), Some(gate_name("support", "abc123", &promotion).as_str()));
    let mut stricter = promotion.clone();
    stricter.gate.thresholds[0].min = Some(0.9);
    assert_ne!(gate_name("support", "abc123", &promotion), gate_name("support", "abc123", &stricter));
    assert_eq!(gate.labels().get(REVISION_LABEL).map(String::as_str), Some("abc123"));
    let t = &gate.spec.target;
    assert!(t.model_deployment.is_none() && t.endpoint.is_none(), "not the serving endpoint");
    let model = t.model.as_ref().expect("model");
    assert_eq!(model.uri.as_deref(), Some("store://imports/m.gguf"));
    assert_eq!(model.sha256.as_deref(), Some("a".repeat(64).as_str()));
    let adapter = t.adapter.as_ref().expect("the gate names the adapter");
    assert_eq!(adapter.fine_tune_job.as_deref(), Some("support-tune"), "by its FineTuneJob, as the deployment does");
    let mut by_uri = m.clone();
    by_uri.spec.adapters[0].source =
        AdapterSource { uri: Some("store://adapters/x/".into()), fine_tune_job: None, sha256: None };
    let gate = build_gate(&by_uri, &k, &owner, "abc123", &resolved()).expect("a gate");
    let adapter = gate.spec.target.adapter.expect("the gate names the adapter");
    assert_eq!(adapter.sha256.as_deref(), Some("b".repeat(64).as_str()), "a URI adapter is pinned to its digest");
    assert_eq!(gate.spec.evaluation.prompt.as_ref().map(|p| p.name.as_str()), Some("support-v1"));
    let mut ungated = m.clone();
    ungated.spec.promotion = None;
    assert!(build_gate(&ungated, &k, &owner, "abc123", &resolved()).is_none());
}

fn run(revision: &str, conds: &[(&str, bool, &str)]) -> EvalRun {
    let spec: EvalRunSpec =
        serde_yaml_ng::from_str("target: {model: {uri: 'store://m.gguf'}}\ndataset: {name: d}\nmetrics: [contains]\n")
            .expect("spec");
    let mut run = EvalRun::new("g", spec);
    run.metadata.labels = Some(BTreeMap::from([(REVISION_LABEL.to_string(), revision.to_string())]));
    let mut status = EvalRunStatus::default();
    let now = conditions::now();
    for (t, v, msg) in conds {
        conditions::set(&mut status.common.conditions, t, *v, "R", *msg, None, &now);
    }
    run.status = Some(status);
    run
}

#[test]
fn only_a_passed_run_of_exactly_that_revision_promotes() {
    assert!(matches!(verdict(None, "r1"), Verdict::Pending(_)));
    let passed = run("r1", &[("Ready", true, ""), ("Succeeded", true, ""), ("Passed", true, "ok")]);
    assert_eq!(verdict(Some(&passed), "r1"), Verdict::Passed("ok".into()));
    assert!(matches!(verdict(Some(&passed), "r2"), Verdict::Pending(_)), "another revision's pass does not count");
    let below = run("r1", &[("Succeeded", true, ""), ("Passed", false, "contains = 0.2")]);
    assert_eq!(verdict(Some(&below), "r1"), Verdict::Failed("contains = 0.2".into()));
    let crashed = run("r1", &[("Failed", true, "TargetErrors")]);
    assert!(matches!(verdict(Some(&crashed), "r1"), Verdict::Failed(m) if m.contains("TargetErrors")));
    let running = run("r1", &[("Ready", false, "step 3/10")]);
    assert_eq!(verdict(Some(&running), "r1"), Verdict::Pending("step 3/10".into()));
}

fn report(pairs: &[(&str, f64)]) -> v1::Progress {
    v1::Progress { metrics: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(), ..Default::default() }
}

#[test]
fn live_figures_add_rates_and_take_the_worst_tail() {
    let a = report(&[
        ("requests_per_second", 3.0),
        ("tokens_per_second", 90.0),
        ("ttft_p50_ms", 100.0),
        ("ttft_p95_ms", 300.0),
        ("latency_p95_ms", 900.0),
        ("error_rate", 0.0),
        ("feedback_count", 2.0),
        ("feedback_sum", 9.0),
    ]);
    let b = report(&[
        ("requests_per_second", 1.0),
        ("tokens_per_second", 30.004),
        ("ttft_p50_ms", 200.0),
        ("ttft_p95_ms", 500.0),
        ("latency_p95_ms", 700.0),
        ("error_rate", 0.5),
        ("feedback_count", 2.0),
        ("feedback_sum", 3.0),
    ]);
    let m = aggregate(&[&a, &b]).expect("figures");
    assert_eq!(m.requests_per_second, Some(4.0));
    assert_eq!(m.tokens_per_second, Some(120.0));
    assert_eq!(m.time_to_first_token_ms, Some(125.0), "weighted by request rate");
    assert_eq!(m.time_to_first_token_p95_ms, Some(500.0));
    assert_eq!(m.p95_latency_ms, Some(900.0));
    assert_eq!(m.error_rate, Some(0.125));
    assert_eq!((m.feedback_score, m.feedback_count), (Some(3.0), Some(4)));
    assert!(aggregate(&[]).is_none());
    let nan = report(&[("requests_per_second", f64::NAN), ("ttft_p50_ms", f64::INFINITY)]);
    let m = aggregate(&[&nan]).expect("figures");
    assert_eq!(m.requests_per_second, None, "a NaN never reads as a number");
    assert_eq!(m.time_to_first_token_ms, None);
}

#[test]
fn only_an_eval_run_this_deployment_controls_is_its_gate() {
    let md = {
        let mut md = md();
        md.metadata.uid = Some("md-uid".into());
        md
    };
    let owner = owner_reference(&md).expect("owner");
    let mut run: EvalRun = serde_json::from_value(serde_json::json!({
        "apiVersion": "llmops.dev/v1alpha1", "kind": "EvalRun", "metadata": {"name": "chat-gate-x"},
        "spec": {"target": {"modelDeployment": "chat"}, "dataset": {"name": "d", "split": "test"}, "metrics": ["contains"]}
    }))
    .expect("an EvalRun");
    assert!(!controlled_by(&run, "md-uid"), "a run without owner is a tenant's");
    run.metadata.owner_references = Some(vec![OwnerReference { controller: Some(false), ..owner.clone() }]);
    assert!(!controlled_by(&run, "md-uid"), "an owner that is not the controller");
    run.metadata.owner_references = Some(vec![OwnerReference { uid: "other".into(), ..owner.clone() }]);
    assert!(!controlled_by(&run, "md-uid"), "another deployment's");
    run.metadata.owner_references = Some(vec![owner]);
    assert!(controlled_by(&run, "md-uid"));
}
