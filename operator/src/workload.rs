//! Names, labels and store locations of a workload: the object a worker works for,
//! identified as `namespace/Kind/name/uid` everywhere (pod env, gateway, store keys).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use sha2::{Digest, Sha256};

use crate::config::StoreConfig;
use crate::error::{Error, Result};

/// Label every object the operator creates carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "llmops-operator");
/// Label of worker pods (kwok in the test cluster leaves pods with it Running).
pub const WORKER_LABEL: &str = "llmops.dev/worker";
/// Label with the kind of the owning workload.
pub const KIND_LABEL: &str = "llmops.dev/kind";
/// Label with the name of the owning workload.
pub const NAME_LABEL: &str = "llmops.dev/name";
/// Label with the uid of the owning workload.
pub const UID_LABEL: &str = "llmops.dev/uid";
/// Annotation of worker pods naming their workload (`namespace/Kind/name/uid`).
pub const WORKLOAD_ANNOTATION: &str = "llmops.dev/workload";
/// Field manager of every server-side apply of the operator.
pub const FIELD_MANAGER: &str = "llmops-operator";

/// The object a worker works for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    /// Namespace.
    pub namespace: String,
    /// Kind: Dataset, FineTuneJob, EvalRun.
    pub kind: String,
    /// Name.
    pub name: String,
    /// metadata.uid.
    pub uid: String,
}

impl WorkloadKey {
    /// The key of a stored object.
    pub fn of<K: Resource<DynamicType = ()>>(obj: &K) -> Result<Self> {
        let meta = obj.meta();
        Ok(Self {
            namespace: meta.namespace.clone().ok_or(Error::MissingMetadata("namespace"))?,
            kind: K::kind(&()).into_owned(),
            name: meta.name.clone().ok_or(Error::MissingMetadata("name"))?,
            uid: meta.uid.clone().ok_or(Error::MissingMetadata("uid"))?,
        })
    }

    /// Parses `namespace/Kind/name/uid` (the LLMOPS_WORKLOAD form).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('/');
        let key = Self {
            namespace: parts.next()?.to_string(),
            kind: parts.next()?.to_string(),
            name: parts.next()?.to_string(),
            uid: parts.next()?.to_string(),
        };
        (parts.next().is_none() && [&key.namespace, &key.kind, &key.name, &key.uid].iter().all(|p| !p.is_empty()))
            .then_some(key)
    }

    /// From the protocol's Workload message.
    pub fn from_proto(w: &llmops_proto::v1::Workload) -> Self {
        Self { namespace: w.namespace.clone(), kind: w.kind.clone(), name: w.name.clone(), uid: w.uid.clone() }
    }

    /// As the protocol's Workload message.
    pub fn to_proto(&self) -> llmops_proto::v1::Workload {
        llmops_proto::v1::Workload {
            namespace: self.namespace.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }

    /// Store key prefix: `<ns>/<kind-lowercase>/<name>/<uid>`.
    pub fn store_prefix(&self) -> String {
        format!("{}/{}/{}/{}", self.namespace, self.kind.to_lowercase(), self.name, self.uid)
    }

    /// URI of the output directory: `store://<ns>/<kind>/<name>/<uid>/output/`.
    pub fn output_uri(&self) -> String {
        format!("store://{}/output/", self.store_prefix())
    }

    /// URI of the checkpoint directory: `store://<ns>/<kind>/<name>/<uid>/checkpoints/`.
    pub fn checkpoints_uri(&self) -> String {
        format!("store://{}/checkpoints/", self.store_prefix())
    }

    /// Name of an owned child object: `<name>-<suffix>`, shortened with a hash when
    /// longer than 63 characters (Job names become label values).
    pub fn child_name(&self, suffix: &str) -> String {
        child_name(&self.name, suffix)
    }

    /// Labels of the objects owned by this workload.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
            (KIND_LABEL.to_string(), self.kind.clone()),
            (NAME_LABEL.to_string(), label_value(&self.name)),
            (UID_LABEL.to_string(), self.uid.clone()),
        ])
    }

    /// Label selector of the objects owned by this workload.
    pub fn selector(&self) -> String {
        format!("{}={}", UID_LABEL, self.uid)
    }
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}/{}", self.namespace, self.kind, self.name, self.uid)
    }
}

/// `<name>-<suffix>`, at most 63 characters.
pub fn child_name(name: &str, suffix: &str) -> String {
    let full = format!("{name}-{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let hash = hex::encode(Sha256::digest(name.as_bytes()));
    let keep = 63 - suffix.len() - 10;
    let head: String = name.chars().take(keep).collect();
    format!("{}-{}-{suffix}", head.trim_end_matches(['-', '.']), &hash[..8])
}

fn label_value(text: &str) -> String {
    if text.len() <= 63 {
        return text.to_string();
    }
    let hash = hex::encode(Sha256::digest(text.as_bytes()));
    format!("{}-{}", text.chars().take(54).collect::<String>().trim_end_matches(['-', '.']), &hash[..8])
}

/// The controller owner reference to `obj`.
pub fn owner_reference<K: Resource<DynamicType = ()>>(obj: &K) -> Result<OwnerReference> {
    obj.controller_owner_ref(&()).ok_or(Error::MissingMetadata("name or uid"))
}

/// The Store message of the Assignment for the configured store.
pub fn store_proto(store: &StoreConfig) -> llmops_proto::v1::Store {
    use llmops_proto::v1::{LocalStore, S3Store, store::Backend};
    let backend = match store {
        StoreConfig::Local { mount_path, .. } => {
            Backend::Local(LocalStore { root: mount_path.to_string_lossy().into_owned() })
        }
        StoreConfig::S3 { bucket, prefix, endpoint, region, allow_http, .. } => Backend::S3(S3Store {
            bucket: bucket.clone(),
            prefix: prefix.clone(),
            endpoint: endpoint.clone(),
            region: region.clone(),
            allow_http: *allow_http,
        }),
    };
    llmops_proto::v1::Store { backend: Some(backend) }
}

/// Joins a file name onto a directory URI.
pub fn join_uri(dir: &str, file: &str) -> String {
    format!("{}/{file}", dir.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> WorkloadKey {
        WorkloadKey { namespace: "ns".into(), kind: "FineTuneJob".into(), name: "tune".into(), uid: "u-1".into() }
    }

    #[test]
    fn store_locations_follow_the_layout() {
        assert_eq!(key().output_uri(), "store://ns/finetunejob/tune/u-1/output/");
        assert_eq!(key().checkpoints_uri(), "store://ns/finetunejob/tune/u-1/checkpoints/");
        assert_eq!(join_uri("store://a/b/", "train.parquet"), "store://a/b/train.parquet");
    }

    #[test]
    fn workload_round_trips_through_text() {
        let k = key();
        assert_eq!(WorkloadKey::parse(&k.to_string()), Some(k));
        assert_eq!(WorkloadKey::parse("ns/Kind/name"), None);
        assert_eq!(WorkloadKey::parse("ns/Kind//uid"), None);
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = "a".repeat(80);
        let n = child_name(&long, "finetune");
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with("-finetune"));
        assert_eq!(n, child_name(&long, "finetune"));
        assert_eq!(child_name("short", "prepare"), "short-prepare");
    }
}
