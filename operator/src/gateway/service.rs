//! The tonic implementation of `llmops.worker.v1.WorkerGateway` (plaintext h2c; every
//! call carries the workload's bearer token) and the function that serves it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use llmops_proto::v1::worker_gateway_server::{WorkerGateway, WorkerGatewayServer};
use llmops_proto::v1::{self, FetchRequest, FetchResponse, GatewayCommand, WorkerEvent, gateway_command::Command};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::tokens::bearer;
use super::{Gateway, Recorded};
use crate::workload::WorkloadKey;

/// How long a result waits for the status write before the session is ended, so that
/// the worker reconnects and resends it.
const PERSIST_TIMEOUT: Duration = Duration::from_secs(60);

/// The gRPC service over a [`Gateway`].
#[derive(Debug, Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
}

impl GatewayService {
    /// A service over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    /// As a tonic service.
    pub fn into_server(self) -> WorkerGatewayServer<Self> {
        WorkerGatewayServer::new(self)
    }
}

fn claimed(workload: Option<&v1::Workload>) -> Option<WorkloadKey> {
    workload.filter(|w| !w.uid.is_empty()).map(WorkloadKey::from_proto)
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<GatewayCommand, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerGateway for GatewayService {
    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let token = bearer(request.metadata());
        let body = request.get_ref();
        let key = self.gateway.authenticate(token, claimed(body.workload.as_ref()).as_ref()).map_err(|r| r.status())?;
        let assignment = self
            .gateway
            .assignment(&key.uid)
            .ok_or_else(|| Status::unavailable("the workload's assignment is not ready yet; retry"))?;
        tracing::info!(workload = %key, pod = %body.pod, worker_version = %body.worker_version, "assignment fetched");
        Ok(Response::new(FetchResponse { assignment: Some(assignment) }))
    }

    type SessionStream = CommandStream;

    async fn session(&self, request: Request<Streaming<WorkerEvent>>) -> Result<Response<Self::SessionStream>, Status> {
        let token = bearer(request.metadata());
        let mut events = request.into_inner();
        let first = match events.message().await? {
            Some(event) => event,
            None => return Err(Status::invalid_argument("a session starts with an event naming the workload")),
        };
        let Some(named) = claimed(first.workload.as_ref()) else {
            // Refused for the token first, so a token probe learns nothing.
            self.gateway.authenticate(token, None).map_err(|r| r.status())?;
            return Err(Status::invalid_argument("the first event must name the workload"));
        };
        let key = self.gateway.authenticate(token, Some(&named)).map_err(|r| r.status())?;
        let (tx, rx) = mpsc::channel(64);
        let gateway = self.gateway.clone();
        let id = gateway.open_session(&key, tx.clone());
        tracing::info!(workload = %key, pod = %first.pod, "worker session opened");
        let stopped = gateway.stopped();
        tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut next = Some(first);
            loop {
                let event = match next.take() {
                    Some(e) => e,
                    None => tokio::select! {
                        received = events.next() => match received {
                            Some(Ok(e)) => e,
                            Some(Err(status)) => {
                                tracing::debug!(workload = %key, %status, "worker session ended with an error");
                                break;
                            }
                            None => break,
                        },
                        () = &mut stopped => {
                            let _ = tx.send(Err(Status::unavailable("the operator is shutting down; reconnect"))).await;
                            break;
                        }
                    },
                };
                if let Some(w) = event.workload.as_ref().filter(|w| !w.uid.is_empty())
                    && w.uid != key.uid
                {
                    gateway.metrics().refuse("foreign");
                    let _ = tx.send(Err(Status::permission_denied("an event names another workload"))).await;
                    break;
                }
                let Some(body) = event.event.as_ref() else {
                    let _ = tx.send(Ok(ack(event.seq))).await;
                    continue;
                };
                match gateway.record(&key, &event.pod, event.seq, body) {
                    Recorded::Ack => {}
                    Recorded::AckWhenPersisted(version) => {
                        let persisted = tokio::select! {
                            persisted = gateway.wait_persisted(&key.uid, version, PERSIST_TIMEOUT) => persisted,
                            () = &mut stopped => false,
                        };
                        if !persisted {
                            let _ = tx
                                .send(Err(Status::unavailable(
                                    "the result could not be recorded yet; reconnect and resend",
                                )))
                                .await;
                            break;
                        }
                    }
                }
                if tx.send(Ok(ack(event.seq))).await.is_err() {
                    break;
                }
            }
            gateway.close_session(&key, id);
            tracing::info!(workload = %key, "worker session closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as CommandStream))
    }
}

fn ack(seq: u64) -> GatewayCommand {
    GatewayCommand { command: Some(Command::Ack(v1::Ack { seq })) }
}

/// Serves the gateway on an already bound listener until `shutdown` resolves: over TLS
/// with `tls`, else plaintext h2c.
pub async fn serve_with_listener(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(GatewayService::new(gateway).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
