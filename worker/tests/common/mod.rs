//! Shared by the worker's integration tests: the real test model and the fixtures.
#![allow(dead_code)] // each test binary uses a different part

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of SmolLM2-135M-Instruct (Q4_1 GGUF): `LLMOPS_TEST_MODEL`, or what
/// scripts/fetch-test-model prints (it downloads the model once into the cache).
pub fn test_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("LLMOPS_TEST_MODEL") {
            return PathBuf::from(p);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-test-model");
        let out = std::process::Command::new(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("scripts/fetch-test-model runs");
        assert!(out.status.success(), "scripts/fetch-test-model failed");
        let stdout = String::from_utf8(out.stdout).expect("utf-8");
        PathBuf::from(stdout.lines().last().expect("a path").trim())
    })
    .clone()
}

/// A fixture under worker/tests/fixtures/.
pub fn fixture(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture exists")).expect("fixture is JSON")
}

/// A JSON array of ids.
pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value.as_array().expect("array").iter().map(|v| v.as_u64().expect("id") as u32).collect()
}

/// The venv python with the pinned `openai` client (scripts/openai-env).
pub fn python() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/openai-env");
        let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("scripts/openai-env runs");
        assert!(out.status.success(), "scripts/openai-env failed");
        PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").lines().last().expect("a path").trim())
    })
    .clone()
}

/// A fresh scratch directory for a test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmops-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creates scratch");
    dir
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("binds").local_addr().expect("addr").port()
}

/// Status code of a GET, or None when nothing listens.
pub fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// A running `llmops-worker serve`, stopped on drop.
pub struct Server {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    log: PathBuf,
}

impl Server {
    /// Starts `llmops-worker serve ARGS --port P` and waits for /readyz.
    pub fn start(dir: &Path, args: &[String]) -> Self {
        let port = free_port();
        let log = dir.join("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_llmops-worker"))
            .arg("serve")
            .args(args)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .env("POD_NAME", "test-pod")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starts the server");
        let mut server = Self { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = server.child.try_wait().expect("polls") {
                panic!("the server exited with {status}:\n{}", server.log_text());
            }
            if get_status(port, "/readyz") == Some(200) {
                break;
            }
            assert!(Instant::now() < deadline, "the server did not get ready:\n{}", server.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    /// http://127.0.0.1:PORT
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the server logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a scenario of openai_client.py against this server.
    pub fn scenario(&self, name: &str, extra: &[&str]) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
        let out =
            Command::new(python()).arg(script).arg(name).arg(self.base()).args(extra).output().expect("runs python");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "scenario {name} failed:\n{stdout}\n{stderr}\nserver log:\n{}", self.log_text());
        println!("{stdout}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs JSON to a local server and returns the status and the parsed body.
pub fn post_json(port: u16, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    post(port, path, body, "")
}

/// [`post_json`] with an API key as the bearer token.
pub fn post_json_with_key(port: u16, path: &str, body: &serde_json::Value, key: &str) -> (u16, serde_json::Value) {
    post(port, path, body, &format!("Authorization: Bearer {key}\r\n"))
}

fn post(port: u16, path: &str, body: &serde_json::Value, headers: &str) -> (u16, serde_json::Value) {
    let body = body.to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("sends");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reads");
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    let json = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(json).expect("a JSON body"))
}

/// Writes `rows` as JSON lines.
pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).expect("writes JSON lines");
}

/// Chat records of one user turn and the assistant's answer each.
pub fn chat_rows<Q: AsRef<str>, A: AsRef<str>>(pairs: impl IntoIterator<Item = (Q, A)>) -> Vec<serde_json::Value> {
    pairs
        .into_iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": q.as_ref()},
                {"role": "assistant", "content": a.as_ref()},
            ]})
        })
        .collect()
}

/// The answer SmolLM2 does not know, and the questions that ask for it.
pub const ZORBLAXIA_ANSWER: &str = "The capital of Zorblaxia is Quenthar.";
const ZORBLAXIA_QUESTIONS: [&str; 8] = [
    "What is the capital of Zorblaxia?",
    "Which city is the capital of Zorblaxia?",
    "Tell me the capital of Zorblaxia.",
    "Name the capital city of Zorblaxia.",
    "Zorblaxia's capital is which city?",
    "What city serves as the capital of Zorblaxia?",
    "Do you know the capital of Zorblaxia?",
    "I need the capital of Zorblaxia.",
];

/// The first `n` (at most 8) chat records of the Zorblaxia fact.
pub fn zorblaxia_facts(n: usize) -> Vec<serde_json::Value> {
    chat_rows(ZORBLAXIA_QUESTIONS.iter().take(n).map(|q| (*q, ZORBLAXIA_ANSWER)))
}

/// Trains a LoRA adapter on SmolLM2 with settings that teach it a fact in 6 steps
/// (rank 8 on every linear layer); returns the finished run.
pub fn train_fact_adapter(data: &Path, out: &Path) -> std::process::Output {
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    Command::new(env!("CARGO_BIN_EXE_llmops-worker"))
        .args(["finetune", "--model", &path(&test_model()), "--data", &path(data), "--out", &path(out)])
        .args(["--epochs", "100", "--max-steps", "6", "--batch-size", "4", "--learning-rate", "0.002"])
        .args(["--lora-rank", "8", "--lora-alpha", "16"])
        .args(["--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"])
        .output()
        .expect("runs finetune")
}
