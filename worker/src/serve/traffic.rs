//! The traffic log (DESIGN.md, "Feedback and revisions"): each pod appends one JSON
//! line per completion and per feedback to `<traffic dir>/<pod>.jsonl` in the store. A
//! Dataset with a `feedback` source reads these files back, so the record types here
//! are the format's definition.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use llmops_crds::render::ChatMessage;
use serde::{Deserialize, Serialize};

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

/// A pod's traffic log.
#[derive(Debug)]
pub struct TrafficLog {
    dir: PathBuf,
    file: Mutex<File>,
    record_completions: bool,
    known: Mutex<Known>,
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
        Ok(Self { dir: dir.to_path_buf(), file: Mutex::new(file), record_completions, known: Mutex::default() })
    }

    /// Whether completions are recorded (feedback always is).
    pub fn records_completions(&self) -> bool {
        self.record_completions
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
    /// pod whose log is in the directory.
    pub fn knows(&self, id: &str) -> Result<bool> {
        if self.known.lock().unwrap_or_else(|e| e.into_inner()).ids.contains(id) {
            return Ok(true);
        }
        let quoted = serde_json::to_string(id)?;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let reader = BufReader::new(File::open(&path)?);
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
        }
        Ok(false)
    }

    /// Appends one line with one write, so lines of concurrent writers never interleave.
    fn append(&self, record: &TrafficRecord) -> Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&line).context("appending to the traffic log")?;
        file.flush()?;
        Ok(())
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
}
