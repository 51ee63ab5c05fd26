//! Tenancy (DESIGN.md, "Tenancy"): every namespace is a tenant of the store. A
//! `store://KEY` written in a custom resource's spec names `<namespace>/KEY` under the
//! store root, so no spelling reaches another namespace's data; the one exception is the
//! shared, content-addressed model cache (`store://models/sha256-<digest>/…`), which
//! every tenant may read and only the operator's resolver writes.
//!
//! The controllers localize a spec once, when they read the object, and everything
//! after that (Assignments, lineage, resolution records) sees store-root keys.

use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::models::CACHE;

/// The store-root form of a URI written in `namespace`'s spec: `store://KEY` becomes
/// `store://<namespace>/KEY`, except keys in the model cache; other schemes are kept.
pub fn localize_uri(namespace: &str, uri: &str) -> String {
    match uri.strip_prefix("store://") {
        Some(key) if !is_cache_key(key) => format!("store://{namespace}/{}", key.trim_start_matches('/')),
        _ => uri.to_string(),
    }
}

/// Whether a store key lies in the shared model cache (`models/sha256-…`).
pub fn is_cache_key(key: &str) -> bool {
    key.strip_prefix(CACHE).and_then(|rest| rest.strip_prefix("/sha256-")).is_some()
}

/// Why objects of `namespace` cannot run: a namespace with the cache's name would own
/// the cache (its part of the store is the subPath named after it).
pub fn reserved(namespace: &str) -> Option<String> {
    (namespace == CACHE).then(|| {
        format!("namespace {namespace:?} is reserved: it is the name of the store's model cache; use another namespace")
    })
}

/// `obj` with every `uri` of its spec in store-root form (see [`localize_uri`]).
pub fn localized<K>(obj: &K) -> Result<K>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone,
{
    let Some(namespace) = obj.meta().namespace.clone() else { return Ok(obj.clone()) };
    let mut value = serde_json::to_value(obj)?;
    if let Some(spec) = value.get_mut("spec") {
        visit(spec, &namespace);
    }
    Ok(serde_json::from_value(value)?)
}

fn visit(value: &mut serde_json::Value, namespace: &str) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(uri) if key == "uri" => *uri = localize_uri(namespace, uri),
                    _ => visit(v, namespace),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| visit(v, namespace)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmops_crds::{Dataset, ModelDeployment};

    #[test]
    fn store_keys_become_the_namespaces_own() {
        assert_eq!(localize_uri("team-a", "store://imports/m.gguf"), "store://team-a/imports/m.gguf");
        // Another namespace's name is just a directory of this one's.
        assert_eq!(localize_uri("team-a", "store://team-b/secret.jsonl"), "store://team-a/team-b/secret.jsonl");
        assert_eq!(localize_uri("team-a", "store:///abs/x"), "store://team-a/abs/x");
        let d = "a".repeat(64);
        let cached = format!("store://models/sha256-{d}/m.gguf");
        assert_eq!(localize_uri("team-a", &cached), cached);
        // Only the cache's entries are shared, not the name `models`.
        assert_eq!(localize_uri("team-a", "store://models/m.gguf"), "store://team-a/models/m.gguf");
        assert_eq!(localize_uri("team-a", "s3://bucket/k"), "s3://bucket/k");
        assert_eq!(localize_uri("team-a", "https://h/m.gguf"), "https://h/m.gguf");
    }

    #[test]
    fn every_uri_of_a_spec_is_localized_and_nothing_else() {
        let md: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "llmops.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": "team-a"},
            "spec": {
                "model": {"uri": "store://imports/m.gguf"},
                "adapters": [{"name": "x", "uri": "store://adapters/x/"}]
            }
        }))
        .expect("a ModelDeployment");
        let out = localized(&md).expect("localized");
        assert_eq!(out.spec.model.uri.as_deref(), Some("store://team-a/imports/m.gguf"));
        assert_eq!(out.spec.adapters[0].source.uri.as_deref(), Some("store://team-a/adapters/x/"));
        assert_eq!(out.metadata, md.metadata);

        let ds: Dataset = serde_json::from_value(serde_json::json!({
            "apiVersion": "llmops.dev/v1alpha1", "kind": "Dataset",
            "metadata": {"name": "d", "namespace": "team-a"},
            "spec": {"source": {"uri": "store://raw/*.jsonl"}, "format": "jsonl"},
            "status": {"artifact": {"uri": "store://team-a/dataset/d/u/output/", "sha256": "0"}}
        }))
        .expect("a Dataset");
        let out = localized(&ds).expect("localized");
        assert_eq!(out.spec.source.uri.as_deref(), Some("store://team-a/raw/*.jsonl"));
        // Status holds store-root keys already.
        assert_eq!(out.status, ds.status);
    }

    #[test]
    fn the_cache_is_no_namespace() {
        assert!(reserved("models").is_some());
        assert_eq!(reserved("team-a"), None);
    }
}
