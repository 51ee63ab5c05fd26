//! Per-workload bearer tokens: generated at random, kept in a Secret the operator owns,
//! and known to the gateway only by their sha256. A request is accepted when its token
//! belongs to the workload it names; a missing, malformed, unknown or foreign token is
//! refused with the reason counted.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::workload::WorkloadKey;

/// Why a token was refused; the label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No authorization metadata.
    Missing,
    /// Not of the form `Bearer <token>`.
    Malformed,
    /// A token no workload has (wrong or revoked).
    Unknown,
    /// The token of another workload than the one named in the request.
    Foreign,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Unknown => "unknown",
            Refusal::Foreign => "foreign",
        }
    }

    /// The gRPC status returned to the caller.
    pub fn status(self) -> tonic::Status {
        match self {
            Refusal::Missing => tonic::Status::unauthenticated("missing authorization: Bearer <token> metadata"),
            Refusal::Malformed => tonic::Status::unauthenticated("authorization metadata is not `Bearer <token>`"),
            Refusal::Unknown => tonic::Status::unauthenticated("token refused"),
            Refusal::Foreign => tonic::Status::permission_denied("the token does not belong to this workload"),
        }
    }
}

/// sha256 of a token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// A new random token: 32 bytes, hex.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// The bearer token of a request's metadata.
pub fn bearer(metadata: &MetadataMap) -> Result<String, Refusal> {
    let value = metadata.get("authorization").ok_or(Refusal::Missing)?;
    let text = value.to_str().map_err(|_| Refusal::Malformed)?;
    let (scheme, token) = text.trim().split_once(' ').ok_or(Refusal::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Refusal::Malformed);
    }
    Ok(token.to_string())
}

/// Token hashes and the workloads they belong to.
#[derive(Debug, Default)]
pub struct TokenTable {
    by_hash: HashMap<[u8; 32], WorkloadKey>,
    by_uid: HashMap<String, [u8; 32]>,
}

impl TokenTable {
    /// Records `token` as the token of `key`, replacing an older one of the same workload.
    pub fn insert(&mut self, key: WorkloadKey, token: &str) {
        let hash = token_hash(token);
        if let Some(old) = self.by_uid.insert(key.uid.clone(), hash)
            && old != hash
        {
            self.by_hash.remove(&old);
        }
        self.by_hash.insert(hash, key);
    }

    /// Forgets the token of a workload.
    pub fn remove(&mut self, uid: &str) {
        if let Some(hash) = self.by_uid.remove(uid) {
            self.by_hash.remove(&hash);
        }
    }

    /// The workload a token belongs to, checked against the workload the request names
    /// (None: the request names none and gets the token's own).
    pub fn authenticate(&self, token: &str, claimed: Option<&WorkloadKey>) -> Result<WorkloadKey, Refusal> {
        let owner = self.by_hash.get(&token_hash(token)).ok_or(Refusal::Unknown)?;
        match claimed {
            Some(c)
                if c.uid != owner.uid
                    || c.namespace != owner.namespace
                    || c.name != owner.name
                    || c.kind != owner.kind =>
            {
                Err(Refusal::Foreign)
            }
            _ => Ok(owner.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> WorkloadKey {
        WorkloadKey { namespace: "ns".into(), kind: "Dataset".into(), name: name.into(), uid: format!("uid-{name}") }
    }

    #[test]
    fn own_token_is_accepted_and_others_refused() {
        let mut table = TokenTable::default();
        table.insert(key("a"), "token-a");
        table.insert(key("b"), "token-b");
        assert_eq!(table.authenticate("token-a", Some(&key("a"))), Ok(key("a")));
        assert_eq!(table.authenticate("token-a", None), Ok(key("a")));
        assert_eq!(table.authenticate("token-b", Some(&key("a"))), Err(Refusal::Foreign));
        assert_eq!(table.authenticate("nope", Some(&key("a"))), Err(Refusal::Unknown));
    }

    #[test]
    fn a_replaced_token_stops_working() {
        let mut table = TokenTable::default();
        table.insert(key("a"), "old");
        table.insert(key("a"), "new");
        assert_eq!(table.authenticate("old", None), Err(Refusal::Unknown));
        assert_eq!(table.authenticate("new", None), Ok(key("a")));
        table.remove("uid-a");
        assert_eq!(table.authenticate("new", None), Err(Refusal::Unknown));
    }

    #[test]
    fn bearer_metadata_is_parsed() {
        let mut md = MetadataMap::new();
        assert_eq!(bearer(&md), Err(Refusal::Missing));
        md.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert_eq!(bearer(&md), Err(Refusal::Malformed));
        md.insert("authorization", "Bearer abc".parse().expect("ascii"));
        assert_eq!(bearer(&md), Ok("abc".to_string()));
    }

    #[test]
    fn generated_tokens_differ() {
        let a = generate().expect("random");
        let b = generate().expect("random");
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
