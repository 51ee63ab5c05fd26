//! The builders, fed from the YAML fixtures in operator/tests/fixtures/ (copies of the
//! pipeline example), give Assignments that pass the protocol's validation and point at
//! the right places.

use super::*;
use crate::config::StoreVolume;
use llmops_crds::{Dataset, EvalRun, FineTuneJob, PromptVersion};
use llmops_proto::v1::{data_source, eval_target};

fn store() -> StoreConfig {
    StoreConfig::Local { mount_path: "/var/lib/llmops/store".into(), volume: StoreVolume::Pvc("store".into()) }
}

fn key(kind: &str, name: &str) -> WorkloadKey {
    WorkloadKey { namespace: "default".into(), kind: kind.into(), name: name.into(), uid: "0000-uid".into() }
}

fn dataset_artifact() -> ResolvedDataset {
    ResolvedDataset {
        name: "acme-facts".into(),
        artifact: Artifact { uri: "store://default/dataset/acme-facts/d-uid/output/".into(), sha256: "a".repeat(64) },
        splits: Some(llmops_crds::dataset::SplitCounts { train: 8, validation: 1, test: 1 }),
    }
}

#[test]
fn dataset_becomes_a_prepare_assignment() {
    let ds: Dataset = serde_yaml_ng::from_str(include_str!("../../tests/fixtures/dataset.yaml")).expect("fixture");
    let k = key("Dataset", "acme-facts");
    let a = prepare(&k, &store(), &ds.spec, &ResolvedDatasetInputs::default()).expect("builds");
    assert_eq!(a.workload.as_ref().map(|w| w.kind.as_str()), Some("Dataset"));
    let Some(Mode::Prepare(p)) = &a.mode else { panic!("prepare mode") };
    let Some(data_source::Source::Inline(inline)) = p.source.as_ref().and_then(|s| s.source.as_ref()) else {
        panic!("inline source")
    };
    assert_eq!(inline.records.len(), 10);
    assert_eq!(p.schema, "completion");
    assert_eq!(p.mapping.as_ref().map(|m| m.prompt.as_str()), Some("question"));
    assert_eq!(p.transforms.len(), 2);
    assert_eq!(p.split.as_ref().map(|s| s.train), Some(0.8));
    assert_eq!(p.output.as_ref().map(|o| o.uri.as_str()), Some("store://default/dataset/acme-facts/0000-uid/output/"));
    let Some(v1::store::Backend::Local(local)) = a.store.as_ref().and_then(|s| s.backend.as_ref()) else {
        panic!("local store")
    };
    assert_eq!(local.root, "/var/lib/llmops/store");
}

#[test]
fn finetune_reads_the_pinned_dataset_and_always_resumes() {
    let job: FineTuneJob =
        serde_yaml_ng::from_str(include_str!("../../tests/fixtures/finetunejob.yaml")).expect("fixture");
    let k = key("FineTuneJob", "acme-facts-lora");
    let model = model_source(&job.spec.model).expect("uri model");
    assert_eq!(model.format, "gguf");
    let a = finetune(&k, &store(), &job.spec, model, &dataset_artifact()).expect("builds");
    let Some(Mode::Finetune(f)) = &a.mode else { panic!("finetune mode") };
    assert_eq!(
        f.train.as_ref().map(|t| t.uri.as_str()),
        Some("store://default/dataset/acme-facts/d-uid/output/train.parquet")
    );
    assert_eq!(
        f.validation.as_ref().map(|t| t.uri.as_str()),
        Some("store://default/dataset/acme-facts/d-uid/output/validation.parquet")
    );
    let ck = f.checkpoints.as_ref().expect("checkpoints");
    assert!(ck.resume);
    assert_eq!(ck.uri, "store://default/finetunejob/acme-facts-lora/0000-uid/checkpoints/");
    assert_eq!(ck.interval_steps, 40);
    let h = f.hyperparameters.as_ref().expect("hyperparameters");
    assert_eq!((h.max_steps, h.batch_size, h.max_seq_length), (120, 4, 128));
    assert_eq!(
        f.lora.as_ref().map(|l| l.target_modules.clone()),
        Some(vec!["q_proj".into(), "k_proj".into(), "v_proj".into(), "o_proj".into()])
    );
    assert_eq!(f.method, "lora");
}

#[test]
fn finetune_without_validation_records_has_no_validation_split() {
    let job: FineTuneJob =
        serde_yaml_ng::from_str(include_str!("../../tests/fixtures/finetunejob.yaml")).expect("fixture");
    let mut ds = dataset_artifact();
    ds.splits = Some(llmops_crds::dataset::SplitCounts { train: 10, validation: 0, test: 0 });
    let a = finetune(&key("FineTuneJob", "x"), &store(), &job.spec, model_source(&job.spec.model).expect("m"), &ds)
        .expect("builds");
    let Some(Mode::Finetune(f)) = &a.mode else { panic!("finetune mode") };
    assert!(f.validation.is_none());
}

#[test]
fn evalrun_with_an_adapter_prompt_and_baseline() {
    let run: EvalRun = serde_yaml_ng::from_str(include_str!("../../tests/fixtures/evalrun.yaml")).expect("fixture");
    let pv: PromptVersion =
        serde_yaml_ng::from_str(include_str!("../../tests/fixtures/promptversion.yaml")).expect("fixture");
    let target = ResolvedTarget::Local {
        model: model_source(run.spec.target.model.as_ref().expect("model")).expect("uri"),
        adapter: Some(v1::Artifact {
            uri: "store://default/finetunejob/acme-facts-lora/f/output/".into(),
            sha256: "b".repeat(64),
        }),
    };
    let data = dataset_artifact().split(run.spec.evaluation.dataset.split);
    let p = prompt("acme-support-v1", &pv.spec, &pv.spec.digest());
    let mut spec = run.spec.clone();
    spec.evaluation.baseline = Some(llmops_crds::evalrun::Baseline { eval_run: "base".into(), max_regression: 0.01 });
    let baseline = Some(BTreeMap::from([("rougeL".to_string(), 0.4)]));
    let resolved = EvalInputs {
        target: target.clone(),
        data,
        prompt: Some(p),
        baseline_metrics: baseline,
        judge_deployment: None,
    };
    let a = eval(&key("EvalRun", "e"), &store(), &spec, resolved).expect("builds");
    let Some(Mode::Eval(e)) = &a.mode else { panic!("eval mode") };
    assert_eq!(e.metrics, vec!["contains", "tokenF1", "rougeL"]);
    assert_eq!(e.thresholds[0].min, Some(0.3));
    assert_eq!(
        e.data.as_ref().map(|d| d.uri.as_str()),
        Some("store://default/dataset/acme-facts/d-uid/output/train.parquet")
    );
    let prompt = e.prompt.as_ref().expect("prompt");
    assert_eq!(prompt.messages.len(), 2);
    assert_eq!(prompt.sha256, pv.spec.digest());
    assert_eq!(e.baseline.as_ref().map(|b| b.metrics.get("rougeL").copied()), Some(Some(0.4)));
    let Some(eval_target::Target::Local(local)) = e.target.as_ref().and_then(|t| t.target.as_ref()) else {
        panic!("local target")
    };
    assert!(local.adapter.is_some());
    // A baseline that has not resolved is waited for, not built.
    let err = eval(&key("EvalRun", "e"), &store(), &spec, inputs(target, v1::Artifact::default())).expect_err("waits");
    assert_eq!(err.reason, "WaitingForBaseline");
}

#[test]
fn endpoint_target_reads_its_api_key_from_a_file() {
    let spec: llmops_crds::EvalRunSpec = serde_yaml_ng::from_str(
        "target: {endpoint: {url: 'http://vllm:8000/v1', model: m, apiKeySecret: {name: openai}}}\n\
         dataset: {name: d}\nmetrics: [exactMatch]\n",
    )
    .expect("spec");
    let target = ResolvedTarget::Endpoint {
        url: "http://vllm:8000/v1".into(),
        model: "m".into(),
        api_key_file: crate::job::SecretFile { secret: "openai".into(), key: "api-key".into() }.path(),
        revision: String::new(),
    };
    let a = eval(&key("EvalRun", "e"), &store(), &spec, inputs(target, dataset_artifact().split(SplitName::Test)))
        .expect("builds");
    let Some(Mode::Eval(e)) = &a.mode else { panic!("eval mode") };
    let Some(eval_target::Target::Endpoint(ep)) = e.target.as_ref().and_then(|t| t.target.as_ref()) else {
        panic!("endpoint target")
    };
    assert_eq!(ep.api_key_file, "/var/run/secrets/llmops-api-key/openai/api-key");
}

#[test]
fn an_invalid_result_is_refused_by_the_protocol_check() {
    let spec: llmops_crds::EvalRunSpec = serde_yaml_ng::from_str(
        "target: {model: {uri: 'store://m.gguf'}}\ndataset: {name: d}\nmetrics: [perplexity]\n",
    )
    .expect("spec");
    let target = ResolvedTarget::Endpoint {
        url: "http://x/v1".into(),
        model: "m".into(),
        api_key_file: String::new(),
        revision: String::new(),
    };
    // perplexity needs a local model: the protocol's validation says so.
    let err = eval(&key("EvalRun", "e"), &store(), &spec, inputs(target, dataset_artifact().split(SplitName::Test)))
        .expect_err("invalid");
    assert_eq!(err.reason, "InvalidAssignment");
    assert!(err.message.contains("eval.metrics[0]"), "{}", err.message);
}

fn inputs(target: ResolvedTarget, data: v1::Artifact) -> EvalInputs {
    EvalInputs { target, data, prompt: None, baseline_metrics: None, judge_deployment: None }
}
