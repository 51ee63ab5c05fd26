//! Faults in the middle of a pipeline, on a control plane of its own (tests/cluster/up
//! with its own state directory and ports, stopped at the end; the shared one is never
//! touched): the operator runs as a process (`llmops-operator run`), a dev node runs
//! every worker pod for real, and while the FineTuneJob trains the test kills, one at a
//! time, the operator (started again), the worker's process (its Job starts another
//! pod, which resumes from the last checkpoint) and the kube-apiserver (started again
//! on the same etcd). The pipeline (Dataset -> FineTuneJob -> EvalRun) must end exactly
//! as an undisturbed run of the same manifests in another namespace of the same
//! cluster did: the same content digests of every output file, the same training
//! losses, the same evaluation figures, one output and one Job per object, Succeeded.
//!
//! Needs the `llmops-operator` and `llmops-worker` binaries built
//! (`cargo build -p llmops-operator -p llmops-worker`).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use llmops_crds::{Dataset, EvalRun, FineTuneJob};
use llmops_tests::dev_node::{DevNode, DevNodeConfig, place_on};
use llmops_tests::{apply, eventually, example, install_crds, repo_root};
use serde_json::{Value, json};

/// Waits for a step of the pipeline; the margin is for a busy 2-core machine.
const RUN: Duration = Duration::from_secs(300);
/// Long enough (a step of the tiny model takes about 0.2 s) for three faults to land
/// while it trains.
const MAX_STEPS: u64 = 120;
const CHECKPOINT_EVERY: u64 = 10;

/// A control plane of this test's own: `tests/cluster/up` with its own state directory
/// and five free ports. Stopped (`tests/cluster/down`) when dropped.
struct OwnCluster {
    env: Vec<(String, String)>,
    kubeconfig: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl OwnCluster {
    fn up(name: &str) -> Result<Self> {
        let cache = std::env::var_os("LLMOPS_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/llmops"));
        let dir = cache.join(format!("cluster-{name}-{}", std::process::id()));
        let mut env = vec![("LLMOPS_CLUSTER_DIR".to_string(), dir.display().to_string())];
        for var in [
            "LLMOPS_APISERVER_PORT",
            "LLMOPS_ETCD_CLIENT_PORT",
            "LLMOPS_ETCD_PEER_PORT",
            "LLMOPS_KCM_PORT",
            "LLMOPS_SCHEDULER_PORT",
        ] {
            env.push((var.to_string(), free_port()?.to_string()));
        }
        let cluster = Self { env, kubeconfig: dir.join("kubeconfig") };
        let out = cluster.script("up", &[])?;
        let printed = PathBuf::from(out.lines().last().unwrap_or_default().trim());
        ensure!(printed == cluster.kubeconfig, "tests/cluster/up printed {printed:?}, not {:?}", cluster.kubeconfig);
        Ok(cluster)
    }

    /// Runs tests/cluster/NAME against this cluster; its progress goes to stderr.
    fn script(&self, name: &str, args: &[&str]) -> Result<String> {
        let path = repo_root().join("tests/cluster").join(name);
        let out = Command::new(&path)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", path.display()))?;
        ensure!(out.status.success(), "{} {args:?} failed with {}", path.display(), out.status);
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        if let Err(e) = self.script("down", &[]) {
            eprintln!("warning: could not stop the test's own cluster: {e:#}");
        }
    }
}

impl OwnCluster {
    /// Stops the cluster and removes its directory, logs included (a failed run keeps
    /// them: `down` alone leaves them in `<dir>/logs`).
    fn remove(self) -> Result<()> {
        let dir = self.env.first().map(|(_, d)| PathBuf::from(d)).context("no cluster dir")?;
        self.script("down", &[])?;
        std::mem::forget(self);
        std::fs::remove_dir_all(&dir)?;
        let _ = std::fs::remove_file(dir.with_extension("lock"));
        Ok(())
    }
}

/// The operator binary running as a process, so that it can be killed.
struct OperatorProcess {
    args: Vec<String>,
    kubeconfig: PathBuf,
    log: PathBuf,
    child: Child,
}

impl OperatorProcess {
    fn start(kubeconfig: &Path, store: &Path, log: &Path) -> Result<Self> {
        let gateway = format!("127.0.0.1:{}", free_port()?);
        let store = store.display().to_string();
        let args: Vec<String> = [
            "run",
            "--store-host-path",
            &store,
            "--store-mount-path",
            &store,
            "--gateway-listen",
            &gateway,
            "--gateway-address",
            &gateway,
            "--metrics-listen",
            &format!("127.0.0.1:{}", free_port()?),
            "--address-by-pod-ip",
            "--resolver-namespace",
            "llmops-system",
            "--resolver-node-selector",
            "llmops.dev/dev-node=true",
            "--resolver-toleration",
            "llmops.dev/dev-node",
            "--progress-interval",
            "200ms",
            "--checkpoint-grace",
            "3s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let child = Self::spawn(&args, kubeconfig, log)?;
        Ok(Self { args, kubeconfig: kubeconfig.to_path_buf(), log: log.to_path_buf(), child })
    }

    fn spawn(args: &[String], kubeconfig: &Path, log: &Path) -> Result<Child> {
        let binary = llmops_tests::operator_binary()?;
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        Command::new(&binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn,tower=warn,h2=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))
    }

    /// SIGKILL, as a crash or an evicted pod would end it, then the same command again.
    fn kill_and_restart(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = Self::spawn(&self.args, &self.kubeconfig, &self.log)?;
        Ok(())
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The manifests of the pipeline, placed on `node`: the example Dataset, a FineTuneJob
/// of a tiny Llama on it with checkpoints, and an EvalRun of its adapter.
fn pipeline(node: &str) -> Result<Vec<Value>> {
    let mut dataset = example("dataset.yaml")?;
    let mut tune = example("finetunejob.yaml")?;
    tune["spec"]["model"] = json!({"uri": "store://imports/tiny/", "format": "hf"});
    tune["spec"]["hyperparameters"] = json!({
        "epochs": 100, "maxSteps": MAX_STEPS, "batchSize": 2, "learningRate": 0.001, "maxSeqLength": 64,
        "evalInterval": 8,
    });
    tune["spec"]["checkpoints"] = json!({"intervalSteps": CHECKPOINT_EVERY});
    tune["spec"]["backoffLimit"] = json!(3);
    let prompt = example("promptversion.yaml")?;
    let mut eval = example("evalrun.yaml")?;
    eval["spec"]["target"]["model"] = json!({"uri": "store://imports/tiny/", "format": "hf"});
    eval["spec"]["metrics"] = json!(["perplexity", "contains", "tokenF1"]);
    eval["spec"]["thresholds"] = json!([{"metric": "tokenF1", "min": 0.0}]);
    eval["spec"]["sampleLimit"] = json!(4);
    for m in [&mut dataset, &mut tune, &mut eval] {
        place_on(m, node);
    }
    Ok(vec![dataset, prompt, tune, eval])
}

/// The condition `t` of a status as JSON.
fn condition_is(status: &Value, t: &str) -> bool {
    status["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == t && c["status"] == "True")
}

async fn status_of<K>(api: &Api<K>, name: &str) -> Result<Value>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    Ok(serde_json::to_value(api.get(name).await?)?["status"].clone())
}

/// Waits until the object's `Succeeded` condition is True; fails at once on `Failed`.
async fn succeeded<K>(api: &Api<K>, name: &str) -> Result<Value>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    eventually(&format!("{name} to succeed"), RUN, || async {
        let status = status_of(api, name).await?;
        if condition_is(&status, "Failed") {
            bail!("{name} failed: {}", status["conditions"]);
        }
        Ok(condition_is(&status, "Succeeded").then_some(status))
    })
    .await
}

/// The FineTuneJob's reported step.
async fn step(tunes: &Api<FineTuneJob>, name: &str) -> Result<u64> {
    Ok(status_of(tunes, name).await?["step"].as_u64().unwrap_or(0))
}

async fn until_step(tunes: &Api<FineTuneJob>, name: &str, at_least: u64) -> Result<u64> {
    eventually(&format!("{name} to reach step {at_least}"), RUN, || async {
        let s = step(tunes, name).await?;
        Ok((s >= at_least).then_some(s))
    })
    .await
}

/// What one run of the pipeline produced, reduced to what must not depend on when or
/// how often things were killed.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// Per kind: the content digest of the output (`sha256` in its manifest.json) and
    /// every file's digest.
    outputs: BTreeMap<String, (String, Value)>,
    /// Dataset record counts (read, written, per split).
    counts: Value,
    /// The FineTuneJob's loss at every step, from its manifest.
    losses: Value,
    /// The EvalRun's figures and the answers it scored.
    metrics: BTreeMap<String, String>,
    samples: Value,
    /// The digests of the base model and the prompt the EvalRun read.
    evaluated: (Value, Value),
}

/// Reads what the run in `ns` produced from its status and the store, and checks what
/// must hold of any run: one output directory and one Job per object, status digests
/// that are those of the manifests on disk, one loss per step.
async fn outcome(client: &Client, ns: &str, store: &Path) -> Result<Outcome> {
    let datasets: Api<Dataset> = Api::namespaced(client.clone(), ns);
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), ns);
    let evals: Api<EvalRun> = Api::namespaced(client.clone(), ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let all_jobs = jobs.list(&ListParams::default()).await?.items;
    let mut outputs = BTreeMap::new();
    let mut manifests = BTreeMap::new();
    for (kind, status, uid) in [
        ("dataset", status_of(&datasets, "acme-facts").await?, datasets.get("acme-facts").await?.uid()),
        ("finetunejob", status_of(&tunes, "acme-facts-lora").await?, tunes.get("acme-facts-lora").await?.uid()),
        ("evalrun", status_of(&evals, "acme-facts-lora-eval").await?, evals.get("acme-facts-lora-eval").await?.uid()),
    ] {
        let uid = uid.context("uid")?;
        ensure!(condition_is(&status, "Succeeded"), "{ns} {kind}: {}", status["conditions"]);
        ensure!(!condition_is(&status, "Failed"), "{ns} {kind}: {}", status["conditions"]);
        // One Job per object, whatever was restarted meanwhile.
        let owned = all_jobs
            .iter()
            .filter(|j| j.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)))
            .count();
        ensure!(owned == 1, "{ns} {kind} owns {owned} Jobs");
        // One output: the object's own directory holds exactly its uid's.
        // An EvalRun's output is its results (beside them, their manifest).
        let uri = match status["artifact"]["uri"].as_str() {
            Some(uri) => uri.to_string(),
            None => status["resultsUri"]
                .as_str()
                .and_then(|r| r.rsplit_once('/'))
                .map(|(dir, _)| format!("{dir}/"))
                .with_context(|| format!("{ns} {kind}: no artifact: {status}"))?,
        };
        let key = uri.strip_prefix("store://").with_context(|| format!("{uri} is not in the store"))?;
        let dir = store.join(key.trim_end_matches('/'));
        let object_dir = dir.ancestors().find(|d| d.file_name().is_some_and(|n| n == uid.as_str()));
        let object_dir = object_dir.and_then(Path::parent).with_context(|| format!("{uri} has no {uid} in it"))?;
        let entries: Vec<_> = std::fs::read_dir(object_dir)?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        ensure!(entries.len() == 1, "{ns} {kind}: {} holds {entries:?}", object_dir.display());
        let manifest_path = dir.join("manifest.json");
        let bytes = std::fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
        let on_disk = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        };
        if kind != "evalrun" {
            ensure!(status["artifact"]["sha256"] == on_disk.as_str(), "{ns} {kind}: status and disk disagree");
        }
        let manifest: Value = serde_json::from_slice(&bytes)?;
        let content = manifest["sha256"].as_str().with_context(|| format!("{ns} {kind}: manifest without sha256"))?;
        // An EvalRun's results name the digests of its inputs' manifests, which hold the
        // uid of the object that wrote them: its figures are compared below instead.
        if kind != "evalrun" {
            outputs.insert(kind.to_string(), (content.to_string(), manifest["files"].clone()));
        }
        manifests.insert(kind, (manifest, status));
    }
    let (dataset, dataset_status) = &manifests["dataset"];
    let counts = dataset["counts"].clone();
    ensure!(counts["written"].as_u64() > Some(0), "{ns}: no records written: {counts}");
    ensure!(dataset_status["records"]["output"] == counts["written"], "{ns}: status {dataset_status} vs {counts}");
    let (tune, tune_status) = &manifests["finetunejob"];
    let losses = tune["metrics"]["losses"].clone();
    // Every step once: a resumed run neither repeats nor skips one.
    ensure!(tune["metrics"]["steps"] == MAX_STEPS, "{ns}: {}", tune["metrics"]);
    ensure!(losses.as_array().map(Vec::len) == Some(MAX_STEPS as usize), "{ns}: losses {losses}");
    ensure!(tune_status["progress"] == format!("{MAX_STEPS}/{MAX_STEPS}"), "{ns}: {tune_status}");
    let (eval, eval_status) = &manifests["evalrun"];
    // The EvalRun read this run's own outputs.
    ensure!(eval["inputs"]["datasetDigest"] == dataset["files"]["train.parquet"]["sha256"], "{ns}: {eval}");
    ensure!(eval["inputs"]["adapterDigest"] == tune_status["artifact"]["sha256"], "{ns}: {eval}");
    let metrics: BTreeMap<String, String> = eval_status["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["metric"].as_str().unwrap_or_default().to_string(), m["value"].to_string()))
        .collect();
    ensure!(metrics.len() == 3, "{ns}: {}", eval_status["metrics"]);
    let samples: Vec<Value> = eval_status["failingSamples"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| json!([s["index"], s["output"], s["scores"]]))
        .collect();
    let evaluated = (eval_status["evaluated"]["modelDigest"].clone(), eval_status["evaluated"]["promptDigest"].clone());
    Ok(Outcome { outputs, counts, losses, metrics, samples: Value::Array(samples), evaluated })
}

async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// Writes the tiny random Llama (SmolLM2's tokenizer, fixed seed) where
/// `store://imports/tiny/` of `ns` lies.
fn tiny_model(store: &Path, ns: &str) -> Result<()> {
    let smol =
        llmops_worker::engine::load(&llmops_tests::test_model()?, &candle_core::Device::Cpu, Default::default())?;
    llmops_worker::engine::tiny::write_tiny_llama(&store.join(ns).join("imports/tiny"), &smol, 3)?;
    Ok(())
}

async fn apply_pipeline(client: &Client, ns: &str, manifests: &[Value]) -> Result<()> {
    // In reverse order: each waits for what it references.
    for m in manifests.iter().rev() {
        apply(client, ns, m).await?;
    }
    Ok(())
}

/// The pid of the running worker process of the FineTuneJob (the dev node reports it
/// as containerID `local-process://<pid>`).
async fn worker_pid(client: &Client, ns: &str, uid: &str) -> Result<Option<(String, u32)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default().labels(&format!("llmops.dev/uid={uid}"))).await?.items;
    Ok(list.iter().find_map(|p| {
        let status = p.status.as_ref()?;
        let c = status.container_statuses.as_ref()?.first()?;
        c.state.as_ref()?.running.as_ref()?;
        let pid = c.container_id.as_deref()?.strip_prefix("local-process://")?.parse().ok()?;
        Some((p.name_any(), pid))
    }))
}

#[tokio::test]
async fn a_pipeline_survives_killing_the_operator_a_worker_and_the_apiserver() -> Result<()> {
    let started = Instant::now();
    let cluster = OwnCluster::up("fault")?;
    let client = cluster.client().await?;
    install_crds(&client).await?;
    create_namespace(&client, "llmops-system").await?;
    let work = std::env::temp_dir().join(format!("llmops-fault-{}", std::process::id()));
    let store = work.join("store");
    std::fs::create_dir_all(&store)?;
    let mut operator = OperatorProcess::start(&cluster.kubeconfig, &store, &work.join("operator.log"))?;
    let node_name = "llmops-fault".to_string();
    let node = DevNode::start(
        client.clone(),
        DevNodeConfig::new(node_name.clone(), llmops_tests::worker_binary()?, work.join("pods")),
    )
    .await?;
    let manifests = pipeline(&node_name)?;
    eprintln!("[fault] cluster, operator and dev node up after {:.1?}", started.elapsed());

    // The undisturbed run.
    let clean = "clean";
    create_namespace(&client, clean).await?;
    tiny_model(&store, clean)?;
    apply_pipeline(&client, clean, &manifests).await?;
    let evals: Api<EvalRun> = Api::namespaced(client.clone(), clean);
    succeeded(&evals, "acme-facts-lora-eval").await?;
    let undisturbed = outcome(&client, clean, &store).await?;
    eprintln!("[fault] undisturbed run done after {:.1?}", started.elapsed());

    // The same pipeline, with a fault at each stage of the training.
    let faulted = "faulted";
    create_namespace(&client, faulted).await?;
    tiny_model(&store, faulted)?;
    apply_pipeline(&client, faulted, &manifests).await?;
    let tunes: Api<FineTuneJob> = Api::namespaced(client.clone(), faulted);
    let tune_uid = eventually("the FineTuneJob", RUN, || async { Ok(tunes.get_opt("acme-facts-lora").await?) })
        .await?
        .uid()
        .context("uid")?;

    // 1. The operator dies while the worker trains; the worker reconnects to the new one.
    let at = until_step(&tunes, "acme-facts-lora", 1).await?;
    operator.kill_and_restart()?;
    eprintln!("[fault] killed and restarted the operator at step {at}");
    let resumed = until_step(&tunes, "acme-facts-lora", at + 8).await?;
    eprintln!("[fault] the new operator reports step {resumed}");

    // 2. The worker dies after a checkpoint: its Job starts another pod, which resumes.
    let killed_at = until_step(&tunes, "acme-facts-lora", CHECKPOINT_EVERY * 2 + 1).await?;
    let (pod, pid) = worker_pid(&client, faulted, &tune_uid).await?.context("no running worker process")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)?;
    eprintln!("[fault] killed the worker process {pid} of pod {pod} at step {killed_at}");
    let (second, _) = eventually("a second worker pod", RUN, || async {
        Ok(worker_pid(&client, faulted, &tune_uid).await?.filter(|(p, _)| *p != pod))
    })
    .await?;
    let at = eventually("the second pod to train past the checkpoint", RUN, || async {
        let status = status_of(&tunes, "acme-facts-lora").await?;
        let s = status["step"].as_u64().unwrap_or(0);
        // Past where the first pod was killed: the second one trained, from the checkpoint.
        Ok((status["attempts"].as_i64() >= Some(2) && s > killed_at + 5).then_some(s))
    })
    .await?;
    eprintln!("[fault] pod {second} resumed; step {at}");

    // 3. The apiserver dies and stays down a few seconds; it comes back on the same etcd.
    if at < MAX_STEPS {
        cluster.script("restart", &["kube-apiserver", "--down-for", "3"])?;
        eprintln!("[fault] killed and restarted the kube-apiserver at step {at}");
    } else {
        bail!("the training finished before the apiserver could be killed; raise MAX_STEPS");
    }

    let evals: Api<EvalRun> = Api::namespaced(client.clone(), faulted);
    succeeded(&evals, "acme-facts-lora-eval").await?;
    let disturbed = outcome(&client, faulted, &store).await?;
    let tune_status = status_of(&tunes, "acme-facts-lora").await?;
    ensure!(tune_status["attempts"] == 2, "one retry, for the killed worker: {tune_status}");
    assert_eq!(disturbed, undisturbed, "the faulted run must end as the undisturbed one did");
    eprintln!("[fault] faulted run done, same digests; {:.1?} in all", started.elapsed());

    node.stop().await?;
    drop(operator);
    cluster.remove()?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
