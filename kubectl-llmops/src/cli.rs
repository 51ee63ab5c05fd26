//! The command line: kubectl's connection flags, the four commands, and running them
//! against the cluster (the pure work lives in `tree`, `lineage`, `chat` and `logs`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use llmops_crds::ModelDeployment;

use crate::chat::{ChatError, Conversation, Settings};
use crate::lineage;
use crate::logs;
use crate::objects::{ObjectRef, Snapshot};
use crate::style::Paint;
use crate::tree;

/// kubectl plugin for llmops: the pipeline as a tree, lineage back to the raw data, a
/// chat through a deployment, and the logs of the pods that did the work.
#[derive(Debug, Parser)]
#[command(name = "kubectl-llmops", bin_name = "kubectl llmops", version)]
pub struct Cli {
    /// How to reach the cluster, as kubectl does.
    #[command(flatten)]
    pub connect: Connect,
    /// Colour: auto (when stdout is a terminal and NO_COLOR is unset), always or never.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, help_heading = "Output")]
    pub color: ColorChoice,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// kubectl's connection flags.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cluster")]
pub struct Connect {
    /// The kubeconfig file (default: $KUBECONFIG, which may list several files, then
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
}

/// When to colour the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    // (No doc comments: clap would list each value under every command's --help.)
    Auto,
    Always,
    Never,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The pipeline as a tree: every Dataset, FineTuneJob, EvalRun, PromptVersion and
    /// ModelDeployment under what it depends on, with its Ready condition, phase,
    /// progress and why it failed.
    Status {
        /// Every namespace, each under its own heading.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Messages in full rather than cut at 200 characters.
        #[arg(long)]
        wide: bool,
    },
    /// What an object was built from, back to the raw data and the base model, with the
    /// sha256 each input had when it was used.
    Lineage {
        /// KIND/NAME: dataset/acme-facts, ftj/acme-facts-lora, md/acme-support, …
        object: ObjectRef,
        /// Full sha256 digests rather than their first 12 digits.
        #[arg(long)]
        full: bool,
    },
    /// Chat with a ModelDeployment through its endpoint: one --message, or a
    /// conversation read line by line from stdin (Ctrl-D ends it).
    Chat {
        /// The ModelDeployment.
        deployment: String,
        /// The served model: an adapter's name (default: the deployment's base model,
        /// served under the deployment's name).
        #[arg(long)]
        model: Option<String>,
        /// Send this one message, print the answer and exit.
        #[arg(long)]
        message: Option<String>,
        /// API key sent as a bearer token, for deployments with apiKeys.
        #[arg(long, env = "LLMOPS_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Base URL (up to /v1) to use instead of status.endpoint, e.g. through
        /// `kubectl port-forward`.
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Sampling temperature (default: the deployment's prompt's, else the server's).
        #[arg(long)]
        temperature: Option<f64>,
        /// Seconds one answer may take.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// The logs of the worker pod that ran an object (the newest one, or all of them).
    Logs {
        /// KIND/NAME: dataset/acme-facts, ftj/acme-facts-lora, md/acme-support, …
        object: ObjectRef,
        /// Keep streaming the (newest) pod's log.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Every pod that worked for the object, oldest first, each under a heading.
        #[arg(long)]
        all_pods: bool,
        /// Only the last N lines of each pod.
        #[arg(long, value_name = "N")]
        tail: Option<i64>,
        /// The container, for pods with several.
        #[arg(short = 'c', long)]
        container: Option<String>,
    },
}

/// A client of the cluster and the namespace to work in, read as kubectl reads them.
pub async fn connect(c: &Connect) -> Result<(Client, String)> {
    let options = KubeConfigOptions { context: c.context.clone(), ..KubeConfigOptions::default() };
    let config = match &c.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None if c.context.is_some() => {
            Config::from_kubeconfig(&options).await.context("using the kubeconfig ($KUBECONFIG or ~/.kube/config)")?
        }
        None => Config::infer()
            .await
            .context("no kubeconfig found ($KUBECONFIG, ~/.kube/config, --kubeconfig) and not running in a cluster")?,
    };
    let namespace = c.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("making a Kubernetes client")?;
    Ok((client, namespace))
}

/// Runs the command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> Result<()> {
    let color = match cli.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let paint = Paint::new(color);
    let (client, namespace) = connect(&cli.connect).await?;
    match cli.command {
        Command::Status { all_namespaces, wide } => {
            let scope = (!all_namespaces).then_some(namespace.as_str());
            let snapshot = Snapshot::fetch(&client, scope).await?;
            if snapshot.is_empty() {
                match scope {
                    Some(ns) => writeln!(out, "No llmops objects in namespace {ns}.")?,
                    None => writeln!(out, "No llmops objects in any namespace.")?,
                }
                return Ok(());
            }
            let namespaces: Vec<String> =
                if all_namespaces { snapshot.namespaces().into_iter().collect() } else { vec![namespace] };
            out.write_all(tree::render(&snapshot, &namespaces, all_namespaces, wide, &paint).as_bytes())?;
        }
        Command::Lineage { object, full } => {
            let snapshot = Snapshot::fetch(&client, Some(&namespace)).await?;
            let root = lineage::walk(&snapshot, &namespace, &object)?;
            out.write_all(lineage::render(&root, full, &paint).as_bytes())?;
        }
        Command::Chat { deployment, model, message, api_key, endpoint, max_tokens, temperature, timeout } => {
            let api: Api<ModelDeployment> = Api::namespaced(client, &namespace);
            let md = api
                .get_opt(&deployment)
                .await
                .with_context(|| format!("reading ModelDeployment {deployment}"))?
                .ok_or_else(|| ChatError::NotFound { name: deployment.clone(), namespace: namespace.clone() })?;
            let base = match (crate::chat::endpoint(&md), endpoint) {
                (Ok(_) | Err(ChatError::NoEndpoint { .. }), Some(given)) => given,
                (Ok(found), None) => found,
                (Err(e), _) => return Err(e.into()),
            };
            let settings = Settings {
                model: model.unwrap_or_else(|| deployment.clone()),
                max_tokens: Some(max_tokens),
                temperature,
                api_key: api_key.filter(|k| !k.is_empty()),
                timeout: Duration::from_secs(timeout),
            };
            chat(base, settings, message, out).await?;
        }
        Command::Logs { object, follow, all_pods, tail, container } => {
            let req = logs::Request { object, namespace, follow, all_pods, tail, container };
            logs::show(&client, &req, out).await?;
        }
    }
    Ok(())
}

async fn chat(base: String, settings: Settings, message: Option<String>, out: &mut impl Write) -> Result<()> {
    let model = settings.model.clone();
    let mut conversation = Conversation::new(&base, settings).context("making an HTTP client")?;
    if let Some(message) = message {
        let reply = conversation.say(&message).await?;
        writeln!(out, "{reply}")?;
        return Ok(());
    }
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!("Chatting with model {model} at {base}; an empty line is skipped, Ctrl-D ends.");
    }
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let reply = conversation.say(text).await?;
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    if interactive {
        eprintln!();
    }
    Ok(())
}
