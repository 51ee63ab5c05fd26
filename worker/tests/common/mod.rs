//! Shared by the worker's integration tests: the real test model and the fixtures.
#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

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
