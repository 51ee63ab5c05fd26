//! `llmops-worker agent` serving from a mounted Assignment (`LLMOPS_ASSIGNMENT_FILE`):
//! it serves while the gateway is down, and once a gateway comes up it reports live
//! figures there. The gateway here is a small in-process stand-in that records events
//! and acknowledges each.

mod common;

use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, get_status, post_json, scratch};
use llmops_proto::v1::worker_gateway_server::{WorkerGateway, WorkerGatewayServer};
use llmops_proto::v1::{
    self, FetchRequest, FetchResponse, GatewayCommand, WorkerEvent, gateway_command::Command as GatewayCmd,
    worker_event::Event,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Records every event and acknowledges it; hands out no Assignment.
#[derive(Clone, Default)]
struct RecordingGateway {
    events: Arc<Mutex<Vec<WorkerEvent>>>,
}

type Commands = Pin<Box<dyn Stream<Item = Result<GatewayCommand, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerGateway for RecordingGateway {
    async fn fetch(&self, _: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        Err(Status::failed_precondition("an agent with a mounted assignment must not fetch one"))
    }

    type SessionStream = Commands;

    async fn session(&self, request: Request<Streaming<WorkerEvent>>) -> Result<Response<Commands>, Status> {
        let mut events = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let recorded = self.events.clone();
        tokio::spawn(async move {
            while let Ok(Some(event)) = events.message().await {
                let seq = event.seq;
                recorded.lock().unwrap_or_else(|e| e.into_inner()).push(event);
                let ack = GatewayCommand { command: Some(GatewayCmd::Ack(v1::Ack { seq })) };
                if tx.send(Ok(ack)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

impl RecordingGateway {
    fn progress(&self) -> Vec<v1::Progress> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Progress(p)) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    fn phases(&self) -> Vec<String> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .filter_map(|e| match &e.event {
                Some(Event::Phase(p)) => Some(p.phase.clone()),
                _ => None,
            })
            .collect()
    }
}

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &Path, gateway_port: u16, assignment: &Path, extra: &[(&str, &str)]) -> Self {
        let token = dir.join("token");
        std::fs::write(&token, "test-token\n").expect("writes the token");
        let log = dir.join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_llmops-worker"))
            .arg("agent")
            .env("LLMOPS_GATEWAY", format!("http://127.0.0.1:{gateway_port}"))
            .env("LLMOPS_WORKLOAD", "team-a/ModelDeployment/support/5e6f7a8b-0c1d-4e2f-9a3b-4c5d6e7f8a9b")
            .env("LLMOPS_TOKEN_FILE", &token)
            .env("LLMOPS_POD", "support-7d9f-abcde")
            .env("LLMOPS_ASSIGNMENT_FILE", assignment)
            .env("LLMOPS_SCRATCH", dir)
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starts the agent");
        Self { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most `patience`) for the exit status.
    fn terminate(&mut self, patience: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("runs kill");
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait().expect("polls") {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not stop in {patience:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `patience` for `ready` to hold.
fn eventually(what: &str, patience: Duration, log: &dyn Fn() -> String, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + patience;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; agent log:\n{}", log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_mounted_assignment_serves_without_the_gateway_and_reports_live_figures_once_it_is_up() {
    let dir = scratch("agent-serve");
    let port = free_port();
    let traffic = dir.join("traffic");
    // The JSON form, as the operator's ConfigMap holds it; no host, so the listening
    // address comes from LLMOPS_LISTEN_HOST.
    let assignment = serde_json::json!({
        "workload": {"namespace": "team-a", "kind": "ModelDeployment", "name": "support",
                     "uid": "5e6f7a8b-0c1d-4e2f-9a3b-4c5d6e7f8a9b"},
        "serve": {
            "model": {"weights": {"uri": format!("file://{}", common::test_model().display())}, "format": "gguf"},
            "modelName": "smollm2",
            "serving": {"port": port, "maxBatchSize": 2, "maxQueue": 8, "maxRequestBytes": 65536},
            "traffic": {"record": true, "uri": format!("file://{}", traffic.display())},
            "revision": "rev-1"
        }
    });
    let file = dir.join("assignment.json");
    std::fs::write(&file, assignment.to_string()).expect("writes the assignment");
    let gateway_port = free_port();
    let mut agent = Agent::start(
        &dir,
        gateway_port,
        &file,
        &[("LLMOPS_LISTEN_HOST", "127.0.0.1"), ("LLMOPS_REPORT_INTERVAL_MS", "200")],
    );
    let log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();

    // Nothing listens on the gateway's port, and still the server gets ready and answers.
    eventually("the server to get ready", Duration::from_secs(300), &log, || get_status(port, "/readyz") == Some(200));
    let (status, body) = post_json(
        port,
        "/v1/chat/completions",
        &serde_json::json!({"model": "smollm2", "max_tokens": 8, "temperature": 0,
                            "messages": [{"role": "user", "content": "Say hello."}]}),
    );
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().expect("an id").to_string();
    let (status, body) = post_json(port, "/v1/chat/completions", &serde_json::json!({"model": "nope", "messages": []}));
    assert_eq!(status, 404, "{body}");
    let (status, body) = post_json(port, "/v1/feedback", &serde_json::json!({"id": id, "rating": 4}));
    assert_eq!(status, 200, "{body}");
    assert!(traffic.join("support-7d9f-abcde.jsonl").is_file(), "the traffic log is named after LLMOPS_POD");

    // The gateway comes up; the agent reconnects and the figures arrive.
    let gateway = RecordingGateway::default();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let server = {
        let gateway = gateway.clone();
        runtime.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(WorkerGatewayServer::new(gateway))
                .serve(([127, 0, 0, 1], gateway_port).into())
                .await
        })
    };
    let wanted = |p: &v1::Progress| {
        p.metrics.get("requests_total") == Some(&2.0) && p.metrics.get("feedback_count") == Some(&1.0)
    };
    eventually("live figures at the gateway", Duration::from_secs(90), &log, || gateway.progress().iter().any(wanted));
    let progress = gateway.progress();
    let figures = &progress.iter().rfind(|p| wanted(p)).expect("found above").metrics;
    for key in ["requests_per_second", "tokens_per_second", "ttft_p50_ms", "ttft_p95_ms", "latency_p95_ms"] {
        assert!(figures.get(key).is_some_and(|v| *v > 0.0), "{key} in {figures:?}");
    }
    assert_eq!(figures.get("error_rate"), Some(&0.5), "one of two requests failed: {figures:?}");
    assert_eq!(figures.get("feedback_sum"), Some(&4.0));
    assert_eq!(figures.get("queue_depth"), Some(&0.0));
    assert!(gateway.phases().iter().any(|p| p == "Serving"), "{:?}", gateway.phases());
    // Figures are sent when they change, not on every tick.
    let before = gateway.progress().len();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(gateway.progress().len() <= before + 1, "unchanged figures are not sent again");

    let status = agent.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", agent.log_text());
    assert_eq!(gateway.phases().last().map(String::as_str), Some("Stopping"));
    server.abort();
}

#[test]
fn an_unreadable_mounted_assignment_fails_fast_with_the_gateway_down() {
    let dir = scratch("agent-bad-file");
    let file = dir.join("assignment.json");
    std::fs::write(&file, r#"{"serve": {"modelNam": "x"}}"#).expect("writes");
    let started = Instant::now();
    let mut agent = Agent::start(&dir, free_port(), &file, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = agent.child.try_wait().expect("polls") {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent kept running:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = agent.log_text();
    assert!(log.contains("modelNam"), "the error names the field: {log}");
    assert!(started.elapsed() < Duration::from_secs(40), "a server's pod does not wait long for a gateway");
}
