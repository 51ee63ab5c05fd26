//! Where an artifact URI lives on this machine. The store (DESIGN.md, "Artifact store")
//! is a volume mounted in every pod or an S3 bucket; `store://KEY` names a key under its
//! root, `file://PATH` and plain paths name local files.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use llmops_proto::v1::{Store, store::Backend};

/// The local path of `uri`. A `store://` URI needs a volume-backed store; `s3://` and
/// `https://` artifacts are staged into local scratch before a mode runs, so they are
/// refused here with that advice.
pub fn local_path(uri: &str, store: Option<&Store>) -> Result<PathBuf> {
    if let Some(key) = uri.strip_prefix("store://") {
        return match store.and_then(|s| s.backend.as_ref()) {
            Some(Backend::Local(local)) if !local.root.is_empty() => {
                check_key(key).with_context(|| uri.to_string())?;
                let root = PathBuf::from(&local.root);
                let path = root.join(key.trim_start_matches('/'));
                contained(&root, key, &path).with_context(|| uri.to_string())?;
                Ok(path)
            }
            Some(Backend::S3(_)) => {
                bail!("{uri}: the store is an S3 bucket; this mode needs the store mounted as a volume")
            }
            _ => bail!("{uri}: the assignment names no store (set store.local.root)"),
        };
    }
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(mapped(path));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        bail!("{uri}: {scheme}:// artifacts must be staged into local files first (the agent does this in a pod)");
    }
    Ok(mapped(uri))
}

/// A store key is relative and every segment of it is a name: no empty, `.` or `..`
/// segment (a trailing `/` marks a directory).
pub fn check_key(key: &str) -> Result<()> {
    let body = key.strip_suffix('/').unwrap_or(key);
    if body.is_empty() || body.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        bail!("a store key must be a relative path without empty, '.' or '..' segments: {key:?}");
    }
    Ok(())
}

/// The top-level part of the store a key belongs to: its namespace, or the model cache.
fn top(key: &str) -> &str {
    key.trim_start_matches('/').split('/').next().unwrap_or_default()
}

/// `path` (the local path of `key`), with every symbolic link on the way that exists
/// resolved, stays inside the key's top-level directory of the store: a link a tenant
/// placed in its own part cannot lead a worker into another namespace's or out of the
/// store.
fn contained(root: &std::path::Path, key: &str, path: &std::path::Path) -> Result<()> {
    let Ok(base) = root.join(top(key)).canonicalize() else { return Ok(()) };
    let mut probe = path.to_path_buf();
    while std::fs::symlink_metadata(&probe).is_err() {
        if !probe.pop() {
            return Ok(());
        }
    }
    let real = probe.canonicalize().with_context(|| format!("resolving {}", probe.display()))?;
    if !real.starts_with(&base) {
        bail!("the key leads out of its part of the store (through a symbolic link, to {})", real.display());
    }
    Ok(())
}

/// Checks that every `store://` key of an Assignment lies in the part of the store its
/// workload may use (DESIGN.md, "Tenancy"): the workload's namespace, or the model
/// cache (`models/sha256-…`). The resolver (mode `resolve`) copies from any namespace
/// into the cache.
pub fn check_tenancy(assignment: &llmops_proto::v1::Assignment) -> Result<()> {
    use llmops_proto::v1::assignment::Mode;
    let namespace = assignment.workload.as_ref().map(|w| w.namespace.as_str()).unwrap_or_default();
    let resolver = matches!(assignment.mode, Some(Mode::Resolve(_)));
    let value = serde_json::to_value(assignment).context("reading the assignment")?;
    let mut keys = Vec::new();
    collect_store_keys(&value, &mut keys);
    for key in keys {
        check_key(&key).with_context(|| format!("store://{key}"))?;
        let cache = key.strip_prefix("models/sha256-").is_some();
        if !(resolver || cache || (!namespace.is_empty() && top(&key) == namespace)) {
            bail!(
                "store://{key}: outside this workload's part of the store (store://{namespace}/…) and the model cache"
            );
        }
    }
    Ok(())
}

fn collect_store_keys(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.extend(s.strip_prefix("store://").map(str::to_string)),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_store_keys(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect_store_keys(v, out)),
        _ => {}
    }
}

/// Environment variable with the mount paths of a pod run as a plain process (the
/// development node agent sets it): a JSON object from each volume's mount path to
/// the directory where that volume was materialised. Absent in a real container.
pub const PATH_MAP_ENV: &str = "LLMOPS_PATH_MAP";

fn path_map() -> &'static Vec<(String, PathBuf)> {
    static MAP: std::sync::OnceLock<Vec<(String, PathBuf)>> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        let text = std::env::var(PATH_MAP_ENV).unwrap_or_default();
        let map: std::collections::BTreeMap<String, String> = serde_json::from_str(&text).unwrap_or_default();
        let mut entries: Vec<(String, PathBuf)> = map
            .into_iter()
            .filter(|(mount, _)| mount.starts_with('/') && mount.len() > 1)
            .map(|(mount, local)| (mount.trim_end_matches('/').to_string(), PathBuf::from(local)))
            .collect();
        // Longest mount first, so /a/b wins over /a.
        entries.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        entries
    })
}

/// A path inside the pod, where this process finds it.
fn mapped(path: &str) -> PathBuf {
    map_path(path, path_map())
}

fn map_path(path: &str, map: &[(String, PathBuf)]) -> PathBuf {
    for (mount, local) in map {
        if path == mount {
            return local.clone();
        }
        if let Some(rest) = path.strip_prefix(mount.as_str()).and_then(|r| r.strip_prefix('/')) {
            return local.join(rest);
        }
    }
    PathBuf::from(path)
}

/// Whether `uri` names a remote object that must be downloaded before reading.
pub fn is_remote(uri: &str) -> bool {
    ["s3://", "https://", "http://"].iter().any(|p| uri.starts_with(p))
}

/// Downloads a remote source into `scratch` (streamed to disk, never held in memory) and
/// returns the local path: the file, or for an `s3://bucket/prefix/` the directory of
/// every object under the prefix. S3 credentials, region and endpoint (any S3-compatible
/// store) come from the standard AWS_* environment variables.
pub fn stage(uri: &str, scratch: &std::path::Path) -> Result<PathBuf> {
    use object_store::{ObjectStore, path::Path as ObjectPath};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let (store, keys, base): (Box<dyn ObjectStore>, Vec<ObjectPath>, String) =
            if let Some(rest) = uri.strip_prefix("s3://") {
                let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
                let store = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| anyhow::anyhow!("{uri}: {e}"))?;
                let keys = if key.is_empty() || key.ends_with('/') {
                    use tokio_stream::StreamExt;
                    let prefix = ObjectPath::from(key.trim_end_matches('/'));
                    let mut listing = store.list(Some(&prefix));
                    let mut keys = Vec::new();
                    while let Some(meta) = listing.next().await {
                        keys.push(meta.map_err(|e| anyhow::anyhow!("listing {uri}: {e}"))?.location);
                    }
                    keys.sort();
                    if keys.is_empty() {
                        bail!("{uri}: no objects under this prefix");
                    }
                    keys
                } else {
                    vec![ObjectPath::from(key)]
                };
                (Box::new(store), keys, key.trim_end_matches('/').to_string())
            } else {
                let (scheme, rest) = uri.split_once("://").unwrap_or(("https", uri));
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                let mut options = object_store::ClientOptions::new().with_allow_http(scheme == "http");
                for certificate in extra_roots()? {
                    options = options.with_root_certificate(certificate);
                }
                let store = object_store::http::HttpBuilder::new()
                    .with_url(format!("{scheme}://{host}"))
                    .with_client_options(options)
                    .build()
                    .map_err(|e| anyhow::anyhow!("{uri}: {e}"))?;
                (Box::new(store), vec![ObjectPath::from(path)], path.to_string())
            };
        let single = keys.len() == 1 && keys[0].as_ref() == base;
        std::fs::create_dir_all(scratch)?;
        for key in &keys {
            let relative = if single {
                key.filename().unwrap_or("object").to_string()
            } else {
                key.as_ref().strip_prefix(base.as_str()).unwrap_or(key.as_ref()).trim_start_matches('/').to_string()
            };
            let target = scratch.join(&relative);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            download(store.as_ref(), key, &target).await.with_context(|| format!("downloading {uri} ({key})"))?;
        }
        Ok(if single { scratch.join(keys[0].filename().unwrap_or("object")) } else { scratch.to_path_buf() })
    })
}

/// Environment variable naming a PEM bundle of extra CA certificates that https
/// downloads trust besides the system's (a registry behind a private CA).
pub const CA_FILE_ENV: &str = "LLMOPS_CA_FILE";

fn extra_roots() -> Result<Vec<object_store::Certificate>> {
    let Some(path) = std::env::var(CA_FILE_ENV).ok().filter(|p| !p.is_empty()) else { return Ok(Vec::new()) };
    let local = mapped(&path);
    let pem = std::fs::read(&local).with_context(|| format!("{CA_FILE_ENV}: reading {}", local.display()))?;
    object_store::Certificate::from_pem_bundle(&pem)
        .map_err(|e| anyhow::anyhow!("{CA_FILE_ENV}: {} holds no usable PEM certificates: {e}", local.display()))
}

async fn download(
    store: &dyn object_store::ObjectStore,
    key: &object_store::path::Path,
    target: &std::path::Path,
) -> Result<()> {
    use std::io::Write;
    use tokio_stream::StreamExt;
    let result = store.get_opts(key, object_store::GetOptions::default()).await?;
    let mut stream = result.into_stream();
    let mut file = std::io::BufWriter::new(std::fs::File::create(target)?);
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk?)?;
    }
    file.flush()?;
    Ok(())
}

/// The digest of an output directory: sha256 over one `name sha256` line per file, in
/// the order given (callers pass them sorted by name).
pub fn files_digest<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (name, sha) in files {
        hasher.update(format!("{name} {sha}\n").as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The digest a directory artifact is pinned by: the sha256 of its manifest.json when it
/// has one (every output of a job does), else [`files_digest`] over its files at any
/// depth, named relative to it with `/`.
pub fn dir_digest(dir: &std::path::Path) -> Result<String> {
    let manifest = dir.join("manifest.json");
    if manifest.is_file() {
        return file_sha256(&manifest);
    }
    let mut files = Vec::new();
    for (path, name) in files_under(dir)? {
        files.push((name, file_sha256(&path)?));
    }
    Ok(files_digest(files.iter().map(|(n, s)| (n.as_str(), s.as_str()))))
}

/// Every regular file under `dir` (hidden names skipped), as (path, name relative to
/// `dir` with `/`), sorted by name. Symbolic links are not followed.
pub fn files_under(dir: &std::path::Path) -> Result<Vec<(PathBuf, String)>> {
    fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &entry.path(), out)?;
            } else if kind.is_file() {
                let path = entry.path();
                let relative = path.strip_prefix(root).unwrap_or(&path);
                let name = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                out.push((path, name));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
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
    fn mount_paths_map_to_where_the_volume_is() {
        let map = vec![
            ("/var/run/secrets/llmops-api-keys".to_string(), PathBuf::from("/tmp/pod/v/keys")),
            ("/var/run".to_string(), PathBuf::from("/tmp/pod/v/run")),
        ];
        assert_eq!(map_path("/var/run/secrets/llmops-api-keys", &map), PathBuf::from("/tmp/pod/v/keys"));
        assert_eq!(map_path("/var/run/secrets/llmops-api-keys/k", &map), PathBuf::from("/tmp/pod/v/keys/k"));
        assert_eq!(map_path("/var/run/x", &map), PathBuf::from("/tmp/pod/v/run/x"));
        assert_eq!(map_path("/var/running", &map), PathBuf::from("/var/running"), "whole segments only");
        assert_eq!(map_path("/etc/x", &map), PathBuf::from("/etc/x"));
    }

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
        assert!(local_path("store://ns//x", Some(&store)).is_err());
        assert!(local_path("store://ns/./x", Some(&store)).is_err());
        assert!(local_path("store://k", None).is_err());
        assert!(local_path("s3://b/k", None).is_err());
    }

    #[test]
    fn a_symbolic_link_cannot_lead_out_of_the_keys_part_of_the_store() {
        let root = std::env::temp_dir().join(format!("llmops-store-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("team-a/data")).expect("dirs");
        std::fs::create_dir_all(root.join("team-b/private")).expect("dirs");
        std::fs::write(root.join("team-b/private/x.jsonl"), "{}").expect("file");
        std::os::unix::fs::symlink(root.join("team-b/private"), root.join("team-a/data/peek")).expect("link");
        std::os::unix::fs::symlink("/etc", root.join("team-a/etc")).expect("link");
        std::os::unix::fs::symlink(root.join("team-a/data"), root.join("team-a/alias")).expect("link");
        let store = Store { backend: Some(Backend::Local(LocalStore { root: root.display().to_string() })) };
        let err = local_path("store://team-a/data/peek/x.jsonl", Some(&store)).expect_err("refused");
        assert!(format!("{err:#}").contains("leads out of its part of the store"), "{err:#}");
        assert!(local_path("store://team-a/etc/passwd", Some(&store)).is_err());
        // Links inside the namespace's own part, and keys not written yet, are fine.
        assert!(local_path("store://team-a/alias/new.jsonl", Some(&store)).is_ok());
        assert!(local_path("store://team-a/out/new/", Some(&store)).is_ok());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_assignment_names_only_its_namespace_and_the_cache() {
        use llmops_proto::v1::{Assignment, PrepareAssignment, Workload, assignment::Mode};
        let with = |ns: &str, source: &str, output: &str| Assignment {
            workload: Some(Workload {
                namespace: ns.into(),
                kind: "Dataset".into(),
                name: "d".into(),
                uid: "u".into(),
            }),
            store: None,
            mode: Some(Mode::Prepare(PrepareAssignment {
                source: Some(llmops_proto::v1::DataSource {
                    source: Some(llmops_proto::v1::data_source::Source::Uri(source.into())),
                }),
                output: Some(llmops_proto::v1::Output { uri: output.into() }),
                ..Default::default()
            })),
        };
        let d = "a".repeat(64);
        assert!(
            check_tenancy(&with("team-a", "store://team-a/raw/x.jsonl", "store://team-a/dataset/d/u/output/")).is_ok()
        );
        assert!(check_tenancy(&with("team-a", &format!("store://models/sha256-{d}/m"), "store://team-a/o/")).is_ok());
        assert!(check_tenancy(&with("team-a", "https://h/x.jsonl", "store://team-a/o/")).is_ok());
        let err =
            check_tenancy(&with("team-a", "store://team-b/raw/x.jsonl", "store://team-a/o/")).expect_err("refused");
        assert!(format!("{err:#}").contains("store://team-b/raw/x.jsonl: outside"), "{err:#}");
        assert!(check_tenancy(&with("team-a", "store://team-a/raw/x.jsonl", "store://team-b/o/")).is_err());
        assert!(check_tenancy(&with("team-a", "store://team-a/../team-b/x", "store://team-a/o/")).is_err());
        assert!(check_tenancy(&with("team-a", "store://models/m.gguf", "store://team-a/o/")).is_err());
    }
}
