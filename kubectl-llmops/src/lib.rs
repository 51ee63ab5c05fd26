//! `kubectl-llmops`, a kubectl plugin for llmops: `status` draws a namespace's pipeline as
//! a tree, `lineage` follows the digests of an object's inputs back to the raw data and
//! the base model, `chat` talks to a ModelDeployment, and `logs` shows the worker pods'
//! logs. What it decides is pure and unit-tested on fixture objects (`objects::Snapshot`
//! in, text out); `cli` only reads the cluster and writes the result.
#![forbid(unsafe_code)]

pub mod chat;
pub mod cli;
pub mod lineage;
pub mod logs;
pub mod objects;
pub mod style;
pub mod tree;
