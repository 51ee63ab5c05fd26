//! `llmops-operator`: the operator binary. `run` runs the controllers, the worker
//! gateway and the metrics server; `crds` prints or writes the CustomResource-
//! Definitions of the five kinds, as the chart and `kubectl apply` install them.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "llmops-operator", version, about = "The llmops Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers, the worker gateway and the metrics server.
    Run(Box<llmops_operator::RunArgs>),
    /// Print the CRDs of all llmops kinds as one multi-document YAML stream
    /// (`llmops-operator crds | kubectl apply --server-side -f -`).
    Crds {
        /// Write one file per CRD (<plural>.yaml) into DIR instead of printing.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { write } => crds(write),
        Command::Run(args) => run(*args),
    }
}

fn run(args: llmops_operator::RunArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,tower=warn,h2=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format.as_str() {
        "json" => builder.json().init(),
        _ => builder.init(),
    }
    let config = llmops_operator::Config::from(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        let election = config.leader_election.clone();
        tokio::select! {
            r = llmops_operator::run(client.clone(), config) => r,
            () = stop_signal() => {
                tracing::info!("asked to stop; stopping");
                // Hand the Lease over now rather than after it runs out.
                if let Some(election) = election {
                    llmops_operator::leader::release(&client, &election).await;
                }
                Ok(())
            }
        }
    })
}

/// Resolves on SIGTERM (what Kubernetes sends a pod) or Ctrl-C.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        return;
    }
    let _ = ctrl_c.await;
}

fn crds(write: Option<PathBuf>) -> Result<()> {
    let manifests = llmops_crds::crd_manifests().context("serializing the CRDs")?;
    match write {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, yaml) in manifests {
                let path = dir.join(&name);
                std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
        }
        None => {
            let mut out = std::io::stdout().lock();
            for (i, (_, yaml)) in manifests.iter().enumerate() {
                if i > 0 {
                    writeln!(out, "---")?;
                }
                out.write_all(yaml.as_bytes())?;
            }
        }
    }
    Ok(())
}
