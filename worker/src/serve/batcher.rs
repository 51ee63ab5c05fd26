//! Continuous batching: one engine thread owns the model and runs decode steps over the
//! running sequences; requests join between steps (after their prefill) and leave as
//! soon as they finish or their client goes away. The queue in front is bounded, so a
//! flood is answered with "busy" instead of growing memory and latency without end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::engine::{Adapter, GenerateRequest, Generation, LoadedModel, Sequence, decode_step};

/// What the engine tells the request that a job belongs to.
#[derive(Debug)]
pub enum Event {
    /// New text (only for streaming jobs; may be empty for the first token).
    Delta(String),
    /// The generation finished; the text not yet sent as deltas comes with it, and the
    /// time from accepting the request to its first token.
    Done { generation: Generation, rest: String, first_token: Duration },
    /// The generation failed.
    Failed(String),
}

/// A request for the engine.
#[derive(Debug)]
pub struct Job {
    /// What to generate.
    pub request: GenerateRequest,
    /// The adapter to apply, if the request named one.
    pub adapter: Option<Arc<Adapter>>,
    /// Send deltas as tokens arrive.
    pub stream: bool,
    /// Where events go; the job is dropped when the receiver is.
    pub events: UnboundedSender<Event>,
    /// When the request was accepted.
    pub accepted: Instant,
}

/// Why a job was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full.
    Busy,
    /// The engine thread has stopped.
    Stopped,
}

/// The handle the HTTP side submits jobs through.
#[derive(Debug, Clone)]
pub struct Batcher {
    queue: SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the engine thread for `model` with at most `max_batch` sequences running and
    /// `max_queue` waiting.
    pub fn start(model: Arc<LoadedModel>, max_batch: usize, max_queue: usize, metrics: Arc<Metrics>) -> Self {
        let (queue, receiver) = sync_channel(max_queue.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let engine =
            Engine { model, max_batch: max_batch.max(1), receiver, queued: queued.clone(), metrics: metrics.clone() };
        std::thread::Builder::new()
            .name("llmops-engine".into())
            .spawn(move || engine.run())
            .expect("spawning the engine thread");
        Self { queue, queued, metrics }
    }

    /// Queues a job, or says why it cannot be.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        // Counted before sending so the engine never sees the count go below zero.
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(job) {
            Ok(()) => {
                self.metrics.queue_depth.set(self.queued.load(Ordering::SeqCst) as i64);
                Ok(())
            }
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Busy,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }
}

/// A running sequence and where its events go.
struct Running {
    sequence: Sequence,
    events: UnboundedSender<Event>,
    stream: bool,
    last_token: Instant,
    /// From accepting the request to the end of its prefill (its first token).
    first_token: Duration,
    /// When the request was accepted.
    accepted: Instant,
}

struct Engine {
    model: Arc<LoadedModel>,
    max_batch: usize,
    receiver: Receiver<Job>,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Engine {
    fn run(self) {
        let mut running: Vec<Running> = Vec::new();
        loop {
            // Admit waiting jobs into free slots; block only when nothing runs.
            while running.len() < self.max_batch {
                let job = if running.is_empty() {
                    match self.receiver.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                } else {
                    match self.receiver.try_recv() {
                        Ok(job) => job,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return,
                    }
                };
                let left = self.queued.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
                self.metrics.queue_depth.set(left as i64);
                if let Some(r) = self.admit(job) {
                    running.push(r);
                }
            }
            let before = running.len();
            running.retain(|r| !r.events.is_closed());
            self.metrics.cancelled.inc_by((before - running.len()) as u64);
            self.metrics.batch_size.set(running.len() as i64);
            if running.is_empty() {
                continue;
            }
            let step = {
                let mut sequences: Vec<&mut Sequence> = running.iter_mut().map(|r| &mut r.sequence).collect();
                decode_step(&self.model, &mut sequences)
            };
            match step {
                Ok(size) => self.metrics.decode_batch_size.observe(size as f64),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "decode step failed");
                    for r in running.drain(..) {
                        let _ = r.events.send(Event::Failed(format!("{e:#}")));
                    }
                    continue;
                }
            }
            let now = Instant::now();
            for r in running.iter_mut() {
                self.metrics.inter_token_latency.observe(now.duration_since(r.last_token).as_secs_f64());
                r.last_token = now;
                if r.stream && r.sequence.finished().is_none() {
                    let delta = r.sequence.take_delta();
                    if !delta.is_empty() {
                        let _ = r.events.send(Event::Delta(delta));
                    }
                }
            }
            let (finished, still): (Vec<Running>, Vec<Running>) =
                running.into_iter().partition(|r| r.sequence.finished().is_some());
            running = still;
            for r in finished {
                self.complete(r);
            }
        }
    }

    /// Prefills a job; a job whose client already left is dropped unseen.
    fn admit(&self, job: Job) -> Option<Running> {
        if job.events.is_closed() {
            self.metrics.cancelled.inc();
            return None;
        }
        self.metrics.queue_time.observe(job.accepted.elapsed().as_secs_f64());
        let prompt_tokens = job.request.prompt.len();
        match Sequence::start(&self.model, job.request, job.adapter, job.stream) {
            Ok(mut sequence) => {
                self.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
                let first_token = job.accepted.elapsed();
                self.metrics.time_to_first_token.observe(first_token.as_secs_f64());
                if job.stream {
                    let _ = job.events.send(Event::Delta(sequence.take_delta()));
                }
                let r = Running {
                    sequence,
                    events: job.events,
                    stream: job.stream,
                    last_token: Instant::now(),
                    first_token,
                    accepted: job.accepted,
                };
                if r.sequence.finished().is_some() {
                    self.complete(r);
                    return None;
                }
                Some(r)
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "prefill failed");
                let _ = job.events.send(Event::Failed(format!("{e:#}")));
                None
            }
        }
    }

    fn complete(&self, r: Running) {
        match r.sequence.finish(&self.model) {
            Ok((generation, rest)) => {
                self.metrics.generated_tokens.inc_by(generation.tokens.len() as u64);
                self.metrics.request_duration.observe(r.accepted.elapsed().as_secs_f64());
                let _ = r.events.send(Event::Done { generation, rest, first_token: r.first_token });
            }
            Err(e) => {
                let _ = r.events.send(Event::Failed(format!("{e:#}")));
            }
        }
    }
}
