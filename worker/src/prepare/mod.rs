//! `llmops-worker prepare`: turns raw records into versioned, content-addressed splits.
//!
//! Rows stream from the source in chunks; each transform runs over a chunk in order,
//! record-local ones in parallel, deduplication sequentially against its index (so the
//! result does not depend on the number of threads). Kept records go to the split their
//! near-duplicate cluster hashes to, and are written as Parquet (and JSONL); a manifest
//! with digests, counts, drops, redactions and token statistics is written last.

pub mod minhash;
pub mod output;
pub mod record;
pub mod source;
pub mod transform;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use llmops_proto::v1::{Assignment, PrepareAssignment, assignment::Mode, data_source, transform::Transform as T};
use rayon::prelude::*;
use regex::Regex;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use self::minhash::{LshIndex, MinHasher};
use self::output::SplitWriter;
use self::record::{Record, Schema};
use self::source::{Digests, Format, Row};
use self::transform::{Filter, Normalize, Redact, UnicodeForm, exact_key};
use crate::engine::tokenizer::TextTokenizer;
use crate::store::{file_sha256, local_path};

/// Rows processed together.
const CHUNK: usize = 8192;
/// Unparseable rows reported by file and line in the manifest.
const REPORTED_INVALID: usize = 20;
/// The splits, in order.
pub const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// One transform with its state.
enum Step {
    Normalize(Normalize),
    Filter(Filter),
    Redact(Redact),
    Exact { case_sensitive: bool, seen: HashSet<u128> },
    Near { hasher: MinHasher, index: LshIndex, next_id: u32 },
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Step::Normalize(_) => "normalize",
            Step::Filter(_) => "filter",
            Step::Redact(_) => "redact",
            Step::Exact { .. } => "exactDedup",
            Step::Near { .. } => "nearDedup",
        }
    }
}

fn regex(field: &str, pattern: &str) -> Result<Option<Regex>> {
    if pattern.is_empty() {
        return Ok(None);
    }
    Ok(Some(Regex::new(pattern).with_context(|| format!("{field}: bad regular expression {pattern:?}"))?))
}

fn steps(p: &PrepareAssignment) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    for (i, t) in p.transforms.iter().enumerate() {
        let at = format!("prepare.transforms[{i}]");
        steps.push(match t.transform.as_ref().with_context(|| format!("{at}: empty transform"))? {
            T::Normalize(n) => Step::Normalize(Normalize {
                unicode: match n.unicode.as_str() {
                    "NFC" => UnicodeForm::Nfc,
                    "" | "NFKC" => UnicodeForm::Nfkc,
                    "None" => UnicodeForm::None,
                    other => bail!("{at}.normalize.unicode: unknown form {other:?}"),
                },
                whitespace: n.whitespace,
            }),
            T::Filter(f) => Step::Filter(Filter {
                min_chars: f.min_chars,
                max_chars: f.max_chars,
                min_tokens: f.min_tokens,
                max_tokens: f.max_tokens,
                keep: regex(&format!("{at}.filter.keepPattern"), &f.keep_pattern)?,
                drop: regex(&format!("{at}.filter.dropPattern"), &f.drop_pattern)?,
                max_symbol_ratio: f.max_symbol_ratio,
                max_repeated_line_ratio: f.max_repeated_line_ratio,
            }),
            T::Redact(r) => {
                let custom: Vec<(String, String)> =
                    r.custom.iter().map(|c| (c.name.clone(), c.pattern.clone())).collect();
                Step::Redact(Redact::new(&r.kinds, &custom).with_context(|| format!("{at}.redact"))?)
            }
            T::ExactDedup(e) => Step::Exact { case_sensitive: e.case_sensitive, seen: HashSet::new() },
            T::NearDedup(n) => {
                let permutations = if n.permutations == 0 { 128 } else { n.permutations as usize };
                let threshold = if n.threshold == 0.0 { 0.5 } else { n.threshold };
                let shingle = if n.shingle_size == 0 { 5 } else { n.shingle_size as usize };
                Step::Near {
                    hasher: MinHasher::new(shingle, permutations, n.seed),
                    index: LshIndex::new(threshold, permutations),
                    next_id: 0,
                }
            }
        });
    }
    Ok(steps)
}

/// A record on its way through the transforms, with the hashes of its lower-cased words
/// once a deduplication step computed them (until a transform changes the text).
struct Item {
    record: Option<Record>,
    words: Option<Vec<u64>>,
}

impl Item {
    /// The record's word hashes, computed once.
    fn words(&mut self) -> Option<&[u64]> {
        let record = self.record.as_ref()?;
        if self.words.is_none() {
            self.words = Some(minhash::word_hashes(&record.content()));
        }
        self.words.as_deref()
    }
}

/// Token statistics.
#[derive(Debug, Default)]
struct Tokens {
    total: u64,
    per_split: [u64; 3],
    /// Records per bucket: bucket i holds records of up to 2^(i+4) tokens; the last one
    /// everything longer.
    histogram: Vec<u64>,
}

impl Tokens {
    fn add(&mut self, split: usize, n: u64) {
        self.total += n;
        self.per_split[split] += n;
        let last = self.histogram.len() - 1;
        let bucket = (0..last).find(|&i| n <= 1u64 << (i + 4)).unwrap_or(last);
        self.histogram[bucket] += 1;
    }

    fn to_json(&self) -> Value {
        let last = self.histogram.len() - 1;
        let buckets: Vec<Value> = self
            .histogram
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if i == last {
                    json!({"above": 1u64 << (i + 3), "records": n})
                } else {
                    json!({"upTo": 1u64 << (i + 4), "records": n})
                }
            })
            .collect();
        json!({
            "total": self.total,
            "splits": {"train": self.per_split[0], "validation": self.per_split[1], "test": self.per_split[2]},
            "histogram": buckets,
        })
    }
}

/// Progress on stderr: a line redrawn in place on a terminal, else a log line every
/// ten seconds.
struct Progress {
    started: Instant,
    last: Instant,
    terminal: bool,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Self { started: now, last: now, terminal: std::io::stderr().is_terminal() }
    }

    fn update(&mut self, read: u64, kept: u64, done: bool) {
        let every = if self.terminal { 0.25 } else { 10.0 };
        if !done && self.last.elapsed().as_secs_f64() < every {
            return;
        }
        self.last = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = read as f64 / seconds;
        if self.terminal {
            eprint!("\rprepare: {read} records read, {kept} kept, {rate:.0} records/s, {seconds:.1} s   ");
            if done {
                eprintln!();
            }
        } else {
            tracing::info!(
                read,
                kept,
                records_per_second = rate.round(),
                seconds = seconds.round(),
                "prepare progress"
            );
        }
        crate::report::emit(crate::report::Report::Progress {
            step: read,
            total: 0,
            epoch: 0.0,
            metrics: [
                ("records".to_string(), read as f64),
                ("kept".to_string(), kept as f64),
                ("records_per_second".to_string(), rate),
            ]
            .into(),
            eta_seconds: 0.0,
            message: format!("{read} records read, {kept} kept"),
        });
    }
}

/// What the run counted.
#[derive(Default)]
struct Counts {
    read: u64,
    invalid: u64,
    invalid_rows: Vec<Value>,
    drops: Vec<u64>,
    redactions: BTreeMap<String, u64>,
    splits: [u64; 3],
}

/// Runs the prepare mode of `assignment`; returns the manifest it wrote.
pub fn run(assignment: &Assignment) -> Result<Value> {
    let Some(Mode::Prepare(p)) = &assignment.mode else { bail!("not a prepare assignment") };
    let store = assignment.store.as_ref();
    let schema = Schema::parse(&p.schema).with_context(|| format!("prepare.schema: unknown schema {:?}", p.schema))?;
    let mut steps = steps(p)?;
    let tokenizer: Option<Arc<TextTokenizer>> = match p.token_stats.as_ref().and_then(|t| t.tokenizer.as_ref()) {
        Some(model) => {
            let uri = model.weights.as_ref().map(|w| w.uri.as_str()).unwrap_or_default();
            let path = local_path(uri, store)?;
            Some(Arc::new(
                crate::engine::loader::load_tokenizer(&path).with_context(|| format!("tokenStats.tokenizer {uri}"))?,
            ))
        }
        None => None,
    };
    if tokenizer.is_none() && steps.iter().any(|s| matches!(s, Step::Filter(f) if f.needs_tokens())) {
        bail!("a filter on minTokens/maxTokens needs tokenStats.tokenizer to count tokens with");
    }
    let split = p.split.unwrap_or_default();
    let fractions = [split.train, split.validation, split.test];
    let out_uri = p.output.as_ref().map(|o| o.uri.as_str()).context("prepare.output.uri is required")?;
    let out = local_path(out_uri, store)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating the output directory {}", out.display()))?;
    let staging = out.join(format!(".staging-{}", std::process::id()));
    std::fs::create_dir_all(&staging)?;
    let result =
        run_into(p, schema, &mut steps, tokenizer.as_deref(), fractions, split.seed, &out, &staging, assignment);
    let _ = std::fs::remove_dir_all(&staging);
    result
}

#[allow(clippy::too_many_arguments)]
fn run_into(
    p: &PrepareAssignment,
    schema: Schema,
    steps: &mut [Step],
    tokenizer: Option<&TextTokenizer>,
    fractions: [f64; 3],
    seed: u64,
    out: &Path,
    staging: &Path,
    assignment: &Assignment,
) -> Result<Value> {
    let store = assignment.store.as_ref();
    let digests = Digests::default();
    let format = Format::parse(&p.format)?;
    let mut snapshot_time = None;
    // Held to the end of the run: dropping it removes downloaded sources.
    let mut _scratch: Option<Cleanup> = None;
    let source = p.source.as_ref().and_then(|s| s.source.as_ref()).context("prepare.source is required")?;
    let (rows, source_uri): (Box<dyn Iterator<Item = Row> + Send>, String) = match source {
        data_source::Source::Uri(uri) => {
            let path = if crate::store::is_remote(uri) {
                // Downloaded to local scratch, not to the store the output goes to.
                let scratch = std::env::temp_dir().join(format!("llmops-source-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&scratch);
                _scratch = Some(Cleanup(scratch.clone()));
                crate::store::stage(uri, &scratch)?
            } else {
                local_path(uri, store)?
            };
            let files = source::list_files(&path.display().to_string())?;
            let mut iters: Vec<Box<dyn Iterator<Item = Row> + Send>> = Vec::new();
            for file in files {
                let f = match format.or_else(|| Format::infer(&file)) {
                    Some(f) => f,
                    None => bail!("cannot tell the format of {} from its name; set prepare.format", file.display()),
                };
                if let Some(h) = source::hint(f, schema) {
                    tracing::warn!(file = %file.display(), "{h}");
                }
                iters.push(source::file_rows(&file, f, &digests)?);
            }
            (Box::new(iters.into_iter().flatten()), uri.clone())
        }
        data_source::Source::Inline(inline) => {
            let origin: Arc<str> = Arc::from("inline");
            let rows: Vec<Row> = inline
                .records
                .iter()
                .enumerate()
                .map(|(i, r)| Row {
                    origin: origin.clone(),
                    line: i as u64 + 1,
                    value: match serde_json::to_value(r) {
                        Ok(Value::Object(m)) => Ok(m),
                        _ => Err("not an object".into()),
                    },
                })
                .collect();
            (Box::new(rows.into_iter()), "inline".into())
        }
        data_source::Source::Feedback(f) => {
            let until = match &f.until {
                Some(t) => jiff::Timestamp::new(t.seconds, t.nanos)
                    .context("prepare.source.feedback.until is out of range")?
                    .to_string(),
                None => jiff::Timestamp::now().to_string(),
            };
            snapshot_time = Some(until.clone());
            let dir = match traffic_in_bucket(&f.uri, store) {
                Some(s3) => {
                    // Sealed segments in a bucket: every object under the directory is
                    // downloaded to local scratch and read from there.
                    let scratch = std::env::temp_dir().join(format!("llmops-feedback-{}", std::process::id()));
                    let _ = std::fs::remove_dir_all(&scratch);
                    _scratch = Some(Cleanup(scratch.clone()));
                    download_traffic(s3, &f.uri, &scratch)?;
                    scratch
                }
                None if crate::store::is_remote(&f.uri) => {
                    let scratch = std::env::temp_dir().join(format!("llmops-feedback-{}", std::process::id()));
                    let _ = std::fs::remove_dir_all(&scratch);
                    _scratch = Some(Cleanup(scratch.clone()));
                    let uri = format!("{}/", f.uri.trim_end_matches('/'));
                    crate::store::stage(&uri, &scratch)?
                }
                None => local_path(&f.uri, store)?,
            };
            (source::feedback_rows(&dir, f.min_rating.max(1), f.prefer_correction, &until)?, f.uri.clone())
        }
    };

    let mut writers: Vec<SplitWriter> =
        SPLITS.iter().map(|s| SplitWriter::create(staging, out, s, schema, p.write_jsonl)).collect::<Result<_>>()?;
    let mut counts = Counts { drops: vec![0; steps.len()], ..Default::default() };
    let mut tokens = Tokens {
        histogram: vec![0; p.token_stats.as_ref().map_or(12, |t| t.histogram_buckets.clamp(2, 64) as usize)],
        ..Default::default()
    };
    // Without a near-dedup step, near-duplicate clusters are still found for the split,
    // so that no cluster spans two splits.
    let has_near = steps.iter().any(|s| matches!(s, Step::Near { .. }));
    let mut clusters =
        (!has_near).then(|| (MinHasher::new(5, 128, seed), LshIndex::new(0.5, 128), HashMap::<u32, u128>::new(), 0u32));
    let mut progress = Progress::new();
    // Reading and parsing run on a thread of their own, a couple of chunks ahead of the
    // transforms; the bounded channel keeps memory to those chunks.
    let mapping = p.mapping.clone();
    let (chunk_tx, chunk_rx) = std::sync::mpsc::sync_channel::<Vec<(Arc<str>, u64, Result<Record, String>)>>(2);
    let reader = std::thread::Builder::new().name("prepare-read".into()).spawn(move || {
        let mut rows = rows;
        loop {
            let chunk: Vec<_> = rows
                .by_ref()
                .take(CHUNK)
                .map(|row| {
                    (row.origin, row.line, row.value.and_then(|v| record::from_row(&v, schema, mapping.as_ref())))
                })
                .collect();
            if chunk.is_empty() || chunk_tx.send(chunk).is_err() {
                break;
            }
        }
    })?;
    for chunk in chunk_rx {
        counts.read += chunk.len() as u64;
        let mut items: Vec<Item> = Vec::with_capacity(chunk.len());
        for (origin, line, parsed) in chunk {
            match parsed {
                Ok(record) => items.push(Item { record: Some(record), words: None }),
                Err(error) => {
                    counts.invalid += 1;
                    if counts.invalid_rows.len() < REPORTED_INVALID {
                        counts.invalid_rows.push(json!({"origin": &*origin, "line": line, "error": error}));
                    }
                }
            }
        }
        for (i, step) in steps.iter_mut().enumerate() {
            let before = items.iter().filter(|it| it.record.is_some()).count();
            apply(step, &mut items, tokenizer, &mut counts.redactions)?;
            let after = items.iter().filter(|it| it.record.is_some()).count();
            counts.drops[i] += (before - after) as u64;
        }
        // Split and write, in input order.
        items.par_iter_mut().for_each(|it| {
            it.words();
        });
        let kept: Vec<(Record, Vec<u64>)> =
            items.into_iter().filter_map(|it| Some((it.record?, it.words.unwrap_or_default()))).collect();
        let keys: Vec<(u128, Option<Vec<u64>>, Option<u64>)> = kept
            .par_iter()
            .map(|(r, words)| {
                let key = transform::key_of_words(words);
                let signature = clusters.as_ref().map(|(h, index, ..)| index.band_hashes(&h.signature_of_words(words)));
                let n = tokenizer.map(|t| t.encode(&r.content(), false).map(|ids| ids.len() as u64).unwrap_or(0));
                (key, signature, n)
            })
            .collect();
        let kept = kept.into_iter().map(|(r, _)| r);
        for (record, (key, signature, n)) in kept.into_iter().zip(keys) {
            let cluster = match (&mut clusters, signature) {
                (Some((_, index, reps, next)), Some(sig)) => {
                    let id = *next;
                    *next += 1;
                    match index.find_or_insert_bands(&sig, id) {
                        Some(rep) => reps.get(&rep).copied().unwrap_or(key),
                        None => {
                            reps.insert(id, key);
                            key
                        }
                    }
                }
                _ => key,
            };
            let s = split_of(cluster, seed, fractions);
            counts.splits[s] += 1;
            if let Some(n) = n {
                tokens.add(s, n);
            }
            writers[s].write(record)?;
        }
        progress.update(counts.read, counts.splits.iter().sum(), false);
    }
    reader.join().map_err(|_| anyhow::anyhow!("the reading thread panicked"))?;
    progress.update(counts.read, counts.splits.iter().sum(), true);
    if counts.read > 0 && counts.invalid == counts.read {
        let first = counts.invalid_rows.first().cloned().unwrap_or_default();
        bail!("none of the {} rows could be read as {} records; the first: {first}", counts.read, p.schema);
    }

    // Close, hash and move the files into place; the manifest comes last.
    let mut files = BTreeMap::new();
    for (i, w) in writers.into_iter().enumerate() {
        let (records, paths) = w.finish()?;
        for (final_path, tmp) in paths {
            let sha = file_sha256(&tmp)?;
            let bytes = std::fs::metadata(&tmp)?.len();
            std::fs::rename(&tmp, &final_path)
                .with_context(|| format!("moving {} into place", final_path.display()))?;
            let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.insert(name, json!({"sha256": sha, "bytes": bytes, "records": records, "split": SPLITS[i]}));
        }
    }
    let dataset_sha = crate::store::files_digest(
        files.iter().map(|(name, f)| (name.as_str(), f["sha256"].as_str().unwrap_or_default())),
    );
    let source_files: Vec<Value> =
        digests.finish().into_iter().map(|(path, sha)| json!({"path": path, "sha256": sha})).collect();
    let mut source_digest = Sha256::new();
    for f in &source_files {
        source_digest.update(f["sha256"].as_str().unwrap_or_default().as_bytes());
    }
    let drops: Vec<Value> = steps
        .iter()
        .zip(&counts.drops)
        .enumerate()
        .map(|(i, (s, n))| json!({"index": i, "transform": s.name(), "dropped": n}))
        .collect();
    let spec = serde_json::to_value(p)?;
    let mut manifest = json!({
        "kind": "Dataset",
        "workload": assignment.workload.as_ref().map(|w| json!({"namespace": w.namespace, "name": w.name, "uid": w.uid})),
        "sha256": dataset_sha,
        "schema": p.schema,
        "files": files,
        "inputs": {"source": {"uri": source_uri, "files": source_files, "sha256": hex::encode(source_digest.finalize())}},
        "counts": {
            "read": counts.read,
            "invalid": counts.invalid,
            "written": counts.splits.iter().sum::<u64>(),
            "splits": {"train": counts.splits[0], "validation": counts.splits[1], "test": counts.splits[2]},
        },
        "drops": drops,
        "redactions": counts.redactions,
        "invalidRows": counts.invalid_rows,
        "spec": spec,
    });
    if tokenizer.is_some() {
        manifest["tokens"] = tokens.to_json();
    }
    if let Some(t) = snapshot_time {
        manifest["snapshotTime"] = json!(t);
    }
    let tmp = staging.join("manifest.json");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(&tmp, out.join("manifest.json"))?;
    tracing::info!(
        read = counts.read,
        written = counts.splits.iter().sum::<u64>(),
        invalid = counts.invalid,
        sha256 = %manifest["sha256"].as_str().unwrap_or_default(),
        out = %out.display(),
        "dataset prepared"
    );
    Ok(manifest)
}

/// The S3 store a `store://` traffic directory lives in, when the store is a bucket.
fn traffic_in_bucket<'a>(
    uri: &str,
    store: Option<&'a llmops_proto::v1::Store>,
) -> Option<&'a llmops_proto::v1::S3Store> {
    use llmops_proto::v1::store::Backend;
    match store.and_then(|s| s.backend.as_ref()) {
        Some(Backend::S3(s3)) if uri.starts_with("store://") => Some(s3),
        _ => None,
    }
}

/// Downloads every object under the `store://` directory `uri` into `target`.
fn download_traffic(s3: &llmops_proto::v1::S3Store, uri: &str, target: &Path) -> Result<()> {
    let key = uri.trim_start_matches("store://").trim_matches('/');
    if key.split('/').any(|part| part == "..") {
        bail!("{uri}: a store key must not contain '..'");
    }
    let bucket = crate::staging::Bucket::new(s3)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::fs::create_dir_all(target)?;
    let found = runtime.block_on(bucket.download(&format!("{key}/"), target))?;
    if !found {
        bail!("{uri}: not found: no traffic log under this key (s3://{}/{key}/)", s3.bucket);
    }
    Ok(())
}

/// Removes a scratch directory when dropped.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Applies one step to the live records of a chunk.
fn apply(
    step: &mut Step,
    items: &mut [Item],
    tokenizer: Option<&TextTokenizer>,
    redactions: &mut BTreeMap<String, u64>,
) -> Result<()> {
    match step {
        Step::Normalize(n) => items.par_iter_mut().for_each(|it| {
            if let Some(r) = it.record.as_mut() {
                n.apply(r);
                it.words = None;
            }
        }),
        Step::Filter(f) => {
            let keep: Vec<bool> = items
                .par_iter()
                .map(|it| it.record.as_ref().map_or(Ok(true), |r| f.keeps(&r.content(), tokenizer)))
                .collect::<Result<_>>()?;
            for (it, k) in items.iter_mut().zip(keep) {
                if !k {
                    it.record = None;
                }
            }
        }
        Step::Redact(r) => {
            let found: Vec<BTreeMap<String, u64>> = items
                .par_iter_mut()
                .filter_map(|it| {
                    let rec = it.record.as_mut()?;
                    let mut counts = BTreeMap::new();
                    r.apply(rec, &mut counts);
                    if !counts.is_empty() {
                        it.words = None;
                    }
                    Some(counts)
                })
                .collect();
            for counts in found {
                for (k, v) in counts {
                    *redactions.entry(k).or_default() += v;
                }
            }
        }
        Step::Exact { case_sensitive, seen } => {
            let cs = *case_sensitive;
            let keys: Vec<Option<u128>> = items
                .par_iter_mut()
                .map(|it| {
                    if cs {
                        it.record.as_ref().map(|r| exact_key(&r.content(), true))
                    } else {
                        it.words().map(transform::key_of_words)
                    }
                })
                .collect();
            for (it, key) in items.iter_mut().zip(keys) {
                if let Some(key) = key
                    && !seen.insert(key)
                {
                    it.record = None;
                }
            }
        }
        Step::Near { hasher, index, next_id } => {
            let bands: Vec<Option<Vec<u64>>> = items
                .par_iter_mut()
                .map(|it| it.words().map(|w| index.band_hashes(&hasher.signature_of_words(w))))
                .collect();
            for (it, bands) in items.iter_mut().zip(bands) {
                if let Some(bands) = bands {
                    let id = *next_id;
                    *next_id += 1;
                    if index.find_or_insert_bands(&bands, id).is_some() {
                        it.record = None;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The split a cluster goes to: its hash with the seed, as a fraction, against the
/// cumulative split fractions. A split with fraction 0 never gets a record.
pub fn split_of(cluster: u128, seed: u64, fractions: [f64; 3]) -> usize {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    hasher.update(cluster.to_le_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    let u = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    let mut cumulative = 0.0;
    for (i, f) in fractions.iter().enumerate() {
        cumulative += f;
        if u < cumulative && *f > 0.0 {
            return i;
        }
    }
    // Rounding left u above the sum: the last split with records.
    fractions.iter().rposition(|f| *f > 0.0).unwrap_or(0)
}
