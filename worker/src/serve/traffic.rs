//! The traffic log (DESIGN.md, "Feedback and revisions"): one JSON line per completion
//! and per feedback. With the store mounted as a volume each pod appends to
//! `<traffic dir>/<pod>.jsonl`; with an S3 store, whose objects cannot be appended to,
//! each pod writes local segments under scratch and seals them (every N records, every
//! T seconds and at shutdown), uploading each once as
//! `<traffic dir>/<pod>-<UTC yyyymmddThhmmssZ>-<seq>.jsonl`. A Dataset with a `feedback`
//! source reads every `*.jsonl` under the directory back, so the record types here are
//! the format's definition.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use llmops_crds::render::ChatMessage;
use serde::{Deserialize, Serialize};

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

/// Completion ids remembered in memory for feedback checks; older ones are looked up in
/// the log files.
const REMEMBERED_IDS: usize = 100_000;

#[derive(Debug, Default)]
struct Known {
    ids: HashSet<String>,
    order: VecDeque<String>,
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
    writer: Mutex<Writer>,
    record_completions: bool,
    known: Mutex<Known>,
    remote: Option<Remote>,
}

impl TrafficLog {
    /// Opens (creating) `<dir>/<pod>.jsonl` for appending.
    pub fn open(dir: &Path, pod: &str, record_completions: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the traffic log directory {}", dir.display()))?;
        let path = dir.join(format!("{pod}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening the traffic log {}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer::Append(file)),
            record_completions,
            known: Mutex::default(),
            remote: None,
        })
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
        Ok(Self {
            dir: local.to_path_buf(),
            writer: Mutex::new(Writer::Segments { pod: pod.to_string(), policy, seq: 0, open: None }),
            record_completions,
            known: Mutex::default(),
            remote: Some(Remote {
                bucket,
                key: key.trim_matches('/').to_string(),
                uploading: tokio::sync::Mutex::new(()),
            }),
        })
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

    /// Notes a served completion: remembered for feedback, and recorded when recording is on.
    pub fn completion(&self, record: CompletionRecord) -> Result<()> {
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if known.order.len() >= REMEMBERED_IDS
                && let Some(old) = known.order.pop_front()
            {
                known.ids.remove(&old);
            }
            known.ids.insert(record.id.clone());
            known.order.push_back(record.id.clone());
        }
        if self.record_completions {
            self.append(&TrafficRecord::Completion(record))?;
        }
        Ok(())
    }

    /// Records feedback.
    pub fn feedback(&self, record: FeedbackRecord) -> Result<()> {
        self.append(&TrafficRecord::Feedback(record))
    }

    /// Whether a completion with this id was served: by this pod recently, or by any
    /// pod whose log is in the local directory (for a segmented log, this pod's segments
    /// not uploaded yet; [`Self::knows_in_store`] looks at the uploaded ones).
    pub fn knows(&self, id: &str) -> Result<bool> {
        if self.known.lock().unwrap_or_else(|e| e.into_inner()).ids.contains(id) {
            return Ok(true);
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            if holds_completion(BufReader::new(File::open(&path)?), id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether a sealed segment in the store (of any pod) holds a completion with this id;
    /// false for a log that is not segmented. Records a pod has not sealed yet are not
    /// seen, so feedback may reach another pod before its completion is there.
    pub async fn knows_in_store(&self, id: &str) -> Result<bool> {
        let Some(remote) = &self.remote else { return Ok(false) };
        for name in remote.bucket.list(&remote.key).await? {
            if !name.ends_with(".jsonl") {
                continue;
            }
            let bytes = remote.bucket.get(&format!("{}/{name}", remote.key)).await?;
            if holds_completion(bytes.as_slice(), id)? {
                return Ok(true);
            }
        }
        Ok(false)
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

    /// Uploads every sealed segment in the local directory, oldest first, then removes
    /// it there; returns how many went up. A segment whose object exists already (an
    /// upload whose removal was cut short) is not written again.
    pub async fn upload_sealed(&self) -> Result<usize> {
        let Some(remote) = &self.remote else { return Ok(0) };
        let _one_at_a_time = remote.uploading.lock().await;
        let open = match &*self.writer.lock().unwrap_or_else(|e| e.into_inner()) {
            Writer::Segments { open, .. } => open.as_ref().map(|s| s.path.clone()),
            Writer::Append(_) => None,
        };
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
}

/// Whether the JSON lines of `reader` hold a completion with this id.
fn holds_completion(reader: impl BufRead, id: &str) -> Result<bool> {
    let quoted = serde_json::to_string(id)?;
    for line in reader.lines() {
        let line = line?;
        if !line.contains(&quoted) {
            continue;
        }
        if let Ok(TrafficRecord::Completion(c)) = serde_json::from_str(&line)
            && c.id == id
        {
            return Ok(true);
        }
    }
    Ok(false)
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

    #[test]
    fn records_round_trip_and_ids_are_found_across_pods() {
        let dir = std::env::temp_dir().join(format!("llmops-traffic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = TrafficLog::open(&dir, "pod-a", true).expect("opens");
        a.completion(completion("chatcmpl-1")).expect("records");
        a.feedback(FeedbackRecord { id: "chatcmpl-1".into(), time: now(), rating: 5, correction: None, comment: None })
            .expect("records");
        let b = TrafficLog::open(&dir, "pod-b", false).expect("opens");
        assert!(b.knows("chatcmpl-1").expect("reads"), "another pod's completion is found in its log");
        assert!(!b.knows("chatcmpl-2").expect("reads"));
        b.completion(completion("chatcmpl-3")).expect("remembers");
        assert!(b.knows("chatcmpl-3").expect("reads"), "unrecorded completions are remembered in memory");
        let text = std::fs::read_to_string(dir.join("pod-a.jsonl")).expect("reads");
        let records: Vec<TrafficRecord> = text.lines().map(|l| serde_json::from_str(l).expect("parses")).collect();
        assert!(matches!(&records[0], TrafficRecord::Completion(c) if c.id == "chatcmpl-1"));
        assert!(matches!(&records[1], TrafficRecord::Feedback(f) if f.rating == 5));
        assert_eq!(std::fs::read_to_string(dir.join("pod-b.jsonl")).expect("reads"), "", "recording off");
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
        for id in ["c1", "c2", "c3"] {
            log.completion(completion(id)).expect("records");
        }
        assert_eq!(log.upload_sealed().await.expect("uploads"), 1, "two records sealed the first segment");
        assert_eq!(std::fs::read_dir(&local).expect("lists").count(), 1, "only the open segment stays local");
        assert!(log.knows_in_store("c1").await.expect("reads"));
        assert!(!log.knows_in_store("c3").await.expect("reads"), "c3's segment is not sealed yet");
        assert!(log.knows("c3").expect("reads"));
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
        assert_eq!(std::fs::read_dir(&local).expect("lists").count(), 0);
        std::fs::remove_dir_all(&local).expect("cleans up");
    }
}
