//! The model cache: every model (or adapter) a custom resource names by URI is copied
//! once into the store's content-addressed cache, `models/sha256-<digest>/`, by a
//! resolver Job that the operator runs in its own namespace, and every workload then
//! reads that copy under that digest.
//!
//! A resolution is identified by (URI, pinned sha256) and recorded in a ConfigMap of the
//! operator's namespace (`llmops-model-<hash>`): phase `Resolving`, `Resolved` (with the
//! digest and the cache URI) or `Failed` (with a reason). Tenants cannot write there, so
//! nobody but the resolver's worker can say what a URI resolved to, and no tenant's pod
//! ever writes the cache. The Job and its token Secret are owned by the record; the
//! worker's result comes through the gateway like any other, and is acknowledged once the
//! record holds it. Objects waiting for a resolution are woken when it settles. A failed
//! resolution is retried after [`RETRY_AFTER`] (the record is deleted and made again).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, EnvVar, KeyToPath, Secret, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use llmops_crds::Resources;
use llmops_proto::v1::{self, Assignment, assignment::Mode};
use sha2::{Digest, Sha256};

use crate::context::Context;
use crate::controllers::batch::Plan;
use crate::error::{Error, Result};
use crate::job::{self, TOKEN_KEY, WorkerJob};
use crate::workload::{FIELD_MANAGER, KIND_LABEL, MANAGED_BY, WorkloadKey, owner_reference, store_proto};

/// Kind of the resolver's workload (gateway, labels, store layout).
pub const KIND: &str = "ModelResolution";
/// Store key of the cache root.
pub const CACHE: &str = "models";
/// How long a failed resolution stands before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(120);
/// Key of the CA bundle in the ConfigMap named by `--ca-bundle-configmap`.
pub const CA_KEY: &str = "ca.crt";
/// Where resolver pods find that bundle.
pub const CA_DIR: &str = "/etc/llmops/ca";

/// The object that needs a model resolved: woken when the resolution settles.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    /// Kind, as the gateway routes triggers.
    pub kind: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
}

impl<'a> Requester<'a> {
    /// The requester of a workload.
    pub fn of(key: &'a WorkloadKey) -> Self {
        Self { kind: &key.kind, namespace: &key.namespace, name: &key.name }
    }
}

/// Name of the record (and of the Job) of a URI pinned to `expected` (or not pinned).
pub fn record_name(uri: &str, expected: &str) -> String {
    let digest = hex::encode(Sha256::digest(format!("{uri}\n{}", expected.to_ascii_lowercase()).as_bytes()));
    format!("llmops-model-{}", &digest[..20])
}

/// What a record says.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// The resolver works on it.
    Resolving,
    /// In the cache.
    Resolved {
        /// store:// URI of the cached file or directory.
        uri: String,
        /// Its digest.
        sha256: String,
    },
    /// It failed.
    Failed {
        /// CamelCase reason from the worker (DigestMismatch, InputNotFound, ...) or the Job.
        reason: String,
        /// For a person.
        message: String,
        /// When.
        at: jiff::Timestamp,
    },
}

fn data(cm: &ConfigMap) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    cm.data.as_ref().unwrap_or(&EMPTY)
}

/// The phase of a record.
pub fn phase(cm: &ConfigMap) -> Phase {
    let d = data(cm);
    let get = |k: &str| d.get(k).cloned().unwrap_or_default();
    match d.get("phase").map(String::as_str) {
        Some("Resolved") if !get("sha256").is_empty() => {
            Phase::Resolved { uri: get("cacheUri"), sha256: get("sha256") }
        }
        Some("Failed") => Phase::Failed {
            reason: get("reason"),
            message: get("message"),
            at: get("failedAt").parse().unwrap_or(jiff::Timestamp::UNIX_EPOCH),
        },
        _ => Phase::Resolving,
    }
}

/// The Assignment of a record's resolver. Pure: the same record gives the same one.
pub fn assignment(ctx_store: &crate::config::StoreConfig, key: &WorkloadKey, uri: &str, expected: &str) -> Assignment {
    Assignment {
        workload: Some(key.to_proto()),
        store: Some(store_proto(ctx_store)),
        mode: Some(Mode::Resolve(v1::ResolveAssignment {
            source: Some(v1::Artifact { uri: uri.to_string(), sha256: expected.to_ascii_lowercase() }),
            cache: CACHE.to_string(),
        })),
    }
}

/// The resolver Job of a record: the worker in resolve mode, no GPU, a small request,
/// the operator's resolver placement, the CA bundle when one is configured, and a TTL so
/// finished Jobs go by themselves. Pure.
pub fn build_job(config: &crate::config::Config, key: &WorkloadKey, record: &ConfigMap) -> Result<Job> {
    let resources = Resources {
        gpus: Some(0),
        cpu: Some(Quantity("250m".into())),
        memory: Some(Quantity("512Mi".into())),
        node_selector: config.resolver_node_selector.clone(),
        tolerations: config
            .resolver_tolerations
            .iter()
            .map(|key| Toleration { key: Some(key.clone()), operator: Some("Exists".into()), ..Default::default() })
            .collect(),
        priority_class_name: None,
    };
    let mut job = job::build(
        config,
        &WorkerJob {
            key,
            job_name: key.name.clone(),
            token_secret: format!("{}-token", key.name),
            resources: Some(&resources),
            backoff_limit: 2,
            suspend: false,
            owner: owner_reference(record)?,
            secret_files: Vec::new(),
            propagated: Default::default(),
        },
    );
    // The cache read-write; a store:// source's namespace read-only, nothing else.
    let source = record.data.as_ref().and_then(|d| d.get("uri")).map(String::as_str).unwrap_or_default();
    let source_namespace =
        source.strip_prefix("store://").and_then(|key| key.split('/').next()).filter(|ns| !ns.is_empty());
    if let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        job::set_store_access(
            config,
            pod,
            &job::StoreAccess::Resolver { source_namespace: source_namespace.map(str::to_string) },
        );
    }
    if let Some(spec) = job.spec.as_mut() {
        spec.ttl_seconds_after_finished = Some(3600);
        if let (Some(bundle), Some(pod)) = (&config.ca_bundle_configmap, spec.template.spec.as_mut()) {
            pod.volumes.get_or_insert_with(Vec::new).push(Volume {
                name: "llmops-ca".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: bundle.clone(),
                    items: Some(vec![KeyToPath { key: CA_KEY.into(), path: CA_KEY.into(), mode: None }]),
                    ..Default::default()
                }),
                ..Default::default()
            });
            for c in &mut pod.containers {
                c.volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
                    name: "llmops-ca".into(),
                    mount_path: CA_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                });
                c.env.get_or_insert_with(Vec::new).push(EnvVar {
                    name: "LLMOPS_CA_FILE".into(),
                    value: Some(format!("{CA_DIR}/{CA_KEY}")),
                    ..Default::default()
                });
            }
        }
    }
    Ok(job)
}

/// The cached copy of `uri` (pinned to `expected` when given), or what to wait for.
/// Starts the resolution the first time a URI is asked for.
pub async fn resolve(
    ctx: &Context,
    requester: Requester<'_>,
    uri: &str,
    expected: Option<&str>,
) -> Result<std::result::Result<v1::Artifact, Plan>> {
    let expected = expected.unwrap_or_default().to_ascii_lowercase();
    // Already in the cache (a gate evaluating what its deployment serves): the key is
    // the digest.
    if let Some(digest) = cached_digest(uri) {
        if !expected.is_empty() && expected != digest {
            return Ok(Err(Plan::invalid(
                "ModelResolutionFailed",
                format!("{uri} is the cache entry of sha256 {digest}, but the spec pins {expected}"),
            )));
        }
        return Ok(Ok(v1::Artifact { uri: uri.to_string(), sha256: digest }));
    }
    let ns = ctx.config.resolver_namespace.clone();
    let name = record_name(uri, &expected);
    let records: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let mut record = records.get_opt(&name).await?;
    if record.as_ref().is_some_and(|r| phase(r) == Phase::Resolving) {
        // Results that arrived while nobody looked (after an operator restart).
        if let Some(r) = &record {
            record = Some(settle(ctx, r).await?);
        }
    }
    let waiting = |message: String| Ok(Err(Plan::wait("WaitingForModel", message)));
    match record.as_ref().map(|r| (r, phase(r))) {
        Some((r, _)) if r.metadata.deletion_timestamp.is_some() => {
            waiting(format!("retrying the resolution of {uri} (the failed attempt is being removed)"))
        }
        Some((_, Phase::Resolved { uri: cached, sha256 })) => Ok(Ok(v1::Artifact { uri: cached, sha256 })),
        Some((_, Phase::Failed { reason, message, at })) => {
            let age = jiff::Timestamp::now().duration_since(at);
            if age >= jiff::SignedDuration::try_from(RETRY_AFTER).unwrap_or_default() {
                let params =
                    DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() };
                match records.delete(&name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(%uri, record = %name, "retrying a failed model resolution");
                return waiting(format!("retrying the resolution of {uri}"));
            }
            let text = format!("resolving {uri} failed ({reason}): {message}");
            if reason == "DigestMismatch" || reason == "InvalidAssignment" {
                return Ok(Err(Plan::invalid("ModelResolutionFailed", text)));
            }
            Ok(Err(Plan::wait(
                "ModelResolutionFailed",
                format!("{text}; tried again after {}s", RETRY_AFTER.as_secs()),
            )))
        }
        Some((r, Phase::Resolving)) => {
            remember(ctx, &name, requester);
            ensure_worker(ctx, r, uri, &expected).await?;
            waiting(format!("resolving {uri} into the model cache (Job {ns}/{name})"))
        }
        None => {
            remember(ctx, &name, requester);
            let created = create_record(&records, &name, uri, &expected).await?;
            ensure_worker(ctx, &created, uri, &expected).await?;
            tracing::info!(%uri, record = %name, requester = %format!("{}/{}/{}", requester.namespace, requester.kind, requester.name), "resolving a model into the cache");
            waiting(format!("resolving {uri} into the model cache (Job {ns}/{name})"))
        }
    }
}

/// The digest of a URI inside the cache (`store://models/sha256-<digest>/...`).
pub fn cached_digest(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("store://")?.strip_prefix(CACHE)?.strip_prefix("/sha256-")?;
    let (digest, tail) = rest.split_at_checked(64)?;
    let hex = digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && (tail.is_empty() || tail.starts_with('/'))).then(|| digest.to_string())
}

fn remember(ctx: &Context, record: &str, r: Requester<'_>) {
    crate::lock(&ctx.model_waiters).entry(record.to_string()).or_default().insert((
        r.kind.to_string(),
        r.namespace.to_string(),
        r.name.to_string(),
    ));
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()), (KIND_LABEL.to_string(), KIND.to_string())])
}

async fn create_record(records: &Api<ConfigMap>, name: &str, uri: &str, expected: &str) -> Result<ConfigMap> {
    let cm = ConfigMap {
        metadata: ObjectMeta { name: Some(name.to_string()), labels: Some(labels()), ..Default::default() },
        data: Some(BTreeMap::from([
            ("uri".to_string(), uri.to_string()),
            ("expectedSha256".to_string(), expected.to_string()),
            ("phase".to_string(), "Resolving".to_string()),
        ])),
        ..Default::default()
    };
    match records.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &cm).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            records.get_opt(name).await?.ok_or(Error::MissingMetadata("model record"))
        }
        Err(e) => Err(e.into()),
    }
}

fn key_of(record: &ConfigMap) -> Result<WorkloadKey> {
    Ok(WorkloadKey {
        namespace: record.namespace().ok_or(Error::MissingMetadata("namespace"))?,
        kind: KIND.to_string(),
        name: record.name_any(),
        uid: record.uid().ok_or(Error::MissingMetadata("uid"))?,
    })
}

/// Makes sure the resolver of a record runs: its token Secret, its registration with the
/// gateway and its Job. A Job that failed without a word from its worker fails the record.
async fn ensure_worker(ctx: &Context, record: &ConfigMap, uri: &str, expected: &str) -> Result<()> {
    let key = key_of(record)?;
    let token = token_of(ctx, record, &key).await?;
    // Always the Secret's token: the one the resolver's pod reads.
    ctx.gateway.register(&key, &token, assignment(&ctx.config.store, &key, uri, expected));
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &key.namespace);
    match jobs.get_opt(&key.name).await? {
        None => {
            let built = build_job(&ctx.config, &key, record)?;
            jobs.patch(&key.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&built)).await?;
            tracing::info!(record = %key.name, %uri, "resolver job applied");
        }
        Some(job) => {
            let failed = job
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .find(|c| c.type_ == "Failed" && c.status == "True");
            let reported = ctx.gateway.observe(&key.uid).is_some_and(|o| o.result.is_some() || o.failure.is_some());
            if let Some(c) = failed
                && !reported
            {
                let reason = c.reason.unwrap_or_else(|| "JobFailed".into());
                let message = c.message.unwrap_or_else(|| "the resolver's pod failed".into());
                write_phase(ctx, record, failed_data(&reason, &message)).await?;
            }
        }
    }
    Ok(())
}

/// The token of a record's resolver: from its Secret, made once. Two reconciles that
/// start the same resolution at once both try to create the Secret; the second reads
/// the first one's token instead of registering its own.
async fn token_of(ctx: &Context, record: &ConfigMap, key: &WorkloadKey) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let name = format!("{}-token", key.name);
    let read = |s: Secret| -> Result<String> {
        if !s.metadata.owner_references.iter().flatten().any(|o| Some(&o.uid) == record.uid().as_ref()) {
            return Err(Error::MissingMetadata("a resolver token Secret owned by its record"));
        }
        s.data
            .and_then(|d| d.get(TOKEN_KEY).map(|b| String::from_utf8_lossy(&b.0).into_owned()))
            .ok_or(Error::MissingMetadata("token in the resolver's Secret"))
    };
    if let Some(s) = secrets.get_opt(&name).await? {
        return read(s);
    }
    let token = crate::gateway::tokens::generate().map_err(|e| Error::Random(e.to_string()))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some(key.labels()),
            owner_references: Some(vec![owner_reference(record)?]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(TOKEN_KEY.to_string(), ByteString(token.clone().into_bytes()))])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match secrets.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &secret).await
    {
        Ok(_) => Ok(token),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            read(secrets.get_opt(&name).await?.ok_or(Error::MissingMetadata("the resolver's token Secret"))?)
        }
        Err(e) => Err(e.into()),
    }
}

fn failed_data(reason: &str, message: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("phase".to_string(), "Failed".to_string()),
        ("reason".to_string(), reason.to_string()),
        ("message".to_string(), message.chars().take(2048).collect()),
        ("failedAt".to_string(), jiff::Timestamp::now().to_string()),
    ])
}

async fn write_phase(ctx: &Context, record: &ConfigMap, data: BTreeMap<String, String>) -> Result<ConfigMap> {
    let records: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &record.namespace().unwrap_or_default());
    let patch = serde_json::json!({"data": data});
    let written = records.patch(&record.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    tracing::info!(record = %record.name_any(), phase = ?phase(&written), "model resolution settled");
    wake(ctx, &record.name_any());
    Ok(written)
}

/// Writes what the resolver's worker reported into its record, then lets the gateway
/// acknowledge it. Returns the record as it is now.
pub async fn settle(ctx: &Context, record: &ConfigMap) -> Result<ConfigMap> {
    if phase(record) != Phase::Resolving {
        return Ok(record.clone());
    }
    let uid = record.uid().unwrap_or_default();
    let Some(observed) = ctx.gateway.observe(&uid) else { return Ok(record.clone()) };
    let data = if let Some(result) = &observed.result {
        let Some(artifact) = &result.artifact else { return Ok(record.clone()) };
        let expected = data(record).get("expectedSha256").cloned().unwrap_or_default();
        if !expected.is_empty() && artifact.sha256 != expected {
            failed_data(
                "DigestMismatch",
                &format!("the resolver reported sha256 {}, the spec pins {expected}", artifact.sha256),
            )
        } else {
            BTreeMap::from([
                ("phase".to_string(), "Resolved".to_string()),
                ("sha256".to_string(), artifact.sha256.clone()),
                ("cacheUri".to_string(), artifact.uri.clone()),
                ("record.json".to_string(), result.manifest_json.clone()),
                ("resolvedAt".to_string(), jiff::Timestamp::now().to_string()),
            ])
        }
    } else if let Some(f) = &observed.failure {
        failed_data(&f.reason, &f.message)
    } else {
        return Ok(record.clone());
    };
    let written = write_phase(ctx, record, data).await?;
    ctx.gateway.persisted(&uid, observed.terminal_version);
    Ok(written)
}

/// Asks every object that waits for a record to reconcile.
fn wake(ctx: &Context, record: &str) {
    let waiters = crate::lock(&ctx.model_waiters).remove(record).unwrap_or_default();
    for (kind, namespace, name) in waiters {
        ctx.gateway.wake(&kind, &namespace, &name);
    }
}

/// Settles records as their workers report (the gateway's triggers for [`KIND`]), until
/// the operator stops.
pub async fn run(ctx: std::sync::Arc<Context>) {
    let mut triggers = ctx.gateway.subscribe(KIND, Some(&ctx.config.resolver_namespace));
    let records: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.config.resolver_namespace);
    while let Some(t) = triggers.recv().await {
        let result = async {
            match records.get_opt(&t.name).await? {
                Some(r) => settle(&ctx, &r).await.map(|_| ()),
                None => Ok(()),
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(record = %t.name, error = %e, "could not settle a model resolution");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn record() -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(record_name("https://models.example/m.gguf", "")),
                namespace: Some("llmops-system".into()),
                uid: Some("u-1".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn records_are_named_by_uri_and_pin() {
        let a = record_name("https://h/m.gguf", "");
        assert!(a.starts_with("llmops-model-") && a.len() == 33, "{a}");
        assert_eq!(a, record_name("https://h/m.gguf", ""));
        assert_ne!(a, record_name("https://h/m.gguf", &"a".repeat(64)));
        assert_eq!(record_name("u", &"A".repeat(64)), record_name("u", &"a".repeat(64)));
    }

    #[test]
    fn cache_uris_carry_their_digest() {
        let d = "ab".repeat(32);
        assert_eq!(cached_digest(&format!("store://models/sha256-{d}/m.gguf")), Some(d.clone()));
        assert_eq!(cached_digest(&format!("store://models/sha256-{d}/")), Some(d.clone()));
        assert_eq!(cached_digest(&format!("store://models/sha256-{d}x/m.gguf")), None);
        assert_eq!(cached_digest(&format!("store://ns/models/sha256-{d}/m.gguf")), None);
        assert_eq!(cached_digest("store://models/sha256-AB/m.gguf"), None);
    }

    #[test]
    fn phases_read_from_the_record() {
        let mut cm = record();
        assert_eq!(phase(&cm), Phase::Resolving);
        cm.data = Some(BTreeMap::from([
            ("phase".into(), "Resolved".into()),
            ("sha256".into(), "ab".into()),
            ("cacheUri".into(), "store://models/sha256-ab/m.gguf".into()),
        ]));
        assert_eq!(phase(&cm), Phase::Resolved { uri: "store://models/sha256-ab/m.gguf".into(), sha256: "ab".into() });
        cm.data = Some(failed_data("InputNotFound", "404"));
        assert!(matches!(phase(&cm), Phase::Failed { reason, .. } if reason == "InputNotFound"));
    }

    #[test]
    fn the_resolver_job_runs_in_resolve_mode_with_its_placement_and_the_ca_bundle() {
        let mut config = Config::new("127.0.0.1:9090".parse().expect("addr"), "gw:9090");
        config.ca_bundle_configmap = Some("corp-ca".into());
        config.resolver_node_selector = BTreeMap::from([("pool".into(), "cpu".into())]);
        config.resolver_tolerations = vec!["dedicated".into()];
        config.store = crate::config::StoreConfig::Local {
            mount_path: "/var/lib/llmops/store".into(),
            volume: crate::config::StoreVolume::Pvc("llmops-store".into()),
        };
        let cm = record();
        let key = key_of(&cm).expect("key");
        let job = build_job(&config, &key, &cm).expect("job");
        let spec = job.spec.expect("spec");
        assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
        let pod = spec.template.spec.expect("pod");
        assert_eq!(pod.node_selector, Some(BTreeMap::from([("pool".to_string(), "cpu".to_string())])));
        let t = &pod.tolerations.clone().unwrap_or_default()[0];
        assert_eq!(
            (t.key.as_deref(), t.operator.as_deref(), t.effect.as_deref()),
            (Some("dedicated"), Some("Exists"), None)
        );
        let c = &pod.containers[0];
        let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
        assert!(!limits.contains_key("nvidia.com/gpu"), "the resolver never takes a GPU: {limits:?}");
        let env: BTreeMap<_, _> =
            c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
        assert_eq!(env["LLMOPS_CA_FILE"], "/etc/llmops/ca/ca.crt");
        assert_eq!(env["LLMOPS_WORKLOAD"], format!("llmops-system/ModelResolution/{}/u-1", key.name));
        assert!(pod.volumes.iter().flatten().any(|v| v.config_map.as_ref().is_some_and(|c| c.name == "corp-ca")));
        assert_eq!(job.metadata.owner_references.expect("owner")[0].kind, "ConfigMap");
        // An https source: the cache, read-write, and nothing of any namespace.
        let store = |pod: &k8s_openapi::api::core::v1::PodSpec| -> Vec<(String, Option<bool>)> {
            pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .filter(|m| m.name == "llmops-store")
                .map(|m| (m.sub_path.clone().unwrap_or_default(), m.read_only))
                .collect()
        };
        assert_eq!(store(&pod), [("models".to_string(), Some(false))]);
        // A store:// source: its namespace's part too, read-only.
        let mut from_store = cm.clone();
        from_store.data = Some(BTreeMap::from([("uri".into(), "store://team-a/imports/m.gguf".into())]));
        let job = build_job(&config, &key, &from_store).expect("job");
        let pod = job.spec.and_then(|s| s.template.spec).expect("pod");
        assert_eq!(store(&pod), [("models".to_string(), Some(false)), ("team-a".to_string(), Some(true))]);

        let a = assignment(&config.store, &key, "https://models.example/m.gguf", "");
        let Some(Mode::Resolve(r)) = a.mode else { panic!("resolve mode") };
        assert_eq!(r.cache, "models");
        assert_eq!(r.source.expect("source").uri, "https://models.example/m.gguf");
    }
}
