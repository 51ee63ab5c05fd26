//! `operator-load`: the load generator of benches/operator. Creates N custom objects of
//! mixed kinds at a fixed rate across M namespaces of a cluster the operator watches,
//! and measures what the operator does with them: the time from an object's creation
//! to the Job or Deployment it owns (to its first status for kinds that wait for an
//! input), the operator's reconciles (its /metrics), its status writes and apiserver
//! requests (the audit log), and its peak RSS and CPU (/proc). Prints a table, and one
//! JSON line when asked.
//!
//! Nothing runs a worker: a Dataset gets its Job and a ModelDeployment (of a model
//! already in the cache, so no resolver runs) its Deployment, and that is where each
//! stops. A FineTuneJob waits for its Dataset, which never becomes Ready, and a
//! PromptVersion becomes Ready; those two are timed to their first status.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config, ResourceExt};
use llmops_crds::{Dataset, FineTuneJob, ModelDeployment, PromptVersion};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(name = "operator-load", about = "Creates llmops objects at a fixed rate and measures the operator")]
struct Args {
    /// The cluster's kubeconfig (an admin's: it creates namespaces).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// How many objects to create.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Objects created per second.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// How many namespaces (`<prefix>-0` ...) the objects are spread over.
    #[arg(long, default_value_t = 1)]
    namespaces: usize,
    /// Prefix of the namespaces' names.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// The operator's pid, for its RSS and CPU.
    #[arg(long)]
    operator_pid: Option<u32>,
    /// The operator's metrics URL (http://HOST:PORT/metrics), for its reconcile counts.
    #[arg(long)]
    metrics: Option<String>,
    /// The apiserver's audit log, for the operator's requests.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// The user the operator authenticates as (in the audit log).
    #[arg(long, default_value = "system:serviceaccount:llmops-system:llmops-operator")]
    operator_user: String,
    /// How long to wait, after the last object is created, for the rest to be acted on.
    #[arg(long, default_value = "180")]
    settle_seconds: u64,
    /// A label for the table and the JSON line.
    #[arg(long, default_value = "")]
    name: String,
    /// Also print the figures as one JSON line, prefixed `RESULT `.
    #[arg(long)]
    json: bool,
    /// Leave these kinds out of the mix (comma-separated), e.g. to tell one kind's
    /// cost from the others'.
    #[arg(long, value_delimiter = ',')]
    without: Vec<String>,
}

/// The kinds created, in the mix's proportions (out of 20).
const MIX: [(&str, usize); 4] = [("Dataset", 8), ("ModelDeployment", 5), ("FineTuneJob", 4), ("PromptVersion", 3)];

/// The mix after `--without`.
static KINDS: std::sync::OnceLock<Vec<(&'static str, usize)>> = std::sync::OnceLock::new();

/// A model that is already in the store's cache: resolving it needs no Job.
const CACHED_MODEL: &str = "store://models/sha256-0000000000000000000000000000000000000000000000000000000000000001/";

fn kind_of(i: usize) -> &'static str {
    let kinds = KINDS.get().map(Vec::as_slice).unwrap_or(&MIX);
    let mut slot = i % kinds.iter().map(|(_, s)| s).sum::<usize>().max(1);
    for &(kind, share) in kinds {
        if slot < share {
            return kind;
        }
        slot -= share;
    }
    "Dataset"
}

fn example(text: &str) -> Result<Value> {
    Ok(serde_yaml_ng::from_str(text)?)
}

/// The manifest of object `i`: the pipeline examples, made independent of anything a
/// worker would have to produce (except the FineTuneJob's Dataset, on purpose).
fn manifest(i: usize, namespaces: usize, templates: &Templates) -> Value {
    let kind = kind_of(i);
    let mut m = match kind {
        "Dataset" => templates.dataset.clone(),
        "ModelDeployment" => templates.deployment.clone(),
        "FineTuneJob" => templates.tune.clone(),
        _ => templates.prompt.clone(),
    };
    m["metadata"] = json!({"name": format!("{}-{i}", kind.to_lowercase())});
    if kind == "FineTuneJob" {
        // The nearest Dataset created before it in the same namespace (object j goes to
        // namespace j % namespaces).
        let dataset = (1..=i / namespaces).map(|k| i - k * namespaces).find(|&j| kind_of(j) == "Dataset");
        let name = dataset.map(|j| format!("dataset-{j}")).unwrap_or_else(|| "dataset-none".into());
        m["spec"]["dataset"] = json!({"name": name});
    }
    if kind == "PromptVersion" {
        m["spec"]["prompt"] = json!(format!("load-{i}"));
    }
    m
}

struct Templates {
    dataset: Value,
    deployment: Value,
    tune: Value,
    prompt: Value,
}

impl Templates {
    fn new() -> Result<Self> {
        let mut dataset = example(include_str!("../../../examples/pipeline/dataset.yaml"))?;
        if let Some(records) = dataset["spec"]["source"]["inline"].as_array_mut() {
            records.truncate(6);
        }
        let mut deployment = example(include_str!("../../../examples/pipeline/modeldeployment.yaml"))?;
        if let Some(spec) = deployment["spec"].as_object_mut() {
            for field in ["adapters", "prompt", "promotion"] {
                spec.remove(field);
            }
        }
        deployment["spec"]["model"] = json!({"uri": CACHED_MODEL, "format": "hf"});
        let mut tune = example(include_str!("../../../examples/pipeline/finetunejob.yaml"))?;
        tune["spec"]["model"] = json!({"uri": CACHED_MODEL, "format": "hf"});
        let prompt = example(include_str!("../../../examples/pipeline/promptversion.yaml"))?;
        Ok(Self { dataset, deployment, tune, prompt })
    }
}

fn resource(kind: &str) -> ApiResource {
    match kind {
        "Dataset" => ApiResource::erase::<Dataset>(&()),
        "ModelDeployment" => ApiResource::erase::<ModelDeployment>(&()),
        "FineTuneJob" => ApiResource::erase::<FineTuneJob>(&()),
        _ => ApiResource::erase::<PromptVersion>(&()),
    }
}

/// When things happened, by object uid.
#[derive(Default)]
struct Timeline {
    /// uid -> (kind, when its create call returned)
    created: HashMap<String, (&'static str, Instant)>,
    /// owner uid -> when its Job or Deployment was first seen
    owned: HashMap<String, Instant>,
    /// uid -> when it was first seen with a condition
    first_status: HashMap<String, Instant>,
}

/// Samples of the operator process.
#[derive(Default, Clone, Copy)]
struct ProcessFigures {
    peak_rss_kib: u64,
    hwm_kib: u64,
    cpu_ticks: u64,
    peak_cores: f64,
}

fn read_process(pid: u32) -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((ticks, kib("VmRSS:")?, kib("VmHWM:")?))
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// `llmops_operator_reconcile_total` by kind, from the operator's metrics.
async fn reconciles(url: &str) -> Result<BTreeMap<String, f64>> {
    let rest = url.strip_prefix("http://").context("--metrics must be an http:// URL")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/metrics".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await.with_context(|| format!("connecting to {host}"))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("llmops_operator_reconcile_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let kind = labels.split("kind=\"").nth(1).and_then(|k| k.split('"').next()).unwrap_or("?");
        *out.entry(kind.to_string()).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// The operator's requests in the audit log between `from` and `to`, counted once per
/// audit ID: (verb resource[/subresource] -> count).
fn audited(paths: &[PathBuf], user: &str, from: Timestamp, to: Timestamp) -> Result<BTreeMap<String, u64>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
            if event["user"]["username"] != user {
                continue;
            }
            let Some(at) = event["requestReceivedTimestamp"].as_str().and_then(|t| t.parse::<Timestamp>().ok()) else {
                continue;
            };
            if at < from || at > to {
                continue;
            }
            let id = event["auditID"].as_str().unwrap_or_default().to_string();
            if !seen.insert(id) {
                continue;
            }
            let object = &event["objectRef"];
            let mut what = object["resource"].as_str().unwrap_or("-").to_string();
            if let Some(sub) = object["subresource"].as_str() {
                what = format!("{what}/{sub}");
            }
            *out.entry(format!("{} {what}", event["verb"].as_str().unwrap_or("?"))).or_insert(0) += 1;
        }
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    json!({"n": values.len(), "p50": percentile(&values, 50.0), "p99": percentile(&values, 99.0),
           "max": values.last().copied().unwrap_or(f64::NAN)})
}

async fn client(path: &PathBuf) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_secs(300));
    Ok(Client::try_from(config)?)
}

/// Records the first Job/Deployment of each owner and the first status of each object.
fn watch_all(client: &Client, timeline: &Arc<Mutex<Timeline>>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let owned = |timeline: Arc<Mutex<Timeline>>,
                 refs: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>| {
        let now = Instant::now();
        let mut t = timeline.lock().unwrap_or_else(|e| e.into_inner());
        for r in refs.into_iter().filter(|r| r.controller == Some(true)) {
            t.owned.entry(r.uid).or_insert(now);
        }
    };
    {
        let (api, timeline) = (Api::<Job>::all(client.clone()), timeline.clone());
        tasks.push(tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event {
                    owned(timeline.clone(), o.owner_references().to_vec());
                }
            }
        }));
    }
    {
        let (api, timeline) = (Api::<Deployment>::all(client.clone()), timeline.clone());
        tasks.push(tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event {
                    owned(timeline.clone(), o.owner_references().to_vec());
                }
            }
        }));
    }
    for (kind, _) in MIX {
        let ar = resource(kind);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let timeline = timeline.clone();
        tasks.push(tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event {
                    let has_status = o.data["status"]["conditions"].as_array().is_some_and(|c| !c.is_empty());
                    if let (true, Some(uid)) = (has_status, o.uid()) {
                        let now = Instant::now();
                        timeline.lock().unwrap_or_else(|e| e.into_inner()).first_status.entry(uid).or_insert(now);
                    }
                }
            }
        }));
    }
    tasks
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.count == 0 || args.namespaces == 0 || args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--count, --namespaces and --rate must be positive");
    }
    for kind in &args.without {
        if !MIX.iter().any(|(k, _)| k == kind) {
            bail!("--without: unknown kind {kind:?} (one of Dataset, ModelDeployment, FineTuneJob, PromptVersion)");
        }
    }
    let kinds: Vec<_> = MIX.into_iter().filter(|(k, _)| !args.without.iter().any(|w| w == k)).collect();
    if kinds.is_empty() {
        bail!("--without leaves no kind to create");
    }
    let _ = KINDS.set(kinds);
    let client = client(&args.kubeconfig).await?;
    let templates = Templates::new()?;
    let namespaces: Vec<String> = (0..args.namespaces).map(|i| format!("{}-{i}", args.prefix)).collect();
    let ns_api: Api<Namespace> = Api::all(client.clone());
    for ns in &namespaces {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        match ns_api.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("creating namespace {ns}")),
        }
    }

    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let watchers = watch_all(&client, &timeline);
    // Let the watches list what is there before anything is created.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = match &args.metrics {
        Some(url) => Some(reconciles(url).await?),
        None => None,
    };
    let ticks_per_second = clock_ticks();
    let process = Arc::new(Mutex::new(ProcessFigures::default()));
    let sampler = args.operator_pid.map(|pid| {
        let process = process.clone();
        tokio::spawn(async move {
            let mut last: Option<(u64, Instant)> = None;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some((ticks, rss, hwm)) = read_process(pid) else { continue };
                let now = Instant::now();
                let mut p = process.lock().unwrap_or_else(|e| e.into_inner());
                p.peak_rss_kib = p.peak_rss_kib.max(rss);
                p.hwm_kib = hwm;
                if let Some((t0, at)) = last {
                    let cores = (ticks - t0) as f64 / ticks_per_second / now.duration_since(at).as_secs_f64();
                    p.peak_cores = p.peak_cores.max(cores);
                }
                p.cpu_ticks = ticks;
                last = Some((ticks, now));
            }
        })
    });
    let ticks_at_start = args.operator_pid.and_then(read_process).map(|(t, _, _)| t).unwrap_or(0);

    let wall_start = Timestamp::now();
    let start = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..args.count {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = limit.clone().acquire_owned().await?;
        let kind = kind_of(i);
        let ns = namespaces[i % namespaces.len()].clone();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource(kind));
        let obj: DynamicObject = serde_json::from_value(manifest(i, namespaces.len(), &templates))?;
        let (timeline, errors) = (timeline.clone(), errors.clone());
        creates.spawn(async move {
            let _permit = permit;
            match api.create(&PostParams::default(), &obj).await {
                Ok(created) => {
                    let now = Instant::now();
                    let uid = created.uid().unwrap_or_default();
                    timeline.lock().unwrap_or_else(|e| e.into_inner()).created.insert(uid, (kind, now));
                }
                Err(e) => errors.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{kind} {i} in {ns}: {e}")),
            }
        });
        if i > 0 && i % 1000 == 0 {
            eprintln!("[load] {i}/{} created in {:.1?}", args.count, start.elapsed());
        }
    }
    while creates.join_next().await.is_some() {}
    let created_in = start.elapsed();
    eprintln!("[load] {} created in {created_in:.1?}", args.count);

    // Until every object was acted on (or the settle time ran out).
    let deadline = Instant::now() + Duration::from_secs(args.settle_seconds);
    let done_at = loop {
        let (pending, last) = {
            let t = timeline.lock().unwrap_or_else(|e| e.into_inner());
            let mut pending = 0;
            let mut last = start;
            for (uid, (kind, _)) in &t.created {
                let seen = match *kind {
                    "Dataset" | "ModelDeployment" => t.owned.get(uid),
                    _ => t.first_status.get(uid),
                };
                match seen {
                    Some(at) => last = last.max(*at),
                    None => pending += 1,
                }
            }
            (pending, last)
        };
        if pending == 0 {
            break last;
        }
        if Instant::now() > deadline {
            eprintln!("[load] {pending} objects not acted on after {}s of settling", args.settle_seconds);
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A little more, for the status writes that follow the last owned object.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = done_at.duration_since(start).as_secs_f64();
    let wall_end = Timestamp::now();
    for w in watchers {
        w.abort();
    }
    if let Some(s) = sampler {
        s.abort();
    }

    let after = match &args.metrics {
        Some(url) => Some(reconciles(url).await?),
        None => None,
    };
    let t = timeline.lock().unwrap_or_else(|e| e.into_inner());
    let mut latency: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut owned_all = Vec::new();
    let mut missing: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (uid, (kind, at)) in &t.created {
        *by_kind.entry(kind).or_insert(0) += 1;
        let seen = match *kind {
            "Dataset" | "ModelDeployment" => t.owned.get(uid),
            _ => t.first_status.get(uid),
        };
        match seen {
            // A watch event can beat the create call's response home: count it as 0.
            Some(seen) => {
                let s = seen.saturating_duration_since(*at).as_secs_f64();
                latency.entry(kind).or_default().push(s);
                if matches!(*kind, "Dataset" | "ModelDeployment") {
                    owned_all.push(s);
                }
            }
            None => *missing.entry(kind).or_insert(0) += 1,
        }
    }
    let process = *process.lock().unwrap_or_else(|e| e.into_inner());
    let reconciled: Option<BTreeMap<String, f64>> = before.zip(after).map(|(b, a)| {
        a.iter().map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0))).filter(|(_, v)| *v > 0.0).collect()
    });
    let audit = match &args.audit_log {
        Some(path) => {
            let mut paths = vec![path.clone()];
            // Rotated files (audit-<time>.log) beside it.
            if let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) {
                for entry in std::fs::read_dir(dir)?.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&format!("{stem}-")) && name.ends_with(".log") {
                        paths.push(entry.path());
                    }
                }
            }
            Some(audited(&paths, &args.operator_user, wall_start, wall_end)?)
        }
        None => None,
    };
    let audit_seconds = (wall_end.as_millisecond() - wall_start.as_millisecond()) as f64 / 1000.0;
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner()).clone();

    let n = args.count as f64;
    let mut figures = json!({
        "name": args.name,
        "objects": args.count,
        "namespaces": args.namespaces,
        "rate": args.rate,
        "created_per_second": args.count as f64 / created_in.as_secs_f64(),
        "kinds": by_kind,
        "create_errors": errors.len(),
        "not_acted_on": missing,
        "window_seconds": window,
        "owned_latency": summary(owned_all),
        "latency": latency.into_iter().map(|(k, v)| (k.to_string(), summary(v))).collect::<BTreeMap<_, _>>(),
    });
    if let Some(r) = &reconciled {
        let total: f64 = r.values().sum();
        figures["reconciles"] =
            json!({"total": total, "per_second": total / window, "per_object": total / n, "by_kind": r});
    }
    if let Some(a) = &audit {
        let total: u64 = a.values().sum();
        let status_writes: u64 = a
            .iter()
            .filter(|(k, _)| (k.starts_with("patch ") || k.starts_with("update ")) && k.ends_with("/status"))
            .filter(|(k, _)| !k.contains(" pods/") && !k.contains(" jobs/") && !k.contains(" deployments/"))
            .map(|(_, v)| v)
            .sum();
        let mut top: Vec<(&String, &u64)> = a.iter().collect();
        top.sort_by(|x, y| y.1.cmp(x.1));
        figures["apiserver"] = json!({
            "requests": total, "seconds": audit_seconds, "per_second": total as f64 / audit_seconds,
            "per_object": total as f64 / n,
            "status_writes": status_writes, "status_writes_per_object": status_writes as f64 / n,
            "top": top.iter().take(8).map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        });
    }
    if args.operator_pid.is_some() {
        let cpu = (process.cpu_ticks.saturating_sub(ticks_at_start)) as f64 / ticks_per_second;
        figures["operator"] = json!({
            "peak_rss_mib": process.hwm_kib.max(process.peak_rss_kib) as f64 / 1024.0,
            "cpu_seconds": cpu, "cpu_cores_mean": cpu / window, "cpu_cores_peak": process.peak_cores,
        });
    }
    print_table(&figures);
    for e in errors.iter().take(5) {
        eprintln!("[load] create failed: {e}");
    }
    if args.json {
        println!("RESULT {figures}");
    }
    Ok(())
}

fn print_table(f: &Value) {
    let ms = |v: &Value| format!("{:.0} ms", v.as_f64().unwrap_or(f64::NAN) * 1000.0);
    let line = |label: &str, value: String| println!("| {label:<44} | {value:<40} |");
    println!(
        "\n{} — {} objects in {} namespace(s) at {}/s",
        if f["name"] == "" { "operator load" } else { f["name"].as_str().unwrap_or_default() },
        f["objects"],
        f["namespaces"],
        f["rate"]
    );
    println!("| {:<44} | {:<40} |", "figure", "value");
    println!("|{}|{}|", "-".repeat(46), "-".repeat(42));
    line("created per second (achieved)", format!("{:.1}", f["created_per_second"].as_f64().unwrap_or(0.0)));
    line("kinds", f["kinds"].to_string());
    let o = &f["owned_latency"];
    line(
        "created -> owned Job/Deployment p50 / p99",
        format!("{} / {} (max {})", ms(&o["p50"]), ms(&o["p99"]), ms(&o["max"])),
    );
    for (kind, s) in f["latency"].as_object().into_iter().flatten() {
        let what = if kind == "Dataset" {
            "Job"
        } else if kind == "ModelDeployment" {
            "Deployment"
        } else {
            "first status"
        };
        line(&format!("  {kind} -> {what} p50 / p99"), format!("{} / {} (n={})", ms(&s["p50"]), ms(&s["p99"]), s["n"]));
    }
    line("not acted on / create errors", format!("{} / {}", f["not_acted_on"], f["create_errors"]));
    line("window: first create -> last acted on", format!("{:.1} s", f["window_seconds"].as_f64().unwrap_or(0.0)));
    if let Some(r) = f.get("reconciles") {
        line(
            "reconciles (total, per s, per object)",
            format!(
                "{:.0}, {:.1}/s, {:.2}",
                r["total"].as_f64().unwrap_or(0.0),
                r["per_second"].as_f64().unwrap_or(0.0),
                r["per_object"].as_f64().unwrap_or(0.0)
            ),
        );
    }
    if let Some(a) = f.get("apiserver") {
        line("status writes per object", format!("{:.2}", a["status_writes_per_object"].as_f64().unwrap_or(0.0)));
        line(
            "apiserver requests by the operator",
            format!(
                "{} ({:.1}/s, {:.2} per object)",
                a["requests"],
                a["per_second"].as_f64().unwrap_or(0.0),
                a["per_object"].as_f64().unwrap_or(0.0)
            ),
        );
        for t in a["top"].as_array().into_iter().flatten() {
            line(&format!("  {}", t[0].as_str().unwrap_or_default()), t[1].to_string());
        }
    }
    if let Some(p) = f.get("operator") {
        line("operator peak RSS", format!("{:.1} MiB", p["peak_rss_mib"].as_f64().unwrap_or(0.0)));
        line(
            "operator CPU (total, mean cores, peak cores)",
            format!(
                "{:.1} s, {:.2}, {:.2}",
                p["cpu_seconds"].as_f64().unwrap_or(0.0),
                p["cpu_cores_mean"].as_f64().unwrap_or(0.0),
                p["cpu_cores_peak"].as_f64().unwrap_or(0.0)
            ),
        );
    }
}
