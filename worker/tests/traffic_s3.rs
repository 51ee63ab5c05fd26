//! The traffic log on an S3 store, end to end against moto's S3-compatible server
//! (scripts/s3-env): `serve` records completions and feedback in sealed segments (by
//! count while serving, the rest at shutdown), and `prepare` with a `feedback` source
//! over the same `store://` directory turns them into rows, corrections preferred.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, get_status, post_json, scratch};
use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use tokio_stream::StreamExt;

/// moto's server on a loopback port, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-env");
        let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("runs scripts/s3-env");
        assert!(out.status.success(), "scripts/s3-env failed");
        let server = String::from_utf8(out.stdout).expect("utf-8").lines().last().expect("a path").trim().to_string();
        let port = free_port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts moto");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, endpoint: format!("http://127.0.0.1:{port}") }
    }

    /// Makes a bucket with S3's CreateBucket (a bodiless PUT /NAME).
    fn create_bucket(&self, name: &str) {
        let address = self.endpoint.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).expect("connects to moto");
        write!(stream, "PUT /{name} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .expect("sends");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("reads");
        assert!(response.starts_with("HTTP/1.1 200"), "creating bucket {name}: {response}");
    }

    fn bucket(&self, name: &str) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_bucket_name(name)
            .with_endpoint(&self.endpoint)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_allow_http(true)
            .build()
            .expect("a bucket client")
    }

    /// The store section of an Assignment for `bucket`, under prefix `llmops`.
    fn store_yaml(&self, bucket: &str) -> String {
        format!(
            "store:\n  s3: {{bucket: {bucket}, prefix: llmops, endpoint: \"{}\", region: us-east-1, allowHttp: true}}\n",
            self.endpoint
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keys under `prefix`, sorted.
fn keys(bucket: &AmazonS3, prefix: &str) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let prefix = object_store::path::Path::from(prefix);
        let mut listing = bucket.list(Some(&prefix));
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            keys.push(meta.expect("lists").location.to_string());
        }
        keys.sort();
        keys
    })
}

fn chat(port: u16, question: &str) -> String {
    let (status, body) = post_json(
        port,
        "/v1/chat/completions",
        &serde_json::json!({"model": "smollm2", "max_tokens": 4, "temperature": 0,
                            "messages": [{"role": "user", "content": question}]}),
    );
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().expect("an id").to_string()
}

fn rate(port: u16, id: &str, rating: u8, correction: Option<&str>) {
    let mut body = serde_json::json!({"id": id, "rating": rating});
    if let Some(c) = correction {
        body["correction"] = c.into();
    }
    let (status, answer) = post_json(port, "/v1/feedback", &body);
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn serve_seals_traffic_segments_into_s3_and_prepare_reads_them_back() {
    let dir = scratch("traffic-s3");
    let moto = Moto::start();
    moto.create_bucket("artifacts");
    let bucket = moto.bucket("artifacts");
    let traffic_key = "llmops/team-a/modeldeployment/support/traffic";
    let port = free_port();
    let serve = dir.join("serve.yaml");
    std::fs::write(
        &serve,
        format!(
            "workload: {{namespace: team-a, kind: ModelDeployment, name: support, uid: 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d}}\n{}serve:\n  model:\n    weights: {{uri: \"file://{}\"}}\n    format: gguf\n  modelName: smollm2\n  serving: {{host: 127.0.0.1, port: {port}, maxBatchSize: 2, maxQueue: 8, maxRequestBytes: 65536}}\n  traffic: {{record: true, uri: \"store://team-a/modeldeployment/support/traffic/\"}}\n  revision: rev-1\n",
            moto.store_yaml("artifacts"),
            common::test_model().display()
        ),
    )
    .expect("writes the serve assignment");
    let log = dir.join("serve.log");
    let mut server = Command::new(env!("CARGO_BIN_EXE_llmops-worker"))
        .args(["serve", "--assignment", &serve.display().to_string()])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("LLMOPS_POD", "pod-a")
        .env("LLMOPS_SCRATCH", &dir)
        .env("LLMOPS_TRAFFIC_SEGMENT_RECORDS", "2")
        .env("LLMOPS_TRAFFIC_SEGMENT_SECONDS", "3600")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("starts the server");
    let server_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(300);
    while get_status(port, "/readyz") != Some(200) {
        assert!(server.try_wait().expect("polls").is_none(), "the server exited:\n{}", server_log());
        assert!(Instant::now() < deadline, "the server did not get ready:\n{}", server_log());
        std::thread::sleep(Duration::from_millis(200));
    }

    let good = chat(port, "What is 2 + 2?");
    let fixed = chat(port, "Name a colour.");
    let unrated = chat(port, "Say hi.");
    rate(port, &good, 5, None);
    rate(port, &fixed, 2, None);
    rate(port, &fixed, 4, Some("A better answer."));
    rate(port, &unrated, 1, None);
    // Seven records, two to a segment: three segments go up while serving...
    let deadline = Instant::now() + Duration::from_secs(30);
    while keys(&bucket, traffic_key).len() < 3 {
        assert!(Instant::now() < deadline, "sealed segments did not reach the store:\n{}", server_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...and the last one at shutdown.
    let pid = server.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("runs kill").success());
    let status = server.wait().expect("waits");
    assert!(status.success(), "{status}:\n{}", server_log());
    let segments = keys(&bucket, traffic_key);
    assert_eq!(segments.len(), 4, "{segments:?}");
    for key in &segments {
        let name = key.rsplit('/').next().expect("a name");
        assert!(name.starts_with("pod-a-") && name.ends_with(".jsonl"), "{name}");
    }
    assert_eq!(
        std::fs::read_dir(dir.join("llmops-traffic-pod-a")).expect("the local segment directory").count(),
        0,
        "uploaded segments leave local scratch"
    );

    let prepare = dir.join("prepare.yaml");
    std::fs::write(
        &prepare,
        format!(
            "workload: {{namespace: team-a, kind: Dataset, name: feedback, uid: 1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d}}\n{}prepare:\n  source:\n    feedback: {{uri: \"store://team-a/modeldeployment/support/traffic/\", minRating: 4, preferCorrection: true}}\n  schema: chat\n  split: {{train: 1.0, validation: 0.0, test: 0.0}}\n  output: {{uri: \"file://{}/out\"}}\n  writeJsonl: true\n",
            moto.store_yaml("artifacts"),
            dir.display()
        ),
    )
    .expect("writes the prepare assignment");
    let out = Command::new(env!("CARGO_BIN_EXE_llmops-worker"))
        .args(["prepare", "--assignment", &prepare.display().to_string()])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .output()
        .expect("runs prepare");
    assert!(out.status.success(), "prepare failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("out/train.jsonl"))
        .expect("reads the rows")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let questions: Vec<&str> =
        rows.iter().map(|r| r["messages"][0]["content"].as_str().expect("the question")).collect();
    assert_eq!(rows.len(), 2, "rated 4 or better: {rows:?}");
    assert!(questions.contains(&"What is 2 + 2?") && questions.contains(&"Name a colour."), "{questions:?}");
    let corrected = rows.iter().find(|r| r["messages"][0]["content"] == "Name a colour.").expect("the corrected row");
    assert_eq!(corrected["messages"][1]["content"], "A better answer.", "the correction is preferred");
}
