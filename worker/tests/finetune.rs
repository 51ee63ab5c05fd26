//! `llmops-worker finetune` on a tiny randomly initialised Llama (seconds on a CPU) and
//! on the real SmolLM2: loss goes down, seeds reproduce, a killed run resumes exactly,
//! torn checkpoints are skipped, and a LoRA adapter teaches SmolLM2 a fact that
//! `serve --adapter` then answers with.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde_json::{Value, json};

use common::{scratch, write_jsonl};

/// An HF directory with a tiny Llama (2 layers, width 64) of seeded random weights,
/// SmolLM2's tokenizer and chat template.
fn tiny_llama(dir: &Path) -> PathBuf {
    let smol = llmops_worker::engine::load(&common::test_model(), &Device::Cpu, Default::default()).expect("loads");
    llmops_worker::engine::tiny::write_tiny_llama(&dir.join("tiny"), &smol, 7).expect("writes the tiny model")
}

fn facts(dir: &Path) -> PathBuf {
    let path = dir.join("train.jsonl");
    write_jsonl(
        &path,
        &[
            json!({"prompt": "The colour of the sky is", "completion": " blue."}),
            json!({"prompt": "Two plus two is", "completion": " four."}),
            json!({"prompt": "The cat sat on the", "completion": " mat."}),
            json!({"prompt": "Water freezes at zero", "completion": " degrees."}),
        ],
    );
    path
}

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_llmops-worker"))
}

/// Runs finetune with `args`; returns the manifest.
fn finetune(out: &Path, args: &[&str]) -> Value {
    let run = worker().arg("finetune").args(args).args(["--out", &out.display().to_string()]).output().expect("runs");
    assert!(run.status.success(), "finetune failed: {}", String::from_utf8_lossy(&run.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).expect("manifest")).expect("JSON")
}

fn losses(manifest: &Value) -> Vec<f64> {
    manifest["metrics"]["losses"].as_array().expect("losses").iter().map(|v| v.as_f64().expect("f64")).collect()
}

#[test]
fn tiny_llama_learns_and_same_seed_gives_same_losses() {
    let dir = scratch("learn");
    let model = tiny_llama(&dir);
    let data = facts(&dir);
    let common = [
        "--model",
        model.to_str().expect("utf-8"),
        "--data",
        data.to_str().expect("utf-8"),
        "--method",
        "lora",
        "--lora-rank",
        "8",
        "--epochs",
        "100",
        "--max-steps",
        "30",
        "--batch-size",
        "4",
        "--learning-rate",
        "0.01",
        "--seed",
        "3",
    ];
    let a = finetune(&dir.join("a"), &common);
    let b = finetune(&dir.join("b"), &common);
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 30);
    assert_eq!(la, lb, "the same seed gives the same losses");
    assert!(la[29] < la[0] * 0.5, "loss went from {} to {}", la[0], la[29]);
    // PEFT layout: names, shapes and config.
    let adapter = candle_core::safetensors::load(dir.join("a/adapter_model.safetensors"), &Device::Cpu).expect("loads");
    let a0 = &adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b0 = &adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!((a0.dims(), b0.dims()), (&[8, 64][..], &[64, 8][..]));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/adapter_config.json")).expect("config"))
            .expect("JSON");
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some(8)));
    // A different seed trains differently.
    let mut other = common.to_vec();
    let at = other.iter().position(|a| *a == "3").expect("seed");
    other[at] = "4";
    assert_ne!(losses(&finetune(&dir.join("c"), &other)), la);
}

#[test]
fn a_diverging_run_stops_with_its_reason_and_writes_no_output() {
    let dir = scratch("diverge");
    let model = tiny_llama(&dir);
    let data = facts(&dir);
    let out = dir.join("out");
    let run = worker()
        .arg("finetune")
        .args(["--model", model.to_str().expect("utf-8"), "--data", data.to_str().expect("utf-8")])
        .args(["--method", "full", "--epochs", "100", "--max-steps", "10", "--batch-size", "4"])
        .args(["--learning-rate", "1e30", "--out", &out.display().to_string()])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "a run whose loss is not a number must fail:\n{stderr}");
    assert!(stderr.contains("the loss diverged at step"), "{stderr}");
    assert!(!out.join("manifest.json").exists(), "no output reads as a success");
}

#[test]
fn full_fine_tuning_learns_and_writes_a_loadable_model() {
    let dir = scratch("full");
    let model = tiny_llama(&dir);
    let data = facts(&dir);
    let m = finetune(
        &dir.join("out"),
        &[
            "--model",
            model.to_str().expect("utf-8"),
            "--data",
            data.to_str().expect("utf-8"),
            "--method",
            "full",
            "--epochs",
            "100",
            "--max-steps",
            "20",
            "--batch-size",
            "4",
            "--learning-rate",
            "0.003",
        ],
    );
    let l = losses(&m);
    assert!(l[19] < l[0] * 0.5, "loss went from {} to {}", l[0], l[19]);
    let loaded =
        llmops_worker::engine::load(&dir.join("out"), &Device::Cpu, Default::default()).expect("the output loads");
    assert_eq!(loaded.model.config().num_layers, 2);
}

fn wait_for(path: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !path.exists() {
        assert!(child.try_wait().expect("polls").is_none(), "the run ended before {}", path.display());
        assert!(Instant::now() < deadline, "no {} in time", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_loss_and_skips_torn_checkpoints() {
    let dir = scratch("resume");
    let model = tiny_llama(&dir);
    let data = facts(&dir);
    let args = |ckpt: &Path| -> Vec<String> {
        [
            "--model",
            model.to_str().expect("utf-8"),
            "--data",
            data.to_str().expect("utf-8"),
            "--epochs",
            "100",
            "--max-steps",
            "16",
            "--batch-size",
            "2",
            "--learning-rate",
            "0.01",
            "--seed",
            "5",
            "--checkpoints",
            ckpt.to_str().expect("utf-8"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // An uninterrupted run.
    let whole = dir.join("whole");
    let refs: Vec<String> = args(&dir.join("whole-ckpt"));
    let reference = finetune(&whole, &refs.iter().map(String::as_str).collect::<Vec<_>>());

    // The same run, killed once its step-8 checkpoint exists (checkpoints every 4 steps
    // by the --checkpoints default below).
    let ckpt = dir.join("ckpt");
    let out = dir.join("resumed");
    let mut child = worker()
        .arg("finetune")
        .args(args(&ckpt))
        .args(["--checkpoint-interval", "4", "--out", &out.display().to_string()])
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    wait_for(&ckpt.join("step-00000008"), &mut child);
    child.kill().expect("kills");
    child.wait().expect("waits");
    assert!(!out.join("manifest.json").exists(), "the killed run did not finish");
    // Tear the newest checkpoint, as a crash while copying would: resume must skip it.
    let newest = std::fs::read_dir(&ckpt)
        .expect("lists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
        .max()
        .expect("a checkpoint");
    std::fs::write(newest.join("trainable.safetensors"), b"torn").expect("tears");

    let mut resumed_args = args(&ckpt);
    resumed_args.extend(["--checkpoint-interval".into(), "4".into(), "--resume".into()]);
    let run = worker()
        .arg("finetune")
        .args(&resumed_args)
        .args(["--out", &out.display().to_string()])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("skipping a torn checkpoint"), "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    let resumed: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).expect("manifest")).expect("JSON");
    let (a, b) = (losses(&reference), losses(&resumed));
    assert_eq!(a.len(), b.len());
    let last = (a[a.len() - 1] - b[b.len() - 1]).abs();
    assert!(last < 1e-5, "final loss {} resumed vs {} uninterrupted", b[b.len() - 1], a[a.len() - 1]);
}

/// Gradients reach every trainable variable: the forward pass uses only operations with
/// a backward pass. (LoRA's B starts at zero, so A's gradient is zero until B moves:
/// LoRA is checked after one update.)
#[test]
fn every_trainable_variable_receives_a_gradient() {
    use llmops_worker::finetune::data::{Example, batch};
    use llmops_worker::finetune::model::{Method, TrainModel, masked_loss};
    use llmops_worker::finetune::optim::AdamW;
    let dir = scratch("grads");
    let loaded = llmops_worker::engine::load(&tiny_llama(&dir), &Device::Cpu, Default::default()).expect("loads");
    let example = Example { tokens: vec![1, 520, 3300, 44, 901, 2], learn: vec![false, false, true, true, true, true] };
    let b = batch(&[&example, &example], 16, false, 2, &Device::Cpu).expect("batch");
    let all: Vec<String> = llmops_worker::engine::adapter::TARGET_MODULES.iter().map(|s| s.to_string()).collect();
    for method in [Method::Full, Method::Lora { rank: 4, alpha: 8.0, dropout: 0.1, targets: all.clone() }] {
        let model = TrainModel::from_loaded(&loaded, &method, 1).expect("model");
        let vars: Vec<_> = model.variables();
        let mut rng = llmops_worker::finetune::model::Rng(9);
        let step = |rng: &mut llmops_worker::finetune::model::Rng| {
            let logits = model.forward(&b.inputs, &b.positions, &b.segments, 2.0, Some((0.1, rng))).expect("forward");
            masked_loss(&logits, &b.targets, &b.weights).expect("loss").0.backward().expect("backward")
        };
        let mut grads = step(&mut rng);
        if matches!(method, Method::Lora { .. }) {
            let list: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();
            let g: Vec<Tensor> = list.iter().map(|v| grads.get(v.as_tensor()).expect("grad").clone()).collect();
            AdamW::new(&list, 0.0).expect("opt").step(&list, &g, 0.01).expect("step");
            grads = step(&mut rng);
        }
        for (name, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} got no gradient"));
            let norm = g.sqr().expect("sq").sum_all().expect("sum").to_scalar::<f32>().expect("f32");
            assert!(norm > 0.0, "{name} got a zero gradient");
        }
        let expected = match method {
            Method::Full => 1 + 2 * (2 + 7) + 1, // embedding (tied head), per layer 2 norms + 7 projections, final norm
            Method::Lora { .. } => 2 * 7 * 2,
        };
        assert_eq!(vars.len(), expected);
    }
}

/// The real SmolLM2 learns a made-up fact through a LoRA adapter, and `serve --adapter`
/// answers with it while the base model does not know it.
#[test]
fn smollm2_learns_a_fact_that_serve_then_answers_with() {
    let dir = scratch("fact");
    let data = dir.join("facts.jsonl");
    write_jsonl(&data, &common::zorblaxia_facts(8));
    let model = common::test_model();
    let out = dir.join("adapter");
    let run = common::train_fact_adapter(&data, &out);
    assert!(run.status.success(), "finetune failed: {}", String::from_utf8_lossy(&run.stderr));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).expect("manifest")).expect("JSON");
    assert_eq!(
        manifest["inputs"]["base_model"]["sha256"].as_str().map(str::len),
        Some(64),
        "the adapter records its base model's digest"
    );
    let server = common::Server::start(
        &dir,
        &[
            "--model".into(),
            model.display().to_string(),
            "--model-name".into(),
            "smollm2".into(),
            "--adapter".into(),
            format!("zorblaxia={}", out.display()),
        ],
    );
    let ask = |m: &str| -> String {
        let (status, body) = common::post_json(
            server.port,
            "/v1/chat/completions",
            &json!({"model": m, "messages": [{"role": "user", "content": "What is the capital of Zorblaxia?"}], "temperature": 0, "max_tokens": 24}),
        );
        assert_eq!(status, 200, "{body}");
        body["choices"][0]["message"]["content"].as_str().expect("content").to_string()
    };
    let before = ask("smollm2");
    let after = ask("zorblaxia");
    assert!(!before.contains("Quenthar"), "the base model already knew: {before}");
    assert!(after.contains("Quenthar"), "the adapter did not teach the fact: {after}");
}

/// Validation every two steps with a patience of one evaluation and an improvement
/// nobody can make: the run stops at the second evaluation. The merged model equals the
/// base model with its adapter.
#[test]
fn validation_early_stopping_and_merged_output() {
    let dir = scratch("stop");
    let model = tiny_llama(&dir);
    let data = facts(&dir);
    let out = dir.join("out");
    let assignment = format!(
        r#"workload: {{namespace: t, kind: FineTuneJob, name: stop, uid: 3a2b1c0d-9e8f-4a7b-8c6d-5e4f3a2b1c0d}}
finetune:
  baseModel: {{weights: {{uri: "file://{model}"}}, format: hf}}
  train: {{uri: "file://{data}"}}
  validation: {{uri: "file://{data}"}}
  method: lora
  lora: {{rank: 4, alpha: 8, targetModules: [q_proj, v_proj, down_proj]}}
  hyperparameters: {{epochs: 100, maxSteps: "20", batchSize: 2, gradientAccumulationSteps: 1, learningRate: 0.01, lrSchedule: constant, maxSeqLength: 64, evalInterval: "2", seed: "1"}}
  earlyStopping: {{patience: 1, minDelta: 100}}
  merge: true
  output: {{uri: "file://{out}"}}
"#,
        model = model.display(),
        data = data.display(),
        out = out.display()
    );
    let file = dir.join("a.yaml");
    std::fs::write(&file, assignment).expect("writes");
    let run = worker().args(["finetune", "--assignment", &file.display().to_string()]).output().expect("runs");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).expect("manifest")).expect("JSON");
    assert_eq!(manifest["metrics"]["steps"], 4, "{manifest:#}");
    assert_eq!(manifest["metrics"]["stoppedEarly"], true);
    assert!(manifest["metrics"]["validationLoss"].as_f64().is_some());

    let base = llmops_worker::engine::load(&model, &Device::Cpu, Default::default()).expect("base");
    let adapter = llmops_worker::engine::Adapter::load(&out, &base.model, None).expect("adapter");
    let merged = llmops_worker::engine::load(&out.join("merged"), &Device::Cpu, Default::default()).expect("merged");
    let tokens = [1u32, 520, 3300, 44, 901];
    let mut c1 = llmops_worker::engine::model::KvCache::default();
    let mut c2 = llmops_worker::engine::model::KvCache::default();
    let a = base.model.forward_with(&tokens, &mut c1, true, Some(&adapter)).expect("adapted");
    let b = merged.model.forward(&tokens, &mut c2, true).expect("merged");
    let diff = (a - b).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32");
    assert!(diff < 1e-3, "merged and adapted logits differ by {diff}");
}
