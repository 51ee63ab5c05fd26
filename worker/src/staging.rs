//! Running a mode against an S3-compatible store. The modes read and write local files;
//! with a bucket as the store, the agent downloads each `store://` input into local
//! scratch, points the Assignment at those copies, and uploads the output directory (and
//! every checkpoint as it is sealed) back under the same keys. The Result still names
//! the output by its `store://` URI. A server's traffic log goes to the bucket in sealed
//! segments, written by the server itself (`serve::traffic`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use llmops_proto::v1::{Assignment, S3Store, assignment::Mode, data_source, eval_target, store::Backend};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio_stream::StreamExt;

/// The store's bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    name: String,
}

impl Bucket {
    /// The bucket of an S3 store; credentials come from the AWS_* environment.
    pub fn new(s3: &S3Store) -> Result<Self> {
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&s3.bucket);
        if !s3.endpoint.is_empty() {
            builder = builder.with_endpoint(&s3.endpoint);
        }
        if !s3.region.is_empty() {
            builder = builder.with_region(&s3.region);
        }
        if s3.allow_http {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().with_context(|| format!("the store bucket {}", s3.bucket))?;
        Ok(Self { store: Arc::new(store), prefix: s3.prefix.trim_matches('/').to_string(), name: s3.bucket.clone() })
    }

    /// A bucket over any object store, named `name` in messages (tests use an in-memory
    /// store).
    pub fn from_store(store: Arc<dyn ObjectStore>, name: &str, prefix: &str) -> Self {
        Self { store, prefix: prefix.trim_matches('/').to_string(), name: name.to_string() }
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self, key: &str) -> ObjectPath {
        let key = key.trim_matches('/');
        if self.prefix.is_empty() { ObjectPath::from(key) } else { ObjectPath::from(format!("{}/{key}", self.prefix)) }
    }

    /// Downloads the object `key`, or every object under `key/`, into `target` (the file,
    /// or the directory). Returns false when there is nothing under the key.
    pub async fn download(&self, key: &str, target: &Path) -> Result<bool> {
        let path = self.path(key);
        if !key.ends_with('/') {
            match self.store.head(&path).await {
                Ok(_) => {
                    if let Some(parent) = target.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    fetch(self.store.as_ref(), &path, target).await?;
                    return Ok(true);
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e).with_context(|| format!("s3://{}/{path}", self.name)),
            }
        }
        let mut listing = self.store.list(Some(&path));
        let mut found = false;
        while let Some(meta) = listing.next().await {
            let meta = meta.with_context(|| format!("listing s3://{}/{path}/", self.name))?;
            let relative =
                meta.location.as_ref().strip_prefix(path.as_ref()).unwrap_or_default().trim_start_matches('/');
            if relative.is_empty() || relative.split('/').any(|p| p == "..") {
                continue;
            }
            let file = target.join(relative);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            fetch(self.store.as_ref(), &meta.location, &file).await?;
            found = true;
        }
        Ok(found)
    }

    /// Uploads `file` as the object `key` unless an object is there already: objects
    /// written this way are never replaced. Returns whether it uploaded.
    pub async fn put_new(&self, file: &Path, key: &str) -> Result<bool> {
        let path = self.path(key);
        match self.store.head(&path).await {
            Ok(_) => return Ok(false),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("s3://{}/{path}", self.name)),
        }
        let bytes = tokio::fs::read(file).await.with_context(|| format!("reading {}", file.display()))?;
        self.store
            .put(&path, bytes.into())
            .await
            .with_context(|| format!("uploading {} to s3://{}/{path}", file.display(), self.name))?;
        Ok(true)
    }

    /// Whether the object `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key);
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("s3://{}/{path}", self.name)),
        }
    }

    /// Uploads `file` as the object `key`, replacing what is there.
    pub async fn put(&self, file: &Path, key: &str) -> Result<()> {
        let path = self.path(key);
        let bytes = tokio::fs::read(file).await.with_context(|| format!("reading {}", file.display()))?;
        self.store
            .put(&path, bytes.into())
            .await
            .with_context(|| format!("uploading {} to s3://{}/{path}", file.display(), self.name))?;
        Ok(())
    }

    /// The keys of every object under `key/`, relative to it, sorted.
    pub async fn list(&self, key: &str) -> Result<Vec<String>> {
        Ok(self.list_modified(key).await?.into_iter().map(|(k, _)| k).collect())
    }

    /// The keys of every object under `key/`, relative to it, each with when it was last
    /// written (Unix seconds), sorted by key.
    pub async fn list_modified(&self, key: &str) -> Result<Vec<(String, i64)>> {
        let path = self.path(key);
        let mut listing = self.store.list(Some(&path));
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.with_context(|| format!("listing s3://{}/{path}/", self.name))?;
            let relative =
                meta.location.as_ref().strip_prefix(path.as_ref()).unwrap_or_default().trim_start_matches('/');
            if !relative.is_empty() {
                keys.push((relative.to_string(), meta.last_modified.timestamp()));
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Deletes the object `key`; one that is gone already is no error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting s3://{}/{path}", self.name)),
        }
    }

    /// The bytes of the object `key`.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key);
        let result = self.store.get(&path).await.with_context(|| format!("downloading s3://{}/{path}", self.name))?;
        let bytes = result.bytes().await.with_context(|| format!("downloading s3://{}/{path}", self.name))?;
        Ok(bytes.to_vec())
    }

    /// Uploads every file under `dir` to `key/`; returns how many.
    pub async fn upload_dir(&self, dir: &Path, key: &str) -> Result<usize> {
        let mut files = Vec::new();
        collect(dir, dir, &mut files)?;
        for (file, relative) in &files {
            let path = self.path(&format!("{}/{relative}", key.trim_end_matches('/')));
            let bytes = tokio::fs::read(file).await.with_context(|| format!("reading {}", file.display()))?;
            self.store
                .put(&path, bytes.into())
                .await
                .with_context(|| format!("uploading {} to s3://{}/{path}", file.display(), self.name))?;
        }
        Ok(files.len())
    }
}

async fn fetch(store: &dyn ObjectStore, path: &ObjectPath, target: &Path) -> Result<()> {
    use std::io::Write;
    let result = store.get(path).await.with_context(|| format!("downloading {path}"))?;
    let mut stream = result.into_stream();
    let mut file = std::io::BufWriter::new(std::fs::File::create(target)?);
    while let Some(chunk) = stream.next().await {
        file.write_all(&chunk.with_context(|| format!("downloading {path}"))?)?;
    }
    file.flush()?;
    Ok(())
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if entry.file_type()?.is_dir() {
            collect(root, &path, out)?;
        } else {
            let relative = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            out.push((path, relative));
        }
    }
    out.sort();
    Ok(())
}

/// An Assignment pointed at local copies, and where its outputs go back to.
#[derive(Debug)]
pub struct Staged {
    /// The Assignment the mode runs: every `store://` URI is a local file:// path, except
    /// a server's traffic log, which keeps its `store://` URI and the store (the server
    /// uploads it in sealed segments).
    pub assignment: Assignment,
    /// The bucket.
    pub bucket: Bucket,
    /// The local output directory and its store key.
    pub output: Option<(PathBuf, String)>,
    /// The local checkpoint directory and its store key.
    pub checkpoints: Option<(PathBuf, String)>,
}

impl Staged {
    /// Uploads a sealed checkpoint directory under the checkpoints key; returns its URI.
    pub async fn upload_checkpoint(&self, local: &Path) -> Result<String> {
        let Some((dir, key)) = &self.checkpoints else { bail!("the assignment has no checkpoint directory") };
        let name = local
            .strip_prefix(dir)
            .ok()
            .and_then(|p| p.to_str())
            .context("the checkpoint is not under the checkpoint directory")?;
        let key = format!("{}/{name}", key.trim_end_matches('/'));
        self.bucket.upload_dir(local, &key).await?;
        Ok(format!("store://{key}/"))
    }

    /// Uploads the output directory.
    pub async fn upload_output(&self) -> Result<()> {
        if let Some((dir, key)) = &self.output {
            let n = self.bucket.upload_dir(dir, key).await?;
            tracing::info!(files = n, key = %key, "uploaded the output to the store");
        }
        Ok(())
    }
}

/// Stages an Assignment whose store is a bucket; None when the store is a volume (the
/// mode then reads and writes the store directly).
pub async fn stage(assignment: &Assignment, scratch: &Path) -> Result<Option<Staged>> {
    let Some(Backend::S3(s3)) = assignment.store.as_ref().and_then(|s| s.backend.as_ref()) else { return Ok(None) };
    let bucket = Bucket::new(s3)?;
    let mut staged = assignment.clone();
    staged.store = None;
    let inputs = scratch.join("inputs");
    let outputs = scratch.join("outputs");
    let mut output = None;
    let mut checkpoints = None;
    let local = |base: &Path, key: &str| base.join(key.trim_matches('/'));
    // Inputs: downloaded, then named by their local path.
    let mut input_uris: Vec<&mut String> = Vec::new();
    let mut output_uri: Option<&mut String> = None;
    let mut checkpoint_uri: Option<&mut String> = None;
    match staged.mode.as_mut() {
        Some(Mode::Prepare(p)) => {
            match p.source.as_mut().and_then(|s| s.source.as_mut()) {
                Some(data_source::Source::Uri(u)) => input_uris.push(u),
                Some(data_source::Source::Feedback(f)) => input_uris.push(&mut f.uri),
                _ => {}
            }
            if let Some(w) = p.token_stats.as_mut().and_then(|t| t.tokenizer.as_mut()).and_then(|m| m.weights.as_mut())
            {
                input_uris.push(&mut w.uri);
            }
            output_uri = p.output.as_mut().map(|o| &mut o.uri);
        }
        Some(Mode::Finetune(f)) => {
            if let Some(w) = f.base_model.as_mut().and_then(|m| m.weights.as_mut()) {
                input_uris.push(&mut w.uri);
            }
            input_uris.extend(f.train.as_mut().map(|a| &mut a.uri));
            input_uris.extend(f.validation.as_mut().map(|a| &mut a.uri));
            checkpoint_uri = f.checkpoints.as_mut().map(|c| &mut c.uri);
            output_uri = f.output.as_mut().map(|o| &mut o.uri);
        }
        Some(Mode::Eval(e)) => {
            if let Some(eval_target::Target::Local(l)) = e.target.as_mut().and_then(|t| t.target.as_mut()) {
                if let Some(w) = l.model.as_mut().and_then(|m| m.weights.as_mut()) {
                    input_uris.push(&mut w.uri);
                }
                input_uris.extend(l.adapter.as_mut().map(|a| &mut a.uri));
            }
            input_uris.extend(e.data.as_mut().map(|a| &mut a.uri));
            output_uri = e.output.as_mut().map(|o| &mut o.uri);
        }
        Some(Mode::Serve(s)) => {
            if let Some(w) = s.model.as_mut().and_then(|m| m.weights.as_mut()) {
                input_uris.push(&mut w.uri);
            }
            for a in &mut s.adapters {
                input_uris.extend(a.adapter.as_mut().map(|a| &mut a.uri));
            }
            // The traffic log cannot be a local copy: the server writes it in sealed
            // segments to the bucket itself, so it keeps the store.
            if s.traffic.as_ref().is_some_and(|t| t.uri.starts_with("store://")) {
                staged.store = assignment.store.clone();
            }
        }
        // The resolver reads its source and writes the cache itself.
        Some(Mode::Resolve(_)) => return Ok(None),
        None => bail!("the assignment names no mode"),
    }
    for uri in input_uris {
        let Some(key) = uri.strip_prefix("store://").map(String::from) else { continue };
        let target = local(&inputs, &key);
        if !bucket.download(&key, &target).await? {
            bail!("{uri}: nothing in the store under this key (s3://{}/{})", bucket.name, bucket.path(&key));
        }
        tracing::info!(key = %key, "staged an input from the store");
        let mut path = target.display().to_string();
        if key.ends_with('/') {
            path.push('/');
        }
        *uri = format!("file://{path}");
    }
    if let Some(uri) = checkpoint_uri
        && let Some(key) = uri.strip_prefix("store://").map(String::from)
    {
        let dir = local(&scratch.join("checkpoints"), &key);
        std::fs::create_dir_all(&dir)?;
        // Earlier checkpoints, so a new pod resumes where the last one stopped.
        if bucket.download(&format!("{}/", key.trim_end_matches('/')), &dir).await? {
            tracing::info!(key = %key, "staged the checkpoints from the store");
        }
        *uri = format!("file://{}/", dir.display());
        checkpoints = Some((dir, key));
    }
    if let Some(uri) = output_uri
        && let Some(key) = uri.strip_prefix("store://").map(String::from)
    {
        let dir = local(&outputs, &key);
        std::fs::create_dir_all(&dir)?;
        *uri = format!("file://{}/", dir.display());
        output = Some((dir, key));
    }
    Ok(Some(Staged { assignment: staged, bucket, output, checkpoints }))
}
