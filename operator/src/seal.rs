//! Seals on the operator's own state kept in tenants' namespaces. A started workload's
//! pinned inputs (its Assignment, lineage and token) live in a Secret of the workload's
//! namespace, where anyone who may write Secrets could change them. Each such Secret
//! carries an HMAC-SHA256 over its data and the uid of the object it belongs to, keyed
//! with a secret only the operator holds (a Secret in its own namespace, made on first
//! use). A Secret whose seal does not verify, or that is not controlled by the object's
//! current uid, is refused rather than acted on.

use std::collections::BTreeMap;

use hmac::{Hmac, KeyInit, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use sha2::Sha256;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::workload::{FIELD_MANAGER, MANAGED_BY};

/// Key of the seal in a sealed Secret's data.
pub const SEAL_KEY: &str = "seal";
/// Name of the Secret (in the operator's namespace) holding the sealing key.
pub const KEY_SECRET: &str = "llmops-operator-state-key";

fn mac(key: &[u8], uid: &str, data: &BTreeMap<String, ByteString>) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(uid.as_bytes());
    for (k, v) in data.iter().filter(|(k, _)| k.as_str() != SEAL_KEY) {
        // Lengths first, so that no two different maps hash alike.
        mac.update(&(k.len() as u64).to_be_bytes());
        mac.update(k.as_bytes());
        mac.update(&(v.0.len() as u64).to_be_bytes());
        mac.update(&v.0);
    }
    mac
}

/// The seal of `data` (every key but the seal itself, in key order) for object `uid`.
pub fn seal(key: &[u8], uid: &str, data: &BTreeMap<String, ByteString>) -> String {
    hex::encode(mac(key, uid, data).finalize().into_bytes())
}

/// Why a sealed Secret is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// Not controlled by the object's current uid (made for an earlier object of the
    /// same name, or by someone else).
    NotOwned,
    /// No seal, or one that does not verify: edited outside the operator.
    BadSeal,
}

/// Checks a Secret that should hold sealed state of the object `uid`.
pub fn verify(key: &[u8], uid: &str, secret: &Secret) -> std::result::Result<(), Refused> {
    let owned = secret.metadata.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == uid);
    if !owned {
        return Err(Refused::NotOwned);
    }
    let data = secret.data.clone().unwrap_or_default();
    let found = data.get(SEAL_KEY).and_then(|s| hex::decode(&s.0).ok()).ok_or(Refused::BadSeal)?;
    // verify_slice compares in constant time.
    mac(key, uid, &data).verify_slice(&found).map_err(|_| Refused::BadSeal)
}

/// The operator's sealing key: read from [`KEY_SECRET`] in its own namespace, made (32
/// random bytes) the first time. Kept for the life of the process.
pub async fn key(ctx: &Context) -> Result<Vec<u8>> {
    ctx.state_key
        .get_or_try_init(|| async {
            let ns = &ctx.config.resolver_namespace;
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
            let read = |s: Secret| {
                s.data
                    .and_then(|d| d.get("key").map(|k| k.0.clone()))
                    .filter(|k| k.len() >= 32)
                    .ok_or(Error::MissingMetadata("a key of at least 32 bytes in the state key Secret"))
            };
            if let Some(s) = secrets.get_opt(KEY_SECRET).await? {
                return read(s);
            }
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(KEY_SECRET.into()),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())])),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([("key".to_string(), ByteString(bytes.to_vec()))])),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
            match secrets.create(&params, &secret).await {
                Ok(_) => Ok(bytes.to_vec()),
                // Another replica made it first: use its key.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    read(secrets.get_opt(KEY_SECRET).await?.ok_or(Error::MissingMetadata("the state key Secret"))?)
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn sealed(key: &[u8], uid: &str) -> Secret {
        let mut data = BTreeMap::from([
            ("token".to_string(), ByteString(b"t0k3n".to_vec())),
            ("assignment.json".to_string(), ByteString(br#"{"prepare":{}}"#.to_vec())),
        ]);
        data.insert(SEAL_KEY.into(), ByteString(seal(key, uid, &data).into_bytes()));
        Secret {
            metadata: ObjectMeta {
                owner_references: Some(vec![OwnerReference {
                    controller: Some(true),
                    uid: uid.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }

    #[test]
    fn a_sealed_secret_verifies_and_any_edit_breaks_it() {
        let key = [7u8; 32];
        let good = sealed(&key, "u-1");
        assert_eq!(verify(&key, "u-1", &good), Ok(()));
        assert_eq!(verify(&[8u8; 32], "u-1", &good), Err(Refused::BadSeal), "another key");
        assert_eq!(verify(&key, "u-2", &good), Err(Refused::NotOwned), "another object's uid");

        let mut edited = good.clone();
        if let Some(d) = edited.data.as_mut() {
            d.insert(
                "assignment.json".into(),
                ByteString(br#"{"prepare":{"source":{"uri":"store://other-ns/x"}}}"#.to_vec()),
            );
        }
        assert_eq!(verify(&key, "u-1", &edited), Err(Refused::BadSeal));

        let mut added = good.clone();
        if let Some(d) = added.data.as_mut() {
            d.insert("secret-files.json".into(), ByteString(br#"[{"secret":"db","key":"password"}]"#.to_vec()));
        }
        assert_eq!(verify(&key, "u-1", &added), Err(Refused::BadSeal), "an added key");

        let mut unsealed = good.clone();
        if let Some(d) = unsealed.data.as_mut() {
            d.remove(SEAL_KEY);
        }
        assert_eq!(verify(&key, "u-1", &unsealed), Err(Refused::BadSeal));
    }
}
