//! The worker binary reads, completes and validates Assignments.

use std::path::PathBuf;
use std::process::{Command, Output};

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmops-worker")).args(args).output().expect("worker runs")
}

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto/examples").join(name).display().to_string()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn check_accepts_every_example_assignment() {
    for mode in ["prepare", "finetune", "eval", "serve"] {
        let out = worker(&[mode, "--assignment", &example(&format!("{mode}.yaml")), "--check"]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{mode}: {stderr}");
        assert!(stdout.contains(&format!("{mode}:")), "{mode}: {stdout}");
    }
}

#[test]
fn flags_build_a_finetune_assignment_with_the_crd_defaults() {
    let out = worker(&[
        "finetune",
        "--model",
        "/m/smol.gguf",
        "--data",
        "train.jsonl",
        "--out",
        "/tmp/out",
        "--max-steps",
        "30",
        "--check",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let printed = llmops_proto::parse_assignment(&stdout).expect("--check prints an Assignment");
    let Some(llmops_proto::Mode::Finetune(f)) = printed.mode else { panic!("finetune mode: {stdout}") };
    let model = f.base_model.expect("model");
    assert_eq!(model.weights.expect("weights").uri, "file:///m/smol.gguf");
    assert_eq!(model.format, "gguf");
    let h = f.hyperparameters.expect("hyperparameters");
    assert_eq!(h.max_steps, 30);
    assert_eq!(h.learning_rate, 2e-4, "the FineTuneJob default");
    assert_eq!(f.lora.expect("lora").rank, 8, "the FineTuneJob default");
    assert_eq!(f.checkpoints.expect("checkpoints").uri, "file:///tmp/out/checkpoints");
}

#[test]
fn flags_override_the_assignment_file() {
    let out = worker(&[
        "serve",
        "--assignment",
        &example("serve.yaml"),
        "--port",
        "9001",
        "--adapter",
        "extra=/a/extra",
        "--check",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("port: 9001"), "{stdout}");
    assert!(stdout.contains("name: extra"), "{stdout}");
    assert!(stdout.contains("name: support"), "the file's adapter stays: {stdout}");
}

#[test]
fn invalid_assignment_is_refused_naming_the_field() {
    let out = worker(&["finetune", "--assignment", &example("finetune.yaml"), "--learning-rate=-1", "--check"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("finetune.hyperparameters.learningRate: must be greater than 0"), "{stderr}");

    let out = worker(&["serve", "--model", "/m/x.gguf", "--port", "0", "--check"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("serve.serving.port"), "{stderr}");
}

#[test]
fn assignment_for_another_mode_is_refused() {
    let out = worker(&["eval", "--assignment", &example("serve.yaml"), "--check"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("is for mode \"serve\""), "{stderr}");
}

#[test]
fn missing_file_and_bad_yaml_are_clear_errors() {
    let out = worker(&["prepare", "--assignment", "/nonexistent/a.yaml"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("cannot read assignment file /nonexistent/a.yaml"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("llmops-worker-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "prepare:\n  split: {train: lots}\n").expect("write");
    let out = worker(&["prepare", "--assignment", &bad.display().to_string()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("prepare.split.train"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_valid_assignment_whose_inputs_are_missing_names_the_missing_file() {
    let out = worker(&["eval", "--assignment", &example("eval.yaml")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/var/lib/llmops/store/default/dataset/support-chats/3f0c9a52-7c1e-4d8e-9a41-2b6f0e1d5c77/output/test.parquet"),
        "{stderr}"
    );
}

#[test]
fn serve_exits_with_the_reason_when_the_model_cannot_load() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("binds").local_addr().expect("addr").port();
    let out = worker(&["serve", "--model", "/nonexistent/model.gguf", "--port", &port.to_string()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("model not found: /nonexistent/model.gguf"), "{stderr}");
}
