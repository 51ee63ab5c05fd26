//! What every reconcile gets: the client, the configuration, metrics, the gateway and
//! the event recorder.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube::Client;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::config::Config;
use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// An object waiting for something to settle: (kind, namespace, name).
pub type Waiter = (String, String, String);

/// Shared state of the controllers.
pub struct Context {
    /// Client of the apiserver.
    pub client: Client,
    /// The operator's configuration.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The worker gateway.
    pub gateway: Arc<Gateway>,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// When a checkpoint-and-stop was asked of a workload's worker, by uid.
    pub stop_requests: Mutex<HashMap<String, Instant>>,
    /// Objects waiting for a model resolution, by record name.
    pub model_waiters: Mutex<HashMap<String, BTreeSet<Waiter>>>,
    /// The key that seals the operator's state in tenants' namespaces (crate::seal).
    pub state_key: tokio::sync::OnceCell<Vec<u8>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Context {
    /// A context for the controllers.
    pub fn new(client: Client, config: Config, metrics: Arc<Metrics>, gateway: Arc<Gateway>) -> Self {
        let reporter = Reporter { controller: "llmops-operator".into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            gateway,
            stop_requests: Mutex::new(HashMap::new()),
            model_waiters: Mutex::new(HashMap::new()),
            state_key: tokio::sync::OnceCell::new(),
        }
    }

    /// Publishes an event about `obj`; failures to publish are logged, not returned.
    pub async fn event<K: Resource<DynamicType = ()>>(&self, obj: &K, warning: bool, reason: &str, note: String) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.chars().take(128).collect(),
            note: Some(note.chars().take(1024).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish an event");
        }
    }
}
