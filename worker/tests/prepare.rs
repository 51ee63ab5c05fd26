//! `llmops-worker prepare` on generated corpora whose structure is known: planted exact
//! and near duplicates, personal data with look-alikes, malformed rows; every source
//! format, compression and source kind; determinism of digests and splits.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::process::Command;

use llmops_proto::read_assignment;
use serde_json::{Value, json};

use common::{scratch, write_jsonl};

use llmops_worker::engine::sampling::SplitMix64 as Rng;

/// Uniform below `n`.
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn vocabulary(rng: &mut Rng, n: usize) -> Vec<String> {
    const SYLLABLES: [&str; 24] = [
        "ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "ve", "da", "gu", "fi", "ba", "ze", "qo", "hi", "ju", "wy",
        "xe", "co", "ly", "ma", "ro", "te",
    ];
    let mut words = HashSet::new();
    while words.len() < n {
        let len = 2 + below(rng, 3);
        words.insert((0..len).map(|_| SYLLABLES[below(rng, SYLLABLES.len())]).collect::<String>());
    }
    let mut words: Vec<String> = words.into_iter().collect();
    words.sort();
    words
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Original,
    Exact,
    Near,
}

/// A corpus of `originals` 60-word texts, plus exact duplicates (half differing only in
/// case and spacing) and near duplicates (3 of 60 words replaced), shuffled.
fn corpus(originals: usize, seed: u64) -> Vec<(String, usize, Kind)> {
    let mut rng = Rng(seed);
    let vocab = vocabulary(&mut rng, 4000);
    let mut texts: Vec<Vec<String>> = Vec::new();
    for _ in 0..originals {
        texts.push((0..60).map(|_| vocab[below(&mut rng, vocab.len())].clone()).collect());
    }
    let mut out: Vec<(String, usize, Kind)> =
        texts.iter().enumerate().map(|(i, t)| (t.join(" "), i, Kind::Original)).collect();
    for i in 0..originals / 8 {
        let c = below(&mut rng, originals);
        let text = texts[c].join(" ");
        let dup = if i % 2 == 0 { text } else { format!("  {}  ", text.to_uppercase().replace(' ', "   ")) };
        out.push((dup, c, Kind::Exact));
    }
    for _ in 0..originals / 8 {
        let c = below(&mut rng, originals);
        let mut words = texts[c].clone();
        for _ in 0..3 {
            let at = below(&mut rng, words.len());
            words[at] = vocab[below(&mut rng, vocab.len())].clone();
        }
        out.push((words.join(" "), c, Kind::Near));
    }
    for i in (1..out.len()).rev() {
        let j = below(&mut rng, i + 1);
        out.swap(i, j);
    }
    out
}

/// Lower-cased words joined by single spaces: what exact duplicates share.
fn normalized(text: &str) -> String {
    text.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

fn worker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_llmops-worker")).args(args).output().expect("runs the worker")
}

/// Writes an Assignment and runs `prepare` with it; returns the manifest.
fn prepare(dir: &Path, body: &str) -> Value {
    let file = dir.join(format!("assignment-{}.yaml", body.len()));
    let yaml = format!(
        "workload: {{namespace: test, kind: Dataset, name: data, uid: 5d1c2b3a-4e5f-4a6b-8c7d-9e0f1a2b3c4d}}\nprepare:\n{body}"
    );
    std::fs::write(&file, yaml).expect("writes the assignment");
    let out = worker(&["prepare", "--assignment", &file.display().to_string()]);
    assert!(out.status.success(), "prepare failed: {}", String::from_utf8_lossy(&out.stderr));
    let assignment = read_assignment(&file).expect("reads back");
    let Some(llmops_proto::v1::assignment::Mode::Prepare(p)) = assignment.mode else { panic!("prepare") };
    let uri = p.output.expect("output").uri;
    let out_dir = uri.trim_start_matches("file://");
    serde_json::from_str(&std::fs::read_to_string(Path::new(out_dir).join("manifest.json")).expect("manifest"))
        .expect("manifest is JSON")
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).expect("reads").lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect()
}

fn parquet_rows(path: &Path) -> usize {
    let file = std::fs::File::open(path).expect("opens");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("valid parquet")
        .build()
        .expect("reader");
    reader.map(|b| b.expect("batch").num_rows()).sum()
}

#[test]
fn dedup_meets_recall_and_precision_on_planted_duplicates() {
    let dir = scratch("dedup");
    let plan = corpus(4000, 11);
    let mut rows: Vec<Value> = plan.iter().map(|(t, _, _)| json!({"text": t})).collect();
    // Malformed rows at known positions: not JSON, not an object, a missing field.
    rows.insert(10, json!("a bare string"));
    rows.insert(20, json!({"body": "no text field"}));
    let path = dir.join("corpus.jsonl");
    write_jsonl(&path, &rows);
    let mut text = std::fs::read_to_string(&path).expect("reads");
    text.insert_str(0, "{not json\n");
    std::fs::write(&path, text).expect("writes");

    let manifest = prepare(
        &dir,
        &format!(
            "  source: {{uri: \"file://{}\"}}\n  schema: text\n  transforms:\n    - exactDedup: {{}}\n    - nearDedup: {{shingleSize: 5, permutations: 128, threshold: 0.5, seed: \"0\"}}\n  split: {{train: 0.8, validation: 0.1, test: 0.1, seed: \"3\"}}\n  output: {{uri: \"file://{}/out\"}}\n  writeJsonl: true\n",
            path.display(),
            dir.display()
        ),
    );
    assert_eq!(manifest["counts"]["invalid"], 3, "{manifest:#}");
    let lines: Vec<u64> =
        manifest["invalidRows"].as_array().expect("list").iter().map(|r| r["line"].as_u64().expect("n")).collect();
    assert_eq!(lines, vec![1, 12, 22], "reported with their line numbers: {manifest:#}");
    let mut kept = HashSet::new();
    for split in ["train", "validation", "test"] {
        let records = read_jsonl(&dir.join(format!("out/{split}.jsonl")));
        assert_eq!(records.len(), parquet_rows(&dir.join(format!("out/{split}.parquet"))));
        assert_eq!(manifest["counts"]["splits"][split], records.len());
        kept.extend(records.into_iter().map(|r| r["text"].as_str().expect("text").to_string()));
    }
    // Per cluster (an original and its planted copies): n distinct texts after exact
    // dedup, k kept. Ideally k = 1: n - max(k, 1) copies were rightly removed, and a cluster
    // with nothing kept lost a record it should have kept (a false positive).
    // Groups: an original with its exact copies (same words up to case and spacing), and
    // each near copy on its own.
    let mut groups: HashMap<usize, HashMap<String, Vec<&str>>> = HashMap::new();
    for (t, c, _) in &plan {
        groups.entry(*c).or_default().entry(normalized(t)).or_default().push(t.as_str());
    }
    let (mut duplicates, mut removed, mut lost) = (0usize, 0usize, 0usize);
    for cluster in groups.values() {
        let k = cluster.values().filter(|g| g.iter().any(|t| kept.contains(*t))).count();
        duplicates += cluster.len() - 1;
        removed += cluster.len() - k.max(1);
        lost += usize::from(k == 0);
    }
    let exact_dropped = manifest["drops"][0]["dropped"].as_u64().expect("n");
    let near_dropped = manifest["drops"][1]["dropped"].as_u64().expect("n");
    let recall = removed as f64 / duplicates as f64;
    let precision = 1.0 - lost as f64 / near_dropped as f64;
    println!(
        "near-dup recall {recall:.3}, precision {precision:.3}, exact dropped {exact_dropped}, near dropped {near_dropped}"
    );
    assert_eq!(exact_dropped, (4000 / 8) as u64, "every planted exact duplicate, case and spacing variants included");
    assert!(recall >= 0.9, "near-dup recall {recall}");
    assert!(precision >= 0.95, "near-dup precision {precision}");
}

#[test]
fn personal_data_is_redacted_and_look_alikes_survive() {
    let dir = scratch("pii");
    let rows = vec![
        json!({"prompt": "My email is ann.lee@example.org, call +44 20 7946 0958.", "completion": "Noted."}),
        json!({"prompt": "Charge card 5500 0000 0000 0004 please.", "completion": "Server 10.0.0.12 logged it."}),
        json!({"prompt": "Order ORD-20240001 shipped.", "completion": "Thanks"}),
        // Look-alikes: a card number failing Luhn, a version, a date, a time, code.
        json!({"prompt": "Card 5500 0000 0000 0005 is fake; v1.2.3.4.5 released 2024-03-01 12:30:45.", "completion": "std::io::Result"}),
    ];
    let path = dir.join("pii.jsonl");
    write_jsonl(&path, &rows);
    let manifest = prepare(
        &dir,
        &format!(
            "  source: {{uri: \"file://{}\"}}\n  schema: completion\n  transforms:\n    - redact:\n        kinds: [email, phone, ipAddress, creditCard]\n        custom: [{{name: order_id, pattern: \"ORD-[0-9]{{8}}\"}}]\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n  output: {{uri: \"file://{}/out\"}}\n  writeJsonl: true\n",
            path.display(),
            dir.display()
        ),
    );
    let want = json!({"creditCard": 1, "email": 1, "ipAddress": 1, "order_id": 1, "phone": 1});
    assert_eq!(manifest["redactions"], want, "{manifest:#}");
    let out: Vec<Value> = read_jsonl(&dir.join("out/train.jsonl"));
    let all = serde_json::to_string(&out).expect("json");
    for gone in ["ann.lee@example.org", "7946 0958", "5500 0000 0000 0004", "10.0.0.12", "ORD-20240001"] {
        assert!(!all.contains(gone), "{gone} survived: {all}");
    }
    for kept in ["5500 0000 0000 0005", "v1.2.3.4.5", "2024-03-01 12:30:45", "std::io::Result", "[EMAIL]", "[ORDER_ID]"]
    {
        assert!(all.contains(kept), "{kept} is missing: {all}");
    }
    assert_eq!(manifest["counts"]["splits"]["validation"], 0);
}

fn text_rows(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"question": format!("What is {i} plus {i}?"), "answer": format!("{}", 2 * i)})).collect()
}

#[test]
fn every_format_and_compression_reads_the_same_records() {
    let dir = scratch("formats");
    let rows = text_rows(50);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("dir");
    write_jsonl(&src.join("a.jsonl"), &rows[..20]);
    // gzip and zstd, recognised by their bytes.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for r in &rows[20..30] {
        writeln!(gz, "{r}").expect("writes");
    }
    std::fs::write(src.join("b.jsonl.gz"), gz.finish().expect("gz")).expect("writes");
    let plain: String = rows[30..40].iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(src.join("c.jsonl.zst"), zstd::encode_all(plain.as_bytes(), 3).expect("zstd")).expect("writes");
    let mut csv = String::from("question,answer\n");
    for r in &rows[40..50] {
        csv.push_str(&format!("\"{}\",{}\n", r["question"].as_str().expect("q"), r["answer"].as_str().expect("a")));
    }
    std::fs::write(src.join("d.csv"), csv).expect("writes");
    let manifest = prepare(
        &dir,
        &format!(
            "  source: {{uri: \"file://{}\"}}\n  schema: completion\n  mapping: {{prompt: question, completion: answer}}\n  split: {{train: 0.6, validation: 0.2, test: 0.2, seed: \"1\"}}\n  output: {{uri: \"file://{}/out\"}}\n",
            src.display(),
            dir.display()
        ),
    );
    assert_eq!(manifest["counts"]["read"], 50);
    assert_eq!(manifest["counts"]["written"], 50, "{manifest:#}");
    assert_eq!(manifest["inputs"]["source"]["files"].as_array().expect("files").len(), 4);
    // The Parquet output is itself a source: read the train split back.
    let again = prepare(
        &dir,
        &format!(
            "  source: {{uri: \"file://{}/out/train.parquet\"}}\n  schema: completion\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n  output: {{uri: \"file://{}/again\"}}\n  writeJsonl: true\n",
            dir.display(),
            dir.display()
        ),
    );
    assert_eq!(again["counts"]["written"], manifest["counts"]["splits"]["train"]);
    let back = read_jsonl(&dir.join("again/train.jsonl"));
    assert!(back.iter().all(|r| r["prompt"].as_str().is_some_and(|p| p.starts_with("What is"))), "{back:?}");
    // A glob over part of the directory, plain text lines as text records.
    std::fs::write(src.join("e.txt"), "first line\n\nsecond line\n").expect("writes");
    let text = prepare(
        &dir,
        &format!(
            "  source: {{uri: \"file://{}/*.txt\"}}\n  schema: text\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n  output: {{uri: \"file://{}/text\"}}\n",
            src.display(),
            dir.display()
        ),
    );
    assert_eq!(text["counts"]["written"], 2);
}

#[test]
fn same_input_and_spec_give_the_same_digest_and_clusters_stay_in_one_split() {
    let dir = scratch("determinism");
    let plan = corpus(600, 5);
    let path = dir.join("corpus.jsonl");
    write_jsonl(&path, &plan.iter().map(|(t, _, _)| json!({"text": t})).collect::<Vec<_>>());
    // No dedup: near duplicates are kept, but must share their original's split.
    let spec = |out: &str, seed: u64| {
        format!(
            "  source: {{uri: \"file://{}\"}}\n  schema: text\n  split: {{train: 0.5, validation: 0.25, test: 0.25, seed: \"{seed}\"}}\n  output: {{uri: \"file://{}/{out}\"}}\n  writeJsonl: true\n",
            path.display(),
            dir.display()
        )
    };
    let a = prepare(&dir, &spec("a", 1));
    let b = prepare(&dir, &spec("b", 1));
    let c = prepare(&dir, &spec("c", 2));
    assert_eq!(a["sha256"], b["sha256"], "same input and spec, same digest");
    assert_eq!(a["files"], b["files"]);
    assert_ne!(a["sha256"], c["sha256"], "another seed splits differently");
    let mut split_of: HashMap<String, &str> = HashMap::new();
    for split in ["train", "validation", "test"] {
        for r in read_jsonl(&dir.join(format!("a/{split}.jsonl"))) {
            split_of.insert(r["text"].as_str().expect("text").to_string(), split);
        }
    }
    let mut cluster_splits: BTreeMap<usize, HashSet<&str>> = BTreeMap::new();
    for (t, c, kind) in &plan {
        if *kind != Kind::Exact {
            cluster_splits.entry(*c).or_default().insert(split_of[t]);
        }
    }
    let spanning = cluster_splits.values().filter(|s| s.len() > 1).count();
    // LSH may miss a few planted pairs (recall is about 0.9 and more); those may land apart.
    assert!(spanning * 20 <= plan.iter().filter(|p| p.2 == Kind::Near).count(), "{spanning} clusters span splits");
    let counts = &a["counts"]["splits"];
    let train = counts["train"].as_u64().expect("n") as f64 / a["counts"]["written"].as_u64().expect("n") as f64;
    assert!((train - 0.5).abs() < 0.08, "train fraction {train}");
}

#[test]
fn inline_and_feedback_sources_with_token_statistics() {
    use llmops_crds::render::ChatMessage;
    use llmops_worker::serve::traffic::{CompletionRecord, FeedbackRecord, TrafficLog};
    let dir = scratch("feedback");
    let log = TrafficLog::open(&dir.join("traffic"), "pod-0", true).expect("opens");
    let completion = |id: &str, output: &str, time: &str| CompletionRecord {
        id: id.into(),
        time: time.into(),
        revision: "r1".into(),
        model: "m".into(),
        messages: Some(vec![ChatMessage { role: "user".into(), content: format!("question {id}") }]),
        prompt: None,
        output: output.into(),
        finish_reason: "stop".into(),
        prompt_tokens: 3,
        completion_tokens: 2,
        user: None,
    };
    let rate = |id: &str, rating: u8, correction: Option<&str>, time: &str| FeedbackRecord {
        id: id.into(),
        time: time.into(),
        rating,
        correction: correction.map(String::from),
        comment: None,
    };
    log.completion(completion("c1", "good answer", "2026-01-01T00:00:00Z")).expect("writes");
    log.completion(completion("c2", "bad answer", "2026-01-01T00:00:01Z")).expect("writes");
    log.completion(completion("c3", "unrated", "2026-01-01T00:00:02Z")).expect("writes");
    log.completion(completion("c4", "too late", "2026-03-01T00:00:00Z")).expect("writes");
    log.feedback(rate("c1", 5, None, "2026-01-02T00:00:00Z")).expect("writes");
    log.feedback(rate("c2", 1, None, "2026-01-02T00:00:00Z")).expect("writes");
    log.feedback(rate("c2", 4, Some("fixed answer"), "2026-01-03T00:00:00Z")).expect("writes");
    log.feedback(rate("c4", 5, None, "2026-03-02T00:00:00Z")).expect("writes");
    let model = common::test_model();
    let manifest = prepare(
        &dir,
        &format!(
            "  source:\n    feedback: {{uri: \"file://{}/traffic\", minRating: 4, preferCorrection: true, until: \"2026-02-01T00:00:00Z\"}}\n  schema: chat\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n  tokenStats: {{tokenizer: {{weights: {{uri: \"file://{}\"}}, format: gguf}}, histogramBuckets: 4}}\n  output: {{uri: \"file://{}/out\"}}\n  writeJsonl: true\n",
            dir.display(),
            model.display(),
            dir.display()
        ),
    );
    let out = read_jsonl(&dir.join("out/train.jsonl"));
    let answers: Vec<&str> = out.iter().map(|r| r["messages"][1]["content"].as_str().expect("answer")).collect();
    assert_eq!(answers, vec!["good answer", "fixed answer"], "rated >= 4 before the snapshot, correction preferred");
    assert_eq!(manifest["snapshotTime"], "2026-02-01T00:00:00Z");
    let tokenizer = llmops_worker::engine::loader::load_tokenizer(&model).expect("tokenizer");
    let want: usize = out
        .iter()
        .map(|r| {
            let content: Vec<&str> =
                r["messages"].as_array().expect("list").iter().map(|m| m["content"].as_str().expect("c")).collect();
            tokenizer.encode(&content.join("\n"), false).expect("encodes").len()
        })
        .sum();
    assert_eq!(manifest["tokens"]["total"], want, "{manifest:#}");
    assert_eq!(manifest["tokens"]["histogram"].as_array().expect("buckets").len(), 4);

    let inline = prepare(
        &dir,
        &format!(
            "  source:\n    inline:\n      records:\n        - {{prompt: \"2+2\", completion: \"4\"}}\n        - {{prompt: \"3+3\"}}\n  schema: completion\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n  output: {{uri: \"file://{}/inline\"}}\n",
            dir.display()
        ),
    );
    assert_eq!(inline["counts"]["written"], 1);
    assert_eq!(inline["counts"]["invalid"], 1);
    assert!(inline["invalidRows"][0]["error"].as_str().expect("error").contains("\"completion\" is missing"));
}

#[test]
fn a_source_with_no_readable_row_fails_with_the_first_error() {
    let dir = scratch("unreadable");
    let path = dir.join("bad.jsonl");
    std::fs::write(&path, "nope\n{\"x\": 1}\n").expect("writes");
    let file = dir.join("a.yaml");
    std::fs::write(
        &file,
        format!(
            "workload: {{namespace: t, kind: Dataset, name: d, uid: 5d1c2b3a-4e5f-4a6b-8c7d-9e0f1a2b3c4d}}\nprepare:\n  source: {{uri: \"file://{}\"}}\n  schema: text\n  output: {{uri: \"file://{}/out\"}}\n",
            path.display(),
            dir.display()
        ),
    )
    .expect("writes");
    let out = worker(&["prepare", "--assignment", &file.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("none of the 2 rows") && stderr.contains("invalid JSON"), "{stderr}");
    assert!(!dir.join("out/manifest.json").exists(), "no manifest for a failed run");
}

/// Serves `body` for every GET (and HEAD) on a local port, like a plain file server.
fn serve_once(body: Vec<u8>) -> u16 {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request = String::new();
            reader.read_line(&mut request).expect("request line");
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            if request.starts_with("GET") {
                let _ = stream.write_all(&body);
            }
        }
    });
    port
}

#[test]
fn http_sources_are_downloaded_then_read() {
    let dir = scratch("http");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for r in text_rows(30) {
        writeln!(gz, "{r}").expect("writes");
    }
    let port = serve_once(gz.finish().expect("gz"));
    let manifest = prepare(
        &dir,
        &format!(
            "  source: {{uri: \"http://127.0.0.1:{port}/data/qa.jsonl.gz\"}}\n  schema: completion\n  mapping: {{prompt: question, completion: answer}}\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n  output: {{uri: \"file://{}/out\"}}\n",
            dir.display()
        ),
    );
    assert_eq!(manifest["counts"]["written"], 30, "{manifest:#}");
    assert_eq!(manifest["inputs"]["source"]["uri"], format!("http://127.0.0.1:{port}/data/qa.jsonl.gz"));
}

#[test]
fn local_flags_build_a_working_run() {
    let dir = scratch("flags");
    let input = dir.join("in.jsonl");
    write_jsonl(
        &input,
        &[
            json!({"text": "Write to  bob@example.com today."}),
            json!({"text": "write to bob@example.com TODAY."}),
            json!({"text": "Something else entirely, about the weather in spring."}),
        ],
    );
    let out = dir.join("out");
    let run = worker(&[
        "prepare",
        "--input",
        &input.display().to_string(),
        "--schema",
        "text",
        "--out",
        &out.display().to_string(),
        "--normalize",
        "--redact",
        "--dedup",
        "--jsonl",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).expect("manifest")).expect("JSON");
    assert_eq!(manifest["counts"]["written"], 2, "{manifest:#}");
    assert_eq!(manifest["redactions"]["email"], 2);
    let names: Vec<&str> =
        manifest["drops"].as_array().expect("drops").iter().map(|d| d["transform"].as_str().expect("name")).collect();
    assert_eq!(names, ["normalize", "redact", "exactDedup", "nearDedup"]);
    assert_eq!(manifest["drops"][2]["dropped"], 1);
}
