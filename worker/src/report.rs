//! What a running mode tells the world, and what it is asked to do. Modes emit phase
//! changes, progress and checkpoints here; by default nothing listens beyond the mode's
//! own terminal or log output, and in a pod `agent` installs a sink that forwards them
//! to the operator's gateway. Commands from the gateway (checkpoint now, stop, cancel)
//! arrive as flags that long-running modes poll between steps.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// One report of a running mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The mode entered a phase: Staging, Running, Checkpointing, Stopping.
    Phase {
        /// The phase.
        phase: String,
        /// A human-readable detail.
        message: String,
    },
    /// Work done so far.
    Progress {
        /// Units done (steps, samples, records).
        step: u64,
        /// Units in all; 0 when unknown.
        total: u64,
        /// Epoch, for training.
        epoch: f64,
        /// Named figures: loss, learning_rate, tokens_per_second, samples, errors, ...
        metrics: BTreeMap<String, f64>,
        /// Estimated seconds left; 0 when unknown.
        eta_seconds: f64,
        /// A human-readable line.
        message: String,
    },
    /// A checkpoint was written and sealed.
    Checkpoint {
        /// Its directory.
        uri: String,
        /// The step it holds.
        step: u64,
    },
}

/// Where reports go.
pub trait Sink: Send + Sync {
    /// Takes one report; must not block for long.
    fn send(&self, report: Report);
}

static SINK: OnceLock<Box<dyn Sink>> = OnceLock::new();

/// Installs the process-wide sink; only the first call has an effect.
pub fn install(sink: Box<dyn Sink>) -> bool {
    SINK.set(sink).is_ok()
}

/// Hands a report to the sink, if one is installed.
pub fn emit(report: Report) {
    if let Some(sink) = SINK.get() {
        sink.send(report);
    }
}

/// Reports a phase change.
pub fn phase(phase: &str, message: impl Into<String>) {
    emit(Report::Phase { phase: phase.to_string(), message: message.into() });
}

/// Requests from outside the mode, set by the agent and polled by the mode.
#[derive(Debug, Default)]
pub struct Control {
    checkpoint: AtomicBool,
    stop: AtomicBool,
    cancel: AtomicBool,
}

static CONTROL: Control =
    Control { checkpoint: AtomicBool::new(false), stop: AtomicBool::new(false), cancel: AtomicBool::new(false) };

/// The process-wide control flags.
pub fn control() -> &'static Control {
    &CONTROL
}

impl Control {
    /// Asks for a checkpoint now; with `stop`, the mode stops after writing it.
    pub fn request_checkpoint(&self, stop: bool) {
        if stop {
            self.stop.store(true, Ordering::SeqCst);
        }
        self.checkpoint.store(true, Ordering::SeqCst);
    }

    /// Asks the mode to stop at once, without a checkpoint.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Takes a pending checkpoint request: true once per request.
    pub fn take_checkpoint(&self) -> bool {
        self.checkpoint.swap(false, Ordering::SeqCst)
    }

    /// Whether the mode should stop after its next checkpoint.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether the mode should stop now.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Why a mode ended early on request: the agent reports it instead of a failure.
#[derive(Debug, thiserror::Error)]
pub enum Interrupted {
    /// Cancelled by the operator.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// Stopped after a checkpoint at this step, as asked.
    #[error("stopped after writing the checkpoint of step {0}, as asked")]
    Stopped(u64),
}

/// Why a mode could not do its work, with a stable CamelCase `reason` for conditions and
/// events (InvalidAssignment, InputNotFound, DigestMismatch, TargetErrors, JudgeErrors,
/// NothingToScore, TrainingDiverged). The agent reports it as the Failure's reason.
#[derive(Debug, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ModeFailure {
    /// The reason.
    pub reason: &'static str,
    /// What happened, with figures.
    pub message: String,
}
