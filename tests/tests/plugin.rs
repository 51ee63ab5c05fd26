//! The kubectl plugin (`kubectl-llmops`) against the real control plane: an operator and a
//! development node run in-process, a small pipeline is applied (a Dataset, a PromptVersion
//! and the FineTuneJob of examples/pipeline, cut to two steps, a ModelDeployment serving
//! SmolLM2 with that adapter and the prompt, and an EvalRun of a Dataset that does not
//! exist), and the built binary is run as kubectl would run it, with KUBECONFIG set:
//! `status`, `lineage`, `chat` and `logs` (which must say that the dev node has no
//! kubelet API, and where its log files are).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::Client;
use kube::api::Api;
use llmops_crds::{Dataset, EvalRun, FineTuneJob, ModelDeployment, PromptVersion};
use llmops_operator::StoreConfig;
use llmops_tests::dev_node::{DevNode, DevNodeConfig, place_on};
use llmops_tests::{Operator, apply, condition, eventually, example, namespace_with_crds, repo_root};
use serde_json::{Value, json};

/// Loading the model and preparing data: seconds, with a margin for a busy machine.
const RUN: Duration = Duration::from_secs(300);
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `kubectl-llmops` built beside this test binary: `cargo build -p kubectl-llmops` is run
/// first (a no-op when it is up to date), so the binary tested is the current source's.
fn plugin_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("the test binary has no target directory")?;
    let target_dir = profile_dir.parent().context("the profile directory has no parent")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", "kubectl-llmops", "--target-dir"]).arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.current_dir(repo_root()).status().context("running cargo build -p kubectl-llmops")?;
    let binary = profile_dir.join("kubectl-llmops");
    if !status.success() || !binary.is_file() {
        bail!("`cargo build -p kubectl-llmops` failed ({status}); {} is missing", binary.display());
    }
    Ok(binary)
}

/// What one run of the plugin printed.
#[derive(Debug)]
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the plugin with `args` (off the test's runtime, which runs the operator and the
/// dev node meanwhile).
async fn plugin(binary: &Path, args: &[&str]) -> Result<Run> {
    plugin_with_input(binary, args, "").await
}

/// Runs the plugin with `args` and `input` on its stdin.
async fn plugin_with_input(binary: &Path, args: &[&str], input: &str) -> Result<Run> {
    use std::io::Write;
    use std::process::Stdio;
    let mut command = Command::new(binary);
    command.args(args).env("KUBECONFIG", llmops_tests::kubeconfig()?).env_remove("LLMOPS_API_KEY");
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let input = input.to_string();
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<std::process::Output> {
        let mut child = command.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    })
    .await??;
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ kubectl llmops {}\n{}{}", args.join(" "), run.stdout, run.stderr);
    Ok(run)
}

/// The header (`Kind/name`) of the tree node that the line holding `child` is drawn
/// under: the nearest line above that starts a header at the column of its connector.
fn drawn_under(text: &str, child: &str) -> Option<String> {
    let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
    let at = lines.iter().position(|l| l.iter().collect::<String>().contains(child))?;
    let column = (0..lines[at].len()).find(|i| matches!(lines[at][*i], '├' | '└'))?;
    lines[..at]
        .iter()
        .rev()
        .find(|l| l.get(column).is_some_and(|c| c.is_ascii_alphanumeric()))
        .map(|l| l[column..].iter().collect::<String>().split_whitespace().next().unwrap_or_default().to_string())
}

/// Pins a workload's pods to `node`, asking for a quarter of a core.
/// An example of examples/pipeline/ for the test's namespace (apply sets it).
fn pipeline_example(file: &str) -> Result<Value> {
    let mut manifest = example(file)?;
    if let Some(meta) = manifest["metadata"].as_object_mut() {
        meta.remove("namespace");
    }
    Ok(manifest)
}

fn is_true(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], t: &str) -> bool {
    condition(conditions, t).is_some_and(|c| c.status == "True")
}

#[tokio::test]
async fn the_plugin_draws_the_pipeline_follows_lineage_chats_and_explains_where_dev_node_logs_are() -> Result<()> {
    let binary = plugin_binary()?;
    let (client, ns) = namespace_with_crds("plugin").await?;
    let op = Operator::start_configured(&client, &ns.name, |c| c.address_by_pod_ip = true).await?;
    let StoreConfig::Local { mount_path: store, .. } = op.config.store.clone() else { bail!("a local store") };
    std::fs::create_dir_all(store.join(&ns.name).join("imports"))?;
    std::fs::copy(llmops_tests::test_model()?, store.join(&ns.name).join("imports").join(MODEL_FILE))?;
    // The work dir the plugin knows the cluster tests by: $TMPDIR/llmops-dev-node-<namespace>.
    let work_dir = std::env::temp_dir().join(format!("llmops-dev-node-{}", ns.name));
    let node = DevNode::start(
        client.clone(),
        DevNodeConfig::new(format!("dev-{}", ns.name), llmops_tests::worker_binary()?, work_dir.clone()),
    )
    .await?;
    let result = exercise(&client, &ns.name, &node, &binary).await;
    node.stop().await?;
    op.stop().await;
    // Each run copies the model into its store; what a failed run left is kept to look at.
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&store);
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    result
}

async fn exercise(client: &Client, ns: &str, node: &DevNode, binary: &Path) -> Result<()> {
    let mut dataset = pipeline_example("dataset.yaml")?;
    place_on(&mut dataset, &node.config.node_name);
    apply(client, ns, &dataset).await?;
    apply(client, ns, &pipeline_example("promptversion.yaml")?).await?;
    // The example's fine-tune, cut to two steps: what it learns does not matter here.
    let mut job = pipeline_example("finetunejob.yaml")?;
    job["spec"]["hyperparameters"]["maxSteps"] = json!(2);
    job["spec"]["hyperparameters"]["warmupSteps"] = json!(1);
    place_on(&mut job, &node.config.node_name);
    apply(client, ns, &job).await?;
    let mut orphan = json!({
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "EvalRun",
        "metadata": {"name": "orphan-eval"},
        "spec": {
            "target": {"model": {"uri": format!("store://imports/{MODEL_FILE}")}},
            "dataset": {"name": "missing-data"},
            "metrics": ["contains"],
        },
    });
    place_on(&mut orphan, &node.config.node_name);
    apply(client, ns, &orphan).await?;
    let mut md = json!({
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "chatty"},
        "spec": {
            "model": {"uri": format!("store://imports/{MODEL_FILE}")},
            "adapters": [{"name": "acme-facts", "fineTuneJob": "acme-facts-lora"}],
            "prompt": {"name": "acme-support-v1"},
            "replicas": 1,
            "serving": {"maxBatchSize": 2, "maxQueue": 4, "contextLength": 512},
        },
    });
    place_on(&mut md, &node.config.node_name);
    apply(client, ns, &md).await?;

    let datasets: Api<Dataset> = Api::namespaced(client.clone(), ns);
    let prompts: Api<PromptVersion> = Api::namespaced(client.clone(), ns);
    let jobs: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    let runs: Api<EvalRun> = Api::namespaced(client.clone(), ns);
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let dataset = eventually("Dataset acme-facts to succeed", RUN, || async {
        let d = datasets.get("acme-facts").await?;
        let c = d.status.clone().map(|s| s.common.conditions).unwrap_or_default();
        if is_true(&c, "Failed") {
            bail!("Dataset acme-facts failed: {c:?}");
        }
        Ok(is_true(&c, "Succeeded").then_some(d))
    })
    .await?;
    let prompt = eventually("PromptVersion acme-support-v1 to be Ready", RUN, || async {
        let p = prompts.get("acme-support-v1").await?;
        Ok(is_true(&p.status.clone().map(|s| s.common.conditions).unwrap_or_default(), "Ready").then_some(p))
    })
    .await?;
    let served = eventually("ModelDeployment chatty to be Ready", RUN, || async {
        let j = jobs.get("acme-facts-lora").await?;
        let c = j.status.map(|s| s.common.conditions).unwrap_or_default();
        if is_true(&c, "Failed") {
            bail!("FineTuneJob acme-facts-lora failed: {c:?}");
        }
        let m = mds.get("chatty").await?;
        let c = m.status.clone().map(|s| s.common.conditions).unwrap_or_default();
        if is_true(&c, "Stalled") {
            bail!("ModelDeployment chatty stalled: {c:?}");
        }
        Ok(is_true(&c, "Ready").then_some(m))
    })
    .await?;
    eventually("EvalRun orphan-eval to wait for its Dataset", RUN, || async {
        let r = runs.get("orphan-eval").await?;
        let c = r.status.map(|s| s.common.conditions).unwrap_or_default();
        Ok(condition(&c, "Ready").is_some_and(|c| c.reason == "DatasetNotFound").then_some(()))
    })
    .await?;
    let job = jobs.get("acme-facts-lora").await?;
    let adapter_sha = job.status.as_ref().and_then(|s| s.artifact.clone()).context("the adapter")?.sha256;

    // status: each object under what it depends on, a missing Dataset shown as such.
    let status = plugin(binary, &["status", "-n", ns]).await?;
    assert!(status.ok, "{status:?}");
    let text = &status.stdout;
    assert!(!text.contains('\x1b'), "no colour when stdout is not a terminal:\n{text}");
    assert!(text.starts_with("Dataset/acme-facts  Succeeded  Ready=True (Succeeded)\n"), "{text}");
    assert_eq!(drawn_under(text, "FineTuneJob/acme-facts-lora").as_deref(), Some("Dataset/acme-facts"), "{text}");
    assert!(text.contains("\nDataset/missing-data  not found\n"), "{text}");
    assert_eq!(drawn_under(text, "EvalRun/orphan-eval").as_deref(), Some("Dataset/missing-data"), "{text}");
    assert!(text.contains("EvalRun/orphan-eval  Waiting  Ready=False (DatasetNotFound)"), "{text}");
    assert!(text.contains("\nPromptVersion/acme-support-v1  Ready  Ready=True (Valid)\n"), "{text}");
    assert_eq!(drawn_under(text, "ModelDeployment/chatty").as_deref(), Some("FineTuneJob/acme-facts-lora"), "{text}");
    assert!(text.contains("uses PromptVersion/acme-support-v1 (prompt)"), "{text}");
    let endpoint = served.status.as_ref().and_then(|s| s.endpoint.clone()).context("an endpoint")?;
    assert!(text.contains("ModelDeployment/chatty  Serving  Ready=True (Serving)"), "{text}");
    assert!(text.contains(&format!("endpoint {endpoint}")), "{text}");

    // lineage: digests as recorded, short and in full; a missing input is not an error.
    let data_sha = dataset.status.as_ref().and_then(|s| s.artifact.clone()).context("an artifact")?.sha256;
    let lineage = plugin(binary, &["lineage", "dataset/acme-facts", "-n", ns]).await?;
    assert!(lineage.ok, "{lineage:?}");
    assert_eq!(lineage.stdout, format!("Dataset/acme-facts  sha256 {}\n", &data_sha[..12]));
    let kubeconfig = llmops_tests::kubeconfig()?;
    let kubeconfig = kubeconfig.to_str().context("a UTF-8 kubeconfig path")?;
    let lineage = plugin(binary, &["--kubeconfig", kubeconfig, "lineage", "md/chatty", "--full", "-n", ns]).await?;
    assert!(lineage.ok, "{lineage:?}");
    let served_status = served.status.clone().context("status")?;
    let served_lineage = served_status.lineage.clone().context("a served lineage")?;
    let prompt_sha = prompt.status.as_ref().and_then(|s| s.digest.clone()).context("a prompt digest")?;
    let text = &lineage.stdout;
    assert!(
        text.starts_with(&format!(
            "ModelDeployment/chatty  sha256 {}  (revision {})\n",
            served_status.served_model_digest.clone().unwrap_or_default(),
            served_lineage.revision
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "├─ model: Model store://{}/imports/{MODEL_FILE}  sha256 {}\n",
            ns, served_lineage.model.sha256
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "├─ adapter acme-facts: FineTuneJob/acme-facts-lora  sha256 {adapter_sha}\n│  ├─ Model store://{}/imports/{MODEL_FILE}  sha256 {}\n│  └─ Dataset/acme-facts  sha256 {data_sha}\n",
            ns,
            served_lineage.model.sha256
        )),
        "{text}"
    );
    assert!(text.ends_with(&format!("└─ prompt: PromptVersion/acme-support-v1  sha256 {prompt_sha}\n")), "{text}");
    let lineage = plugin(binary, &["lineage", "evalrun/orphan-eval", "-n", ns]).await?;
    assert!(lineage.ok, "{lineage:?}");
    assert!(
        lineage
            .stdout
            .contains("└─ eval data: Dataset/missing-data  sha256 -  (not found: what it was built from is unknown)\n"),
        "{lineage:?}"
    );
    let missing = plugin(binary, &["lineage", "ftj/nope", "-n", ns]).await?;
    assert!(!missing.ok && missing.stderr.contains("FineTuneJob/nope not found in namespace"), "{missing:?}");

    // chat: an answer through the endpoint; the server's refusal, clearly, and exit 1.
    let chat = plugin(binary, &["chat", "chatty", "-n", ns, "--message", "Say hello.", "--max-tokens", "8"]).await?;
    assert!(chat.ok && !chat.stdout.trim().is_empty(), "{chat:?}");
    // Without --message, a conversation from stdin: one answer per line, through the adapter.
    let args = ["chat", "chatty", "-n", ns, "--model", "acme-facts", "--max-tokens", "8"];
    let conversation = plugin_with_input(binary, &args, "Who are you?\n\nWhat did I just ask?\n").await?;
    assert!(conversation.ok && conversation.stdout.lines().count() >= 2, "{conversation:?}");
    let refused = plugin(binary, &["chat", "chatty", "-n", ns, "--model", "nope", "--message", "Hi"]).await?;
    assert!(!refused.ok && refused.stderr.contains("answered HTTP 404 (model_not_found)"), "{refused:?}");
    let absent = plugin(binary, &["chat", "absent", "-n", ns, "--message", "Hi"]).await?;
    assert!(!absent.ok && absent.stderr.contains("ModelDeployment absent not found"), "{absent:?}");

    // logs: the dev node serves no kubelet API; the plugin says so and where the file is.
    let node_name = &node.config.node_name;
    let logs = plugin(binary, &["logs", "dataset/acme-facts", "-n", ns]).await?;
    assert!(!logs.ok, "{logs:?}");
    assert!(logs.stderr.contains(&format!("node {node_name} serves no kubelet API")), "{logs:?}");
    assert!(logs.stderr.contains(&format!("node {node_name} is an llmops development node")), "{logs:?}");
    let path = logs
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("the log file on this machine: "))
        .and_then(|rest| rest.split(" (").next())
        .with_context(|| format!("no log file named: {logs:?}"))?;
    let expected_dir = node.config.work_dir.join(format!("{ns}_acme-facts-prepare-"));
    assert!(path.starts_with(&*expected_dir.to_string_lossy()), "{path} is not under {}", expected_dir.display());
    assert!(path.ends_with("/log") && Path::new(path).is_file(), "{path}");
    assert!(logs.stderr.ends_with(&format!("read it with: cat {path}\n")), "{logs:?}");
    let serving = plugin(binary, &["logs", "md/chatty", "-n", ns, "--follow"]).await?;
    assert!(!serving.ok, "{serving:?}");
    assert!(serving.stderr.contains("(the pod's process writes to it)\nread it with: tail -f "), "{serving:?}");
    let prompt_logs = plugin(binary, &["logs", "prompt/acme-support-v1", "-n", ns]).await?;
    assert!(!prompt_logs.ok && prompt_logs.stderr.contains("runs no pods"), "{prompt_logs:?}");
    let waiting = plugin(binary, &["logs", "evalrun/orphan-eval", "-n", ns]).await?;
    assert!(!waiting.ok && waiting.stderr.contains("no pod of EvalRun/orphan-eval"), "{waiting:?}");
    Ok(())
}
