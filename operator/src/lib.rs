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
pub mod metrics;
pub mod pods;
pub mod status;
pub mod workload;

use std::sync::Arc;

pub use config::{Config, RunArgs, StoreConfig, StoreVolume};
pub use error::Error;
pub(crate) use gateway::lock;

/// Runs the operator (controllers, gateway, metrics server) until the future is dropped
/// or one of its parts fails.
pub async fn run(client: kube::Client, config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let gateway = gateway::Gateway::new(metrics.clone(), config.progress_interval);
    let listener = tokio::net::TcpListener::bind(config.gateway_listen).await?;
    tracing::info!(addr = %config.gateway_listen, advertised = %config.gateway_address, "worker gateway listening");
    // However run() ends (an error, or its caller dropping it), open worker sessions end
    // with it, so workers reconnect to the next operator instead of waiting on this one.
    let _sessions = EndSessionsOnDrop(gateway.clone());
    let ctx = Arc::new(context::Context::new(client, config.clone(), metrics.clone(), gateway.clone()));
    let gateway_task = gateway::service::serve_with_listener(listener, gateway, std::future::pending());
    let metrics_task = async {
        match config.metrics_listen {
            Some(addr) => metrics::serve(addr, metrics.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = gateway_task => r.map_err(|e| anyhow::anyhow!("worker gateway: {e}")),
        r = metrics_task => r.map_err(|e| anyhow::anyhow!("metrics server: {e}")),
        () = controllers::run(ctx) => Err(anyhow::anyhow!("the controllers stopped")),
    }
}

/// Shuts the gateway's sessions down when dropped.
struct EndSessionsOnDrop(Arc<gateway::Gateway>);

impl Drop for EndSessionsOnDrop {
    fn drop(&mut self) {
        self.0.shut_down();
    }
}
