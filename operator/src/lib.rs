//! The llmops operator as a library: controllers for the llmops.dev kinds, the worker
//! gateway they talk to workers through, and metrics. `llmops-operator run` calls
//! [`run`]; tests start the same function on their own runtime and abort it to play an
//! operator restart.
#![forbid(unsafe_code)]

pub mod assignment;
pub mod conditions;
pub mod config;
pub mod context;
pub mod controllers;
pub mod error;
pub mod gateway;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod models;
pub mod pods;
pub mod seal;
pub mod secrets;
pub mod status;
pub mod tenancy;
pub mod workload;

use std::sync::Arc;

use anyhow::Context as _;

pub use config::{Config, GatewayTls, RunArgs, StoreConfig, StoreVolume};
pub use error::Error;
pub(crate) use gateway::lock;

/// Runs the operator (controllers, gateway, metrics server) until the future is dropped
/// or one of its parts fails. With leader election, the gateway and the controllers
/// start only once this replica holds the Lease, and `run` fails when it loses it.
pub async fn run(client: kube::Client, config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    // Probes answer from the start; /readyz turns true once this replica works.
    let metrics_task = async {
        match config.metrics_listen {
            Some(addr) => metrics::serve(addr, metrics.clone()).await,
            None => std::future::pending().await,
        }
    };
    let working = async {
        // With leader election, nothing else runs until this replica holds the Lease.
        let lost: std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> = match &config.leader_election {
            Some(election) => {
                leader::acquire(&client, election).await;
                let (client, election) = (client.clone(), election.clone());
                Box::pin(async move { leader::keep(&client, &election).await.to_string() })
            }
            None => Box::pin(std::future::pending()),
        };
        let result = work(client.clone(), config.clone(), metrics.clone(), lost).await;
        if let Some(election) = &config.leader_election {
            leader::release(&client, election).await;
        }
        result
    };
    tokio::select! {
        r = metrics_task => r.map_err(|e| anyhow::anyhow!("metrics server: {e}")),
        r = working => r,
    }
}

/// The operator's work: the gateway and the controllers, until one fails or `lost`
/// says the Lease is gone.
async fn work(
    client: kube::Client,
    config: Config,
    metrics: Arc<metrics::Metrics>,
    lost: impl std::future::Future<Output = String>,
) -> anyhow::Result<()> {
    // Worker pods are told the CA of the gateway's certificate, so they verify it.
    let tls = gateway::tls::load(&client, &config).await.context("the worker gateway's TLS certificate")?;
    let mut config = config;
    config.gateway_ca = tls.as_ref().map(|m| m.ca_pem.clone());
    let gateway = gateway::Gateway::new(metrics.clone(), config.progress_interval);
    let listener = tokio::net::TcpListener::bind(config.gateway_listen).await?;
    tracing::info!(
        addr = %config.gateway_listen,
        advertised = %config.gateway_address,
        tls = tls.is_some(),
        "worker gateway listening"
    );
    // However this ends (an error, or its caller dropping it), open worker sessions end
    // with it, so workers reconnect to the next operator instead of waiting on this one.
    let _sessions = EndSessionsOnDrop(gateway.clone());
    let ctx = Arc::new(context::Context::new(client, config.clone(), metrics.clone(), gateway.clone()));
    let gateway_task = gateway::service::serve_with_listener(
        listener,
        gateway,
        tls.as_ref().map(gateway::tls::server_config),
        std::future::pending(),
    );
    let result = tokio::select! {
        r = gateway_task => r.map_err(|e| anyhow::anyhow!("worker gateway: {e}")),
        () = controllers::run(ctx) => Err(anyhow::anyhow!("the controllers stopped")),
        why = lost => Err(anyhow::anyhow!("lost leadership: {why}")),
    };
    metrics.set_ready(false);
    result
}

/// Shuts the gateway's sessions down when dropped.
struct EndSessionsOnDrop(Arc<gateway::Gateway>);

impl Drop for EndSessionsOnDrop {
    fn drop(&mut self) {
        self.0.shut_down();
    }
}
