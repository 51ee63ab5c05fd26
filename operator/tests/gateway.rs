//! The worker gateway over real gRPC on 127.0.0.1 with an in-memory token table: tokens
//! are checked (missing, wrong and foreign ones refused and counted), Fetch returns the
//! registered Assignment, and a session acknowledges events (a result only once it is
//! persisted) and is idempotent per sequence number.

use std::sync::Arc;
use std::time::Duration;

use llmops_operator::gateway::service::serve_with_listener;
use llmops_operator::gateway::{Gateway, Recorded};
use llmops_operator::metrics::Metrics;
use llmops_operator::workload::WorkloadKey;
use llmops_proto::v1::worker_gateway_client::WorkerGatewayClient;
use llmops_proto::v1::{self, FetchRequest, WorkerEvent, gateway_command::Command, worker_event::Event};
use tonic::Code;
use tonic::transport::Channel;

fn key(name: &str) -> WorkloadKey {
    WorkloadKey { namespace: "ns".into(), kind: "Dataset".into(), name: name.into(), uid: format!("uid-{name}") }
}

fn assignment(k: &WorkloadKey) -> v1::Assignment {
    v1::Assignment { workload: Some(k.to_proto()), ..Default::default() }
}

async fn start() -> anyhow::Result<(Arc<Gateway>, WorkerGatewayClient<Channel>)> {
    let gateway = Gateway::new(Arc::new(Metrics::new()), Duration::from_millis(50));
    gateway.register(&key("a"), "token-a", assignment(&key("a")));
    gateway.register(&key("b"), "token-b", assignment(&key("b")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_with_listener(listener, gateway.clone(), None, std::future::pending()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    Ok((gateway, WorkerGatewayClient::new(channel)))
}

fn fetch(k: &WorkloadKey, token: Option<&str>) -> tonic::Request<FetchRequest> {
    let mut r = tonic::Request::new(FetchRequest {
        workload: Some(k.to_proto()),
        pod: "pod-1".into(),
        worker_version: "test".into(),
    });
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
    }
    r
}

#[tokio::test]
async fn tokens_are_checked_and_refusals_counted() -> anyhow::Result<()> {
    let (gateway, mut client) = start().await?;
    let got = client.fetch(fetch(&key("a"), Some("token-a"))).await?.into_inner();
    assert_eq!(got.assignment, Some(assignment(&key("a"))));

    let missing = client.fetch(fetch(&key("a"), None)).await.expect_err("missing token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    let wrong = client.fetch(fetch(&key("a"), Some("not-a-token"))).await.expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let foreign = client.fetch(fetch(&key("a"), Some("token-b"))).await.expect_err("foreign token");
    assert_eq!(foreign.code(), Code::PermissionDenied);

    let m = gateway.metrics();
    assert_eq!((m.refused("missing"), m.refused("unknown"), m.refused("foreign")), (1, 1, 1));
    assert!(m.encode().contains("llmops_operator_gateway_refused_tokens_total{reason=\"foreign\"} 1"));
    Ok(())
}

#[tokio::test]
async fn a_session_with_a_foreign_token_is_refused() -> anyhow::Result<()> {
    let (gateway, mut client) = start().await?;
    let first = WorkerEvent { workload: Some(key("a").to_proto()), pod: "p".into(), seq: 1, ..Default::default() };
    let mut request = tonic::Request::new(tokio_stream::iter(vec![first]));
    request.metadata_mut().insert("authorization", "Bearer token-b".parse()?);
    let err = client.session(request).await.expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(gateway.metrics().refused("foreign"), 1);
    Ok(())
}

#[tokio::test]
async fn events_are_acknowledged_and_a_result_only_once_persisted() -> anyhow::Result<()> {
    let (gateway, mut client) = start().await?;
    let k = key("a");
    let event = |seq: u64, e: Event| WorkerEvent {
        workload: Some(k.to_proto()),
        pod: "pod-1".into(),
        seq,
        time: None,
        event: Some(e),
    };
    let progress = Event::Progress(v1::Progress { step: 3, total_steps: 10, ..Default::default() });
    let result = Event::Result(v1::Result {
        artifact: Some(v1::Artifact { uri: "store://ns/dataset/a/uid-a/output/".into(), sha256: "c".repeat(64) }),
        ..Default::default()
    });
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", "Bearer token-a".parse()?);
    tx.send(event(1, progress.clone())).await?;
    let mut commands = client.session(request).await?.into_inner();
    let ack = |c: Option<v1::GatewayCommand>| match c.and_then(|c| c.command) {
        Some(Command::Ack(a)) => a.seq,
        other => panic!("expected an ack, got {other:?}"),
    };
    assert_eq!(ack(commands.message().await?), 1);
    // A resend of seq 1 (after a reconnect) is acknowledged without recording twice.
    tx.send(event(1, progress)).await?;
    assert_eq!(ack(commands.message().await?), 1);
    tx.send(event(2, result)).await?;
    // Not acknowledged until the status holds it.
    let early = tokio::time::timeout(Duration::from_millis(300), commands.message()).await;
    assert!(early.is_err(), "a result was acknowledged before it was persisted");
    let observed = gateway.observe(&k.uid).expect("observed");
    assert_eq!(observed.progress.map(|p| p.step), Some(3));
    assert!(observed.connected);
    gateway.persisted(&k.uid, observed.terminal_version);
    assert_eq!(ack(commands.message().await?), 2);
    // Recording the same result again is a duplicate.
    let again = gateway.record(&k, "pod-1", 2, &Event::Result(v1::Result::default()));
    assert_eq!(again, Recorded::AckWhenPersisted(observed.terminal_version));
    Ok(())
}
