//! The candle engine shared by every mode: model loading, tokenization, chat templates
//! and generation.

pub mod adapter;
pub mod chat;
pub mod generate;
pub mod loader;
pub mod model;
pub mod sampling;
pub mod tiny;
pub mod tokenizer;

use std::path::Path;

use anyhow::{Result, bail};
use candle_core::Device;

pub use adapter::Adapter;
pub use generate::{FinishReason, GenerateRequest, Generation, Sequence, decode_step, generate, generate_batch};
pub use loader::{LoadedModel, WeightFormat, load};
pub use sampling::SamplingParams;

/// The device work runs on: the first CUDA GPU when built with `cuda` and one is
/// present, else the CPU.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(device) = Device::new_cuda(0) {
        return device;
    }
    Device::Cpu
}

/// Loads the model at `path` and returns it with its digest: the sha256 of a GGUF file,
/// which must equal `expected` when that is given, or `expected` itself for an HF
/// directory (whose digest is its producer's manifest).
pub fn load_verified(
    path: &Path,
    expected: &str,
    device: &Device,
    format: WeightFormat,
) -> Result<(LoadedModel, Option<String>)> {
    let model = load(path, device, format)?;
    let digest = if path.is_file() {
        let found = crate::store::file_sha256(path)?;
        if !expected.is_empty() && !expected.eq_ignore_ascii_case(&found) {
            bail!("{} has sha256 {found}, but the assignment expects {expected}", path.display());
        }
        Some(found)
    } else {
        Some(expected.to_lowercase()).filter(|d| !d.is_empty())
    };
    Ok((model, digest))
}
