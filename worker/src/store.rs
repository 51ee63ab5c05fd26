//! Where an artifact URI lives on this machine. The store (DESIGN.md, "Artifact store")
//! is a volume mounted in every pod or an S3 bucket; `store://KEY` names a key under its
//! root, `file://PATH` and plain paths name local files.

use std::path::PathBuf;

use anyhow::{Result, bail};
use llmops_proto::v1::{Store, store::Backend};

/// The local path of `uri`. A `store://` URI needs a volume-backed store; `s3://` and
/// `https://` artifacts are staged into local scratch before a mode runs, so they are
/// refused here with that advice.
pub fn local_path(uri: &str, store: Option<&Store>) -> Result<PathBuf> {
    if let Some(key) = uri.strip_prefix("store://") {
        return match store.and_then(|s| s.backend.as_ref()) {
            Some(Backend::Local(local)) if !local.root.is_empty() => {
                if key.split('/').any(|part| part == "..") {
                    bail!("{uri}: a store key must not contain '..'");
                }
                Ok(PathBuf::from(&local.root).join(key.trim_start_matches('/')))
            }
            Some(Backend::S3(_)) => {
                bail!("{uri}: the store is an S3 bucket; this mode needs the store mounted as a volume")
            }
            _ => bail!("{uri}: the assignment names no store (set store.local.root)"),
        };
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        bail!("{uri}: {scheme}:// artifacts must be staged into local files first (the agent does this in a pod)");
    }
    Ok(PathBuf::from(uri))
}

/// sha256 of a file, lowercase hex, read in 1 MiB blocks.
pub fn file_sha256(path: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmops_proto::v1::LocalStore;

    #[test]
    fn store_keys_resolve_under_the_root() {
        let store = Store { backend: Some(Backend::Local(LocalStore { root: "/data".into() })) };
        assert_eq!(
            local_path("store://ns/x/traffic/", Some(&store)).expect("ok"),
            PathBuf::from("/data/ns/x/traffic/")
        );
        assert_eq!(local_path("file:///m.gguf", None).expect("ok"), PathBuf::from("/m.gguf"));
        assert_eq!(local_path("rel/m.gguf", None).expect("ok"), PathBuf::from("rel/m.gguf"));
        assert!(local_path("store://../etc", Some(&store)).is_err());
        assert!(local_path("store://k", None).is_err());
        assert!(local_path("s3://b/k", None).is_err());
    }
}
