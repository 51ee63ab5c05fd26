//! The llmops worker protocol: the Assignment each worker mode takes and the gateway
//! service workers report through. Messages have the proto3 JSON mapping as their
//! serde form, so an Assignment reads the same from YAML, JSON or the wire.
#![forbid(unsafe_code)]

/// Generated code of package `llmops.worker.v1`.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/llmops.worker.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/llmops.worker.v1.serde.rs"));
}

mod file;
pub mod validate;

pub use file::{AssignmentFileError, parse_assignment, read_assignment, to_yaml};
pub use v1::assignment::Mode;
pub use v1::{Assignment, EvalAssignment, FinetuneAssignment, PrepareAssignment, ResolveAssignment, ServeAssignment};
pub use validate::{FieldError, Validate};

/// The encoded FileDescriptorSet of the protocol (for gRPC reflection and tooling).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llmops_descriptor.bin"));

impl Mode {
    /// Name of the mode as the worker's subcommand spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Prepare(_) => "prepare",
            Mode::Finetune(_) => "finetune",
            Mode::Eval(_) => "eval",
            Mode::Serve(_) => "serve",
            Mode::Resolve(_) => "resolve",
        }
    }
}
