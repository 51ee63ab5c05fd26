//! The llmops worker library: the engine and the modes.
#![deny(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod engine;
pub mod eval;
pub mod finetune;
pub mod prepare;
pub mod report;
pub mod resolve;
pub mod serve;
pub mod staging;
pub mod store;
