//! The traffic log (DESIGN.md, "Feedback and revisions"): one JSON line per completion
//! and per feedback. With the store mounted as a volume each pod appends to
//! `<traffic dir>/<pod>.jsonl`; with an S3 store, whose objects cannot be appended to,
//! each pod writes local segments under scratch and seals them (every N records, every
//! T seconds and at shutdown), uploading each once as
//! `<traffic dir>/<pod>-<UTC yyyymmddThhmmssZ>-<seq>.jsonl`. A Dataset with a `feedback`
//! source reads every `*.jsonl` under the directory back, so the record types here are
//! the format's definition.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use llmops_crds::render::ChatMessage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::prepare::transform::Redact;
use crate::staging::Bucket;

/// One line of a traffic log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TrafficRecord {
    /// A served completion.
    Completion(CompletionRecord),
    /// A user's rating of a completion.
    Feedback(FeedbackRecord),
}

/// A served completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompletionRecord {
    /// The response id (`chatcmpl-…` or `cmpl-…`), which feedback refers to.
    pub id: String,
    /// When it finished (RFC 3339, UTC).
    pub time: String,
    /// The deployment revision that served it.
    pub revision: String,
    /// The model name the request used (base model or adapter).
    pub model: String,
    /// The conversation, for chat completions (the deployment's prompt included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// The prompt, for text completions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The generated text.
    pub output: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// The request's `user` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A user's rating of a completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeedbackRecord {
    /// The completion's id.
    pub id: String,
    /// When it was given (RFC 3339, UTC).
    pub time: String,
    /// 1 (bad) to 5 (good).
    pub rating: u8,
    /// A better answer, preferred over the output when the log becomes training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correction: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Completion ids the feedback index holds at most (of every pod); the oldest go first.
/// An entry takes about 50 bytes, so the index stays under about 25 MB.
pub const MAX_KNOWN_IDS: usize = 500_000;

/// A completion that feedback names but the index lacks is looked for in the logs at
/// most this often; each look reads only what the logs gained since the last.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The feedback index: 128 bits of each known completion id's SHA-256, with the Unix
/// second of its record.
#[derive(Debug, Default)]
struct Known {
    ids: HashMap<u128, i64>,
    order: VecDeque<u128>,
}

impl Known {
    fn key(id: &str) -> u128 {
        let digest = Sha256::digest(id.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        u128::from_be_bytes(bytes)
    }

    fn remember(&mut self, id: &str, time: i64) {
        let key = Self::key(id);
        if self.ids.insert(key, time).is_some() {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > MAX_KNOWN_IDS {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    /// When the completion `id` was recorded, if it is known.
    fn time(&self, id: &str) -> Option<i64> {
        self.ids.get(&Self::key(id)).copied()
    }
}

/// How far the index has read the logs.
#[derive(Debug, Default)]
struct Scanned {
    /// Local files: (file identity, bytes read).
    files: HashMap<PathBuf, (u64, u64)>,
    /// Store segments read.
    segments: HashSet<String>,
    /// When the logs were last read.
    at: Option<Instant>,
}

/// What a retention pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Records dropped from files that keep newer ones.
    pub records: usize,
    /// Local files removed.
    pub files: usize,
    /// Store segments deleted.
    pub segments: usize,
}

/// When a segment is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentPolicy {
    /// Records in a segment.
    pub max_records: usize,
    /// Age of a segment's first record.
    pub max_age: Duration,
}

impl Default for SegmentPolicy {
    fn default() -> Self {
        Self { max_records: 1000, max_age: Duration::from_secs(30) }
    }
}

impl SegmentPolicy {
    /// The defaults, overridden by `LLMOPS_TRAFFIC_SEGMENT_RECORDS` and
    /// `LLMOPS_TRAFFIC_SEGMENT_SECONDS` (fractions allowed).
    pub fn from_env() -> Self {
        let mut policy = Self::default();
        if let Some(n) = std::env::var("LLMOPS_TRAFFIC_SEGMENT_RECORDS").ok().and_then(|v| v.trim().parse().ok()) {
            policy.max_records = std::cmp::max(n, 1);
        }
        if let Some(s) = std::env::var("LLMOPS_TRAFFIC_SEGMENT_SECONDS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
        {
            policy.max_age = Duration::from_secs_f64(s);
        }
        policy
    }
}

/// The segment being written.
#[derive(Debug)]
struct OpenSegment {
    file: File,
    path: PathBuf,
    records: usize,
    opened: Instant,
}

/// Where lines go.
#[derive(Debug)]
enum Writer {
    /// One file, appended to (a volume store).
    Append(File),
    /// Local segments, sealed and then uploaded (an S3 store).
    Segments { pod: String, policy: SegmentPolicy, seq: u64, open: Option<OpenSegment> },
}

/// The store's traffic directory, for a log written in segments.
#[derive(Debug)]
struct Remote {
    bucket: Bucket,
    key: String,
    /// One upload pass at a time, so no segment is uploaded twice.
    uploading: tokio::sync::Mutex<()>,
}

/// A pod's traffic log.
#[derive(Debug)]
pub struct TrafficLog {
    /// The local directory of this pod's files (with a volume store, every pod's).
    dir: PathBuf,
    /// This pod's file, for a log appended to.
    own: Option<PathBuf>,
    writer: Mutex<Writer>,
    record_completions: bool,
    /// Records older than this are deleted; None: kept.
    retention: Option<Duration>,
    /// Applied to recorded text before it is written.
    redact: Option<Redact>,
    redactions: AtomicU64,
    known: Mutex<Known>,
    scanned: tokio::sync::Mutex<Scanned>,
    remote: Option<Remote>,
}

impl TrafficLog {
    /// Opens (creating) `<dir>/<pod>.jsonl` for appending. The file stays locked while
    /// the log is open, so no other server writes to it, and a retention pass of another
    /// pod can tell that its writer is alive.
    pub fn open(dir: &Path, pod: &str, record_completions: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the traffic log directory {}", dir.display()))?;
        let path = dir.join(format!("{pod}.jsonl"));
        let file = open_locked(&path)?;
        Ok(Self::new(dir, Some(path), Writer::Append(file), record_completions, None))
    }

    fn new(dir: &Path, own: Option<PathBuf>, writer: Writer, record: bool, remote: Option<Remote>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            own,
            writer: Mutex::new(writer),
            record_completions: record,
            retention: None,
            redact: None,
            redactions: AtomicU64::new(0),
            known: Mutex::default(),
            scanned: tokio::sync::Mutex::default(),
            remote,
        }
    }

    /// A log written in segments under the local directory `local` and uploaded under
    /// `key/` in `bucket`. Segments left in `local` by an earlier run of this pod count
    /// as sealed and go up with the next upload.
    pub fn open_segmented(
        local: &Path,
        pod: &str,
        record_completions: bool,
        bucket: Bucket,
        key: &str,
        policy: SegmentPolicy,
    ) -> Result<Self> {
        std::fs::create_dir_all(local)
            .with_context(|| format!("creating the local traffic directory {}", local.display()))?;
        let writer = Writer::Segments { pod: pod.to_string(), policy, seq: 0, open: None };
        let remote = Remote { bucket, key: key.trim_matches('/').to_string(), uploading: tokio::sync::Mutex::new(()) };
        Ok(Self::new(local, None, writer, record_completions, Some(remote)))
    }

    /// Deletes records older than `days` days in each retention pass; 0 keeps them.
    pub fn with_retention(mut self, days: u32) -> Self {
        self.retention = (days > 0).then(|| Duration::from_secs(u64::from(days) * 86_400));
        self
    }

    /// Redacts messages, prompts, outputs, users, corrections and comments with `redact`
    /// before they are written.
    pub fn with_redaction(mut self, redact: Option<Redact>) -> Self {
        self.redact = redact;
        self
    }

    /// How long records are kept; None: for ever.
    pub fn retention(&self) -> Option<Duration> {
        self.retention
    }

    /// How many pieces of personal data were redacted so far.
    pub fn redactions(&self) -> u64 {
        self.redactions.load(Ordering::Relaxed)
    }

    /// Whether completions are recorded (feedback always is).
    pub fn records_completions(&self) -> bool {
        self.record_completions
    }

    /// Whether the log goes to the store in segments (and needs [`Self::tick`],
    /// [`Self::upload_sealed`] and [`Self::close`]).
    pub fn is_segmented(&self) -> bool {
        self.remote.is_some()
    }

    /// When segments are sealed, for a log written in segments.
    pub fn segment_policy(&self) -> Option<SegmentPolicy> {
        match &*self.writer.lock().unwrap_or_else(|e| e.into_inner()) {
            Writer::Segments { policy, .. } => Some(*policy),
            Writer::Append(_) => None,
        }
    }

    fn redact<'a>(&self, texts: impl IntoIterator<Item = &'a mut String>) {
        let Some(redact) = &self.redact else { return };
        let mut counts = BTreeMap::new();
        for text in texts {
            redact.apply_text(text, &mut counts);
        }
        self.redactions.fetch_add(counts.values().sum(), Ordering::Relaxed);
    }

    /// Notes a served completion: remembered for feedback, and recorded (redacted when
    /// redaction is on) when recording is on.
    pub fn completion(&self, mut record: CompletionRecord) -> Result<()> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).remember(&record.id, unix_seconds(&record.time));
        if !self.record_completions {
            return Ok(());
        }
        let CompletionRecord { messages, prompt, output, user, .. } = &mut record;
        let contents = messages.iter_mut().flatten().map(|m| &mut m.content);
        self.redact(contents.chain(prompt.as_mut()).chain([output]).chain(user.as_mut()));
        self.append(&TrafficRecord::Completion(record))
    }

    /// Records feedback (its correction and comment redacted when redaction is on).
    pub fn feedback(&self, mut record: FeedbackRecord) -> Result<()> {
        self.redact(record.correction.as_mut().into_iter().chain(record.comment.as_mut()));
        self.append(&TrafficRecord::Feedback(record))
    }

    /// Whether the index knows a completion with this id that has not expired.
    fn known_now(&self, id: &str) -> bool {
        let time = self.known.lock().unwrap_or_else(|e| e.into_inner()).time(id);
        time.is_some_and(|t| self.cutoff(jiff::Timestamp::now()).is_none_or(|cutoff| t >= cutoff))
    }

    /// The Unix second before which records are expired at `now`; None: kept for ever.
    fn cutoff(&self, now: jiff::Timestamp) -> Option<i64> {
        let retention = i64::try_from(self.retention?.as_secs()).unwrap_or(i64::MAX);
        Some(now.as_second().saturating_sub(retention))
    }

    /// Whether a completion with this id was served (and has not expired): by this pod,
    /// or by any pod whose log is in the local directory or, for a segmented log, in a
    /// sealed segment in the store. The answer comes from an in-memory index of at most
    /// [`MAX_KNOWN_IDS`] ids; an id it lacks makes it read what the logs gained since it
    /// last looked, at most every [`REFRESH_EVERY`], so unknown ids never make it scan
    /// the logs. Records a pod has not sealed yet are not seen, so feedback may reach
    /// another pod before its completion is there.
    pub async fn knows(self: &Arc<Self>, id: &str) -> Result<bool> {
        if self.known_now(id) {
            return Ok(true);
        }
        let mut scanned = self.scanned.lock().await;
        if scanned.at.is_none_or(|at| at.elapsed() >= REFRESH_EVERY) {
            self.refresh(&mut scanned).await?;
        }
        Ok(self.known_now(id))
    }

    /// Reads into the index what the logs gained since it last looked (everything, the
    /// first time: a server started again knows what was served before).
    pub async fn refresh_index(self: &Arc<Self>) -> Result<()> {
        let mut scanned = self.scanned.lock().await;
        self.refresh(&mut scanned).await
    }

    async fn refresh(self: &Arc<Self>, scanned: &mut Scanned) -> Result<()> {
        scanned.at = Some(Instant::now());
        let files = std::mem::take(&mut scanned.files);
        let log = self.clone();
        scanned.files = tokio::task::spawn_blocking(move || log.read_local(files))
            .await
            .map_err(|e| anyhow::anyhow!("reading the traffic log: {e}"))??;
        let Some(remote) = &self.remote else { return Ok(()) };
        let names = remote.bucket.list(&remote.key).await?;
        scanned.segments.retain(|s| names.binary_search(s).is_ok());
        for name in names.iter().filter(|n| n.ends_with(".jsonl")) {
            if scanned.segments.contains(name) {
                continue;
            }
            let bytes = remote.bucket.get(&format!("{}/{name}", remote.key)).await?;
            self.index_lines(&bytes);
            scanned.segments.insert(name.clone());
        }
        Ok(())
    }

    /// Reads the local files from where the last look stopped (from the start for a
    /// file that is new or was replaced), whole lines only.
    fn read_local(&self, mut files: HashMap<PathBuf, (u64, u64)>) -> Result<HashMap<PathBuf, (u64, u64)>> {
        let mut seen = HashMap::new();
        for entry in std::fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let identity = file_identity(&meta);
            let len = meta.len();
            let mut read = match files.remove(&path) {
                Some((id, read)) if id == identity && read <= len => read,
                _ => 0,
            };
            if len > read {
                let mut file = File::open(&path).with_context(|| format!("reading {}", path.display()))?;
                file.seek(SeekFrom::Start(read))?;
                let mut bytes = Vec::new();
                file.take(len - read).read_to_end(&mut bytes)?;
                let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                self.index_lines(&bytes[..whole]);
                read += whole as u64;
            }
            seen.insert(path, (identity, read));
        }
        Ok(seen)
    }

    /// Adds the completions of JSON lines to the index.
    fn index_lines(&self, bytes: &[u8]) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        for line in bytes.split(|b| *b == b'\n') {
            if let Ok(TrafficRecord::Completion(c)) = serde_json::from_slice(line) {
                known.remember(&c.id, unix_seconds(&c.time));
            }
        }
    }

    /// Appends one line with one write, so lines of concurrent writers never interleave;
    /// a segment that reaches its record limit is sealed.
    fn append(&self, record: &TrafficRecord) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *writer {
            Writer::Append(file) => {
                file.write_all(&line).context("appending to the traffic log")?;
                file.flush()?;
            }
            Writer::Segments { pod, policy, seq, open } => {
                if open.is_none() {
                    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
                    let path = self.dir.join(format!("{pod}-{stamp}-{seq:06}.jsonl"));
                    *seq += 1;
                    let file = OpenOptions::new()
                        .create_new(true)
                        .append(true)
                        .open(&path)
                        .with_context(|| format!("opening the traffic segment {}", path.display()))?;
                    *open = Some(OpenSegment { file, path, records: 0, opened: Instant::now() });
                }
                if let Some(segment) = open.as_mut() {
                    segment.file.write_all(&line).context("appending to the traffic segment")?;
                    segment.file.flush()?;
                    segment.records += 1;
                    if segment.records >= policy.max_records {
                        *open = None;
                    }
                }
            }
        }
        Ok(())
    }

    /// Seals the open segment when it is older than the policy allows.
    pub fn tick(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Writer::Segments { policy, open, .. } = &mut *writer
            && open.as_ref().is_some_and(|s| s.opened.elapsed() >= policy.max_age)
        {
            *open = None;
        }
    }

    /// Seals the open segment, if any.
    pub fn seal(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Writer::Segments { open, .. } = &mut *writer {
            *open = None;
        }
    }

    /// The open segment's path, for a log written in segments.
    fn open_segment(&self) -> Option<PathBuf> {
        match &*self.writer.lock().unwrap_or_else(|e| e.into_inner()) {
            Writer::Segments { open, .. } => open.as_ref().map(|s| s.path.clone()),
            Writer::Append(_) => None,
        }
    }

    /// Uploads every sealed segment in the local directory, oldest first, then removes
    /// it there; returns how many went up. A segment whose object exists already (an
    /// upload whose removal was cut short) is not written again.
    pub async fn upload_sealed(&self) -> Result<usize> {
        let Some(remote) = &self.remote else { return Ok(0) };
        let _one_at_a_time = remote.uploading.lock().await;
        let open = self.open_segment();
        let mut sealed: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl") && Some(p) != open.as_ref())
            .collect();
        sealed.sort();
        let mut uploaded = 0;
        for path in sealed {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let key = format!("{}/{name}", remote.key);
            if remote.bucket.put_new(&path, &key).await? {
                uploaded += 1;
                tracing::debug!(key = %key, "uploaded a traffic segment");
            } else {
                tracing::warn!(key = %key, "the traffic segment is in the store already; not writing it again");
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(uploaded)
    }

    /// Seals the open segment and uploads every sealed one (at shutdown).
    pub async fn close(&self) -> Result<usize> {
        self.seal();
        self.upload_sealed().await
    }

    /// One retention pass at `now`; nothing when records are kept for ever.
    ///
    /// - This pod's appended file keeps only the records of the retention period: they
    ///   are copied to a temporary file that replaces it (what is appended meanwhile is
    ///   copied too, under the writer's lock, so nothing is lost).
    /// - Another pod's file is pruned the same way only when no server holds its lock
    ///   (that pod is gone); a live pod prunes its own.
    /// - Local segments not uploaded yet are pruned the same way before they go up, and
    ///   store segments last written before the period began (so every record in them
    ///   is older) are deleted, whichever pod wrote them.
    pub async fn prune(self: &Arc<Self>, now: jiff::Timestamp) -> Result<Pruned> {
        let Some(cutoff) = self.cutoff(now) else { return Ok(Pruned::default()) };
        // No upload reads a segment while it is being pruned.
        let _one_at_a_time = match &self.remote {
            Some(remote) => Some(remote.uploading.lock().await),
            None => None,
        };
        let log = self.clone();
        let mut pruned = tokio::task::spawn_blocking(move || log.prune_local(cutoff))
            .await
            .map_err(|e| anyhow::anyhow!("pruning the traffic log: {e}"))??;
        if let Some(remote) = &self.remote {
            for (name, modified) in remote.bucket.list_modified(&remote.key).await? {
                if name.ends_with(".jsonl") && !name.contains('/') && modified < cutoff {
                    remote.bucket.delete(&format!("{}/{name}", remote.key)).await?;
                    pruned.segments += 1;
                }
            }
        }
        Ok(pruned)
    }

    fn prune_local(&self, cutoff: i64) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        let open = self.open_segment();
        let entries = std::fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "jsonl") || Some(&path) == open.as_ref() {
                continue;
            }
            if self.own.as_ref() == Some(&path) {
                pruned.records += self.prune_own(&path, cutoff)?;
                continue;
            }
            let Ok(file) = File::open(&path) else { continue };
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            }
            // The lock is held until the file is replaced, so a server that starts
            // meanwhile under that pod's name waits for the pass.
            match keep_since(&path, cutoff, u64::MAX)? {
                (Kept::All, _) => {}
                (Kept::None, _) => {
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                    pruned.files += 1;
                }
                (Kept::Some(temporary), dropped) => {
                    std::fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))?;
                    pruned.records += dropped;
                }
            }
            drop(file);
        }
        Ok(pruned)
    }

    /// Drops this pod's expired records from its appended file; returns how many.
    fn prune_own(&self, path: &Path, cutoff: i64) -> Result<usize> {
        let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
        let (temporary, dropped) = match keep_since(path, cutoff, len)? {
            (Kept::All, _) => return Ok(0),
            (Kept::Some(temporary), dropped) => (temporary, dropped),
            (Kept::None, dropped) => {
                let temporary = temporary_path(path);
                File::create(&temporary).with_context(|| format!("writing {}", temporary.display()))?;
                (temporary, dropped)
            }
        };
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut replacement = OpenOptions::new()
            .append(true)
            .open(&temporary)
            .with_context(|| format!("writing {}", temporary.display()))?;
        replacement.try_lock().map_err(|e| anyhow::anyhow!("locking {}: {e}", temporary.display()))?;
        // What was appended while the kept records were being copied.
        let mut current = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        current.seek(SeekFrom::Start(len))?;
        std::io::copy(&mut current, &mut replacement).with_context(|| format!("writing {}", temporary.display()))?;
        replacement.sync_all()?;
        std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))?;
        *writer = Writer::Append(replacement);
        Ok(dropped)
    }
}

/// What [`keep_since`] kept.
enum Kept {
    /// Nothing had expired; the file is untouched.
    All,
    /// Everything had expired.
    None,
    /// The rest, written to this temporary file.
    Some(PathBuf),
}

/// `<file>.tmp`: beside the file, and not read as a log.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Copies the lines of the first `len` bytes of `path` whose record is from `cutoff`
/// (a Unix second) on to a temporary file beside it; returns what was kept and how many
/// lines were dropped. Records are appended in time order, so a file whose first record
/// is recent is left as it is. Lines that are not dated records go with the expired ones.
fn keep_since(path: &Path, cutoff: i64, len: u64) -> Result<(Kept, usize)> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = BufReader::new(file.take(len)).split(b'\n');
    let first = match lines.next() {
        None => return Ok((Kept::All, 0)),
        Some(line) => line.with_context(|| format!("reading {}", path.display()))?,
    };
    if record_second(&first).is_some_and(|t| t >= cutoff) {
        return Ok((Kept::All, 0));
    }
    let temporary = temporary_path(path);
    let mut out =
        std::io::BufWriter::new(File::create(&temporary).with_context(|| format!("writing {}", temporary.display()))?);
    let (mut dropped, mut kept) = (0, 0);
    for line in std::iter::once(Ok(first)).chain(lines) {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.is_empty() {
            continue;
        }
        if record_second(&line).is_some_and(|t| t >= cutoff) {
            out.write_all(&line)?;
            out.write_all(b"\n")?;
            kept += 1;
        } else {
            dropped += 1;
        }
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    drop(out);
    if kept == 0 {
        let _ = std::fs::remove_file(&temporary);
        return Ok((Kept::None, dropped));
    }
    Ok((Kept::Some(temporary), dropped))
}

/// The Unix second of a log line's record, if it is a dated record.
fn record_second(line: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct Dated {
        time: String,
    }
    let dated: Dated = serde_json::from_slice(line).ok()?;
    dated.time.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// The Unix second of an RFC 3339 time; now when it does not parse.
fn unix_seconds(time: &str) -> i64 {
    time.parse::<jiff::Timestamp>().unwrap_or_else(|_| jiff::Timestamp::now()).as_second()
}

/// Tells a file from another that took its name.
fn file_identity(meta: &std::fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.ino()
    }
    #[cfg(not(unix))]
    {
        meta.created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// Opens `path` for appending and locks it, waiting up to 10 s for another pod's
/// retention pass that holds it; a server still holding it after that is an error.
fn open_locked(path: &Path) -> Result<File> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening the traffic log {}", path.display()))?;
        match file.try_lock() {
            // A retention pass may have replaced the file meanwhile: only the file that
            // has the name now will do.
            Ok(()) if same_file(&file, path) => return Ok(file),
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "another server is writing to the traffic log {}; give each server its own pod name",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking the traffic log {}", path.display()));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => file_identity(&a) == file_identity(&b),
        _ => false,
    }
}

/// Now, as RFC 3339 in UTC.
pub fn now() -> String {
    jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(id: &str) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            time: now(),
            revision: "r1".into(),
            model: "m".into(),
            messages: Some(vec![ChatMessage { role: "user".into(), content: "hi".into() }]),
            prompt: None,
            output: "hello".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 3,
            completion_tokens: 1,
            user: None,
        }
    }

    fn completion_at(id: &str, time: &str) -> CompletionRecord {
        CompletionRecord { time: time.into(), ..completion(id) }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("llmops-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn lines(path: &Path) -> Vec<TrafficRecord> {
        let text = std::fs::read_to_string(path).expect("reads");
        text.lines().map(|l| serde_json::from_str(l).expect("parses")).collect()
    }

    fn ids(records: &[TrafficRecord]) -> Vec<&str> {
        records
            .iter()
            .map(|r| match r {
                TrafficRecord::Completion(c) => c.id.as_str(),
                TrafficRecord::Feedback(f) => f.id.as_str(),
            })
            .collect()
    }

    #[tokio::test]
    async fn records_round_trip_and_ids_are_found_across_pods_without_rescanning() {
        let dir = scratch("traffic");
        let a = TrafficLog::open(&dir, "pod-a", true).expect("opens");
        a.completion(completion("chatcmpl-1")).expect("records");
        a.feedback(FeedbackRecord { id: "chatcmpl-1".into(), time: now(), rating: 5, correction: None, comment: None })
            .expect("records");
        let b = Arc::new(TrafficLog::open(&dir, "pod-b", false).expect("opens"));
        assert!(b.knows("chatcmpl-1").await.expect("reads"), "another pod's completion is found in its log");
        assert!(!b.knows("chatcmpl-2").await.expect("reads"));
        b.completion(completion("chatcmpl-3")).expect("remembers");
        assert!(b.knows("chatcmpl-3").await.expect("reads"), "unrecorded completions are remembered in memory");

        // Unknown ids do not make the server read the logs again and again: what pod-a
        // records now is seen at the next look, not before REFRESH_EVERY has passed.
        a.completion(completion("chatcmpl-4")).expect("records");
        for _ in 0..1000 {
            assert!(!b.knows("chatcmpl-4").await.expect("reads"));
        }
        tokio::time::sleep(REFRESH_EVERY).await;
        assert!(b.knows("chatcmpl-4").await.expect("reads"), "the next look reads what was added");

        let records = lines(&dir.join("pod-a.jsonl"));
        assert!(matches!(&records[0], TrafficRecord::Completion(c) if c.id == "chatcmpl-1"));
        assert!(matches!(&records[1], TrafficRecord::Feedback(f) if f.rating == 5));
        assert_eq!(std::fs::read_to_string(dir.join("pod-b.jsonl")).expect("reads"), "", "recording off");
        std::fs::remove_dir_all(&dir).expect("cleans up");
    }

    #[test]
    fn the_index_is_bounded_and_forgets_the_oldest() {
        let mut known = Known::default();
        for i in 0..MAX_KNOWN_IDS + 10 {
            known.remember(&format!("chatcmpl-{i}"), 0);
        }
        known.remember("chatcmpl-20", 0);
        assert_eq!((known.ids.len(), known.order.len()), (MAX_KNOWN_IDS, MAX_KNOWN_IDS));
        assert_eq!(known.time("chatcmpl-9"), None, "the oldest went first");
        assert_eq!(known.time("chatcmpl-10"), Some(0));
        assert_eq!(known.time(&format!("chatcmpl-{}", MAX_KNOWN_IDS + 9)), Some(0));
    }

    #[tokio::test]
    async fn retention_drops_expired_records_from_this_pods_file_and_from_gone_pods_files() {
        let dir = scratch("retention");
        let now = jiff::Timestamp::now();
        let ago = |hours: i64| now.checked_sub(jiff::SignedDuration::from_hours(hours)).expect("a time").to_string();
        let (old, recent) = (ago(30 * 24), ago(24));
        let (old, recent) = (old.as_str(), recent.as_str());
        // A pod that is gone: everything expired, or some of it.
        for (pod, times) in [("gone-all", vec![old, old]), ("gone-some", vec![old, recent])] {
            let log = TrafficLog::open(&dir, pod, true).expect("opens");
            for (i, t) in times.iter().enumerate() {
                log.completion(completion_at(&format!("{pod}-{i}"), t)).expect("records");
            }
        }
        // A pod that is alive holds its file: another pod leaves it alone.
        let live = TrafficLog::open(&dir, "live", true).expect("opens");
        live.completion(completion_at("live-0", old)).expect("records");
        // This pod.
        let log = Arc::new(TrafficLog::open(&dir, "pod-a", true).expect("opens").with_retention(7));
        for (i, t) in [old, old, recent].iter().enumerate() {
            log.completion(completion_at(&format!("a-{i}"), t)).expect("records");
        }
        std::fs::write(dir.join("notes.txt"), "not a log").expect("writes");

        let pruned = log.prune(now).await.expect("prunes");
        assert_eq!(pruned, Pruned { records: 3, files: 1, segments: 0 });
        assert!(!dir.join("gone-all.jsonl").exists());
        assert_eq!(ids(&lines(&dir.join("gone-some.jsonl"))), ["gone-some-1"]);
        assert_eq!(ids(&lines(&dir.join("live.jsonl"))), ["live-0"], "a live pod's file is its own to prune");
        assert_eq!(ids(&lines(&dir.join("pod-a.jsonl"))), ["a-2"]);
        assert!(dir.join("notes.txt").exists());
        assert!(std::fs::read_dir(&dir).expect("lists").all(|e| !e.expect("entry").path().ends_with(".tmp")));
        // The log goes on in the replaced file, still locked against a second writer.
        log.completion(completion("a-3")).expect("records");
        assert_eq!(ids(&lines(&dir.join("pod-a.jsonl"))), ["a-2", "a-3"]);
        assert!(File::open(dir.join("pod-a.jsonl")).expect("opens").try_lock().is_err(), "still locked");
        assert_eq!(log.prune(now).await.expect("prunes"), Pruned::default(), "a second pass finds nothing");
        // Expired completions are unknown to feedback.
        assert!(!log.knows("a-0").await.expect("reads"));
        assert!(log.knows("a-2").await.expect("reads"));
        // Kept for ever without a retention.
        let keep = Arc::new(TrafficLog::open(&dir, "pod-b", true).expect("opens"));
        keep.completion(completion_at("b-0", old)).expect("records");
        assert_eq!(keep.prune(now).await.expect("prunes"), Pruned::default());
        std::fs::remove_dir_all(&dir).expect("cleans up");
    }

    #[test]
    fn recorded_text_is_redacted_with_the_datasets_redactor() {
        let dir = scratch("redact");
        let redact = Redact::new(&["email".into(), "phone".into()], &[("order".into(), r"ORD-[0-9]{4}".into())])
            .expect("builds");
        let log = TrafficLog::open(&dir, "pod-a", true).expect("opens").with_redaction(Some(redact));
        let mut record = completion("c1");
        record.messages =
            Some(vec![ChatMessage { role: "user".into(), content: "I am ann@example.com, order ORD-1234".into() }]);
        record.output = "We will call +1 415 555 0100.".into();
        record.user = Some("ann@example.com".into());
        log.completion(record).expect("records");
        log.feedback(FeedbackRecord {
            id: "c1".into(),
            time: now(),
            rating: 1,
            correction: Some("Write to ann@example.com".into()),
            comment: Some("ORD-9999 still missing".into()),
        })
        .expect("records");
        let text = std::fs::read_to_string(dir.join("pod-a.jsonl")).expect("reads");
        for secret in ["ann@example.com", "ORD-1234", "555 0100", "ORD-9999"] {
            assert!(!text.contains(secret), "{secret} was written: {text}");
        }
        let records = lines(&dir.join("pod-a.jsonl"));
        let TrafficRecord::Completion(c) = &records[0] else { panic!("a completion first") };
        assert_eq!(c.messages.as_ref().expect("messages")[0].content, "I am [EMAIL], order [ORDER]");
        assert_eq!(c.output, "We will call [PHONE].");
        assert_eq!(c.user.as_deref(), Some("[EMAIL]"));
        let TrafficRecord::Feedback(f) = &records[1] else { panic!("feedback second") };
        assert_eq!(
            (f.correction.as_deref(), f.comment.as_deref()),
            (Some("Write to [EMAIL]"), Some("[ORDER] still missing"))
        );
        assert_eq!(log.redactions(), 6);
        std::fs::remove_dir_all(&dir).expect("cleans up");
    }

    #[tokio::test]
    async fn segments_are_sealed_by_count_age_and_close_and_uploaded_once() {
        use object_store::memory::InMemory;
        let local = std::env::temp_dir().join(format!("llmops-segments-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&local);
        let bucket = Bucket::from_store(std::sync::Arc::new(InMemory::new()), "mem", "llmops");
        let policy = SegmentPolicy { max_records: 2, max_age: Duration::from_millis(50) };
        let log = TrafficLog::open_segmented(&local, "pod-a", true, bucket.clone(), "ns/md/x/traffic/", policy)
            .expect("opens");
        let other = Arc::new(
            TrafficLog::open_segmented(&local.join("b"), "pod-b", true, bucket.clone(), "ns/md/x/traffic", policy)
                .expect("opens"),
        );
        for id in ["c1", "c2", "c3"] {
            log.completion(completion(id)).expect("records");
        }
        assert_eq!(log.upload_sealed().await.expect("uploads"), 1, "two records sealed the first segment");
        let local_files = || {
            std::fs::read_dir(&local).expect("lists").filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file())).count()
        };
        assert_eq!(local_files(), 1, "only the open segment stays local");
        assert!(other.knows("c1").await.expect("reads"), "another pod finds it in the store");
        tokio::time::sleep(REFRESH_EVERY).await;
        assert!(!other.knows("c3").await.expect("reads"), "c3's segment is not sealed yet");
        tokio::time::sleep(Duration::from_millis(60)).await;
        log.tick();
        assert_eq!(log.upload_sealed().await.expect("uploads"), 1, "the old segment was sealed");
        log.feedback(FeedbackRecord { id: "c3".into(), time: now(), rating: 4, correction: None, comment: None })
            .expect("records");
        assert_eq!(log.close().await.expect("uploads"), 1, "closing seals the last segment");
        let names = bucket.list("ns/md/x/traffic").await.expect("lists");
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("pod-a-") && n.ends_with(".jsonl")), "{names:?}");
        let text = String::from_utf8(bucket.get(&format!("ns/md/x/traffic/{}", names[2])).await.expect("gets"))
            .expect("utf-8");
        assert!(matches!(serde_json::from_str(text.trim()), Ok(TrafficRecord::Feedback(f)) if f.rating == 4));

        // A segment left behind by an earlier run goes up with the next upload, but an
        // object of that name is never written again.
        std::fs::write(local.join("pod-a-20260101T000000Z-000000.jsonl"), "{}\n").expect("writes");
        std::fs::write(local.join(&names[0]), "replaced\n").expect("writes");
        let again = TrafficLog::open_segmented(&local, "pod-a", true, bucket.clone(), "ns/md/x/traffic", policy)
            .expect("opens");
        assert_eq!(again.upload_sealed().await.expect("uploads"), 1);
        assert_eq!(bucket.list("ns/md/x/traffic").await.expect("lists").len(), 4);
        let first = bucket.get(&format!("ns/md/x/traffic/{}", names[0])).await.expect("gets");
        assert!(!String::from_utf8_lossy(&first).contains("replaced"), "uploaded objects are never rewritten");
        assert_eq!(local_files(), 0);

        // Retention deletes the store's segments last written before the period began,
        // whichever pod wrote them, and expired local segments before they go up.
        let again = Arc::new(again.with_retention(1));
        let now = jiff::Timestamp::now();
        assert_eq!(again.prune(now).await.expect("prunes").segments, 0, "nothing is a day old yet");
        again.completion(completion_at("c9", "2020-01-01T00:00:00Z")).expect("records");
        again.seal();
        let later = now.checked_add(jiff::SignedDuration::from_hours(49)).expect("a time");
        assert_eq!(again.prune(later).await.expect("prunes"), Pruned { records: 0, files: 1, segments: 4 });
        assert_eq!(bucket.list("ns/md/x/traffic").await.expect("lists"), Vec::<String>::new());
        assert_eq!(local_files(), 0);
        std::fs::remove_dir_all(&local).expect("cleans up");
    }
}
