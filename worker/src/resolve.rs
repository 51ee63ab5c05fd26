//! `resolve` mode: copies a model (or adapter) from wherever its URI points into the
//! store's content-addressed cache, `<cache>/sha256-<digest>/`, and reports the digest.
//! Only the operator's resolver Job runs it; every later workload reads the cached copy
//! under that digest, so a model is downloaded once however many objects name it.
//!
//! The digest is the one the rest of the system pins: a file's sha256, or for a
//! directory the sha256 of its `manifest.json` when it has one, else the digest over
//! its files (`store::dir_digest`). A pinned `sha256` that the content does not have is
//! refused (`DigestMismatch`) and nothing is written. A cache entry is published
//! atomically (written aside, then renamed; on a bucket, its record object is written
//! last), so a reader never sees half a model, and an entry already there is reused
//! after its digest is checked again.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use llmops_proto::v1::{Assignment, ResolveAssignment, Store, assignment::Mode, store::Backend};
use serde_json::{Value, json};

use crate::report::ModeFailure;
use crate::staging::Bucket;
use crate::store::{dir_digest, file_sha256, is_remote, local_path};

fn failure(reason: &'static str, message: impl Into<String>) -> anyhow::Error {
    ModeFailure { reason, message: message.into() }.into()
}

/// Resolves the Assignment's source into the cache; returns the record of the entry:
/// `uri` (store:// of the cached file or directory), `sha256`, `source`, `files` (name,
/// sha256, bytes) and `reused`.
pub fn run(assignment: &Assignment) -> Result<Value> {
    let Some(Mode::Resolve(resolve)) = &assignment.mode else { bail!("not a resolve assignment") };
    let store = assignment.store.as_ref().context("the resolve mode needs the store")?;
    let scratch = std::env::var_os("LLMOPS_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("llmops-resolve-{}", std::process::id()));
    let result = resolve_into(resolve, store, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn resolve_into(r: &ResolveAssignment, store: &Store, scratch: &Path) -> Result<Value> {
    let source = r.source.as_ref().context("resolve.source is required")?;
    let uri = source.uri.as_str();
    let expected = source.sha256.to_ascii_lowercase();
    if uri.starts_with("http://") && expected.is_empty() {
        return Err(failure(
            "InvalidAssignment",
            format!("{uri}: a plain http download needs a pinned sha256 (anyone on the path could change it)"),
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let backend = store.backend.as_ref().context("the assignment's store names no backend")?;

    // 1. The content, as local files.
    crate::report::phase("Downloading", format!("fetching {uri}"));
    let content = if let Some(key) = uri.strip_prefix("store://") {
        match backend {
            Backend::Local(_) => local_path(uri, Some(store))?,
            Backend::S3(s3) => {
                let target = scratch.join("source").join(file_name(key));
                if !runtime.block_on(Bucket::new(s3)?.download(key, &target))? {
                    return Err(failure("InputNotFound", format!("{uri}: nothing in the store under this key")));
                }
                target
            }
        }
    } else if is_remote(uri) {
        crate::store::stage(uri, &scratch.join("source")).map_err(|e| {
            let text = format!("{e:#}");
            if text.contains("404") || text.contains("Not Found") || text.contains("NotFound") {
                failure("InputNotFound", format!("{uri}: {text}"))
            } else {
                e
            }
        })?
    } else {
        local_path(uri, Some(store))?
    };
    if !content.exists() {
        return Err(failure("InputNotFound", format!("{uri}: not found ({})", content.display())));
    }

    // 2. Its digest, checked against the pinned one before anything is written.
    crate::report::phase("Verifying", format!("computing the sha256 of {uri}"));
    let files = listing(&content)?;
    let digest = if content.is_dir() { dir_digest(&content)? } else { files[0].1.clone() };
    if !expected.is_empty() && digest != expected {
        return Err(failure(
            "DigestMismatch",
            format!("{uri} has sha256 {digest}, but the spec pins {expected}; nothing was cached"),
        ));
    }

    // 3. The cache entry, written once.
    let cache = r.cache.trim_matches('/');
    let entry = format!("{cache}/sha256-{digest}");
    crate::report::phase("Caching", format!("writing {entry}"));
    let (names, reused) = match backend {
        Backend::Local(_) => {
            let target = local_path(&format!("store://{entry}"), Some(store))?;
            publish_local(&content, &target, &digest)?
        }
        Backend::S3(s3) => runtime.block_on(publish_bucket(&Bucket::new(s3)?, &content, &entry, &files))?,
    };
    let single = !content.is_dir();
    let cached_uri = if single {
        format!("store://{entry}/{}", names.first().context("the cache entry holds no file")?)
    } else {
        format!("store://{entry}/")
    };
    let bytes: u64 = files.iter().map(|(_, _, b)| b).sum();
    let record = json!({
        "uri": cached_uri,
        "sha256": digest,
        "source": uri,
        "reused": reused,
        "bytes": bytes,
        "files": files.iter().map(|(n, s, b)| json!({"name": n, "sha256": s, "bytes": b})).collect::<Vec<_>>(),
    });
    // The entry's record beside it (not inside: a directory's digest covers its files).
    let record_key = format!("{entry}.json");
    let text = serde_json::to_string_pretty(&record)?;
    match backend {
        Backend::Local(_) => {
            let path = local_path(&format!("store://{record_key}"), Some(store))?;
            let tmp = path.with_extension(format!("json.{}", std::process::id()));
            std::fs::write(&tmp, &text)?;
            std::fs::rename(&tmp, &path)?;
        }
        Backend::S3(s3) => {
            let tmp = scratch.join("record.json");
            std::fs::create_dir_all(scratch)?;
            std::fs::write(&tmp, &text)?;
            runtime.block_on(Bucket::new(s3)?.put(&tmp, &record_key))?;
        }
    }
    tracing::info!(source = %uri, sha256 = %digest, uri = %cached_uri, reused, bytes, "model resolved");
    Ok(record)
}

fn file_name(key: &str) -> String {
    key.trim_end_matches('/').rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("model").to_string()
}

/// Every file of `content` (a file, or a directory's files at any depth) as (name
/// relative to the directory, sha256, bytes), sorted by name.
fn listing(content: &Path) -> Result<Vec<(String, String, u64)>> {
    if content.is_file() {
        let name = content.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        return Ok(vec![(name, file_sha256(content)?, content.metadata()?.len())]);
    }
    let mut out = Vec::new();
    for (path, name) in crate::store::files_under(content)? {
        out.push((name, file_sha256(&path)?, path.metadata()?.len()));
    }
    if out.is_empty() {
        bail!("{} holds no files", content.display());
    }
    Ok(out)
}

/// Publishes `content` at `target` on a mounted store: copied into a sibling directory,
/// then renamed into place. An entry already there whose digest checks out is kept; one
/// that does not (a damaged copy) is replaced. Returns the entry's top-level names and
/// whether it was reused.
fn publish_local(content: &Path, target: &Path, digest: &str) -> Result<(Vec<String>, bool)> {
    let names = |dir: &Path| -> Result<Vec<String>> {
        let mut n: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        n.sort();
        Ok(n)
    };
    if target.is_dir() {
        let found = if content.is_dir() {
            dir_digest(target).ok()
        } else {
            names(target)?.first().and_then(|n| file_sha256(&target.join(n)).ok())
        };
        if found.as_deref() == Some(digest) {
            return Ok((names(target)?, true));
        }
        tracing::warn!(entry = %target.display(), "a cache entry does not match its digest; replacing it");
        std::fs::remove_dir_all(target).with_context(|| format!("removing {}", target.display()))?;
    }
    let parent = target.parent().context("the cache entry has no parent directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let incoming = parent.join(format!(
        ".incoming-{}-{}",
        target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&incoming);
    std::fs::create_dir_all(&incoming)?;
    if content.is_dir() {
        for (path, name) in crate::store::files_under(content)? {
            let to = incoming.join(&name);
            if let Some(p) = to.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::copy(&path, &to).with_context(|| format!("copying {}", path.display()))?;
        }
    } else {
        let name = content.file_name().context("the source has no file name")?;
        std::fs::copy(content, incoming.join(name)).with_context(|| format!("copying {}", content.display()))?;
    }
    match std::fs::rename(&incoming, target) {
        Ok(()) => Ok((names(target)?, false)),
        // Another resolver published the same digest first: the same bytes, keep theirs.
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(&incoming);
            Ok((names(target)?, true))
        }
        Err(e) => Err(e).with_context(|| format!("publishing {}", target.display())),
    }
}

/// Publishes `content` under `entry/` in a bucket: every file uploaded, the record object
/// (written by the caller) last. An entry whose record object exists is reused.
async fn publish_bucket(
    bucket: &Bucket,
    content: &Path,
    entry: &str,
    files: &[(String, String, u64)],
) -> Result<(Vec<String>, bool)> {
    if bucket.exists(&format!("{entry}.json")).await? {
        let existing = bucket.list(entry).await?;
        if !existing.is_empty() && (content.is_file() || files.iter().all(|(n, _, _)| existing.contains(n))) {
            return Ok((existing, true));
        }
    }
    if content.is_dir() {
        bucket.upload_dir(content, entry).await?;
    } else {
        let (name, _, _) = &files[0];
        bucket.put(content, &format!("{entry}/{name}")).await?;
    }
    Ok((files.iter().map(|(n, _, _)| n.clone()).collect(), false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmops_proto::v1::{Artifact, LocalStore};

    /// An empty directory of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("llmops-resolve-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        dir
    }

    fn assignment(root: &Path, uri: &str, sha256: &str) -> Assignment {
        Assignment {
            workload: None,
            store: Some(Store { backend: Some(Backend::Local(LocalStore { root: root.display().to_string() })) }),
            mode: Some(Mode::Resolve(ResolveAssignment {
                source: Some(Artifact { uri: uri.into(), sha256: sha256.into() }),
                cache: "models".into(),
            })),
        }
    }

    #[test]
    fn a_file_is_cached_once_under_its_sha256_and_reused() -> Result<()> {
        let dir = scratch("file");
        std::fs::create_dir_all(dir.as_path().join("ns/imports"))?;
        std::fs::write(dir.as_path().join("ns/imports/m.gguf"), b"weights")?;
        let sha = file_sha256(&dir.as_path().join("ns/imports/m.gguf"))?;
        let first = run(&assignment(dir.as_path(), "store://ns/imports/m.gguf", ""))?;
        assert_eq!(first["sha256"], sha.as_str());
        assert_eq!(first["uri"], format!("store://models/sha256-{sha}/m.gguf"));
        assert_eq!(first["reused"], false);
        let cached = dir.as_path().join(format!("models/sha256-{sha}/m.gguf"));
        assert_eq!(std::fs::read(&cached)?, b"weights");
        assert!(dir.as_path().join(format!("models/sha256-{sha}.json")).is_file());

        // The source changing later does not change the cached copy (it was copied).
        std::fs::write(dir.as_path().join("ns/imports/m.gguf"), b"changed")?;
        assert_eq!(std::fs::read(&cached)?, b"weights");

        // Same bytes under another name: the entry is reused, named as first cached.
        std::fs::write(dir.as_path().join("ns/imports/other.bin"), b"weights")?;
        let second = run(&assignment(dir.as_path(), "store://ns/imports/other.bin", &sha))?;
        assert_eq!(second["reused"], true);
        assert_eq!(second["uri"], first["uri"]);
        Ok(())
    }

    #[test]
    fn a_pinned_digest_that_does_not_match_is_refused_and_nothing_is_cached() -> Result<()> {
        let dir = scratch("mismatch");
        std::fs::write(dir.as_path().join("m.gguf"), b"weights")?;
        let wrong = "0".repeat(64);
        let err = run(&assignment(dir.as_path(), "store://m.gguf", &wrong)).unwrap_err();
        let f = err.downcast_ref::<ModeFailure>().expect("a typed failure");
        assert_eq!(f.reason, "DigestMismatch");
        assert!(f.message.contains(&wrong), "{}", f.message);
        assert!(
            !dir.as_path().join("models").exists() || std::fs::read_dir(dir.as_path().join("models"))?.count() == 0
        );
        Ok(())
    }

    #[test]
    fn a_directory_is_cached_with_its_files_under_the_directory_digest() -> Result<()> {
        let dir = scratch("directory");
        let src = dir.as_path().join("imports/tiny");
        std::fs::create_dir_all(src.join("sub"))?;
        std::fs::write(src.join("config.json"), b"{}")?;
        std::fs::write(src.join("sub/weights.bin"), b"abc")?;
        let digest = dir_digest(&src)?;
        let out = run(&assignment(dir.as_path(), "store://imports/tiny/", ""))?;
        assert_eq!(out["sha256"], digest.as_str());
        assert_eq!(out["uri"], format!("store://models/sha256-{digest}/"));
        let entry = dir.as_path().join(format!("models/sha256-{digest}"));
        assert_eq!(dir_digest(&entry)?, digest, "the cached copy has the same digest");

        // A damaged entry is replaced, not served.
        std::fs::write(entry.join("config.json"), b"tampered")?;
        let again = run(&assignment(dir.as_path(), "store://imports/tiny/", ""))?;
        assert_eq!(again["reused"], false);
        assert_eq!(std::fs::read(entry.join("config.json"))?, b"{}");
        Ok(())
    }

    #[test]
    fn plain_http_without_a_pinned_digest_and_missing_sources_are_refused() {
        let dir = scratch("refused");
        let err = run(&assignment(dir.as_path(), "http://example.invalid/m.gguf", "")).unwrap_err();
        assert_eq!(err.downcast_ref::<ModeFailure>().map(|f| f.reason), Some("InvalidAssignment"));
        let err = run(&assignment(dir.as_path(), "store://imports/none.gguf", "")).unwrap_err();
        assert_eq!(err.downcast_ref::<ModeFailure>().map(|f| f.reason), Some("InputNotFound"));
    }
}
