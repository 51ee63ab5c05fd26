//! Operator configuration: the flags of `llmops-operator run` and the settings the
//! controllers and the gateway derive from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Flags of `llmops-operator run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Namespace to watch; repeat for several. Without it every namespace is watched.
    #[arg(long = "namespace", value_name = "NS", env = "LLMOPS_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Worker image for pods without a GPU.
    #[arg(long, env = "LLMOPS_WORKER_IMAGE", default_value = "ghcr.io/llmops-dev/llmops-worker:latest")]
    pub worker_image: String,
    /// Worker image (built with the cuda feature) for pods with a GPU.
    #[arg(long, env = "LLMOPS_WORKER_CUDA_IMAGE", default_value = "ghcr.io/llmops-dev/llmops-worker:latest-cuda")]
    pub worker_cuda_image: String,
    /// Image pull policy of worker pods (Always, IfNotPresent, Never).
    #[arg(long, default_value = "IfNotPresent")]
    pub image_pull_policy: String,
    /// ReadWriteMany PersistentVolumeClaim holding the artifact store (in each workload's
    /// namespace), mounted at --store-mount-path in every worker pod.
    #[arg(long, value_name = "CLAIM", conflicts_with_all = ["store_host_path", "s3_bucket"])]
    pub store_pvc: Option<String>,
    /// A directory on the node used as the store (development clusters only), mounted at
    /// --store-mount-path in every worker pod.
    #[arg(long, value_name = "DIR", conflicts_with = "s3_bucket")]
    pub store_host_path: Option<PathBuf>,
    /// Path of the store root inside worker pods.
    #[arg(long, default_value = "/var/lib/llmops/store")]
    pub store_mount_path: PathBuf,
    /// S3 bucket of the artifact store (instead of a volume).
    #[arg(long, value_name = "BUCKET")]
    pub s3_bucket: Option<String>,
    /// Key prefix of the store root in the bucket.
    #[arg(long, default_value = "")]
    pub s3_prefix: String,
    /// Endpoint URL of an S3-compatible service; empty for AWS.
    #[arg(long, default_value = "")]
    pub s3_endpoint: String,
    /// Region of the bucket.
    #[arg(long, default_value = "us-east-1")]
    pub s3_region: String,
    /// Allow a plain http S3 endpoint.
    #[arg(long)]
    pub s3_allow_http: bool,
    /// Secret (in each workload's namespace) with keys AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, passed to worker pods as environment variables.
    #[arg(long, value_name = "SECRET")]
    pub s3_credentials_secret: Option<String>,
    /// Address the worker gateway (gRPC) listens on.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub gateway_listen: SocketAddr,
    /// TLS of the worker gateway: `generate` (a CA and a certificate for the host of
    /// --gateway-address, made once and kept in the Secret llmops-gateway-tls of the
    /// operator's namespace), `secret` (the kubernetes.io/tls Secret
    /// --gateway-tls-secret there), or `off` (plaintext h2c, for development).
    #[arg(long, default_value = "generate", value_parser = ["generate", "secret", "off"])]
    pub gateway_tls: String,
    /// Secret (in the operator's namespace) with tls.crt, tls.key and optionally ca.crt,
    /// for --gateway-tls secret.
    #[arg(long, value_name = "SECRET", required_if_eq("gateway_tls", "secret"))]
    pub gateway_tls_secret: Option<String>,
    /// host:port worker pods dial to reach the gateway (LLMOPS_GATEWAY).
    #[arg(long, env = "LLMOPS_GATEWAY_ADDRESS", default_value = "llmops-operator-gateway.llmops-system.svc:9090")]
    pub gateway_address: String,
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Least time between two status writes caused by progress events of one workload.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub progress_interval: Duration,
    /// How long suspend or deletion of a FineTuneJob waits for the worker to checkpoint
    /// and stop before the pod is removed anyway.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub checkpoint_grace: Duration,
    /// Address ModelDeployments by the IP of a ready serving pod (from their Service's
    /// EndpointSlices) instead of the Service's DNS name, for clusters without DNS or
    /// kube-proxy (such as the local development cluster).
    #[arg(long)]
    pub address_by_pod_ip: bool,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    pub log_format: String,
    /// Run only while holding a Lease, so several replicas can run and one works.
    #[arg(long)]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "llmops-system")]
    pub leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "llmops-operator")]
    pub leader_election_lease: String,
    /// Namespace of the operator's own workloads: the model resolver Jobs and the records
    /// of resolved models (default: the pod's, from POD_NAMESPACE). Tenants must not be
    /// able to write there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "llmops-system")]
    pub resolver_namespace: String,
    /// ConfigMap in the resolver namespace whose key ca.crt holds extra CA certificates
    /// (PEM) that model downloads over https trust, for registries behind a private CA.
    #[arg(long, value_name = "CONFIGMAP")]
    pub ca_bundle_configmap: Option<String>,
    /// Node label (KEY=VALUE) resolver pods must match; repeat for several.
    #[arg(long, value_name = "KEY=VALUE", value_delimiter = ',', value_parser = parse_label)]
    pub resolver_node_selector: Vec<(String, String)>,
    /// Taint key resolver pods tolerate (any value, any effect); repeat for several.
    #[arg(long, value_name = "KEY", value_delimiter = ',')]
    pub resolver_toleration: Vec<String>,
    /// This replica's identity in the Lease (default: POD_NAME, else the host name, with
    /// a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub leader_election_identity: Option<String>,
}

/// Parses a node label selector term, KEY=VALUE.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Parses "500ms", "2s", "3m" or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 500ms, 2s or 3m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// Where worker pods find the artifact store.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreConfig {
    /// A volume mounted at `mount_path`: a PVC, a node directory, or nothing the operator
    /// mounts (the path is provided by other means).
    Local {
        /// Path of the store root inside pods (Assignment.store.local.root).
        mount_path: PathBuf,
        /// What is mounted there.
        volume: StoreVolume,
    },
    /// An S3-compatible bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix of the store root.
        prefix: String,
        /// Endpoint URL; empty for AWS.
        endpoint: String,
        /// Region.
        region: String,
        /// Allow plain http.
        allow_http: bool,
        /// Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
        credentials_secret: Option<String>,
    },
}

/// The volume behind a local store.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreVolume {
    /// A PersistentVolumeClaim of this name in the workload's namespace.
    Pvc(String),
    /// A directory on the node.
    HostPath(PathBuf),
    /// Nothing: the store path exists in pods by other means.
    None,
}

/// Everything the controllers and the gateway need to know about their setup.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespaces watched; empty means all.
    pub namespaces: Vec<String>,
    /// Worker image for CPU pods.
    pub worker_image: String,
    /// Worker image for GPU pods.
    pub worker_cuda_image: String,
    /// Image pull policy of worker pods.
    pub image_pull_policy: String,
    /// The artifact store.
    pub store: StoreConfig,
    /// Address the gateway listens on.
    pub gateway_listen: SocketAddr,
    /// host:port pods dial.
    pub gateway_address: String,
    /// Address of the metrics server; None: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Least time between progress-driven status writes of one workload.
    pub progress_interval: Duration,
    /// Grace period for checkpoint-and-stop.
    pub checkpoint_grace: Duration,
    /// Work only while holding this Lease; None: always.
    pub leader_election: Option<crate::leader::LeaderElection>,
    /// Address ModelDeployments by a ready pod's IP instead of their Service's DNS name.
    pub address_by_pod_ip: bool,
    /// Namespace of the model resolver Jobs and the records of resolved models.
    pub resolver_namespace: String,
    /// ConfigMap (in the resolver namespace) with extra CA certificates for downloads.
    pub ca_bundle_configmap: Option<String>,
    /// Node labels resolver pods must match.
    pub resolver_node_selector: std::collections::BTreeMap<String, String>,
    /// Taint keys resolver pods tolerate.
    pub resolver_tolerations: Vec<String>,
    /// TLS of the worker gateway.
    pub gateway_tls: GatewayTls,
    /// PEM of the CA worker pods trust for the gateway (LLMOPS_GATEWAY_CA); set by
    /// [`crate::run`] from [`Config::gateway_tls`].
    pub gateway_ca: Option<String>,
}

/// Where the worker gateway's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GatewayTls {
    /// Plaintext h2c.
    #[default]
    Off,
    /// Generated once by the operator (crate::gateway::tls).
    Generate,
    /// A kubernetes.io/tls Secret of this name in the operator's namespace.
    Secret(String),
}

impl Config {
    /// A configuration with defaults, the given gateway and a store of `mount_path`
    /// without a volume; tests and embedders adjust the fields they need.
    pub fn new(gateway_listen: SocketAddr, gateway_address: impl Into<String>) -> Self {
        Self {
            namespaces: Vec::new(),
            worker_image: "ghcr.io/llmops-dev/llmops-worker:latest".into(),
            worker_cuda_image: "ghcr.io/llmops-dev/llmops-worker:latest-cuda".into(),
            image_pull_policy: "IfNotPresent".into(),
            store: StoreConfig::Local { mount_path: PathBuf::from("/var/lib/llmops/store"), volume: StoreVolume::None },
            gateway_listen,
            gateway_address: gateway_address.into(),
            metrics_listen: None,
            progress_interval: Duration::from_secs(2),
            checkpoint_grace: Duration::from_secs(120),
            leader_election: None,
            address_by_pod_ip: false,
            resolver_namespace: "llmops-system".into(),
            ca_bundle_configmap: None,
            resolver_node_selector: Default::default(),
            resolver_tolerations: Vec::new(),
            gateway_tls: GatewayTls::Off,
            gateway_ca: None,
        }
    }
}

impl From<&RunArgs> for Config {
    fn from(args: &RunArgs) -> Self {
        let store = match &args.s3_bucket {
            Some(bucket) => StoreConfig::S3 {
                bucket: bucket.clone(),
                prefix: args.s3_prefix.clone(),
                endpoint: args.s3_endpoint.clone(),
                region: args.s3_region.clone(),
                allow_http: args.s3_allow_http,
                credentials_secret: args.s3_credentials_secret.clone(),
            },
            None => StoreConfig::Local {
                mount_path: args.store_mount_path.clone(),
                volume: match (&args.store_pvc, &args.store_host_path) {
                    (Some(claim), _) => StoreVolume::Pvc(claim.clone()),
                    (None, Some(dir)) => StoreVolume::HostPath(dir.clone()),
                    (None, None) => StoreVolume::None,
                },
            },
        };
        Self {
            namespaces: args.namespaces.iter().filter(|n| !n.is_empty()).cloned().collect(),
            worker_image: args.worker_image.clone(),
            worker_cuda_image: args.worker_cuda_image.clone(),
            image_pull_policy: args.image_pull_policy.clone(),
            store,
            gateway_listen: args.gateway_listen,
            gateway_address: args.gateway_address.clone(),
            metrics_listen: Some(args.metrics_listen),
            progress_interval: args.progress_interval,
            checkpoint_grace: args.checkpoint_grace,
            leader_election: args.leader_elect.then(|| {
                let base = args
                    .leader_election_identity
                    .clone()
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .unwrap_or_else(|| "llmops-operator".into());
                // Unique even when two processes share a name (a restart racing its predecessor).
                let mut random = [0u8; 4];
                let suffix = getrandom::fill(&mut random).map(|()| hex::encode(random)).unwrap_or_default();
                crate::leader::LeaderElection::new(
                    args.leader_election_namespace.clone(),
                    args.leader_election_lease.clone(),
                    format!("{base}_{suffix}"),
                )
            }),
            address_by_pod_ip: args.address_by_pod_ip,
            resolver_namespace: args.resolver_namespace.clone(),
            ca_bundle_configmap: args.ca_bundle_configmap.clone().filter(|c| !c.is_empty()),
            resolver_node_selector: args.resolver_node_selector.iter().cloned().collect(),
            resolver_tolerations: args.resolver_toleration.iter().filter(|t| !t.is_empty()).cloned().collect(),
            gateway_tls: match (args.gateway_tls.as_str(), &args.gateway_tls_secret) {
                ("off", _) => GatewayTls::Off,
                ("secret", Some(name)) => GatewayTls::Secret(name.clone()),
                _ => GatewayTls::Generate,
            },
            gateway_ca: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3m"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("2 weeks").is_err());
    }
}
