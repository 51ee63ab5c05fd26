//! Reading source records as a stream of rows: files, directories and globs in JSONL,
//! CSV, Parquet or plain text (gzip or zstd compressed or not), inline records, and a
//! deployment's traffic log. A row that cannot be parsed is an error row with its file
//! and line, never a failure of the run. Every source file's sha256 is computed on the
//! way, for the manifest.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use arrow_array::{Array, ArrayRef, RecordBatch, cast::AsArray};
use arrow_schema::DataType;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::record::Schema;
use crate::serve::traffic::TrafficRecord;

/// One source row.
#[derive(Debug)]
pub struct Row {
    /// The file (or `inline`, `feedback`) it came from.
    pub origin: Arc<str>,
    /// Its line (or row) number, from 1.
    pub line: u64,
    /// The fields, or why the row could not be read.
    pub value: Result<Map<String, Value>, String>,
}

/// File format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
    /// One record per non-empty line.
    Text,
}

impl Format {
    /// From the Assignment's name; empty means infer from file names.
    pub fn parse(name: &str) -> Result<Option<Self>> {
        Ok(match name {
            "" => None,
            "jsonl" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "parquet" => Some(Self::Parquet),
            "text" => Some(Self::Text),
            other => bail!("unknown format {other:?}; use jsonl, csv, parquet or text"),
        })
    }

    /// From a file name, ignoring a .gz or .zst ending.
    pub fn infer(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        let name = name.trim_end_matches(".gz").trim_end_matches(".zst").trim_end_matches(".zstd");
        let ext = name.rsplit_once('.')?.1;
        match ext {
            "jsonl" | "json" | "ndjson" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "parquet" => Some(Self::Parquet),
            "txt" | "text" | "md" => Some(Self::Text),
            _ => None,
        }
    }
}

/// The local files of a source path: the file itself, every file under a directory
/// (sorted, hidden ones skipped), or the matches of a glob (sorted).
pub fn list_files(path: &str) -> Result<Vec<PathBuf>> {
    if path.contains(['*', '?', '[']) {
        let mut files: Vec<PathBuf> = glob::glob(path)
            .with_context(|| format!("bad glob {path:?}"))?
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no file matches {path}");
        }
        return Ok(files);
    }
    let p = Path::new(path);
    let meta = std::fs::metadata(p).with_context(|| format!("source not found: {path}"))?;
    if meta.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let files = files_under(p)?;
    if files.is_empty() {
        bail!("the directory {path} holds no files");
    }
    Ok(files)
}

/// sha256 of the raw bytes read through it.
struct Hashing<R> {
    inner: R,
    hasher: Arc<Mutex<Sha256>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.lock().unwrap_or_else(|e| e.into_inner()).update(&buf[..n]);
        Ok(n)
    }
}

/// Digests of the source files, filled in as they are read.
#[derive(Debug, Default, Clone)]
pub struct Digests(Arc<Mutex<Vec<(String, SharedHasher)>>>);

/// A hasher fed by a reader while the pipeline owns the reader.
type SharedHasher = Arc<Mutex<Sha256>>;

impl Digests {
    fn track(&self, name: &str) -> Arc<Mutex<Sha256>> {
        let hasher = Arc::new(Mutex::new(Sha256::new()));
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push((name.to_string(), hasher.clone()));
        hasher
    }

    /// (file, sha256) of every file read so far.
    pub fn finish(&self) -> Vec<(String, String)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, h)| {
                (name.clone(), hex::encode(h.lock().unwrap_or_else(|e| e.into_inner()).clone().finalize()))
            })
            .collect()
    }
}

/// Opens a file for reading, hashing its raw bytes and undoing gzip or zstd compression
/// (recognised by their magic bytes).
fn open_decoded(path: &Path, digests: &Digests) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let hasher = digests.track(&path.display().to_string());
    let mut raw = BufReader::with_capacity(1 << 16, Hashing { inner: file, hasher });
    let magic = raw.fill_buf()?.get(..4).map(<[u8]>::to_vec).unwrap_or_default();
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(BufReader::with_capacity(1 << 16, flate2::bufread::MultiGzDecoder::new(raw)))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(BufReader::with_capacity(1 << 16, zstd::stream::read::Decoder::with_buffer(raw)?))
    } else {
        Box::new(raw)
    })
}

/// Rows of one file.
pub fn file_rows(path: &Path, format: Format, digests: &Digests) -> Result<Box<dyn Iterator<Item = Row> + Send>> {
    let origin: Arc<str> = Arc::from(path.display().to_string());
    match format {
        Format::Jsonl | Format::Text => {
            let reader = open_decoded(path, digests)?;
            let mut lines = reader.split(b'\n');
            let mut line = 0u64;
            Ok(Box::new(std::iter::from_fn(move || {
                loop {
                    line += 1;
                    let bytes = match lines.next()? {
                        Ok(b) => b,
                        Err(e) => {
                            return Some(Row { origin: origin.clone(), line, value: Err(format!("read error: {e}")) });
                        }
                    };
                    let text = match String::from_utf8(bytes) {
                        Ok(t) => t,
                        Err(_) => {
                            return Some(Row { origin: origin.clone(), line, value: Err("not valid UTF-8".into()) });
                        }
                    };
                    let text = text.trim_end_matches('\r');
                    if text.trim().is_empty() {
                        continue;
                    }
                    let value = if format == Format::Text {
                        Ok(Map::from_iter([("text".to_string(), Value::String(text.to_string()))]))
                    } else {
                        match serde_json::from_str::<Value>(text) {
                            Ok(Value::Object(m)) => Ok(m),
                            Ok(_) => Err("not a JSON object".to_string()),
                            Err(e) => Err(format!("invalid JSON: {e}")),
                        }
                    };
                    return Some(Row { origin: origin.clone(), line, value });
                }
            })))
        }
        Format::Csv => {
            let reader = open_decoded(path, digests)?;
            let mut csv = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(reader);
            let headers: Vec<String> = csv
                .headers()
                .with_context(|| format!("{}: reading the CSV header", path.display()))?
                .iter()
                .map(String::from)
                .collect();
            let mut records = csv.into_records();
            Ok(Box::new(std::iter::from_fn(move || {
                let result = records.next()?;
                let line = match &result {
                    Ok(r) => r.position().map_or(0, |p| p.line()),
                    Err(e) => e.position().map_or(0, |p| p.line()),
                };
                let value = result.map_err(|e| format!("bad CSV row: {e}")).map(|r| {
                    headers.iter().zip(r.iter()).map(|(h, v)| (h.clone(), Value::String(v.to_string()))).collect()
                });
                Some(Row { origin: origin.clone(), line, value })
            })))
        }
        Format::Parquet => {
            // Parquet needs random access, so it is hashed in a pass of its own.
            let hasher = digests.track(&path.display().to_string());
            let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            std::io::copy(&mut file, &mut HashWriter(hasher))?;
            let file = File::open(path)?;
            let reader = contain(|| {
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .and_then(|b| b.with_batch_size(1024).build())
            })
            .map_err(|panic| anyhow::anyhow!("{} is not a readable Parquet file: {panic}", path.display()))?
            .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
            let mut line = 0u64;
            let mut pending: std::vec::IntoIter<Map<String, Value>> = Vec::new().into_iter();
            let mut batches = Some(reader);
            Ok(Box::new(std::iter::from_fn(move || {
                loop {
                    if let Some(row) = pending.next() {
                        line += 1;
                        return Some(Row { origin: origin.clone(), line, value: Ok(row) });
                    }
                    let reader = batches.as_mut()?;
                    let error = match contain(|| reader.next()) {
                        Ok(None) => return None,
                        Ok(Some(Ok(batch))) => {
                            pending = batch_rows(&batch).into_iter();
                            continue;
                        }
                        Ok(Some(Err(e))) => format!("Parquet read error: {e}"),
                        Err(panic) => {
                            // The reader's state is unknown after a panic: the rest of the
                            // file is not read.
                            batches = None;
                            format!("Parquet read error: {panic}; the rest of the file is skipped")
                        }
                    };
                    line += 1;
                    return Some(Row { origin: origin.clone(), line, value: Err(error) });
                }
            })))
        }
    }
}

/// Runs a call into the Parquet reader, turning a panic into an error: the parquet crate
/// unwraps on some malformed files (a page whose repetition levels it has no decoder for,
/// found by fuzzing), and a bad source file must be an error row, not a crash.
fn contain<T>(read: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown fault".to_string());
        format!("the file is malformed (the Parquet reader failed: {message})")
    })
}

struct HashWriter(Arc<Mutex<Sha256>>);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The rows of a record batch as JSON objects.
fn batch_rows(batch: &RecordBatch) -> Vec<Map<String, Value>> {
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|i| {
            schema.fields().iter().zip(batch.columns()).map(|(f, column)| (f.name().clone(), cell(column, i))).collect()
        })
        .collect()
}

/// One cell of an Arrow array as JSON: strings, numbers, booleans, lists and structs.
fn cell(array: &ArrayRef, i: usize) -> Value {
    if array.is_null(i) {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(i).to_string()),
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let v = arrow_cast_i64(array, i);
            Value::from(v)
        }
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
            Value::from(arrow_cast_u64(array, i))
        }
        DataType::Float32 => Value::from(f64::from(array.as_primitive::<arrow_array::types::Float32Type>().value(i))),
        DataType::Float64 => Value::from(array.as_primitive::<arrow_array::types::Float64Type>().value(i)),
        DataType::List(_) => {
            let list = array.as_list::<i32>().value(i);
            Value::Array((0..list.len()).map(|j| cell(&list, j)).collect())
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>().value(i);
            Value::Array((0..list.len()).map(|j| cell(&list, j)).collect())
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            Value::Object(fields.iter().zip(s.columns()).map(|(f, c)| (f.name().clone(), cell(c, i))).collect())
        }
        other => Value::String(format!("<unsupported Parquet type {other}>")),
    }
}

fn arrow_cast_i64(array: &ArrayRef, i: usize) -> i64 {
    use arrow_array::types::*;
    match array.data_type() {
        DataType::Int8 => i64::from(array.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => i64::from(array.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => i64::from(array.as_primitive::<Int32Type>().value(i)),
        _ => array.as_primitive::<Int64Type>().value(i),
    }
}

fn arrow_cast_u64(array: &ArrayRef, i: usize) -> u64 {
    use arrow_array::types::*;
    match array.data_type() {
        DataType::UInt8 => u64::from(array.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => u64::from(array.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => u64::from(array.as_primitive::<UInt32Type>().value(i)),
        _ => array.as_primitive::<UInt64Type>().value(i),
    }
}

/// The latest feedback on a completion: its time, rating and correction.
type Rating = (String, u8, Option<String>);

/// Every `*.jsonl` under a traffic log directory, in subdirectories too (hidden entries
/// skipped), sorted: the pods' appended logs and their sealed segments alike.
pub fn traffic_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = files_under(dir).with_context(|| format!("reading the traffic log {}", dir.display()))?;
    files.retain(|path| path.extension().is_some_and(|e| e == "jsonl"));
    Ok(files)
}

/// Every file under `dir`, in subdirectories too, hidden entries skipped, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).with_context(|| format!("reading {}", at.display()))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Rows of a traffic log directory snapshot: completions finished at or before `until`
/// (RFC 3339) whose latest rating is at least `min_rating`, with the user's correction as
/// the answer when `prefer_correction` and one was given. Each row has the fields of all
/// three schemas (`messages` or `prompt`/`completion`, and `text`).
pub fn feedback_rows(
    dir: &Path,
    min_rating: u32,
    prefer_correction: bool,
    until: &str,
) -> Result<Box<dyn Iterator<Item = Row> + Send>> {
    let until: jiff::Timestamp = until.parse().with_context(|| format!("bad snapshot time {until:?}"))?;
    let files = traffic_files(dir)?;
    let in_snapshot = move |time: &str| time.parse::<jiff::Timestamp>().is_ok_and(|t| t <= until);
    // Pass 1: the latest rating and correction of each id (feedback is small).
    let mut ratings: HashMap<String, Rating> = HashMap::new();
    for file in &files {
        for line in BufReader::new(File::open(file)?).lines() {
            if let Ok(TrafficRecord::Feedback(f)) = serde_json::from_str(&line?)
                && in_snapshot(&f.time)
            {
                let newer = ratings.get(&f.id).is_none_or(|(t, _, _)| *t <= f.time);
                if newer {
                    ratings.insert(f.id.clone(), (f.time.clone(), f.rating, f.correction.clone()));
                }
            }
        }
    }
    // Pass 2, streamed: rated completions, file by file.
    let rows = files.into_iter().flat_map(move |file| {
        let origin: Arc<str> = Arc::from(file.display().to_string());
        let lines: Box<dyn Iterator<Item = std::io::Result<String>> + Send> = match File::open(&file) {
            Ok(f) => Box::new(BufReader::new(f).lines()),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        let ratings = ratings.clone();
        lines.enumerate().filter_map(move |(n, line)| {
            let line_no = n as u64 + 1;
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    return Some(Row { origin: origin.clone(), line: line_no, value: Err(format!("read error: {e}")) });
                }
            };
            let Ok(TrafficRecord::Completion(c)) = serde_json::from_str(&line) else { return None };
            let (_, rating, correction) = ratings.get(&c.id)?;
            if u32::from(*rating) < min_rating || !in_snapshot(&c.time) {
                return None;
            }
            let answer = match correction {
                Some(fix) if prefer_correction && !fix.trim().is_empty() => fix.clone(),
                _ => c.output.clone(),
            };
            let mut row = Map::new();
            let text = match (&c.messages, &c.prompt) {
                (Some(messages), _) => {
                    let mut all: Vec<Value> =
                        messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
                    all.push(serde_json::json!({"role": "assistant", "content": answer}));
                    let last_user = messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone());
                    row.insert("messages".into(), Value::Array(all));
                    row.insert("prompt".into(), Value::String(last_user.clone().unwrap_or_default()));
                    row.insert("completion".into(), Value::String(answer.clone()));
                    format!("{}\n{answer}", last_user.unwrap_or_default())
                }
                (None, Some(prompt)) => {
                    row.insert("prompt".into(), Value::String(prompt.clone()));
                    row.insert("completion".into(), Value::String(answer.clone()));
                    format!("{prompt}{answer}")
                }
                (None, None) => return None,
            };
            row.insert("text".into(), Value::String(text));
            Some(Row { origin: origin.clone(), line: line_no, value: Ok(row) })
        })
    });
    Ok(Box::new(rows))
}

/// Whether rows of `format` can become records of `schema` without a mapping: a hint
/// for the error a user sees when every row fails.
pub fn hint(format: Format, schema: Schema) -> Option<&'static str> {
    match (format, schema) {
        (Format::Text, Schema::Chat | Schema::Completion) => Some(
            "plain text gives one `text` field per line; use schema text, or JSONL/CSV/Parquet for chat and completion records",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: a Parquet file whose list column has a page without repetition
    /// levels made the parquet crate unwrap a None (a panic). It must be an error row.
    #[test]
    fn a_parquet_file_that_makes_the_reader_panic_is_an_error_row() {
        let dir = std::env::temp_dir().join(format!("llmops-source-parquet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("malformed.parquet");
        std::fs::write(&path, include_bytes!("testdata/malformed-levels.parquet")).expect("write");
        let rows: Vec<Row> =
            file_rows(&path, Format::Parquet, &Digests::default()).expect("the footer reads").collect();
        let last = rows.last().expect("at least the error row");
        let error = last.value.as_ref().expect_err("the last row is the error");
        assert!(error.contains("Parquet read error: the file is malformed"), "{error}");
        assert!(error.contains("the rest of the file is skipped"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
