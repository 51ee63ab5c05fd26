//! `llmops-dev-node`: the development node agent (see `llmops_tests::dev_node`). It
//! registers a Node and runs the worker container of each pod bound to it as a local
//! process, for the quick start and local experiments on machines without a container
//! runtime. Never part of the chart.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use llmops_tests::dev_node::{self, DevNodeConfig};

/// Runs the containers of pods bound to one Node as local processes.
#[derive(Debug, Parser)]
#[command(name = "llmops-dev-node", version)]
struct Args {
    /// Kubeconfig of the cluster (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Name of the Node to register.
    #[arg(long, default_value = "llmops-dev")]
    node_name: String,
    /// The llmops-worker a container command `llmops-worker` runs (default: the one
    /// beside this binary).
    #[arg(long, value_name = "PATH")]
    worker_binary: Option<PathBuf>,
    /// Directory of per-pod dirs (materialised volumes, scratch, the log).
    #[arg(long, value_name = "DIR", default_value = "llmops-dev-node")]
    work_dir: PathBuf,
    /// CPU capacity of the Node (default: this machine's CPUs).
    #[arg(long)]
    cpu: Option<String>,
    /// Memory capacity of the Node (default: this machine's memory).
    #[arg(long)]
    memory: Option<String>,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<()> {
    let worker = match args.worker_binary {
        Some(path) => path,
        None => std::env::current_exe()?.parent().context("the binary has no directory")?.join("llmops-worker"),
    };
    if !worker.is_file() {
        anyhow::bail!("the worker binary {} does not exist; build it or pass --worker-binary", worker.display());
    }
    let work_dir = std::path::absolute(&args.work_dir)?;
    let mut config = DevNodeConfig::new(args.node_name, worker, work_dir);
    if let Some(cpu) = args.cpu {
        config.cpu = cpu;
    }
    if let Some(memory) = args.memory {
        config.memory = memory;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let kube_config = match &args.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
            }
            None => kube::Config::infer().await?,
        };
        let client = kube::Client::try_from(kube_config)?;
        dev_node::run(client, config).await
    })
}
