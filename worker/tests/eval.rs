//! `llmops-worker eval` against real targets: SmolLM2 loaded locally (its perplexity
//! agrees with llama.cpp's, a LoRA adapter trained here beats the base model, multiple
//! choice by log-likelihood), `serve` as an OpenAI endpoint (metrics, API keys and a
//! gate that fails), and a flaky HTTP server: retries ride out 429s, and a target that
//! answers 500 to most requests fails the run with that reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use common::{chat_rows, scratch, write_jsonl};

fn eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llmops-worker")).arg("eval").args(args).output().expect("runs the worker")
}

fn results(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("results.json")).expect("results.json is written");
    serde_json::from_str(&text).expect("results.json is JSON")
}

fn metric(results: &Value, name: &str) -> f64 {
    results["metrics"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["metric"] == name))
        .and_then(|m| m["value"].as_f64())
        .unwrap_or_else(|| panic!("no {name} in {results:#}"))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn log(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Same tokens as llama.cpp (BOS only if the model adds one), every token after the
/// first scored, one window: the perplexity of the fixture's paragraph is within 1%.
#[test]
fn perplexity_of_a_text_split_agrees_with_llamacpp() {
    let dir = scratch("eval-ppl");
    let fx = common::fixture("smollm2-perplexity.json");
    let data = dir.join("text.jsonl");
    write_jsonl(&data, &[json!({"text": fx["text"]})]);
    let out = dir.join("out");
    let model = common::test_model();
    let run = eval(&["--model", path(&model), "--data", path(&data), "--metric", "perplexity", "--out", path(&out)]);
    assert!(run.status.success(), "{}", log(&run));
    let r = results(&out);
    let ours = metric(&r, "perplexity");
    let theirs = fx["perplexity"].as_f64().expect("perplexity");
    assert!((ours / theirs - 1.0).abs() < 0.01, "perplexity {ours:.4} vs llama.cpp {theirs:.4}");
    assert_eq!(r["passed"], true);
    assert_eq!(r["evaluated"]["modelDigest"].as_str().map(str::len), Some(64), "{r:#}");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).expect("manifest")).expect("JSON");
    let sha = llmops_worker::store::file_sha256(&out.join("results.json")).expect("sha");
    assert_eq!(manifest["files"]["results.json"], sha.as_str());
}

fn capitals(dir: &Path) -> PathBuf {
    let rows = chat_rows([
        ("What is the capital of France? Answer with one word.", "Paris"),
        ("What is the capital of Italy? Answer with one word.", "Rome"),
        ("What is the capital of Japan? Answer with one word.", "Tokyo"),
        ("What is the capital of Germany? Answer with one word.", "Berlin"),
        ("What is the capital of Spain? Answer with one word.", "Madrid"),
        ("What is the capital of Egypt? Answer with one word.", "Cairo"),
    ]);
    let data = dir.join("capitals.jsonl");
    write_jsonl(&data, &rows);
    data
}

/// `serve` evaluated through its OpenAI API with a key: every text metric is computed
/// with an interval, outputs are the server's, and a threshold nobody can meet fails
/// the gate with exit status 3 and the reason. A wrong key fails every request, and the
/// run says so instead of passing.
#[test]
fn endpoint_evaluation_against_serve_and_a_failing_gate() {
    let dir = scratch("eval-endpoint");
    let keys = dir.join("keys");
    std::fs::write(&keys, "sk-eval-test\n").expect("keys");
    let key = dir.join("key");
    std::fs::write(&key, "sk-eval-test").expect("key");
    let model = common::test_model();
    let server = common::Server::start(
        &dir,
        &[
            "--model".into(),
            model.display().to_string(),
            "--model-name".into(),
            "smollm2".into(),
            "--api-keys".into(),
            keys.display().to_string(),
        ],
    );
    let data = capitals(&dir);
    let url = format!("{}/v1", server.base());
    let out = dir.join("out");
    let metrics = ["exactMatch", "normalizedExactMatch", "contains", "tokenF1", "rougeL", "bleu"];
    let mut args = vec!["--endpoint", &url, "--endpoint-model", "smollm2", "--api-key-file", path(&key)];
    args.extend(["--data", path(&data), "--out", path(&out), "--max-tokens", "16", "--concurrency", "3"]);
    for m in &metrics {
        args.extend(["--metric", m]);
    }
    args.extend(["--threshold", "contains>=0.0", "--threshold", "rougeL>=0.999"]);
    let run = eval(&args);
    assert_eq!(run.status.code(), Some(3), "{}", log(&run));
    let r = results(&out);
    assert_eq!(r["passed"], false);
    assert_eq!(r["samples"], 6);
    assert_eq!(r["errors"], 0);
    let reason = r["reason"].as_str().expect("a reason");
    assert!(reason.contains("rougeL") && reason.contains("below the minimum 0.999"), "{reason}");
    let verdicts = r["thresholds"].as_array().expect("thresholds");
    assert_eq!(verdicts.iter().filter(|t| t["passed"] == true).count(), 1, "{r:#}");
    for m in metrics {
        let v = metric(&r, m);
        assert!((0.0..=1.0).contains(&v), "{m} = {v}");
        let entry = r["metrics"].as_array().and_then(|a| a.iter().find(|e| e["metric"] == m)).expect("entry");
        let (low, high) = (entry["ciLow"].as_f64().expect("ciLow"), entry["ciHigh"].as_f64().expect("ciHigh"));
        assert!(low <= high && (0.0..=1.0).contains(&low) && high <= 1.0, "{m}: [{low}, {high}]");
    }
    // The outputs shown are what the server answers for the same request.
    let worst = &r["worstSamples"][0];
    let index = worst["index"].as_u64().expect("index") as usize;
    let question = std::fs::read_to_string(&data).expect("data").lines().nth(index).map(String::from).expect("row");
    let question: Value = serde_json::from_str(&question).expect("row JSON");
    let (status, body) = common::post_json_with_key(
        server.port,
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [question["messages"][0]], "max_tokens": 16, "temperature": 0}),
        "sk-eval-test",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(worst["output"], body["choices"][0]["message"]["content"], "{r:#}");
    assert!(String::from_utf8_lossy(&run.stdout).contains("FAILED: "), "{}", log(&run));

    // The same model evaluated locally sees exactly the outputs the server gives.
    let local_out = dir.join("local");
    let run = eval(&[
        "--model",
        path(&model),
        "--data",
        path(&data),
        "--out",
        path(&local_out),
        "--max-tokens",
        "16",
        "--metric",
        "rougeL",
    ]);
    assert!(run.status.success(), "{}", log(&run));
    let local = results(&local_out);
    let outputs = |r: &Value| -> std::collections::BTreeMap<u64, String> {
        r["worstSamples"]
            .as_array()
            .expect("worst samples")
            .iter()
            .map(|w| (w["index"].as_u64().expect("index"), w["output"].as_str().expect("output").to_string()))
            .collect()
    };
    let (served, loaded) = (outputs(&r), outputs(&local));
    for (index, text) in &loaded {
        if let Some(theirs) = served.get(index) {
            assert_eq!(text, theirs, "sample {index}: local and served outputs differ");
        }
    }
    assert_eq!(metric(&local, "rougeL"), metric(&r, "rougeL"));

    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "sk-wrong").expect("key");
    let out2 = dir.join("out2");
    let run = eval(&[
        "--endpoint",
        &url,
        "--endpoint-model",
        "smollm2",
        "--api-key-file",
        path(&wrong),
        "--data",
        path(&data),
        "--out",
        path(&out2),
        "--metric",
        "contains",
    ]);
    assert_eq!(run.status.code(), Some(1), "{}", log(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("TargetErrors") && stderr.contains("HTTP 401"), "{stderr}");
    let r = results(&out2);
    assert_eq!(r["failure"]["reason"], "TargetErrors");
    assert!(r.get("metrics").is_none(), "no metric is reported for a failed run: {r:#}");
}

/// A LoRA adapter trained here on a small fact set: it scores better than the base
/// model on that set, by perplexity and by its answers, and its run passes a gate with
/// the base model's run as its baseline.
#[test]
fn a_lora_trained_here_scores_higher_than_the_base_model() {
    let dir = scratch("eval-lora");
    let data = dir.join("facts.jsonl");
    write_jsonl(&data, &common::zorblaxia_facts(4));
    let model = common::test_model();
    let adapter = dir.join("adapter");
    let train = common::train_fact_adapter(&data, &adapter);
    assert!(train.status.success(), "could not train the adapter: {}", log(&train));

    let base_out = dir.join("base");
    let run = eval(&[
        "--model",
        path(&model),
        "--data",
        path(&data),
        "--out",
        path(&base_out),
        "--metric",
        "tokenF1",
        "--metric",
        "perplexity",
        "--max-tokens",
        "16",
    ]);
    assert!(run.status.success(), "{}", log(&run));
    let base = results(&base_out);
    let (base_f1, base_ppl) = (metric(&base, "tokenF1"), metric(&base, "perplexity"));

    // The adapter, gated on the base run as its baseline: no metric may be worse.
    let assignment = dir.join("gate.yaml");
    std::fs::write(
        &assignment,
        format!(
            "eval:\n  target: {{local: {{model: {{weights: {{uri: \"file://{model}\"}}, format: gguf}}, adapter: {{uri: \"file://{adapter}\"}}}}}}\n  data: {{uri: \"file://{data}\"}}\n  metrics: [tokenF1, perplexity]\n  baseline: {{evalRun: base, metrics: {{tokenF1: {base_f1}, perplexity: {base_ppl}}}, maxRegression: 0}}\n  maxErrorFraction: 0\n  concurrency: 4\n  generation: {{maxTokens: 16}}\n  output: {{uri: \"file://{out}\"}}\n",
            model = model.display(),
            adapter = adapter.display(),
            data = data.display(),
            out = dir.join("tuned").display(),
        ),
    )
    .expect("writes");
    let run = eval(&["--assignment", path(&assignment)]);
    assert!(run.status.success(), "{}", log(&run));
    let tuned = results(&dir.join("tuned"));
    let (tuned_f1, tuned_ppl) = (metric(&tuned, "tokenF1"), metric(&tuned, "perplexity"));
    assert!(tuned_f1 > base_f1, "token F1: adapter {tuned_f1:.3} vs base {base_f1:.3}");
    assert!(tuned_ppl < base_ppl, "perplexity: adapter {tuned_ppl:.3} vs base {base_ppl:.3}");
    assert_eq!(tuned["evaluated"]["adapterDigest"].as_str().map(str::len), Some(64), "{tuned:#}");
    assert_eq!(tuned["passed"], true, "{tuned:#}");
    let compared = tuned["baseline"].as_array().expect("baseline comparison");
    assert_eq!(compared.len(), 2, "{tuned:#}");
    assert!(compared.iter().all(|c| c["regressed"] == false), "{tuned:#}");
}

/// Multiple choice by log-likelihood picks the obvious continuations.
#[test]
fn multiple_choice_picks_the_likeliest_continuation() {
    let dir = scratch("eval-mc");
    let rows = vec![
        json!({"prompt": "One, two, three, four,", "choices": [" purple", " five"], "answer": 1}),
        json!({"prompt": "Monday, Tuesday, Wednesday,", "choices": [" Thursday", " carrot"], "answer": " Thursday"}),
        json!({"prompt": "The cat sat on the", "choices": [" mat", " galaxy"], "answer": 0}),
        json!({"prompt": "January, February, March,", "choices": [" spoon", " April"], "answer": 1}),
    ];
    let data = dir.join("mc.jsonl");
    write_jsonl(&data, &rows);
    let out = dir.join("out");
    let model = common::test_model();
    let run =
        eval(&["--model", path(&model), "--data", path(&data), "--metric", "multipleChoice", "--out", path(&out)]);
    assert!(run.status.success(), "{}", log(&run));
    let r = results(&out);
    assert_eq!(metric(&r, "multipleChoice"), 1.0, "{r:#}");
}

/// A scripted OpenAI-style server: with `mode` "flaky" it answers 429 to the first try
/// of every request and then the expected answer; with "broken" it answers 500 to every
/// request whose prompt is not the first sample's; as a judge it scores an output 5
/// when it contains the expected text and 1 otherwise, in a chatty free-text answer.
struct Scripted {
    port: u16,
    requests: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

fn scripted(mode: &'static str) -> Scripted {
    use axum::Json;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::<String>::new()));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("binds");
    let port = listener.local_addr().expect("addr").port();
    let counter = requests.clone();
    let handler = move |Json(body): Json<Value>| {
        let (counter, seen) = (counter.clone(), seen.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let content = body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(|m| m["content"].as_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            let answer = |text: String| -> Response {
                Json(json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})).into_response()
            };
            match mode {
                "flaky" => {
                    let first = seen.lock().expect("lock").insert(content.clone());
                    if first {
                        return (
                            StatusCode::TOO_MANY_REQUESTS,
                            [("retry-after", "0")],
                            Json(json!({"error": {"message": "slow down"}})),
                        )
                            .into_response();
                    }
                    answer(content.split(" = ").nth(1).unwrap_or_default().to_string())
                }
                "broken" => {
                    if content.starts_with("Q0 ") {
                        answer("fine".into())
                    } else {
                        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": {"message": "the model crashed"}})))
                            .into_response()
                    }
                }
                _ => {
                    let field = |name: &str| {
                        content
                            .split(&format!("<{name}>"))
                            .nth(1)
                            .and_then(|r| r.split(&format!("</{name}>")).next())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let score = if field("output").contains(&field("expected")) { 5 } else { 1 };
                    answer(format!("Let me think about this answer carefully.\n\n**Rating: {score} out of 5** — done."))
                }
            }
        }
    };
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(handler));
    runtime.spawn(async move { axum::serve(listener, app).await });
    Scripted { port, requests, _runtime: runtime }
}

/// Evaluates the scripted server on `data` into `out`, with `extra` flags.
fn eval_scripted(server: &Scripted, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let url = format!("http://127.0.0.1:{}/v1", server.port);
    let mut args = vec!["--endpoint", &url, "--endpoint-model", "m", "--data", path(data), "--out", path(out)];
    args.extend(extra);
    eval(&args)
}

/// Ten questions; the output must contain the expected answer.
fn arithmetic(dir: &Path) -> PathBuf {
    let rows = chat_rows((0..10).map(|i| (format!("Q{i} {i}+{i} = {}", 2 * i), (2 * i).to_string())));
    let data = dir.join("arith.jsonl");
    write_jsonl(&data, &rows);
    data
}

/// 429 on the first try of every request: the retries (honouring Retry-After) get
/// every answer, and the run passes without errors.
#[test]
fn retries_ride_out_rate_limits() {
    let dir = scratch("eval-429");
    let server = scripted("flaky");
    let data = arithmetic(&dir);
    let out = dir.join("out");
    let run = eval_scripted(
        &server,
        &data,
        &out,
        &["--metric", "exactMatch", "--threshold", "exactMatch>=1", "--concurrency", "4"],
    );
    assert!(run.status.success(), "{}", log(&run));
    let r = results(&out);
    assert_eq!((r["errors"].as_u64(), metric(&r, "exactMatch")), (Some(0), 1.0), "{r:#}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 20, "each request was tried twice");
}

/// An endpoint that answers 500 to nine requests in ten fails the run with that reason,
/// after retrying, instead of passing on the one answer that worked.
#[test]
fn an_endpoint_answering_500_to_most_requests_fails_the_run() {
    let dir = scratch("eval-500");
    let server = scripted("broken");
    let data = arithmetic(&dir);
    let out = dir.join("out");
    let run = eval_scripted(
        &server,
        &data,
        &out,
        &["--metric", "contains", "--max-error-fraction", "0.1", "--concurrency", "2"],
    );
    assert_eq!(run.status.code(), Some(1), "{}", log(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("TargetErrors") && stderr.contains("HTTP 500: the model crashed"), "{stderr}");
    assert!(stderr.contains("after 5 attempts"), "{stderr}");
    let r = results(&out);
    assert_eq!(r["passed"], false);
    assert_eq!(r["failure"]["reason"], "TargetErrors");
    assert!(r["errors"].as_u64().expect("errors") >= 2, "{r:#}");
    assert!(r.get("metrics").is_none(), "{r:#}");
    assert!(r["worstSamples"][0]["output"].as_str().expect("output").starts_with("error: HTTP 500"), "{r:#}");
}

/// A judge scores each output with a rubric; its chatty answers are parsed into scores
/// normalised to 0..1.
#[test]
fn a_judge_scores_outputs_with_a_rubric() {
    let dir = scratch("eval-judge");
    let target = scripted("flaky");
    let judge = scripted("judge");
    let rows: Vec<Value> = (0..4)
        .map(|i| {
            let expected = if i < 3 { (2 * i).to_string() } else { "999".to_string() };
            json!({"messages": [{"role": "user", "content": format!("Q{i} {i}+{i} = {}", 2 * i)}, {"role": "assistant", "content": expected}]})
        })
        .collect();
    let data = dir.join("judge.jsonl");
    write_jsonl(&data, &rows);
    let out = dir.join("out");
    let assignment = dir.join("judge.yaml");
    std::fs::write(
        &assignment,
        format!(
            "eval:\n  target: {{endpoint: {{url: \"http://127.0.0.1:{t}/v1\", model: m}}}}\n  data: {{uri: \"file://{data}\"}}\n  metrics: [judge]\n  judge:\n    endpoint: {{url: \"http://127.0.0.1:{j}/v1\", model: judge}}\n    rubric: \"Rate the answer from 1 to 5.\\nQuestion: {{{{ input }}}}\\n<expected>{{{{ expected }}}}</expected>\\n<output>{{{{ output }}}}</output>\"\n    maxScore: 5\n  thresholds: [{{metric: judge, min: 0.7}}]\n  maxErrorFraction: 0\n  concurrency: 2\n  output: {{uri: \"file://{out}\"}}\n",
            t = target.port,
            j = judge.port,
            data = data.display(),
            out = out.display()
        ),
    )
    .expect("writes");
    let run = eval(&["--assignment", path(&assignment)]);
    assert!(run.status.success(), "{}", log(&run));
    let r = results(&out);
    assert_eq!(metric(&r, "judge"), 0.75, "three of four answers match (score 5 -> 1.0, score 1 -> 0.0): {r:#}");
    assert_eq!(r["worstSamples"][0]["index"], 3, "{r:#}");
}
