//! The Kubernetes Job of a batch workload (Dataset, FineTuneJob, EvalRun): one pod
//! running `llmops-worker agent` with the gateway's address, the workload's identity and
//! its token file, the artifact store, and the spec's resources and placement.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use llmops_crds::Resources;

use crate::config::{Config, StoreConfig, StoreVolume};
use crate::workload::{WORKER_LABEL, WORKLOAD_ANNOTATION, WorkloadKey};

/// Directory the workload's token Secret is mounted at.
pub const TOKEN_DIR: &str = "/var/run/secrets/llmops";
/// Key of the token in the token Secret, and its file name.
pub const TOKEN_KEY: &str = "token";
/// Directory API key Secrets of endpoint targets are mounted under.
pub const API_KEY_DIR: &str = "/var/run/secrets/llmops-api-key";
/// Name of the worker container.
pub const CONTAINER: &str = "worker";
/// User and group worker containers run as (the worker image's user).
pub const WORKER_UID: i64 = 10001;
/// Annotation of a custom resource naming which of its labels and annotations go onto
/// the Jobs, Deployments and pods made for it: keys separated by commas or spaces, e.g.
/// `kueue.x-k8s.io/queue-name, cost-center`.
pub const PROPAGATE_ANNOTATION: &str = "llmops.dev/propagate";
/// Kueue's queue label: a Job with it is started (unsuspended) by its queue, never by
/// the operator.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

/// The labels and annotations of a custom resource that its user marked for
/// propagation ([`PROPAGATE_ANNOTATION`]). Keys the operator owns (`llmops.dev/…`,
/// `app.kubernetes.io/managed-by`) and kubectl's bookkeeping are never copied.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Propagated {
    /// Labels to copy.
    pub labels: BTreeMap<String, String>,
    /// Annotations to copy.
    pub annotations: BTreeMap<String, String>,
}

impl Propagated {
    /// What `meta` marks for propagation.
    pub fn of(meta: &ObjectMeta) -> Self {
        let listed = meta.annotations.as_ref().and_then(|a| a.get(PROPAGATE_ANNOTATION)).cloned().unwrap_or_default();
        let wanted: Vec<&str> = listed
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|k| !k.is_empty() && !reserved_key(k))
            .collect();
        let pick = |m: &Option<BTreeMap<String, String>>| -> BTreeMap<String, String> {
            m.iter()
                .flatten()
                .filter(|(k, _)| wanted.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        Self { labels: pick(&meta.labels), annotations: pick(&meta.annotations) }
    }

    /// Adds these labels and annotations to `meta`, never replacing a key it has.
    pub fn apply_to(&self, meta: &mut ObjectMeta) {
        if !self.labels.is_empty() {
            let labels = meta.labels.get_or_insert_with(BTreeMap::new);
            for (k, v) in &self.labels {
                labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        if !self.annotations.is_empty() {
            let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
            for (k, v) in &self.annotations {
                annotations.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
}

fn reserved_key(key: &str) -> bool {
    key.starts_with("llmops.dev/")
        || key.starts_with("kubectl.kubernetes.io/")
        || key == crate::workload::MANAGED_BY.0
        || key == PROPAGATE_ANNOTATION
}

/// A Secret key mounted as a file for the worker (an endpoint's API key).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecretFile {
    /// The Secret.
    pub secret: String,
    /// Its key.
    pub key: String,
}

impl SecretFile {
    /// Path of the file inside the pod.
    pub fn path(&self) -> String {
        format!("{API_KEY_DIR}/{}/{}", self.secret, self.key)
    }
}

/// What the Job of one workload is made from.
#[derive(Debug, Clone)]
pub struct WorkerJob<'a> {
    /// The workload.
    pub key: &'a WorkloadKey,
    /// Name of the Job.
    pub job_name: String,
    /// Name of the Secret holding the workload's token.
    pub token_secret: String,
    /// Resources and placement from the spec.
    pub resources: Option<&'a Resources>,
    /// Retries of a failed pod.
    pub backoff_limit: i32,
    /// Whether the Job is suspended.
    pub suspend: bool,
    /// Controller reference to the workload.
    pub owner: OwnerReference,
    /// Secret keys mounted as files.
    pub secret_files: Vec<SecretFile>,
    /// Labels and annotations of the workload marked for propagation.
    pub propagated: Propagated,
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

/// The number of GPUs a spec asks for (0 when unset).
pub fn gpus(resources: Option<&Resources>) -> i32 {
    resources.and_then(|r| r.gpus).unwrap_or(0).max(0)
}

/// Builds the Job. Pure: the same inputs give the same Job.
pub fn build(config: &Config, w: &WorkerJob<'_>) -> Job {
    let key = w.key;
    let mut template = pod_template(config, key, &w.token_secret, w.resources, &w.secret_files);
    let labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    let mut metadata = ObjectMeta {
        name: Some(w.job_name.clone()),
        namespace: Some(key.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![w.owner.clone()]),
        ..Default::default()
    };
    w.propagated.apply_to(&mut metadata);
    if let Some(meta) = template.metadata.as_mut() {
        w.propagated.apply_to(meta);
    }
    Job {
        metadata,
        spec: Some(JobSpec {
            backoff_limit: Some(w.backoff_limit.max(0)),
            completions: Some(1),
            parallelism: Some(1),
            suspend: Some(w.suspend),
            template,
            ..Default::default()
        }),
        status: None,
    }
}

/// Which parts of a volume-backed store a pod mounts (DESIGN.md, "Tenancy"): never the
/// whole volume, only subPaths of it at their place under the mount path, so the
/// store keys of the Assignment keep their meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAccess {
    /// A tenant's worker: its namespace's part read-write, the model cache read-only.
    Tenant {
        /// The workload's namespace.
        namespace: String,
    },
    /// The operator's resolver: the model cache read-write, and the part of the
    /// namespace whose `store://` source it copies, read-only.
    Resolver {
        /// Namespace of a `store://` source (its first key segment), if any.
        source_namespace: Option<String>,
    },
}

/// The mounts of the store volume (named `llmops-store`) for `access`.
pub fn store_mounts(mount_path: &std::path::Path, access: &StoreAccess) -> Vec<VolumeMount> {
    let mount = |sub: &str, read_only: bool| VolumeMount {
        name: "llmops-store".into(),
        mount_path: mount_path.join(sub).to_string_lossy().into_owned(),
        sub_path: Some(sub.to_string()),
        read_only: Some(read_only),
        ..Default::default()
    };
    match access {
        StoreAccess::Tenant { namespace } => vec![mount(namespace, false), mount(crate::models::CACHE, true)],
        StoreAccess::Resolver { source_namespace } => {
            let mut mounts = vec![mount(crate::models::CACHE, false)];
            if let Some(ns) = source_namespace.as_deref().filter(|ns| *ns != crate::models::CACHE) {
                mounts.push(mount(ns, true));
            }
            mounts
        }
    }
}

/// Replaces the store mounts of a pod's containers with those of `access`.
pub fn set_store_access(config: &Config, pod: &mut PodSpec, access: &StoreAccess) {
    let StoreConfig::Local { mount_path, volume } = &config.store else { return };
    if matches!(volume, StoreVolume::None) {
        return;
    }
    for c in &mut pod.containers {
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        mounts.retain(|m| m.name != "llmops-store");
        mounts.extend(store_mounts(mount_path, access));
    }
}

/// The pod of a worker: one container running `llmops-worker agent` with the gateway's
/// address, the workload's identity and token file, the store, the Secret files, and
/// the resources and placement of the spec; restartPolicy Never. Pure. Long-running
/// workloads (serving) adjust what differs.
pub fn pod_template(
    config: &Config,
    key: &WorkloadKey,
    token_secret: &str,
    resources: Option<&Resources>,
    secret_files: &[SecretFile],
) -> PodTemplateSpec {
    let gpus = gpus(resources);
    let mut labels = key.labels();
    labels.insert(WORKER_LABEL.to_string(), "true".to_string());

    let mut env_vars = vec![
        env("LLMOPS_GATEWAY", &config.gateway_address),
        env("LLMOPS_WORKLOAD", key.to_string()),
        env("LLMOPS_TOKEN_FILE", format!("{TOKEN_DIR}/{TOKEN_KEY}")),
        EnvVar {
            name: "LLMOPS_POD".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if let Some(ca) = &config.gateway_ca {
        // A public certificate: the worker verifies the gateway against it (TLS).
        env_vars.push(env(crate::gateway::tls::CA_ENV, ca.clone()));
    }
    if gpus == 0 {
        // The NVIDIA runtime would otherwise expose every GPU of the node to a pod
        // that asked for none.
        env_vars.push(env("NVIDIA_VISIBLE_DEVICES", "void"));
    }

    let mut volumes = vec![Volume {
        name: "llmops-token".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(token_secret.to_string()),
            items: Some(vec![KeyToPath { key: TOKEN_KEY.into(), path: TOKEN_KEY.into(), mode: None }]),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "llmops-token".into(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];

    match &config.store {
        StoreConfig::Local { mount_path, volume } => {
            let source = match volume {
                StoreVolume::Pvc(claim) => Some(Volume {
                    name: "llmops-store".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.clone(),
                        read_only: None,
                    }),
                    ..Default::default()
                }),
                StoreVolume::HostPath(dir) => Some(Volume {
                    name: "llmops-store".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: dir.to_string_lossy().into_owned(),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    ..Default::default()
                }),
                StoreVolume::None => None,
            };
            if let Some(v) = source {
                volumes.push(v);
                mounts.extend(store_mounts(mount_path, &StoreAccess::Tenant { namespace: key.namespace.clone() }));
            }
        }
        StoreConfig::S3 { credentials_secret: Some(secret), .. } => {
            for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
                env_vars.push(EnvVar {
                    name: name.into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret.clone(),
                            key: name.into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        StoreConfig::S3 { credentials_secret: None, .. } => {}
    }

    for (i, file) in secret_files.iter().enumerate() {
        let name = format!("api-key-{i}");
        volumes.push(Volume {
            name: name.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(file.secret.clone()),
                items: Some(vec![KeyToPath { key: file.key.clone(), path: file.key.clone(), mode: None }]),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: format!("{API_KEY_DIR}/{}", file.secret),
            read_only: Some(true),
            ..Default::default()
        });
    }

    let mut quantities: BTreeMap<String, Quantity> = BTreeMap::new();
    if let Some(r) = resources {
        if let Some(cpu) = &r.cpu {
            quantities.insert("cpu".into(), cpu.clone());
        }
        if let Some(memory) = &r.memory {
            quantities.insert("memory".into(), memory.clone());
        }
    }
    let requests = (!quantities.is_empty()).then(|| quantities.clone());
    let mut limits = quantities;
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), Quantity(gpus.to_string()));
    }

    let image = if gpus > 0 { &config.worker_cuda_image } else { &config.worker_image };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        command: Some(vec!["llmops-worker".into(), "agent".into()]),
        env: Some(env_vars),
        volume_mounts: Some(mounts),
        resources: Some(ResourceRequirements {
            limits: (!limits.is_empty()).then_some(limits),
            requests,
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // The restricted Pod Security Standard.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };

    let node_selector = resources.map(|r| r.node_selector.clone()).filter(|m| !m.is_empty());
    let tolerations = resources.map(|r| r.tolerations.clone()).filter(|t| !t.is_empty());
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        volumes: Some(volumes),
        node_selector,
        tolerations,
        priority_class_name: resources.and_then(|r| r.priority_class_name.clone()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
            ..Default::default()
        }),
        termination_grace_period_seconds: Some(60),
        ..Default::default()
    };

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(WORKLOAD_ANNOTATION.to_string(), key.to_string())])),
            ..Default::default()
        }),
        spec: Some(pod),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn config() -> Config {
        let addr: SocketAddr = "127.0.0.1:9090".parse().expect("addr");
        let mut c = Config::new(addr, "gw.llmops:9090");
        c.store = StoreConfig::Local {
            mount_path: "/var/lib/llmops/store".into(),
            volume: StoreVolume::Pvc("llmops-store".into()),
        };
        c
    }

    fn key() -> WorkloadKey {
        WorkloadKey { namespace: "ns".into(), kind: "FineTuneJob".into(), name: "tune".into(), uid: "u-1".into() }
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "llmops.dev/v1alpha1".into(),
            kind: "FineTuneJob".into(),
            name: "tune".into(),
            uid: "u-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn job(resources: &Resources) -> Job {
        let key = key();
        build(
            &config(),
            &WorkerJob {
                key: &key,
                job_name: "tune-finetune".into(),
                token_secret: "tune-finetune-token".into(),
                resources: Some(resources),
                backoff_limit: 2,
                suspend: false,
                owner: owner(),
                secret_files: vec![],
                propagated: Default::default(),
            },
        )
    }

    fn pod(job: &Job) -> PodSpec {
        job.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod spec")
    }

    fn env_of(pod: &PodSpec) -> BTreeMap<String, EnvVar> {
        pod.containers[0].env.clone().unwrap_or_default().into_iter().map(|e| (e.name.clone(), e)).collect()
    }

    #[test]
    fn gpu_job_gets_the_cuda_image_a_gpu_limit_and_placement() {
        let resources: Resources = serde_yaml_ng::from_str(
            "gpus: 1\ncpu: '4'\nmemory: 16Gi\nnodeSelector: {nvidia.com/gpu.product: H100}\ntolerations: [{key: gpu, operator: Exists}]\n",
        )
        .expect("resources");
        let job = job(&resources);
        let pod = pod(&job);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/llmops-dev/llmops-worker:latest-cuda"));
        assert_eq!(c.command.as_deref(), Some(&["llmops-worker".to_string(), "agent".to_string()][..]));
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).expect("limits");
        assert_eq!(limits.get("nvidia.com/gpu"), Some(&Quantity("1".into())));
        assert_eq!(limits.get("memory"), Some(&Quantity("16Gi".into())));
        assert_eq!(
            pod.node_selector.as_ref().and_then(|n| n.get("nvidia.com/gpu.product")).map(String::as_str),
            Some("H100")
        );
        assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
        let env = env_of(&pod);
        assert!(!env.contains_key("NVIDIA_VISIBLE_DEVICES"));
        assert_eq!(env["LLMOPS_GATEWAY"].value.as_deref(), Some("gw.llmops:9090"));
        assert_eq!(env["LLMOPS_WORKLOAD"].value.as_deref(), Some("ns/FineTuneJob/tune/u-1"));
        assert_eq!(env["LLMOPS_TOKEN_FILE"].value.as_deref(), Some("/var/run/secrets/llmops/token"));
        let pod_ref = env["LLMOPS_POD"].value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("fieldRef");
        assert_eq!(pod_ref.field_path, "metadata.name");
        let spec = job.spec.as_ref().expect("spec");
        assert_eq!(spec.backoff_limit, Some(2));
        assert_eq!(spec.suspend, Some(false));
        assert_eq!(job.metadata.owner_references.as_ref().map(|o| o[0].uid.as_str()), Some("u-1"));
    }

    #[test]
    fn cpu_job_hides_gpus_and_mounts_token_and_store() {
        let resources: Resources = serde_yaml_ng::from_str("gpus: 0\ncpu: '1'\n").expect("resources");
        let pod = pod(&job(&resources));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/llmops-dev/llmops-worker:latest"));
        assert_eq!(env_of(&pod)["NVIDIA_VISIBLE_DEVICES"].value.as_deref(), Some("void"));
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).expect("limits");
        assert!(!limits.contains_key("nvidia.com/gpu"));
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        let token = mounts.iter().find(|m| m.mount_path == TOKEN_DIR).expect("token mount");
        assert_eq!(token.read_only, Some(true));
        // Only the namespace's part of the store, read-write, and the cache, read-only.
        let store: Vec<_> = mounts
            .iter()
            .filter(|m| m.name == "llmops-store")
            .map(|m| (m.mount_path.as_str(), m.sub_path.as_deref(), m.read_only))
            .collect();
        assert_eq!(
            store,
            [
                ("/var/lib/llmops/store/ns", Some("ns"), Some(false)),
                ("/var/lib/llmops/store/models", Some("models"), Some(true))
            ]
        );
        let volumes = pod.volumes.unwrap_or_default();
        let secret = volumes.iter().find_map(|v| v.secret.as_ref()).expect("token volume");
        assert_eq!(secret.secret_name.as_deref(), Some("tune-finetune-token"));
        let pvc = volumes.iter().find_map(|v| v.persistent_volume_claim.as_ref()).expect("store volume");
        assert_eq!(pvc.claim_name, "llmops-store");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    }

    #[test]
    fn s3_store_passes_credentials_from_the_secret() {
        let mut config = config();
        config.store = StoreConfig::S3 {
            bucket: "b".into(),
            prefix: "p".into(),
            endpoint: String::new(),
            region: "eu-north-1".into(),
            allow_http: false,
            credentials_secret: Some("s3-creds".into()),
        };
        let key = key();
        let job = build(
            &config,
            &WorkerJob {
                key: &key,
                job_name: "j".into(),
                token_secret: "t".into(),
                resources: None,
                backoff_limit: 0,
                suspend: true,
                owner: owner(),
                secret_files: vec![SecretFile { secret: "openai".into(), key: "api-key".into() }],
                propagated: Default::default(),
            },
        );
        let pod = pod(&job);
        let env = env_of(&pod);
        let from =
            env["AWS_SECRET_ACCESS_KEY"].value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("ref");
        assert_eq!(from.name, "s3-creds");
        let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
        assert!(mounts.iter().any(|m| m.mount_path == "/var/run/secrets/llmops-api-key/openai"));
        assert_eq!(job.spec.as_ref().and_then(|s| s.suspend), Some(true));
    }

    #[test]
    fn worker_pods_meet_the_restricted_pod_security_standard() {
        let pod = pod(&job(&Resources::default()));
        let psc = pod.security_context.clone().expect("pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.run_as_user, Some(WORKER_UID));
        assert_eq!(psc.seccomp_profile.map(|p| p.type_), Some("RuntimeDefault".to_string()));
        let c = pod.containers[0].security_context.clone().expect("container securityContext");
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(c.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]));
        assert!(c.privileged.is_none_or(|p| !p));
    }

    #[test]
    fn marked_labels_and_annotations_reach_the_job_and_its_pod_and_owned_keys_never_do() {
        let meta: ObjectMeta = serde_json::from_value(serde_json::json!({
            "labels": {"kueue.x-k8s.io/queue-name": "team-a", "cost-center": "ml", "unmarked": "x",
                       "llmops.dev/uid": "forged"},
            "annotations": {
                "llmops.dev/propagate": "kueue.x-k8s.io/queue-name, cost-center owner llmops.dev/uid",
                "owner": "alice", "other": "y",
            },
        }))
        .expect("meta");
        let p = Propagated::of(&meta);
        assert_eq!(
            p.labels,
            BTreeMap::from([
                ("cost-center".to_string(), "ml".to_string()),
                ("kueue.x-k8s.io/queue-name".to_string(), "team-a".to_string())
            ])
        );
        assert_eq!(p.annotations, BTreeMap::from([("owner".to_string(), "alice".to_string())]));
        let key = key();
        let job = build(
            &config(),
            &WorkerJob {
                key: &key,
                job_name: "tune-finetune".into(),
                token_secret: "tune-finetune-token".into(),
                resources: None,
                backoff_limit: 0,
                suspend: false,
                owner: owner(),
                secret_files: vec![],
                propagated: p,
            },
        );
        let labels = job.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get(QUEUE_LABEL).map(String::as_str), Some("team-a"), "Kueue reads the Job's label");
        assert_eq!(labels.get("llmops.dev/uid").map(String::as_str), Some("u-1"), "owned keys stay the operator's");
        let template = job.spec.and_then(|s| s.template.metadata).expect("template metadata");
        assert_eq!(template.labels.unwrap_or_default().get("cost-center").map(String::as_str), Some("ml"));
        assert_eq!(template.annotations.unwrap_or_default().get("owner").map(String::as_str), Some("alice"));
        assert!(!labels.contains_key("unmarked"));
    }
}
