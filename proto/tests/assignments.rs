//! Every example Assignment parses and validates; broken ones are refused with the field
//! named; the YAML form survives a round trip and the protobuf encoding.

use std::path::Path;

use llmops_proto::validate::describe;
use llmops_proto::{Mode, Validate, parse_assignment, read_assignment};
use prost::Message;

fn example(name: &str) -> llmops_proto::Assignment {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
    read_assignment(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_example_parses_and_validates() {
    for (file, mode) in
        [("prepare.yaml", "prepare"), ("finetune.yaml", "finetune"), ("eval.yaml", "eval"), ("serve.yaml", "serve")]
    {
        let a = example(file);
        assert_eq!(a.mode.as_ref().map(Mode::name), Some(mode), "{file}");
        if let Err(errors) = a.validate() {
            panic!("{file} is invalid:\n{}", describe(&errors));
        }
    }
}

#[test]
fn examples_carry_their_settings() {
    let a = example("finetune.yaml");
    let Some(Mode::Finetune(f)) = a.mode else { panic!("finetune mode") };
    let h = f.hyperparameters.expect("hyperparameters");
    assert_eq!(h.max_steps, 600);
    assert_eq!(h.learning_rate, 0.0002);
    assert_eq!(f.lora.expect("lora").target_modules, ["q_proj", "k_proj", "v_proj", "o_proj"]);
    assert!(f.checkpoints.expect("checkpoints").resume);
    let a = example("prepare.yaml");
    let Some(Mode::Prepare(p)) = a.mode else { panic!("prepare mode") };
    assert_eq!(p.transforms.len(), 5);
    assert_eq!(p.split.expect("split").seed, 7);
}

#[test]
fn yaml_form_and_wire_form_round_trip() {
    for file in ["prepare.yaml", "finetune.yaml", "eval.yaml", "serve.yaml"] {
        let a = example(file);
        let yaml = serde_yaml_ng::to_string(&a).expect("serializes");
        assert_eq!(parse_assignment(&yaml).expect("re-parses"), a, "{file} via YAML");
        let wire = a.encode_to_vec();
        assert_eq!(llmops_proto::Assignment::decode(&wire[..]).expect("decodes"), a, "{file} via protobuf");
    }
}

#[test]
fn unknown_field_is_refused_with_its_path() {
    let err = parse_assignment("finetune:\n  hyperparameters:\n    learningRat: 0.1\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("finetune.hyperparameters"), "{text}");
    assert!(text.contains("learningRat"), "{text}");
}

#[test]
fn wrong_type_is_refused_with_its_path() {
    let err = parse_assignment("serve:\n  serving:\n    port: eighty\n").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("serve.serving.port"), "{text}");
}

fn errors_of(yaml: &str) -> Vec<String> {
    let a = parse_assignment(yaml).unwrap_or_else(|e| panic!("parses: {e}"));
    a.validate().expect_err("must be invalid").iter().map(ToString::to_string).collect()
}

#[test]
fn invalid_assignments_name_the_field() {
    let cases = [
        ("{}", "exactly one of prepare, finetune, eval, serve or resolve"),
        ("finetune:\n  method: qlora\n", "finetune.method: must be one of lora, full, got \"qlora\""),
        (
            "resolve:\n  source: {uri: \"https://h/m.gguf\"}\n  cache: ../models\n",
            "resolve.cache: must be a relative store key",
        ),
        ("resolve:\n  cache: models\n", "resolve.source: is required"),
        (
            "finetune:\n  method: lora\n  hyperparameters: {epochs: 1, batchSize: 1, gradientAccumulationSteps: 1, learningRate: -0.1, lrSchedule: cosine, maxSeqLength: 64, evalInterval: 1}\n",
            "finetune.hyperparameters.learningRate: must be greater than 0",
        ),
        ("finetune:\n  method: lora\n", "finetune.lora: is required when method is lora"),
        (
            "prepare:\n  source: {uri: \"ftp://x/y\"}\n  schema: chat\n",
            "prepare.source.uri: unsupported scheme \"ftp\"",
        ),
        (
            "prepare:\n  source: {uri: file:///x}\n  schema: chat\n  split: {train: 0.5, validation: 0.1, test: 0.1}\n",
            "prepare.split: train + validation + test must add up to 1",
        ),
        (
            "eval:\n  metrics: [rougeL]\n  thresholds: [{metric: bleu, min: 0.1}]\n",
            "eval.thresholds[0].metric: must be listed in metrics",
        ),
        (
            "eval:\n  target: {endpoint: {url: \"http://127.0.0.1:8000/v1\", model: m}}\n  metrics: [perplexity]\n",
            "eval.metrics[0]: needs a local model target",
        ),
        (
            "serve:\n  model: {weights: {uri: \"file:///m.gguf\", sha256: XYZ}}\n  modelName: m\n",
            "serve.model.weights.sha256: must be 64 lowercase hex digits",
        ),
        (
            "serve:\n  model: {weights: {uri: \"file:///m.gguf\"}}\n  modelName: m\n  serving: {port: 0, maxBatchSize: 1, maxRequestBytes: 4096}\n",
            "serve.serving.port: must be between 1 and 65535",
        ),
    ];
    for (yaml, expected) in cases {
        let errors = errors_of(yaml);
        assert!(errors.iter().any(|e| e.contains(expected)), "expected {expected:?} in {errors:#?}");
    }
}
